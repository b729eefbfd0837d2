"""A registered model: every series it writes, created at zero when it is registered.

Owns :class:`CompiledModel` (a profile's numeric, categorical, score, class, expected
correctness, latency, label delay and confusion series, with their reference shares set) and
:class:`Children`, which remembers each series created so a retired version removes exactly
those. The recorders it holds are :mod:`._recorders`' and :mod:`._expected`'s.
"""

from __future__ import annotations

import math
from typing import Any

from ._classes import ClassCounter
from ._expected import ExpectedCorrect, kinds
from ._inputs import is_missing
from ._recorders import (
    NO_CLASS,
    CategoricalRow,
    CategoricalSeries,
    Inc,
    NumericBlock,
    NumericSeries,
    NumericSlots,
)
from ._series import SlotCells, child_adder, fast_observer, noop, stored_value
from .metrics import ModelMetrics, remove_child
from .profile import UNSEEN, CategoricalProfile, NumericProfile, ReferenceProfile

__all__ = ["Children", "CompiledModel"]

_INF = math.inf


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
        labels = metrics.model_label_values(profile.model, profile.version)
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
        self.categorical_row = CategoricalRow(self.categorical)
        self.block = NumericBlock(self.numeric)
        self.score = _score_series(metrics, child, labels, profile.score)
        self.score_block = NumericBlock([self.score])
        # Predicted classes: the profile's, then NO_CLASS, then UNSEEN (not a known class).
        self.classes = (*(profile.classes or ()), NO_CLASS, UNSEEN)
        self.class_codes = {c: i for i, c in enumerate(self.classes)}
        self.class_slots = SlotCells(
            [stored_value(child(metrics.predictions, *labels, c)) for c in self.classes]
        )
        self.class_incs = self.class_slots.adders()
        self.observe_latency = fast_observer(child(metrics.prediction_latency, *labels))
        self.observe_delay = fast_observer(child(metrics.label_delay, *labels))
        if profile.accuracy is not None:
            child(metrics.reference_accuracy, *labels).set(profile.accuracy)
        if profile.estimated_accuracy is not None:
            estimate = child(metrics.reference_estimated_accuracy, *labels)
            estimate.set(profile.estimated_accuracy)
        self.expected = ExpectedCorrect(
            kinds(self.classes, profile.classes),
            self.class_codes[NO_CLASS],
            child_adder(child(metrics.expected_correct, *labels)),
        )
        self.class_counter = ClassCounter(profile.classes or (), self.expected, self.class_code)
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
    bins = _bins(child, metrics.feature_bin, metrics.feature_reference_share, key, feature)
    slots = _numeric_slots(
        child,
        key,
        bins,
        missing=metrics.feature_missing,
        out_of_range=metrics.feature_out_of_range,
        sums=metrics.feature_sum,
        squares=metrics.feature_sum_squares,
    )
    return NumericSeries(feature.name, feature.edges, feature.min, feature.max, slots)


def _categorical_series(
    metrics: ModelMetrics, child: Children, labels: tuple[str, ...], feature: CategoricalProfile
) -> CategoricalSeries:
    key = (*labels, feature.name)
    values = _bins(child, metrics.feature_bin, metrics.feature_reference_share, key, feature)
    values.append(stored_value(child(metrics.feature_missing, *key)))
    values.append(stored_value(child(metrics.feature_unseen, *key)))
    return CategoricalSeries(feature.name, feature.categories, values)


def _score_series(
    metrics: ModelMetrics, child: Children, labels: tuple[str, ...], score: NumericProfile | None
) -> NumericSeries:
    edges: tuple[float, ...] = ()
    bins: list[Any] = [None]  # no reference bins: count missing values and sums only
    if score is not None:
        edges = score.edges
        bins = _bins(child, metrics.score_bin, metrics.score_reference_share, labels, score)
    slots = _numeric_slots(
        child,
        labels,
        bins,
        missing=metrics.score_missing,
        out_of_range=None,
        sums=metrics.score_sum,
        squares=metrics.score_sum_squares,
    )
    return NumericSeries("score", edges, -_INF, _INF, slots)


def _bins(
    child: Children,
    counter: Any,
    reference_share: Any,
    key: tuple[str, ...],
    profile: NumericProfile | CategoricalProfile,
) -> list[Any]:
    """The stored values of a profile's bins; their reference shares set."""
    values = [stored_value(child(counter, *key, b)) for b in profile.bins]
    for bin_label, share in zip(profile.bins, profile.shares, strict=True):
        child(reference_share, *key, bin_label).set(share)
    return values


def _numeric_slots(
    child: Children,
    key: tuple[str, ...],
    bins: list[Any],
    *,
    missing: Any,
    out_of_range: Any | None,
    sums: Any,
    squares: Any,
) -> NumericSlots:
    """The stored values of one numeric series (``out_of_range`` ``None``: not counted)."""
    return NumericSlots(
        bins=bins,
        missing=stored_value(child(missing, *key)),
        out_of_range=None if out_of_range is None else stored_value(child(out_of_range, *key)),
        positive=stored_value(child(sums, *key, "positive")),
        negative=stored_value(child(sums, *key, "negative")),
        squares=stored_value(child(squares, *key)),
    )
