"""``MetricsMiddleware``: what is counted, under which labels, and what is left alone."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix

from ml_wsgi_metrics import UNMATCHED, MetricsMiddleware, _errors

# Every test runs with the C record and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("record_implementation")

REQUESTS = "http_requests_total"
DURATION_COUNT = "http_request_duration_seconds_count"
IN_PROGRESS = "http_requests_in_progress"
EXCEPTIONS = "http_request_exceptions_total"
INSTRUMENTATION_ERRORS = "ml_wsgi_metrics_instrumentation_errors_total"


def flask_app(name: str = "app") -> Flask:
    """A Flask app with two templated routes."""
    app = Flask(name)

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return str(item_id)

    @app.route("/items/<int:item_id>/labels", methods=["GET", "POST"])
    def labels(item_id: int) -> str:
        return "[]"

    return app


class Boom(Exception):
    pass


# -- counts and labels ----------------------------------------------------------------------


def test_counts_by_method_route_and_status(
    mode: Any, registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: e["PATH_INFO"])
    for path, method in [
        ("/a", "GET"),
        ("/a", "GET"),
        ("/a", "POST"),
        ("/status/404", "GET"),
        ("/status/503", "DELETE"),
    ]:
        call(app, path, method)

    assert sample(registry, REQUESTS, method="GET", route="/a", status="200") == 2
    assert sample(registry, REQUESTS, method="POST", route="/a", status="200") == 1
    assert sample(registry, REQUESTS, method="GET", route="/status/404", status="404") == 1
    assert sample(registry, REQUESTS, method="DELETE", route="/status/503", status="503") == 1
    assert sample(registry, DURATION_COUNT, method="GET", route="/a") == 2
    assert sample(registry, IN_PROGRESS, method="GET", route="/a") == 0


def test_flask_routes_are_templates(
    registry: CollectorRegistry, call: Callable[..., Any], label_values: Any
) -> None:
    app = MetricsMiddleware(flask_app(), registry=registry)
    for item_id in range(20):
        assert call(app, f"/items/{item_id}").code == 200
    call(app, "/items/3/labels", "POST")

    assert label_values(registry, REQUESTS, "route") == {
        "/items/<int:item_id>",
        "/items/<int:item_id>/labels",
    }


@pytest.mark.parametrize(
    ("method", "label"),
    [
        pytest.param("GET", "GET", id="get"),
        pytest.param("HEAD", "HEAD", id="head"),
        pytest.param("PATCH", "PATCH", id="patch"),
        pytest.param("BREW", "_OTHER", id="unknown"),
        pytest.param("get", "_OTHER", id="lowercase"),
        pytest.param("", "_OTHER", id="empty"),
    ],
)
def test_method_label_is_a_closed_set(
    method: str,
    label: str,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    sample: Any,
) -> None:
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    call(app, "/r", method)
    assert sample(registry, REQUESTS, method=label, route="/r", status="200") == 1


def test_group_status_codes(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, label_values: Any
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", group_status_codes=True
    )
    for code in (200, 201, 404, 418, 503):
        call(app, f"/status/{code}")
    assert label_values(registry, REQUESTS, "status") == {"2xx", "4xx", "5xx"}


def test_namespace_and_const_labels(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    app = MetricsMiddleware(
        hello,
        registry=registry,
        namespace="shop",
        const_labels={"service": "churn", "version": "3"},
        route_resolver=lambda e: "/r",
    )
    call(app, "/r")
    labels = {"service": "churn", "version": "3", "method": "GET", "route": "/r"}
    assert sample(registry, "shop_http_requests_total", status="200", **labels) == 1
    assert sample(registry, "shop_http_request_duration_seconds_count", **labels) == 1
    assert sample(registry, REQUESTS, status="200", **labels) == 0


def test_namespace_from_environment(
    monkeypatch: pytest.MonkeyPatch,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    sample: Any,
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_NAMESPACE", "fromenv")
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    call(app, "/r")
    assert sample(registry, "fromenv_http_requests_total", method="GET", route="/r", status="200")


# -- bounded routes -------------------------------------------------------------------------


def items_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A plain WSGI app: 200 under ``/items/``, 404 elsewhere."""
    found = environ["PATH_INFO"].startswith("/items/")
    start_response("200 OK" if found else "404 Not Found", [])
    return [b"item" if found else b""]


