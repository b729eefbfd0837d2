"""Helpers for tests that run real servers: gunicorn, uWSGI, Prometheus, HTTP clients.

The servers are started by the demo's launcher (:mod:`service._servers`: each in its own
process group, bound to 127.0.0.1 only, polled until it answers, never a fixed sleep, stopped
on exit, always: SIGTERM to the group, then SIGKILL); this module adds what only tests need: a
free port each, an environment that never inherits the server settings of the one the tests
run in, a temporary log or storage removed on exit, the workers of a pre-fork server, exact
single values of a query.

    from support import GunicornServer, PrometheusServer

    with GunicornServer(env={"GUNICORN_MAX_REQUESTS": "20"}) as server:
        status, body = http_request(server.url + "/items/1")
        with PrometheusServer([server.address]) as prometheus:
            prometheus.query("sum(http_requests_total)")
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any, NamedTuple, NoReturn

from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from service._servers import (
    REPO,
    Gunicorn,
    Prometheus,
    _Process,
    free_port,
    http_request,
    prometheus_config,
    wait_until,
    write_config,
)

__all__ = [
    "ADMIN_TOKEN",
    "FEEDBACK_TOKEN",
    "REPO",
    "SERVICE_TOKENS",
    "TEST_APP",
    "UWSGI",
    "BackOfficeClient",
    "GunicornServer",
    "PrometheusServer",
    "UwsgiServer",
    "bearer",
    "clean_environment",
    "free_port",
    "http_request",
    "listening_addresses",
    "missing_capability",
    "parallel",
    "parse_samples",
    "require_speedups",
    "require_tool",
    "send_all",
    "tcp_sockets",
    "wait_until",
]

#: The tiny Flask app of ``tests/apps/flask_app.py``, as gunicorn names it.
TEST_APP = "tests.apps.flask_app:app"

#: The uWSGI installed beside this Python (``pip install uwsgi``), else the one on ``PATH``.
UWSGI = str(
    Path(sys.executable).with_name("uwsgi")
    if Path(sys.executable).with_name("uwsgi").exists()
    else "uwsgi"
)

#: Settings a test must never inherit from the environment it runs in by accident.
_INHERITED_SETTINGS = (
    "BIND",
    "WEB_CONCURRENCY",
    "WSGI_APP",
    "SERVICE_NAME",
    "PROMETHEUS_MULTIPROC_DIR",
    "prometheus_multiproc_dir",
    "GUNICORN_CMD_ARGS",
)
_INHERITED_PREFIXES = ("GUNICORN_", "ML_WSGI_METRICS_", "CHURN_", "UWSGI_")

#: The churn service's tokens in tests: its back office's (``POST /feedback``) and its
#: administrator's (``POST /pipeline``); ``SERVICE_TOKENS`` is the environment that sets them.
FEEDBACK_TOKEN = "test-feedback-token-0123456789abcdef"
ADMIN_TOKEN = "test-admin-token-0123456789abcdef"
SERVICE_TOKENS = {"CHURN_FEEDBACK_TOKEN": FEEDBACK_TOKEN, "CHURN_ADMIN_TOKEN": ADMIN_TOKEN}
_TOKEN_OF_PATH = {"/feedback": FEEDBACK_TOKEN, "/pipeline": ADMIN_TOKEN}


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header presenting ``token``."""
    return {"Authorization": f"Bearer {token}"}


class BackOfficeClient(FlaskClient):
    """A Flask test client that presents the service's token of the path it calls (the back
    office's to ``/feedback``, the administrator's to ``/pipeline``) unless the request sets
    its own ``Authorization``."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        token = _TOKEN_OF_PATH.get(args[0]) if args and isinstance(args[0], str) else None
        headers = dict(kwargs.get("headers") or {})
        if token is not None and "Authorization" not in headers:
            kwargs["headers"] = headers | bearer(token)
        return super().open(*args, **kwargs)


def clean_environment() -> dict[str, str]:
    """This process's environment less the server settings a test must not pass on."""
    return {
        name: value
        for name, value in os.environ.items()
        if name not in _INHERITED_SETTINGS and not name.startswith(_INHERITED_PREFIXES)
    }


