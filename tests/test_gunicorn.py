"""The issue's acceptance under real gunicorn: exact merged metrics across workers and restarts.

Every test starts ``python -m gunicorn -c gunicorn.conf.py tests.apps.flask_app:app`` (4 sync
workers, bound to 127.0.0.1) and reads the metrics the way Prometheus would: ``/metrics`` of a
worker (of every worker, one connection held open per worker: ``GunicornServer.each_worker``),
or the master's metrics port.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import CollectorRegistry
from support import (
    GunicornServer,
    free_port,
    http_request,
    listening_addresses,
    parse_samples,
    send_all,
    wait_until,
)

WORKERS = 4
ITEMS = "/items/<int:item_id>"
UNMATCHED = "<unmatched>"

# The files one process writes: one per kind of value it stores. A worker stores counters,
# histograms, its in-progress gauge (livesum) and, inherited from the master, the
# ``gunicorn_workers`` gauge (mostrecent); next to them it keeps ``w<slot>.pid`` (written aside
# as ``w<slot>.pid.tmp``, then renamed). The master writes under its pid.
DB_KINDS = ("counter", "histogram", "gauge_livesum", "gauge_mostrecent")
DB_FILE = re.compile(r"^(?P<kind>counter|histogram|gauge_[a-z]+)_(?P<owner>w\d+|\d+)\.db$")
PID_FILE = re.compile(r"^(?P<owner>w\d+)\.pid(\.tmp)?$")
#: The shared scrape's files: the one format the test scrapes, and the file waiting scrapes hold.
SCRAPE_FILE = re.compile(r"^scrape-(waiting|[0-9a-f]{16})\.cache$")
SCRAPE_FILES = 2
#: The db kinds the master writes: restarts and timeouts (counter), its workers (mostrecent).
MASTER_KINDS = ("counter", "gauge_mostrecent")
#: The bound on files in the directory, whatever the number of restarts (README: "at most 24
#: files"): WORKERS slots (gunicorn never holds more workers than that, and a slot is reused
#: once its holder is reaped) times (the db kinds + the pid file), plus the master's db files.
#: A pid file is written aside as ``.tmp`` and renamed over its name: never both at rest.
#: And the shared scrape's files.
FILE_BOUND = WORKERS * (len(DB_KINDS) + 1) + len(MASTER_KINDS) + SCRAPE_FILES

RequestKey = tuple[str, str, str]  # method, route, status


# -- helpers -------------------------------------------------------------------------------------


def scrape(url: str) -> str:
    status, body = http_request(url + "/metrics")
    assert status == 200, body[:500]
    return body.decode()


def requests_by_key(text: str) -> dict[RequestKey, float]:
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in parse_samples(text)
        if s.name == "http_requests_total"
    }


def in_progress(text: str) -> dict[tuple[str, str], float]:
    return {
        (s.labels["method"], s.labels["route"]): s.value
        for s in parse_samples(text)
        if s.name == "http_requests_in_progress"
    }


def value(text: str, name: str, **labels: str) -> float | None:
    found = [s.value for s in parse_samples(text) if s.name == name and s.labels == labels]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def worker_labels(text: str, name: str) -> dict[str, float]:
    return {s.labels["worker"]: s.value for s in parse_samples(text) if s.name == name}


def slot_pids(directory: Path) -> dict[str, int]:
    """``{"w0": pid, ...}`` from the workers' pid files."""
    found = {}
    for path in directory.glob("w*.pid"):
        try:
            found[path.stem] = int(path.read_text())
        except (OSError, ValueError):
            continue  # being replaced
    return found


def wait_for_workers(server: GunicornServer, directory: Path) -> dict[str, int]:
    """Wait until WORKERS live workers hold slots w0.. and have written their pid files."""

    def ready() -> dict[str, int] | None:
        slots = slot_pids(directory)
        live = set(server.worker_pids())
        expected = {f"w{i}" for i in range(WORKERS)}
        return slots if set(slots) == expected and set(slots.values()) == live else None

    return wait_until(ready, 30, message=f"workers never all up in {directory}")