def items_route(environ: dict[str, Any]) -> str | None:
    return "/items/{id}" if environ["PATH_INFO"].startswith("/items/") else None


def flask_middleware(registry: CollectorRegistry) -> MetricsMiddleware:
    return MetricsMiddleware(flask_app(), registry=registry)


def resolver_middleware(registry: CollectorRegistry) -> MetricsMiddleware:
    return MetricsMiddleware(items_app, registry=registry, route_resolver=items_route)


@pytest.mark.parametrize(
    "make_app",
    [
        pytest.param(flask_middleware, id="flask"),
        pytest.param(resolver_middleware, id="route_resolver"),
    ],
)
def test_ten_thousand_unknown_paths_add_at_most_one_route(
    make_app: Callable[[CollectorRegistry], Any],
    registry: CollectorRegistry,
    call: Callable[..., Any],
    label_values: Any,
    sample: Any,
) -> None:
    app = make_app(registry)
    call(app, "/items/1")
    before = label_values(registry, REQUESTS, "route")

    for n in range(10_000):
        assert call(app, f"/scan/{n}/wp-login.php").code == 404

    added = label_values(registry, REQUESTS, "route") - before
    assert added == {UNMATCHED}
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="404") == 10_000


def test_without_adapter_or_resolver_everything_is_unmatched_and_a_warning_says_so(
    caplog: pytest.LogCaptureFixture,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    label_values: Any,
) -> None:
    with caplog.at_level(logging.WARNING, logger="ml_wsgi_metrics"):
        app = MetricsMiddleware(hello, registry=registry)
    assert "route_resolver" in caplog.text
    call(app, "/a")
    call(app, "/b")
    assert label_values(registry, REQUESTS, "route") == {UNMATCHED}


# -- route_resolver -------------------------------------------------------------------------


def test_route_resolver_names_the_route_from_the_environ(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    seen: list[str] = []

    def resolve(environ: dict[str, Any]) -> str | None:
        seen.append(environ["PATH_INFO"])
        return "/users/{id}" if environ["PATH_INFO"].startswith("/users/") else None

    app = MetricsMiddleware(hello, registry=registry, route_resolver=resolve)
    call(app, "/users/1")
    call(app, "/users/2")
    call(app, "/elsewhere")

    assert seen == ["/users/1", "/users/2", "/elsewhere"]
    assert sample(registry, REQUESTS, method="GET", route="/users/{id}", status="200") == 2
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="200") == 1


def test_a_failing_route_resolver_fails_open(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    def resolve(environ: dict[str, Any]) -> str:
        raise LookupError("resolver bug")

    app = MetricsMiddleware(hello, registry=registry, route_resolver=resolve)
    response = call(app, "/a")

    assert (response.status, response.body) == ("200 OK", b"hello")
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="200") == 1
    assert sample(registry, INSTRUMENTATION_ERRORS, stage="route_resolver") == 1


# -- SCRIPT_NAME mounts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("server_prefix", "path"),
    [
        pytest.param("", "/a/items/1", id="no-server-prefix"),
        pytest.param("/prefix", "/a/items/1", id="server-prefix-stripped"),
    ],
)
def test_dispatcher_mounts_prefix_the_template(
    server_prefix: str,
    path: str,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    label_values: Any,
    sample: Any,
) -> None:
    app_a, app_b = flask_app("a"), flask_app("b")
    dispatcher = DispatcherMiddleware(NotFound(), {"/a": app_a, "/b": app_b})
    app = MetricsMiddleware(dispatcher, registry=registry)
    assert app.adapter == "flask"  # found in the mounted apps

    assert call(app, "/a/items/1", script_name=server_prefix).code == 200
    assert call(app, "/b/items/2", script_name=server_prefix).code == 200
    assert call(app, "/b/items/2/labels", script_name=server_prefix).code == 200
    assert call(app, "/c/items/2", script_name=server_prefix).code == 404

    assert label_values(registry, REQUESTS, "route") == {
        "/a/items/<int:item_id>",
        "/b/items/<int:item_id>",
        "/b/items/<int:item_id>/labels",
        UNMATCHED,
    }
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="404") == 1


