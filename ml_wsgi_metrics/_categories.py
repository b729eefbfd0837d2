"""Counting a batch's categorical column per slot, without a Python step per row.

Owns how one column's values reach the slots ``[categories..., unseen, missing]`` of
:class:`._recorders.CategoricalSeries`, each value counted as ``code(value)`` would count it
alone (the single-row rule): the values as a list (an array of objects or of strings read in
one step), then the C counter of ``_speedups`` (it compares each text with the categories
instead of hashing it) when it is built, counting by hashing otherwise; a pandas
``Categorical`` is counted by its codes, each category coded once. :class:`CategoryColumns`
counts all of a model's columns in one call of ``_speedups.CategoryCounter`` (its tables made
once, when the model is registered).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from ._response import speedups

__all__ = [
    "CategoryColumns",
    "Code",
    "SlotCounter",
    "Values",
    "count_by_hashing",
    "count_slots",
    "counted_alike",
    "slot_counter",
]

#: The slot of one value (``CategoricalSeries.code``).
Code = Callable[[Any], int]
#: What a counter reads: a list, a tuple or a 1-d array of objects.
Values = Sequence[Any] | npt.NDArray[np.object_]
#: Counts per slot ``[categories..., unseen, missing]`` of the values.
SlotCounter = Callable[[Values, tuple[str, ...], Code], list[int]]


def counted_alike(value: Any) -> bool:
    """Whether every value equal to ``value`` has its slot: a text, ``None`` or a float NaN
    (numbers of other types can be equal and read differently: ``1``, ``1.0``, ``True``)."""
    return value.__class__ is str or value is None or (value.__class__ is float and value != value)


def count_by_hashing(values: Values, categories: tuple[str, ...], code: Code) -> list[int]:
    """The pure-Python counter: distinct values counted by hashing, each coded once."""
    slots = [0] * (len(categories) + 2)
    try:
        counts = Counter(values)
    except TypeError:  # unhashable values (lists...)
        counts = None
    if counts is not None and all(map(counted_alike, counts)):
        for value, count in counts.items():
            slots[code(value)] += count
    else:  # one by one: equal values of other types may fall in different slots
        for value in values:
            slots[code(value)] += 1
    return slots


def slot_counter() -> SlotCounter:
    """The C counter when ``_speedups`` is built (and not turned off), else hashing."""
    return count_by_hashing if speedups is None else speedups.count_categories


_count = slot_counter()


def count_slots(values: Any, categories: tuple[str, ...], code: Code) -> list[int]:
    """Counts per slot of one column (a list, an array, a pandas array or Series)."""
    if _is_categorical(values):
        return _count_categorical(values.codes, values.categories.tolist(), len(categories), code)
    return _count(_as_list(values), categories, code)


def _is_categorical(values: Any) -> bool:
    """A pandas ``Categorical`` (or a Series of one): counted by its codes."""
    return isinstance(getattr(values, "codes", None), np.ndarray) and hasattr(values, "categories")


class CategoryColumns:
    """A model's categorical columns, counted together: one amount per slot, each column's
    slots ``[categories..., unseen bin, missing, unseen counter]`` one after the other (the
    layout of :class:`._recorders.CategoricalRow`'s cells). The columns of texts or objects
    are counted in one call of the C counter when the extension is built; a pandas
    ``Categorical`` column, or every column without the extension, by :func:`count_slots`."""

    def __init__(self, vocabularies: list[tuple[str, ...]], codes: list[Code]) -> None:
        self.vocabularies, self.codes = vocabularies, codes
        self.firsts = np.cumsum([0] + [len(v) + 3 for v in vocabularies]).tolist()
        self.counter = None if speedups is None else speedups.CategoryCounter(vocabularies)

    def amounts(self, columns: list[Any], rows: int) -> npt.NDArray[np.float64]:
        """The amounts of ``rows`` rows, given each column's values (``None``: the inputs
        lack it, every row is missing)."""
        amounts = np.zeros(self.firsts[-1])
        counted: list[Any] = []
        for j, values in enumerate(columns):
            known, first = len(self.vocabularies[j]), self.firsts[j]
            stored = _in_place(values)  # the common case first, with the fewest checks
            if stored is not None and self.counter is not None:
                counted.append(stored)
                continue
            if values is None:
                amounts[first + known + 1] = rows
            elif self.counter is not None and not _is_categorical(values):
                counted.append(_as_list(values))
                continue
            else:
                counts = count_slots(values, self.vocabularies[j], self.codes[j])
                if sum(counts) != rows:
                    raise ValueError(f"expected {rows} values per column, got {sum(counts)}")
                amounts[first : first + known + 2] = counts
                amounts[first + known + 2] = counts[known]
            counted.append(None)
        if self.counter is not None:
            self.counter.amounts(counted, self.codes, rows, amounts)
        return amounts


#: Classes whose ``_ndarray`` is what ``to_numpy(dtype=object)`` returns, read in place:
#: pandas' ``StringArray`` (python storage: str and its missing value as stored). Checking the
#: class costs less than ``to_numpy``'s own checks, which cost a tenth of counting a column.
_READ_IN_PLACE: set[type] = set()


def _as_list(values: Any) -> Values:
    """The values as a list, a tuple or a 1-d array of objects (read in place), each as
    ``CategoricalSeries.code`` should see it."""
    stored = _in_place(values)
    if stored is not None:
        return stored
    if values.__class__ is not np.ndarray and hasattr(values, "to_numpy"):
        _note_storage(values.__class__)
        values = values.to_numpy(dtype=object)  # pandas: its missing values as they are stored
    if isinstance(values, np.ndarray) and values.ndim == 1:
        if values.dtype.kind == "O":
            objects: npt.NDArray[np.object_] = values
            return objects
        if values.dtype.kind == "U":  # texts as str, not numpy's str_
            texts: list[str] = values.tolist()
            return texts
    return values if isinstance(values, list | tuple) else list(values)


def _in_place(values: Any) -> npt.NDArray[np.object_] | None:
    """The objects of an array of a ``_READ_IN_PLACE`` class (None for any other)."""
    if type(values) not in _READ_IN_PLACE:
        return None
    stored: npt.NDArray[np.object_] = values._ndarray
    return stored


def _note_storage(kind: type) -> None:
    """Read ``kind``'s storage in place from now on when it is pandas' ``StringArray`` (known
    only once pandas is imported: this module does not import it)."""
    arrays = getattr(sys.modules.get("pandas"), "arrays", None)
    if kind is getattr(arrays, "StringArray", None):
        _READ_IN_PLACE.add(kind)


def _count_categorical(codes: np.ndarray, values: list[Any], known: int, code: Code) -> list[int]:
    """A pandas Categorical's counts: rows per code (-1: missing), each category coded once."""
    per_code = np.bincount(codes.astype(np.intp) + 1, minlength=len(values) + 1).tolist()
    slots = [0] * (known + 2)
    slots[known + 1] = per_code[0]
    for value, count in zip(values, per_code[1:], strict=True):
        if count:
            slots[code(value)] += count
    return slots
