"""The multiprocess directory: identifiers survive processes, files do not pile up, dead
workers' live gauges go, the directory is private, and every worker serves the merged totals.

Processes are forked as gunicorn forks its workers (``storage_support.in_child``). What a
process's values do when their files fail is in ``test_slots.py``.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.mmap_dict import MmapedDict
from storage_support import (
    ERRORS,
    FORK,
    corrupt,
    db_files,
    finish_child,
    hello_middleware,
    in_child,
    merged,
    requests_to,
    start_child,
)
from support import missing_capability

from ml_wsgi_metrics import MetricsMiddleware, multiprocess
from ml_wsgi_metrics.exposition import scrape_registry

# -- identifiers across processes -----------------------------------------------------------


def test_a_successor_with_the_same_identifier_continues_the_counts(
    multiprocess_dir: Path,
) -> None:
    registry = CollectorRegistry()
    plain = Counter("jobs", "Jobs.", registry=registry)
    labelled = Counter("hits", "Hits.", ["route"], registry=registry)
    histogram = Histogram("took_seconds", "Took.", buckets=(1, 2), registry=registry)

    def worker(times: int) -> Callable[[], int]:
        def run() -> int:
            multiprocess.use_identifier("w0")
            for _ in range(times):
                plain.inc()
                labelled.labels("/a").inc()
                histogram.observe(1.5)
            return os.getpid()

        return run

    first = in_child(worker(3))
    assert merged(registry, "jobs_total") == 3
    second = in_child(worker(2))

    assert first != second
    assert merged(registry, "jobs_total") == 5
    assert merged(registry, "hits_total", route="/a") == 5
    assert merged(registry, "took_seconds_count") == 5
    assert merged(registry, "took_seconds_bucket", le="2.0") == 5
    assert merged(registry, "took_seconds_sum") == 7.5
    names = db_files(multiprocess_dir)
    assert {"counter_w0.db", "histogram_w0.db"} <= names
    assert not any(str(pid) in name for name in names for pid in (first, second))


@pytest.mark.parametrize(
    ("identifier", "pid_files"),
    [
        pytest.param("w1", False, id="slot-right-after-fork"),
        pytest.param(None, True, id="control-no-slot"),
    ],
)
def test_a_child_given_its_slot_right_after_the_fork_leaves_no_pid_files(
    identifier: str | None,
    pid_files: bool,
    multiprocess_dir: Path,
    call: Callable[..., Any],
    hello: Any,
) -> None:
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)  # created before the fork, as with preload_app
    call(app, "/in-parent")
    before = db_files(multiprocess_dir)

    def worker() -> int:
        if identifier is not None:
            multiprocess.use_identifier(identifier)
        for path in ("/a", "/b", "/a", "/in-parent"):
            call(app, path)
        return os.getpid()

    pid = in_child(worker)

    created = db_files(multiprocess_dir) - before
    assert any(name.endswith(f"_{pid}.db") for name in created) is pid_files
    if identifier is not None:
        assert created == {"counter_w1.db", "histogram_w1.db", "gauge_livesum_w1.db"}
    assert merged(registry, "http_requests_total", method="GET", route="/a", status="200") == 2
    assert (
        merged(registry, "http_requests_total", method="GET", route="/in-parent", status="200") == 2
    )


def test_forked_child_does_not_write_into_its_parents_files(multiprocess_dir: Path) -> None:
    registry = CollectorRegistry()
    counter = Counter("jobs", "Jobs.", registry=registry)
    counter.inc(10)

    def worker() -> float:
        multiprocess.use_identifier("w0")
        counter.inc()
        return counter._value.get()

    assert in_child(worker) == 1  # the child's own slot, not the parent's 10
    assert counter._value.get() == 10
    assert merged(registry, "jobs_total") == 11


@pytest.mark.parametrize(
    "identifier",
    [
        pytest.param("", id="empty"),
        pytest.param("w_1", id="underscore"),
        pytest.param("a/b", id="slash"),
    ],
)
def test_bad_identifiers_are_refused(identifier: str, multiprocess_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"^identifier"):
        multiprocess.use_identifier(identifier)


# -- dead workers, clearing -----------------------------------------------------------------


def test_mark_dead_removes_live_gauges_only(multiprocess_dir: Path) -> None:
    modes = ("livesum", "liveall", "livemax", "all", "max", "sum", "mostrecent")

    def worker(slot: str, gauge_modes: tuple[str, ...]) -> Callable[[], None]:
        def run() -> None:
            multiprocess.use_identifier(slot)
            registry = CollectorRegistry()
            Counter("jobs", "Jobs.", registry=registry).inc()
            Histogram("took_seconds", "Took.", registry=registry).observe(1)
            for mode in gauge_modes:
                Gauge(f"g_{mode}", "G.", registry=registry, multiprocess_mode=mode).set(1)

        return run

    in_child(worker("w3", modes))
    in_child(worker("w4", ("livesum",)))

    multiprocess.mark_dead("w3")

    assert db_files(multiprocess_dir) == {
        "counter_w3.db",
        "histogram_w3.db",
        "gauge_all_w3.db",
        "gauge_max_w3.db",
        "gauge_sum_w3.db",
        "gauge_mostrecent_w3.db",
        "counter_w4.db",
        "histogram_w4.db",
        "gauge_livesum_w4.db",
    }
    registry = CollectorRegistry()
    assert merged(registry, "jobs_total") == 2
    assert merged(registry, "g_livesum") == 1  # w4's, still alive
    assert merged(registry, "g_max") == 1
    assert merged(registry, "g_all", pid="w3") == 1


def test_in_progress_of_a_dead_worker_disappears(
    multiprocess_dir: Path, environ: Callable[..., dict[str, Any]]
) -> None:
    registry = CollectorRegistry()

    def never_finishing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [b"..."]

    app = MetricsMiddleware(never_finishing, registry=registry, route_resolver=lambda e: "/r")

    def worker() -> None:
        multiprocess.use_identifier("w2")
        app(environ("/r"), lambda *args: None)  # never closed: the worker dies mid-request

    in_child(worker)
    labels = {"method": "GET", "route": "/r"}
    assert merged(registry, "http_requests_in_progress", **labels) == 1
    multiprocess.mark_dead("w2")
    assert merged(registry, "http_requests_in_progress", **labels) == 0


def test_clear_directory_removes_the_slot_files_left_and_keeps_this_processes_values(
    multiprocess_dir: Path,
) -> None:
    """The gunicorn master at start with ``preload_app``: what it counted and set before
    (a model's reference shares) survives, once; a previous run's files do not."""
    registry = CollectorRegistry()
    multiprocess.use_identifier("w0")
    counter = Counter("jobs", "Jobs.", registry=registry)
    counter.inc(4)
    share = Gauge("share", "Share.", ["bin"], registry=registry, multiprocess_mode="max")
    share.labels("a").set(0.5498)
    (multiprocess_dir / "counter_w9.db").write_bytes(b"left by a previous run")
    (multiprocess_dir / "gauge_livesum_w9.db").write_bytes(b"left by a previous run")
    (multiprocess_dir / "notes.db").write_bytes(b"another program's")

    multiprocess.clear_directory()

    assert db_files(multiprocess_dir) == {"counter_w0.db", "gauge_max_w0.db", "notes.db"}
    assert merged(registry, "jobs_total") == 4
    assert merged(registry, "share", bin="a") == 0.5498
    counter.inc()
    multiprocess.clear_directory()  # twice: still counted once
    assert merged(registry, "jobs_total") == 5
    assert (multiprocess_dir / "notes.db").read_bytes() == b"another program's"


def test_series_made_at_zero_before_the_start_are_still_scraped_from_a_worker(
    multiprocess_dir: Path,
) -> None:
    """preload_app: the model's series exist at zero before ``on_starting`` empties the
    directory; a worker that has not counted them yet still exports them."""
    registry = CollectorRegistry()
    Counter("made", "Made at zero.", ["k"], registry=registry).labels("a")
    multiprocess.clear_directory()  # the master, at start
    multiprocess.use_identifier("w0")  # a worker
    samples = scrape_registry(registry).get_sample_value("made_total", {"k": "a"})
    assert samples == 0.0


def test_values_a_process_never_uses_leave_no_files(multiprocess_dir: Path) -> None:
    """A worker does not write the master's metrics: no file of theirs under its slot."""
    registry = CollectorRegistry()
    Gauge("masters_only", "Set by the master.", multiprocess_mode="mostrecent", registry=registry)
    Counter("shared", "Counted by the worker.", registry=registry).inc()
    multiprocess.use_identifier("w2")  # as a worker given its slot after the fork
    Counter("worker_only", "Counted by the worker.", registry=registry).inc()
    assert {p for p in db_files(multiprocess_dir) if p.endswith("_w2.db")} == {"counter_w2.db"}


# -- activation -----------------------------------------------------------------------------


def test_activate_uses_the_documented_environment_variable(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    given = tmp_path / "given"
    monkeypatch.setenv(multiprocess.ENV_VAR, str(given))
    try:
        assert multiprocess.activate() == str(given)
        assert multiprocess.active_directory() == str(given)
        assert given.is_dir()
    finally:
        multiprocess.deactivate()
    assert multiprocess.active_directory() is None
    assert given.is_dir()  # the user's directory is left in place


def test_activate_without_a_directory_owns_a_private_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(multiprocess.ENV_VAR, raising=False)
    try:
        directory = multiprocess.activate()
        assert os.environ[multiprocess.ENV_VAR] == directory
        assert os.path.isdir(directory)
    finally:
        multiprocess.deactivate()
    assert not os.path.exists(directory)
    assert multiprocess.ENV_VAR not in os.environ


def test_deactivate_twice_or_without_activate_is_harmless(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(multiprocess.ENV_VAR, raising=False)
    multiprocess.deactivate()  # never activated
    multiprocess.activate(tmp_path / "once")
    multiprocess.deactivate()
    multiprocess.deactivate()  # on_exit after a deactivate, say
    assert multiprocess.active_directory() is None
    assert multiprocess.ENV_VAR not in os.environ


def test_activate_refuses_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_text("")
    with pytest.raises(ValueError, match=multiprocess.ENV_VAR):
        multiprocess.activate(path)


# -- serving merged totals ------------------------------------------------------------------


def test_every_worker_serves_the_merged_totals(
    multiprocess_dir: Path, call: Callable[..., Any], hello: Any
) -> None:
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)
    barrier = FORK.Barrier(2, timeout=20)

    def worker(slot: str, requests: int) -> Callable[[], float]:
        def run() -> float:
            multiprocess.use_identifier(slot)
            for _ in range(requests):
                call(app, "/a")
            barrier.wait()  # both have written; each now serves a scrape
            body = call(app, "/metrics").body.decode()
            barrier.wait()
            line = next(
                line
                for line in body.splitlines()
                if line.startswith("http_requests_total{") and 'route="/a"' in line
            )
            return float(line.rsplit(" ", 1)[1])

        return run

    children = [start_child(worker("w0", 3)), start_child(worker("w1", 4))]
    served = [finish_child(*child) for child in children]
    assert served == [7, 7]
    assert merged(registry, "http_requests_total", method="GET", route="/a", status="200") == 7


# -- values set before the server starts (preload_app) -------------------------------------


def test_values_set_in_the_master_before_the_start_reach_every_workers_scrape(
    multiprocess_dir: Path,
) -> None:
    """With ``preload_app`` the model is registered in the master, then ``on_starting``
    empties the directory: the shares it set (mode ``max``) and what it counted survive."""
    registry = CollectorRegistry()
    share = Gauge("share", "Share.", ["bin"], registry=registry, multiprocess_mode="max")
    jobs = Counter("jobs", "Jobs.", registry=registry)
    share.labels("a").set(0.5498)
    share.labels("b").set(0.2397)
    jobs.inc(3)

    multiprocess.clear_directory()  # on_starting

    def worker(slot: str) -> Callable[[], tuple[float, float]]:
        def run() -> tuple[float, float]:
            multiprocess.use_identifier(slot)
            jobs.inc(2)
            return merged(registry, "share", bin="a"), merged(registry, "share", bin="b")

        return run

    assert [in_child(worker("w0")), in_child(worker("w1"))] == [(0.5498, 0.2397)] * 2
    assert merged(registry, "jobs_total") == 3 + 2 + 2


# -- without this package's storage: prometheus_client's own files --------------------------

FALLBACK_SCRIPT = """
import json, multiprocessing, os, sys
sys.path.insert(0, sys.argv[1])
from conftest import call_app, hello_app
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from ml_wsgi_metrics import MetricsMiddleware

app = MetricsMiddleware(hello_app, route_resolver=lambda environ: environ["PATH_INFO"])

def serve(requests):
    for path in requests:
        call_app(app, path)

def scraped():
    lines = call_app(app, "/metrics").body.decode().splitlines()
    return sorted(line for line in lines if line.startswith("http_requests_total{"))

serve(["/a"] * 5)
children = [multiprocessing.get_context("fork").Process(target=serve, args=(paths,))
            for paths in (["/a"] * 7 + ["/status/404"] * 3, ["/a"] * 4)]
for child in children:
    child.start()
for child in children:
    child.join()
collected = CollectorRegistry()
MultiProcessCollector(collected, path=os.environ["PROMETHEUS_MULTIPROC_DIR"])
later = multiprocessing.get_context("fork").Pool(1)
print(json.dumps({
    "collector": {
        f'{s.labels["route"]} {s.labels["status"]}': s.value
        for metric in collected.collect() for s in metric.samples
        if s.name == "http_requests_total"
    },
    "in_progress": collected.get_sample_value(
        "http_requests_in_progress", {"method": "GET", "route": "/a"}
    ),
    "served_here": scraped(),
    "served_by_another": later.apply(scraped),
    "files": sorted(os.listdir(os.environ["PROMETHEUS_MULTIPROC_DIR"])),
    "pids": sorted([os.getpid(), *(child.pid for child in children)]),
}))
later.close()
"""


@pytest.mark.parametrize("record", ["c", "python"])
def test_without_this_packages_storage_every_write_reaches_prometheus_clients_files(
    record: str, tmp_path: Path
) -> None:
    """``PROMETHEUS_MULTIPROC_DIR`` set before import, no gunicorn hooks (uWSGI, mod_wsgi, a
    config of one's own): prometheus_client's files get every request, one set per pid."""
    directory = tmp_path / "multiproc"
    directory.mkdir(mode=0o700)
    env = {**os.environ, multiprocess.ENV_VAR: str(directory)}
    env.pop("ML_WSGI_METRICS_PURE_PYTHON", None)
    if record == "python":
        env["ML_WSGI_METRICS_PURE_PYTHON"] = "1"
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(Path(__file__).parent)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)

    assert result["collector"] == {"/a 200": 16.0, "/status/404 404": 3.0}
    assert result["in_progress"] == 0
    expected = [
        'http_requests_total{method="GET",route="/a",status="200"} 16.0',
        'http_requests_total{method="GET",route="/status/404",status="404"} 3.0',
    ]
    assert result["served_here"] == result["served_by_another"] == expected
    writers = {name.rsplit("_", 1)[1][: -len(".db")] for name in result["files"]}
    assert writers == {str(pid) for pid in result["pids"]}  # the unbounded fallback


def test_without_this_packages_storage_an_unsafe_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    code = "from ml_wsgi_metrics import MetricsMiddleware as M; M(lambda e, s: [])"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, multiprocess.ENV_VAR: str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"ValueError: {multiprocess.ENV_VAR}: " in done.stderr
    assert "writable by group or others" in done.stderr


@pytest.mark.parametrize(
    ("how", "errors"),
    [
        pytest.param("garbage", 0, id="garbage"),  # prometheus_client reads it as empty
        pytest.param("truncated-header", 2, id="truncated-header"),
        pytest.param("entry-not-json", 2, id="entry-not-json"),
    ],
)
def test_a_corrupt_file_of_another_process_is_left_out_of_the_scrape(
    how: str, errors: int, multiprocess_dir: Path, call: Callable[..., Any], hello: Any
) -> None:
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)
    call(app, "/a")
    corrupt(multiprocess_dir / "counter_w7.db", how)  # a dead worker's, say

    response = call(app, "/metrics")

    assert response.code == 200
    assert 'http_requests_total{method="GET",route="/a",status="200"} 1.0' in response.body.decode()
    assert merged(registry, ERRORS, stage="storage_read") == errors  # this scrape's, merged's
    assert (multiprocess_dir / "counter_w7.db").exists()  # not this process's to move