def request_plan(total: int, seed: int = 7) -> list[tuple[str, str, bytes | None, RequestKey]]:
    """``total`` requests over several routes and statuses, shuffled: (method, path, body, key)."""
    rng = random.Random(seed)
    shares = {"items": 0.5, "hello": 0.1, "missing": 0.16, "boom": 0.08}
    counts = {kind: int(total * share) for kind, share in shares.items()}
    counts["post"] = total - sum(counts.values())
    plan: list[tuple[str, str, bytes | None, RequestKey]] = []
    plan += [("GET", f"/items/{i}", None, ("GET", ITEMS, "200")) for i in range(counts["items"])]
    plan += [("GET", "/", None, ("GET", "/", "200"))] * counts["hello"]
    plan += [
        ("GET", f"/missing/{rng.getrandbits(64):x}", None, ("GET", UNMATCHED, "404"))
        for _ in range(counts["missing"])
    ]
    plan += [("GET", "/boom", None, ("GET", "/boom", "500"))] * counts["boom"]
    plan += [
        ("POST", "/items", b"x" * rng.randrange(1, 2000), ("POST", "/items", "201"))
        for _ in range(counts["post"])
    ]
    rng.shuffle(plan)
    assert len(plan) == total
    return plan


def send_plan(
    url: str, plan: list[tuple[str, str, bytes | None, RequestKey]], clients: int = 8
) -> None:
    """Send every planned request once from ``clients`` concurrent clients; each must get its
    planned status."""
    results = send_all(url, [(method, path, body) for method, path, body, _ in plan], clients)
    sent = Counter((method, path, str(status)) for method, path, status in results)
    planned = Counter((method, path, key[2]) for method, path, _, key in plan)
    assert sent == planned


def expected_counts(plan: list[tuple[str, str, bytes | None, RequestKey]]) -> dict[RequestKey, int]:
    return dict(Counter(key for *_, key in plan))


def assert_exact(text: str, expected: dict[RequestKey, int]) -> None:
    """The merged metrics count exactly the planned requests, per route and status."""
    assert requests_by_key(text) == expected
    durations = {
        (s.labels["method"], s.labels["route"]): s.value
        for s in parse_samples(text)
        if s.name == "http_request_duration_seconds_count"
    }
    per_route: Counter[tuple[str, str]] = Counter()
    for (method, route, _), count in expected.items():
        per_route[(method, route)] += count
    assert durations == dict(per_route)
    assert set(in_progress(text).values()) <= {0.0}


class DirectorySampler:
    """Lists a directory every few milliseconds in a thread: the most files and every name."""

    def __init__(self, directory: Path, interval: float = 0.002) -> None:
        self.directory = directory
        self.interval = interval
        self.most = 0
        self.names: set[str] = set()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                names = os.listdir(self.directory)
            except FileNotFoundError:
                names = []
            self.most = max(self.most, len(names))
            self.names.update(names)
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> DirectorySampler:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


# -- 5,000 requests, 150+ restarts ---------------------------------------------------------------

TOTAL = 5_000
CLIENTS = 8  # concurrent clients sending the requests
ROUNDS = 6  # rounds of scrapes, each answered by every worker
MAX_REQUESTS, JITTER = 20, 10  # a worker restarts after 20-30 requests
#: Each worker serves at most MAX_REQUESTS + JITTER requests, so TOTAL requests take at least
#: TOTAL / 30 workers; all but the (at most) WORKERS not yet reaped were restarted.
MIN_RESTARTS = math.ceil(TOTAL / (MAX_REQUESTS + JITTER)) - WORKERS


