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
        if to_numpy is not None:
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


def is_scalar(value: Any) -> bool:
    """One value (not a sequence of values)."""
    return (
        value is None
        or isinstance(value, str | bytes | int | float | np.generic)
        or (np.ndim(value) == 0)
    )


def columns(inputs: Any) -> tuple[int, Column]:
    """Row count and a column getter (``None`` for absent columns) for batch inputs."""
    if hasattr(inputs, "columns") and hasattr(inputs, "iloc"):  # a pandas DataFrame
        present = set(inputs.columns)
        return len(inputs), lambda name: inputs[name] if name in present else None
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


def numeric_matrix(inputs: Any, column: Column, names: list[str], rows: int) -> FloatArray:
    """The ``(rows, len(names))`` float matrix of the named columns (absent: all NaN)."""
    if hasattr(inputs, "reindex"):  # DataFrame: one conversion for all numeric columns
        try:
            if list(inputs.columns) == names:  # exactly the features: no copy of the frame
                exact: FloatArray = inputs.to_numpy(dtype=np.float64, na_value=_NAN)
                return exact
            converted: FloatArray = inputs.reindex(columns=names).to_numpy(
                dtype=np.float64, na_value=_NAN
            )
            return converted
        except (TypeError, ValueError):
            pass
    matrix = np.full((rows, len(names)), _NAN)
    for j, name in enumerate(names):
        values = column(name)
        if values is not None:
            matrix[:, j] = as_floats(values, rows)
    return matrix


def check_rows(rows: int | None, count: int, what: str) -> int:
    """``count``, the rows of ``what``; a ``ValueError`` when other data had ``rows``."""
    if rows is not None and rows != count:
        raise ValueError(f"{what}: {count} values for {rows} rows")
    return count
