"""Shared fixtures: a fresh registry, an isolated multiprocess directory, tiny WSGI apps.

Helpers call a WSGI app directly with a hand-built environ and always close the response,
as a server does (werkzeug's test client leaves closing to the caller).
"""

from __future__ import annotations

import io
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client.values
import pytest
from prometheus_client import CollectorRegistry
from support import require_speedups, require_tool

from ml_wsgi_metrics import _errors, _response, _slots, middleware, multiprocess
from ml_wsgi_metrics._series import RouteSeries
from ml_wsgi_metrics.exposition import scrape_registry

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # A run stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: fixtures and
    # context managers stop the servers they started instead of leaving them running.
    signal.signal(signal.SIGTERM, _interrupted)
    config.addinivalue_line(
        "markers",
        "requires_tool(name, ...): the commands a test runs; skipped when one is missing, "
        "failed under CI=true (support.require_tool)",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """``requires_tool`` marks, checked before the test's fixtures (a module-scoped server
    needs the tool as much as the test does)."""
    for mark in item.iter_markers("requires_tool"):
        for name in mark.args:
            require_tool(name)


@pytest.fixture(autouse=True)
def _no_errors_carried_over() -> Iterator[None]:
    """Errors a test leaves unexported are that test's: never exported into the next one's
    metrics (a process exports kept errors through its next exporter)."""
    yield
    _errors._Channel.unexported.clear()
    _errors._Channel.exporter = None


def make_environ(
    path: str = "/",
    method: str = "GET",
    *,
    script_name: str = "",
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    remote_addr: str = "127.0.0.1",
    **extra: Any,
) -> dict[str, Any]:
    """A PEP 3333 environ for ``method path``; ``headers`` become ``HTTP_*`` keys."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": remote_addr,
        "HTTP_HOST": "localhost",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    if body:
        environ["CONTENT_LENGTH"] = str(len(body))
    for name, value in (headers or {}).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    environ.update(extra)
    return environ


@dataclass
class Response:
    """What a server saw: the last status and headers given, the body, how it was closed."""

    status: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    exc_info: Any = None

    @property
    def code(self) -> int:
        return int(self.status.split()[0])

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k.lower() == name.lower()), None)

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.status, self.headers, self.exc_info = status, headers, exc_info
        return lambda data: None


def call_app(app: WSGIApp, path: str = "/", method: str = "GET", **environ: Any) -> Response:
    """Run one request through ``app`` as a server would: iterate, then always close."""
    response = Response()
    iterable = app(make_environ(path, method, **environ), response.start_response)
    try:
        response.body = b"".join(iterable)
    finally:
        close = getattr(iterable, "close", None)
        if close is not None:
            close()
    return response


class _BrokenStore:
    """A cell's store that fails every write, as an instrumentation bug would."""

    def __getitem__(self, key: object) -> float:
        return 0.0

    def __setitem__(self, key: object, value: float) -> None:
        raise RuntimeError("instrumentation bug")


BROKEN_CELL = (_BrokenStore(), 0)


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """A sample's value as a scrape sees it (merged in multiprocess mode), 0 when absent."""
    return scrape_registry(registry).get_sample_value(name, labels) or 0.0


def label_values(registry: CollectorRegistry, name: str, label: str) -> set[str]:
    """Every value of ``label`` among the scraped samples called ``name``."""
    return {
        s.labels[label]
        for metric in scrape_registry(registry).collect()
        for s in metric.samples
        if s.name == name and label in s.labels
    }


# -- tiny WSGI apps -------------------------------------------------------------------------


def hello_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """200 with ``hello``; ``/status/<code>`` answers that status instead."""
    path = environ["PATH_INFO"]
    status = "200 OK"
    if path.startswith("/status/"):
        status = f"{path.rsplit('/', 1)[1]} Whatever"
    body = b"hello"
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


def echo_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    """Answers with the request body."""
    length = int(environ.get("CONTENT_LENGTH") or 0)
    body = environ["wsgi.input"].read(length)
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body]


