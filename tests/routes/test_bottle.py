"""The Bottle adapter names the matched route's ``rule`` through a real Bottle router."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bottle
import pytest
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import MetricsMiddleware
from ml_wsgi_metrics.routes import REQUEST_KEY, install_adapter
from ml_wsgi_metrics.routes import bottle as bottle_adapter

ADAPTER = "bottle"
ITEM_ROUTE = "/items/<id:int>"


def make_child() -> bottle.Bottle:
    child = bottle.Bottle()

    @child.get("/models/<name>/predict")
    def predict(name: str) -> str:
        return name

    return child


@pytest.fixture
def app() -> bottle.Bottle:
    app = bottle.Bottle()

    @app.get("/health")
    def health() -> str:
        return "ok"

    @app.get("/items/<id:int>")
    def item(id: int) -> str:
        return str(id)

    @app.get("/seen/<id:int>")
    def seen(id: int) -> str:
        """Answers with the routes named so far: naming must precede the callback."""
        return ",".join(bottle.request.environ[REQUEST_KEY].routes)

    @app.get("/skipped", skip=True)
    def skipped() -> str:
        return "no plugins here"

    @app.get("/crash")
    def crash() -> str:
        raise RuntimeError("boom")

    @app.get("/gone")
    def gone() -> str:
        bottle.abort(404, "gone")
        return ""

    app.mount("/api/", make_child())  # routes copied into app, rules prefixed
    with pytest.warns(DeprecationWarning):
        app.mount("/legacy", make_child())  # no trailing slash: mounted as a WSGI app
    bottle_adapter.install(app)
    return app


@pytest.mark.parametrize(
    ("path", "method", "status", "route"),
    [
        pytest.param("/health", "GET", 200, "/health", id="static"),
        pytest.param("/items/7", "GET", 200, "/items/<id:int>", id="param"),
        pytest.param("/crash", "GET", 500, "/crash", id="callback-raised"),
        pytest.param("/gone", "GET", 404, "/gone", id="404-from-callback"),
        pytest.param(
            "/api/models/churn/predict", "GET", 200, "/api/models/<name>/predict", id="mount"
        ),
        pytest.param(
            "/legacy/models/churn/predict",
            "GET",
            200,
            "/legacy/models/<name>/predict",
            id="wsgi-mount",
        ),
    ],
)
def test_matched_route_is_named(
    checks: Any, path: str, method: str, status: int, route: str
) -> None:
    checks.named(path, method, status, route)


def test_ids_share_one_template(checks: Any) -> None:
    checks.ids_share_one_template()


@pytest.mark.parametrize(
    ("path", "method", "status"),
    [
        pytest.param("/nope", "GET", 404, id="no-route"),
        pytest.param("/items/abc", "GET", 404, id="filter-rejects"),
        pytest.param("/items/7", "POST", 405, id="405-router-rejects"),
        pytest.param("/api/nope", "GET", 404, id="mount-no-route"),
        pytest.param("/legacy/nope", "GET", 404, id="wsgi-mount-no-route"),
    ],
)
def test_unmatched_path_is_not_named(checks: Any, path: str, method: str, status: int) -> None:
    checks.not_named(path, method, status)


def test_script_name_prefixes_the_template(checks: Any) -> None:
    checks.script_name_prefixes_the_template()


def test_install_adapter_detects_bottle_and_installs_once(
    app: bottle.Bottle, call: Callable[..., Any]
) -> None:
    assert install_adapter(app) == "bottle"
    assert install_adapter(app) == "bottle"
    assert sum(isinstance(p, bottle_adapter._RouteNamer) for p in app.plugins) == 1
    assert call(app, "/items/1").routes == ["/items/<id:int>"]
    assert call(app, "/api/models/m/predict").routes == ["/api/models/<name>/predict"]
    assert call(app, "/legacy/models/m/predict").routes == ["/legacy/models/<name>/predict"]


def test_route_is_named_before_the_callback(app: bottle.Bottle, call: Callable[..., Any]) -> None:
    assert call(app, "/seen/1").body == b"/seen/<id:int>"


def test_skipped_plugins_leave_the_route_unnamed(
    app: bottle.Bottle, call: Callable[..., Any]
) -> None:
    assert call(app, "/skipped").routes == []


def test_plugin_outermost_so_early_answers_are_named(call: Callable[..., Any]) -> None:
    def auth(callback: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bottle.abort(401, "who are you?")

        return wrapper

    app = bottle.Bottle()
    app.install(auth)
    app.route("/items/<id:int>", callback=lambda id: str(id))
    assert call(app, "/items/2").status == 401  # routes prepared before the adapter
    bottle_adapter.install(app)
    result = call(app, "/items/2")
    assert (result.status, result.routes) == (401, ["/items/<id:int>"])


def test_handles_only_bottle() -> None:
    assert bottle_adapter.handles(bottle.Bottle())
    assert not bottle_adapter.handles(object())


def test_metrics_middleware_counts_ids_under_one_template(checks: Any) -> None:
    checks.metrics_middleware_counts_ids_under_one_template()


def test_metrics_middleware_keeps_bottle_mount_prefixes(
    app: bottle.Bottle, call: Callable[..., Any]
) -> None:
    """Through the real middleware: a mount's prefix is kept, whichever way Bottle mounts."""
    registry = CollectorRegistry()
    wrapped = MetricsMiddleware(app, registry=registry)
    for path in ("/api/models/a/predict", "/legacy/models/b/predict", "/items/3"):
        assert call(wrapped, path, record=False).status == 200
    routes = {
        s.labels["route"]
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "http_requests_total"
    }
    assert routes == {"/api/models/<name>/predict", "/legacy/models/<name>/predict", ITEM_ROUTE}
