"""``/metrics`` protection holds through every stacking of middlewares.

The README supports wrapping the app in the app *and* in ``gunicorn.conf.py``; whichever
middleware serves ``/metrics`` (the outermost one), the strictest of the stacked settings
applies: every token set must be presented (two different tokens are refused at start-up),
and an address must be in every allow-list. Requests go through werkzeug's test client to
tiny WSGI apps.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import NotFound
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.test import Client

from ml_wsgi_metrics import MetricsMiddleware

TOKEN = "inner-s3cret"
OTHER = "outer-s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}

Wrap = Callable[[Any], Any]


def status(app: Any, path: str = "/metrics", remote_addr: str = "127.0.0.1", **kw: Any) -> int:
    """The status of one GET, its response read and closed (as a server does)."""
    client = Client(app)
    response = client.get(path, environ_base={"REMOTE_ADDR": remote_addr}, buffered=True, **kw)
    return response.status_code


def body(app: Any, path: str = "/metrics", **kw: Any) -> bytes:
    return Client(app).get(path, buffered=True, **kw).data


@pytest.fixture
def middleware(registry: CollectorRegistry) -> Callable[..., MetricsMiddleware]:
    """``middleware(app, **options)``: a ``MetricsMiddleware`` on the test's registry."""

    def wrap(app: Any, **options: Any) -> MetricsMiddleware:
        return MetricsMiddleware(app, registry=registry, **options)

    return wrap


# -- tokens ---------------------------------------------------------------------------------


BETWEEN: dict[str, Wrap] = {
    "directly": lambda app: app,
    "proxyfix": lambda app: ProxyFix(app, x_for=1, x_prefix=1),
    "dispatcher": lambda app: DispatcherMiddleware(app, {"/other": NotFound()}),
    "dispatcher-mount": lambda app: DispatcherMiddleware(NotFound(), {"/mounted": app}),
}


@pytest.mark.parametrize("between", list(BETWEEN))
@pytest.mark.parametrize(
    ("inner_token", "outer_token"),
    [
        pytest.param(TOKEN, None, id="inner-only"),
        pytest.param(None, TOKEN, id="outer-only"),
        pytest.param(TOKEN, TOKEN, id="both-same"),
    ],
)
def test_a_token_set_anywhere_protects_the_served_metrics(
    inner_token: str | None,
    outer_token: str | None,
    between: str,
    middleware: Callable[..., MetricsMiddleware],
    hello: Any,
) -> None:
    inner = middleware(hello, route_resolver=lambda e: "/r", metrics_token=inner_token)
    app = middleware(BETWEEN[between](inner), metrics_token=outer_token)

    assert status(app) == 401
    assert status(app, headers={"Authorization": "Bearer wrong"}) == 401
    assert status(app, headers=BEARER) == 200
    assert b"http_requests_total" in body(app, headers=BEARER)
    assert b"http_requests_total" not in body(app)


def test_two_different_tokens_are_refused_at_start_up(
    middleware: Callable[..., MetricsMiddleware], hello: Any
) -> None:
    inner = middleware(ProxyFix(hello), route_resolver=lambda e: "/r", metrics_token=TOKEN)
    with pytest.raises(ValueError, match=r"^metrics_token") as raised:
        middleware(ProxyFix(inner), metrics_token=OTHER)
    assert TOKEN not in str(raised.value) and OTHER not in str(raised.value)


def test_the_same_token_with_a_trailing_newline_is_not_a_conflict(
    middleware: Callable[..., MetricsMiddleware], hello: Any
) -> None:
    inner = middleware(hello, route_resolver=lambda e: "/r", metrics_token=TOKEN + "\n")
    app = middleware(inner, metrics_token=TOKEN)
    assert status(app, headers=BEARER) == 200


def test_flask_wsgi_app_wrapped_in_the_app_keeps_its_token(
    middleware: Callable[..., MetricsMiddleware],
) -> None:
    """The README's Flask idiom in the app, and the gunicorn config wrapping the Flask app."""
    flask = Flask("protected")
    flask.get("/hello")(lambda: "hi")
    flask.wsgi_app = middleware(ProxyFix(flask.wsgi_app), metrics_token=TOKEN)  # type: ignore[method-assign]
    app = middleware(flask)

    assert status(app) == 401
    assert status(app, headers=BEARER) == 200
    assert status(app, "/hello") == 200


