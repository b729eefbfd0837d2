"""The fast merge (ml_wsgi_metrics._merge) against prometheus_client's MultiProcessCollector.

Real processes (forked, each under a slot or its pid) write the files; the comparison is the
encoded output, byte for byte, in both formats: every family, sample, label and value (NaN and
-0.0 included), in prometheus_client's order. One merger is kept across the steps of a test, so
its caches (keys, layout, rendered lines) meet files that grow, are replaced or removed.
"""

from __future__ import annotations

import gzip
import math
import multiprocessing
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client import generate_latest as text_format
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from support import wait_until

from ml_wsgi_metrics import MetricsMiddleware, _errors, _merge, _retired, multiprocess
from ml_wsgi_metrics.exposition import exposition_bytes, scrape_registry

MODES = (
    "all",
    "liveall",
    "min",
    "livemin",
    "max",
    "livemax",
    "sum",
    "livesum",
    "mostrecent",
    "livemostrecent",
)
#: Label values that need escaping in the exposition (and one that does not).
ROUTES = ('quo"te', "back\\slash", "new\nline", "ünï©ødé ✓", "", "/plain")
SPECIAL = (math.nan, math.inf, -math.inf, -0.0, 0.0, 1e300, 1234567.0, 0.1)


def define(registry: CollectorRegistry) -> dict[str, Any]:
    """The same metrics in every process: every type, every gauge mode, model series."""
    metrics: dict[str, Any] = {
        "requests": Counter(
            "requests", "Requests \\ by\nroute.", ["route", "status"], registry=registry
        ),
        "latency": Histogram(
            "latency_seconds", "Latency.", ["route"], buckets=(0.1, 1, 5), registry=registry
        ),
        "sizes": Summary("sizes_bytes", "Sizes.", ["route"], registry=registry),
        "models": Counter("model_rows", "Rows.", ["model", "version"], registry=registry),
        "shares": Gauge(
            "model_share",
            "Shares.",
            ["model", "version"],
            multiprocess_mode="max",
            registry=registry,
        ),
    }
    for mode in MODES:
        metrics[mode] = Gauge(
            f"gauge_{mode}", f"A {mode} gauge.", ["x"], multiprocess_mode=mode, registry=registry
        )
    return metrics


def work(
    seed: int, routes: tuple[str, ...] = ROUTES, versions: tuple[str, ...] = ("1", "2")
) -> None:
    """One process's writes: random but reproducible, special values included."""
    rng = random.Random(seed)
    metrics = define(CollectorRegistry())
    for route in rng.sample(routes, len(routes)):  # each process its own key order
        metrics["requests"].labels(route, rng.choice(["200", "404"])).inc(rng.random() * 10)
        metrics["latency"].labels(route).observe(rng.choice([rng.random() * 6, math.inf]))
        metrics["sizes"].labels(route).observe(rng.random() * 1000)
    metrics["latency"].labels("nan").observe(math.nan)
    for version in versions:
        metrics["models"].labels("m", version).inc(rng.randrange(1, 100))
        metrics["shares"].labels("m", version).set(rng.random())
    for mode in MODES:
        for x in range(3):
            child = metrics[mode].labels(str(x))
            if "mostrecent" in mode and rng.random() < 0.4:
                continue  # made, never set: prometheus_client leaves it out
            child.set(rng.choice([*SPECIAL, rng.random()]))


def run_process(target: Callable[..., None], *args: Any, slot: str | None = None) -> None:
    """``target(*args)`` in a forked process writing under ``slot`` (else its pid); waits."""

    def main() -> None:
        if slot is not None:
            multiprocess.use_identifier(slot)
        target(*args)

    process = multiprocessing.get_context("fork").Process(target=main)
    process.start()
    process.join()
    assert process.exitcode == 0


def theirs(directory: Path, encoder: Callable[[Any], bytes]) -> bytes:
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return encoder(registry)


def assert_same(merger: _merge.Merger, directory: Path) -> None:
    """Ours equals prometheus_client's, in both formats and through ``collect()``."""
    expected = theirs(directory, text_format)
    assert merger.text(text_format) == expected
    assert merger.text(openmetrics) + b"# EOF\n" == theirs(directory, openmetrics)
    collected = CollectorRegistry()
    collected.register(multiprocess.SlotFilesCollector(str(directory)))
    assert text_format(collected) == expected


