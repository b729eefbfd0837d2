"""The C record (``_speedups``): chosen when built, replaceable, and alike to the Python one."""

from __future__ import annotations

import ast
import inspect
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry
from support import require_speedups

from ml_wsgi_metrics import UNMATCHED, MetricsMiddleware, _response, _slots, multiprocess
from ml_wsgi_metrics._response import PythonTimedResponse
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.metrics import RequestMetrics

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


# -- the contract between _speedups.c and the Python side -------------------------------------

C_SOURCE = (REPO / "ml_wsgi_metrics" / "_speedups.c").read_text()
STUB = ast.parse((REPO / "ml_wsgi_metrics" / "_speedups.pyi").read_text())
#: Every name the C code makes from a literal, by its C variable.
INTERNED = dict(re.findall(r'INTERN\((s_\w+), "([^"]*)"\)', C_SOURCE))
#: (object expression, C variable) of every attribute read or method called by name.
READS = re.findall(
    r"(?:PyObject_GetAttr|PyObject_CallMethod\w*|add_to_series_cell|observe)\(\s*([^,()]+|"
    r"\(PyObject \*\)Py_TYPE\(\w+\)),\s*(s_\w+)",
    C_SOURCE,
)
#: What each object expression of the C code is on the Python side (None: any object).
OWNERS = {
    "series": "route series",
    "self->metrics": "request metrics",
    "storage_state": "storage state",
    "iterable": None,
    "type": None,
    "(PyObject *)Py_TYPE(error)": None,
}
#: Names the C code compares against (keyword arguments).
COMPARED = re.findall(r'PyUnicode_CompareWithASCIIString\([^"]*"([^"]*)"\)', C_SOURCE)
MEMBERS = re.findall(r'\{"(\w+)", T_\w+, offsetof\(Record', C_SOURCE)
RECORD_METHODS = C_SOURCE[C_SOURCE.index("Record_methods[] = {") :].split("{NULL}")[0]
METHODS = re.findall(r'\{"(\w+)", \(PyCFunction\)', RECORD_METHODS)
#: The model signals' kernel, beside the record: it reads no Python name.
KERNEL_EXPORTS = {
    *("NumericKernel", "CategoryCounter", "add_amounts", "add_categories", "use_avx2"),
    "count_classes",
}


def python_owners() -> dict[str, Any]:
    metrics = RequestMetrics(CollectorRegistry())
    return {
        "route series": metrics.route_series("GET", "/contract"),
        "request metrics": metrics,
        "storage state": _slots.State,
    }


def test_the_c_source_is_parsed_whole() -> None:
    """The patterns below find what the C code reads (an empty parse would pass anything)."""
    assert len(INTERNED) == C_SOURCE.count("INTERN(s_") == 27
    assert {variable for _, variable in READS} <= set(INTERNED)
    assert (len(READS), COMPARED, len(MEMBERS), len(METHODS)) == (20, ["exc_info"], 5, 5)


def test_every_name_the_c_record_reads_exists_on_the_python_side() -> None:
    owners = python_owners()
    missing = []
    for expression, variable in READS:
        assert expression in OWNERS, f"classify what {expression!r} is in OWNERS"
        owner = OWNERS[expression]
        if owner is not None and not hasattr(owners[owner], INTERNED[variable]):
            missing.append(f"{owner}.{INTERNED[variable]}")
    assert missing == []


def test_every_value_the_c_record_uses_is_the_python_records() -> None:
    """Labels, stages and environ keys made from literals are the Python record's too."""
    read = {variable for _, variable in READS}
    source = Path(_response.__file__).read_text()
    parameters = inspect.signature(PythonTimedResponse.start_response).parameters
    values = [text for variable, text in INTERNED.items() if variable not in read]
    assert [v for v in values if f'"{v}"' not in source] == []
    assert [name for name in COMPARED if name not in parameters] == []


def test_the_contract_docstring_lists_every_name_the_c_code_reads() -> None:
    documented = set(re.findall(r"``([^`]*)``", _response.__doc__ or ""))
    named = {name or '""' for name in (*INTERNED.values(), *COMPARED, *MEMBERS)}
    assert sorted(named - documented) == []


def test_the_record_exposes_what_the_python_helpers_read() -> None:
    assert set(MEMBERS) <= set(PythonTimedResponse.__slots__)
    c_record = require_speedups().TimedResponse
    assert [name for name in (*MEMBERS, *METHODS) if not hasattr(c_record, name)] == []


def test_the_stub_types_exactly_what_the_extension_exports() -> None:
    speedups = require_speedups()
    functions = {n.name: n for n in STUB.body if isinstance(n, ast.FunctionDef)}
    classes = {n.name: n for n in STUB.body if isinstance(n, ast.ClassDef)}
    record = classes["TimedResponse"]
    typed = {
        node.target.id if isinstance(node, ast.AnnAssign) else node.name  # type: ignore[union-attr]
        for node in record.body
        if isinstance(node, (ast.AnnAssign, ast.FunctionDef))
    }
    exported = {name for name in vars(speedups) if not name.startswith("__")}
    exports = {"configure", "TimedResponse", "count_categories", *KERNEL_EXPORTS}
    assert exported == {*functions, *classes} == exports
    arity = re.search(r'PyArg_UnpackTuple\(args, "configure", (\d+), \1', C_SOURCE)
    assert arity is not None
    assert len(functions["configure"].args.posonlyargs) == int(arity.group(1))
    assert {*MEMBERS, *METHODS, "__init__", "__iter__", "__next__"} == typed
