"""Expected correctness: accuracy a calibrated classifier expects, before any label arrives.

Owns how one prediction's expected correctness is read from its score and predicted class
(the predicted class's probability, as NannyML's CBPE has it), for the recording path
(:class:`ExpectedCorrect`, one add per call; a batch's sum is made with its class counts by
:mod:`._classes`, in C when the extension is built, else by :meth:`ExpectedCorrect.amount`)
and for a profile's held-out estimate (:func:`mean_expected`, behind
:func:`ml_wsgi_metrics.profile.estimate_accuracy`): one rule for both, so live and reference
agree.

The score is a probability, clipped to ``[0, 1]``; non-finite scores count nowhere. With a
profile of two classes the score is the second class's probability (scikit-learn's
``classes_[1]``, column 1 of ``predict_proba``): a row predicted as that class is right with
probability ``s``, one predicted as the first class with ``1 - s``, one without a known class
with ``max(s, 1 - s)``. With one or more than two classes the score is the predicted class's
probability itself; with none, ``max(s, 1 - s)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = ["EITHER", "NEGATIVE", "POSITIVE", "ExpectedCorrect", "kinds", "mean_expected"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]

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

    def amount(self, scores: FloatArray, codes: IntArray | None) -> float:
        """The sum for a batch: ``codes`` each row's class index (``None``: no class). Row
        ``i``'s term is added to lane ``i % 4``, each lane in row order (numpy sums the columns
        of a C-ordered matrix row by row), then ``(lane 0 + lane 1) + (lane 2 + lane 3)``: the
        order of the C pass, ``_speedups.count_classes``."""
        if not len(scores):
            return 0.0
        clipped = np.clip(scores, 0.0, 1.0)
        other = 1.0 - clipped
        larger = np.maximum(clipped, other)
        if codes is None:
            terms = (clipped, other, larger)[self.kinds[self.no_class]]
        else:
            row_kinds = np.asarray(self.kinds)[codes]
            terms = np.where(row_kinds == POSITIVE, clipped, larger)
            np.copyto(terms, other, where=row_kinds == NEGATIVE)
        lanes = np.zeros((len(scores) + 3) // 4 * 4)
        np.copyto(lanes[: len(scores)], terms, where=np.isfinite(scores))  # the others add 0.0
        lane = lanes.reshape(-1, 4).sum(axis=0)
        return float((lane[0] + lane[1]) + (lane[2] + lane[3]))


def mean_expected(values: FloatArray, predicted: Any, classes: Sequence[str] | None) -> float:
    """The mean expected correctness of rows with a finite score (see
    :func:`ml_wsgi_metrics.profile.estimate_accuracy`)."""
    labels = tuple(classes or ())
    other = len(labels)  # the index of any other label, or of none
    expected = ExpectedCorrect(kinds((*labels, ""), labels), other, lambda amount: None)
    codes = None
    if predicted is not None:
        index = {label: i for i, label in enumerate(labels)}
        codes = np.fromiter((index.get(str(p), other) for p in predicted), np.intp)
        if len(codes) != len(values):
            raise ValueError(f"estimate_accuracy: {len(codes)} classes, {len(values)} scores")
    finite = int(np.isfinite(values).sum())
    if finite == 0:
        raise ValueError("estimate_accuracy: no finite scores")
    return expected.amount(values, codes) / finite