def test_server_prefix_is_stripped_for_the_route_resolver_too(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    call(app, "/r", script_name="/prefix")
    assert sample(registry, REQUESTS, method="GET", route="/r", status="200") == 1


def test_forwarded_prefixes_add_no_route_series(
    registry: CollectorRegistry, call: Callable[..., Any], label_values: Any, sample: Any
) -> None:
    """ProxyFix(x_prefix=1) inside sets SCRIPT_NAME from a header a client may choose."""
    app = MetricsMiddleware(ProxyFix(flask_app(), x_prefix=1), registry=registry)
    for i in range(1000):
        response = call(app, "/items/1", headers={"X-Forwarded-Prefix": f"/x{i}"})
        assert response.code == 200
    assert label_values(registry, REQUESTS, "route") == {"/items/<int:item_id>"}
    item = {"method": "GET", "route": "/items/<int:item_id>", "status": "200"}
    assert sample(registry, REQUESTS, **item) == 1000


@pytest.mark.parametrize("server_prefix", [pytest.param("", id="no-server-prefix"), "/srv"])
def test_forwarded_prefix_keeps_the_dispatcher_mount_only(
    server_prefix: str,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    label_values: Any,
    sample: Any,
) -> None:
    dispatcher = DispatcherMiddleware(NotFound(), {"/a": flask_app("a"), "/b": flask_app("b")})
    app = MetricsMiddleware(ProxyFix(dispatcher, x_prefix=1), registry=registry)
    for i in range(50):
        headers = {"X-Forwarded-Prefix": f"/x{i}"}
        assert call(app, "/a/items/1", script_name=server_prefix, headers=headers).code == 200
        assert call(app, "/b/items/1", script_name=server_prefix, headers=headers).code == 200
        assert call(app, "/a/items/1", script_name=server_prefix).code == 200
    assert label_values(registry, REQUESTS, "route") == {
        "/a/items/<int:item_id>",
        "/b/items/<int:item_id>",
    }
    assert sample(
        registry, REQUESTS, method="GET", route="/a/items/<int:item_id>", status="200"
    ) == (100)


def test_nested_dispatcher_mounts_are_kept(
    registry: CollectorRegistry, call: Callable[..., Any], label_values: Any
) -> None:
    inner = DispatcherMiddleware(flask_app("v0"), {"/v1": flask_app("v1")})
    app = MetricsMiddleware(DispatcherMiddleware(NotFound(), {"/api": inner}), registry=registry)
    assert call(app, "/api/v1/items/1").code == 200
    assert call(app, "/api/items/1").code == 200
    assert label_values(registry, REQUESTS, "route") == {
        "/api/v1/items/<int:item_id>",
        "/api/items/<int:item_id>",
    }


# -- what is not counted --------------------------------------------------------------------


def test_excluded_paths_are_served_but_not_counted(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, label_values: Any
) -> None:
    app = MetricsMiddleware(
        hello,
        registry=registry,
        route_resolver=lambda e: e["PATH_INFO"],
        excluded_paths=["/health", "/ready"],
    )
    assert call(app, "/health").body == b"hello"
    assert call(app, "/ready").body == b"hello"
    call(app, "/counted")
    assert label_values(registry, REQUESTS, "route") == {"/counted"}


@pytest.mark.parametrize(
    ("count_metrics_requests", "expected"),
    [
        pytest.param(False, 0, id="default-not-counted"),
        pytest.param(True, 2, id="counted-when-asked"),
    ],
)
def test_metrics_path_counted_only_when_asked(
    count_metrics_requests: bool,
    expected: int,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    sample: Any,
) -> None:
    app = MetricsMiddleware(
        hello,
        registry=registry,
        route_resolver=lambda e: "/r",
        count_metrics_requests=count_metrics_requests,
    )
    for _ in range(2):
        response = call(app, "/metrics")
        assert response.code == 200
        assert b"http_requests_total" in response.body
    assert sample(registry, REQUESTS, method="GET", route="/metrics", status="200") == expected


def test_metrics_path_none_leaves_metrics_to_the_app(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: e["PATH_INFO"], metrics_path=None
    )
    assert call(app, "/metrics").body == b"hello"
    assert sample(registry, REQUESTS, method="GET", route="/metrics", status="200") == 1


def test_custom_metrics_path(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", metrics_path="/-/prom"
    )
    assert b"http_requests_total" in call(app, "/-/prom").body
    assert call(app, "/metrics").body == b"hello"


# -- double wrapping ------------------------------------------------------------------------


def test_wrapping_twice_counts_once(
    registry: CollectorRegistry, call: Callable[..., Any], sample: Any, label_values: Any
) -> None:
    flask = flask_app()
    flask.wsgi_app = MetricsMiddleware(flask.wsgi_app, registry=registry)  # in the app
    app = MetricsMiddleware(flask, registry=registry)  # and again in the server's config

    assert call(app, "/items/1").code == 200
    assert call(app, "/nope").code == 404

    route = "/items/<int:item_id>"
    assert sample(registry, REQUESTS, method="GET", route=route, status="200") == 1
    assert sample(registry, DURATION_COUNT, method="GET", route=route) == 1
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="404") == 1
    assert sample(registry, IN_PROGRESS, method="GET", route=route) == 0
    assert label_values(registry, REQUESTS, "route") == {route, UNMATCHED}


