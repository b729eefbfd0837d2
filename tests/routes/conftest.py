"""Shared fixtures: drive a WSGI app once and see which route its adapter named.

The environ is the one ``tests/conftest.py`` builds (its ``environ`` fixture). ``checks`` holds
what every adapter does; each framework's module builds its ``app`` on the real router, names
its ``ADAPTER`` and the ``ITEM_ROUTE`` of ``/items/<id>``, and keeps its router's specifics.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import UNMATCHED, MetricsMiddleware
from ml_wsgi_metrics.routes import REQUEST_KEY


class Recorder:
    """Stands in for the middleware's per-request object: keeps every route it is given."""

    __slots__ = ("routes",)

    def __init__(self) -> None:
        self.routes: list[str] = []

    def set_route(self, route: str, script_name: str | None = None) -> None:
        """Keeps what the adapter saw: its ``SCRIPT_NAME``, then the template."""
        self.routes.append((script_name or "") + route)


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


# -- what every adapter does ------------------------------------------------------------------


@dataclass(frozen=True)
class AdapterChecks:
    """What every route adapter does, checked on one framework's ``app`` (its real router).

    :param adapter: the adapter's name, as ``install_adapter`` and the middleware give it.
    :param item: the template naming the app's ``/items/<id>`` route.
    """

    app: Any
    call: Callable[..., Result]
    adapter: str
    item: str

    def named(self, path: str, method: str, status: int, route: str) -> None:
        """``method path`` answers ``status`` and names ``route``, once."""
        result = self.call(self.app, path, method)
        assert result.status == status
        assert result.routes == [route]

    def not_named(self, path: str, method: str = "GET", status: int = 404) -> None:
        """``method path`` answers ``status`` and names no route."""
        result = self.call(self.app, path, method)
        assert result.status == status
        assert result.routes == []

    def ids_share_one_template(self) -> None:
        routes = {tuple(self.call(self.app, f"/items/{i}").routes) for i in (1, 2, 300)}
        assert routes == {(self.item,)}

    def script_name_prefixes_the_template(self) -> None:
        result = self.call(self.app, "/items/7", script_name="/svc")
        assert (result.status, result.routes) == (200, ["/svc" + self.item])

    def metrics_middleware_counts_ids_under_one_template(self) -> None:
        """Through the real ``MetricsMiddleware``: ids under the template, a miss unmatched."""
        registry = CollectorRegistry()
        wrapped = MetricsMiddleware(self.app, registry=registry)
        assert wrapped.adapter == self.adapter
        for i in range(3):
            assert self.call(wrapped, f"/items/{i}", record=False).status == 200
        assert self.call(wrapped, "/nope", record=False).status == 404

        def count(route: str, status: str) -> float | None:
            labels = {"method": "GET", "route": route, "status": status}
            return registry.get_sample_value("http_requests_total", labels)

        assert count(self.item, "200") == 3
        assert count(UNMATCHED, "404") == 1


@pytest.fixture
def checks(app: Any, call: Callable[..., Result], request: pytest.FixtureRequest) -> AdapterChecks:
    """:class:`AdapterChecks` on the module's ``app`` fixture, for its ``ADAPTER`` named by
    ``ITEM_ROUTE``."""
    return AdapterChecks(app, call, request.module.ADAPTER, request.module.ITEM_ROUTE)