@pytest.mark.parametrize("preload", [False, True], ids=["preload-off", "preload-on"])
def test_every_worker_reports_exact_totals_across_150_restarts(
    preload: bool, tmp_path: Path
) -> None:
    """5,000 requests from 8 concurrent clients over 4 workers restarting every 20-30
    requests: every worker's ``/metrics`` counts exactly the 5,000, the directory never holds
    more than 24 files."""
    directory = tmp_path / "multiproc"
    plan = request_plan(TOTAL)
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "GUNICORN_MAX_REQUESTS": str(MAX_REQUESTS),
        "GUNICORN_MAX_REQUESTS_JITTER": str(JITTER),
        "GUNICORN_PRELOAD": "1" if preload else "0",
    }
    with GunicornServer(env=env) as server:
        with DirectorySampler(directory) as files:
            send_plan(server.url, plan, clients=CLIENTS)
            # Every live worker answers a scrape in each round (scrapes restart workers too).
            rounds = [server.each_worker("/metrics") for _ in range(ROUNDS)]
        at_rest = os.listdir(directory)
        master = server.pid

    expected = expected_counts(plan)
    assert sum(expected.values()) == TOTAL
    assert MIN_RESTARTS >= 150
    answered = [pid for answers in rounds for pid in answers]
    assert len(answered) == ROUNDS * WORKERS and len(set(answered)) >= WORKERS
    for answers in rounds:
        assert len(answers) == WORKERS
        for status, body in answers.values():
            assert status == 200
            text = body.decode()
            assert_exact(text, expected)
            assert value(text, "http_request_exceptions_total", method="GET", route="/boom",
                         exception="Boom") == expected[("GET", "/boom", "500")]  # fmt: skip
            restarts = value(text, "gunicorn_worker_restarts_total")
            assert restarts is not None and restarts >= MIN_RESTARTS

    # The file count stays bounded whatever the number of restarts.
    assert files.samples > 100
    assert len(at_rest) <= FILE_BOUND, sorted(at_rest)
    assert files.most <= FILE_BOUND, sorted(files.names)
    owners = set()
    assert len([n for n in files.names if SCRAPE_FILE.match(n)]) <= SCRAPE_FILES
    for name in files.names:
        if SCRAPE_FILE.match(name):
            continue
        match = DB_FILE.match(name) or PID_FILE.match(name)
        assert match, f"unexpected file {name}"
        owners.add(match["owner"])
        if match["owner"] == str(master):
            assert match["kind"] in MASTER_KINDS, name
    assert owners <= {f"w{i}" for i in range(WORKERS)} | {str(master)}


# -- SIGKILL and timeouts mid-request -----------------------------------------------------------


def send_to_every_worker(
    server: GunicornServer, plan: list[tuple[str, str, bytes | None, RequestKey]]
) -> dict[RequestKey, int]:
    """Send ``plan``, then one ``GET /`` to every worker (so each has completed requests in
    its files); the counts expected."""
    send_plan(server.url, plan)
    for status, _ in server.each_worker("/").values():
        assert status == 200
    return expected_counts([*plan, *[("GET", "/", None, ("GET", "/", "200"))] * WORKERS])


def _completed_in_file(path: Path) -> float:
    return sum(
        count
        for key, count, _, _ in MmapedDict.read_all_values_from_file(str(path))
        if json.loads(key)[1] == "http_requests_total"
    )


def _receive_all(client: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := client.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_sigkill_mid_request_loses_no_completed_request(tmp_path: Path) -> None:
    """Kill a worker busy with /slow: every completed request still counts, its gauge is gone."""
    directory = tmp_path / "multiproc"
    plan = request_plan(200, seed=11)
    plan += [("GET", "/slow?seconds=0", None, ("GET", "/slow", "200"))] * 8
    with GunicornServer(env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}) as server:
        wait_for_workers(server, directory)
        expected = send_to_every_worker(server, plan)
        assert_exact(scrape(server.url), expected)

        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as client:
            client.sendall(b"GET /slow?seconds=60 HTTP/1.1\r\nHost: test\r\n\r\n")
            victim = wait_until(lambda: server.worker_serving(client.getsockname()[1]), 10)
            wait_until(lambda: in_progress(scrape(server.url)).get(("GET", "/slow")) == 1, 10)
            slot = next(slot for slot, pid in slot_pids(directory).items() if pid == victim)
            # The victim completed requests before: they live in its slot's files.
            assert _completed_in_file(directory / f"counter_{slot}.db") > 0
            os.kill(victim, signal.SIGKILL)
            assert _receive_all(client) == b""  # the in-flight request never completed

        def replaced() -> bool:
            pids = slot_pids(directory)
            live = server.worker_pids()
            return victim not in live and pids.get(slot) in live and len(live) == WORKERS

        wait_until(replaced, 30, message="the killed worker was not replaced")
        # child_exit dropped the victim's live gauges before the replacement was forked (which
        # has served only scrapes since: no series of its own yet).
        assert not (directory / f"gauge_livesum_{slot}.db").exists()
        for _ in range(8):
            text = scrape(server.url)
            assert_exact(text, expected)  # in progress all 0, the killed request not counted
            assert in_progress(text)[("GET", "/slow")] == 0
            assert value(text, "gunicorn_worker_restarts_total") == 1
            assert value(text, "gunicorn_workers") == WORKERS


