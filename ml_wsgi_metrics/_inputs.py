"""What the app passes to ``record_prediction``, read as rows and columns.

Owns the accepted input forms (a DataFrame, a dict of one row, a dict of columns, a list of
row dicts), the conversion of values to floats (anything not a number is NaN, counted as
missing), what counts as missing or as a scalar, and the row-count checks between inputs,
scores and classes. Knows nothing of metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "Column",
    "FloatArray",
    "FrameColumns",
    "as_floats",
    "check_rows",
    "columns",
    "is_missing",
    "is_scalar",
    "numeric_matrix",
    "to_float",
]

FloatArray = npt.NDArray[np.float64]
#: A column getter: the named column's values, or ``None`` when the inputs lack it.
Column = Callable[[str], Any]

_NAN = math.nan


def to_float(value: Any) -> float:
    """``value`` as a float; NaN when it is not a number."""
    if value.__class__ is float:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return _NAN


def as_floats(values: Any, rows: int) -> FloatArray:
    """A float vector; None, NA and anything not a number become NaN (counted as missing)."""
    to_numpy = getattr(values, "to_numpy", None)
    array: FloatArray
    try:
        if values.__class__ is np.ndarray and values.dtype == np.float64:
            array = values
        elif to_numpy is not None:
            array = to_numpy(dtype=np.float64, na_value=_NAN)
        else:
            array = np.asarray(values, dtype=np.float64)
    except (TypeError, ValueError):
        items = values.tolist() if hasattr(values, "tolist") else list(values)
        array = np.fromiter(map(to_float, items), dtype=np.float64, count=len(items))
    if array.shape != (rows,):
        raise ValueError(f"expected {rows} values per column, got shape {array.shape}")
    return array


def is_missing(value: Any) -> bool:
    """``None``, NaN, pandas' NA and anything that cannot be compared with itself."""
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN (and pandas' NA raises: missing too)
    except TypeError:
        return True


_SCALARS = (str, bytes, int, float, np.generic)  # a tuple: built once, not at every call


def is_scalar(value: Any) -> bool:
    """One value (not a sequence of values). A list or tuple is not asked ``np.ndim``: it
    would make an array of it (20 us for 1,000 floats)."""
    if value is None or isinstance(value, _SCALARS):
        return True
    return not isinstance(value, list | tuple) and np.ndim(value) == 0


def columns(inputs: Any) -> tuple[int, Column]:
    """Row count and a column getter (``None`` for absent columns) for batch inputs."""
    if hasattr(inputs, "columns") and hasattr(inputs, "iloc"):  # a pandas DataFrame
        return len(inputs), FrameColumns(inputs)
    if isinstance(inputs, Mapping):
        scalars = [is_scalar(v) for v in inputs.values()]
        if all(scalars):  # one row, with scores or classes given as length-1 arrays
            return 1, lambda name: [inputs[name]] if name in inputs else None
        if any(scalars):
            raise ValueError(
                "inputs: a dict is one row (every value a scalar) or columns (every value a "
                "sequence), not both"
            )
        lengths = {len(v) for v in inputs.values()}
        if len(lengths) > 1:
            raise ValueError(f"inputs: columns of different lengths {sorted(lengths)}")
        return (lengths.pop() if lengths else 0), inputs.get
    if isinstance(inputs, Sequence) and not isinstance(inputs, str | bytes):
        rows = list(inputs)
        if not all(isinstance(r, Mapping) for r in rows):
            raise ValueError("inputs: a list must hold one dict per row")
        return len(rows), lambda name: [r.get(name) for r in rows]
    raise ValueError(
        f"inputs: expected a DataFrame, a dict or a list of dicts, got {type(inputs).__name__}"
    )


class FrameColumns:
    """A DataFrame's column getter: each column as pandas stores it (an array), all read in one
    pass over the frame's blocks (pandas' private block manager; a Series a column costs about
    15 times more, see ``bench/bench_signals.py``), or as a Series where the blocks cannot be
    read. :meth:`float_matrix` gives float columns of one block without a copy.
    """

    __slots__ = ("frame", "present", "stored")

    def __init__(self, frame: Any) -> None:
        self.frame = frame
        names = frame.columns.tolist()
        self.present = set(names)
        #: name -> (the block's values, the column's row in them; None: a 1-d block)
        self.stored: dict[Any, tuple[Any, int | None]] | None = None
        if len(self.present) == len(names):  # duplicate names: pandas' own choice, a frame
            try:  # not contextlib.suppress: a context manager costs more than the reading
                self.stored = _stored_columns(frame, names)
            except (AttributeError, TypeError, IndexError, KeyError, ValueError):
                self.stored = None

    def __call__(self, name: str) -> Any:
        if self.stored is None:
            return self.frame[name] if name in self.present else None
        found = self.stored.get(name)
        if found is None:
            return None
        values, row = found
        return values if row is None else values[row]

    def float_matrix(self, names: list[str]) -> FloatArray | None:
        """The ``(rows, len(names))`` matrix of the named columns when all are float64 columns
        of one block (a view when they are its consecutive rows), else ``None``."""
        if self.stored is None or not names:
            return None
        places = [self.stored.get(name) for name in names]
        block = places[0][0] if places[0] is not None else None
        if not isinstance(block, np.ndarray) or block.ndim != 2 or block.dtype != np.float64:
            return None
        rows = [p[1] for p in places if p is not None and p[0] is block and p[1] is not None]
        if len(rows) != len(names):
            return None
        first = rows[0]
        if rows == list(range(first, first + len(rows))):
            view: FloatArray = block[first : first + len(rows)].T
            return view
        taken: FloatArray = block[rows].T
        return taken


def _stored_columns(frame: Any, names: list[Any]) -> dict[Any, tuple[Any, int | None]]:
    """Where each column of ``frame`` is stored; raises when the blocks do not cover every
    column with arrays of the frame's length."""
    stored: dict[Any, tuple[Any, int | None]] = {}
    length = len(frame)
    for block in frame._mgr.blocks:
        values = block.values
        positions = block.mgr_locs.as_array.tolist()
        if values.ndim == 2 and values.shape == (len(positions), length):
            for row, position in enumerate(positions):
                stored[names[position]] = (values, row)
        elif values.ndim == 1 and len(positions) == 1 and len(values) == length:
            stored[names[positions[0]]] = (values, None)
        else:
            raise ValueError(f"a block of shape {values.shape} for {len(positions)} columns")
    if len(stored) != len(names):
        raise ValueError(f"blocks hold {len(stored)} of {len(names)} columns")
    return stored


def numeric_matrix(inputs: Any, column: Column, names: list[str], rows: int) -> FloatArray:
    """The ``(rows, len(names))`` float matrix of the named columns (absent: all NaN), in
    column-major order (each column's values contiguous)."""
    if isinstance(column, FrameColumns):  # float columns of one block: a view of them
        matrix = column.float_matrix(names)
        if matrix is not None:
            return matrix
    if hasattr(inputs, "reindex"):  # DataFrame: of exactly the features, one view of them
        try:
            if inputs.columns.tolist() == names:
                exact: FloatArray = inputs.to_numpy(dtype=np.float64, na_value=_NAN)
                return exact
        except (TypeError, ValueError):
            pass
    by_column = np.empty((len(names), rows))  # filled a column at a time
    for j, name in enumerate(names):
        values = column(name)
        by_column[j] = _NAN if values is None else as_floats(values, rows)
    return by_column.T


def check_rows(rows: int | None, count: int, what: str) -> int:
    """``count``, the rows of ``what``; a ``ValueError`` when other data had ``rows``."""
    if rows is not None and rows != count:
        raise ValueError(f"{what}: {count} values for {rows} rows")
    return count
