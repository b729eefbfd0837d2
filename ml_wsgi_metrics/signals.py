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
vectorised per feature (one ``searchsorted`` and one ``bincount``) and only non-zero bins are
incremented; a single-row dict takes a plain-Python fast path. Works from any thread and outside
requests (batch jobs); nothing is computed or stored while the app records nothing.
"""

from __future__ import annotations

import json
import math
import os
import re
import sqlite3
import threading
import time
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from itsdangerous import BadPayload, BadSignature, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode
from prometheus_client import REGISTRY, CollectorRegistry

from . import _context, _retired, _settings
from ._replay import FILE_NAME, ReplayStore
from ._retired import Retirements, version_key
from .metrics import (
    ModelMetrics,
    child_adder,
    fast_observer,
    forget_model,
    remove_child,
    shared,
)
from .multiprocess import (
    ENV_VAR,
    active_directory,
    compact,
    merged_directory,
    report_error,
    storage_lock,
)
from .profile import UNSEEN, CategoricalProfile, NumericProfile, ReferenceProfile, positive_scores

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

#: Environment variable supplying the default ``secret_key``.
SECRET_KEY_ENV = _settings.SECRET_KEY.name
#: The ``class`` label of predictions recorded without a predicted class.
NO_CLASS = "__none__"
#: Environment variable supplying the default ``live_versions``.
LIVE_VERSIONS_ENV = _settings.LIVE_VERSIONS.name
#: The ``reason`` label values of ``model_feedback_rejected_total``.
REJECT_REASONS = ("malformed", "tampered", "expired", "unknown_model", "replayed", "retired")

_SALT = "ml_wsgi_metrics.prediction"
_MAX_TOKEN_LENGTH = 4096
# payload (a leading "." when compressed) . timestamp . HMAC-SHA1 signature, URL-safe base64
_TOKEN = re.compile(r"\.?[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{1,12}\.[A-Za-z0-9_-]{27}")
_INF = math.inf
_NAN = math.nan
_DEFAULT_LIVE_VERSIONS = _settings.LIVE_VERSIONS.default
_SYNC_INTERVAL = 1.0  # seconds between two reads of the retired-versions record by the verbs
_monotonic = time.monotonic

Inc = Callable[[float], None]
_JSON = json.JSONEncoder(separators=(",", ":"))


def _compact_json(payload: Any) -> bytes:
    return _JSON.encode(payload).encode("utf-8")


class InvalidPredictionId(ValueError):
    """A prediction id that cannot be scored; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _noop(amount: float) -> None:
    return None


def _apply(updates: list[tuple[list[Inc], np.ndarray]]) -> None:
    """Increment the slots whose amount is non-zero (a loop over slots, never over rows)."""
    with storage_lock():
        for incs, amounts in updates:
            nonzero = np.flatnonzero(amounts)
            for index, amount in zip(nonzero.tolist(), amounts[nonzero].tolist(), strict=True):
                incs[index](amount)


def _to_float(value: Any) -> float:
    if value.__class__ is float:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


