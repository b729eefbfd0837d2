"""Vectorised recording: the series recorders, and how one call's rows reach them.

Owns the recorders of a numeric column (:class:`NumericSeries`, its slots named by
:class:`NumericSlots`, and :class:`NumericBlock` for many columns at once) and of a
categorical one (:class:`CategoricalSeries`), the single-row path (plain Python, one lock)
and the batch path (one ``searchsorted`` and one ``bincount`` per block of numeric columns,
one count per categorical column, then only the non-zero slots incremented under one
lock). Which series a registered model has is :mod:`._model`'s job, reading the inputs
:mod:`._inputs`'.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import numpy.typing as npt

from ._categories import count_slots
from ._inputs import (
    FloatArray,
    check_rows,
    columns,
    is_missing,
    is_scalar,
    numeric_matrix,
    to_float,
)
from .multiprocess import storage_lock
from .profile import positive_scores

if TYPE_CHECKING:
    from ._model import CompiledModel

__all__ = [
    "NO_CLASS",
    "Batch",
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
#: Increments per slot to apply: the slots' adders and one amount per slot.
Updates = list[tuple[list[Inc], FloatArray]]


def noop(amount: float) -> None:
    """The adder of a slot that is not recorded."""
    return None


def apply_updates(updates: Updates) -> None:
    """Increment the slots whose amount is non-zero (a loop over slots, never over rows)."""
    with storage_lock():
        for incs, amounts in updates:
            nonzero = np.flatnonzero(amounts)
            for index, amount in zip(nonzero.tolist(), amounts[nonzero].tolist(), strict=True):
                incs[index](amount)


class NumericSlots(NamedTuple):
    """The adders of one numeric column's series."""

    bins: list[Inc]
    missing: Inc
    out_of_range: Inc
    positive: Inc
    negative: Inc
    squares: Inc


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
    )

    def __init__(
        self, name: str, edges: tuple[float, ...], low: float, high: float, slots: NumericSlots
    ) -> None:
        self.name, self.edges, self.low, self.high = name, edges, low, high
        self.bins, self.missing, self.oor = slots.bins, slots.missing, slots.out_of_range
        self.positive, self.negative, self.squares = slots.positive, slots.negative, slots.squares

    def incs(self) -> list[Inc]:
        """Every slot, in :class:`NumericBlock`'s order."""
        return [*self.bins, self.missing, self.oor, self.positive, self.negative, self.squares]

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

    :meth:`amounts` turns an ``(n, columns)`` matrix into one increment per slot.
    """

    def __init__(self, series: Sequence[NumericSeries]) -> None:
        self.incs: list[Inc] = []
        self.edges: list[FloatArray] = []
        bin_base, missing, extras = [], [], []
        for column in series:
            bin_base.append(len(self.incs))
            missing.append(len(self.incs) + len(column.edges) + 1)
            extras.append(len(self.incs) + len(column.edges) + 2)
            self.incs.extend(column.incs())
            self.edges.append(np.asarray(column.edges, dtype=np.float64))
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
        matrix = np.ascontiguousarray(matrix)
        codes = self.codes(matrix)
        finite = np.isfinite(matrix)
        values = matrix
        all_finite = bool(finite.all())
        if not all_finite:
            np.copyto(codes, self.missing, where=~finite)
            values = np.where(finite, matrix, 0.0)
        amounts = np.bincount(codes.ravel(), minlength=len(self.incs)).astype(np.float64)
        outside = (values < self.low) | (values > self.high)
        if not all_finite:
            outside &= finite
        amounts[self.out_of_range] = np.add.reduce(outside, axis=0, dtype=np.intp)
        amounts[self.positive] = np.maximum(values, 0.0).sum(axis=0)
        amounts[self.negative] = -np.minimum(values, 0.0).sum(axis=0)
        amounts[self.squares] = np.einsum("ij,ij->j", values, values)
        return amounts


class CategoricalSeries:
    """One categorical column: vocabulary codes and series."""

    __slots__ = ("categories", "codes", "incs", "missing_code", "name", "unseen_code")

    def __init__(self, name: str, categories: Sequence[str], incs: list[Inc]) -> None:
        # slots: [categories..., unseen bin, missing, unseen counter]
        self.name, self.categories = name, tuple(categories)
        self.codes = {c: i for i, c in enumerate(categories)}
        self.unseen_code = len(categories)
        self.missing_code = len(categories) + 1
        self.incs = incs

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

    def amounts(self, values: Any, rows: int) -> FloatArray:
        """Counts per slot of ``rows`` values (:func:`._categories.count_slots`); ``None``:
        the inputs lack the column, every row is missing."""
        amounts = np.zeros(len(self.incs))
        if values is None:
            amounts[self.missing_code] = rows
            return amounts
        counts = count_slots(values, self.categories, self.code)
        if sum(counts) != rows:
            raise ValueError(f"expected {rows} values per column, got {sum(counts)}")
        amounts[: len(counts)] = counts
        amounts[-1] = amounts[self.unseen_code]
        return amounts


# -- recording one call ----------------------------------------------------------------------


def record_row(
    model: CompiledModel, row: Mapping[str, Any], score: Any, predicted: Any
) -> float | None:
    """Record one row given as a dict of scalars (the plain-Python path); returns the score
    as recorded (``None`` when not given)."""
    get = row.get
    value = None if score is None else to_float(score)
    with storage_lock():  # one lock for all the updates (slot values add unlocked)
        for feature in model.numeric:
            raw = get(feature.name)
            feature.record(raw if raw.__class__ is float else to_float(raw))
        for categorical in model.categorical:
            categorical.record(get(categorical.name))
        code = model.class_code(predicted)
        if value is not None:
            model.score.record(value)
            model.expected.record(value, code)
        model.class_incs[code](1)
    return value


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
        updates.append((model.score_block.incs, model.score_block.amounts(score_values[:, None])))
    counted = _class_amounts(model, class_values, rows)
    updates.append((model.class_incs, counted.amounts))
    if score_values is not None:
        expected = model.expected.amount(score_values, class_values, counted.codes, counted.matches)
        updates.append(([model.expected.inc], np.array([expected])))
    apply_updates(updates)
    return Batch(rows, class_values, score_values)


def _class_values(classes: Any) -> Any:
    """A copy of the predicted classes: a list, or a 1-d array of strings (counted by
    comparison)."""
    if isinstance(classes, np.ndarray) and classes.ndim == 1 and classes.dtype.kind == "U":
        return classes.copy()
    values = classes.tolist() if hasattr(classes, "tolist") else classes
    return [values] if is_scalar(values) else list(values)


class ClassAmounts(NamedTuple):
    """Predictions per class slot, the slot of each distinct class given (``{}`` when none
    is), and the rows of each profile class an array of strings was compared with."""

    amounts: FloatArray
    codes: dict[Any, int]
    matches: dict[Any, npt.NDArray[np.bool_]]


def _class_amounts(model: CompiledModel, values: Any, rows: int) -> ClassAmounts:
    """Count the predicted classes: an array of strings is compared with each profile class
    (until every row is counted), then only the rest is counted by hashing."""
    counted = ClassAmounts(np.zeros(len(model.classes)), {}, {})
    if values is None:
        counted.amounts[model.class_codes[NO_CLASS]] = rows
        return counted
    if isinstance(values, np.ndarray):
        found = 0
        for code, label in enumerate(model.profile.classes or ()):
            if found == rows:
                break
            match = values == label
            count = int(np.count_nonzero(match))
            if count:
                counted.amounts[code], counted.codes[label] = count, code
                counted.matches[label] = match
                found += count
        if found < rows:
            rest = list(counted.matches.values())
            values = values[~np.logical_or.reduce(rest, axis=0)] if rest else values
        values = values.tolist() if found < rows else []
    for label, count in Counter(values).items():
        counted.codes[label] = code = model.class_code(label)
        counted.amounts[code] += count
    return counted


def _input_updates(
    model: CompiledModel, inputs: Any, column: Callable[[str], Any], rows: int
) -> Updates:
    """The feature slots' increments for ``rows`` rows of inputs."""
    updates: Updates = []
    if model.numeric:
        matrix = numeric_matrix(inputs, column, model.numeric_names, rows)
        updates.append((model.block.incs, model.block.amounts(matrix)))
    for categorical in model.categorical:
        updates.append((categorical.incs, categorical.amounts(column(categorical.name), rows)))
    return updates
