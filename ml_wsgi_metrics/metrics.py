"""Every metric the package exports, defined in one place with the registry injected.

Workers only increment counters and histograms, so every series merges exactly across workers
and hosts; the few gauges name their multiprocess mode and why. Means, deviations, accuracy,
drift and quantiles are computed in PromQL after ``sum by``.
"""

from __future__ import annotations

import contextlib
import math
import re
import threading
import warnings
from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.values import MutexValue

from . import _errors
from . import multiprocess as _storage
from .multiprocess import SlotValue, storage_lock

Cell = tuple[Any, Any]  # (store, key): ``store[key] += amount`` adds to a metric value

__all__ = [
    "DEFAULT_DURATION_BUCKETS",
    "DEFAULT_SIZE_BUCKETS",
    "ModelMetrics",
    "RequestMetrics",
    "RouteSeries",
    "ServerMetrics",
    "child_adder",
    "fast_observer",
    "forget_model",
    "remove_child",
    "shared",
]

DEFAULT_DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
DEFAULT_SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216)
DEFAULT_LABEL_DELAY_BUCKETS = (
    60,
    300,
    900,
    3600,
    4 * 3600,
    86400,
    3 * 86400,
    7 * 86400,
    30 * 86400,
)

_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")


def validate_buckets(setting: str, buckets: Iterable[float]) -> tuple[float, ...]:
    """Sorted, finite, positive bucket edges, or a ``ValueError`` naming ``setting``."""
    edges = tuple(float(b) for b in buckets if not math.isinf(b))
    if not edges:
        raise ValueError(f"{setting}: give at least one finite bucket edge")
    if any(math.isnan(b) for b in edges) or list(edges) != sorted(set(edges)):
        raise ValueError(f"{setting}: bucket edges must be increasing numbers, got {buckets!r}")
    if edges[0] < 0:
        raise ValueError(f"{setting}: a negative lowest edge drops _sum in prometheus_client")
    return edges


def validate_const_labels(
    const_labels: Mapping[str, str] | None, reserved: Iterable[str]
) -> dict[str, str]:
    """Constant labels (``service``, ``version``...) checked against names the metrics use."""
    labels = dict(const_labels or {})
    for name, value in labels.items():
        if not isinstance(name, str) or not _LABEL_NAME.match(name) or name.startswith("__"):
            raise ValueError(f"const_labels: {name!r} is not a valid label name")
        if name in reserved or name == "le":
            raise ValueError(f"const_labels: {name!r} is already a label of these metrics")
        if not isinstance(value, str):
            raise ValueError(f"const_labels: the value of {name!r} must be a string")
    return labels


def validate_namespace(namespace: str) -> str:
    if namespace and not _METRIC_NAME.match(namespace):
        raise ValueError(f"namespace: {namespace!r} is not a valid metric name prefix")
    return namespace


def fast_observer(histogram: Any) -> Callable[[float], None]:
    """``observe`` for one labelled histogram child, without its per-call checks.

    Writes exactly what ``Histogram.observe`` writes (one bucket and the sum, found by
    bisection), except that NaN is ignored instead of poisoning the sum.
    """
    adders = _HistogramAdders(histogram)
    if not adders.fast:
        return adders.observe

    def observe(amount: float) -> None:
        with storage_lock():
            adders._observe(amount)

    return observe


def _adder(value: Any) -> Callable[[float], None]:
    """Add to a stored value: unlocked for slot values (the caller holds the storage lock)."""
    return value.add_unlocked if isinstance(value, SlotValue) else value.inc


def child_adder(child: Any) -> Callable[[float], None]:
    """Add to a counter or gauge child's stored value, without its per-call checks.

    Slot values (multiprocess mode) are added to unlocked: the caller holds
    :func:`~ml_wsgi_metrics.multiprocess.storage_lock` around all the updates of one call.
    """
    value = getattr(child, "_value", None)
    return _adder(value) if hasattr(value, "inc") else child.inc