TIMEOUT = 4  # seconds: gunicorn's --timeout in the test below


def test_a_worker_timeout_counts_once_and_loses_no_completed_request(tmp_path: Path) -> None:
    """A handler sleeping past ``--timeout``: the master aborts its worker (SIGABRT), which
    answers that request 500 and exits. ``gunicorn_worker_timeouts_total`` rises by exactly
    one; every request completed before, by that worker too, still counts, and the aborted
    one counts as what its client got: a 500 raising ``SystemExit``."""
    directory = tmp_path / "multiproc"
    plan = request_plan(200, seed=13)
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "GUNICORN_TIMEOUT": str(TIMEOUT),
        "GUNICORN_PRELOAD": "1",  # workers boot well within the timeout
    }
    with GunicornServer(env=env) as server:
        wait_for_workers(server, directory)
        expected = send_to_every_worker(server, plan)
        text = scrape(server.url)
        assert_exact(text, expected)
        assert value(text, "gunicorn_worker_timeouts_total") == 0

        with socket.create_connection(("127.0.0.1", server.port), timeout=60) as client:
            client.sendall(b"GET /slow?seconds=600 HTTP/1.1\r\nHost: test\r\n\r\n")
            victim = wait_until(lambda: server.worker_serving(client.getsockname()[1]), 10)
            slot = next(slot for slot, pid in slot_pids(directory).items() if pid == victim)
            assert _completed_in_file(directory / f"counter_{slot}.db") > 0
            answer = _receive_all(client)  # once the master aborted the worker
        assert answer.startswith(b"HTTP/1.1 500 "), answer[:200]

        def replaced() -> bool:
            live = server.worker_pids()
            return victim not in live and slot_pids(directory).get(slot) in live

        wait_until(replaced, 30, message="the timed-out worker was not replaced")
        expected[("GET", "/slow", "500")] = 1
        for answers in (server.each_worker("/metrics") for _ in range(2)):
            for status, body in answers.values():
                assert status == 200
                text = body.decode()
                assert_exact(text, expected)
                assert value(text, "http_request_exceptions_total", method="GET", route="/slow",
                             exception="SystemExit") == 1  # fmt: skip
                assert value(text, "gunicorn_worker_timeouts_total") == 1
                assert value(text, "gunicorn_worker_restarts_total") == 1
                assert value(text, "gunicorn_workers") == WORKERS


# -- directory handling --------------------------------------------------------------------------