def test_token_from_the_environment_of_both_is_no_conflict(
    monkeypatch: pytest.MonkeyPatch, middleware: Callable[..., MetricsMiddleware], hello: Any
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", TOKEN)
    app = middleware(middleware(hello, route_resolver=lambda e: "/r"))
    assert status(app) == 401
    assert status(app, headers=BEARER) == 200


# -- allow-lists ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner_networks", "outer_networks", "allowed", "refused"),
    [
        pytest.param(["10.0.0.0/8"], None, ["10.9.9.9"], ["127.0.0.1"], id="inner-only"),
        pytest.param(None, ["10.0.0.0/8"], ["10.9.9.9"], ["127.0.0.1"], id="outer-only"),
        pytest.param(
            ["10.0.0.0/8", "192.168.0.0/16"],
            ["10.1.0.0/16", "192.168.0.0/16", "172.16.0.0/12"],
            ["10.1.2.3", "192.168.7.7", "::ffff:10.1.0.1"],
            ["10.2.0.1", "172.16.0.1", "127.0.0.1"],
            id="both-intersected",
        ),
        pytest.param(
            ["10.0.0.0/8"], ["192.168.0.0/16"], [], ["10.0.0.1", "192.168.0.1"], id="disjoint"
        ),
    ],
)
@pytest.mark.parametrize("between", ["directly", "proxyfix"])
def test_allow_lists_are_intersected(
    inner_networks: list[str] | None,
    outer_networks: list[str] | None,
    allowed: list[str],
    refused: list[str],
    between: str,
    middleware: Callable[..., MetricsMiddleware],
    hello: Any,
) -> None:
    inner = middleware(
        hello, route_resolver=lambda e: "/r", metrics_allowed_networks=inner_networks
    )
    app = middleware(BETWEEN[between](inner), metrics_allowed_networks=outer_networks)
    for address in allowed:
        assert status(app, remote_addr=address) == 200, address
    for address in refused:
        assert status(app, remote_addr=address) == 403, address


def test_proxyfix_outside_decides_the_address_the_allow_list_sees(
    middleware: Callable[..., MetricsMiddleware], hello: Any
) -> None:
    """Inside the middleware ProxyFix changes nothing for /metrics; outside, it rewrites
    REMOTE_ADDR from X-Forwarded-For before the middleware sees the request."""
    forwarded = {"X-Forwarded-For": "10.0.0.7"}
    inside = middleware(
        ProxyFix(hello, x_for=1),
        route_resolver=lambda e: "/r",
        metrics_allowed_networks=["10.0.0.0/8"],
    )
    assert status(inside, remote_addr="192.168.0.1", headers=forwarded) == 403
    outside = ProxyFix(inside, x_for=1)
    assert status(outside, remote_addr="192.168.0.1", headers=forwarded) == 200


# -- metrics paths --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("inner_options", "outer_options"),
    [
        pytest.param({"metrics_token": TOKEN}, {}, id="token-inside"),
        pytest.param({}, {"metrics_token": TOKEN}, id="token-outside"),
    ],
)
@pytest.mark.parametrize("excluded", [False, True], ids=["measured", "excluded-outside"])
def test_a_second_metrics_path_is_protected_too(
    inner_options: dict[str, Any],
    outer_options: dict[str, Any],
    excluded: bool,
    middleware: Callable[..., MetricsMiddleware],
    hello: Any,
) -> None:
    inner = middleware(
        hello, route_resolver=lambda e: "/r", metrics_path="/private", **inner_options
    )
    app = middleware(
        ProxyFix(inner),
        metrics_path="/metrics",
        excluded_paths=["/private"] if excluded else [],
        **outer_options,
    )
    for path in ("/metrics", "/private"):
        assert status(app, path) == 401, path
        assert status(app, path, headers=BEARER) == 200, path
        assert b"http_requests_total" in body(app, path, headers=BEARER), path
    assert status(app, "/r") == 200  # the app is not guarded


def test_stacked_scrapes_are_not_counted_as_requests(
    registry: CollectorRegistry, middleware: Callable[..., MetricsMiddleware], hello: Any
) -> None:
    inner = middleware(hello, route_resolver=lambda e: "/r", metrics_path="/private")
    app = middleware(inner, route_resolver=lambda e: "/r")
    for path in ("/metrics", "/private", "/r"):
        assert status(app, path) == 200
    counted = [
        (s.labels["route"], s.value)
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "http_requests_total"
    ]
    assert counted == [("/r", 1.0)]
