"""The gunicorn hooks, called with small fake server and worker objects.

Importing ``ml_wsgi_metrics.gunicorn`` switches to multiprocess mode (its one line in
``gunicorn.conf.py`` relies on that). The ``hooks`` fixture imports it inside a fresh
multiprocess directory and always deactivates after, so the side effect never leaks into
other tests; the import side effect itself is checked in a clean interpreter.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import random
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import prometheus_client.values
import pytest
from gunicorn.config import Config
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from support import http_request

from ml_wsgi_metrics import MetricsMiddleware, multiprocess
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.process import write_pid_file


class FakeWorker:
    """What the hooks use of a gunicorn worker."""

    def __init__(self, wsgi: Any = None) -> None:
        self.pid: int | None = None
        self.aborted = False
        self.wsgi = wsgi


class FakeServer:
    """What the hooks use of gunicorn's arbiter: its table of live (unreaped) workers."""

    def __init__(self, hooks: ModuleType, num_workers: int = 4) -> None:
        self.WORKERS: dict[int, FakeWorker] = {}
        self.LISTENERS: list[object] = [object()]
        self.num_workers = num_workers
        self._hooks = hooks
        self._next_pid = 1000

    def spawn(self) -> FakeWorker:
        """As ``Arbiter.spawn_worker``: ``pre_fork``, then the worker enters the table."""
        worker = FakeWorker()
        self._hooks.pre_fork(self, worker)
        self._next_pid += 1
        worker.pid = self._next_pid
        self.WORKERS[worker.pid] = worker
        return worker

    def reap(self, worker: FakeWorker, *, aborted: bool = False) -> None:
        """As ``Arbiter.reap_workers``: out of the table, then ``child_exit``."""
        worker.aborted = aborted
        del self.WORKERS[worker.pid]  # type: ignore[arg-type]
        self._hooks.child_exit(self, worker)


def slot_file(path: Path) -> None:
    """A valid, empty slot file, as a worker that wrote nothing yet leaves."""
    MmapedDict(str(path)).close()


def slot(worker: FakeWorker) -> int:
    return worker._ml_wsgi_metrics_slot  # type: ignore[attr-defined]


@pytest.fixture
def hooks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleType]:
    value_class = prometheus_client.values.ValueClass
    directory = tmp_path / "multiprocess"
    monkeypatch.setenv(multiprocess.ENV_VAR, str(directory))  # if this is the first import
    try:
        module = importlib.import_module("ml_wsgi_metrics.gunicorn")
        monkeypatch.setattr(module, "_directory", multiprocess.activate(directory))
        for name, value in [
            ("middleware", {}),
            ("wrap_app", True),
            ("metrics_port", None),
            ("metrics_address", "127.0.0.1"),
            ("server_metrics", None),
            ("metrics_server", None),
        ]:
            monkeypatch.setattr(module._Settings, name, value)
        yield module
    finally:
        multiprocess.deactivate()
        assert prometheus_client.values.ValueClass is value_class


@pytest.fixture
def server(hooks: ModuleType) -> FakeServer:
    fake = FakeServer(hooks)
    hooks.on_starting(fake)
    return fake


def scraped(name: str, **labels: str) -> float | None:
    return scrape_registry(CollectorRegistry()).get_sample_value(name, labels)


# -- the import ------------------------------------------------------------------------------