@pytest.fixture
def merger(multiprocess_dir: Path) -> Iterator[_merge.Merger]:
    merger = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    yield merger
    merger.close()


def test_workers_restarts_and_every_type_merge_as_prometheus_client_does(
    multiprocess_dir: Path, merger: _merge.Merger
) -> None:
    run_process(work, 1, slot="w0")
    run_process(work, 2, slot="w1")
    assert_same(merger, multiprocess_dir)

    run_process(work, 3, slot="w0")  # a restarted worker continues its slot's files
    multiprocess.mark_dead("w1")  # its live gauges go
    run_process(work, 4)  # a process without a slot: its pid's files, dead now
    run_process(work, 5, ROUTES[:2], ("3",), slot="w2")
    work(6)  # and this process
    assert_same(merger, multiprocess_dir)

    text = merger.text(text_format).decode()
    assert 'requests_total{route="quo\\"te",status=' in text
    assert 'route="back\\\\slash"' in text and 'route="new\\nline"' in text
    assert 'latency_seconds_sum{route="nan"} NaN' in text
    assert 'le="+Inf"' in text and "gauge_all{" in text and 'pid="w0"' in text
    assert merger.merges == 5  # two per comparison, one for the text


def test_the_cache_follows_files_that_grow_are_replaced_or_removed(
    multiprocess_dir: Path, merger: _merge.Merger
) -> None:
    run_process(work, 1, ("404",), slot="w0")
    run_process(work, 2, slot="w1")
    assert_same(merger, multiprocess_dir)

    run_process(work, 3, ("new route",), ("4",), slot="w0")  # new keys: the files grow
    assert_same(merger, multiprocess_dir)
    assert b'route="new route"' in merger.text(text_format)

    multiprocess.mark_dead("w0")  # removed: w0's live gauge files
    assert_same(merger, multiprocess_dir)

    # replaced: the same keys, as long, in another order, in new files at the same names
    multiprocess.clear_directory()
    run_process(work, 7, ("b", "a"), ("1",), slot="w0")
    assert_same(merger, multiprocess_dir)
    multiprocess.clear_directory()
    run_process(work, 8, ("a", "b"), ("1",), slot="w0")
    assert_same(merger, multiprocess_dir)


def compact_version(version: str) -> None:
    """This process's model files rewritten without one version's series (a new inode)."""
    work(9, ("a",), ("1", "2"))
    multiprocess.compact(lambda key: f'"version": "{version}"' in key)


def test_a_rewritten_model_file_is_read_anew(multiprocess_dir: Path, merger: _merge.Merger) -> None:
    run_process(work, 1, ("a",), ("1", "2"), slot="w0")
    assert_same(merger, multiprocess_dir)
    assert b'version="1"' in merger.text(text_format)
    models = multiprocess_dir / "counter_w0.models.db"
    inode = models.stat().st_ino

    run_process(compact_version, "1", slot="w0")

    assert models.stat().st_ino != inode
    assert_same(merger, multiprocess_dir)
    assert b'version="1"' not in merger.text(text_format)


def test_retired_versions_are_left_out_of_the_exposition(multiprocess_dir: Path) -> None:
    run_process(work, 1, ("a",), ("1", "2"), slot="w0")
    _retired.update(str(multiprocess_dir), lambda record: record.retire("m", "1"))

    ours = exposition_bytes(CollectorRegistry(), text_format).decode()

    expected = [
        line
        for line in theirs(multiprocess_dir, text_format).decode().splitlines()
        if 'model="m",version="1"' not in line
    ]
    assert ours.splitlines()[: len(expected)] == expected  # then the workers' process metrics
    assert (
        scrape_registry(CollectorRegistry()).get_sample_value(
            "model_rows_total", {"model": "m", "version": "1"}
        )
        is None
    )