def test_private_directory_without_environment_variable(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR unset: a private directory, merged metrics, removed at exit."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    plan = request_plan(40, seed=3)
    # GunicornServer never passes PROMETHEUS_MULTIPROC_DIR on unless it is given.
    with GunicornServer(env={"TMPDIR": str(temp)}) as server:
        (private,) = temp.glob("ml-wsgi-metrics-*")
        wait_for_workers(server, private)
        send_plan(server.url, plan)
        for _ in range(8):
            assert_exact(scrape(server.url), expected_counts(plan))
        assert list(private.glob("counter_w*.db"))
    assert not private.exists()
    assert list(temp.iterdir()) == []


def _stale_files(directory: Path) -> None:
    """What a crashed earlier run leaves: counts, a live gauge, a pid file naming a live pid."""
    directory.mkdir()
    stale = {"method": "GET", "route": "/stale"}
    for filename, metric, name, labels, count in (
        ("counter_999.db", "http_requests", "http_requests_total", {**stale, "status": "200"}, 7),
        ("gauge_livesum_999.db", "http_requests_in_progress", None, stale, 3),
    ):
        stored = MmapedDict(str(directory / filename))
        key = mmap_key(metric, name or metric, tuple(labels), tuple(labels.values()), "stale")
        stored.write_value(key, float(count), 0.0)
        stored.close()
    (directory / "w7.pid").write_text(str(os.getpid()))  # pids are reused: this one is alive
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    assert registry.get_sample_value("http_requests_total", {**stale, "status": "200"}) == 7
    assert registry.get_sample_value("http_requests_in_progress", stale) == 3


@pytest.fixture(scope="module")
def steady(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GunicornServer, Path, int]]:
    """A server without restarts, a given directory holding stale files, the master's port."""
    directory = tmp_path_factory.mktemp("steady") / "multiproc"
    _stale_files(directory)
    port = free_port()
    env = {"PROMETHEUS_MULTIPROC_DIR": str(directory), "ML_WSGI_METRICS_PORT": str(port)}
    with GunicornServer(env=env) as server:
        wait_for_workers(server, directory)
        send_plan(server.url, request_plan(100, seed=5))
        yield server, directory, port
    assert directory.is_dir()  # the user's directory is emptied, never removed


def test_given_directory_is_used_and_emptied_at_start(
    steady: tuple[GunicornServer, Path, int],
) -> None:
    server, directory, _ = steady
    names = set(os.listdir(directory))
    assert not {"counter_999.db", "gauge_livesum_999.db", "w7.pid"} & names
    assert {f"w{i}.pid" for i in range(WORKERS)} <= names  # every worker writes here
    assert any(name.startswith("counter_w") for name in names)  # those that served, counts
    text = scrape(server.url)
    assert all(route != "/stale" for _, route, _ in requests_by_key(text))
    assert all(route != "/stale" for _, route in in_progress(text))
    assert sum(requests_by_key(text).values()) == 100


def test_per_worker_process_metrics_and_master_metrics(
    steady: tuple[GunicornServer, Path, int],
) -> None:
    server, directory, _ = steady
    text = scrape(server.url)
    slots = {f"w{i}" for i in range(WORKERS)}
    for name in (
        "gunicorn_worker_resident_memory_bytes",
        "gunicorn_worker_cpu_seconds_total",
        "gunicorn_worker_open_fds",
        "gunicorn_worker_start_time_seconds",
    ):
        samples = worker_labels(text, name)
        assert set(samples) == slots, name
        assert all(sample > 0 for sample in samples.values()), name
    assert set(slot_pids(directory).values()) == set(server.worker_pids())
    assert value(text, "gunicorn_workers") == WORKERS
    assert value(text, "gunicorn_worker_restarts_total") == 0
    assert value(text, "gunicorn_worker_timeouts_total") == 0


def test_master_port_serves_the_same_merged_totals(
    steady: tuple[GunicornServer, Path, int],
) -> None:
    server, _, port = steady
    assert listening_addresses(port) == {"127.0.0.1"}
    status, body = http_request(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    master = body.decode()
    worker = scrape(server.url)
    assert requests_by_key(master) == requests_by_key(worker)
    assert sum(requests_by_key(master).values()) == 100
    assert value(master, "gunicorn_workers") == WORKERS
    assert set(worker_labels(master, "gunicorn_worker_resident_memory_bytes")) == {
        f"w{i}" for i in range(WORKERS)
    }


def test_promtool_check_metrics_passes_on_a_worker_output(
    steady: tuple[GunicornServer, Path, int],
) -> None:
    server, _, _ = steady
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install prometheus (make setup does)"
    text = scrape(server.url)
    assert "http_request_duration_seconds_bucket" in text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30
    )
    assert result.returncode == 0, result.stderr.decode() + result.stdout.decode()
