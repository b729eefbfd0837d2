"""Metric definitions: the histogram fast paths, shared metric sets, promtool-clean output."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ml_wsgi_metrics import MetricsMiddleware, multiprocess
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.metrics import (
    RequestMetrics,
    ServerMetrics,
    _histogram_cells,
    _HistogramAdders,
    fast_observer,
    shared,
    value_cell,
)
from ml_wsgi_metrics.multiprocess import storage_lock
from ml_wsgi_metrics.process import write_pid_file

PROMTOOL = "/usr/bin/promtool"
BUCKETS = (0.1, 0.5, 1.0, 2.5, 10.0)


def adders_observer(child: Any) -> Callable[[float], None]:
    adders = _HistogramAdders(child)

    def observe(amount: float) -> None:
        with storage_lock():  # as the signals API holds it
            adders.observe(amount)

    return observe


def exposition_of(registry: CollectorRegistry, name: str) -> list[str]:
    """The text lines of metric ``name``, renamed to ``h`` and without ``_created``."""
    return [
        line.replace(name, "h")
        for line in generate_latest(scrape_registry(registry)).decode().splitlines()
        if name in line and "_created" not in line
    ]


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(BUCKETS, id="on-every-edge"),
        pytest.param((0.05, 0.3, 0.7, 2.0, 7.5), id="between-edges"),
        pytest.param((10.000001, 11, 1e9), id="above-the-last-edge"),
        pytest.param((0, 0.0, -0.5, -1e9), id="zero-and-negative"),
        pytest.param((float("inf"),), id="infinity"),
        pytest.param((1, 2, 3, 10, 64), id="integers"),
        pytest.param(
            (0.1, 0.1000001, 0.09999999, 1.0, 1e-12, 2.5, 2.5, 9.999, 10.0, 99.0),
            id="mixed",
        ),
    ],
)
@pytest.mark.parametrize(
    "fast",
    [
        pytest.param(adders_observer, id="_HistogramAdders"),
        pytest.param(fast_observer, id="fast_observer"),
    ],
)
def test_fast_paths_write_exactly_what_observe_writes(
    mode: Path | None,
    fast: Callable[[Any], Callable[[float], None]],
    values: Iterable[float],
) -> None:
    # Two names, one registry: in multiprocess mode both land in the same files.
    registry = CollectorRegistry()
    labels = ("route",)
    reference = Histogram("reference_seconds", "h", labels, buckets=BUCKETS, registry=registry)
    candidate = Histogram("candidate_seconds", "h", labels, buckets=BUCKETS, registry=registry)
    observe = fast(candidate.labels("/r"))
    for value in values:
        reference.labels("/r").observe(value)
        observe(value)

    expected = exposition_of(registry, "reference_seconds")
    assert any("_bucket" in line for line in expected)
    assert exposition_of(registry, "candidate_seconds") == expected


def test_fast_paths_fall_back_to_observe_when_internals_change() -> None:
    class Opaque:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    opaque = Opaque()
    adders = _HistogramAdders(opaque)
    adders.observe(1.5)
    fast_observer(opaque)(2.5)
    assert opaque.seen == [1.5, 2.5]


# -- cells ----------------------------------------------------------------------------------


def test_a_value_cell_adds_to_the_stored_value(mode: Path | None) -> None:
    registry = CollectorRegistry()
    child = Counter("c", "c", ["a"], registry=registry).labels("x")
    with storage_lock():
        store, key = value_cell(child._value)
        store[key] += 2
        store[key] += 0.5
    assert scrape_registry(registry).get_sample_value("c_total", {"a": "x"}) == 2.5
    assert type(store).__name__ == ("memoryview" if mode else "dict")


def test_unknown_values_and_histograms_are_reached_through_their_api() -> None:
    class Opaque:
        def __init__(self) -> None:
            self.calls: list[tuple[str, float]] = []

        def inc(self, amount: float) -> None:
            self.calls.append(("inc", amount))

        def observe(self, amount: float) -> None:
            self.calls.append(("observe", amount))

    opaque = Opaque()
    store, key = value_cell(opaque)
    store[key] += 3
    bounds, buckets, (total, total_key) = _histogram_cells(opaque)
    assert (bounds, len(buckets)) == ((), 1)  # one bucket keeping nothing: observe() places
    store, key = buckets[0]
    store[key] += 1
    total[total_key] += 0.25
    assert opaque.calls == [("inc", 3), ("observe", 0.25)]


def test_route_series_take_their_cells_again_when_the_storage_moves(
    multiprocess_dir: Path,
) -> None:
    registry = CollectorRegistry()
    series = RequestMetrics(registry).route_series("GET", "/r")
    series.finished("200", 0.01, 0, 10, False)
    multiprocess.use_identifier("w7")  # as a gunicorn worker given its slot
    series.started()
    series.finished("200", 0.02, 5, 20, True)

    def value(name: str, **labels: str) -> float | None:
        labels = {"method": "GET", "route": "/r", **labels}
        return scrape_registry(registry).get_sample_value(name, labels)

    assert value("http_requests_total", status="200") == 2
    assert value("http_response_size_bytes_sum") == 30
    assert value("http_request_size_bytes_count") == 1
    assert value("http_requests_in_progress") == 0
    assert any(path.name.endswith("_w7.db") for path in multiprocess_dir.iterdir())


# -- shared ---------------------------------------------------------------------------------


def test_shared_returns_one_metric_set_per_registry_and_settings() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    first = shared(RequestMetrics, one, namespace="", const_labels={})
    assert shared(RequestMetrics, one, namespace="", const_labels={}) is first
    assert shared(RequestMetrics, two, namespace="", const_labels={}) is not first
    other = shared(RequestMetrics, one, namespace="other", const_labels={})
    assert other is not first
    assert other.requests is not first.requests
    assert shared(ServerMetrics, one) is not first
    assert shared(ServerMetrics, one) is shared(ServerMetrics, one)


def test_middlewares_with_the_same_settings_share_their_metrics(hello: Any) -> None:
    registry = CollectorRegistry()
    first = MetricsMiddleware(hello, registry=registry, const_labels={"service": "s"})
    second = MetricsMiddleware(hello, registry=registry, const_labels={"service": "s"})
    assert second.metrics is first.metrics


# -- promtool -------------------------------------------------------------------------------


def traffic(registry: CollectorRegistry, call: Callable[..., Any], **options: Any) -> Any:
    """A middleware after requests of every kind: routes, statuses, sizes, an exception."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/crash":
            raise RuntimeError("crash")
        status = "404 Not Found" if path.startswith("/unknown") else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"x" * len(path)]

    def resolve(environ: dict[str, Any]) -> str | None:
        path = environ["PATH_INFO"]
        return None if path.startswith("/unknown") else path

    middleware = MetricsMiddleware(app, registry=registry, route_resolver=resolve, **options)
    for path, method in [
        ("/items", "GET"),
        ("/items", "POST"),
        ("/unknown/1", "GET"),
        ('/odd"route\\with\nescapes', "PUT"),
        ("/items", "BREW"),
    ]:
        call(middleware, path, method, body=b"payload")
    with pytest.raises(RuntimeError):
        call(middleware, "/crash")
    return middleware