# -- the directory and another local user ---------------------------------------------------


def test_files_are_private_and_a_new_directory_too(
    tmp_path: Path, call: Callable[..., Any], hello: Any
) -> None:
    from ml_wsgi_metrics.process import write_pid_file

    directory = Path(multiprocess.activate(tmp_path / "new" / "metrics"))
    try:
        call(hello_middleware(CollectorRegistry(), hello), "/a")
        write_pid_file(str(directory), "w0")
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in directory.iterdir()}
        assert set(modes.values()) == {0o600}
        assert "w0.pid" in modes
    finally:
        multiprocess.deactivate()


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770, 0o720, 0o702])
def test_a_directory_others_can_write_is_refused(mode: int, tmp_path: Path) -> None:
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(
        ValueError, match=rf"^{multiprocess.ENV_VAR}: .*writable by group or others"
    ):
        multiprocess.activate(directory)
    assert multiprocess.active_directory() is None


def test_a_directory_of_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "theirs"
    directory.mkdir(mode=0o700)
    try:
        os.chown(directory, 65534, 65534)  # nobody
    except PermissionError:
        missing_capability("only root can give a directory to another user")
    with pytest.raises(ValueError, match=rf"^{multiprocess.ENV_VAR}: .*belongs to uid 65534"):
        multiprocess.activate(directory)