def test_importing_the_module_switches_to_multiprocess_mode(tmp_path: Path) -> None:
    """In a clean interpreter, as gunicorn reads its config: before any app is imported."""
    code = (
        "import json, prometheus_client.values as v\n"
        "from ml_wsgi_metrics.gunicorn import *\n"
        "from ml_wsgi_metrics import multiprocess as m\n"
        "print(json.dumps([m.active_directory(), v.ValueClass.__name__]))\n"
    )
    directory = tmp_path / "given"
    env = {**os.environ, multiprocess.ENV_VAR: str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [str(directory), "SlotValue"]
    assert directory.is_dir()


def test_importing_the_module_refuses_a_directory_others_can_write(tmp_path: Path) -> None:
    """gunicorn reads its config first: a bad directory stops the server before it starts."""
    directory = tmp_path / "shared"
    directory.mkdir()
    directory.chmod(0o777)
    env = {**os.environ, multiprocess.ENV_VAR: str(directory)}
    done = subprocess.run(
        [sys.executable, "-c", "import ml_wsgi_metrics.gunicorn"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert f"ValueError: {multiprocess.ENV_VAR}: '{directory}' is writable by group" in done.stderr
    assert list(directory.iterdir()) == []


@pytest.mark.parametrize(
    ("hook", "setting"),
    [
        pytest.param("on_starting", "on_starting", id="on_starting"),
        pytest.param("when_ready", "when_ready", id="when_ready"),
        pytest.param("pre_fork", "pre_fork", id="pre_fork"),
        pytest.param("post_fork", "post_fork", id="post_fork"),
        pytest.param("post_worker_init", "post_worker_init", id="post_worker_init"),
        pytest.param("child_exit", "child_exit", id="child_exit"),
        pytest.param("on_exit", "on_exit", id="on_exit"),
    ],
)
def test_hooks_have_the_arity_gunicorn_checks(hook: str, setting: str, hooks: ModuleType) -> None:
    config = Config()
    config.set(setting, getattr(hooks, hook))  # raises TypeError on a wrong arity
    assert getattr(config, setting) is getattr(hooks, hook)


# -- slots ----------------------------------------------------------------------------------


def test_slots_are_the_lowest_free_ones(server: FakeServer) -> None:
    workers = [server.spawn() for _ in range(4)]
    assert [slot(w) for w in workers] == [0, 1, 2, 3]

    server.reap(workers[2])
    server.reap(workers[0])
    assert slot(server.spawn()) == 0
    assert slot(server.spawn()) == 2
    assert slot(server.spawn()) == 4


def test_an_unreaped_workers_slot_is_never_reused(server: FakeServer) -> None:
    dying = server.spawn()
    server.spawn()
    # Killed (e.g. timed out) but not yet reaped: still in the table, its slot still taken.
    assert slot(server.spawn()) == 2
    server.reap(dying)
    assert slot(server.spawn()) == 0


def test_slots_stay_unique_and_bounded_through_many_restarts(server: FakeServer) -> None:
    chance = random.Random(20240601)
    workers = 4
    for _ in range(4):
        server.spawn()
    for _ in range(2000):
        victim = chance.choice(list(server.WORKERS.values()))
        server.reap(victim, aborted=chance.random() < 0.1)
        while len(server.WORKERS) < workers:
            taken = {slot(w) for w in server.WORKERS.values()}
            new = server.spawn()
            assert slot(new) == min(set(range(workers + 1)) - taken)
        slots = [slot(w) for w in server.WORKERS.values()]
        assert sorted(slots) == list(range(workers))


# -- worker side ----------------------------------------------------------------------------


def test_post_fork_takes_over_the_slot_and_writes_a_pid_file(
    hooks: ModuleType, server: FakeServer
) -> None:
    directory = Path(hooks._directory)
    worker = server.spawn()
    slot_file(directory / "gauge_livesum_w0.db")  # left by an unreaped predecessor

    hooks.post_fork(server, worker)

    assert multiprocess.process_identifier() == "w0"
    assert (directory / "w0.pid").read_text() == str(os.getpid())
    assert not (directory / "gauge_livesum_w0.db").exists()


def test_post_fork_fails_open_when_the_directory_is_gone(
    hooks: ModuleType, server: FakeServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker whose post_fork raises fails to boot, and gunicorn then halts the server."""
    worker = server.spawn()
    shutil.rmtree(hooks._directory)
    errors = multiprocess.instrumentation_errors()

    with caplog.at_level(logging.WARNING, logger="ml_wsgi_metrics"):
        hooks.post_fork(server, worker)

    assert multiprocess.process_identifier() == "w0"
    assert multiprocess.instrumentation_errors() > errors
    assert "w0.pid" in caplog.text


def test_post_worker_init_wraps_the_app_once(
    hooks: ModuleType, call: Callable[..., Any], hello: Any
) -> None:
    registry = CollectorRegistry()
    hooks.configure(registry=registry, route_resolver=lambda environ: "/r")
    already = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    worker = FakeWorker(already)  # the app wraps itself too

    hooks.post_worker_init(worker)

    assert isinstance(worker.wsgi, MetricsMiddleware)
    assert worker.wsgi.app is already
    assert call(worker.wsgi, "/r").body == b"hello"
    assert scraped("http_requests_total", method="GET", route="/r", status="200") == 1


def test_post_worker_init_leaves_the_app_alone_when_asked(hooks: ModuleType, hello: Any) -> None:
    hooks.configure(wrap_app=False)
    worker = FakeWorker(hello)
    hooks.post_worker_init(worker)
    assert worker.wsgi is hello


# -- master side ----------------------------------------------------------------------------


def test_on_starting_empties_the_directory(hooks: ModuleType) -> None:
    directory = Path(hooks._directory)
    (directory / "counter_w7.db").write_bytes(b"from a previous run")
    write_pid_file(str(directory), "w7")  # a live process holds that pid now: this one

    hooks.on_starting(FakeServer(hooks))

    assert not (directory / "counter_w7.db").exists()
    assert not (directory / "w7.pid").exists()
    assert scraped("gunicorn_worker_resident_memory_bytes", worker="w7") is None


def test_on_starting_removes_only_the_files_this_package_writes(hooks: ModuleType) -> None:
    """The directory may be shared by mistake: other programs' files survive the start."""
    directory = Path(hooks._directory)
    ours = [
        "counter_w7.db",
        "histogram_w0.db",
        "gauge_livesum_12345.db",
        "gauge_mostrecent_w1.db",
        "summary_w2.db",
        "w7.pid",
        "w7.pid.tmp",  # a pid file being written when a run crashed
        "scrape-waiting.cache",  # the shared scrape's files
        "scrape-0123456789abcdef.cache",
    ]
    foreign = [
        "nginx.pid",
        "app.db",
        "counter.db",
        "counter_w7.db.bak",
        "gauge_sideways_w1.db",
        "counter_w_7.db",
        "notes.txt",
        "w7.pid.bak",
    ]
    for name in ours + foreign:
        (directory / name).write_bytes(b"left there")

    hooks.on_starting(FakeServer(hooks))

    remaining = {path.name for path in directory.iterdir()}
    assert remaining & set(ours) == set()
    assert set(foreign) <= remaining
    assert all((directory / name).read_bytes() == b"left there" for name in foreign)


def test_on_starting_keeps_what_was_set_before_it(hooks: ModuleType) -> None:
    """``preload_app``: the app (and its model's reference shares) is loaded before."""
    from prometheus_client import Gauge

    registry = CollectorRegistry()
    share = Gauge("share", "Share.", ["bin"], registry=registry, multiprocess_mode="max")
    share.labels("Month-to-month").set(0.5498)
    hooks.on_starting(FakeServer(hooks))
    assert scraped("share", bin="Month-to-month") == 0.5498


def test_only_this_packages_pid_files_are_read_as_workers(hooks: ModuleType) -> None:
    directory = Path(hooks._directory)
    (directory / "nginx.pid").write_text(str(os.getpid()))
    (directory / "w3.pid").symlink_to(directory / "nginx.pid")  # never followed
    write_pid_file(str(directory), "w1")
    assert scraped("gunicorn_worker_resident_memory_bytes", worker="w1") is not None
    assert scraped("gunicorn_worker_resident_memory_bytes", worker="nginx") is None
    assert scraped("gunicorn_worker_resident_memory_bytes", worker="w3") is None


def test_child_exit_drops_live_gauges_and_pid_file_and_counts_the_exit(
    hooks: ModuleType, server: FakeServer
) -> None:
    directory = Path(hooks._directory)
    first, second, third = server.spawn(), server.spawn(), server.spawn()
    for worker in (first, second, third):
        identifier = f"w{slot(worker)}"
        write_pid_file(str(directory), identifier, os.getpid())
        for prefix in ("gauge_livesum", "gauge_liveall", "counter"):
            slot_file(directory / f"{prefix}_{identifier}.db")
    assert scraped("gunicorn_workers") == 3

    server.reap(first)
    server.reap(second, aborted=True)  # the master killed it for a timeout

    assert scraped("gunicorn_worker_restarts_total") == 2
    assert scraped("gunicorn_worker_timeouts_total") == 1
    assert scraped("gunicorn_workers") == 1
    names = {path.name for path in directory.iterdir()}
    for gone in ("w0.pid", "w1.pid", "gauge_livesum_w0.db", "gauge_liveall_w1.db"):
        assert gone not in names
    for kept in ("w2.pid", "gauge_livesum_w2.db", "counter_w0.db", "counter_w1.db"):
        assert kept in names  # counters outlive their workers: they never go down


def test_exits_at_shutdown_or_when_told_to_run_fewer_are_not_restarts(
    hooks: ModuleType, server: FakeServer
) -> None:
    workers = [server.spawn() for _ in range(4)]
    server.num_workers = 3  # TTOU: one fewer
    server.reap(workers[0])
    assert scraped("gunicorn_worker_restarts_total") == 0
    server.reap(workers[1])  # 2 left of 3: replaced
    assert scraped("gunicorn_worker_restarts_total") == 1
    server.LISTENERS = []  # as Arbiter.stop, before it signals the workers
    server.reap(workers[2])
    server.reap(workers[3], aborted=True)
    assert scraped("gunicorn_worker_restarts_total") == 1
    assert scraped("gunicorn_worker_timeouts_total") == 1
    assert scraped("gunicorn_workers") == 0


def test_child_exit_of_a_worker_without_a_slot_does_nothing(
    hooks: ModuleType, server: FakeServer
) -> None:
    hooks.child_exit(server, FakeWorker())
    assert scraped("gunicorn_worker_restarts_total") == 0


def test_server_metrics_carry_namespace_and_const_labels(hooks: ModuleType) -> None:
    hooks.configure(namespace="shop", const_labels={"service": "churn"})
    server = FakeServer(hooks)
    hooks.on_starting(server)
    server.reap(server.spawn())
    assert scraped("shop_gunicorn_worker_restarts_total", service="churn") == 1


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


TOKEN = "port-s3cret"


@pytest.fixture
def master_port(hooks: ModuleType) -> Iterator[int]:
    """A free port for the master's metrics; whatever ``when_ready`` serves is stopped after."""
    try:
        yield free_port()
    finally:
        if hooks._Settings.metrics_server is not None:
            hooks._Settings.metrics_server.stop()


def get(port: int, path: str = "/metrics", **headers: str) -> tuple[int, bytes]:
    return http_request(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10)


def test_when_ready_serves_merged_metrics_on_its_own_port(
    hooks: ModuleType, server: FakeServer, master_port: int
) -> None:
    hooks.configure(metrics_port=master_port, metrics_address="127.0.0.1")
    server.reap(server.spawn())
    write_pid_file(hooks._directory, "w0")

    hooks.when_ready(server)
    status, body = get(master_port)

    assert status == 200
    assert b"gunicorn_worker_restarts_total 1.0" in body
    assert b'gunicorn_worker_resident_memory_bytes{worker="w0"}' in body
    assert get(master_port, "/other")[0] == 404


@pytest.mark.parametrize("from_environment", [False, True], ids=["configure", "environment"])
def test_master_port_requires_the_token(
    from_environment: bool,
    hooks: ModuleType,
    server: FakeServer,
    master_port: int,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if from_environment:
        monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", TOKEN + "\n")
        hooks.configure(metrics_port=master_port)
    else:
        hooks.configure(metrics_port=master_port, metrics_token=TOKEN)
    hooks.when_ready(server)

    assert get(master_port)[0] == 401
    assert get(master_port, Authorization="Bearer wrong")[0] == 401
    status, body = get(master_port, Authorization=f"Bearer {TOKEN}")
    assert status == 200
    assert b"gunicorn_workers " in body


@pytest.mark.parametrize(
    ("networks", "expected"),
    [pytest.param(["10.0.0.0/8"], 403, id="refused"), pytest.param("127.0.0.0/8", 200, id="ok")],
)
def test_master_port_applies_the_allow_list(
    networks: list[str] | str,
    expected: int,
    hooks: ModuleType,
    server: FakeServer,
    master_port: int,
) -> None:
    hooks.configure(metrics_port=master_port, metrics_allowed_networks=networks)
    hooks.when_ready(server)
    assert get(master_port)[0] == expected


def test_when_ready_without_a_port_starts_nothing(hooks: ModuleType, server: FakeServer) -> None:
    hooks.when_ready(server)
    assert hooks._Settings.metrics_server is None


@pytest.mark.parametrize("wrap_app", [True, False], ids=["wrapped", "not-wrapped"])
@pytest.mark.parametrize(
    ("app_options", "port_options", "setting"),
    [
        pytest.param({"metrics_token": TOKEN}, {}, "metrics_token", id="token"),
        pytest.param(
            {"metrics_allowed_networks": ["10.0.0.0/8"]},
            {"metrics_allowed_networks": ["10.0.0.0/8", "192.168.0.0/16"]},
            "metrics_allowed_networks",
            id="narrower-networks",
        ),
    ],
)
def test_post_worker_init_refuses_an_app_protected_more_than_the_master_port(
    wrap_app: bool,
    app_options: dict[str, Any],
    port_options: dict[str, Any],
    setting: str,
    hooks: ModuleType,
    hello: Any,
) -> None:
    hooks.configure(metrics_port=free_port(), wrap_app=wrap_app, **port_options)
    app = MetricsMiddleware(
        hello, registry=CollectorRegistry(), route_resolver=lambda e: "/r", **app_options
    )
    with pytest.raises(ValueError, match=rf"^{setting}: .*metrics_port"):
        hooks.post_worker_init(FakeWorker(app))


def test_post_worker_init_accepts_the_port_s_own_protection(
    hooks: ModuleType, hello: Any, call: Callable[..., Any]
) -> None:
    networks = ["127.0.0.0/8", "10.0.0.0/8"]
    hooks.configure(
        metrics_port=free_port(),
        metrics_token=TOKEN,
        metrics_allowed_networks=networks,
        registry=CollectorRegistry(),
    )
    app = MetricsMiddleware(
        hello,
        registry=CollectorRegistry(),
        route_resolver=lambda e: "/r",
        metrics_token=TOKEN + "\n",
        metrics_allowed_networks="10.0.0.0/8, 127.0.0.0/8",
    )
    worker = FakeWorker(app)
    hooks.post_worker_init(worker)
    assert call(worker.wsgi, "/metrics").code == 401


def test_post_worker_init_without_a_port_keeps_the_app_s_protection(
    hooks: ModuleType, hello: Any, call: Callable[..., Any]
) -> None:
    hooks.configure(registry=CollectorRegistry())
    app = MetricsMiddleware(
        hello, registry=CollectorRegistry(), route_resolver=lambda e: "/r", metrics_token=TOKEN
    )
    worker = FakeWorker(app)
    hooks.post_worker_init(worker)
    assert call(worker.wsgi, "/metrics").code == 401
    assert call(worker.wsgi, "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).code == 200


def test_when_ready_refuses_a_preloaded_app_protected_more_than_the_port(
    hooks: ModuleType, server: FakeServer, master_port: int, hello: Any
) -> None:
    hooks.configure(metrics_port=master_port)
    app = MetricsMiddleware(
        hello, registry=CollectorRegistry(), route_resolver=lambda e: "/r", metrics_token=TOKEN
    )
    server.app = SimpleNamespace(callable=app)  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match=r"^metrics_token: .*metrics_port"):
        hooks.when_ready(server)
    assert hooks._Settings.metrics_server is None
    with pytest.raises(OSError):
        get(master_port)


def test_on_exit_leaves_multiprocess_mode(hooks: ModuleType, server: FakeServer) -> None:
    hooks.on_exit(server)
    assert multiprocess.active_directory() is None


# -- configure ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "port",
    [
        pytest.param(0, id="zero"),
        pytest.param(-1, id="negative"),
        pytest.param(65536, id="too-big"),
    ],
)
def test_configure_refuses_a_bad_port(port: int, hooks: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"^metrics_port"):
        hooks.configure(metrics_port=port)
    assert hooks._Settings.metrics_port is None


def test_configure_refuses_a_bad_port_from_the_environment(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_PORT", "ninety")
    with pytest.raises(ValueError, match=r"^metrics_port"):
        hooks.configure()


def test_configure_reads_port_and_address_from_the_environment(
    hooks: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_PORT", "9464")
    monkeypatch.setenv("ML_WSGI_METRICS_ADDRESS", "0.0.0.0")
    hooks.configure()
    assert (hooks._Settings.metrics_port, hooks._Settings.metrics_address) == (9464, "0.0.0.0")


@pytest.mark.parametrize(
    ("setting", "options"),
    [
        pytest.param("metrics_path", {"metrics_path": "metrics"}, id="metrics_path"),
        pytest.param("namespace", {"namespace": "9lives"}, id="namespace"),
        pytest.param("const_labels", {"const_labels": {"route": "x"}}, id="const_labels"),
        pytest.param("duration_buckets", {"duration_buckets": [2, 1]}, id="duration_buckets"),
        pytest.param("metrics_token", {"metrics_token": ""}, id="metrics_token"),
        pytest.param(
            "metrics_allowed_networks",
            {"metrics_allowed_networks": ["nope"]},
            id="metrics_allowed_networks",
        ),
    ],
)
def test_configure_refuses_bad_middleware_options(
    setting: str, options: dict[str, Any], hooks: ModuleType
) -> None:
    with pytest.raises(ValueError, match=rf"^{setting}\b"):
        hooks.configure(**options)
    assert hooks._Settings.middleware == {}


def test_configure_refuses_an_unknown_option(hooks: ModuleType) -> None:
    with pytest.raises(ValueError, match=r"configure: unknown option.*metrics_pth"):
        hooks.configure(metrics_pth="/metrics")


@pytest.mark.parametrize("port", ["9100", 9100.0, True, 0, 65536])
def test_configure_refuses_a_bad_metrics_port(hooks: ModuleType, port: object) -> None:
    with pytest.raises(ValueError, match="metrics_port"):
        hooks.configure(metrics_port=port)


def test_configure_registers_nothing(hooks: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    from prometheus_client import REGISTRY

    before = set(REGISTRY._names_to_collectors)
    hooks.configure(namespace="probe", metrics_path="/-/metrics")
    assert set(REGISTRY._names_to_collectors) == before
    assert hooks._Settings.middleware == {"namespace": "probe", "metrics_path": "/-/metrics"}
    assert not list(Path(hooks._directory).glob("*.db"))