def path_route(environ: dict[str, Any]) -> str | None:
    """A ``route_resolver``: the path is the template, except under ``/unknown``."""
    path = environ["PATH_INFO"]
    return None if path.startswith("/unknown") else path


# -- fixtures -------------------------------------------------------------------------------


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def multiprocess_dir(tmp_path: Path) -> Iterator[Path]:
    """Multiprocess mode in a fresh directory; the value class is always restored after."""
    value_class = prometheus_client.values.ValueClass
    directory = tmp_path / "multiprocess"
    try:
        yield Path(multiprocess.activate(directory))
    finally:
        multiprocess.deactivate()
        assert prometheus_client.values.ValueClass is value_class


class StorageClock:
    """The monotonic clock the storage reads (when to retry a file), moved by hand."""

    def __init__(self) -> None:
        self.now = time.monotonic()

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def storage_clock(monkeypatch: pytest.MonkeyPatch) -> StorageClock:
    """``storage_clock.advance(seconds)``: time passes for the storage's retries only."""
    clock = StorageClock()
    monkeypatch.setattr(_slots, "time", clock)
    return clock


@pytest.fixture(params=[pytest.param(False, id="single"), pytest.param(True, id="multi")])
def mode(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path | None]:
    """Run a test in single-process mode (``None``) and in multiprocess mode (the directory)."""
    if not request.param:
        yield None
        return
    yield request.getfixturevalue("multiprocess_dir")


@pytest.fixture(params=["c", "python"])
def record_implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> type:
    """The middleware's per-request record: the C one (``_speedups``), then the pure-Python one.

    Without the built extension the C run is skipped; under CI (``CI=true``) it fails
    (:func:`support.require_speedups`).
    """
    if request.param == "python":
        implementation: type = _response.PythonTimedResponse
    else:
        implementation = require_speedups().TimedResponse
    monkeypatch.setattr(middleware.MetricsMiddleware, "response_class", implementation)
    return implementation


@pytest.fixture
def break_series(monkeypatch: pytest.MonkeyPatch) -> Callable[..., None]:
    """``break_series(started=..., finished=...)``: every route series then fails when a
    request starts and/or finishes (both records write through the series' cells)."""

    def breaking(*, started: bool, finished: bool) -> None:
        take_cells = RouteSeries._take_cells

        def take_broken_cells(series: RouteSeries) -> None:
            take_cells(series)
            if started:
                series._in_progress = BROKEN_CELL
            if finished:
                series._duration = ((), [BROKEN_CELL], BROKEN_CELL)

        monkeypatch.setattr(RouteSeries, "_take_cells", take_broken_cells)

    return breaking


@pytest.fixture
def call() -> Callable[..., Response]:
    """``call(app, path="/", method="GET", **environ) -> Response`` (closed, like a server)."""
    return call_app


@pytest.fixture
def environ() -> Callable[..., dict[str, Any]]:
    """``environ(path="/", method="GET", *, script_name, body, headers, ...) -> environ``."""
    return make_environ


@pytest.fixture(name="sample")
def sample_fixture() -> Callable[..., float]:
    """``sample(registry, name, **labels) -> value`` as scraped, 0 when absent."""
    return sample


@pytest.fixture(name="label_values")
def label_values_fixture() -> Callable[..., set[str]]:
    """``label_values(registry, sample_name, label) -> the set of values scraped``."""
    return label_values


@pytest.fixture
def hello() -> WSGIApp:
    """200 ``hello`` (Content-Length 5); ``/status/<code>`` answers that status."""
    return hello_app


@pytest.fixture
def echo() -> WSGIApp:
    """Answers with the request body."""
    return echo_app


@pytest.fixture(name="path_route")
def path_route_fixture() -> Callable[[dict[str, Any]], str | None]:
    """A ``route_resolver`` naming the path itself, ``None`` under ``/unknown``."""
    return path_route
