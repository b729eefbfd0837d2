"""The Pyramid adapter names ``request.matched_route.pattern`` through a real Pyramid router."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from pyramid.config import Configurator
from pyramid.httpexceptions import HTTPForbidden
from pyramid.request import Request
from pyramid.response import Response
from pyramid.router import Router

from ml_wsgi_metrics.routes import REQUEST_KEY, install_adapter
from ml_wsgi_metrics.routes import pyramid as pyramid_adapter

ADAPTER = "pyramid"
ITEM_ROUTE = "/items/{id:\\d+}"


def ok(request: Request) -> Response:
    return Response("ok")


def seen(request: Request) -> Response:
    """Answers with the routes named so far: naming must precede the view."""
    return Response(",".join(request.environ[REQUEST_KEY].routes))


def crash(request: Request) -> Response:
    raise RuntimeError("boom")


def forbidden(context: Any, request: Request) -> Response:
    return Response("forbidden", status=403)


def deny_root(request: Request) -> object:
    raise HTTPForbidden()


def include_api(config: Configurator) -> None:
    config.add_route("predict", "/models/{name}/predict")
    config.add_view(ok, route_name="predict")


@pytest.fixture
def app() -> Router:
    with Configurator() as config:
        config.add_route("health", "/health")
        config.add_route("item", "/items/{id:\\d+}")
        config.add_route("relative", "legacy/{id}")
        config.add_route("seen", "/seen/{id}")
        config.add_route("crash", "/crash")
        config.add_route("denied", "/denied", factory=deny_root)
        config.add_view(ok, route_name="health")
        config.add_view(ok, route_name="item", request_method="GET")
        config.add_view(ok, route_name="relative")
        config.add_view(seen, route_name="seen")
        config.add_view(crash, route_name="crash")
        config.add_view(ok, route_name="denied")
        config.add_exception_view(forbidden, context=HTTPForbidden)
        config.include(include_api, route_prefix="/api/v1")
        app = config.make_wsgi_app()
    pyramid_adapter.install(app)
    return app


@pytest.mark.parametrize(
    ("path", "method", "status", "route"),
    [
        pytest.param("/health", "GET", 200, "/health", id="static"),
        pytest.param("/items/7", "GET", 200, "/items/{id:\\d+}", id="param"),
        pytest.param("/legacy/7", "GET", 200, "/legacy/{id}", id="pattern-without-slash"),
        pytest.param(
            "/api/v1/models/churn/predict",
            "GET",
            200,
            "/api/v1/models/{name}/predict",
            id="route_prefix",
        ),
        pytest.param("/items/7", "POST", 404, "/items/{id:\\d+}", id="predicate-mismatch"),
        pytest.param("/denied", "GET", 403, "/denied", id="root-factory-raised"),
    ],
)
def test_matched_route_is_named(
    checks: Any, path: str, method: str, status: int, route: str
) -> None:
    checks.named(path, method, status, route)


def test_ids_share_one_template(checks: Any) -> None:
    checks.ids_share_one_template()


def test_view_error_is_named_and_re_raised(app: Router, new_environ: Callable[..., Any]) -> None:
    environ, recorder = new_environ("/crash")
    with pytest.raises(RuntimeError, match="boom"):
        app(environ, lambda status, headers, exc_info=None: None)
    assert recorder.routes == ["/crash"]


@pytest.mark.parametrize("path", ["/nope", "/items/abc", "/api/v1/models"])
def test_unmatched_path_is_not_named(checks: Any, path: str) -> None:
    checks.not_named(path)


class Root:
    """A traversal root with no children: ``/models`` is the view name ``models``."""

    def __init__(self, request: Request) -> None:
        self.request = request


def test_traversal_only_app_is_not_named(call: Callable[..., Any]) -> None:
    with Configurator(root_factory=Root) as config:
        config.add_view(ok, name="models", context=Root)
        app = config.make_wsgi_app()
    pyramid_adapter.install(app)
    assert app.routes_mapper is None
    result = call(app, "/models")
    assert (result.status, result.routes) == (200, [])


def test_route_is_named_before_the_view(app: Router, call: Callable[..., Any]) -> None:
    assert call(app, "/seen/1").body == b"/seen/{id}"


def test_script_name_prefixes_the_template(checks: Any) -> None:
    checks.script_name_prefixes_the_template()


def test_install_adapter_detects_pyramid_and_installs_once(
    app: Router, call: Callable[..., Any]
) -> None:
    inner = app.routes_mapper.mapper
    assert install_adapter(app) == "pyramid"
    assert install_adapter(app) == "pyramid"
    assert isinstance(app.routes_mapper, pyramid_adapter._RouteNamingMapper)
    assert app.routes_mapper.mapper is inner
    assert app.routes_mapper.get_routes() == inner.get_routes()  # delegated
    assert call(app, "/items/1").routes == ["/items/{id:\\d+}"]


def test_no_event_notifications_switched_on(app: Router, call: Callable[..., Any]) -> None:
    call(app, "/items/1")
    assert app.registry.has_listeners is False


def test_handles_only_pyramid() -> None:
    assert not pyramid_adapter.handles(object())


def test_metrics_middleware_counts_ids_under_one_template(checks: Any) -> None:
    checks.metrics_middleware_counts_ids_under_one_template()