def test_a_link_to_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ValueError, match=rf"^{multiprocess.ENV_VAR}: .*symbolic link"):
        multiprocess.activate(tmp_path / "link")


def test_a_link_among_the_files_is_not_read(
    multiprocess_dir: Path, tmp_path: Path, call: Callable[..., Any], hello: Any
) -> None:
    from prometheus_client.mmap_dict import mmap_key

    forged = MmapedDict(str(tmp_path / "forged.db"))  # a well-formed file, elsewhere
    forged.write_value(mmap_key("forged", "forged_total", [], [], "Forged."), 99.0, 0.0)
    forged.close()
    (multiprocess_dir / "counter_w9.db").symlink_to(tmp_path / "forged.db")
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)
    call(app, "/a")

    body = call(app, "/metrics").body.decode()

    assert "forged" not in body
    assert 'http_requests_total{method="GET",route="/a",status="200"} 1.0' in body
    assert merged(registry, ERRORS, stage="storage_read") == 2  # that scrape's, and this one's


def test_links_planted_in_the_directory_are_never_followed(
    multiprocess_dir: Path,
    tmp_path: Path,
    call: Callable[..., Any],
    hello: Any,
    storage_clock: Any,
) -> None:
    from ml_wsgi_metrics.process import write_pid_file

    precious = tmp_path / "precious"
    precious.write_bytes(b"someone else's data")
    planted = {
        "counter_w0.db": precious,
        "histogram_w0.db": tmp_path / "created-through-a-link",  # a dangling link
        "w0.pid": precious,
    }
    for name, target in planted.items():
        (multiprocess_dir / name).symlink_to(target)
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)

    def worker() -> set[bytes]:
        multiprocess.use_identifier("w0")
        write_pid_file(str(multiprocess_dir), "w0")
        bodies = {call(app, "/a").body for _ in range(4)}
        for name in ("counter_w0.db", "histogram_w0.db"):  # found and removed
            (multiprocess_dir / name).unlink()
        storage_clock.advance(multiprocess.RETRY_SECONDS)
        return bodies | {call(app, "/a").body}

    assert in_child(worker) == {b"hello"}
    assert precious.read_bytes() == b"someone else's data"
    assert not (tmp_path / "created-through-a-link").exists()
    assert not (multiprocess_dir / "w0.pid").is_symlink()  # replaced; its target untouched
    assert requests_to(registry, "/a") == 5  # what was counted meanwhile was kept
    assert merged(registry, ERRORS, stage="storage_open") == 2  # counter, histogram refused

    (multiprocess_dir / "counter_w1.db").symlink_to(precious)
    multiprocess.clear_directory()  # at start: the link goes, not what it points to
    assert not (multiprocess_dir / "counter_w1.db").exists()
    assert precious.read_bytes() == b"someone else's data"
