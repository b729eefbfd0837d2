"""The timed response: the clock stops at ``close()``; every request is recorded exactly once.

Apps are called directly with a hand-built environ, and the tests play the server: they
iterate (or not) and call ``close()`` themselves.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
import wsgiref.util
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gunicorn.http.wsgi
import pytest
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import MetricsMiddleware

# Every test runs with the C record and with the pure-Python one.
pytestmark = pytest.mark.usefixtures("record_implementation")

ROUTE = "/r"


class Boom(Exception):
    pass


class Server:
    """Plays the server's part: one ``start_response`` remembering what it was given."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, str]], Any]] = []

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], None]:
        self.calls.append((status, headers, exc_info))
        return lambda data: None


class Closing:
    """A response iterable counting its ``close()`` calls (and optionally failing in them)."""

    def __init__(
        self,
        chunks: Iterable[bytes] = (b"body",),
        *,
        raise_after: int | None = None,
        close_error: BaseException | None = None,
    ) -> None:
        self.chunks = list(chunks)
        self.raise_after = raise_after
        self.close_error = close_error
        self.closed = 0

    def __iter__(self) -> Iterator[bytes]:
        for n, chunk in enumerate(self.chunks):
            if n == self.raise_after:
                raise Boom("while iterating")
            yield chunk

    def close(self) -> None:
        self.closed += 1
        if self.close_error is not None:
            raise self.close_error


def returning(response: Any, status: str = "200 OK") -> Callable[..., Any]:
    """An app answering ``status`` with ``response`` as its iterable."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response(status, [("Content-Type", "text/plain")])
        return response

    return app


def measured(app: Callable[..., Any], registry: CollectorRegistry) -> MetricsMiddleware:
    return MetricsMiddleware(app, registry=registry, route_resolver=lambda environ: ROUTE)


def recorded(registry: CollectorRegistry) -> dict[str, float]:
    """Every ``http_requests_total`` sample of the route, by status."""
    return {
        s.labels["status"]: s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "http_requests_total" and s.labels["route"] == ROUTE
    }


def durations(registry: CollectorRegistry) -> tuple[float, float]:
    """``(count, sum)`` of the route's duration histogram."""
    labels = {"method": "GET", "route": ROUTE}
    count = registry.get_sample_value("http_request_duration_seconds_count", labels) or 0.0
    total = registry.get_sample_value("http_request_duration_seconds_sum", labels) or 0.0
    return count, total


def exceptions(registry: CollectorRegistry) -> dict[str, float]:
    return {
        s.labels["exception"]: s.value
        for metric in registry.collect()
        for s in metric.samples
        if s.name == "http_request_exceptions_total"
    }


# -- timing ---------------------------------------------------------------------------------


