"""The per-request record: captures the status, learns the route, records once on ``close()``.

Two implementations behave alike: the C one in ``_speedups`` (built by ``pip install``; it
adds less than half of what the Python one adds to a request) and :class:`PythonTimedResponse`,
used where the extension is not built or ``ML_WSGI_METRICS_PURE_PYTHON=1`` is set. The tests
run both.

The C record's contract: ``_speedups.pyi`` types what the extension exports (``configure``,
called below with the Python objects it works with, and ``TimedResponse``). Besides those, the
C code reads these names by string (``tests/test_speedups.py`` parses ``_speedups.c`` and fails
when one is missing here or on the Python side):

- on ``_slots.State`` (the storage): ``generation``;
- on a ``_series.RouteSeries``: ``_generation``, ``refresh``, ``_counts``, ``_add_status``,
  ``_duration``, ``_request_size``, ``_response_size``, ``_in_progress``: cells
  ``(store, key)`` and histograms ``(bounds, [bucket cells], sum cell)`` as ``_series`` takes
  them;
- on a ``metrics.RequestMetrics``: ``routes``, ``route_series``, ``group_status_codes``,
  ``count_exception``, ``count_model_request``, ``mount_prefixes``;
- on any object: ``close`` (the app's iterable), ``__name__`` (an exception's class);
- values, not attributes: the error stages ``route`` and ``record``, the status ``500``, the
  exception name ``NoStartResponse``, the grouped status suffix ``xx``, the environ keys
  ``REQUEST_METHOD``, ``SCRIPT_NAME``, ``CONTENT_LENGTH`` and ``wsgi.file_wrapper``, the
  ``start_response`` keyword ``exc_info``, and ``""``.

Both records expose ``_iterable``, ``_headers``, ``_series``, ``_metrics`` and
``_response_size`` to :func:`pass_file` and :func:`instrumentation_failed`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any, Protocol

from . import _context
from ._context import current as bound_model
from ._context import reset as reset_bound_model
from ._errors import report
from ._series import RouteSeries, speedups
from ._slots import State as storage_state
from .metrics import RequestMetrics
from .routes import REQUEST_KEY, UNMATCHED, mount_prefix

__all__ = [
    "METHODS",
    "OTHER_METHOD",
    "PythonTimedResponse",
    "RequestRecord",
    "TimedResponse",
    "speedups",
]

#: The ``method`` label's closed set; anything else is counted as ``_OTHER``.
METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "CONNECT", "TRACE")
)
OTHER_METHOD = "_OTHER"

StartResponse = Callable[..., Callable[[bytes], object]]


def _content_length(headers: list[tuple[str, str]] | None) -> int:
    for name, value in headers or ():
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


def instrumentation_failed(record: Any, stage: str, error: BaseException) -> None:
    """Log an error inside the instrumentation (the first of each stage in full), count it
    in the request's metrics (the one error channel: :func:`ml_wsgi_metrics._errors.report`)."""
    report(stage, error, export=record._metrics.count_instrumentation_error)


def pass_file(record: Any, file: Any) -> Any:
    """Hand a ``wsgi.file_wrapper`` back to the server's sendfile; record when it closes."""
    inner_close = getattr(file, "close", None)

    def close() -> None:
        try:
            if inner_close is not None:
                inner_close()
        finally:
            record._response_size = _content_length(getattr(record, "_headers", None))
            record.close()

    try:
        file.close = close
        return file
    except (AttributeError, TypeError):  # no instance dict: wrapped, without sendfile
        record._iterable = file
        return record


def _request_size(content_length: str) -> int:
    try:
        return max(int(content_length), 0)
    except ValueError:
        return 0


class RequestRecord(Protocol):
    """What the middleware calls on a measured request's record (Python or C)."""

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], Any]: ...
    def set_route(self, route: str, script_name: str | None = None) -> None: ...
    def failed(self, error: BaseException) -> None: ...
    def respond(self, iterable: Iterable[bytes], environ: dict[str, Any]) -> Iterable[bytes]: ...


