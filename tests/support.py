"""Helpers for tests that run real servers: gunicorn, Prometheus, HTTP clients.

Every server starts in its own process group, binds 127.0.0.1 only, is polled until it answers
(never a fixed sleep) and is stopped on exit, always: SIGTERM to the group, then SIGKILL.

    from support import GunicornServer, PrometheusServer

    with GunicornServer(env={"GUNICORN_MAX_REQUESTS": "20"}) as server:
        status, body = http_request(server.url + "/items/1")
        with PrometheusServer([server.address]) as prometheus:
            prometheus.query("sum(http_requests_total)")
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = [
    "REPO",
    "TEST_APP",
    "GunicornServer",
    "PrometheusServer",
    "free_port",
    "http_request",
    "listening_addresses",
    "parse_samples",
    "send_all",
    "tcp_sockets",
    "wait_until",
]

REPO = Path(__file__).resolve().parent.parent
#: The tiny Flask app of ``tests/apps/flask_app.py``, as gunicorn names it.
TEST_APP = "tests.apps.flask_app:app"

#: Settings a test must never inherit from the environment it runs in by accident.
_INHERITED_SETTINGS = (
    "BIND",
    "WEB_CONCURRENCY",
    "SERVICE_NAME",
    "PROMETHEUS_MULTIPROC_DIR",
    "prometheus_multiproc_dir",
    "GUNICORN_CMD_ARGS",
)
_INHERITED_PREFIXES = ("GUNICORN_", "ML_WSGI_METRICS_")

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(
    condition: Callable[[], T], timeout: float, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something true; return it, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


class _Received:
    """A finished exchange's bytes, shaped like the socket ``http.client`` parses from."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return io.BytesIO(self._data)


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[int, bytes]:
    """One request on a fresh connection; returns ``(status, body)`` once the server closed it.

    Waiting for the server to close the connection, not just for the last body byte, matters
    for exact counts: a WSGI server closes the response iterable (where the middleware records
    the request) after sending the body and before closing the connection. Unlike urllib, 4xx
    and 5xx answers are returned, not raised; network errors raise.
    """
    parts = urllib.parse.urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    lines = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", "Connection: close"]
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body or b'')}")
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    request = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n" + (body or b"")
    with socket.create_connection((parts.hostname, parts.port), timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    response = http.client.HTTPResponse(_Received(b"".join(chunks)), method=method)  # type: ignore[arg-type]
    response.begin()
    return response.status, response.read()


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
    work: queue.SimpleQueue[tuple[str, str, bytes | None]] = queue.SimpleQueue()
    for request in requests:
        work.put(request)
    results: list[tuple[str, str, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def client() -> None:
        while not errors:
            try:
                method, path, body = work.get_nowait()
            except queue.Empty:
                return
            try:
                status, _ = http_request(base_url + path, method, body, timeout=timeout)
            except BaseException as error:
                errors.append(error)
                return
            with lock:
                results.append((method, path, status))

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


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


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def _clean_environment(overrides: Mapping[str, str | None]) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in _INHERITED_SETTINGS and not name.startswith(_INHERITED_PREFIXES)
    }
    for name, value in overrides.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def _stop_group(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the process group, wait up to ``grace`` s for its leader, then SIGKILL the group."""
    try:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(grace)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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


class GunicornServer:
    """``python -m gunicorn -c <repo>/gunicorn.conf.py <app>`` for the length of a ``with``.

    :param app: the WSGI app to serve, as gunicorn names it.
    :param env: environment overrides for the server (``None`` removes a variable). Settings of
        the repo's config (``WEB_CONCURRENCY``, ``GUNICORN_*``, ``ML_WSGI_METRICS_*``,
        ``PROMETHEUS_MULTIPROC_DIR``...) are never inherited from the test's environment.
    :param workers: ``WEB_CONCURRENCY``.
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
        config: str | os.PathLike[str] = REPO / "gunicorn.conf.py",
        cwd: str | os.PathLike[str] = REPO,
        ready_path: str = "/metrics",
        startup_timeout: float = 30.0,
        stop_timeout: float = 15.0,
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.app = app
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.env = _clean_environment(
            {"BIND": self.address, "WEB_CONCURRENCY": str(workers), **(env or {})}
        )
        self.config = os.fspath(config)
        self.cwd = os.fspath(cwd)
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self._own_log = log_path is None
        if log_path is None:
            handle, log_path = tempfile.mkstemp(prefix="gunicorn-", suffix=".log")
            os.close(handle)
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The master's pid (also the process group id)."""
        assert self.process is not None, "the server is not running"
        return self.process.pid

    def worker_pids(self) -> list[int]:
        """The master's live children: its workers."""
        return _children(self.pid)

    def worker_serving(self, client_port: int) -> int | None:
        """The worker holding the connection that a client opened from ``client_port``."""
        inodes = {
            entry.inode
            for entry in tcp_sockets()
            if entry.local == ("127.0.0.1", self.port) and entry.remote[1] == client_port
        }
        for pid in self.worker_pids():
            if inodes & _socket_inodes(pid):
                return pid
        return None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> GunicornServer:
        command = [sys.executable, "-m", "gunicorn", "-c", self.config, self.app]
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command,
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as a whole
            )
        try:
            wait_until(
                self._answers,
                self.startup_timeout,
                message=f"gunicorn did not answer on {self.url}",
            )
        except BaseException as error:
            error.add_note(f"gunicorn log ({self.log_path}):\n{self.log()[-6000:]}")
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.process.returncode}")
        try:
            http_request(self.url + self.ready_path, timeout=5)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop the whole process group (idempotent)."""
        if self.process is not None:
            _stop_group(self.process, self.stop_timeout)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        try:
            self.stop()
        finally:
            if self._own_log:
                self.log_path.unlink(missing_ok=True)


class PrometheusServer:
    """A real Prometheus scraping ``targets`` every ``scrape_interval``, for a ``with``.

    Its storage lives in a temporary directory removed on exit. ``__enter__`` returns once every
    target has been scraped successfully (the first scrape comes about 6 s after start in 2.42).

    :param targets: ``host:port`` of each target, all given up front.
    """

    def __init__(
        self,
        targets: Sequence[str],
        *,
        job: str = "app",
        metrics_path: str = "/metrics",
        scrape_interval: str = "1s",
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
        self.rule_files = [os.fspath(path) for path in rule_files]
        self.extra_args = list(extra_args)
        self.binary = binary
        self.startup_timeout = startup_timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.directory: str | None = None
        self.process: subprocess.Popen[bytes] | None = None

    def _config(self) -> dict[str, Any]:
        return {  # JSON is YAML: no YAML library needed
            "global": {
                "scrape_interval": self.scrape_interval,
                "evaluation_interval": self.scrape_interval,
            },
            "rule_files": self.rule_files,
            "scrape_configs": [
                {
                    "job_name": self.job,
                    "metrics_path": self.metrics_path,
                    "static_configs": [{"targets": self.targets}],
                }
            ],
        }

    @property
    def log_path(self) -> Path:
        assert self.directory is not None
        return Path(self.directory, "prometheus.log")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def __enter__(self) -> PrometheusServer:
        self.directory = tempfile.mkdtemp(prefix="prometheus-")
        try:
            config = Path(self.directory, "prometheus.yml")
            config.write_text(json.dumps(self._config(), indent=2))
            command = [
                self.binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={Path(self.directory, 'data')}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                *self.extra_args,
            ]
            with open(self.log_path, "wb") as log:
                self.process = subprocess.Popen(
                    command,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            wait_until(
                self._all_targets_up,
                self.startup_timeout,
                interval=0.2,
                message=f"Prometheus targets not all up: {self.targets}",
            )
        except BaseException as error:
            if self.process is not None:
                error.add_note(f"prometheus log:\n{self.log()[-6000:]}")
            self.stop()
            raise
        return self

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``; the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_request(url, timeout=10)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {status} {body[:500]!r}")
        return answer["data"]

    def _all_targets_up(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"prometheus exited with {self.process.returncode}")
        try:
            targets = self.api("targets", state="active")["activeTargets"]
        except (OSError, RuntimeError, ValueError):
            return False
        up = {target["labels"]["instance"] for target in targets if target["health"] == "up"}
        return up >= set(self.targets)

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        params = {"query": promql}
        if time is not None:
            params["time"] = str(time)
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, promql: str) -> float | None:
        """The single value of an instant query, or ``None`` when it returns nothing."""
        result = self.query(promql)
        if not result:
            return None
        if len(result) != 1:
            raise ValueError(f"{promql!r} returned {len(result)} series")
        return float(result[0]["value"][1])

    def stop(self) -> None:
        """Stop Prometheus and remove its storage (idempotent)."""
        try:
            if self.process is not None:
                _stop_group(self.process, 10.0)
        finally:
            if self.directory is not None:
                shutil.rmtree(self.directory, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()
