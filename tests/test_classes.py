"""A batch's predicted classes: the C pass (``_speedups.count_classes``) and the numpy one count
each row where the single-row rule (``CompiledModel.class_code``) puts it, and sum the rows'
expected correctness as a loop over rows would, to the bit, for every form of classes and
scores (NaN, infinities, scores out of [0, 1], unknown and missing classes, 0 and 1 rows)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from support import require_speedups

from ml_wsgi_metrics._classes import ClassCounter
from ml_wsgi_metrics._expected import NEGATIVE, POSITIVE
from ml_wsgi_metrics._model import CompiledModel
from ml_wsgi_metrics._recorders import _class_values
from ml_wsgi_metrics.metrics import ModelMetrics
from ml_wsgi_metrics.profile import build_profile

#: Texts of every storage kind of CPython's str, near misses of the labels, and more distinct
#: unknown texts than the C pass remembers (16).
TEXTS = [
    *("No", "Yes", "a", "b", "c", "0", "1", "Maybe", "", "No ", "yes", "Ye", "Yess"),
    *("café", "日本語", "😀", "Yes\x00"),
    *(f"unknown {i}" for i in range(24)),
]
#: Values that are not texts: missing ones (None, NaN), numbers read as their text.
OTHERS = [None, math.nan, float("nan"), np.nan, pd.NA, 0, 1, 1.0, True, np.int64(1), b"Yes"]

Count = Callable[[ClassCounter, Any, Any, int], tuple[np.ndarray, float]]


def c_count(counter: ClassCounter, classes: Any, scores: Any, rows: int) -> Any:
    require_speedups()
    return counter.count(classes, scores, rows)


def numpy_count(counter: ClassCounter, classes: Any, scores: Any, rows: int) -> Any:
    return counter.numpy_count(classes, scores, rows)


COUNTS = [pytest.param(c_count, id="c"), pytest.param(numpy_count, id="numpy")]


@pytest.fixture(
    scope="module",
    name="model",
    params=[["No", "Yes"], ["a", "b", "c"], None, ["1"], ["No", "Yes\0"]],
    ids=["binary", "three", "no-classes", "one", "a-label-ending-in-nul"],
)
def compiled_model(request: pytest.FixtureRequest) -> CompiledModel:
    return compiled(request.param)


def compiled(classes: list[str] | None) -> CompiledModel:
    """A model registered with a profile of ``classes``, on a registry of its own."""
    frame = pd.DataFrame({"x": np.arange(50.0)})
    scores = np.linspace(0, 1, 50)
    profile = build_profile(frame, model="m", version="1", scores=scores, classes=classes)
    return CompiledModel(profile, ModelMetrics(CollectorRegistry()))


def by_rows(model: CompiledModel, classes: list[Any] | None, scores: Any, rows: int) -> Any:
    """The definition, a row at a time: the row's slot, and its term added to the sum (to
    lane ``row % 4``, then ``(lane 0 + lane 1) + (lane 2 + lane 3)``, the order both add in)."""
    counts, lanes = [0.0] * len(model.classes), [0.0] * 4
    for row in range(rows):
        code = model.class_code(None if classes is None else classes[row])
        counts[code] += 1
        if scores is None or not math.isfinite(scores[row]):
            continue
        s = min(max(float(scores[row]), 0.0), 1.0)
        kind = model.expected.kinds[code]
        lanes[row % 4] += s if kind == POSITIVE else 1 - s if kind == NEGATIVE else max(s, 1 - s)
    return counts, (lanes[0] + lanes[1]) + (lanes[2] + lanes[3])


def random_scores(rows: int, seed: int) -> np.ndarray:
    """Uniform scores (sums that depend on their order), some NaN, infinite or out of [0, 1]."""
    rng = np.random.default_rng(seed)
    scores = rng.random(rows)
    odd = rng.choice([math.nan, math.inf, -math.inf, 1.5, -0.25, -0.0, 0.5], rows)
    return np.where(rng.random(rows) < 0.1, odd, scores)


def random_classes(rows: int, seed: int, pool: list[Any]) -> list[Any]:
    rng = np.random.default_rng(seed)
    common = ["No", "Yes", "a", "b", "c", "1"]  # mostly labels, as a model predicts them
    picked = [pool[i] for i in rng.integers(0, len(pool), rows)]
    return [common[rng.integers(0, 6)] if rng.random() < 0.7 else value for value in picked]


FORMS = {
    "list": lambda values: list(values),
    "object-array": lambda values: np.array(values, dtype=object),
    "tuple": lambda values: tuple(values),
}
STRING_FORMS = {
    "str-array": lambda texts: np.array(texts),
    "wide-str-array": lambda texts: np.array(texts, dtype="U40"),
    "swapped-str-array": lambda texts: np.array(texts).astype(np.array(texts).dtype.newbyteorder()),
}


@pytest.mark.parametrize("count", COUNTS)
@pytest.mark.parametrize("rows", [0, 1, 7, 1000])
@pytest.mark.parametrize("scored", [True, False], ids=["scores", "no-scores"])
@pytest.mark.parametrize("form", [*FORMS, *STRING_FORMS, "none"])
def test_a_batch_counts_and_sums_as_its_rows_do(
    model: CompiledModel, count: Count, rows: int, scored: bool, form: str
) -> None:
    scores = random_scores(rows, seed=rows) if scored else None
    texts = random_classes(rows, seed=rows + 1, pool=TEXTS)
    classes: Any = None
    if form in FORMS:
        classes = FORMS[form](random_classes(rows, seed=rows + 2, pool=TEXTS + OTHERS))
    elif form in STRING_FORMS:
        classes = STRING_FORMS[form](texts) if rows else np.array([], dtype="U3")
    values = None if classes is None else _class_values(classes)
    counts, expected = count(model.class_counter, values, scores, rows)
    read = None if classes is None else np.asarray(classes, dtype=object).tolist()
    if isinstance(classes, np.ndarray) and classes.dtype.kind == "U":
        read = classes.tolist()  # trailing "\0" is numpy's padding
    assert (counts.tolist(), expected) == by_rows(model, read, scores, rows)


@pytest.mark.parametrize("count", COUNTS)
def test_rows_of_a_strided_array_are_read_in_place(count: Count, model: CompiledModel) -> None:
    texts = np.array(random_classes(2000, seed=5, pool=TEXTS))
    scores = random_scores(4000, seed=6)[::4]
    counts, expected = count(model.class_counter, texts[::2], scores, 1000)
    assert (counts.tolist(), expected) == by_rows(model, texts[::2].tolist(), scores, 1000)


@pytest.mark.parametrize("count", COUNTS)
def test_every_label_of_many_is_found(count: Count) -> None:
    labels = [f"class {i}" for i in range(300)]
    model = compiled(labels)
    texts = np.array(labels * 3)
    scores = random_scores(900, seed=8)
    for values in (texts, texts.tolist()):
        counts, expected = count(model.class_counter, values, scores, 900)
        assert (counts.tolist(), expected) == by_rows(model, texts.tolist(), scores, 900)
        assert counts.tolist() == [3.0] * 300 + [0.0, 0.0]


def test_the_c_pass_refuses_what_it_cannot_count(model: CompiledModel) -> None:
    speedups = require_speedups()
    counter = model.class_counter
    out = np.zeros(len(model.classes))

    def count(classes: Any, scores: Any = None, rows: int = 2, **changed: Any) -> Any:
        args = {"labels": counter.labels, "kinds": counter.kinds, "code": counter.code, "out": out}
        args.update(changed)
        return speedups.count_classes(classes, scores, rows, *args.values())

    with pytest.raises(ValueError, match="3 classes for 2 rows"):
        count(["a", "b", "c"])
    with pytest.raises(ValueError, match="1 scores for 2 rows"):
        count(["a", "b"], np.array([0.5]))
    with pytest.raises(TypeError, match="a list or a 1-d array of str"):
        count(np.array([[b"a"], [b"b"]]))
    with pytest.raises(TypeError, match="float64"):
        count(["a", "b"], np.array([1, 2]))
    with pytest.raises(ValueError, match="code\\(\\) gave 99, not a slot"):
        count([object(), object()], code=lambda value: 99)
    with pytest.raises(ValueError, match="kind 7"):
        count(None, kinds=(7,) * len(out))
    with pytest.raises(ValueError, match="slots, not"):
        count(None, out=np.zeros(1))
    assert out.tolist() == [0.0] * len(out)  # nothing added by a refused call


def test_a_list_emptied_by_code_is_refused(model: CompiledModel) -> None:
    speedups = require_speedups()
    counter = model.class_counter
    values: list[Any] = [object(), "a", "b"]

    def code(value: Any) -> int:
        values.clear()
        return 0

    with pytest.raises(ValueError, match="fewer classes than rows"):
        args = (counter.labels, counter.kinds, code, np.zeros(len(model.classes)))
        speedups.count_classes(values, None, 3, *args)