def test_streaming_response_is_timed_to_its_last_byte(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    pause, chunks = 0.03, 4

    def streaming(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        for n in range(chunks):
            if n:
                time.sleep(pause)
            yield b"chunk %d\n" % n

    server = Server()
    iterable = measured(streaming, registry)(environ(), server.start_response)
    assert durations(registry) == (0, 0)  # returned, but nothing sent yet
    body = b"".join(iterable)
    assert durations(registry) == (0, 0)  # sent, but not closed yet
    iterable.close()

    count, total = durations(registry)
    assert count == 1
    assert total >= pause * (chunks - 1)
    assert recorded(registry) == {"200": 1}
    size = registry.get_sample_value(
        "http_response_size_bytes_sum", {"method": "GET", "route": ROUTE}
    )
    assert size == len(body)


def test_generator_calling_start_response_late_gets_its_status(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    def late(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        yield from ()  # a generator: nothing runs before the server iterates
        start_response("201 Created", [])
        yield b"made"

    server = Server()
    iterable = measured(late, registry)(environ(), server.start_response)
    assert server.calls == []
    assert list(iterable) == [b"made"]
    iterable.close()

    assert server.calls[0][0] == "201 Created"
    assert recorded(registry) == {"201": 1}


@pytest.mark.parametrize(
    "by_keyword", [pytest.param(False, id="positional"), pytest.param(True, id="keyword")]
)
def test_exc_info_is_passed_through_start_response(
    by_keyword: bool, registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    given: list[Any] = []

    def recovering(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        try:
            raise Boom("rendering failed")
        except Boom:
            info = sys.exc_info()
            given.append(info)
            if by_keyword:
                start_response("500 Internal Server Error", [("X-Error", "1")], exc_info=info)
            else:
                start_response("500 Internal Server Error", [("X-Error", "1")], info)
        return [b"sorry"]

    server = Server()
    iterable = measured(recovering, registry)(environ(), server.start_response)
    assert list(iterable) == [b"sorry"]
    iterable.close()

    assert server.calls[-1] == ("500 Internal Server Error", [("X-Error", "1")], given[0])
    assert server.calls[-1][2] is given[0]
    assert server.calls[0][2] is None
    assert recorded(registry) == {"500": 1}


# -- recorded exactly once, inner close() always called --------------------------------------


@pytest.mark.parametrize("times", [pytest.param(1, id="once"), pytest.param(3, id="thrice")])
def test_close_is_idempotent(
    times: int, registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    response = Closing()
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    list(iterable)
    for _ in range(times):
        iterable.close()

    assert response.closed == 1
    assert recorded(registry) == {"200": 1}
    assert durations(registry)[0] == 1


def test_never_iterated_response_is_recorded_once_at_close(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    response = Closing([b"never", b"sent"])
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    assert recorded(registry) == {}
    iterable.close()
    iterable.close()

    assert response.closed == 1
    assert recorded(registry) == {"200": 1}
    size = registry.get_sample_value(
        "http_response_size_bytes_sum", {"method": "GET", "route": ROUTE}
    )
    assert size == 0


def test_never_started_generator_is_recorded_once(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    def lazy(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"never"

    iterable = measured(lazy, registry)(environ(), Server().start_response)
    iterable.close()
    iterable.close()
    # The app never got to call start_response: nothing was sent, counted as a failure.
    assert sum(recorded(registry).values()) == 1
    assert durations(registry)[0] == 1


def test_raising_while_iterating_is_recorded_once_as_500(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    response = Closing([b"one", b"two", b"three"], raise_after=1)
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    sent: list[bytes] = []
    with pytest.raises(Boom):
        for chunk in iterable:
            sent.append(chunk)
    iterable.close()
    iterable.close()

    assert sent == [b"one"]
    assert response.closed == 1
    assert recorded(registry) == {"500": 1}
    assert exceptions(registry) == {"Boom": 1}
    assert durations(registry)[0] == 1


def test_exception_from_a_generator_propagates_unchanged(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    error = Boom("mid-stream")

    def failing(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterator[bytes]:
        start_response("200 OK", [])
        yield b"first"
        raise error

    iterable = measured(failing, registry)(environ(), Server().start_response)
    with pytest.raises(Boom) as raised:
        list(iterable)
    iterable.close()
    assert raised.value is error
    assert recorded(registry) == {"500": 1}


def test_app_raising_before_returning_is_recorded_once(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    error = Boom("before returning")

    def crashing(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        start_response("200 OK", [])
        raise error

    with pytest.raises(Boom) as raised:
        measured(crashing, registry)(environ(), Server().start_response)

    assert raised.value is error
    assert recorded(registry) == {"500": 1}
    assert exceptions(registry) == {"Boom": 1}
    assert durations(registry)[0] == 1


def test_close_raising_is_recorded_once_and_propagates(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    error = Boom("in close")
    response = Closing(close_error=error)
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    assert list(iterable) == [b"body"]
    with pytest.raises(Boom) as raised:
        iterable.close()
    iterable.close()  # a second close neither closes again nor records again

    assert raised.value is error
    assert response.closed == 1
    assert sum(recorded(registry).values()) == 1
    assert exceptions(registry) == {"Boom": 1}
    assert durations(registry)[0] == 1


@pytest.mark.parametrize(
    ("make_response", "iterate"),
    [
        pytest.param(lambda: Closing([b"a", b"b"]), True, id="fully-iterated"),
        pytest.param(lambda: Closing([b"a", b"b"]), False, id="never-iterated"),
        pytest.param(
            lambda: Closing([b"a", b"b"], raise_after=1), True, id="raising-while-iterating"
        ),
        pytest.param(
            lambda: Closing([b"a", b"b"], raise_after=0), True, id="raising-at-first-chunk"
        ),
        pytest.param(lambda: Closing(close_error=Boom("close")), True, id="close-raising"),
        pytest.param(
            lambda: Closing(close_error=KeyboardInterrupt()), False, id="close-interrupted"
        ),
    ],
)
def test_inner_close_is_always_called_once(
    make_response: Callable[[], Closing],
    iterate: bool,
    registry: CollectorRegistry,
    environ: Callable[..., dict[str, Any]],
) -> None:
    response = make_response()  # a fresh one per run: the test runs once per record
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    with contextlib.suppress(Boom):
        if iterate:
            for _ in iterable:
                pass
    with contextlib.suppress(Boom, KeyboardInterrupt):
        iterable.close()
    assert response.closed == 1
    assert sum(recorded(registry).values()) == 1


def test_instrumentation_failure_in_close_still_closes_the_inner_iterable(
    break_series: Callable[..., None],
    registry: CollectorRegistry,
    environ: Callable[..., dict[str, Any]],
) -> None:
    break_series(started=True, finished=True)
    response = Closing()
    iterable = measured(returning(response), registry)(environ(), Server().start_response)
    assert list(iterable) == [b"body"]
    iterable.close()
    assert response.closed == 1


# -- wsgi.file_wrapper ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_wrapper",
    [
        pytest.param(gunicorn.http.wsgi.FileWrapper, id="gunicorn"),
        pytest.param(wsgiref.util.FileWrapper, id="wsgiref"),
    ],
)
@pytest.mark.parametrize(
    "iterate", [pytest.param(False, id="sendfile"), pytest.param(True, id="read")]
)
def test_file_wrapper_is_passed_through_and_recorded_at_close(
    file_wrapper: type,
    iterate: bool,
    tmp_path: Path,
    registry: CollectorRegistry,
    environ: Callable[..., dict[str, Any]],
) -> None:
    path = tmp_path / "payload.bin"
    path.write_bytes(b"x" * 10_000)
    handed: list[Any] = []

    def serving_a_file(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [("Content-Length", "10000")])
        wrapper = environ["wsgi.file_wrapper"](open(path, "rb"), 4096)  # noqa: SIM115
        handed.append(wrapper)
        return wrapper

    iterable = measured(serving_a_file, registry)(
        environ(**{"wsgi.file_wrapper": file_wrapper}), Server().start_response
    )
    assert iterable is handed[0]  # the server still sees its own wrapper: sendfile works
    assert isinstance(iterable, file_wrapper)
    assert recorded(registry) == {}
    if iterate:
        assert b"".join(iterable) == b"x" * 10_000
    iterable.close()
    iterable.close()

    assert iterable.filelike.closed
    assert recorded(registry) == {"200": 1}
    size = registry.get_sample_value(
        "http_response_size_bytes_sum", {"method": "GET", "route": ROUTE}
    )
    assert size == 10_000


def test_file_wrapper_that_cannot_be_hooked_is_wrapped_and_recorded(
    registry: CollectorRegistry, environ: Callable[..., dict[str, Any]]
) -> None:
    class Slotted:
        __slots__ = ("filelike",)

        def __init__(self, filelike: Any, blksize: int = 8192) -> None:
            self.filelike = filelike

        def __iter__(self) -> Iterator[bytes]:
            yield self.filelike.read()

        def close(self) -> None:
            self.filelike.close()

    def serving_a_file(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        start_response("200 OK", [])
        return environ["wsgi.file_wrapper"](io.BytesIO(b"abc"))

    iterable = measured(serving_a_file, registry)(
        environ(**{"wsgi.file_wrapper": Slotted}), Server().start_response
    )
    assert not isinstance(iterable, Slotted)
    assert list(iterable) == [b"abc"]
    iterable.close()
    assert recorded(registry) == {"200": 1}
    size = registry.get_sample_value(
        "http_response_size_bytes_sum", {"method": "GET", "route": ROUTE}
    )
    assert size == 3
