"""Scrape merge: prometheus_client's MultiProcessCollector + generate_latest vs ours, same files.

    python bench/bench_merge.py                 # about 1-2 minutes on 2 cores
    python bench/bench_merge.py --sizes 32      # one size only (routes), quicker

Four worker processes (forked, each under its slot ``w0``..``w3``) write the same series: per
route, 4 methods x 5 statuses of a request counter and two histograms (duration, 16 buckets;
response size, 11 buckets) by route and method: 144 merged series a route, so 32 routes give
4,608 series and 320 routes 46,080, each in four files. Between two timed scrapes every value
in every file changes (the worst case for ours: every value is formatted again). Both sides run
in this process, interleaved, median of the runs, in the text format and in OpenMetrics (what
Prometheus asks for; ours takes its encoder from ``choose_encoder`` at every scrape, as the
endpoint does); ours runs with a warm cache (keys
parsed, layout built), its first (cold) scrape is printed too. Before timing, the outputs are
checked byte for byte (text and OpenMetrics). Exits 1 when ours is under 20x faster.

Then 8 processes (sync workers, each its own merger, warm) scrape the 46,080 series at once,
5 times sharing merges through the directory and 5 times each merging on its own,
interleaved: the merges run, the slowest scrape and the CPU of the burst; and the CPU of a lone
scrape through the shared file against its own merge only.
"""

from __future__ import annotations

import argparse
import mmap
import multiprocessing
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import choose_encoder
from prometheus_client.mmap_dict import _read_all_values
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics

from ml_wsgi_metrics import multiprocess
from ml_wsgi_metrics._merge import Merger
from ml_wsgi_metrics.metrics import DEFAULT_DURATION_BUCKETS, DEFAULT_SIZE_BUCKETS

GOAL = 20.0
PROMETHEUS_ACCEPT = (  # what Prometheus 2.42 sends
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)
WORKERS = 4
METHODS = ("GET", "POST", "PUT", "DELETE")
STATUSES = ("200", "201", "404", "500", "503")


def write_worker(slot: int, routes: int) -> None:
    """One worker's files: every series of ``routes`` routes touched once."""
    multiprocess.use_identifier(f"w{slot}")
    registry = CollectorRegistry()
    requests = Counter(
        "http_requests", "Requests.", ("method", "route", "status"), registry=registry
    )
    duration = Histogram(
        "http_request_duration_seconds",
        "Durations.",
        ("method", "route"),
        buckets=DEFAULT_DURATION_BUCKETS,
        registry=registry,
    )
    size = Histogram(
        "http_response_size_bytes",
        "Sizes.",
        ("method", "route"),
        buckets=DEFAULT_SIZE_BUCKETS,
        registry=registry,
    )
    rng = random.Random(slot)
    for route in range(routes):
        for method in METHODS:
            labels = (method, f"/api/v1/resource{route}/<int:item_id>")
            for status in STATUSES:
                requests.labels(*labels, status).inc(rng.randrange(1, 1000))
            duration.labels(*labels).observe(rng.random())
            size.labels(*labels).observe(rng.randrange(10**6))


