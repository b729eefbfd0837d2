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
    "as_floats",
    "check_rows",
    "columns",
    "frame_column",
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
        return len(inputs), frame_column(inputs)
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


def frame_column(frame: Any) -> Column:
    """A DataFrame's column getter: each column as pandas stores it (an array), read through
    pandas' private ``_get_column_array`` (a Series costs about 7 us a column), or as a Series
    where that is missing or fails."""
    names = frame.columns.tolist()
    positions = {name: i for i, name in enumerate(names)}
    stored = getattr(frame, "_get_column_array", None)
    if stored is None or len(positions) != len(names):  # duplicate names: pandas' own choice
        present = set(names)
        return lambda name: frame[name] if name in present else None

    def column(name: str) -> Any:
        position = positions.get(name)
        if position is None:
            return None
        try:
            values = stored(position)
        except (AttributeError, TypeError, IndexError, KeyError):
            return frame[name]
        return values if getattr(values, "ndim", 0) == 1 else frame[name]

    return column


def numeric_matrix(inputs: Any, column: Column, names: list[str], rows: int) -> FloatArray:
    """The ``(rows, len(names))`` float matrix of the named columns (absent: all NaN), in
    column-major order (each column's values contiguous)."""
    if hasattr(inputs, "reindex"):  # DataFrame: of exactly the features, one view of them
        try:
            if inputs.columns.tolist() == names:
                exact: FloatArray = inputs.to_numpy(dtype=np.float64, na_value=_NAN)
                return exact
        except (TypeError, ValueError):
            pass
    by_column = np.full((len(names), rows), _NAN)  # filled a column at a time
    for j, name in enumerate(names):
        values = column(name)
        if values is not None:
            by_column[j] = as_floats(values, rows)
    return by_column.T


def check_rows(rows: int | None, count: int, what: str) -> int:
    """``count``, the rows of ``what``; a ``ValueError`` when other data had ``rows``."""
    if rows is not None and rows != count:
        raise ValueError(f"{what}: {count} values for {rows} rows")
    return count
