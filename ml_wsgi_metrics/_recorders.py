"""Vectorised recording: a registered model's series, and how one call's rows reach them.

Owns the per-model recorders (:class:`CompiledModel` with its numeric, categorical, score and
class series, every one created at zero when the model is registered), the single-row path
(plain Python, one lock) and the batch path (one ``searchsorted`` and one ``bincount`` per
block of numeric columns, one ``Counter`` per categorical column, then only the non-zero slots
incremented under one lock). Reading the inputs is :mod:`._inputs`' job; the metric
definitions are :mod:`.metrics`'.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from ._inputs import (
    FloatArray,
    check_rows,
    columns,
    is_missing,
    is_scalar,
    numeric_matrix,
    to_float,
)
from .metrics import ModelMetrics, child_adder, fast_observer, remove_child
from .multiprocess import storage_lock
from .profile import UNSEEN, CategoricalProfile, NumericProfile, ReferenceProfile, positive_scores

__all__ = [
    "NO_CLASS",
    "CategoricalSeries",
    "Children",
    "CompiledModel",
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
        if value != value or value == _INF or value == -_INF:
            self.missing(1)
            return None
        index = bisect_left(self.edges, value)
        self.bins[index](1)
        if value > 0:
            self.positive(value)
            self.squares(value * value)
        elif value < 0:
            self.negative(-value)
            self.squares(value * value)
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

    def amounts(self, matrix: FloatArray) -> FloatArray:
        codes = np.empty(matrix.shape, dtype=np.intp)
        for j, edges in enumerate(self.edges):
            codes[:, j] = np.searchsorted(edges, matrix[:, j], side="left")
        codes += self.bin_base
        finite = np.isfinite(matrix)
        np.copyto(codes, self.missing, where=~finite)
        amounts = np.bincount(codes.ravel(), minlength=len(self.incs)).astype(np.float64)
        values = np.where(finite, matrix, 0.0)
        outside = (values < self.low) | (values > self.high)
        amounts[self.out_of_range] = (outside & finite).sum(axis=0)
        amounts[self.positive] = np.where(values > 0, values, 0.0).sum(axis=0)
        amounts[self.negative] = -np.where(values < 0, values, 0.0).sum(axis=0)
        amounts[self.squares] = np.square(values).sum(axis=0)
        return amounts


class CategoricalSeries:
    """One categorical column: vocabulary codes and series."""

    __slots__ = ("codes", "incs", "missing_code", "name", "unseen_code")

    def __init__(self, name: str, categories: Sequence[str], incs: list[Inc]) -> None:
        # slots: [categories..., unseen bin, missing, unseen counter]
        self.name = name
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
        """Counts per slot: the values are counted by hashing (C), then each distinct value
        is looked up once."""
        if len(values) != rows:
            raise ValueError(f"expected {rows} values per column, got {len(values)}")
        try:
            counts = Counter(values)
        except TypeError:  # unhashable values (lists...): counted by their text
            counts = Counter(v if isinstance(v, Hashable) else str(v) for v in values)
        amounts = np.zeros(len(self.incs))
        for value, count in counts.items():
            amounts[self.code(value)] += count
        amounts[-1] = amounts[self.unseen_code]
        return amounts


class Children:
    """Creates metric children and remembers each, so a retired model removes exactly those."""

    __slots__ = ("created",)

    def __init__(self) -> None:
        self.created: list[tuple[Any, tuple[str, ...]]] = []

    def __call__(self, metric: Any, *labels: str) -> Any:
        self.created.append((metric, labels))
        return metric.labels(*labels)

    def remove(self) -> None:
        for metric, labels in self.created:  # a lazy confusion cell may be in twice
            remove_child(metric, *labels)
        self.created.clear()


class CompiledModel:
    """A registered profile with every series it writes, created (at zero) up front."""

    def __init__(self, profile: ReferenceProfile, metrics: ModelMetrics) -> None:
        self.profile = profile
        labels = metrics.model_labels(profile.model, profile.version)
        self.name, self.version = profile.model, profile.version
        self.children = child = Children()
        self.retired = False
        self.numeric: list[NumericSeries] = []
        self.categorical: list[CategoricalSeries] = []
        for feature in profile.features:
            if isinstance(feature, NumericProfile):
                self.numeric.append(_numeric_series(metrics, child, labels, feature))
            else:
                self.categorical.append(_categorical_series(metrics, child, labels, feature))
        self.numeric_names = [f.name for f in self.numeric]
        self.block = NumericBlock(self.numeric)
        self.score = _score_series(metrics, child, labels, profile.score)
        self.score_block = NumericBlock([self.score])
        # Predicted classes: the profile's, then NO_CLASS, then UNSEEN (not a known class).
        self.classes = (*(profile.classes or ()), NO_CLASS, UNSEEN)
        self.class_codes = {c: i for i, c in enumerate(self.classes)}
        self.class_incs = [
            child_adder(child(metrics.predictions, *labels, c)) for c in self.classes
        ]
        self.observe_latency = fast_observer(child(metrics.prediction_latency, *labels))
        self.observe_delay = fast_observer(child(metrics.label_delay, *labels))
        if profile.accuracy is not None:
            child(metrics.reference_accuracy, *labels).set(profile.accuracy)
        self._confusion = metrics.confusion
        self._labels = labels
        self._confusion_incs: dict[tuple[str, str], Inc] = {}
        for predicted in profile.classes or ():
            for actual in profile.classes or ():
                self.confusion_adder(predicted, actual)

    def confusion_adder(self, predicted: str, actual: str) -> Inc:
        inc = self._confusion_incs.get((predicted, actual))
        if inc is None:
            if self.retired:  # retired while this feedback was on its way: nothing to count
                return noop
            cell = self.children(self._confusion, *self._labels, predicted, actual)
            inc = self._confusion_incs[(predicted, actual)] = child_adder(cell)
        return inc

    def remove(self) -> None:
        """Remove every series of this version from the metrics (it is retired)."""
        self.retired = True
        self.children.remove()

    def class_code(self, value: Any) -> int:
        """The index of a predicted class in :attr:`classes` (missing: NO_CLASS)."""
        if is_missing(value):
            return self.class_codes[NO_CLASS]
        code = self.class_codes.get(value if value.__class__ is str else str(value))
        return self.class_codes[UNSEEN] if code is None else code


def _numeric_series(
    metrics: ModelMetrics, child: Children, labels: tuple[str, ...], feature: NumericProfile
) -> NumericSeries:
    key = (*labels, feature.name)
    bins = [child_adder(child(metrics.feature_bin, *key, b)) for b in feature.bins]
    for bin_label, share in zip(feature.bins, feature.shares, strict=True):
        child(metrics.feature_reference_share, *key, bin_label).set(share)
    slots = NumericSlots(
        bins=bins,
        missing=child_adder(child(metrics.feature_missing, *key)),
        out_of_range=child_adder(child(metrics.feature_out_of_range, *key)),
        positive=child_adder(child(metrics.feature_sum, *key, "positive")),
        negative=child_adder(child(metrics.feature_sum, *key, "negative")),
        squares=child_adder(child(metrics.feature_sum_squares, *key)),
    )
    return NumericSeries(feature.name, feature.edges, feature.min, feature.max, slots)


def _categorical_series(
    metrics: ModelMetrics, child: Children, labels: tuple[str, ...], feature: CategoricalProfile
) -> CategoricalSeries:
    key = (*labels, feature.name)
    incs = [child_adder(child(metrics.feature_bin, *key, b)) for b in feature.bins]
    for bin_label, share in zip(feature.bins, feature.shares, strict=True):
        child(metrics.feature_reference_share, *key, bin_label).set(share)
    incs.append(child_adder(child(metrics.feature_missing, *key)))
    incs.append(child_adder(child(metrics.feature_unseen, *key)))
    return CategoricalSeries(feature.name, feature.categories, incs)


def _score_series(
    metrics: ModelMetrics, child: Children, labels: tuple[str, ...], score: NumericProfile | None
) -> NumericSeries:
    edges: tuple[float, ...] = ()
    bins: list[Inc] = [noop]  # no reference bins: count missing values and sums only
    if score is not None:
        edges = score.edges
        bins = [child_adder(child(metrics.score_bin, *labels, b)) for b in score.bins]
        for bin_label, share in zip(score.bins, score.shares, strict=True):
            child(metrics.score_reference_share, *labels, bin_label).set(share)
    slots = NumericSlots(
        bins=bins,
        missing=child_adder(child(metrics.score_missing, *labels)),
        out_of_range=noop,
        positive=child_adder(child(metrics.score_sum, *labels, "positive")),
        negative=child_adder(child(metrics.score_sum, *labels, "negative")),
        squares=child_adder(child(metrics.score_sum_squares, *labels)),
    )
    return NumericSeries("score", edges, -_INF, _INF, slots)


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
            feature.record(to_float(get(feature.name)))
        for categorical in model.categorical:
            categorical.record(get(categorical.name))
        if value is not None:
            model.score.record(value)
        model.class_incs[model.class_code(predicted)](1)
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
        class_values = classes.tolist() if hasattr(classes, "tolist") else classes
        if is_scalar(class_values):
            class_values = [class_values]
        class_values = list(class_values)
        rows = check_rows(rows, len(class_values), "classes")
    rows = 1 if rows is None else rows

    # Compute everything first: a bad input raises before any series is touched.
    updates: Updates = []
    if column is not None:
        updates += _input_updates(model, inputs, column, rows)
    if score_values is not None:
        updates.append((model.score_block.incs, model.score_block.amounts(score_values[:, None])))
    class_amounts = np.zeros(len(model.classes))
    if class_values is None:
        class_amounts[model.class_codes[NO_CLASS]] = rows
    else:
        for label, count in Counter(class_values).items():
            class_amounts[model.class_code(label)] += count
    updates.append((model.class_incs, class_amounts))
    apply_updates(updates)
    return Batch(rows, class_values, score_values)


def _input_updates(
    model: CompiledModel, inputs: Any, column: Callable[[str], Any], rows: int
) -> Updates:
    """The feature slots' increments for ``rows`` rows of inputs."""
    updates: Updates = []
    if model.numeric:
        matrix = numeric_matrix(inputs, column, model.numeric_names, rows)
        updates.append((model.block.incs, model.block.amounts(matrix)))
    for categorical in model.categorical:
        values = column(categorical.name)
        if values is None:
            values = [None] * rows
        elif hasattr(values, "to_numpy"):
            values = values.to_numpy(dtype=object)
        updates.append((categorical.incs, categorical.amounts(values, rows)))
    return updates
