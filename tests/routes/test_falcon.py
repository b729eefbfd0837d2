"""The Falcon adapter names ``req.uri_template`` through a real Falcon router."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon
import falcon.asgi
import pytest

from ml_wsgi_metrics.routes import REQUEST_KEY, install_adapter
from ml_wsgi_metrics.routes import falcon as falcon_adapter

ADAPTER = "falcon"
ITEM_ROUTE = "/items/{id:int}"


class Health:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"ok": True}


class Item:
    def on_get(self, req: falcon.Request, resp: falcon.Response, id: int) -> None:
        resp.media = {"id": id}

    def on_get_labels(self, req: falcon.Request, resp: falcon.Response, id: int) -> None:
        resp.media = []


class Seen:
    """Answers with the routes named so far: naming must precede the responder."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, id: int) -> None:
        resp.text = ",".join(req.env[REQUEST_KEY].routes)


class Crash:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        raise RuntimeError("boom")


class Private:
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = {"secret": True}


class AuthMiddleware:
    """Completes the response in ``process_resource``, as auth checks commonly do."""

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict
    ) -> None:
        if isinstance(resource, Private):
            resp.status = falcon.HTTP_401
            resp.complete = True


def sink(req: falcon.Request, resp: falcon.Response, **kwargs: Any) -> None:
    resp.text = "sunk"


@pytest.fixture
def app() -> falcon.App:
    app = falcon.App(middleware=[AuthMiddleware()])
    app.add_route("/health", Health())
    app.add_route("/items/{id:int}", Item())
    app.add_route("/items/{id:int}/labels", Item(), suffix="labels")
    app.add_route("/seen/{id:int}", Seen())
    app.add_route("/crash", Crash())
    app.add_route("/private", Private())
    app.add_sink(sink, "/proxy")
    falcon_adapter.install(app)
    return app


@pytest.mark.parametrize(
    ("path", "method", "status", "route"),
    [
        pytest.param("/health", "GET", 200, "/health", id="static"),
        pytest.param("/items/7", "GET", 200, "/items/{id:int}", id="param"),
        pytest.param("/items/7/labels", "GET", 200, "/items/{id:int}/labels", id="suffix"),
        pytest.param("/items/7", "POST", 405, "/items/{id:int}", id="405-keeps-template"),
        pytest.param("/crash", "GET", 500, "/crash", id="responder-raised"),
        pytest.param("/private", "GET", 401, "/private", id="middleware-completed"),
    ],
)
def test_matched_route_is_named(
    checks: Any, path: str, method: str, status: int, route: str
) -> None:
    checks.named(path, method, status, route)


def test_ids_share_one_template(checks: Any) -> None:
    checks.ids_share_one_template()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        pytest.param("/nope", 404, id="no-route"),
        pytest.param("/items/abc", 404, id="converter-rejects"),
        pytest.param("/proxy/anything/at/all", 200, id="sink"),
    ],
)
def test_unmatched_path_is_not_named(checks: Any, path: str, status: int) -> None:
    checks.not_named(path, status=status)


def test_route_is_named_before_the_responder(app: falcon.App, call: Callable[..., Any]) -> None:
    assert call(app, "/seen/1").body == b"/seen/{id:int}"


def test_script_name_prefixes_the_template(checks: Any) -> None:
    checks.script_name_prefixes_the_template()


def test_install_adapter_detects_falcon_and_installs_once(
    app: falcon.App, call: Callable[..., Any]
) -> None:
    assert install_adapter(app) == "falcon"
    assert install_adapter(app) == "falcon"
    namers = [m for m in app._unprepared_middleware if isinstance(m, falcon_adapter._RouteNamer)]
    assert len(namers) == 1
    assert call(app, "/items/1").routes == ["/items/{id:int}"]


def test_dependent_middleware_mode_is_named(call: Callable[..., Any]) -> None:
    app = falcon.App(independent_middleware=False)
    app.add_route("/items/{id:int}", Item())
    falcon_adapter.install(app)
    assert call(app, "/items/3").routes == ["/items/{id:int}"]


def test_handles_wsgi_falcon_only() -> None:
    assert falcon_adapter.handles(falcon.App())
    assert not falcon_adapter.handles(falcon.asgi.App())
    assert not falcon_adapter.handles(object())


def test_metrics_middleware_counts_ids_under_one_template(checks: Any) -> None:
    checks.metrics_middleware_counts_ids_under_one_template()
