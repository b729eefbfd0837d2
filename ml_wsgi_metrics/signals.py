"""The context API: the app says what its model did; this turns it into Prometheus metrics.

In the manner of structlog's contextvars: a few verbs, no prometheus_client in the app::

    signals.configure(secret_key=...)                 # optional: registry, namespace, ...
    signals.register_model("models/churn/3/profile.json")
    with signals.model_context("churn", "3"):         # or bind_model(); optional with one model
        with signals.time_prediction() as timer:
            scores = clf.predict_proba(frame)[:, 1]
        prediction = signals.record_prediction(frame, scores=scores, classes=labels)
    ids = prediction.ids                              # signed, per row, computed when read
    ...
    signals.record_feedback(prediction_id, actual="Yes")   # later, in any worker or host

Feedback counts once per id and host: the ids already counted are kept for the ids' lifetime
in a store shared by the host's processes (:mod:`._replay`), in the multiprocess directory
when there is one.

Everything is a counter or histogram per reference bin, so PSI, means, standard deviations and
accuracy merge exactly across workers and hosts (see :mod:`ml_wsgi_metrics.rules`). Recording is
vectorised (numeric features in one pass of a C kernel, see :mod:`._recorders`) and only non-zero
slots are added to; a single-row dict takes a fast path. Works from any thread and outside
requests (batch jobs); nothing is computed or stored while the app records nothing.

This module is the public door: the verbs, :class:`Prediction` and the checks of
:func:`configure`. The work is done in private modules beside it: :mod:`._config` (this
process's configuration and registered models), :mod:`._model` (a model's series),
:mod:`._recorders` (vectorised recording), :mod:`._inputs` (reading the app's inputs),
:mod:`._prediction_ids` (signed ids) and :mod:`._feedback` (what feedback may count).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from prometheus_client import REGISTRY, CollectorRegistry

from . import _config, _context, _settings
from ._config import LIVE_VERSIONS_ENV, Config, resolve
from ._feedback import Feedback, count_feedback
from ._inputs import is_missing, is_scalar
from ._model import CompiledModel
from ._prediction_ids import NONE, REJECT_REASONS, SECRET_KEY_ENV, IntArray, InvalidPredictionId
from ._recorders import NO_CLASS, record_batch, record_row
from .profile import ReferenceProfile

__all__ = [
    "LIVE_VERSIONS_ENV",
    "NO_CLASS",
    "REJECT_REASONS",
    "SECRET_KEY_ENV",
    "Feedback",
    "InvalidPredictionId",
    "Prediction",
    "PredictionTimer",
    "bind_model",
    "configure",
    "current_model",
    "live_versions",
    "model_context",
    "record_feedback",
    "record_prediction",
    "register_model",
    "registered_models",
    "retire_model",
    "time_prediction",
    "unbind_model",
]


def configure(
    *,
    registry: CollectorRegistry | None = None,
    namespace: str | None = None,
    const_labels: Mapping[str, str] | None = None,
    secret_key: str | bytes | Sequence[str | bytes] | None = None,
    max_feedback_age: float = 30 * 86400,
    max_clock_skew: float = 5.0,
    replay_store: str | os.PathLike[str] | None = None,
    replay_capacity: int = 1_000_000,
    live_versions: int | None = None,
    **metric_settings: Any,
) -> None:
    """Set where and how model signals are recorded; forgets the models registered so far.

    :param registry: where the metrics live (default: prometheus_client's).
    :param namespace: metric name prefix (default ``$ML_WSGI_METRICS_NAMESPACE``); use the
        middleware's, so both share one :class:`~ml_wsgi_metrics.metrics.ModelMetrics`.
    :param const_labels: labels on every series, as given to the middleware.
    :param secret_key: signs prediction ids (default ``$ML_WSGI_METRICS_SECRET_KEY``); a list
        rotates keys (newest last). Needed only for ``Prediction.ids`` and feedback.
    :param max_feedback_age: seconds after which a prediction id expires.
    :param max_clock_skew: seconds an id may seem signed in the future (the predicting host's
        clock is ahead of this one's); hosts need synchronised clocks beyond that.
    :param replay_store: the SQLite file that keeps the ids counted, shared by the processes
        that use it (default: ``feedback-ids.sqlite3`` in the multiprocess directory, else this
        process's memory); created 0600 in a directory only this user can write.
    :param replay_capacity: the most ids it keeps; when full, expired ids go first, then the
        oldest (which would then count again).
    :param live_versions: how many versions of each model stay live (default
        ``$ML_WSGI_METRICS_LIVE_VERSIONS``, else 2): registering a newer one retires the oldest
        (see :func:`retire_model`).
    :param metric_settings: ``latency_buckets``, ``label_delay_buckets`` for ModelMetrics.
    """
    _check_settings(max_feedback_age, max_clock_skew, replay_capacity, metric_settings)
    if namespace is None:
        namespace = _settings.NAMESPACE.get()
    config = Config(
        REGISTRY if registry is None else registry,
        namespace,
        dict(const_labels or {}),
        secret_key,
        float(max_feedback_age),
        metric_settings,
        max_clock_skew=float(max_clock_skew),
        replay_store=replay_store,
        replay_capacity=replay_capacity,
        live_versions=_config.live_versions(live_versions),
    )
    _ = config.metrics  # validate settings now, with a clear error
    if replay_store is not None:
        config.replay.open()  # a file that is not safe to use: ValueError now
    _config.install(config)


def _check_settings(
    max_feedback_age: Any, max_clock_skew: Any, replay_capacity: Any, metric_settings: Any
) -> None:
    """A ``ValueError`` naming the first setting of :func:`configure` that is not valid."""
    if not (isinstance(max_feedback_age, int | float) and max_feedback_age > 0):
        raise ValueError(f"max_feedback_age: must be a positive number, got {max_feedback_age!r}")
    if not (
        isinstance(max_clock_skew, int | float)
        and not isinstance(max_clock_skew, bool)
        and 0 <= max_clock_skew < math.inf
    ):
        raise ValueError(
            f"max_clock_skew: must be a number of seconds >= 0, got {max_clock_skew!r}"
        )
    if type(replay_capacity) is not int or replay_capacity < 1:
        raise ValueError(f"replay_capacity: must be a positive integer, got {replay_capacity!r}")
    unknown = set(metric_settings) - {"latency_buckets", "label_delay_buckets"}
    if unknown:
        raise ValueError(f"configure: unknown setting(s) {sorted(unknown)}")


def _reset() -> None:
    """Forget the configuration and registered models (for tests: see :mod:`.testing`)."""
    _config.reset()


def register_model(profile: ReferenceProfile | str | os.PathLike[str]) -> ReferenceProfile:
    """Register a model version from its profile (or the profile's path) and return it.

    Creates every series of the model at zero (each bin, class and confusion cell) and sets the
    reference-share and held-out accuracy gauges. Registering the same profile again does
    nothing; a different profile under the same model and version is a ``ValueError`` (bump
    the version). Only the ``live_versions`` newest versions of a model stay live (ordered as
    :func:`~ml_wsgi_metrics._retired.version_key` does): registering a newer one retires the
    oldest. Registering a retired version, or one older than the live ones, is a ``ValueError``.
    """
    if not isinstance(profile, ReferenceProfile):
        profile = ReferenceProfile.load(profile)
    config = _config.current()
    config.sync(now=True)
    with config.lock:
        existing = config.models.get(profile.key)
    if existing is not None:
        if existing.profile != profile:
            raise ValueError(
                f"register_model: model {profile.model!r} version {profile.version!r} is already "
                f"registered with a different profile; give the new one a new version"
            )
        return existing.profile
    _check_not_retired(config, profile.model, profile.version)
    compiled = CompiledModel(profile, config.metrics)
    with config.lock:
        registered = config.models.setdefault(profile.key, compiled)
    config.retire_beyond_live(profile.model)
    return registered.profile


def _check_not_retired(config: Config, model: str, version: str) -> None:
    if config.retired.is_retired(model, version):
        raise ValueError(
            f"register_model: model {model!r} version {version!r} is retired (older than the "
            f"live_versions={config.live_versions} newest, or retired by retire_model), for "
            f"good: publish it again under a newer version"
        )


def registered_models() -> list[tuple[str, str]]:
    """The ``(model, version)`` pairs registered and live, in registration order."""
    config = _config.current()
    config.sync()
    return list(config.models)


def live_versions() -> int:
    """How many versions of each model stay live (the ``live_versions`` setting)."""
    return _config.current().live_versions


def retire_model(name: str, version: str) -> None:
    """Retire a model version now, for good, whether registered here or not.

    Its series are removed from the metrics (in multiprocess mode from every process's scrapes
    at once, and from the files: each process drops its own when it next uses the verbs);
    :func:`record_prediction` for it raises ``ValueError``; feedback for its ids is rejected
    with reason ``retired``. Registering a newer version retires the oldest beyond
    ``live_versions`` the same way.
    """
    _config.current().retire(lambda record: record.retire(name, version))


def bind_model(name: str, version: str) -> None:
    """Bind the model of the current context (request, thread): the verbs default to it."""
    _context.bind(name, version)


def unbind_model() -> None:
    """Forget the current context's binding."""
    _context.reset()


def current_model() -> tuple[str, str] | None:
    """The bound ``(name, version)``, or ``None``."""
    return _context.current()


@contextmanager
def model_context(name: str, version: str) -> Iterator[None]:
    """Bind a model for the ``with`` block, restoring the previous binding after it."""
    token = _context.bind(name, version)
    try:
        yield
    finally:
        _context.restore(token)


# -- predictions ---------------------------------------------------------------------------


class Prediction:
    """What :func:`record_prediction` recorded: ``rows`` rows of ``model`` ``version``.

    ``ids`` (one signed token per row, for :func:`record_feedback`) is computed when first read:
    until then only references to the predicted classes and scores are kept.
    """

    __slots__ = ("_classes", "_compiled", "_config", "_ids", "_scores", "_time", "model", "rows",
                 "version")  # fmt: skip

    def __init__(
        self, config: Config, model: CompiledModel, rows: int, classes: Any, scores: Any
    ) -> None:
        self._config, self._compiled = config, model
        self.model, self.version, self.rows = model.name, model.version, rows
        self._classes, self._scores = classes, scores
        self._time = time.time()
        self._ids: list[str] | None = None

    def __len__(self) -> int:
        return self.rows

    def __repr__(self) -> str:
        return f"<Prediction {self.model}:{self.version} rows={self.rows}>"

    @property
    def ids(self) -> list[str]:
        """One prediction id per row: a signed token carrying model, version, class, bin, time."""
        if self._ids is None:
            labels, classes = _class_indexes(self._compiled, self._classes, self.rows)
            bins = _score_bins(self._compiled, self._scores, self.rows)
            self._ids = self._config.signer.sign_rows(
                self.model, self.version, labels, classes, bins, self._time
            )
        return self._ids

    @property
    def id(self) -> str:
        """The id of a single-row prediction."""
        if self.rows != 1:
            raise ValueError(f"id: this prediction has {self.rows} rows; use .ids")
        return self.ids[0]


def _class_indexes(model: CompiledModel, classes: Any, rows: int) -> tuple[list[str], IntArray]:
    """The predicted classes as indexes into a table of the labels they have, each row's class
    the one it was counted as (``ClassCounter.codes``); :data:`NONE` for rows without a class."""
    if classes is None:
        return [], np.full(rows, NONE, dtype=np.intp)
    slots = model.class_counter.codes(classes)
    table: list[str] = []
    index = np.full(len(model.classes), NONE, dtype=np.intp)
    present = np.bincount(slots, minlength=len(model.classes)).nonzero()[0].tolist()
    for slot in present:  # the labels the rows have, in the model's order
        if model.classes[slot] != NO_CLASS:
            index[slot] = len(table)
            table.append(model.classes[slot])
    indexes: IntArray = index[slots]
    return table, indexes


def _score_bins(model: CompiledModel, scores: Any, rows: int) -> IntArray:
    """Each row's score bin (as recorded); :data:`NONE` without a score or reference bins."""
    if scores is None or not model.score.edges:
        return np.full(rows, NONE, dtype=np.intp)
    values = np.asarray(scores, dtype=np.float64)
    bins: IntArray = np.searchsorted(model.score_block.edges[0], values, side="left")
    bins[~np.isfinite(values)] = NONE
    return bins


def record_prediction(
    inputs: Any = None,
    *,
    scores: Any = None,
    classes: Any = None,
    latency: float | None = None,
    model: str | None = None,
    version: str | None = None,
) -> Prediction:
    """Record one prediction call: its inputs, scores and predicted classes, one or many rows.

    :param inputs: a pandas DataFrame, a dict of one row, a dict of columns or a list of row
        dicts. Profile features absent from the inputs count as missing; others are ignored.
        A dict of one row takes its scores and classes as scalars or as length-1 arrays
        (``model.predict_proba(frame)[:, 1]``).
    :param scores: the positive-class probability (or score) per row; a ``(n, 2)``
        ``predict_proba`` result gives its column 1.
    :param classes: the predicted class per row (compared with the profile's as strings).
    :param latency: seconds the model took for the whole call (else see :func:`time_prediction`).
    :param model: defaults to the bound model, or the only one registered.
    """
    config, compiled = resolve(model, version)
    if latency is not None:
        compiled.observe_latency(latency)
    if (
        isinstance(inputs, Mapping)
        and is_scalar(next(iter(inputs.values()), None))
        and (scores is None or is_scalar(scores))
        and (classes is None or is_scalar(classes))
    ):
        score = record_row(compiled, inputs, scores, classes)
        return Prediction(config, compiled, 1, [classes], None if score is None else [score])
    batch = record_batch(compiled, inputs, scores, classes)
    return Prediction(config, compiled, batch.rows, batch.classes, batch.scores)


class PredictionTimer:
    """Yielded by :func:`time_prediction`; ``elapsed`` is set when the block ends."""

    __slots__ = ("_model", "_version", "elapsed", "prediction")

    def __init__(self, model: str, version: str) -> None:
        self._model, self._version = model, version
        self.elapsed: float | None = None
        self.prediction: Prediction | None = None

    def record(self, inputs: Any = None, *, scores: Any = None, classes: Any = None) -> Prediction:
        """:func:`record_prediction` for the timed model (the latency is recorded at exit)."""
        self.prediction = record_prediction(
            inputs, scores=scores, classes=classes, model=self._model, version=self._version
        )
        return self.prediction


@contextmanager
def time_prediction(
    *, model: str | None = None, version: str | None = None
) -> Iterator[PredictionTimer]:
    """Time the ``with`` block as one prediction call (``model_prediction_latency_seconds``).

    Not recorded when the block raises: a failed call is not a prediction.
    """
    _, compiled = resolve(model, version)
    timer = PredictionTimer(compiled.name, compiled.version)
    started = time.perf_counter()
    yield timer
    timer.elapsed = time.perf_counter() - started
    compiled.observe_latency(timer.elapsed)


def record_feedback(prediction_id: str, actual: Any) -> Feedback:
    """Count the ground truth ``actual`` for a prediction id, in any process or host.

    Increments ``model_confusion_total{predicted, actual}`` (when the prediction had a class)
    and observes the label delay. Raises :class:`InvalidPredictionId` (after counting it in
    ``model_feedback_rejected_total{reason}``) for malformed, tampered or expired ids, for
    models not registered here, for retired versions, for a predicted class the model does not
    have, and for an id already counted on this host (``replayed``).
    """
    if is_missing(actual):
        raise ValueError("actual: the ground truth is missing")
    config = _config.current()
    config.sync()
    return count_feedback(config, prediction_id, actual)
