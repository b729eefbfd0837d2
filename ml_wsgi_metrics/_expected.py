"""Expected correctness: accuracy a calibrated classifier expects, before any label arrives.

Owns how one prediction's expected correctness is read from its score and predicted class
(the predicted class's probability, as NannyML's CBPE has it), for the recording path
(:class:`ExpectedCorrect`, one add per call) and for a profile's held-out estimate
(:func:`mean_expected`, behind :func:`ml_wsgi_metrics.profile.estimate_accuracy`): one rule
for both, so live and reference agree.

The score is a probability, clipped to ``[0, 1]``; non-finite scores count nowhere. With a
profile of two classes the score is the second class's probability (scikit-learn's
``classes_[1]``, column 1 of ``predict_proba``): a row predicted as that class is right with
probability ``s``, one predicted as the first class with ``1 - s``, one without a known class
with ``max(s, 1 - s)``. With one or more than two classes the score is the predicted class's
probability itself; with none, ``max(s, 1 - s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EITHER", "NEGATIVE", "POSITIVE", "ExpectedCorrect", "kinds", "mean_expected"]

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

#: How a row's expected correctness is read from its score ``s``: ``s``, ``1 - s``, or
#: ``max(s, 1 - s)`` (the class a 0.5 threshold would pick).
POSITIVE, NEGATIVE, EITHER = 0, 1, 2

_INF = float("inf")


def kinds(classes: Sequence[str], profile_classes: Sequence[str] | None) -> list[int]:
    """The kind of each of ``classes`` (a model's class labels, then its extra labels such
    as the "no class" one), for a profile with ``profile_classes``."""
    if not profile_classes:
        return [EITHER] * len(classes)
    if len(profile_classes) != 2:
        return [POSITIVE] * len(classes)
    negative, positive = profile_classes
    return [POSITIVE if c == positive else NEGATIVE if c == negative else EITHER for c in classes]


def _sum(scores: FloatArray, kind: int) -> float:
    """The expected correct rows among ``scores`` (clipped, finite) of one kind."""
    if kind == POSITIVE:
        return float(scores.sum())
    if kind == NEGATIVE:
        return float(len(scores) - scores.sum())
    return float(np.maximum(scores, 1.0 - scores).sum())


class ExpectedCorrect:
    """Adds a model's expected correct predictions to its counter: one add per call."""

    __slots__ = ("inc", "kinds", "no_class")

    def __init__(self, kinds: list[int], no_class: int, inc: Callable[[float], None]) -> None:
        self.kinds, self.inc = kinds, inc
        self.no_class = no_class  # the index of the "no class" label

    def record(self, score: float, code: int) -> None:
        """One row: ``score`` as recorded, ``code`` its predicted class's index."""
        if not -_INF < score < _INF:  # NaN too
            return
        s = 0.0 if score < 0 else 1.0 if score > 1 else score
        kind = self.kinds[code]
        self.inc(s if kind == POSITIVE else 1.0 - s if kind == NEGATIVE else max(s, 1.0 - s))

    def amount(
        self,
        scores: FloatArray,
        classes: Any,
        codes: Mapping[Any, int],
        matches: Mapping[Any, BoolArray] | None = None,
    ) -> float:
        """The sum for a batch: ``classes`` as given (an array is compared without a loop over
        rows), ``codes`` the class index of each distinct label among them (``{}``: no
        classes given), ``matches`` the rows of labels already compared (the class count's
        comparisons, not made twice)."""
        finite = np.isfinite(scores)
        all_finite = np.count_nonzero(finite) == len(scores)
        clipped = np.clip(scores, 0.0, 1.0)
        present = {self.kinds[code] for code in codes.values()}
        if len(present) <= 1:
            kind = present.pop() if present else self.kinds[self.no_class]
            return _sum(clipped if all_finite else clipped[finite], kind)
        rows = _Rows(self.kinds, classes, codes, matches or {})
        if present == {POSITIVE, NEGATIVE}:  # every row has a known class: two sums
            scored = rows.of(POSITIVE)
            if all_finite:
                negatives = len(scores) - np.count_nonzero(scored)
            else:
                clipped = np.where(finite, clipped, 0.0)  # adds nothing to the sums below
                negatives = np.count_nonzero(finite) - np.count_nonzero(scored & finite)
            positive = float(np.dot(clipped, scored))
            return positive + float(negatives) - (float(clipped.sum()) - positive)
        row_kinds = np.full(len(scores), EITHER)
        for kind in present - {EITHER}:
            row_kinds[rows.of(kind)] = kind
        return sum(_sum(clipped[finite & (row_kinds == k)], k) for k in present)


class _Rows:
    """The rows of a batch whose predicted class is of one kind."""

    __slots__ = ("classes", "codes", "kinds", "matches")

    def __init__(
        self,
        kinds: list[int],
        classes: Any,
        codes: Mapping[Any, int],
        matches: Mapping[Any, BoolArray],
    ) -> None:
        self.kinds, self.classes, self.codes, self.matches = kinds, classes, codes, matches

    def of(self, kind: int) -> BoolArray:
        """A mask of the rows whose class is of ``kind``: each label's rows as already
        compared, else compared now."""
        masks = []
        for label, code in self.codes.items():
            if self.kinds[code] == kind:
                match = self.matches.get(label)
                masks.append(self._compared(label) if match is None else match)
        if len(masks) == 1:
            return masks[0]
        return np.logical_or.reduce(masks, axis=0)  # type: ignore[no-any-return]

    def _compared(self, label: Any) -> BoolArray:
        if not isinstance(self.classes, np.ndarray):
            self.classes = np.asarray(self.classes, dtype=object)
        match: BoolArray = self.classes == label
        return match


def mean_expected(values: FloatArray, predicted: Any, classes: Sequence[str] | None) -> float:
    """The mean expected correctness of rows with a finite score (see
    :func:`ml_wsgi_metrics.profile.estimate_accuracy`)."""
    labels = tuple(classes or ())
    other = len(labels)  # the index of any other label, or of none
    expected = ExpectedCorrect(kinds((*labels, ""), labels), other, lambda amount: None)
    codes: dict[Any, int] = {}
    if predicted is not None:
        predicted = np.asarray([str(p) for p in predicted], dtype=object)
        if len(predicted) != len(values):
            raise ValueError(f"estimate_accuracy: {len(predicted)} classes, {len(values)} scores")
        codes = {p: labels.index(p) if p in labels else other for p in set(predicted)}
    finite = int(np.isfinite(values).sum())
    if finite == 0:
        raise ValueError("estimate_accuracy: no finite scores")
    return expected.amount(values, predicted, codes) / finite
