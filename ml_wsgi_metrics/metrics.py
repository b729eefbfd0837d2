"""Every metric the package exports, defined in one place with the registry injected.

This module owns the definitions only (names, labels, buckets, gauge modes, the validation of
settings): how a request's values are stored and added to is :mod:`ml_wsgi_metrics._series`'s.

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
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram

from . import _errors
from . import multiprocess as _storage
from ._series import RouteSeries

__all__ = [
    "DEFAULT_DURATION_BUCKETS",
    "DEFAULT_SIZE_BUCKETS",
    "ModelMetrics",
    "RequestMetrics",
    "ServerMetrics",
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

#: The multiprocess modes of this package's gauges.
GaugeMode = Literal["livesum", "max", "mostrecent"]

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


class _Define:
    """Makes metrics with one namespace and registry (and the labels every metric has)."""

    def __init__(
        self, namespace: str, registry: CollectorRegistry, labels: tuple[str, ...] = ()
    ) -> None:
        self._common: dict[str, Any] = {
            "namespace": namespace,
            "registry": registry,
        }
        self._labels = labels

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(name, documentation, (*self._labels, *labels), **self._common)

    def gauge(
        self, name: str, documentation: str, labels: tuple[str, ...], mode: GaugeMode
    ) -> Gauge:
        """A gauge: its ``mode`` says how workers' values merge (see each definition)."""
        labelnames = (*self._labels, *labels)
        return Gauge(name, documentation, labelnames, multiprocess_mode=mode, **self._common)

    def histogram(
        self, name: str, documentation: str, labels: tuple[str, ...], buckets: tuple[float, ...]
    ) -> Histogram:
        labelnames = (*self._labels, *labels)
        return Histogram(name, documentation, labelnames, buckets=buckets, **self._common)


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
        self._const_values = tuple(self.const_labels.values())
        define = _Define(namespace, registry, tuple(self.const_labels))
        route = self.LABELS
        self.requests = define.counter(
            "http_requests",
            "HTTP requests finished, by route template and status code.",
            (*route, "status"),
        )
        self.duration = define.histogram(
            "http_request_duration_seconds",
            "Time from the request's arrival until the server closed the response.",
            route,
            validate_buckets("duration_buckets", duration_buckets),
        )
        # livesum: each worker counts its own requests; a dead worker's share disappears.
        self.in_progress = define.gauge(
            "http_requests_in_progress",
            "Requests being handled now, summed over live workers.",
            route,
            "livesum",
        )
        sizes = validate_buckets("size_buckets", size_buckets)
        self.request_size = define.histogram(
            "http_request_size_bytes",
            "Request body sizes (Content-Length; 0 without a body).",
            route,
            sizes,
        )
        self.response_size = define.histogram(
            "http_response_size_bytes", "Response body sizes, as sent.", route, sizes
        )
        self._define_counts(define)
        self.routes: dict[tuple[str, str], RouteSeries] = {}  # by (method, route)
        #: The mount prefixes a route label may keep (the wrapped apps' mounts, a closed set).
        self.mount_prefixes: set[str] = set()
        self._model_requests: dict[tuple[Any, ...], Callable[[float], None]] = {}
        self._exports_storage_errors = False
        fallback = _storage.merged_directory()
        if fallback is not None and _storage.active_directory() is None:
            _storage.check_directory(fallback)  # prometheus_client's own files: same rules

    def _define_counts(self, define: _Define) -> None:
        """The counters beside the request series: exceptions, model versions, own errors."""
        self.exceptions = define.counter(
            "http_request_exceptions",
            "Exceptions raised by the application (also counted as status 500).",
            (*self.LABELS, "exception"),
        )
        self.model_requests = define.counter(
            "http_model_requests",
            "Requests that used a model (bound with the signals API), by model version.",
            (*self.LABELS, "status", "model", "version"),
        )
        self.instrumentation_errors = define.counter(
            "ml_wsgi_metrics_instrumentation_errors",
            "Errors inside the instrumentation itself; the application was not affected.",
            ("stage",),
        )

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
        define = _Define(namespace, registry, tuple(labels))
        # mostrecent: one master writes it; the latest value is the truth.
        self.workers = define.gauge(
            "gunicorn_workers", "Worker processes alive, as the master sees them.", (), "mostrecent"
        )
        self.worker_restarts = define.counter(
            "gunicorn_worker_restarts", "Worker processes that exited and were replaced."
        )
        self.worker_timeouts = define.counter(
            "gunicorn_worker_timeouts", "Workers the master killed for missing the timeout."
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
        define = _Define(namespace, registry, tuple(self.const_labels))
        model = self.MODEL
        self.predictions = define.counter(
            "model_predictions",
            "Predictions made (one per row), by predicted class.",
            (*model, "class"),
        )
        self.prediction_latency = define.histogram(
            "model_prediction_latency_seconds",
            "Time the model took per prediction call (a batch is one call).",
            model,
            validate_buckets("latency_buckets", latency_buckets),
        )
        self._define_inputs(define, (*model, "feature"))
        self._define_scores(define)
        self.confusion = define.counter(
            "model_confusion",
            "Ground truth received, by predicted and actual class.",
            (*model, "predicted", "actual"),
        )
        self.label_delay = define.histogram(
            "model_label_delay_seconds",
            "Time from a prediction to its ground truth.",
            model,
            validate_buckets("label_delay_buckets", label_delay_buckets),
        )
        self.feedback_rejected = define.counter(
            "model_feedback_rejected",
            "Feedback refused: tampered, expired or malformed prediction ids.",
            ("reason",),
        )

    def _define_inputs(self, define: _Define, feature: tuple[str, ...]) -> None:
        self.feature_bin = define.counter(
            "model_feature_bin",
            "Input values per reference bin; categorical bins are categories.",
            (*feature, "bin"),
        )
        self.feature_missing = define.counter(
            "model_feature_missing", "Missing input values (None, NaN, infinities).", feature
        )
        self.feature_out_of_range = define.counter(
            "model_feature_out_of_range",
            "Numeric inputs outside the reference [min, max].",
            feature,
        )
        self.feature_unseen = define.counter(
            "model_feature_unseen", "Categorical inputs not in the reference vocabulary.", feature
        )
        self.feature_sum = define.counter(
            "model_feature_sum",
            "Sum of numeric inputs, split by sign so it only grows.",
            (*feature, "sign"),
        )
        self.feature_sum_squares = define.counter(
            "model_feature_sum_squares", "Sum of squared numeric inputs.", feature
        )
        self.feature_reference_share = define.gauge(
            "model_feature_reference_share",
            "Share of the reference (training) rows in each bin.",
            (*feature, "bin"),
            "max",
        )

    def _define_scores(self, define: _Define) -> None:
        model = self.MODEL
        self.score_bin = define.counter(
            "model_score_bin", "Prediction scores per reference bin.", (*model, "bin")
        )
        self.score_missing = define.counter(
            "model_score_missing", "Missing or non-finite scores.", model
        )
        self.score_sum = define.counter(
            "model_score_sum", "Sum of prediction scores, split by sign.", (*model, "sign")
        )
        self.score_sum_squares = define.counter(
            "model_score_sum_squares", "Sum of squared prediction scores.", model
        )
        self.score_reference_share = define.gauge(
            "model_score_reference_share",
            "Share of the reference scores in each bin.",
            (*model, "bin"),
            "max",
        )
        self.reference_accuracy = define.gauge(
            "model_reference_accuracy",
            "Accuracy of the model version on held-out data, from its profile.",
            model,
            "max",
        )
        self.expected_correct = define.counter(
            "model_expected_correct",
            "Predicted-class probability summed over predictions with a finite score: the "
            "correct predictions a calibrated model expects.",
            model,
        )
        self.reference_estimated_accuracy = define.gauge(
            "model_reference_estimated_accuracy",
            "Mean predicted-class probability on held-out data, from the profile.",
            model,
            "max",
        )

    def model_label_values(self, model: str, version: str) -> tuple[str, ...]:
        """The label values of a model version's series: the constant labels', then its own."""
        return (*self.const_labels.values(), model, version)
