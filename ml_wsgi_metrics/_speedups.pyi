"""The C extension's exports (``_speedups.c``), typed: the extension's contract with Python.

The request record (``configure``, ``TimedResponse``): what its C code reads from the Python
side by name is listed in the docstring of :mod:`ml_wsgi_metrics._response`;
``tests/test_speedups.py`` checks both against the C source. The model signals' kernel
(``NumericKernel``, ``CategoryCounter``, ``add_amounts``, ``add_categories``, ``use_avx2``,
``count_classes``) reads no name: see :mod:`ml_wsgi_metrics._recorders`,
:mod:`ml_wsgi_metrics._categories`, :mod:`ml_wsgi_metrics._classes` and
:class:`ml_wsgi_metrics._series.SlotCells`.
"""

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Any

import numpy as np
import numpy.typing as npt

from ._series import Cell, RouteSeries
from .metrics import RequestMetrics

_Floats = npt.NDArray[np.float64]

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

def count_classes(
    classes: list[Any] | npt.NDArray[np.str_] | None,
    scores: _Floats | None,
    rows: int,
    labels: tuple[str, ...],
    kinds: tuple[int, ...],
    code: Callable[[Any], int],
    out: _Floats,
    /,
) -> float:
    """Add the rows of each class slot ``[labels..., no class, unseen]`` to ``out``, each where
    ``code(value)`` puts it; return their expected correctness (``kinds``: each slot's, as
    ``_expected``'s), added in row order (see ``_classes.ClassCounter``)."""

class CategoryCounter:
    """A model's categorical columns, their category tables made once (see
    ``_categories.CategoryColumns``)."""

    @property
    def slots(self) -> int: ...
    def __init__(self, vocabularies: list[tuple[str, ...]], /) -> None: ...
    def amounts(
        self,
        columns: list[Sequence[Any] | npt.NDArray[np.object_] | None],
        codes: list[Callable[[Any], int]],
        rows: int,
        out: _Floats,
        /,
    ) -> None:
        """Add each column's counts to its slots in ``out`` (``[categories..., unseen bin,
        missing, unseen counter]`` per column); a column given as ``None`` is skipped."""

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

def add_amounts(
    cells: list[Cell | None],
    values: list[Any],
    take: Callable[[Any], Cell],
    amounts: _Floats,
    /,
) -> None:
    """Add each non-zero amount to its slot's cell, taking the cells still ``None``."""

def add_categories(
    row: Mapping[str, Any],
    names: list[str],
    vocabularies: list[dict[str, int]],
    codes: list[Callable[[Any], int]],
    firsts: list[int],
    cells: list[Cell | None],
    values: list[Any],
    take: Callable[[Any], Cell],
    /,
) -> None:
    """Count one row of categorical columns, each in its slots from ``firsts[j]`` on."""

def use_avx2(enabled: bool, /) -> bool:
    """The kernel's AVX2 code on or off (on only when the CPU has it); whether it was on."""

class NumericKernel:
    """The slot amounts of a block of numeric columns (see ``_recorders.NumericBlock``)."""

    @property
    def slots(self) -> int: ...
    def __init__(
        self,
        edges: Sequence[Sequence[float]],
        low: Sequence[float],
        high: Sequence[float],
        /,
    ) -> None: ...
    def amounts(self, matrix: _Floats, out: _Floats, /) -> None: ...
    def add_row(
        self,
        row: Mapping[str, Any],
        names: list[str],
        cells: list[Cell | None],
        values: list[Any],
        take: Callable[[Any], Cell],
        /,
    ) -> None: ...