def test_a_corrupt_or_linked_file_is_left_out_and_reported(
    multiprocess_dir: Path, merger: _merge.Merger, tmp_path: Path
) -> None:
    run_process(work, 1, slot="w0")
    expected = merger.text(text_format)
    (multiprocess_dir / "counter_w8.db").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00\xff\xff")
    (tmp_path / "elsewhere.db").write_bytes((multiprocess_dir / "counter_w0.db").read_bytes())
    (multiprocess_dir / "counter_w9.db").symlink_to(tmp_path / "elsewhere.db")
    before = _errors.count(("storage_read",))

    assert merger.text(text_format) == expected
    assert merger.text(text_format) == expected
    assert _errors.count(("storage_read",)) - before == 4  # each file, at each scrape


def hold_first_merge(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """The first merge from now on stops once it has read the files, until ``release``;
    ``read`` is set when it got there."""
    read, release = threading.Event(), threading.Event()
    combine = _merge._combine

    def held(layout: Any, began: int) -> _merge.MergeResult:
        result = combine(layout, began)
        if not read.is_set():
            read.set()
            release.wait(timeout=60)
        return result

    monkeypatch.setattr(_merge, "_combine", held)
    return read, release


def count_arrivals(monkeypatch: pytest.MonkeyPatch, arrived: Callable[[], None]) -> None:
    """Call ``arrived`` whenever a scrape arrives or a merge begins (each takes the time)."""
    arrival = _merge.arrival

    def counted() -> int:
        now = arrival()
        arrived()
        return now

    monkeypatch.setattr(_merge, "arrival", counted)


def test_concurrent_scrapes_share_a_merge_and_see_every_count_before_them(
    multiprocess_dir: Path, merger: _merge.Merger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scrape arriving while a merge runs does not take that merge's values (read before
    it arrived): the seven scrapes that arrive while the first is merging share the next
    merge, which holds a count made after the first merge read the files."""
    run_process(work, 1, slot="w0")
    before = theirs(multiprocess_dir, text_format)
    read, release = hold_first_merge(monkeypatch)
    arrivals = []
    count_arrivals(monkeypatch, lambda: arrivals.append(1))
    results: dict[int, bytes] = {}

    def scrape(number: int) -> None:
        results[number] = merger.text(text_format)

    threads = [threading.Thread(target=scrape, args=(n,)) for n in range(8)]
    threads[0].start()
    assert read.wait(timeout=30)
    run_process(work, 2, slot="w1")  # counted after the first merge read the files
    after = theirs(multiprocess_dir, text_format)
    for thread in threads[1:]:
        thread.start()
    wait_until(lambda: len(arrivals) == 9, timeout=30)  # 8 scrapes and the first merge's start
    release.set()
    for thread in threads:
        thread.join(timeout=60)

    assert before != after
    assert results == {0: before} | {n: after for n in range(1, 8)}
    assert merger.merges == 2
    assert merger._shared.served == 6  # one of the seven merged, six took its text
    merger.text(text_format)
    assert merger.merges == 3  # a scrape after those merges runs its own


PROMETHEUS_ACCEPT = (  # what Prometheus 2.42 sends
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


@pytest.mark.parametrize("accept", [None, PROMETHEUS_ACCEPT])
def test_the_endpoint_serves_the_merge_in_either_format_gzipped_or_not(
    accept: str | None, multiprocess_dir: Path, call: Callable[..., Any], hello: Any
) -> None:
    app = MetricsMiddleware(hello, registry=CollectorRegistry())
    run_process(work, 1, slot="w0")
    encoder = openmetrics if accept else text_format
    expected = theirs(multiprocess_dir, encoder).removesuffix(b"# EOF\n")
    headers = {"Accept": accept} if accept else {}

    plain = call(app, "/metrics", headers=headers)
    zipped = call(app, "/metrics", headers={**headers, "Accept-Encoding": "gzip"})
    head = call(app, "/metrics", "HEAD", headers=headers)

    assert plain.code == zipped.code == head.code == 200
    assert plain.body.startswith(expected)  # then this process's own metrics' samples
    assert plain.body.endswith(b"# EOF\n") is bool(accept)
    assert gzip.decompress(zipped.body) == plain.body
    assert head.body == b"" and head.header("Content-Length") == str(len(plain.body))
    merger = _merge.merger_for(str(multiprocess_dir), multiprocess.SLOT_FILE)
    assert len(merger._renderings) == 1  # each scrape's new encoder renders the same way
