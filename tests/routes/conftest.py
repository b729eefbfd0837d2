"""Shared fixtures: drive a WSGI app once and see which route its adapter named.

The environ is the one ``tests/conftest.py`` builds (its ``environ`` fixture).
"""

from __future__ import annotations

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


@pytest.fixture
def new_environ(
    environ: Callable[..., dict[str, Any]],
) -> Callable[..., tuple[dict[str, Any], Recorder]]:
    """``new_environ(path, method="GET", script_name="") -> (environ, recorder)``: an environ
    carrying a fresh :class:`Recorder` under ``REQUEST_KEY``."""

    def recorded_environ(
        path: str, method: str = "GET", script_name: str = ""
    ) -> tuple[dict[str, Any], Recorder]:
        env = environ(path, method, script_name=script_name)
        recorder = env[REQUEST_KEY] = Recorder()
        return env, recorder

    return recorded_environ


@pytest.fixture
def call(new_environ: Callable[..., tuple[dict[str, Any], Recorder]]) -> Callable[..., Result]:
    """``call(app, path, method="GET", script_name="", *, record=True) -> Result``.

    Runs one request through ``app``, closing the response. With ``record`` a recorder stands
    in for the middleware; without, the environ is bare (for an app wrapped in the real
    ``MetricsMiddleware``, which skips requests it finds already measured).
    """

    def call_app(
        app: Callable[..., Any],
        path: str,
        method: str = "GET",
        script_name: str = "",
        *,
        record: bool = True,
    ) -> Result:
        environ, recorder = new_environ(path, method, script_name)
        if not record:
            del environ[REQUEST_KEY]
        statuses: list[str] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
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

    return call_app
