"""The C record's exports (``_speedups.c``), typed: the extension's contract with Python.

What the C code reads from the Python side by name is listed in the docstring of
:mod:`ml_wsgi_metrics._response`; ``tests/test_speedups.py`` checks both against the C source.
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np
import numpy.typing as npt

from ._series import RouteSeries
from .metrics import RequestMetrics

def configure(
    storage_state: type,
    model_var: ContextVar[tuple[str, str] | None],
    unmatched: str,
    instrumentation_failed: Callable[[TimedResponse, str, BaseException], None],
    pass_file: Callable[[TimedResponse, Any], Any],
    mount_prefix: Callable[[Collection[str], str, str], str],
    methods: frozenset[str],
    other_method: str,
    request_key: str,
    /,
) -> None:
    """Hand the record the Python objects it works with (``_response`` calls it at import)."""

def count_categories(
    values: Sequence[Any] | npt.NDArray[np.object_],
    categories: tuple[str, ...],
    code: Callable[[Any], int],
    /,
) -> list[int]:
    """A categorical column's counts per slot ``[categories..., unseen, missing]``, each value
    where ``code(value)`` puts it (``_categories`` calls it; ``values``: a list, a tuple or a
    1-d array of objects)."""

class TimedResponse:
    """One measured request, and the iterable handed back to the server (in C)."""

    _iterable: Iterable[bytes] | None
    _response_size: int
    @property
    def _headers(self) -> list[tuple[str, str]] | None: ...
    @property
    def _series(self) -> RouteSeries | None: ...
    @property
    def _metrics(self) -> RequestMetrics: ...
    def __init__(
        self,
        metrics: RequestMetrics,
        environ: dict[str, Any],
        start_response: Callable[..., Callable[[bytes], object]],
        /,
    ) -> None: ...
    def start_response(
        self, status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]: ...
    def set_route(self, route: str, script_name: str | None = None, /) -> None: ...
    def failed(self, error: BaseException, /) -> None: ...
    def respond(self, iterable: Iterable[bytes], environ: dict[str, Any], /) -> Any: ...
    def close(self) -> None: ...
    def __iter__(self) -> Iterator[bytes]: ...
    def __next__(self) -> bytes: ...