def promtool_check(text: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.requires_tool(PROMTOOL)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {"namespace": "shop", "const_labels": {"service": "churn", "version": "1.2"}},
            id="namespace-const-labels",
        ),
        pytest.param({"group_status_codes": True}, id="grouped-statuses"),
    ],
)
def test_promtool_check_metrics_passes_on_the_exposition(
    mode: Path | None,
    options: dict[str, Any],
    registry: CollectorRegistry,
    call: Callable[..., Any],
) -> None:
    middleware = traffic(registry, call, **options)
    if mode is not None:  # per-worker process metrics come from pid files
        write_pid_file(str(mode), "w0")

    response = call(middleware, "/metrics")
    assert response.code == 200
    assert b"http_requests_total" in response.body
    assert b"http_request_duration_seconds_bucket" in response.body
    assert b"http_request_exceptions_total" in response.body
    if mode is not None:
        assert b"gunicorn_worker_resident_memory_bytes" in response.body

    checked = promtool_check(response.body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == ""


@pytest.mark.requires_tool(PROMTOOL)
def test_promtool_sees_problems(registry: CollectorRegistry) -> None:
    """The check above is a real one: promtool rejects a metric without help text."""
    checked = promtool_check(b"# TYPE things counter\nthings 1\n")
    assert checked.returncode != 0