def _as_floats(values: Any, rows: int) -> np.ndarray:
    """A float vector; None, NA and anything not a number become NaN (counted as missing)."""
    to_numpy = getattr(values, "to_numpy", None)
    try:
        if to_numpy is not None:
            array = to_numpy(dtype=np.float64, na_value=_NAN)
        else:
            array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        items = values.tolist() if hasattr(values, "tolist") else list(values)
        array = np.fromiter(map(_to_float, items), dtype=np.float64, count=len(items))
    if array.shape != (rows,):
        raise ValueError(f"expected {rows} values per column, got shape {array.shape}")
    return array


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN (and pandas' NA raises: missing too)
    except TypeError:
        return True


def _is_scalar(value: Any) -> bool:
    return (
        value is None
        or isinstance(value, str | bytes | int | float | np.generic)
        or (np.ndim(value) == 0)
    )


# -- compiled models -----------------------------------------------------------------------


class _NumericBlock:
    """Numeric columns and their slots: per column ``[bins..., missing, oor, +sum, -sum, sq]``.

    :meth:`amounts` turns an ``(n, columns)`` matrix into one increment per slot.
    """

    def __init__(self, columns: list[tuple[tuple[float, ...], float, float, list[Inc]]]) -> None:
        self.incs: list[Inc] = []
        self.edges: list[np.ndarray] = []
        bin_base, missing, extras = [], [], []
        for edges, _, _, incs in columns:
            bin_base.append(len(self.incs))
            missing.append(len(self.incs) + len(edges) + 1)
            extras.append(len(self.incs) + len(edges) + 2)
            self.incs.extend(incs)
            self.edges.append(np.asarray(edges, dtype=np.float64))
        self.bin_base = np.asarray(bin_base, dtype=np.intp)
        self.missing = np.asarray(missing, dtype=np.intp)
        extra = np.asarray(extras, dtype=np.intp)
        self.out_of_range, self.positive, self.negative, self.squares = (
            extra + i for i in range(4)
        )
        self.low = np.asarray([c[1] for c in columns], dtype=np.float64)
        self.high = np.asarray([c[2] for c in columns], dtype=np.float64)

    def amounts(self, matrix: np.ndarray) -> np.ndarray:
        codes = np.empty(matrix.shape, dtype=np.intp)
        for j, edges in enumerate(self.edges):
            codes[:, j] = np.searchsorted(edges, matrix[:, j], side="left")
        codes += self.bin_base
        finite = np.isfinite(matrix)
        np.copyto(codes, self.missing, where=~finite)
        amounts = np.bincount(codes.ravel(), minlength=len(self.incs)).astype(np.float64)
        values = np.where(finite, matrix, 0.0)
        outside = (values < self.low) | (values > self.high)
        amounts[self.out_of_range] = (outside & finite).sum(axis=0)
        amounts[self.positive] = np.where(values > 0, values, 0.0).sum(axis=0)
        amounts[self.negative] = -np.where(values < 0, values, 0.0).sum(axis=0)
        amounts[self.squares] = np.square(values).sum(axis=0)
        return amounts


class _Numeric:
    """One numeric column's series, for the single-row path."""

    __slots__ = (
        "bins",
        "edges",
        "high",
        "low",
        "missing",
        "name",
        "negative",
        "oor",
        "positive",
        "squares",
    )

    def __init__(self, name: str, edges: tuple[float, ...], low: float, high: float) -> None:
        self.name, self.edges, self.low, self.high = name, edges, low, high

    def slots(self) -> list[Inc]:
        return [*self.bins, self.missing, self.oor, self.positive, self.negative, self.squares]

    def record(self, value: float) -> int | None:
        """Count one value; returns its bin, or ``None`` when missing."""
        if value != value or value == _INF or value == -_INF:
            self.missing(1)
            return None
        index = bisect_left(self.edges, value)
        self.bins[index](1)
        if value > 0:
            self.positive(value)
            self.squares(value * value)
        elif value < 0:
            self.negative(-value)
            self.squares(value * value)
        if value < self.low or value > self.high:
            self.oor(1)
        return index


class _Categorical:
    """One categorical column: vocabulary codes and series."""

    __slots__ = ("codes", "incs", "missing_code", "name", "unseen_code")

    def __init__(self, name: str, categories: Sequence[str], incs: list[Inc]) -> None:
        # slots: [categories..., unseen bin, missing, unseen counter]
        self.name = name
        self.codes = {c: i for i, c in enumerate(categories)}
        self.unseen_code = len(categories)
        self.missing_code = len(categories) + 1
        self.incs = incs

    def code(self, value: Any) -> int:
        code = self.codes.get(value) if value.__class__ is str else None
        if code is not None:
            return code
        if _is_missing(value):
            return self.missing_code
        return self.codes.get(str(value), self.unseen_code)

    def record(self, value: Any) -> None:
        code = self.code(value)
        self.incs[code](1)
        if code == self.unseen_code:
            self.incs[-1](1)

    def amounts(self, values: Any, rows: int) -> np.ndarray:
        """Counts per slot: the values are counted by hashing (C), then each distinct value
        is looked up once."""
        if len(values) != rows:
            raise ValueError(f"expected {rows} values per column, got {len(values)}")
        try:
            counts = Counter(values)
        except TypeError:  # unhashable values (lists...): counted by their text
            counts = Counter(v if isinstance(v, Hashable) else str(v) for v in values)
        amounts = np.zeros(len(self.incs))
        for value, count in counts.items():
            amounts[self.code(value)] += count
        amounts[-1] = amounts[self.unseen_code]
        return amounts


class _Children:
    """Creates metric children and remembers each, so a retired model removes exactly those."""

    __slots__ = ("created",)

    def __init__(self) -> None:
        self.created: list[tuple[Any, tuple[str, ...]]] = []

    def __call__(self, metric: Any, *labels: str) -> Any:
        self.created.append((metric, labels))
        return metric.labels(*labels)

    def remove(self) -> None:
        for metric, labels in self.created:  # a lazy confusion cell may be in twice
            remove_child(metric, *labels)
        self.created.clear()


class _Model:
    """A registered profile with every series it writes, created (at zero) up front."""

    def __init__(self, profile: ReferenceProfile, metrics: ModelMetrics) -> None:
        self.profile = profile
        labels = metrics.model_labels(profile.model, profile.version)
        self.name, self.version = profile.model, profile.version
        self.children = child = _Children()
        self.retired = False
        self.numeric: list[_Numeric] = []
        self.categorical: list[_Categorical] = []
        for feature in profile.features:
            if isinstance(feature, NumericProfile):
                self.numeric.append(self._numeric_series(metrics, child, labels, feature))
            else:
                self.categorical.append(self._categorical_series(metrics, child, labels, feature))
        self.numeric_names = [f.name for f in self.numeric]
        self.block = _NumericBlock([(f.edges, f.low, f.high, f.slots()) for f in self.numeric])
        self.score = self._score_series(metrics, child, labels, profile.score)
        self.score_block = _NumericBlock(
            [(self.score.edges, self.score.low, self.score.high, self.score.slots())]
        )
        # Predicted classes: the profile's, then NO_CLASS, then UNSEEN (not a known class).
        self.classes = (*(profile.classes or ()), NO_CLASS, UNSEEN)
        self.class_codes = {c: i for i, c in enumerate(self.classes)}
        self.class_incs = [
            child_adder(child(metrics.predictions, *labels, c)) for c in self.classes
        ]
        self.observe_latency = fast_observer(child(metrics.prediction_latency, *labels))
        self.observe_delay = fast_observer(child(metrics.label_delay, *labels))
        if profile.accuracy is not None:
            child(metrics.reference_accuracy, *labels).set(profile.accuracy)
        self._confusion = metrics.confusion
        self._labels = labels
        self._confusion_incs: dict[tuple[str, str], Inc] = {}
        for predicted in profile.classes or ():
            for actual in profile.classes or ():
                self.confusion_adder(predicted, actual)

    @staticmethod
    def _numeric_series(
        metrics: ModelMetrics, child: _Children, labels: tuple[str, ...], feature: NumericProfile
    ) -> _Numeric:
        series = _Numeric(feature.name, feature.edges, feature.min, feature.max)
        key = (*labels, feature.name)
        series.bins = [child_adder(child(metrics.feature_bin, *key, b)) for b in feature.bins]
        for bin_label, share in zip(feature.bins, feature.shares, strict=True):
            child(metrics.feature_reference_share, *key, bin_label).set(share)
        series.missing = child_adder(child(metrics.feature_missing, *key))
        series.oor = child_adder(child(metrics.feature_out_of_range, *key))
        series.positive = child_adder(child(metrics.feature_sum, *key, "positive"))
        series.negative = child_adder(child(metrics.feature_sum, *key, "negative"))
        series.squares = child_adder(child(metrics.feature_sum_squares, *key))
        return series

    @staticmethod
    def _categorical_series(
        metrics: ModelMetrics,
        child: _Children,
        labels: tuple[str, ...],
        feature: CategoricalProfile,
    ) -> _Categorical:
        key = (*labels, feature.name)
        incs = [child_adder(child(metrics.feature_bin, *key, b)) for b in feature.bins]
        for bin_label, share in zip(feature.bins, feature.shares, strict=True):
            child(metrics.feature_reference_share, *key, bin_label).set(share)
        incs.append(child_adder(child(metrics.feature_missing, *key)))
        incs.append(child_adder(child(metrics.feature_unseen, *key)))
        return _Categorical(feature.name, feature.categories, incs)

    @staticmethod
    def _score_series(
        metrics: ModelMetrics,
        child: _Children,
        labels: tuple[str, ...],
        score: NumericProfile | None,
    ) -> _Numeric:
        if score is None:  # no reference bins: count missing values and sums only
            series = _Numeric("score", (), -_INF, _INF)
            series.bins = [_noop]
        else:
            series = _Numeric("score", score.edges, -_INF, _INF)
            series.bins = [child_adder(child(metrics.score_bin, *labels, b)) for b in score.bins]
            for bin_label, share in zip(score.bins, score.shares, strict=True):
                child(metrics.score_reference_share, *labels, bin_label).set(share)
        series.missing = child_adder(child(metrics.score_missing, *labels))
        series.oor = _noop
        series.positive = child_adder(child(metrics.score_sum, *labels, "positive"))
        series.negative = child_adder(child(metrics.score_sum, *labels, "negative"))
        series.squares = child_adder(child(metrics.score_sum_squares, *labels))
        return series

    def confusion_adder(self, predicted: str, actual: str) -> Inc:
        inc = self._confusion_incs.get((predicted, actual))
        if inc is None:
            if self.retired:  # retired while this feedback was on its way: nothing to count
                return _noop
            cell = self.children(self._confusion, *self._labels, predicted, actual)
            inc = self._confusion_incs[(predicted, actual)] = child_adder(cell)
        return inc

    def remove(self) -> None:
        """Remove every series of this version from the metrics (it is retired)."""
        self.retired = True
        self.children.remove()

    def class_code(self, value: Any) -> int:
        """The index of a predicted class in :attr:`classes` (missing: NO_CLASS)."""
        if _is_missing(value):
            return self.class_codes[NO_CLASS]
        code = self.class_codes.get(value if value.__class__ is str else str(value))
        return self.class_codes[UNSEEN] if code is None else code


# -- configuration -------------------------------------------------------------------------


class _Config:
    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        const_labels: dict[str, str],
        secret_key: Any,
        max_feedback_age: float,
        metric_settings: dict[str, Any],
        *,
        max_clock_skew: float = 5.0,
        replay_store: str | os.PathLike[str] | None = None,
        replay_capacity: int = 1_000_000,
        live_versions: int = _DEFAULT_LIVE_VERSIONS,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self.const_labels = const_labels
        self.secret_key = secret_key
        self.max_feedback_age = max_feedback_age
        self.max_clock_skew = max_clock_skew
        self.metric_settings = metric_settings
        self._replay_path = replay_store
        self._replay_capacity = replay_capacity
        self._replay: ReplayStore | None = None
        self.live_versions = live_versions
        self.models: dict[tuple[str, str], _Model] = {}
        self.lock = threading.Lock()
        self.retired = Retirements()  # this process's view: its own and the record's
        self._record: Retirements | None = None  # the record as last read
        self._synced = -math.inf
        self._metrics: ModelMetrics | None = None
        self._serializer: URLSafeTimedSerializer | None = None
        self._signer: Any = None
        self._sign: Callable[[bytes], bytes] | None = None
        self._rejected: dict[str, Inc] = {}

    @property
    def metrics(self) -> ModelMetrics:
        if self._metrics is None:
            with self.lock:
                if self._metrics is None:
                    metrics = shared(
                        ModelMetrics,
                        self.registry,
                        namespace=self.namespace,
                        const_labels=self.const_labels,
                        **self.metric_settings,
                    )
                    const = tuple(self.const_labels.values())
                    self._rejected = {
                        r: child_adder(metrics.feedback_rejected.labels(*const, r))
                        for r in REJECT_REASONS
                    }
                    self._metrics = metrics
        return self._metrics

    def sync(self, *, now: bool = False) -> None:
        """Retire here what other processes retired (the directory's record), reading the
        record at most once a second unless ``now``."""
        moment = _monotonic()
        if not now and moment - self._synced < _SYNC_INTERVAL:
            return
        self._synced = moment
        directory = merged_directory()  # prometheus_client's own, without this package's hooks
        if directory is None:
            return
        try:
            record = _retired.read(directory)
        except (OSError, ValueError) as error:
            report_error(f"reading {_retired.RECORD}", error, stage="storage_read")
            return
        if record is not self._record:
            self._record = record
            self.retired = self.retired.merged(record)
            self._drop_retired()

    def retire(self, change: Callable[[Retirements], None]) -> None:
        """Retire versions (``change`` edits a record): here, in the directory's record so every
        process follows, and their series with them."""
        retired = self.retired.merged(Retirements())
        change(retired)
        directory = merged_directory()
        if directory is not None:
            try:
                retired = retired.merged(_retired.update(directory, change))
            except (OSError, ValueError) as error:  # this process retires them all the same
                report_error(f"writing {_retired.RECORD}", error)
        self.retired = retired
        self._drop_retired()

    def retire_beyond_live(self, model: str) -> None:
        """Retire the versions of ``model`` older than its ``live_versions`` newest registered
        here (registered or not: a version older than those is beyond the live ones)."""
        versions = self.versions(model)
        if len(versions) < self.live_versions:
            return
        floor = versions[-self.live_versions]
        current = self.retired.floors.get(model)
        if current is None or version_key(current) < version_key(floor):
            self.retire(lambda record: record.retire_below(model, floor))

    def versions(self, model: str) -> list[str]:
        """The registered versions of ``model``, oldest first."""
        with self.lock:
            return sorted((v for m, v in self.models if m == model), key=version_key)

    def _drop_retired(self) -> None:
        """Remove the registered versions that are retired, and their series."""
        with self.lock:
            gone = [key for key in self.models if self.retired.is_retired(*key)]
            dropped = [self.models.pop(key) for key in gone]
        for model in dropped:
            model.remove()
            forget_model(self.registry, (model.name, model.version))
        if dropped and active_directory() is not None:
            compact(self.retired.key_filter())

    def reject(self, reason: str) -> None:
        _ = self.metrics
        with storage_lock():
            self._rejected[reason](1)

    @property
    def serializer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            key = self.secret_key or _settings.SECRET_KEY.get()
            if not key:
                raise ValueError(
                    f"secret_key: prediction ids need a secret key; pass "
                    f"configure(secret_key=...) or set {SECRET_KEY_ENV} (the same everywhere "
                    f"feedback may arrive)"
                )
            self._serializer = URLSafeTimedSerializer(key, salt=_SALT)
            self._signer = self._serializer.make_signer()
            self._sign = self._signer.sign
        return self._serializer

    def now(self) -> int:
        """The current time of the signer's clock (whole seconds, as ids are stamped)."""
        _ = self.serializer
        return int(self._signer.get_timestamp())

    @property
    def replay(self) -> ReplayStore:
        """The ids counted so far: the configured file, else the multiprocess directory's,
        else this process's memory (kept when :func:`configure` is called again)."""
        if self._replay is None:
            path = self._replay_path
            if path is None:
                directory = active_directory() or os.environ.get(ENV_VAR)
                path = os.path.join(directory, FILE_NAME) if directory else None
            settings = (self.max_feedback_age + self.max_clock_skew, self._replay_capacity)
            with _config_lock:
                store = _memory_stores.get(settings) if path is None else None
                if store is None:
                    store = ReplayStore(path, lifetime=settings[0], capacity=settings[1])
                    if path is None:
                        _memory_stores[settings] = store
            with self.lock:
                if self._replay is None:
                    self._replay = store
        return self._replay

    def first_time(self, signed_at: int, content: bytes) -> bool:
        """Whether an id is counted for the first time on this host. When the store cannot
        be used the id counts (fail open), and the error is logged and counted."""
        try:
            return self.replay.add(signed_at, content)
        except (sqlite3.Error, OSError, ValueError) as error:
            report_error("the feedback replay store", error)
            return True

    def dumps(self, payload: list[Any]) -> str:
        """``serializer.dumps(payload)`` without its zlib attempt (3x faster; same format)."""
        if self._sign is None:
            _ = self.serializer
        assert self._sign is not None
        return self._sign(base64_encode(_compact_json(payload))).decode("ascii")


_config: _Config | None = None
_config_lock = threading.Lock()
# The in-memory replay stores of this process, by (lifetime, capacity).
_memory_stores: dict[tuple[float, int], ReplayStore] = {}


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
    global _config
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
    if namespace is None:
        namespace = _settings.NAMESPACE.get()
    config = _Config(
        REGISTRY if registry is None else registry,
        namespace,
        dict(const_labels or {}),
        secret_key,
        float(max_feedback_age),
        metric_settings,
        max_clock_skew=float(max_clock_skew),
        replay_store=replay_store,
        replay_capacity=replay_capacity,
        live_versions=_live_versions(live_versions),
    )
    _ = config.metrics  # validate settings now, with a clear error
    if replay_store is not None:
        config.replay.open()  # a file that is not safe to use: ValueError now
    with _config_lock:
        _config = config


def _live_versions(setting: Any) -> int:
    """The ``live_versions`` setting, checked (default: the environment, else 2)."""
    if setting is None:
        setting = _settings.LIVE_VERSIONS.get()
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ValueError(f"live_versions: must be an integer of at least 1, got {setting!r}")
    return setting


def _reset() -> None:
    """Forget the configuration and registered models (for tests: see :mod:`.testing`)."""
    global _config
    with _config_lock:
        _config = None
        _memory_stores.clear()
    _context.reset()


def _current_config() -> _Config:
    """The configuration; the defaults of :func:`configure` until it is called."""
    global _config
    config = _config
    if config is None:
        with _config_lock:
            if _config is None:
                namespace = _settings.NAMESPACE.get()
                live = _live_versions(None)
                _config = _Config(
                    REGISTRY, namespace, {}, None, 30 * 86400.0, {}, live_versions=live
                )
            config = _config
    return config


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
    config = _current_config()
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
    compiled = _Model(profile, config.metrics)
    with config.lock:
        registered = config.models.setdefault(profile.key, compiled)
    config.retire_beyond_live(profile.model)
    return registered.profile


def _check_not_retired(config: _Config, model: str, version: str) -> None:
    if config.retired.is_retired(model, version):
        raise ValueError(
            f"register_model: model {model!r} version {version!r} is retired (older than the "
            f"live_versions={config.live_versions} newest, or retired by retire_model), for "
            f"good: publish it again under a newer version"
        )


def registered_models() -> list[tuple[str, str]]:
    """The ``(model, version)`` pairs registered and live, in registration order."""
    config = _current_config()
    config.sync()
    return list(config.models)


def live_versions() -> int:
    """How many versions of each model stay live (the ``live_versions`` setting)."""
    return _current_config().live_versions


def retire_model(name: str, version: str) -> None:
    """Retire a model version now, for good, whether registered here or not.

    Its series are removed from the metrics (in multiprocess mode from every process's scrapes
    at once, and from the files: each process drops its own when it next uses the verbs);
    :func:`record_prediction` for it raises ``ValueError``; feedback for its ids is rejected
    with reason ``retired``. Registering a newer version retires the oldest beyond
    ``live_versions`` the same way.
    """
    _current_config().retire(lambda record: record.retire(name, version))


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


def _resolve(model: str | None, version: str | None) -> tuple[_Config, _Model]:
    config = _current_config()
    config.sync()
    if model is None:
        bound = _context.current()
        if bound is not None:
            model, version = bound
        else:
            models = list(config.models.values())  # a copy: other threads may register
            if len(models) == 1:
                return config, models[0]
            raise ValueError(
                f"model: {len(models)} models are registered and none is bound; call "
                f"bind_model(name, version) or pass model=..., version=..."
            )
    if version is None:
        versions = [k for k in list(config.models) if k[0] == model]
        if len(versions) != 1:
            raise ValueError(
                f"version: give the version of model {model!r} ({len(versions)} known)"
            )
        version = versions[0][1]
    found = config.models.get((model, version))
    if found is None and config.retired.is_retired(model, version):
        raise ValueError(f"model: {model!r} version {version!r} is retired")
    if found is None:
        raise ValueError(
            f"model: {model!r} version {version!r} is not registered; call "
            f"register_model(profile) first (registered: {sorted(config.models)})"
        )
    return config, found


# -- predictions ---------------------------------------------------------------------------


class Prediction:
    """What :func:`record_prediction` recorded: ``rows`` rows of ``model`` ``version``.

    ``ids`` (one signed token per row, for :func:`record_feedback`) is computed when first read:
    until then only references to the predicted classes and scores are kept.
    """

    __slots__ = ("_classes", "_compiled", "_config", "_ids", "_scores", "_time", "model", "rows",
                 "version")  # fmt: skip

    def __init__(
        self, config: _Config, model: _Model, rows: int, classes: Any, scores: Any
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
            dumps = self._config.dumps
            model = self._compiled
            classes: list[str | None] = [None] * self.rows
            if self._classes is not None:
                labels = [model.classes[model.class_code(c)] for c in self._classes]
                classes = [None if label == NO_CLASS else label for label in labels]
            bins: list[int | None] = [None] * self.rows
            edges = model.score.edges
            if self._scores is not None and edges:
                finite = math.isfinite
                bins = [bisect_left(edges, s) if finite(s) else None for s in self._scores]
            nonces = os.urandom(4 * self.rows).hex()
            stamp = round(self._time, 3)
            head = (self.model, self.version)
            self._ids = [
                dumps([*head, c, b, stamp, nonces[8 * i : 8 * i + 8]])
                for i, (c, b) in enumerate(zip(classes, bins, strict=True))
            ]
        return self._ids

    @property
    def id(self) -> str:
        """The id of a single-row prediction."""
        if self.rows != 1:
            raise ValueError(f"id: this prediction has {self.rows} rows; use .ids")
        return self.ids[0]


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
    config, compiled = _resolve(model, version)
    if latency is not None:
        compiled.observe_latency(latency)
    if (
        isinstance(inputs, Mapping)
        and _is_scalar(next(iter(inputs.values()), None))
        and (scores is None or _is_scalar(scores))
        and (classes is None or _is_scalar(classes))
    ):
        return _record_row(config, compiled, inputs, scores, classes)
    return _record_batch(config, compiled, inputs, scores, classes)


def _record_row(
    config: _Config, model: _Model, row: Mapping[str, Any], score: Any, predicted: Any
) -> Prediction:
    get = row.get
    value = None if score is None else _to_float(score)
    with storage_lock():  # one lock for all the updates (slot values add unlocked)
        for feature in model.numeric:
            feature.record(_to_float(get(feature.name)))
        for categorical in model.categorical:
            categorical.record(get(categorical.name))
        if value is not None:
            model.score.record(value)
        model.class_incs[model.class_code(predicted)](1)
    return Prediction(config, model, 1, [predicted], None if value is None else [value])


def _columns(inputs: Any) -> tuple[int, Callable[[str], Any]]:
    """Row count and a column getter (``None`` for absent columns) for batch inputs."""
    if hasattr(inputs, "columns") and hasattr(inputs, "iloc"):  # a pandas DataFrame
        present = set(inputs.columns)
        return len(inputs), lambda name: inputs[name] if name in present else None
    if isinstance(inputs, Mapping):
        scalars = [_is_scalar(v) for v in inputs.values()]
        if all(scalars):  # one row, with scores or classes given as length-1 arrays
            return 1, lambda name: [inputs[name]] if name in inputs else None
        if any(scalars):
            raise ValueError(
                "inputs: a dict is one row (every value a scalar) or columns (every value a "
                "sequence), not both"
            )
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) > 1:
            raise ValueError(f"inputs: columns of different lengths {sorted(lengths)}")
        return (lengths.pop() if lengths else 0), inputs.get
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        rows = list(inputs)
        if not all(isinstance(r, Mapping) for r in rows):
            raise ValueError("inputs: a list must hold one dict per row")
        return len(rows), lambda name: [r.get(name) for r in rows]
    raise ValueError(
        f"inputs: expected a DataFrame, a dict or a list of dicts, got {type(inputs).__name__}"
    )


def _numeric_matrix(inputs: Any, column: Callable[[str], Any], names: list[str], rows: int):
    if hasattr(inputs, "reindex"):  # DataFrame: one conversion for all numeric columns
        try:
            return inputs.reindex(columns=names).to_numpy(dtype=np.float64, na_value=_NAN)
        except (TypeError, ValueError):
            pass
    matrix = np.full((rows, len(names)), _NAN)
    for j, name in enumerate(names):
        values = column(name)
        if values is not None:
            matrix[:, j] = _as_floats(values, rows)
    return matrix


def _record_batch(
    config: _Config, model: _Model, inputs: Any, scores: Any, classes: Any
) -> Prediction:
    rows: int | None = None
    column: Callable[[str], Any] | None = None
    if inputs is not None:
        rows, column = _columns(inputs)
    score_values = class_values = None
    if scores is not None:
        # a copy: the ids, computed later, must see the scores as they are now
        score_values = positive_scores(scores if not _is_scalar(scores) else [scores]).copy()
        rows = _check_rows(rows, len(score_values), "scores")
    if classes is not None:
        class_values = classes.tolist() if hasattr(classes, "tolist") else classes
        if _is_scalar(class_values):
            class_values = [class_values]
        class_values = list(class_values)
        rows = _check_rows(rows, len(class_values), "classes")
    rows = 1 if rows is None else rows

    # Compute everything first: a bad input raises before any series is touched.
    updates: list[tuple[list[Inc], np.ndarray]] = []
    if column is not None:
        if model.numeric:
            matrix = _numeric_matrix(inputs, column, model.numeric_names, rows)
            updates.append((model.block.incs, model.block.amounts(matrix)))
        for categorical in model.categorical:
            values = column(categorical.name)
            if values is None:
                values = [None] * rows
            elif hasattr(values, "to_numpy"):
                values = values.to_numpy(dtype=object)
            updates.append((categorical.incs, categorical.amounts(values, rows)))
    if score_values is not None:
        updates.append((model.score_block.incs, model.score_block.amounts(score_values[:, None])))
    class_amounts = np.zeros(len(model.classes))
    if class_values is None:
        class_amounts[model.class_codes[NO_CLASS]] = rows
    else:
        for label, count in Counter(class_values).items():
            class_amounts[model.class_code(label)] += count
    updates.append((model.class_incs, class_amounts))
    _apply(updates)
    return Prediction(config, model, rows, class_values, score_values)


def _check_rows(rows: int | None, count: int, what: str) -> int:
    if rows is not None and rows != count:
        raise ValueError(f"{what}: {count} values for {rows} rows")
    return count


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
    _, compiled = _resolve(model, version)
    timer = PredictionTimer(compiled.name, compiled.version)
    started = time.perf_counter()
    yield timer
    timer.elapsed = time.perf_counter() - started
    compiled.observe_latency(timer.elapsed)


# -- feedback ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feedback:
    """Ground truth counted for one prediction id."""

    model: str
    version: str
    predicted: str | None
    actual: str
    correct: bool | None
    delay: float


def _decode(config: _Config, prediction_id: Any) -> tuple[list[Any], int]:
    """The payload of a valid id and the second it was signed."""
    if (
        not isinstance(prediction_id, str)
        or len(prediction_id) > _MAX_TOKEN_LENGTH
        or not _TOKEN.fullmatch(prediction_id)
    ):
        raise InvalidPredictionId("malformed", "prediction id: not a prediction id")
    try:
        payload, signed = config.serializer.loads(prediction_id, return_timestamp=True)
    except BadPayload:
        raise InvalidPredictionId("malformed", "prediction id: unreadable payload") from None
    except BadSignature:
        raise InvalidPredictionId("tampered", "prediction id: bad signature") from None
    signed_at = int(signed.timestamp())
    age = config.now() - signed_at
    if age > config.max_feedback_age:
        raise InvalidPredictionId("expired", "prediction id: expired")
    if age < -config.max_clock_skew:
        raise InvalidPredictionId(
            "expired",
            f"prediction id: signed {-age} s in the future by this host's clock, more than "
            f"max_clock_skew ({config.max_clock_skew:g} s): synchronise the hosts' clocks",
        )
    if (
        not isinstance(payload, list)
        or len(payload) != 6
        or not all(isinstance(v, str) for v in payload[:2])
        or not isinstance(payload[2], str | None)
        or not (payload[3] is None or type(payload[3]) is int)
        or not isinstance(payload[4], int | float)
    ):
        raise InvalidPredictionId("malformed", "prediction id: unexpected payload")
    return payload, signed_at


def record_feedback(prediction_id: str, actual: Any) -> Feedback:
    """Count the ground truth ``actual`` for a prediction id, in any process or host.

    Increments ``model_confusion_total{predicted, actual}`` (when the prediction had a class)
    and observes the label delay. Raises :class:`InvalidPredictionId` (after counting it in
    ``model_feedback_rejected_total{reason}``) for malformed, tampered or expired ids, for
    models not registered here, for retired versions, for a predicted class the model does not
    have, and for an id already counted on this host (``replayed``).
    """
    if _is_missing(actual):
        raise ValueError("actual: the ground truth is missing")
    config = _current_config()
    config.sync()
    try:
        payload, signed_at = _decode(config, prediction_id)
        model, version, predicted, _, stamp, _ = payload
        compiled = config.models.get((model, version))
        if compiled is None:
            retired = config.retired.is_retired(model, version)
            raise InvalidPredictionId(
                "retired" if retired else "unknown_model",
                f"prediction id: model {model!r} version {version!r} is "
                + ("retired" if retired else "not registered here"),
            )
        if predicted is not None and (
            predicted == NO_CLASS or predicted not in compiled.class_codes
        ):
            raise InvalidPredictionId(
                "malformed",
                f"prediction id: class {predicted[:60]!r} is not a class of model {model!r} "
                f"version {version!r}",
            )
        if not config.first_time(signed_at, _compact_json(payload)):
            raise InvalidPredictionId(
                "replayed", "prediction id: feedback for it was already counted on this host"
            )
    except InvalidPredictionId as error:
        config.reject(error.reason)
        raise
    delay = max(0.0, time.time() - stamp)
    code = compiled.class_code(actual)
    label = compiled.classes[code] if code != compiled.class_codes[NO_CLASS] else UNSEEN
    correct = None
    if predicted is not None and compiled.profile.classes:
        inc = compiled.confusion_adder(predicted, label)
        with storage_lock():
            inc(1)
        correct = predicted == label
    compiled.observe_delay(delay)
    return Feedback(model, version, predicted, label, correct, delay)
