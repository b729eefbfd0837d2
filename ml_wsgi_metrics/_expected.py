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

    def amount(self, scores: FloatArray, classes: Any, codes: Mapping[Any, int]) -> float:
        """The sum for a batch: ``classes`` as given (an array is compared without a loop over
        rows), ``codes`` the class index of each distinct label among them (``{}``: no
        classes given)."""
        finite = np.isfinite(scores)
        clipped = np.clip(scores, 0.0, 1.0)
        present = {self.kinds[code] for code in codes.values()}
        if len(present) <= 1:
            kind = present.pop() if present else self.kinds[self.no_class]
            if not finite.all():
                clipped = clipped[finite]
            return _sum(clipped, kind)
        labels = classes if isinstance(classes, np.ndarray) else np.asarray(classes, dtype=object)
        if present == {POSITIVE, NEGATIVE}:  # every row has a known class: one select
            scored = np.zeros(len(scores), dtype=bool)
            for label, code in codes.items():
                if self.kinds[code] == POSITIVE:
                    scored |= labels == label
            chosen = np.where(scored, clipped, 1.0 - clipped)
            return float(chosen.sum() if finite.all() else chosen[finite].sum())
        row_kinds = np.full(len(scores), EITHER)
        for label, code in codes.items():
            if self.kinds[code] != EITHER:
                row_kinds[labels == label] = self.kinds[code]
        return sum(_sum(clipped[finite & (row_kinds == k)], k) for k in present)


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
