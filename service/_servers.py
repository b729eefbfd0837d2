"""gunicorn and Prometheus as child processes: what ``python -m service.demo`` starts.

Each server runs in its own process group (a new session: a Ctrl-C in the terminal reaches
only the parent, which then stops the children), binds 127.0.0.1 only, logs to a file, is
polled until it answers (never a fixed sleep) and is stopped as a whole group: SIGTERM, then
SIGKILL. A server that does not start is stopped before the error propagates, with the tail of
its log in the error's notes.

    with Gunicorn("service.app:app", port=8000, log_path=tmp / "gunicorn.log") as service, \\
         Prometheus(config_file, port=9090, storage=tmp / "data",
                    log_path=tmp / "prometheus.log") as prometheus:
        prometheus.wait_for_targets(["127.0.0.1:8000"])
        prometheus.query("sum by (route) (rate(http_requests_total[1m]))")

The tests start the same servers: ``tests/support.py`` builds its ``GunicornServer``,
``UwsgiServer`` and ``PrometheusServer`` on these classes and adds what only tests need (free
ports, a clean environment, temporary files, worker pids). The launcher lives here, beside the
demo, because the demo runs from a checkout without the tests, while the tests depend on the
service anyway.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = [
    "REPO",
    "Gunicorn",
    "Prometheus",
    "free_port",
    "http_request",
    "port_is_free",
    "prometheus_config",
    "wait_until",
    "write_config",
]

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")
P = TypeVar("P", bound="_Process")

#: How much of a log goes into the notes of a start-up error.
_LOG_TAIL = 6000


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(port: int) -> bool:
    """Whether 127.0.0.1:``port`` can be bound now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(
    condition: Callable[[], T], timeout: float, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something true; return it, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(message or f"condition not met within {timeout} s")
        time.sleep(interval)


def prometheus_config(
    targets: Sequence[str],
    *,
    job: str,
    scrape_interval: str,
    evaluation_interval: str | None = None,
    scrape_timeout: str | None = None,
    metrics_path: str = "/metrics",
    rule_files: Sequence[str] = (),
) -> dict[str, Any]:
    """A Prometheus configuration scraping ``targets`` as one job: the dict to write with
    :func:`write_config`."""
    interval = {"scrape_interval": scrape_interval}
    if scrape_timeout is not None:
        interval["scrape_timeout"] = scrape_timeout
    interval["evaluation_interval"] = evaluation_interval or scrape_interval
    return {
        "global": interval,
        "rule_files": list(rule_files),
        "scrape_configs": [
            {
                "job_name": job,
                "metrics_path": metrics_path,
                "static_configs": [{"targets": list(targets)}],
            }
        ],
    }


def write_config(path: str | os.PathLike[str], config: Mapping[str, Any]) -> None:
    """Write a Prometheus configuration as YAML (JSON is YAML: no YAML library needed)."""
    Path(path).write_text(json.dumps(config, indent=2) + "\n")


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


class _Process:
    """A child in its own process group, logging to a file, stopped as a group.

    A subclass gives :meth:`_command` and :meth:`_ready`: ``__enter__`` starts the command and
    polls ``_ready`` every ``poll_interval`` s until it is true (or ``startup_timeout`` passed,
    or the child exited); ``__exit__`` stops the group.
    """

    name = "process"
    poll_interval = 0.05

    def __init__(
        self,
        log_path: str | os.PathLike[str],
        *,
        cwd: str | os.PathLike[str] | None = None,
        env: Mapping[str, str] | None = None,
        startup_timeout: float,
        stop_timeout: float = 10.0,
    ) -> None:
        self.log_path = Path(log_path)
        self.cwd = cwd
        self.env = dict(env) if env is not None else None
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The child's pid (also its process group id)."""
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def log(self) -> str:
        """What the child wrote so far ("" before it started)."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready(self) -> bool:
        raise NotImplementedError

    def _not_ready(self) -> str:
        """The message of the TimeoutError when ``_ready`` stayed false."""
        return f"{self.name} did not start within {self.startup_timeout} s"

    def _start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self._command(),
                cwd=self.cwd,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )

    def _add_log(self, error: BaseException) -> None:
        """Put the tail of the log into ``error``'s notes (once)."""
        header = f"{self.name} log ({self.log_path}):"
        if not any(note.startswith(header) for note in getattr(error, "__notes__", ())):
            error.add_note(f"{header}\n{self.log()[-_LOG_TAIL:]}")

    def check_running(self) -> None:
        """Raise RuntimeError, the log's tail in its notes, if the child has exited."""
        assert self.process is not None, f"{self.name} is not running"
        if self.process.poll() is not None:
            error = RuntimeError(f"{self.name} exited with {self.process.returncode}")
            self._add_log(error)
            raise error

    def _answers(self) -> bool:
        self.check_running()
        return self._ready()

    def __enter__(self: P) -> P:
        try:
            self._start()
            wait_until(self._answers, self.startup_timeout, self.poll_interval, self._not_ready())
        except BaseException as error:
            if self.process is not None:
                self._add_log(error)
            self.__exit__(type(error), error, error.__traceback__)
            raise
        return self

    def stop(self) -> None:
        """SIGTERM the process group, wait up to ``stop_timeout`` s for the child, then SIGKILL
        the group (workers left behind, if any); idempotent."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(self.stop_timeout)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class Gunicorn(_Process):
    """``python -m gunicorn -c <config> <app>`` on 127.0.0.1:``port``, run in ``cwd``.

    Its environment is ``environ`` (default: this process's), then ``env`` (a ``None`` value
    removes a variable), then ``BIND`` and ``WEB_CONCURRENCY`` from ``port`` and ``workers``.
    ``__enter__`` returns once ``ready_path`` answers, whatever the status.
    """

    name = "gunicorn"

    def __init__(
        self,
        app: str = "service.app:app",
        *,
        port: int,
        workers: int = 4,
        env: Mapping[str, str | None] | None = None,
        environ: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str],
        config: str | os.PathLike[str] = REPO / "gunicorn.conf.py",
        cwd: str | os.PathLike[str] = REPO,
        ready_path: str = "/healthz",
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.app = app
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"
        environment = dict(os.environ if environ is None else environ)
        for variable, value in (env or {}).items():
            if value is None:
                environment.pop(variable, None)
            else:
                environment[variable] = value
        environment.update(BIND=self.address, WEB_CONCURRENCY=str(workers))
        super().__init__(
            log_path,
            cwd=cwd,
            env=environment,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.config = os.fspath(config)
        self.ready_path = ready_path

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "gunicorn", "-c", self.config, self.app]

    def _ready(self) -> bool:
        try:
            http_request(self.url + self.ready_path, timeout=5)
        except OSError:
            return False
        return True

    def _not_ready(self) -> str:
        return f"gunicorn did not answer on {self.url}"


class Prometheus(_Process):
    """A real Prometheus with ``config_file``, storage in ``storage``, on 127.0.0.1:``port``.

    Started with ``--web.enable-lifecycle``, in the config file's directory. ``__enter__``
    returns once it is ready; call :meth:`wait_for_targets` before querying (the first scrape
    comes ~6 s after start).
    """

    name = "prometheus"
    poll_interval = 0.2

    def __init__(
        self,
        config_file: str | os.PathLike[str],
        *,
        port: int,
        storage: str | os.PathLike[str],
        log_path: str | os.PathLike[str],
        binary: str = "prometheus",
        extra_args: Sequence[str] = (),
        startup_timeout: float = 30.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.config_file = Path(config_file)
        super().__init__(
            log_path,
            cwd=self.config_file.parent,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
        )
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.storage = Path(storage)
        self.binary = binary
        self.extra_args = list(extra_args)

    def _command(self) -> list[str]:
        return [
            self.binary,
            f"--config.file={self.config_file}",
            f"--storage.tsdb.path={self.storage}",
            f"--web.listen-address=127.0.0.1:{self.port}",
            "--web.enable-lifecycle",
            *self.extra_args,
        ]

    def _ready(self) -> bool:
        try:
            return http_request(self.url + "/-/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def _not_ready(self) -> str:
        return f"Prometheus did not answer on {self.url}"

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_request(url, timeout=10)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {status} {body[:500]!r}")
        return answer["data"]

    def targets_up(self, targets: Sequence[str]) -> bool:
        """Whether every target (``host:port``) has been scraped successfully."""
        self.check_running()
        try:
            active = self.api("targets", state="active")["activeTargets"]
        except (OSError, RuntimeError, ValueError):
            return False
        up = {t["labels"].get("instance") for t in active if t["health"] == "up"}
        return up >= set(targets)

    def wait_for_targets(self, targets: Sequence[str], timeout: float = 60.0) -> None:
        """Poll until every target has been scraped successfully."""
        wait_until(
            lambda: self.targets_up(targets),
            timeout,
            interval=0.2,
            message=f"Prometheus targets not up within {timeout} s: {list(targets)}",
        )

    def query(self, promql: str, time: float | None = None) -> list[dict[str, Any]]:
        """An instant query (now, or at ``time``): ``[{"metric": {...}, "value": [t, "v"]}]``."""
        params = {"query": promql}
        if time is not None:
            params["time"] = str(time)
        data = self.api("query", **params)
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    def values(self, promql: str, *labels: str) -> dict[tuple[str, ...], float]:
        """An instant query's values keyed by the given labels' values."""
        return {
            tuple(r["metric"].get(label, "") for label in labels): float(r["value"][1])
            for r in self.query(promql)
        }

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing)."""
        return list(self.api("alerts")["alerts"])