def change_every_value(directory: str) -> Callable[[], None]:
    """A function that adds 1 to every value of every file (untimed, between scrapes)."""
    views = []
    for path in multiprocess.slot_files(directory):
        data = Path(path).read_bytes()
        words = np.array([pos // 8 for _, _, _, pos in _read_all_values(data)], dtype=np.int64)
        handle = open(path, "r+b")  # noqa: SIM115 - kept for the run
        mapped = mmap.mmap(handle.fileno(), 0)
        views.append((np.frombuffer(mapped, dtype="<f8"), words))

    def change() -> None:
        for doubles, words in views:
            doubles[words] += 1.0

    return change


def median_ms(
    scrapes: dict[str, Callable[[], bytes]], change: Callable[[], None], runs: dict[str, int]
) -> dict[str, float]:
    """Median milliseconds of each scrape, interleaved (both see the same machine load)."""
    times: dict[str, list[float]] = {name: [] for name in scrapes}
    for round_ in range(max(runs.values())):
        for name, scrape in scrapes.items():
            if round_ < runs[name]:
                change()
                started = time.perf_counter()
                scrape()
                times[name].append((time.perf_counter() - started) * 1000)
    return {name: statistics.median(values) for name, values in times.items()}


def write_files(directory: str, routes: int) -> None:
    context = multiprocessing.get_context("fork")
    processes = [
        context.Process(target=write_worker, args=(slot, routes)) for slot in range(WORKERS)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join()
        if process.exitcode != 0:
            raise RuntimeError(f"a worker failed: exit {process.exitcode}")


def measure(routes: int, runs: int) -> tuple[int, float, dict[str, float]]:
    """(series, ours cold ms, medians ms by side and format) for ``routes`` routes."""
    with tempfile.TemporaryDirectory() as temp:
        directory = multiprocess.activate(Path(temp, "multiproc"))
        write_files(directory, routes)
        merger = Merger(directory, multiprocess.SLOT_FILE)
        started = time.perf_counter()
        ours = merger.text(generate_latest)
        cold = (time.perf_counter() - started) * 1000
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=directory)
        expected = generate_latest(registry)
        if ours != expected or merger.text(openmetrics) + b"# EOF\n" != openmetrics(registry):
            raise SystemExit("the merged outputs differ from prometheus_client's")
        series = sum(1 for line in expected.splitlines() if not line.startswith(b"#"))
        scrapes = {  # OpenMetrics as Prometheus asks: a new encoder at every scrape
            "theirs text": lambda: generate_latest(registry),
            "ours text": lambda: merger.text(generate_latest),
            "theirs openmetrics": lambda: openmetrics(registry),
            "ours openmetrics": lambda: merger.text(choose_encoder(PROMETHEUS_ACCEPT)[0]),
        }
        counts = {name: runs if name.startswith("ours") else max(3, runs // 10) for name in scrapes}
        medians = median_ms(scrapes, change_every_value(directory), counts)
        merger.close()
        multiprocess.deactivate()
        return series, cold, medians


SCRAPERS = 8


def _burst_scraper(directory: str, shared: bool, ready: Any, start: Any, answers: Any) -> None:
    merger = Merger(directory, multiprocess.SLOT_FILE)
    merger._text(generate_latest, 0)  # its own merge (no shared text): as a worker that merged
    ready.wait()
    start.wait()
    before, started, cpu = merger.merges, time.perf_counter(), time.process_time()
    if shared:
        merger.text(generate_latest)
    else:
        merger._text(generate_latest, 0)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    answers.put((merger.merges - before, wall * 1000, cpu * 1000))
    merger.close()


def burst(directory: str, change: Callable[[], None], shared: bool) -> tuple[int, float, float]:
    """SCRAPERS warm processes scrape at once: (merges, slowest ms, CPU ms summed)."""
    context = multiprocessing.get_context("fork")
    ready, start = context.Barrier(SCRAPERS + 1), context.Barrier(SCRAPERS + 1)
    answers = context.Queue()
    scrapers = [
        context.Process(target=_burst_scraper, args=(directory, shared, ready, start, answers))
        for _ in range(SCRAPERS)
    ]
    for process in scrapers:
        process.start()
    ready.wait()
    change()
    start.wait()
    results = [answers.get(timeout=600) for _ in scrapers]
    for process in scrapers:
        process.join()
    merges, slowest, cpu = zip(*results, strict=True)
    return sum(merges), max(slowest), sum(cpu)


def concurrent_scrapes(routes: int, bursts: int = 5) -> None:
    """SCRAPERS processes scraping at once, sharing merges or each merging, interleaved."""
    with tempfile.TemporaryDirectory() as temp:
        directory = multiprocess.activate(Path(temp, "multiproc"))
        write_files(directory, routes)
        change = change_every_value(directory)
        found: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}
        for _ in range(bursts):
            for shared in (True, False):
                found[shared].append(burst(directory, change, shared))
        lone = lone_scrape_cpu(directory, change)
        multiprocess.deactivate()
    print(f"{SCRAPERS} warm processes scraping at once, median of {bursts} bursts:")
    for shared, runs in found.items():
        merges = [m for m, _, _ in runs]
        slowest = statistics.median(s for _, s, _ in runs)
        cpu = statistics.median(c for _, _, c in runs)
        how = "shared (ours)" if shared else "each its own"
        print(f"  {how:14} merges {merges}, slowest scrape {slowest:7.1f} ms, CPU {cpu:7.1f} ms")
    print(
        f"a lone scrape, median CPU ms, interleaved: through the shared file {lone[True]:.2f}, "
        f"its own merge only {lone[False]:.2f}"
    )


def lone_scrape_cpu(
    directory: str, change: Callable[[], None], runs: int = 40
) -> dict[bool, float]:
    """Median CPU ms of one scrape nobody waits for: through the shared file or merging alone."""
    merger = Merger(directory, multiprocess.SLOT_FILE)
    merger.text(generate_latest)  # warm
    times: dict[bool, list[float]] = {True: [], False: []}
    for run in range(runs):
        for shared in (True, False) if run % 2 else (False, True):
            change()
            started = time.process_time()
            if shared:
                merger.text(generate_latest)
            else:
                merger._text(generate_latest, 0)
            times[shared].append((time.process_time() - started) * 1000)
    merger.close()
    return {shared: statistics.median(values) for shared, values in times.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 320], help="routes")
    parser.add_argument("--runs", type=int, default=30, help="timed scrapes of ours")
    args = parser.parse_args()
    print(f"{WORKERS} workers' files, median ms (every value changed between scrapes)")
    header = ("series", "format", "prometheus_client", "ours", "ratio", "ours cold")
    print("{:>8} {:>12} {:>18} {:>8} {:>7} {:>10}".format(*header))
    worst = float("inf")
    for routes in args.sizes:
        series, cold, medians = measure(routes, args.runs)
        for form in ("text", "openmetrics"):
            theirs, ours = medians[f"theirs {form}"], medians[f"ours {form}"]
            worst = min(worst, theirs / ours)
            first = f"{cold:>10.1f}" if form == "text" else ""
            ratio = f"{theirs / ours:>6.1f}x"
            print(f"{series:>8,} {form:>12} {theirs:>18.1f} {ours:>8.2f} {ratio} {first}")
    concurrent_scrapes(max(args.sizes))
    if worst < GOAL:
        print(f"FAIL: {worst:.1f}x is under the {GOAL:.0f}x goal")
        return 1
    print(f"ok: at least {GOAL:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
