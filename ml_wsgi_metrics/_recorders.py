"""Vectorised recording: the series recorders, and how one call's rows reach them.

Owns the recorders of a numeric column (:class:`NumericSeries`, its slots named by
:class:`NumericSlots`, and :class:`NumericBlock` for many columns at once) and of a
categorical one (:class:`CategoricalSeries`), the single-row path (one lock; a row's columns
read and counted in C when the extension is built) and the batch path (a block of numeric
columns in one pass of the C kernel, else a few numpy passes; the categorical columns
together, :class:`._categories.CategoryColumns`; the predicted classes and their expected
correctness in one pass, :class:`._classes.ClassCounter`; then every recorder's non-zero slots
added under one lock, in bulk through :class:`~._series.SlotCells`). Which series a registered
model has is :mod:`._model`'s job, reading the inputs :mod:`._inputs`'.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._categories import CategoryColumns
from ._inputs import (
    FloatArray,
    check_rows,
    columns,
    is_missing,
    is_scalar,
    numeric_matrix,
    to_float,
)
from ._series import SlotCells, noop, speedups, take_cell, value_adder
from .multiprocess import storage_lock
from .profile import positive_scores

if TYPE_CHECKING:
    from ._model import CompiledModel

__all__ = [
    "NO_CLASS",
    "Batch",
    "CategoricalRow",
    "CategoricalSeries",
    "Inc",
    "NumericBlock",
    "NumericSeries",
    "NumericSlots",
    "noop",
    "record_batch",
    "record_row",
]

#: The ``class`` label of predictions recorded without a predicted class.
NO_CLASS = "__none__"

_INF = math.inf
_COMPARED_EDGES = 16  # up to this many edges, binned by comparisons, not searchsorted

Inc = Callable[[float], None]
#: Increments to apply: a recorder's slots and one amount per slot.
Updates = list[tuple[SlotCells, FloatArray]]


def apply_updates(updates: Updates, adds: Sequence[tuple[Inc, float]] = ()) -> None:
    """Add to the slots whose amount is non-zero (a loop over slots, never over rows), then
    each of ``adds``: ``(adder, amount)``."""
    with storage_lock():
        for slots, amounts in updates:
            slots.add(amounts)
        for add, amount in adds:
            add(amount)


class NumericSlots(NamedTuple):
    """The stored values of one numeric column's series (``None``: not recorded)."""

    bins: list[Any]
    missing: Any
    out_of_range: Any
    positive: Any
    negative: Any
    squares: Any


class NumericSeries:
    """One numeric column's series (the single-row path records through it)."""

    __slots__ = (
        "bins",
        "edges",
        "high",
        "low",
        "missing",
        "name",
        "negative",
        "oor",
        "positive",
        "squares",
        "values",
    )

    def __init__(
        self, name: str, edges: tuple[float, ...], low: float, high: float, slots: NumericSlots
    ) -> None:
        self.name, self.edges, self.low, self.high = name, edges, low, high
        self.values = [*slots.bins, *slots[1:]]  # every slot, in NumericBlock's order
        incs = [noop if value is None else value_adder(value) for value in self.values]
        self.bins = incs[: len(slots.bins)]
        self.missing, self.oor, self.positive, self.negative, self.squares = incs[-5:]

    def record(self, value: float) -> int | None:
        """Count one value; returns its bin, or ``None`` when missing."""
        if not -_INF < value < _INF:  # NaN or infinite
            self.missing(1)
            return None
        index = bisect_left(self.edges, value)
        self.bins[index](1)
        if value:
            self.squares(value * value)
            if value > 0:
                self.positive(value)
            else:
                self.negative(-value)
        if value < self.low or value > self.high:
            self.oor(1)
        return index


