"""Storage handles: cells and adders write exactly what prometheus_client writes; request
series follow the storage when it moves."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from ml_wsgi_metrics import multiprocess
from ml_wsgi_metrics._series import _HistogramAdders, fast_observer, histogram_cells, value_cell
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.metrics import RequestMetrics
from ml_wsgi_metrics.multiprocess import storage_lock

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
    bounds, buckets, (total, total_key) = histogram_cells(opaque)
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
