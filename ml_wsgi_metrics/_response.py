"""The per-request record: captures the status, learns the route, records once on ``close()``."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from time import perf_counter
from typing import Any

from ._context import current as bound_model
from .metrics import RequestMetrics, RouteSeries
from .routes import UNMATCHED

__all__ = ["TimedResponse"]

log = logging.getLogger("ml_wsgi_metrics")

_logged_stages: set[str] = set()

StartResponse = Callable[..., Callable[[bytes], object]]


def _content_length(headers: list[tuple[str, str]] | None) -> int:
    for name, value in headers or ():
        if name.lower() == "content-length":
            try:
                return int(value)
            except ValueError:
                return 0
    return 0


class TimedResponse:
    """One measured request, and the iterable handed back to the server.

    The clock stops when the server calls :meth:`close`, i.e. after the last byte of a
    streaming response; a response that is never iterated, or that raises, records once too.
    ``close()`` is idempotent and always closes the inner iterable first.
    """

    __slots__ = (
        "_closed",
        "_exception",
        "_headers",
        "_iterable",
        "_method",
        "_metrics",
        "_request_size",
        "_response_size",
        "_script_name",
        "_series",
        "_start",
        "_start_response",
        "_status",
    )

    def __init__(
        self,
        metrics: RequestMetrics,
        method: str,
        script_name: str,
        request_size: int,
        start_response: StartResponse,
    ) -> None:
        self._start = perf_counter()
        self._metrics = metrics
        self._method = method
        self._script_name = script_name
        self._request_size = request_size
        self._start_response = start_response
        self._series: RouteSeries | None = None
        self._status: str | None = None
        self._headers: list[tuple[str, str]] | None = None
        self._exception: str | None = None
        self._iterable: Iterable[bytes] = ()
        self._response_size = 0
        self._closed = False

    # -- during the request ------------------------------------------------------------------

    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        """The ``start_response`` given to the app: notes the status, passes everything on."""
        self._status = status
        self._headers = headers
        return self._start_response(status, headers, exc_info)

    def set_route(self, route: str) -> None:
        """Name the matched route (via :func:`ml_wsgi_metrics.routes.set_route`); first wins."""
        if self._series is not None:
            return
        base = self._script_name
        if base and route.startswith(base):
            route = route[len(base) :] or "/"
        try:
            series = self._metrics.route_series(self._method, route)
            series.started()
            self._series = series
        except Exception as error:
            self.instrumentation_failed("route", error)

    def failed(self, error: BaseException) -> None:
        """The app raised instead of returning: record now, as a 500."""
        self._exception = type(error).__name__
        self.close()

    def wrap(self, iterable: Iterable[bytes], file_wrapper: Any) -> Iterable[bytes]:
        """The iterable to give the server: ``self``, or a file wrapper left to its sendfile."""
        self._iterable = iterable
        if isinstance(file_wrapper, type) and isinstance(iterable, file_wrapper):
            inner_close = getattr(iterable, "close", None)

            def close() -> None:
                try:
                    if inner_close is not None:
                        inner_close()
                finally:
                    self._response_size = _content_length(self._headers)
                    self._iterable = ()
                    self.close()

            try:
                iterable.close = close  # type: ignore[attr-defined]
                return iterable
            except (AttributeError, TypeError):
                pass  # no instance dict: wrap it, at the cost of the server's sendfile
        return self

    # -- the response iterable ---------------------------------------------------------------

    def __iter__(self) -> Iterator[bytes]:
        try:
            for chunk in self._iterable:
                self._response_size += len(chunk)
                yield chunk
        except GeneratorExit:
            raise
        except BaseException as error:
            self._exception = type(error).__name__
            raise

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self._iterable, "close", None)
            if close is not None:
                close()
        except BaseException as error:
            self._exception = type(error).__name__
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
            if self._exception is not None or status is None:
                status = "500"
                exception = self._exception or "NoStartResponse"
                self._metrics.exceptions.labels(*series.labels, exception).inc()
            else:
                status = self._metrics.status_label(status)
            series.finished(status, duration, self._request_size, self._response_size, was_started)
            model = bound_model()
            if model is not None:
                self._metrics.count_model_request(series, status, model)
        except Exception as error:
            self.instrumentation_failed("record", error)

    def instrumentation_failed(self, stage: str, error: Exception) -> None:
        if stage not in _logged_stages:  # the first of each kind in full, then briefly
            _logged_stages.add(stage)
            log.warning("ml_wsgi_metrics: %s failed: %r", stage, error, exc_info=error)
        else:
            log.debug("ml_wsgi_metrics: %s failed: %r", stage, error)
        try:
            self._metrics.count_instrumentation_error(stage)
        except Exception:
            log.exception("ml_wsgi_metrics: could not count an instrumentation error")