class _HistogramAdders:
    """Adders to the stored values of one labelled histogram child, for updates under one lock.

    Adders, unlike cells, stay valid when the storage moves (a fork, a slot): the signals API
    keeps them for the life of a registered model.
    """

    __slots__ = ("_bounds", "_buckets", "_sum", "fast", "observe")

    def __init__(self, child: Any) -> None:
        try:
            self._bounds = tuple(child._upper_bounds)
            self._buckets = [_adder(bucket) for bucket in child._buckets]
            self._sum = _adder(child._sum)
            self.observe = self._observe
            self.fast = True
        except AttributeError:  # prometheus_client internals changed: take the public path
            self.observe = child.observe
            self.fast = False

    def _observe(self, amount: float) -> None:
        if amount != amount:  # NaN: in no bucket, and never in the sum
            return
        self._buckets[bisect_left(self._bounds, amount)](1)
        self._sum(amount)


_M = TypeVar("_M")
_shared_lock = threading.Lock()
_shared_sets: dict[tuple[Any, ...], Any] = {}


def shared(cls: Callable[..., _M], registry: CollectorRegistry | None, **settings: Any) -> _M:
    """One metric set per class, registry and settings, so wrapping twice registers once."""
    registry = REGISTRY if registry is None else registry
    key = (cls, id(registry), repr(sorted(settings.items())))
    with _shared_lock:
        found = _shared_sets.get(key)
        if found is None or found[0] is not registry:
            found = _shared_sets[key] = (registry, cls(registry, **settings))
        return found[1]