# -- exceptions -----------------------------------------------------------------------------


def test_app_exception_is_counted_as_500_and_reraised_unchanged(
    mode: Any, registry: CollectorRegistry, call: Callable[..., Any], sample: Any
) -> None:
    error = Boom("the app's own")

    def crashing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise error

    app = MetricsMiddleware(crashing, registry=registry, route_resolver=lambda e: "/crash")
    with pytest.raises(Boom) as raised:
        call(app, "/crash")

    assert raised.value is error
    assert raised.value.__traceback__ is not None
    assert sample(registry, REQUESTS, method="GET", route="/crash", status="500") == 1
    assert sample(registry, EXCEPTIONS, method="GET", route="/crash", exception="Boom") == 1
    assert sample(registry, DURATION_COUNT, method="GET", route="/crash") == 1
    assert sample(registry, IN_PROGRESS, method="GET", route="/crash") == 0


def test_flask_view_exception_in_testing_mode_propagates_once(
    registry: CollectorRegistry, call: Callable[..., Any], sample: Any
) -> None:
    flask = flask_app()
    flask.testing = True  # PROPAGATE_EXCEPTIONS: the error reaches the server

    @flask.get("/crash")
    def crash() -> str:
        raise Boom("view")

    app = MetricsMiddleware(flask, registry=registry)
    with pytest.raises(Boom):
        call(app, "/crash")
    assert sample(registry, REQUESTS, method="GET", route="/crash", status="500") == 1
    assert sample(registry, EXCEPTIONS, method="GET", route="/crash", exception="Boom") == 1


# -- sizes ----------------------------------------------------------------------------------


def test_request_and_response_sizes(
    registry: CollectorRegistry,
    call: Callable[..., Any],
    echo: Any,
    sample: Any,
) -> None:
    app = MetricsMiddleware(echo, registry=registry, route_resolver=lambda e: "/echo")
    assert call(app, "/echo", "POST", body=b"x" * 100).body == b"x" * 100
    call(app, "/echo", "POST", body=b"y" * 5000)
    call(app, "/echo", "GET")  # no body: no request size observed, response size 0

    labels = {"method": "POST", "route": "/echo"}
    assert sample(registry, "http_request_size_bytes_sum", **labels) == 5100
    assert sample(registry, "http_request_size_bytes_count", **labels) == 2
    assert sample(registry, "http_request_size_bytes_bucket", le="256.0", **labels) == 1
    assert sample(registry, "http_response_size_bytes_sum", **labels) == 5100
    get = {"method": "GET", "route": "/echo"}
    assert sample(registry, "http_request_size_bytes_count", **get) == 0
    assert sample(registry, "http_response_size_bytes_count", **get) == 1
    assert sample(registry, "http_response_size_bytes_sum", **get) == 0