class NumericBlock:
    """Numeric columns and their slots: per column ``[bins..., missing, oor, +sum, -sum, sq]``.

    :meth:`amounts` turns an ``(n, columns)`` matrix into one increment per slot: in one pass
    of the C kernel (``_speedups.NumericKernel``) when the extension is built, else with numpy
    (:meth:`numpy_amounts`, the same numbers).
    """

    def __init__(self, series: Sequence[NumericSeries]) -> None:
        values: list[Any] = []
        self.edges: list[FloatArray] = []
        bin_base, missing, extras = [], [], []
        for column in series:
            bin_base.append(len(values))
            missing.append(len(values) + len(column.edges) + 1)
            extras.append(len(values) + len(column.edges) + 2)
            values.extend(column.values)
            self.edges.append(np.asarray(column.edges, dtype=np.float64))
        self.slots = SlotCells(values)
        self.kernel = None
        if speedups is not None:
            self.kernel = speedups.NumericKernel(
                [c.edges for c in series], [c.low for c in series], [c.high for c in series]
            )
        self.bin_base = np.asarray(bin_base, dtype=np.intp)
        self.missing = np.asarray(missing, dtype=np.intp)
        extra = np.asarray(extras, dtype=np.intp)
        self.out_of_range, self.positive, self.negative, self.squares = (
            extra + i for i in range(4)
        )
        self.low = np.asarray([c.low for c in series], dtype=np.float64)
        self.high = np.asarray([c.high for c in series], dtype=np.float64)
        # Edges as rows of (edge k of every column), +inf past a column's last edge.
        deepest = max((len(e) for e in self.edges), default=0)
        self.edge_rows = np.full((deepest, len(series)), _INF)
        for j, edges in enumerate(self.edges):
            self.edge_rows[: len(edges), j] = edges

    def codes(self, matrix: FloatArray) -> npt.NDArray[np.intp]:
        """Each value's bin slot (NaN: the first bin), as ``bisect_left`` on its edges."""
        if len(self.edge_rows) <= _COMPARED_EDGES:  # counted edge by edge: all columns at once
            below = np.zeros(matrix.shape, dtype=np.uint8)
            for edge_row in self.edge_rows:
                np.add(below, matrix > edge_row, out=below, casting="unsafe")
            return np.add(below, self.bin_base, dtype=np.intp)
        codes = np.empty(matrix.shape, dtype=np.intp)
        for j, edges in enumerate(self.edges):
            codes[:, j] = np.searchsorted(edges, matrix[:, j], side="left")
        return codes + self.bin_base

    def amounts(self, matrix: FloatArray) -> FloatArray:
        """One amount per slot for the rows of ``matrix``."""
        if self.kernel is None:
            return self.numpy_amounts(matrix)
        amounts = np.empty(len(self.slots))
        self.kernel.amounts(matrix, amounts)
        return amounts

    def numpy_amounts(self, matrix: FloatArray) -> FloatArray:
        """:meth:`amounts` in numpy: each sum in row order, as the kernel adds them."""
        codes = self.codes(matrix)
        finite = np.isfinite(matrix)
        values = matrix
        all_finite = bool(finite.all())
        if not all_finite:
            np.copyto(codes, self.missing, where=~finite)
            values = np.where(finite, matrix, 0.0)
        amounts = np.bincount(codes.ravel(), minlength=len(self.slots)).astype(np.float64)
        outside = (values < self.low) | (values > self.high)
        if not all_finite:
            outside &= finite
        amounts[self.out_of_range] = np.add.reduce(outside, axis=0, dtype=np.intp)
        amounts[self.positive], amounts[self.negative], amounts[self.squares] = _row_order_sums(
            values
        )
        return amounts


