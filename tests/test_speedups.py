"""The C record (``_speedups``): chosen when built, replaceable, and alike to the Python one."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from support import require_speedups

from ml_wsgi_metrics import UNMATCHED, MetricsMiddleware, _slots, multiprocess
from ml_wsgi_metrics._response import PythonTimedResponse
from ml_wsgi_metrics.exposition import scrape_registry

REPO = Path(__file__).resolve().parent.parent


def record_class_in_a_fresh_process(**env: str) -> str:
    code = "from ml_wsgi_metrics import MetricsMiddleware as M; print(M.response_class.__module__)"
    environment = {k: v for k, v in os.environ.items() if k != "ML_WSGI_METRICS_PURE_PYTHON"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**environment, **env},
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def test_the_built_package_uses_the_c_record() -> None:
    require_speedups()
    assert record_class_in_a_fresh_process() == "ml_wsgi_metrics._speedups"


def test_the_pure_python_record_can_be_forced() -> None:
    forced = record_class_in_a_fresh_process(ML_WSGI_METRICS_PURE_PYTHON="1")
    assert forced == "ml_wsgi_metrics._response"


def flask_app() -> Flask:
    app = Flask("alike")

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return "x" * item_id

    @app.post("/echo")
    def echo() -> bytes:
        from flask import request

        return request.get_data()

    @app.get("/crash")
    def crash() -> str:
        raise KeyError("boom")

    @app.get("/stream")
    def stream() -> Any:
        def chunks() -> Any:
            yield b"a" * 10
            yield b"b" * 5000

        return app.response_class(chunks())

    return app


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def exercise(record: type, call: Callable[..., Any]) -> Samples:
    """Samples after one fixed mix of requests, timings left out."""
    registry = CollectorRegistry()
    app = flask_app()
    app.wsgi_app = middleware = MetricsMiddleware(app.wsgi_app, registry=registry)
    middleware.response_class = record
    for n in (1, 2, 300, 4000):
        assert call(app, f"/items/{n}").code == 200
    assert call(app, "/echo", "POST", body=b"z" * 70).body == b"z" * 70
    assert call(app, "/crash").code == 500
    assert call(app, "/stream").body == b"a" * 10 + b"b" * 5000
    assert call(app, "/nowhere").code == 404
    assert call(app, "/items/1", "BREW").code == 405
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in scrape_registry(registry).collect()
        for s in metric.samples
        if not s.name.startswith("http_request_duration_seconds")
        and not s.name.endswith("_created")
    }


def test_both_records_count_alike(mode: Path | None, call: Callable[..., Any]) -> None:
    in_c = exercise(require_speedups().TimedResponse, call)
    if mode is not None:  # the second run must not see the first one's files
        multiprocess.activate(mode.parent / "second-run")
    in_python = exercise(PythonTimedResponse, call)
    assert in_c == in_python
    requests = {k: v for k, v in in_c.items() if k[0] == "http_requests_total"}
    assert sum(requests.values()) == 9
    assert in_c[("http_response_size_bytes_sum", (("method", "GET"), ("route", "/stream")))] == 5010


def test_storage_closed_under_the_record_fails_open(
    record_implementation: type,
    multiprocess_dir: Path,
    call: Callable[..., Any],
    hello: Any,
    caplog: pytest.LogCaptureFixture,
    storage_clock: Any,
    sample: Callable[..., float],
) -> None:
    """Views of closed files are refused, never written through (the C record checks); what
    is counted meanwhile is kept in memory and reaches the files when they are reopened."""
    registry = CollectorRegistry()
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    assert call(app, "/r").body == b"hello"
    for handle in _slots.State.files.values():  # closed without telling anyone
        handle.close()
    with caplog.at_level(logging.DEBUG, logger="ml_wsgi_metrics"):
        assert call(app, "/r").body == b"hello"
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "route failed" in messages
    assert "opening counter failed" in messages

    storage_clock.advance(multiprocess.RETRY_SECONDS)  # the scrape retries the files
    requests = {"method": "GET", "status": "200"}
    assert sample(registry, "http_requests_total", route="/r", **requests) == 1
    assert sample(registry, "http_requests_total", route=UNMATCHED, **requests) == 1
    assert sample(registry, "http_requests_in_progress", method="GET", route="/r") == 0
    errors = "ml_wsgi_metrics_instrumentation_errors_total"
    assert sample(registry, errors, stage="route") == 1
    assert sample(registry, errors, stage="storage_open") > 0


def test_records_follow_the_storage_when_it_moves(
    record_implementation: type,
    multiprocess_dir: Path,
    call: Callable[..., Any],
    hello: Any,
    sample: Callable[..., float],
) -> None:
    """A worker given its slot after the series were made writes them into the slot's files."""
    registry = CollectorRegistry()
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    assert call(app, "/r").body == b"hello"
    multiprocess.use_identifier("w3")
    assert call(app, "/r").body == b"hello"
    labels = {"method": "GET", "route": "/r"}
    assert sample(registry, "http_requests_total", status="200", **labels) == 2
    assert sample(registry, "http_requests_in_progress", **labels) == 0
    assert sample(registry, "ml_wsgi_metrics_instrumentation_errors_total", stage="route") == 0
    assert sorted(p.name for p in multiprocess_dir.glob("*_w3.db"))