def test_bad_content_length_counts_as_no_body(
    registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    assert call(app, "/r", "POST", CONTENT_LENGTH="lots").body == b"hello"
    assert sample(registry, REQUESTS, method="POST", route="/r", status="200") == 1
    assert sample(registry, "http_request_size_bytes_count", method="POST", route="/r") == 0


# -- in progress ----------------------------------------------------------------------------


def test_in_progress_is_one_during_the_request_and_zero_after(
    mode: Any, registry: CollectorRegistry, call: Callable[..., Any], sample: Any
) -> None:
    flask = flask_app()
    seen: list[float] = []

    @flask.get("/work/<name>")
    def work(name: str) -> str:
        seen.append(sample(registry, IN_PROGRESS, method="GET", route="/work/<name>"))
        return "done"

    app = MetricsMiddleware(flask, registry=registry)
    call(app, "/work/a")
    call(app, "/work/b")

    assert seen == [1.0, 1.0]
    assert sample(registry, IN_PROGRESS, method="GET", route="/work/<name>") == 0


def test_concurrent_requests_are_counted_exactly(
    mode: Any, registry: CollectorRegistry, call: Callable[..., Any], hello: Any, sample: Any
) -> None:
    """As a threaded worker (gthread) serves them: no update lost, nothing left in progress."""
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: e["PATH_INFO"])
    threads, requests = 8, 300
    start = threading.Barrier(threads)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible

    def client(n: int) -> None:
        start.wait()
        for i in range(requests):
            call(app, f"/route/{(n + i) % 3}")

    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    try:
        for worker in workers:
            worker.join(30)
    finally:
        sys.setswitchinterval(interval)

    per_route = [
        sample(registry, REQUESTS, method="GET", route=f"/route/{r}", status="200")
        for r in range(3)
    ]
    assert sum(per_route) == threads * requests
    assert per_route == [threads * requests / 3] * 3
    for r in range(3):
        labels = {"method": "GET", "route": f"/route/{r}"}
        assert sample(registry, DURATION_COUNT, **labels) == per_route[r]
        assert sample(registry, "http_response_size_bytes_sum", **labels) == 5 * per_route[r]
        assert sample(registry, IN_PROGRESS, **labels) == 0


