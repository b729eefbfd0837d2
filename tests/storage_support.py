"""Helpers of the storage tests (``test_multiprocess.py``, ``test_slots.py``).

Processes are forked (``multiprocessing``'s fork context), as gunicorn forks its workers; a
child reports back through a pipe, and a child killed by a signal (SIGBUS) fails the test
without taking pytest down with it.
"""

from __future__ import annotations

import multiprocessing
import signal
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import MetricsMiddleware
from ml_wsgi_metrics.exposition import scrape_registry

FORK = multiprocessing.get_context("fork")


def start_child(work: Callable[[], Any]) -> tuple[Any, Any]:
    """Fork a child running ``work``; ``finish_child`` collects its result."""
    receive, send = FORK.Pipe(duplex=False)

    def child() -> None:
        try:
            send.send(("ok", work()))
        except BaseException:
            send.send(("error", traceback.format_exc()))

    process = FORK.Process(target=child)
    process.start()
    send.close()
    return process, receive


def finish_child(process: Any, receive: Any) -> Any:
    """The child's result; a traceback or a killing signal fails the test."""
    try:
        outcome, value = receive.recv() if receive.poll(30) else ("error", "no answer")
    except EOFError:
        outcome, value = "error", "the child died without answering"
    process.join(30)
    if process.exitcode is None:
        process.kill()
        process.join()
    if process.exitcode and process.exitcode < 0:
        pytest.fail(f"child killed by {signal.Signals(-process.exitcode).name}: {value}")
    assert outcome == "ok", value
    assert process.exitcode == 0
    return value


def in_child(work: Callable[[], Any]) -> Any:
    """Run ``work`` in a forked child and return its result."""
    return finish_child(*start_child(work))


def db_files(directory: Path) -> set[str]:
    return {path.name for path in directory.glob("*.db")}


def merged(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return scrape_registry(registry).get_sample_value(name, labels) or 0.0


def hello_middleware(registry: CollectorRegistry, hello: Any) -> MetricsMiddleware:
    return MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: e["PATH_INFO"])


ERRORS = "ml_wsgi_metrics_instrumentation_errors_total"


def requests_to(registry: CollectorRegistry, route: str, status: str = "200") -> float:
    return merged(registry, "http_requests_total", method="GET", route=route, status=status)


CORRUPTIONS = {
    "garbage": b"\xff" * 4096,
    "truncated-header": b"\x10\x00",
    "entry-not-json": None,  # a well-formed file whose key is not JSON
}


def corrupt(path: Path, how: str) -> None:
    content = CORRUPTIONS[how]
    if content is None:
        from prometheus_client.mmap_dict import MmapedDict

        written = MmapedDict(str(path))
        written.write_value("not json", 1.0, 0.0)
        written.close()
    else:
        path.write_bytes(content)
