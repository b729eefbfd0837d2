"""Metric definitions: shared metric sets, promtool-clean output."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import MetricsMiddleware
from ml_wsgi_metrics.metrics import RequestMetrics, ServerMetrics, shared
from ml_wsgi_metrics.process import write_pid_file

PROMTOOL = "/usr/bin/promtool"
BUCKETS = (0.1, 0.5, 1.0, 2.5, 10.0)


# -- shared ---------------------------------------------------------------------------------


def test_shared_returns_one_metric_set_per_registry_and_settings() -> None:
    one, two = CollectorRegistry(), CollectorRegistry()
    first = shared(RequestMetrics, one, namespace="", const_labels={})
    assert shared(RequestMetrics, one, namespace="", const_labels={}) is first
    assert shared(RequestMetrics, two, namespace="", const_labels={}) is not first
    other = shared(RequestMetrics, one, namespace="other", const_labels={})
    assert other is not first
    assert other.requests is not first.requests
    assert shared(ServerMetrics, one) is not first
    assert shared(ServerMetrics, one) is shared(ServerMetrics, one)


def test_middlewares_with_the_same_settings_share_their_metrics(hello: Any) -> None:
    registry = CollectorRegistry()
    first = MetricsMiddleware(hello, registry=registry, const_labels={"service": "s"})
    second = MetricsMiddleware(hello, registry=registry, const_labels={"service": "s"})
    assert second.metrics is first.metrics


# -- promtool -------------------------------------------------------------------------------


def traffic(registry: CollectorRegistry, call: Callable[..., Any], **options: Any) -> Any:
    """A middleware after requests of every kind: routes, statuses, sizes, an exception."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        path = environ["PATH_INFO"]
        if path == "/crash":
            raise RuntimeError("crash")
        status = "404 Not Found" if path.startswith("/unknown") else "200 OK"
        start_response(status, [("Content-Type", "text/plain")])
        return [b"x" * len(path)]

    def resolve(environ: dict[str, Any]) -> str | None:
        path = environ["PATH_INFO"]
        return None if path.startswith("/unknown") else path

    middleware = MetricsMiddleware(app, registry=registry, route_resolver=resolve, **options)
    for path, method in [
        ("/items", "GET"),
        ("/items", "POST"),
        ("/unknown/1", "GET"),
        ('/odd"route\\with\nescapes', "PUT"),
        ("/items", "BREW"),
    ]:
        call(middleware, path, method, body=b"payload")
    with pytest.raises(RuntimeError):
        call(middleware, "/crash")
    return middleware


def promtool_check(text: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.decode(),
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.requires_tool(PROMTOOL)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({}, id="defaults"),
        pytest.param(
            {"namespace": "shop", "const_labels": {"service": "churn", "version": "1.2"}},
            id="namespace-const-labels",
        ),
        pytest.param({"group_status_codes": True}, id="grouped-statuses"),
    ],
)
def test_promtool_check_metrics_passes_on_the_exposition(
    mode: Path | None,
    options: dict[str, Any],
    registry: CollectorRegistry,
    call: Callable[..., Any],
) -> None:
    middleware = traffic(registry, call, **options)
    if mode is not None:  # per-worker process metrics come from pid files
        write_pid_file(str(mode), "w0")

    response = call(middleware, "/metrics")
    assert response.code == 200
    assert b"http_requests_total" in response.body
    assert b"http_request_duration_seconds_bucket" in response.body
    assert b"http_request_exceptions_total" in response.body
    if mode is not None:
        assert b"gunicorn_worker_resident_memory_bytes" in response.body

    checked = promtool_check(response.body)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout.strip() == ""


@pytest.mark.requires_tool(PROMTOOL)
def test_promtool_sees_problems(registry: CollectorRegistry) -> None:
    """The check above is a real one: promtool rejects a metric without help text."""
    checked = promtool_check(b"# TYPE things counter\nthings 1\n")
    assert checked.returncode != 0