# -- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "options"),
    [
        pytest.param("metrics_path", {"metrics_path": "metrics"}, id="metrics_path"),
        pytest.param("excluded_paths", {"excluded_paths": ["health"]}, id="excluded_paths"),
        pytest.param("excluded_paths", {"excluded_paths": [None]}, id="excluded_paths-none"),
        pytest.param("const_labels", {"const_labels": {"bad-name": "x"}}, id="const_labels"),
        pytest.param("const_labels", {"const_labels": {"route": "x"}}, id="const_labels-taken"),
        pytest.param("const_labels", {"const_labels": {"__x": "x"}}, id="const_labels-reserved"),
        pytest.param("const_labels", {"const_labels": {"service": 3}}, id="const_labels-value"),
        pytest.param("namespace", {"namespace": "1shop"}, id="namespace"),
        pytest.param("namespace", {"namespace": "my-shop"}, id="namespace-dash"),
        pytest.param("duration_buckets", {"duration_buckets": []}, id="buckets-empty"),
        pytest.param("duration_buckets", {"duration_buckets": [1, 0.5]}, id="buckets-order"),
        pytest.param("duration_buckets", {"duration_buckets": [float("nan")]}, id="buckets-nan"),
        pytest.param("size_buckets", {"size_buckets": [-1, 10]}, id="buckets-negative"),
        pytest.param("route_resolver", {"route_resolver": "/items"}, id="route_resolver"),
        pytest.param(
            "metrics_allowed_networks",
            {"metrics_allowed_networks": ["10.0.0.0/33"]},
            id="metrics_allowed_networks",
        ),
        pytest.param(
            "metrics_allowed_networks",
            {"metrics_allowed_networks": "localhost"},
            id="metrics_allowed_networks-name",
        ),
        pytest.param("metrics_token", {"metrics_token": ""}, id="metrics_token-empty"),
        pytest.param("metrics_token", {"metrics_token": "  "}, id="metrics_token-blank"),
        pytest.param("app", {"app": "not an app"}, id="app-not-callable"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_setting(
    setting: str, options: dict[str, Any], hello: Any
) -> None:
    options = dict(options)  # parameters are shared by the runs with each record
    app = options.pop("app", hello)
    with pytest.raises(ValueError, match=rf"^{setting}\b"):
        MetricsMiddleware(
            app, **{"registry": CollectorRegistry(), "route_resolver": None, **options}
        )


# -- failing open ---------------------------------------------------------------------------


def test_instrumentation_error_leaves_the_response_unchanged(
    mode: Any,
    monkeypatch: pytest.MonkeyPatch,
    break_series: Callable[..., None],
    caplog: pytest.LogCaptureFixture,
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    sample: Any,
) -> None:
    bare = call(hello, "/status/201")
    break_series(started=False, finished=True)
    monkeypatch.setattr(_errors._Channel, "logged", set())
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")

    with caplog.at_level(logging.DEBUG, logger="ml_wsgi_metrics"):
        wrapped = call(app, "/status/201")
        again = call(app, "/status/201")

    assert (wrapped.status, wrapped.headers, wrapped.body) == (bare.status, bare.headers, bare.body)
    assert again.body == bare.body
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # the first in full, then briefly
    assert "instrumentation bug" in warnings[0].getMessage()
    assert warnings[0].exc_info is not None
    assert sample(registry, INSTRUMENTATION_ERRORS, stage="record") == 2


def test_instrumentation_error_does_not_mask_the_app_exception(
    break_series: Callable[..., None], registry: CollectorRegistry, call: Callable[..., Any]
) -> None:
    error = Boom("the app's own")

    def crashing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise error

    break_series(started=True, finished=True)
    app = MetricsMiddleware(crashing, registry=registry, route_resolver=lambda e: "/r")
    with pytest.raises(Boom) as raised:
        call(app, "/r")
    assert raised.value is error


def test_failure_to_start_a_series_fails_open(
    break_series: Callable[..., None],
    registry: CollectorRegistry,
    call: Callable[..., Any],
    hello: Any,
    sample: Any,
) -> None:
    break_series(started=True, finished=False)
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    assert call(app, "/r").body == b"hello"
    assert sample(registry, INSTRUMENTATION_ERRORS, stage="route") == 1
    assert sample(registry, REQUESTS, method="GET", route=UNMATCHED, status="200") == 1


def test_a_model_bound_by_one_request_does_not_leak_into_the_next(
    registry: CollectorRegistry, call: Callable[..., Any]
) -> None:
    from ml_wsgi_metrics import _context

    seen: list[tuple[str, str] | None] = []

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(_context.current())
        _context.bind("churn", "1")
        start_response("200 OK", [])
        return [b""]

    wrapped = MetricsMiddleware(app, registry=registry, route_resolver=lambda e: "/")
    call(wrapped, "/")
    call(wrapped, "/")
    assert seen == [None, None]


def test_requests_that_used_a_model_are_counted_by_model_version(
    registry: CollectorRegistry, call: Callable[..., Any], sample: Any
) -> None:
    from ml_wsgi_metrics import _context

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/predict":
            _context.bind("churn", "2")
        start_response("200 OK", [])
        return [b""]

    wrapped = MetricsMiddleware(app, registry=registry, route_resolver=lambda e: e["PATH_INFO"])
    call(wrapped, "/predict")
    call(wrapped, "/predict")
    call(wrapped, "/other")
    labels = {"method": "GET", "route": "/predict", "status": "200"}
    assert sample(registry, "http_model_requests_total", **labels, model="churn", version="2") == 2
    assert sample(registry, "http_requests_total", **labels) == 2
    assert sample(registry, "http_requests_total", method="GET", route="/other", status="200") == 1
    assert {s.labels.get("route") for s in _samples(registry, "http_model_requests_total")} == {
        "/predict"
    }


def _samples(registry: CollectorRegistry, name: str) -> list[Any]:
    return [s for m in registry.collect() for s in m.samples if s.name == name]


def test_the_adapter_is_found_through_other_middlewares(registry: CollectorRegistry) -> None:
    from werkzeug.middleware.proxy_fix import ProxyFix

    app = flask_app()
    assert MetricsMiddleware(ProxyFix(app), registry=registry).adapter == "flask"
    inner = MetricsMiddleware(app, registry=registry)
    assert MetricsMiddleware(inner, registry=registry).adapter == "flask"
