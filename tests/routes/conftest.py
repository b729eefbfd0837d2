"""Shared fixtures: drive a WSGI app once and see which route its adapter named."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from ml_wsgi_metrics.routes import REQUEST_KEY


class Recorder:
    """Stands in for the middleware's per-request object: keeps every route it is given."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: list[str] = []

    def set_route(self, route: str) -> None:
        self.routes.append(route)


@dataclass
class Result:
    status: int
    routes: list[str] = field(default_factory=list)
    body: bytes = b""


def make_environ(path: str, method: str = "GET", script_name: str = "") -> dict[str, Any]:
    """A minimal PEP 3333 environ for ``method path`` (no query, no body)."""
    return {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "SERVER_NAME": "localhost",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "HTTP_HOST": "localhost",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": io.StringIO(),
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }


def recorded_environ(
    path: str, method: str = "GET", script_name: str = ""
) -> tuple[dict[str, Any], Recorder]:
    """An environ carrying a fresh :class:`Recorder` under ``REQUEST_KEY``."""
    environ = make_environ(path, method, script_name)
    recorder = environ[REQUEST_KEY] = Recorder()
    return environ, recorder


def call_app(
    app: Callable[..., Any],
    path: str,
    method: str = "GET",
    script_name: str = "",
    *,
    record: bool = True,
) -> Result:
    """Run one request through ``app``, closing the response.

    With ``record`` a recorder stands in for the middleware; without, the environ is bare
    (for an app wrapped in the real ``MetricsMiddleware``, which skips requests it finds
    already measured).
    """
    environ, recorder = recorded_environ(path, method, script_name)
    if not record:
        del environ[REQUEST_KEY]
    statuses: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        statuses.append(status)
        return lambda data: None

    body = app(environ, start_response)
    try:
        data = b"".join(body)
    finally:
        close = getattr(body, "close", None)
        if close is not None:
            close()
    return Result(int(statuses[-1].split()[0]), recorder.routes, data)


@pytest.fixture
def call() -> Callable[..., Result]:
    """``call(app, path, method="GET", script_name="", *, record=True) -> Result``."""
    return call_app


@pytest.fixture
def new_environ() -> Callable[..., tuple[dict[str, Any], Recorder]]:
    """``new_environ(path, method="GET", script_name="") -> (environ, recorder)``."""
    return recorded_environ