def _row_order_sums(values: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Each column's positive, negative and squared values summed in row order, as the C kernel
    adds them: numpy reduces the columns of a C-ordered matrix row by row (a single column
    pairwise: it is accumulated)."""
    if values.shape[1] == 1:
        column = np.concatenate([[0.0], values[:, 0]])  # a sum of no rows is 0
        terms = (np.maximum(column, 0.0), np.minimum(column, 0.0), column * column)
        positive, negative, squares = (np.add.accumulate(t)[-1:] for t in terms)
        return positive, -negative, squares
    values = np.ascontiguousarray(values)
    positive = np.maximum(values, 0.0).sum(axis=0)
    negative = -np.minimum(values, 0.0).sum(axis=0)
    return positive, negative, np.einsum("ij,ij->j", values, values)


class CategoricalSeries:
    """One categorical column: vocabulary codes and series."""

    __slots__ = ("categories", "codes", "incs", "missing_code", "name", "slots", "unseen_code")

    def __init__(self, name: str, categories: Sequence[str], values: Sequence[Any]) -> None:
        # slots (their stored values): [categories..., unseen bin, missing, unseen counter]
        self.name, self.categories = name, tuple(categories)
        self.codes = {c: i for i, c in enumerate(categories)}
        self.unseen_code = len(categories)
        self.missing_code = len(categories) + 1
        self.slots = SlotCells(values)
        self.incs = self.slots.adders()

    def code(self, value: Any) -> int:
        code = self.codes.get(value) if value.__class__ is str else None
        if code is not None:
            return code
        if is_missing(value):
            return self.missing_code
        return self.codes.get(str(value), self.unseen_code)

    def record(self, value: Any) -> None:
        code = self.code(value)
        self.incs[code](1)
        if code == self.unseen_code:
            self.incs[-1](1)


class CategoricalRow:
    """A model's categorical columns together: one set of cells over all their slots. One row
    is counted in C (``_speedups.add_categories``: each column's exact string looked up in its
    vocabulary, anything else through :meth:`CategoricalSeries.code`); a batch by
    :attr:`columns` (every column in one call of the C counter)."""

    __slots__ = ("codes", "columns", "firsts", "names", "slots", "vocabularies")

    def __init__(self, series: Sequence[CategoricalSeries]) -> None:
        self.names = [column.name for column in series]
        self.vocabularies = [column.codes for column in series]
        self.codes: list[Callable[[Any], int]] = [column.code for column in series]
        self.firsts: list[int] = []
        values: list[Any] = []
        for column in series:
            self.firsts.append(len(values))
            values.extend(column.slots.values)
        self.slots = SlotCells(values)
        self.columns = CategoryColumns([c.categories for c in series], self.codes)

    def add(self, row: Mapping[str, Any]) -> None:
        """Count one row (the C extension is built); the storage lock is held."""
        assert speedups is not None
        cells, values = self.slots.cells(), self.slots.values
        speedups.add_categories(
            row, self.names, self.vocabularies, self.codes, self.firsts, cells, values, take_cell
        )


# -- recording one call ----------------------------------------------------------------------


def record_row(
    model: CompiledModel, row: Mapping[str, Any], score: Any, predicted: Any
) -> float | None:
    """Record one row given as a dict of scalars (the plain-Python path); returns the score
    as recorded (``None`` when not given)."""
    value = None if score is None else to_float(score)
    with storage_lock():  # one lock for all the updates (slot values add unlocked)
        _record_features(model, row)
        code = model.class_code(predicted)
        if value is not None:
            model.score.record(value)
            model.expected.record(value, code)
        model.class_incs[code](1)
    return value


def _record_features(model: CompiledModel, row: Mapping[str, Any]) -> None:
    """One row's features: in C when the extension is built, else one series at a time."""
    kernel, slots = model.block.kernel, model.block.slots
    if kernel is not None:
        kernel.add_row(row, model.numeric_names, slots.cells(), slots.values, take_cell)
        if model.categorical:
            model.categorical_row.add(row)
        return
    get = row.get
    for feature in model.numeric:
        raw = get(feature.name)
        feature.record(raw if raw.__class__ is float else to_float(raw))
    for categorical in model.categorical:
        categorical.record(get(categorical.name))


class Batch(NamedTuple):
    """What :func:`record_batch` recorded: rows, and the classes and scores as recorded."""

    rows: int
    classes: list[Any] | None
    scores: FloatArray | None


def record_batch(model: CompiledModel, inputs: Any, scores: Any, classes: Any) -> Batch:
    """Record many rows (or one row given with arrays). A bad input raises before any
    series is touched."""
    rows: int | None = None
    column = None
    if inputs is not None:
        rows, column = columns(inputs)
    score_values = class_values = None
    if scores is not None:
        # a copy: the ids, computed later, must see the scores as they are now
        score_values = positive_scores(scores if not is_scalar(scores) else [scores]).copy()
        rows = check_rows(rows, len(score_values), "scores")
    if classes is not None:
        class_values = _class_values(classes)
        rows = check_rows(rows, len(class_values), "classes")
    rows = 1 if rows is None else rows

    # Compute everything first: a bad input raises before any series is touched.
    updates: Updates = []
    if column is not None:
        updates += _input_updates(model, inputs, column, rows)
    if score_values is not None:
        updates.append((model.score_block.slots, model.score_block.amounts(score_values[:, None])))
    counts, expected = model.class_counter.count(class_values, score_values, rows)
    updates.append((model.class_slots, counts))
    apply_updates(updates, [(model.expected.inc, expected)] if expected else ())
    return Batch(rows, class_values, score_values)


def _class_values(classes: Any) -> Any:
    """A copy of the predicted classes: a list, or a 1-d array of strings in native byte order
    (read in place by :class:`._classes.ClassCounter`)."""
    if isinstance(classes, np.ndarray) and classes.ndim == 1 and classes.dtype.kind == "U":
        if classes.dtype.isnative:
            return classes.copy()
        return classes.astype(classes.dtype.newbyteorder("="))  # a copy
    values = classes.tolist() if hasattr(classes, "tolist") else classes
    if is_scalar(values):
        return [values]
    return values if values.__class__ is list and values is not classes else list(values)


def _input_updates(
    model: CompiledModel, inputs: Any, column: Callable[[str], Any], rows: int
) -> Updates:
    """The feature slots' increments for ``rows`` rows of inputs."""
    updates: Updates = []
    if model.numeric:
        matrix = numeric_matrix(inputs, column, model.numeric_names, rows)
        updates.append((model.block.slots, model.block.amounts(matrix)))
    if model.categorical:
        row = model.categorical_row
        amounts = row.columns.amounts([column(name) for name in row.names], rows)
        updates.append((row.slots, amounts))
    return updates
