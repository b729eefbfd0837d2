"""A batch's predicted classes: rows per class slot and their expected correctness, in one pass.

Owns how :func:`._recorders.record_batch` counts predicted classes into the slots of
``CompiledModel.classes`` (the profile's classes, then NO_CLASS, then UNSEEN), each row where
``CompiledModel.class_code`` puts it alone (the single-row rule), and sums the rows' expected
correctness (:mod:`._expected`'s rule): in one pass of ``_speedups.count_classes`` when the
extension is built, else with numpy (:meth:`ClassCounter.numpy_count`). Both give the same
counts, and the same sum to the bit: row ``i``'s term goes to lane ``i % 4``, each lane adds
its terms in row order, then ``(lane 0 + lane 1) + (lane 2 + lane 3)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._categories import counted_alike
from ._expected import ExpectedCorrect
from ._series import speedups

__all__ = ["ClassCounter"]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.intp]


class ClassCounter:
    """A model's class slots ``[labels..., NO_CLASS, UNSEEN]`` and their expected kinds."""

    __slots__ = ("code", "count", "expected", "kinds", "labels", "no_class")

    def __init__(
        self, labels: Sequence[str], expected: ExpectedCorrect, code: Callable[[Any], int]
    ) -> None:
        self.labels, self.expected, self.code = tuple(labels), expected, code
        self.kinds = tuple(expected.kinds)
        self.no_class = len(self.labels)
        self.count = self.numpy_count if speedups is None else self.c_count

    def c_count(
        self, classes: Any, scores: FloatArray | None, rows: int
    ) -> tuple[FloatArray, float]:
        """Rows per slot and the expected correct rows among them, given the classes (``None``:
        none; a list; a 1-d array of strings in native byte order) and the scores (``None``:
        none, nothing expected): :attr:`count` when the extension is built."""
        counts = np.zeros(len(self.kinds))
        args = (self.labels, self.kinds, self.code, counts)
        return counts, speedups.count_classes(classes, scores, rows, *args)

    def numpy_count(
        self, classes: Any, scores: FloatArray | None, rows: int
    ) -> tuple[FloatArray, float]:
        """:meth:`c_count` with numpy (:attr:`count` without the extension): each row's slot,
        then their counts and terms."""
        codes = None if classes is None else self.codes(classes)
        if codes is None:
            counts = np.zeros(len(self.kinds))
            counts[self.no_class] = rows
        else:
            counts = np.bincount(codes, minlength=len(self.kinds)).astype(np.float64)
        expected = 0.0 if scores is None else self.expected.amount(scores, codes)
        return counts, expected

    def codes(self, classes: Any) -> IntArray:
        """Each row's slot: an array of strings compared with each label (until every row is
        found), the other rows (and a list's) coded each distinct value once."""
        if not isinstance(classes, np.ndarray):
            return self._coded(classes)
        codes = np.full(len(classes), -1, dtype=np.intp)
        left = len(classes)
        for slot, label in enumerate(self.labels):
            if not left:
                break
            if label.endswith("\0"):  # numpy would compare it without its trailing zeros
                continue
            match = classes == label
            found = int(np.count_nonzero(match))
            codes[match] = slot
            left -= found
        if left:
            rest = codes < 0
            codes[rest] = self._coded(classes[rest].tolist())
        return codes

    def _coded(self, values: list[Any]) -> IntArray:
        """Each value's slot: distinct values coded once when equal ones share a slot (texts,
        ``None``, NaN), else each value (``1``, ``1.0`` and ``True`` are equal, read apart)."""
        try:
            distinct = dict.fromkeys(values)
        except TypeError:  # unhashable values
            distinct = {}
        code = self.code
        if distinct and all(map(counted_alike, distinct)):
            code = {value: self.code(value) for value in distinct}.__getitem__
        return np.fromiter(map(code, values), np.intp, count=len(values))