class PythonTimedResponse:
    """One measured request, and the iterable handed back to the server.

    The clock stops when the server calls :meth:`close`, i.e. after the last byte of a
    streaming response; a response that is never iterated, or that raises, records once too.
    ``close()`` is idempotent and always closes the inner iterable first.
    """

    __slots__ = (
        "_exception",
        "_headers",
        "_iterable",
        "_method",
        "_metrics",
        "_request_length",
        "_response_size",
        "_script_name",
        "_series",
        "_start",
        "_start_response",
        "_status",
    )

    def __init__(
        self, metrics: RequestMetrics, environ: dict[str, Any], start_response: StartResponse
    ) -> None:
        """Start timing the request, and keep this record in its environ."""
        self._start = perf_counter()
        self._metrics = metrics
        method = environ.get("REQUEST_METHOD", "")
        self._method = method if method in METHODS else OTHER_METHOD
        script_name = environ.get("SCRIPT_NAME", "")
        self._script_name = script_name if isinstance(script_name, str) else ""
        self._request_length = environ.get("CONTENT_LENGTH")  # parsed when recording
        self._start_response = start_response
        self._series: RouteSeries | None = None
        self._status: str | None = None  # None after an exception: recorded as a 500
        self._iterable: Iterable[bytes] | None = ()  # None once closed
        self._response_size = 0
        environ[REQUEST_KEY] = self
        if bound_model() is not None:  # bound by this thread's last request: not ours
            reset_bound_model()

    # -- during the request ------------------------------------------------------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        """The ``start_response`` given to the app: notes the status, passes everything on."""
        self._status = status
        self._headers = headers
        return self._start_response(status, headers, exc_info)

    def set_route(self, route: str, script_name: str | None = None) -> None:
        """Name the matched route (via :func:`ml_wsgi_metrics.routes.set_route`); first wins.

        ``script_name``: the ``SCRIPT_NAME`` the framework matched under, of which only a
        known mount prefix is kept (:func:`~ml_wsgi_metrics.routes.mount_prefix`).
        """
        if self._series is not None:
            return
        try:
            if script_name is not None and script_name != self._script_name:  # a mount, or not
                mounts = self._metrics.mount_prefixes
                route = mount_prefix(mounts, self._script_name, script_name) + route
            series = self._metrics.routes.get((self._method, route))
            if series is None:
                series = self._metrics.route_series(self._method, route)
            series.started()
            self._series = series
        except Exception as error:
            instrumentation_failed(self, "route", error)

    def failed(self, error: BaseException) -> None:
        """The app raised instead of returning: record now, as a 500."""
        self._raised(error)
        self.close()

    def _raised(self, error: BaseException) -> None:
        self._exception = type(error).__name__
        self._status = None

    def respond(self, iterable: Iterable[bytes], environ: dict[str, Any]) -> Iterable[bytes]:
        """The iterable to give the server for the app's: this record, or a file wrapper."""
        file_wrapper = environ.get("wsgi.file_wrapper")  # its exact class: the server's sendfile
        if file_wrapper is not None and type(iterable) is file_wrapper:
            passed: Iterable[bytes] = pass_file(self, iterable)
            return passed
        self._iterable = iterable
        return self

    # -- the response iterable ---------------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._iterable:  # type: ignore[union-attr]
                self._response_size += len(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as error:
            self._raised(error)
            raise

    def close(self) -> None:
        iterable = self._iterable
        if iterable is None:
            return
        self._iterable = None
        try:
            close = getattr(iterable, "close", None)
            if close is not None:
                close()
        except BaseException as error:
            self._raised(error)
            raise
        finally:
            self._record()

    # -- recording ---------------------------------------------------------------------------

    def _record(self) -> None:
        duration = perf_counter() - self._start
        try:
            series = self._series
            was_started = series is not None
            if series is None:
                series = self._metrics.route_series(self._method, UNMATCHED)
            status = self._status
            if status is None:
                status = "500"
                self._metrics.count_exception(
                    series, getattr(self, "_exception", "NoStartResponse")
                )
            elif self._metrics.group_status_codes:
                status = status[0] + "xx"
            else:
                status = status[:3]
            length = self._request_length
            request_size = _request_size(length) if length else 0
            series.finished(status, duration, request_size, self._response_size, was_started)
            model = bound_model()
            if model is not None:
                self._metrics.count_model_request(series, status, model)
        except Exception as error:
            instrumentation_failed(self, "record", error)


if speedups is None:  # not built, or ML_WSGI_METRICS_PURE_PYTHON set
    TimedResponse: type = PythonTimedResponse
else:
    speedups.configure(
        storage_state,
        _context._model,
        UNMATCHED,
        instrumentation_failed,
        pass_file,
        mount_prefix,
        METHODS,
        OTHER_METHOD,
        REQUEST_KEY,
    )
    TimedResponse = speedups.TimedResponse
