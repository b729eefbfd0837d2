"""gunicorn and Prometheus as child processes, for the demo (and any test that wants them).

Each server runs in its own process group (a new session: a Ctrl-C in the terminal reaches
only the parent, which then stops the children), binds 127.0.0.1 only, is polled until it
answers (never a fixed sleep) and is stopped as a whole group: SIGTERM, then SIGKILL.

    with Gunicorn("service.app:app", port=8000) as service, \\
         Prometheus(config_file, port=9090, storage=tmp / "data") as prometheus:
        prometheus.wait_for_targets(["127.0.0.1:8000"])
        prometheus.query("sum by (route) (rate(http_requests_total[1m]))")
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

__all__ = ["REPO", "Gunicorn", "Prometheus", "free_port", "port_is_free", "wait_until"]

REPO = Path(__file__).resolve().parent.parent
T = TypeVar("T")


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
    condition: Callable[[], T], timeout: float, interval: float = 0.1, message: str = ""
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


def http_get(url: str, timeout: float = 10.0) -> tuple[int, bytes]:
    """``GET url``: ``(status, body)``, 4xx and 5xx included; network errors raise OSError."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # 127.0.0.1 only
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


class _Process:
    """A child in its own process group, logging to a file, stopped as a group."""

    name = "process"

    def __init__(self, log_path: str | os.PathLike[str]) -> None:
        self.log_path = Path(log_path)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, f"{self.name} is not running"
        return self.process.pid

    def log(self, lines: int = 30) -> str:
        """The last ``lines`` lines of the log."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def _start(
        self, command: Sequence[str], env: Mapping[str, str] | None = None, cwd: Path = REPO
    ) -> None:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                list(command),
                cwd=cwd,
                env=dict(env) if env is not None else None,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as a whole
            )

    def check_running(self) -> None:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.process.returncode}; its log:\n{self.log()}"
            )

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, wait up to ``grace`` s, then SIGKILL it (idempotent)."""
        process = self.process
        if process is None:
            return
        try:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(grace)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)  # workers left behind, if any
            process.wait()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


class Gunicorn(_Process):
    """``python -m gunicorn -c <repo>/gunicorn.conf.py <app>`` on 127.0.0.1:``port``.

    ``env`` is added to this process's environment (``BIND`` and ``WEB_CONCURRENCY`` are set
    from ``port`` and ``workers``). ``__enter__`` returns once ``ready_path`` answers.
    """

    name = "gunicorn"

    def __init__(
        self,
        app: str = "service.app:app",
        *,
        port: int,
        workers: int = 4,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str],
        ready_path: str = "/healthz",
        startup_timeout: float = 60.0,
    ) -> None:
        super().__init__(log_path)
        self.app = app
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.url = f"http://{self.address}"
        self.env = {
            **os.environ,
            **(env or {}),
            "BIND": self.address,
            "WEB_CONCURRENCY": str(workers),
        }
        self.ready_path = ready_path
        self.startup_timeout = startup_timeout

    def __enter__(self) -> Gunicorn:
        config = REPO / "gunicorn.conf.py"
        self._start([sys.executable, "-m", "gunicorn", "-c", str(config), self.app], self.env)
        try:
            wait_until(self._answers, self.startup_timeout, message=f"no answer from {self.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def _answers(self) -> bool:
        self.check_running()
        try:
            http_get(self.url + self.ready_path, timeout=5)
        except OSError:
            return False
        return True


class Prometheus(_Process):
    """A real Prometheus with ``config_file``, storage in ``storage``, on 127.0.0.1:``port``.

    Started with ``--web.enable-lifecycle``. ``__enter__`` returns once the HTTP API answers;
    call :meth:`wait_for_targets` before querying (the first scrape comes ~6 s after start).
    """

    name = "prometheus"

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
    ) -> None:
        super().__init__(log_path)
        self.config_file = Path(config_file)
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.storage = Path(storage)
        self.binary = binary
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> Prometheus:
        self._start(
            [
                self.binary,
                f"--config.file={self.config_file}",
                f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--web.enable-lifecycle",
                *self.extra_args,
            ],
            cwd=self.config_file.parent,
        )
        try:
            wait_until(self._ready, self.startup_timeout, message=f"no answer from {self.url}")
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        self.check_running()
        try:
            return http_get(self.url + "/-/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        """``GET /api/v1/<path>``: the ``data`` of a successful answer."""
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        status, body = http_get(url)
        answer = json.loads(body)
        if status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"Prometheus {path}: {status} {body[:500]!r}")
        return answer["data"]

    def targets_up(self, targets: Sequence[str]) -> bool:
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

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        data = self.api("query", query=promql)
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