def require_tool(name: str) -> str:
    """The path of the command ``name`` (a name looked up on ``PATH``, or a path).

    When it is missing, the calling test is skipped; under CI (``CI=true``) it fails instead:
    CI installs every tool through the Makefile, and a skip would hide a broken install. Tests
    use it through the ``requires_tool(name, ...)`` mark (see ``conftest.py``), which calls it
    before any fixture of the test is set up.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    missing_capability(f"{name} is not installed (make test-setup installs it)")


def require_speedups() -> ModuleType:
    """``ml_wsgi_metrics._speedups``, the C record. When it is not built the calling test is
    skipped, and fails under CI (``CI=true``), as for a missing tool: CI installs the package,
    which builds it."""
    from ml_wsgi_metrics._response import speedups

    if speedups is None:
        missing_capability("ml_wsgi_metrics._speedups is not built (pip install -e . builds it)")
    return speedups


def missing_capability(message: str) -> NoReturn:
    """Skip the calling test for want of a tool or a privilege; under CI (``CI=true``, where
    everything is installed and the tests run as root) fail instead: a skip would hide it."""
    import pytest

    if os.environ.get("CI", "").lower() in ("true", "1"):
        pytest.fail(f"{message}; CI=true: a missing capability fails the tests", pytrace=False)
    pytest.skip(message)


def parallel(function: Callable[[Any], Any], items: Sequence[Any], threads: int = 4) -> list[Any]:
    """``[function(item) for item in items]`` from ``threads`` threads, in order; the first
    error is raised after every thread stopped (nothing is retried)."""
    results: list[Any] = [None] * len(items)
    errors: list[BaseException] = []
    positions = iter(range(len(items)))
    lock = threading.Lock()

    def work() -> None:
        while not errors:
            with lock:
                index = next(positions, None)
            if index is None:
                return
            try:
                results[index] = function(items[index])
            except BaseException as error:
                errors.append(error)

    workers = [threading.Thread(target=work, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


def send_all(
    base_url: str,
    requests: Iterable[tuple[str, str, bytes | None]],
    clients: int = 8,
    timeout: float = 30.0,
) -> list[tuple[str, str, int]]:
    """Send every ``(method, path, body)`` once from ``clients`` threads; never retry.

    Returns ``(method, path, status)`` for each request. A network error fails the whole call:
    retrying could count a request twice.
    """

    def send(request: tuple[str, str, bytes | None]) -> tuple[str, str, int]:
        method, path, body = request
        status, _ = http_request(base_url + path, method, body, timeout=timeout)
        return method, path, status

    return parallel(send, list(requests), threads=clients)


def parse_samples(text: str) -> list[Sample]:
    """Every sample of a text-format exposition."""
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


class TcpSocket(NamedTuple):
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str  # "0A": listening, "01": established
    inode: int


def _address(field: str) -> tuple[str, int]:
    host, port = field.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        address = socket.inet_ntop(socket.AF_INET, raw[::-1])
    else:  # four little-endian 32-bit words
        words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
        address = socket.inet_ntop(socket.AF_INET6, words)
    return address, int(port, 16)


def tcp_sockets() -> list[TcpSocket]:
    """The machine's TCP sockets (this network namespace), read from ``/proc/net/tcp{,6}``."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                lines = handle.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            found.append(
                TcpSocket(_address(fields[1]), _address(fields[2]), fields[3], int(fields[9]))
            )
    return found


def listening_addresses(port: int) -> set[str]:
    """The addresses a TCP socket listens on at ``port``."""
    return {
        entry.local[0] for entry in tcp_sockets() if entry.state == "0A" and entry.local[1] == port
    }


def _accepted_inode(server_port: int, client_port: int) -> int | None:
    """The inode of the server side of the loopback connection ``client_port -> server_port``
    once a process has accepted it (0 while it waits in the backlog), read from /proc/net/tcp.

    A plain text search: the table holds thousands of TIME_WAIT lines after a busy test.
    """
    key = f"0100007F:{server_port:04X} 0100007F:{client_port:04X} 01 "
    with open("/proc/net/tcp") as handle:
        table = handle.read()
    start = table.find(key)
    if start < 0:
        return None
    line = table[start : table.find("\n", start)]
    inode = int(line.split()[8])  # local remote st queues tr retrnsmt uid timeout inode
    return inode or None