def remove_child(metric: Any, *labels: str) -> None:
    """``metric.remove(*labels)``; an absent child is no error. In multiprocess mode
    prometheus_client warns that removal is not implemented: retiring a model version
    compacts the files itself (:func:`~ml_wsgi_metrics.multiprocess.compact`)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with contextlib.suppress(KeyError):
            metric.remove(*labels)


def forget_model(registry: CollectorRegistry | None, model: tuple[str, str]) -> None:
    """Every metric set on ``registry`` (see :func:`shared`) forgets a model version."""
    registry = REGISTRY if registry is None else registry
    with _shared_lock:
        sets = [found for owner, found in _shared_sets.values() if owner is registry]
    for metric_set in sets:
        forget = getattr(metric_set, "forget_model", None)
        if forget is not None:
            forget(model)


class _IncStore:
    """A store whose ``store[key] += amount`` calls ``inc(amount)``: for unknown value classes."""

    __slots__ = ("_inc",)

    def __init__(self, inc: Callable[[float], object]) -> None:
        self._inc = inc

    def __getitem__(self, key: object) -> float:
        return 0.0

    def __setitem__(self, key: object, amount: float) -> None:
        self._inc(amount)


_NOWHERE = _IncStore(lambda amount: None)


def value_cell(value: Any) -> Cell:
    """``(store, key)`` such that ``store[key] += amount`` adds to a stored metric value.

    A slot value (multiprocess) is a double in its mapped file; prometheus_client's in-memory
    value (single process) is its ``_value`` attribute; anything else, prometheus_client's own
    file-backed value included (``PROMETHEUS_MULTIPROC_DIR`` without this package's storage),
    is reached through its ``inc``, which writes the file. Use it under
    :func:`~ml_wsgi_metrics.multiprocess.storage_lock`.
    """
    if isinstance(value, SlotValue):
        return value.cell()
    if type(value) is MutexValue:
        attributes = getattr(value, "__dict__", None)
        if attributes is not None and type(attributes.get("_value")) is float:
            return attributes, "_value"
    return _IncStore(value.inc), 0


def _histogram_cells(child: Any) -> tuple[tuple[float, ...], list[Cell], Cell]:
    """Upper bounds, bucket cells and the sum's cell of one labelled histogram child."""
    try:
        bounds = tuple(child._upper_bounds)
        return bounds, [value_cell(bucket) for bucket in child._buckets], value_cell(child._sum)
    except AttributeError:  # prometheus_client internals changed: observe through its API
        return (), [(_NOWHERE, 0)], (_IncStore(child.observe), 0)


class RouteSeries:
    """The series of one (method, route): everything a request adds to, under one lock.

    Values are held as cells (``store[key] += amount``: an item assignment, no call), taken
    again whenever the storage moves (a fork, a worker given its slot).
    """

    __slots__ = ("_counts", "_duration", "_generation", "_histograms", "_in_progress",
                 "_in_progress_child", "_lock", "_request_size", "_requests", "_response_size",
                 "_statuses", "labels")  # fmt: skip

    def __init__(self, metrics: RequestMetrics, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self._requests = metrics.requests
        self._statuses: dict[str, Any] = {}
        self._counts: dict[str, Cell] = {}
        self._histograms = tuple(
            histogram.labels(*labels)
            for histogram in (metrics.duration, metrics.request_size, metrics.response_size)
        )
        self._in_progress_child = metrics.in_progress.labels(*labels)
        self._lock = storage_lock()
        with self._lock:
            self._take_cells()

    def _take_cells(self) -> None:
        """(Re)take every cell from the stored values; the lock is held."""
        generation = _storage._State.generation  # a move while taking them: taken again next
        self._duration, self._request_size, self._response_size = (
            _histogram_cells(child) for child in self._histograms
        )
        self._in_progress = value_cell(self._in_progress_child._value)
        self._counts = {status: value_cell(c._value) for status, c in self._statuses.items()}
        self._generation = generation

    def refresh(self) -> None:
        """Take the cells again (the C record calls this when the storage has moved)."""
        with self._lock:
            self._take_cells()

    def _add_status(self, status: str) -> Cell:
        """Create the counter of a status first seen; return its cell."""
        child = self._requests.labels(*self.labels, status)  # not under the storage lock
        with self._lock:
            self._statuses[status] = child
            cell = self._counts[status] = value_cell(child._value)
            return cell

    def started(self) -> None:
        """A request of this route is now in progress."""
        with self._lock:
            if self._generation != _storage._State.generation:
                self._take_cells()
            store, key = self._in_progress
            store[key] += 1

    def finished(
        self,
        status: str,
        duration: float,
        request_size: int,
        response_size: int,
        was_started: bool,
    ) -> None:
        """Record one finished request (requests without a body observe no request size)."""
        if status not in self._statuses:
            self._add_status(status)
        with self._lock:
            # started() took fresh cells: the storage moves only between requests (fork, slot).
            if not was_started and self._generation != _storage._State.generation:
                self._take_cells()
            store, key = self._counts[status]
            store[key] += 1
            bounds, buckets, (store, key) = self._duration
            store[key] += duration
            store, key = buckets[bisect_left(bounds, duration)]
            store[key] += 1
            if request_size:
                bounds, buckets, (store, key) = self._request_size
                store[key] += request_size
                store, key = buckets[bisect_left(bounds, request_size)]
                store[key] += 1
            bounds, buckets, (store, key) = self._response_size
            store[key] += response_size
            store, key = buckets[bisect_left(bounds, response_size)]
            store[key] += 1
            if was_started:
                store, key = self._in_progress
                store[key] -= 1


class RequestMetrics:
    """HTTP request metrics: counts, durations, sizes, in-progress and exceptions."""

    LABELS = ("method", "route")

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "",
        const_labels: Mapping[str, str] | None = None,
        duration_buckets: Iterable[float] = DEFAULT_DURATION_BUCKETS,
        size_buckets: Iterable[float] = DEFAULT_SIZE_BUCKETS,
        group_status_codes: bool = False,
    ) -> None:
        namespace = validate_namespace(namespace)
        self.group_status_codes = group_status_codes
        self.const_labels = validate_const_labels(const_labels, (*self.LABELS, "status"))
        const = tuple(self.const_labels)
        self._const_values = tuple(self.const_labels.values())
        common = {"namespace": namespace, "registry": registry}
        route_labels = (*const, *self.LABELS)
        self.requests = Counter(
            "http_requests",
            "HTTP requests finished, by route template and status code.",
            (*route_labels, "status"),
            **common,
        )
        self.duration = Histogram(
            "http_request_duration_seconds",
            "Time from the request's arrival until the server closed the response.",
            route_labels,
            buckets=validate_buckets("duration_buckets", duration_buckets),
            **common,
        )
        # livesum: each worker counts its own requests; a dead worker's share disappears.
        self.in_progress = Gauge(
            "http_requests_in_progress",
            "Requests being handled now, summed over live workers.",
            route_labels,
            multiprocess_mode="livesum",
            **common,
        )
        sizes = validate_buckets("size_buckets", size_buckets)
        self.request_size = Histogram(
            "http_request_size_bytes",
            "Request body sizes (Content-Length; 0 without a body).",
            route_labels,
            buckets=sizes,
            **common,
        )
        self.response_size = Histogram(
            "http_response_size_bytes",
            "Response body sizes, as sent.",
            route_labels,
            buckets=sizes,
            **common,
        )
        self.exceptions = Counter(
            "http_request_exceptions",
            "Exceptions raised by the application (also counted as status 500).",
            (*route_labels, "exception"),
            **common,
        )
        self.model_requests = Counter(
            "http_model_requests",
            "Requests that used a model (bound with the signals API), by model version.",
            (*route_labels, "status", "model", "version"),
            **common,
        )
        self.instrumentation_errors = Counter(
            "ml_wsgi_metrics_instrumentation_errors",
            "Errors inside the instrumentation itself; the application was not affected.",
            (*const, "stage"),
            **common,
        )
        self.routes: dict[tuple[str, str], RouteSeries] = {}  # by (method, route)
        #: The mount prefixes a route label may keep (the wrapped apps' mounts, a closed set).
        self.mount_prefixes: set[str] = set()
        self._model_requests: dict[tuple[Any, ...], Callable[[float], None]] = {}
        self._exports_storage_errors = False
        fallback = _storage.merged_directory()
        if fallback is not None and _storage.active_directory() is None:
            _storage.check_directory(fallback)  # prometheus_client's own files: same rules

    def _export_storage_errors(self) -> None:
        """Export this process's storage errors here from now on, each stage's series made at
        zero now (counting one later takes no metric lock: it may come from under the storage
        lock). Called at the first request, so metrics made and never used export nothing."""
        self._exports_storage_errors = True
        children = {
            stage: self.instrumentation_errors.labels(*self._const_values, stage)
            for stage in _errors.STORAGE_STAGES
        }

        def export(stage: str, amount: float) -> None:
            child = children.get(stage)
            if child is None:
                self.count_instrumentation_error(stage, amount)
            else:
                child.inc(amount)

        _errors.export_storage_errors_with(export)

    def route_labels(self, method: str, route: str) -> tuple[str, ...]:
        return (*self._const_values, method, route)

    def route_series(self, method: str, route: str) -> RouteSeries:
        series = self.routes.get((method, route))
        if series is None:
            if not self._exports_storage_errors and _storage.active_directory() is not None:
                self._export_storage_errors()
            series = RouteSeries(self, self.route_labels(method, route))
            self.routes[(method, route)] = series
        return series

    def count_exception(self, series: RouteSeries, exception: str) -> None:
        """Count an exception the app raised, by its class name."""
        self.exceptions.labels(*series.labels, exception).inc()

    def count_model_request(self, series: RouteSeries, status: str, model: tuple[str, str]) -> None:
        """Count a finished request under the model version it used."""
        key = (series.labels, status, model)
        inc = self._model_requests.get(key)
        if inc is None:
            child = self.model_requests.labels(*series.labels, status, *model)
            inc = self._model_requests[key] = child.inc
        inc(1)

    def count_instrumentation_error(self, stage: str, amount: float = 1.0) -> None:
        self.instrumentation_errors.labels(*self._const_values, stage).inc(amount)

    def forget_model(self, model: tuple[str, str]) -> None:
        """Remove the request series of a model version (retired: see the signals API)."""
        for key in [key for key in list(self._model_requests) if key[2] == model]:
            series_labels, status, _ = key
            self._model_requests.pop(key, None)
            remove_child(self.model_requests, *series_labels, status, *model)


class ServerMetrics:
    """Metrics the gunicorn master writes: workers alive, restarted and timed out."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "",
        const_labels: Mapping[str, str] | None = None,
    ) -> None:
        namespace = validate_namespace(namespace)
        labels = validate_const_labels(const_labels, ())
        common = {"namespace": namespace, "registry": registry, "labelnames": tuple(labels)}
        # mostrecent: one master writes it; the latest value is the truth.
        self.workers = Gauge(
            "gunicorn_workers",
            "Worker processes alive, as the master sees them.",
            multiprocess_mode="mostrecent",
            **common,
        )
        self.worker_restarts = Counter(
            "gunicorn_worker_restarts", "Worker processes that exited and were replaced.", **common
        )
        self.worker_timeouts = Counter(
            "gunicorn_worker_timeouts",
            "Workers the master killed for missing the timeout.",
            **common,
        )
        values = tuple(labels.values())
        self.workers_alive = self.workers.labels(*values) if values else self.workers
        self.restarts = self.worker_restarts.labels(*values) if values else self.worker_restarts
        self.timeouts = self.worker_timeouts.labels(*values) if values else self.worker_timeouts


class ModelMetrics:
    """What a model did: predictions, latency, input and score distributions, ground truth.

    Distributions are non-cumulative counters per reference bin (bin ``i`` is
    ``(edges[i-1], edges[i]]``), plus sums split by sign and sums of squares, so PSI, means and
    standard deviations are exact after ``sum by``. The reference shares are gauges with mode
    ``max``: every worker exports the same value from the same profile, so ``max`` deduplicates.
    """

    MODEL = ("model", "version")

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "",
        const_labels: Mapping[str, str] | None = None,
        latency_buckets: Iterable[float] = DEFAULT_DURATION_BUCKETS,
        label_delay_buckets: Iterable[float] = DEFAULT_LABEL_DELAY_BUCKETS,
    ) -> None:
        namespace = validate_namespace(namespace)
        reserved = (*self.MODEL, "class", "feature", "bin", "sign", "predicted", "actual", "reason")
        self.const_labels = validate_const_labels(const_labels, reserved)
        const = tuple(self.const_labels)
        model = (*const, *self.MODEL)
        feature = (*model, "feature")
        common = {"namespace": namespace, "registry": registry}

        def counter(name: str, documentation: str, labels: tuple[str, ...]) -> Counter:
            return Counter(name, documentation, labels, **common)

        self.predictions = counter(
            "model_predictions",
            "Predictions made (one per row), by predicted class.",
            (*model, "class"),
        )
        self.prediction_latency = Histogram(
            "model_prediction_latency_seconds",
            "Time the model took per prediction call (a batch is one call).",
            model,
            buckets=validate_buckets("latency_buckets", latency_buckets),
            **common,
        )
        self.feature_bin = counter(
            "model_feature_bin",
            "Input values per reference bin; categorical bins are categories.",
            (*feature, "bin"),
        )
        self.feature_missing = counter(
            "model_feature_missing", "Missing input values (None, NaN, infinities).", feature
        )
        self.feature_out_of_range = counter(
            "model_feature_out_of_range",
            "Numeric inputs outside the reference [min, max].",
            feature,
        )
        self.feature_unseen = counter(
            "model_feature_unseen", "Categorical inputs not in the reference vocabulary.", feature
        )
        self.feature_sum = counter(
            "model_feature_sum",
            "Sum of numeric inputs, split by sign so it only grows.",
            (*feature, "sign"),
        )
        self.feature_sum_squares = counter(
            "model_feature_sum_squares", "Sum of squared numeric inputs.", feature
        )
        self.feature_reference_share = Gauge(
            "model_feature_reference_share",
            "Share of the reference (training) rows in each bin.",
            (*feature, "bin"),
            multiprocess_mode="max",
            **common,
        )
        self.score_bin = counter(
            "model_score_bin", "Prediction scores per reference bin.", (*model, "bin")
        )
        self.score_missing = counter("model_score_missing", "Missing or non-finite scores.", model)
        self.score_sum = counter(
            "model_score_sum", "Sum of prediction scores, split by sign.", (*model, "sign")
        )
        self.score_sum_squares = counter(
            "model_score_sum_squares", "Sum of squared prediction scores.", model
        )
        self.score_reference_share = Gauge(
            "model_score_reference_share",
            "Share of the reference scores in each bin.",
            (*model, "bin"),
            multiprocess_mode="max",
            **common,
        )
        self.reference_accuracy = Gauge(
            "model_reference_accuracy",
            "Accuracy of the model version on held-out data, from its profile.",
            model,
            multiprocess_mode="max",
            **common,
        )
        self.expected_correct = counter(
            "model_expected_correct",
            "Predicted-class probability summed over predictions with a finite score: the "
            "correct predictions a calibrated model expects.",
            model,
        )
        self.reference_estimated_accuracy = Gauge(
            "model_reference_estimated_accuracy",
            "Mean predicted-class probability on held-out data, from the profile.",
            model,
            multiprocess_mode="max",
            **common,
        )
        self.confusion = counter(
            "model_confusion",
            "Ground truth received, by predicted and actual class.",
            (*model, "predicted", "actual"),
        )
        self.label_delay = Histogram(
            "model_label_delay_seconds",
            "Time from a prediction to its ground truth.",
            model,
            buckets=validate_buckets("label_delay_buckets", label_delay_buckets),
            **common,
        )
        self.feedback_rejected = counter(
            "model_feedback_rejected",
            "Feedback refused: tampered, expired or malformed prediction ids.",
            (*const, "reason"),
        )

    def model_labels(self, model: str, version: str) -> tuple[str, ...]:
        return (*self.const_labels.values(), model, version)