def _holder(inode: int, pids: Sequence[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
    return None


def _children(pid: int) -> list[int]:
    """Pids whose parent is ``pid``, read from ``/proc``."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as handle:
                fields = handle.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid and fields[0] != b"Z":
            found.append(int(entry))
    return sorted(found)


class _TestServer:
    """What tests add to a pre-fork server: its workers, which one holds a connection, and its
    temporary log removed on exit."""

    pid: int
    port: int
    url: str
    workers: int
    log_path: Path
    _own_log: bool

    def worker_pids(self) -> list[int]:
        """The master's live children: its workers."""
        return _children(self.pid)

    def worker_serving(self, client_port: int, pids: Sequence[int] | None = None) -> int | None:
        """The worker holding the connection that a client opened from ``client_port``, or
        ``None`` while none has accepted it; ``pids``: the workers to look at (default: all)."""
        inode = _accepted_inode(self.port, client_port)
        if inode is None:
            return None
        return _holder(inode, self.worker_pids() if pids is None else pids)

    def each_worker(
        self, path: str = "/metrics", timeout: float = 30.0
    ) -> dict[int, tuple[int, bytes]]:
        """``GET path`` answered once by every worker: ``{pid: (status, body)}``.

        One connection per worker is opened and held until a worker has accepted it (a worker
        that handles one request at a time holds the connection it accepted until it answers,
        so the next one goes to another worker); only then is each request sent. Workers of
        one request at a time only (gunicorn sync, uWSGI without threads), none busy.
        """
        connections: list[tuple[http.client.HTTPConnection, int]] = []
        try:
            for _ in range(self.workers):
                sock = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
                connection.sock = sock
                pid = wait_until(
                    functools.partial(self.worker_serving, sock.getsockname()[1]),
                    timeout,
                    interval=0.02,
                    message=f"no worker of {self.url} accepted a connection",
                )
                connections.append((connection, pid))
            pids = [pid for _, pid in connections]
            assert len(set(pids)) == self.workers, f"a worker took two connections: {pids}"
            answers = {}
            for connection, pid in connections:
                connection.request("GET", path, headers={"Connection": "close"})
                response = connection.getresponse()
                answers[pid] = (response.status, response.read())
            return answers
        finally:
            for connection, _ in connections:
                connection.close()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, traceback)  # type: ignore[misc]
        finally:
            if self._own_log:
                self.log_path.unlink(missing_ok=True)


def _temporary_log(prefix: str) -> Path:
    handle, path = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(handle)
    return Path(path)


class GunicornServer(_TestServer, Gunicorn):
    """``python -m gunicorn -c <repo>/gunicorn.conf.py <app>`` for the length of a ``with``.

    :param app: the WSGI app to serve, as gunicorn names it.
    :param env: environment overrides for the server (``None`` removes a variable). Settings of
        the repo's config (``WEB_CONCURRENCY``, ``GUNICORN_*``, ``ML_WSGI_METRICS_*``,
        ``PROMETHEUS_MULTIPROC_DIR``...) are never inherited from the test's environment.
    :param workers: ``WEB_CONCURRENCY``.
    :param port: bind this port (a restarted server keeps its address) instead of a free one.
    :param ready_path: polled until it answers (any status) before ``__enter__`` returns; the
        default, the metrics path, is not counted in the request metrics.
    :param log_path: where stdout and stderr go (default: a temporary file, removed on exit).
    """

    def __init__(
        self,
        app: str = TEST_APP,
        *,
        env: Mapping[str, str | None] | None = None,
        workers: int = 4,
        port: int | None = None,
        config: str | os.PathLike[str] = REPO / "gunicorn.conf.py",
        cwd: str | os.PathLike[str] = REPO,
        ready_path: str = "/metrics",
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self._own_log = log_path is None
        self.workers = workers
        super().__init__(
            app,
            port=free_port() if port is None else port,
            workers=workers,
            env=env,
            environ=clean_environment(),
            log_path=_temporary_log("gunicorn-") if log_path is None else log_path,
            config=config,
            cwd=cwd,
            ready_path=ready_path,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )


class UwsgiServer(_TestServer, _Process):
    """``uwsgi --ini <repo>/uwsgi.ini`` serving ``app`` for the length of a ``with``.

    The real uWSGI (:data:`UWSGI`), in its own process group, on 127.0.0.1; the same settings
    as :class:`GunicornServer` (``WSGI_APP``, ``BIND`` and ``WEB_CONCURRENCY`` from ``app``,
    ``port`` and ``workers``); any uWSGI option through ``env`` as ``UWSGI_<NAME>``
    (``UWSGI_MAX_REQUESTS``, ``UWSGI_LAZY_APPS``...), none inherited from the test's environment.
    """

    name = "uwsgi"

    def __init__(
        self,
        app: str = TEST_APP,
        *,
        env: Mapping[str, str | None] | None = None,
        workers: int = 4,
        port: int | None = None,
        config: str | os.PathLike[str] = REPO / "uwsgi.ini",
        cwd: str | os.PathLike[str] = REPO,
        ready_path: str = "/metrics",
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.port = free_port() if port is None else port
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.config = os.fspath(config)
        self.ready_path = ready_path
        self._own_log = log_path is None
        self.workers = workers
        environment = clean_environment()
        for variable, value in (env or {}).items():
            if value is None:
                environment.pop(variable, None)
            else:
                environment[variable] = value
        environment.update(WSGI_APP=app, BIND=self.address, WEB_CONCURRENCY=str(workers))
        super().__init__(
            _temporary_log("uwsgi-") if log_path is None else log_path,
            cwd=cwd,
            env=environment,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )

    def _command(self) -> list[str]:
        return [UWSGI, "--ini", self.config]

    def _ready(self) -> bool:
        try:
            http_request(self.url + self.ready_path, timeout=5)
        except OSError:
            return False
        return True

    def _not_ready(self) -> str:
        return f"uWSGI did not answer on {self.url}"


class PrometheusServer(Prometheus):
    """A real Prometheus scraping ``targets`` every ``scrape_interval``, for a ``with``.

    Its config, log and storage live in a temporary directory removed on exit. ``__enter__``
    returns once every target has been scraped successfully (the first scrape comes about 6 s
    after start in 2.42).

    :param targets: ``host:port`` of each target, all given up front.
    :param evaluation_interval: of the rules (default: the scrape interval).
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "app",
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
        evaluation_interval: str | None = None,
        rule_files: Sequence[str | os.PathLike[str]] = (),
        extra_args: Sequence[str] = (),
        binary: str = "prometheus",
        startup_timeout: float = 60.0,
    ) -> None:
        if not targets:
            raise ValueError("targets: give at least one host:port")
        self.targets = list(targets)
        self.job = job
        self.metrics_path = metrics_path
        self.scrape_interval = scrape_interval
        self.evaluation_interval = evaluation_interval or scrape_interval
        self.rule_files = [os.fspath(path) for path in rule_files]
        # Named now, made by __enter__ (mkdtemp's way: a random name, mode 0700).
        self.directory = Path(tempfile.gettempdir(), f"prometheus-{os.urandom(8).hex()}")
        self._made_directory = False
        super().__init__(
            self.directory / "prometheus.yml",
            port=free_port(),
            storage=self.directory / "data",
            log_path=self.directory / "prometheus.log",
            binary=binary,
            extra_args=extra_args,
            startup_timeout=startup_timeout,
        )

    def _config(self) -> dict[str, Any]:
        return prometheus_config(
            self.targets,
            job=self.job,
            metrics_path=self.metrics_path,
            scrape_interval=self.scrape_interval,
            evaluation_interval=self.evaluation_interval,
            rule_files=self.rule_files,
        )

    def _start(self) -> None:
        self.directory.mkdir(mode=0o700)
        self._made_directory = True
        write_config(self.config_file, self._config())
        super()._start()

    def _ready(self) -> bool:
        return self.targets_up(self.targets)

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or ``None`` when it returns nothing."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise ValueError(f"{promql!r} returned {len(result)} series")
        return float(result[0]["value"][1])

    def _not_ready(self) -> str:
        return f"Prometheus targets not all up: {self.targets}"

    def stop(self) -> None:
        """Stop Prometheus and remove its directory (idempotent)."""
        try:
            super().stop()
        finally:
            if self._made_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
