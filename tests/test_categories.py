"""Categorical counts: the C counter and the pure-Python one count each value where the
single-row rule (``CategoricalSeries.code``) puts it, for every value type, every column form
(lists, arrays of objects, pandas' string storages, ``category`` columns) and every input
form of ``record_prediction``."""

from __future__ import annotations

import math
import sys
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import unreadable_blocks, value
from support import require_speedups

from ml_wsgi_metrics import _categories, signals
from ml_wsgi_metrics._categories import (
    CategoryColumns,
    SlotCounter,
    count_by_hashing,
    count_slots,
)
from ml_wsgi_metrics._inputs import FrameColumns
from ml_wsgi_metrics._recorders import CategoricalSeries
from ml_wsgi_metrics.profile import UNSEEN, ReferenceProfile
from ml_wsgi_metrics.testing import isolated_signals

#: Texts of every storage kind of CPython's str (1, 2 and 4 bytes a character), the empty
#: one, several of the same length (one bucket of the C table), and the texts of values that
#: are equal but read differently (1, 1.0, True).
CATEGORIES = (
    *("No", "Yes", "1", "True", "1.0", "One year", "Two year", "", "café", "日本語"),
    *("😀x", "No internet", "b'Yes'", "-0.0", "<NA>"),
)


class Text(str):
    """A str subclass: coded by the Python rule (its ``str()``)."""


class Shouting:
    """Any object: coded by its text."""

    def __str__(self) -> str:
        return "Yes"


def fresh(text: str) -> str:
    """An equal str that is a new object (as pandas and JSON hand them over)."""
    return "".join(list(text))


def every_kind_of_value(rows: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    pool: list[Any] = [
        *[fresh(c) for c in CATEGORIES],
        *CATEGORIES,  # the categories' own objects: found by identity
        "Maybe",
        "no",
        "Yes ",
        "日本",
        "😀y",
        "One yeaR",
        None,
        math.nan,
        float("nan"),
        np.float64("nan"),
        pd.NA,
        pd.NaT,
        1,
        1.0,
        True,
        np.int64(1),
        -0.0,
        b"Yes",
        Text("Yes"),
        np.str_("No"),
        Shouting(),
        ("a", 1),
    ]
    return [pool[i] for i in rng.integers(0, len(pool), rows)]


def objects(values: list[Any]) -> np.ndarray:
    """A 1-d array of objects holding ``values`` themselves (tuples included)."""
    array = np.empty(len(values), dtype=object)
    for i, item in enumerate(values):
        array[i] = item
    return array


def one_by_one(values: Any, categories: tuple[str, ...]) -> list[int]:
    """The single-row rule: each value coded alone."""
    code = CategoricalSeries("f", categories, []).code
    counts = Counter(code(v) for v in values)
    return [counts[slot] for slot in range(len(categories) + 2)]


@pytest.fixture(params=["c", "python"])
def counter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> SlotCounter:
    """The counter ``record_prediction`` uses: the C one (``_speedups``), then hashing."""
    chosen: SlotCounter = (
        count_by_hashing if request.param == "python" else require_speedups().count_categories
    )
    monkeypatch.setattr(_categories, "_count", chosen)
    if request.param == "python":  # models registered now count their batches in Python too
        monkeypatch.setattr(_categories, "speedups", None)
    return chosen


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("form", ["list", "tuple", "objects", "strided objects"])
def test_each_value_counts_where_the_single_row_rule_puts_it(
    counter: SlotCounter, seed: int, form: str
) -> None:
    values = every_kind_of_value(2000, seed)
    categories = CATEGORIES[: 5 + 2 * seed]  # 5 to 15 categories
    given: Any = {
        "list": lambda: values,
        "tuple": lambda: tuple(values),
        "objects": lambda: objects(values),
        "strided objects": lambda: objects([v for v in values for _ in (1, 2)])[::2],
    }[form]()
    code = CategoricalSeries("f", categories, []).code
    assert counter(given, categories, code) == one_by_one(values, categories)


def test_fifty_categories_of_one_length(counter: SlotCounter) -> None:
    """A full vocabulary (profile.MAX_CATEGORIES) whose texts share lengths and characters."""
    categories = tuple(f"A{i:02d}" for i in range(50))
    values = [fresh(f"A{i:02d}") for i in range(60)] * 3 + ["A5", "A050", "a01"]
    code = CategoricalSeries("f", categories, []).code
    counts = counter(values, categories, code)
    assert counts == one_by_one(values, categories) == [3] * 50 + [3 * 10 + 3, 0]


@pytest.mark.parametrize("values", [[], (), np.array([], dtype=object)], ids=repr)
def test_an_empty_column_counts_nothing(counter: SlotCounter, values: Any) -> None:
    assert counter(values, ("a", "b"), CategoricalSeries("f", ("a", "b"), []).code) == [0] * 4


def test_no_categories_leave_every_text_unseen(counter: SlotCounter) -> None:
    values = ["a", "", None, 3]
    assert counter(values, (), CategoricalSeries("f", (), []).code) == [3, 1]


def test_the_c_counter_checks_what_code_gives_and_passes_its_errors() -> None:
    count = require_speedups().count_categories
    with pytest.raises(ValueError, match="code\\(\\) gave 7, not a slot"):
        count([1], ("a",), lambda v: 7)
    with pytest.raises(ZeroDivisionError):
        count(["a", 2], ("a",), lambda v: 1 // 0)
    with pytest.raises(TypeError, match="categories must be a tuple"):
        count(["a"], ["a"], len)
    with pytest.raises(TypeError, match="categories must be str"):
        count(["a"], ("a", 1), len)
    with pytest.raises(TypeError):
        count(5, ("a",), len)


def test_a_code_that_shrinks_the_list_ends_the_count_safely() -> None:
    values: list[Any] = ["a", 1, *["a"] * 50]

    def code(value: Any) -> int:
        del values[2:]
        return 1

    assert require_speedups().count_categories(values, ("a",), code) == [1, 1, 0]


def test_the_c_counter_is_chosen_when_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """It follows the C record's choice (``ML_WSGI_METRICS_PURE_PYTHON`` turns both off:
    ``tests/test_speedups.py``)."""
    speedups = require_speedups()
    assert _categories._count is _categories.slot_counter() is speedups.count_categories
    monkeypatch.setattr(_categories, "speedups", None)
    assert _categories.slot_counter() is count_by_hashing


# -- every column of a batch in one call ---------------------------------------------------------

#: Long texts alike: 17 to 24 characters apart in their middle 8 bytes, over 24 apart only
#: past them (the same first, middle and last words: one bucket), short ones.
ALIKE = (
    *("No internet service", "No internet servicf", "No internet_service", "x" * 30),
    *("x" * 20 + "y" + "x" * 9, "x" * 17, "x" * 16, "x" * 8, "x" * 7, "x", ""),
)
#: Each column's vocabulary: the ASCII buckets (one category each), a vocabulary two of whose
#: texts share a bucket (compared through the chained table), one without categories.
VOCABULARIES = [
    CATEGORIES[:5],
    CATEGORIES,
    ("x" * 30, "No internet service", "x" * 16, "x" * 7, ""),
    ALIKE,
    (),
    ("Yes", "No"),
    CATEGORIES[5:],
]


def every_column(rows: int, seed: int) -> list[Any]:
    """One column per vocabulary, in every form a batch gives: lists, arrays of objects,
    pandas' string arrays, a ``category`` column, an absent column (``None``)."""
    rng = np.random.default_rng(seed)
    mixed = every_kind_of_value(rows, seed) + [fresh(t) for t in ALIKE]
    texts = [fresh(t) for t in rng.choice([*ALIKE, "x" * 29, "y" * 30], rows + len(ALIKE))]
    gaps = [None if i % 5 == 0 else fresh(t) for i, t in enumerate(texts)]
    return [
        mixed,
        objects(mixed),
        objects(texts),
        pd.array(gaps, dtype=pd.StringDtype("python")),
        pd.Categorical(gaps),
        None,
        pd.Series(gaps, dtype=pd.StringDtype("python", na_value=np.nan)).array,
    ]


def each_column_alone(columns: list[Any], rows: int) -> list[float]:
    """The amounts in the slots' layout, each column coded value by value."""
    amounts: list[float] = []
    for values, vocabulary in zip(columns, VOCABULARIES, strict=True):
        counts = [0] * len(vocabulary) + [0, rows]
        if values is not None:
            counts = one_by_one(list(values), vocabulary)
        amounts += [*counts, counts[len(vocabulary)]]
    return amounts


def codes_of(vocabularies: list[tuple[str, ...]]) -> list[Any]:
    return [CategoricalSeries(f"f{j}", v, []).code for j, v in enumerate(vocabularies)]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("counted", ["c", "python"])
def test_every_column_of_a_batch_counts_as_each_column_alone(
    seed: int, counted: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if counted == "python":
        monkeypatch.setattr(_categories, "speedups", None)
        monkeypatch.setattr(_categories, "_count", count_by_hashing)
    else:
        require_speedups()
    rows = 1500 + len(ALIKE)
    columns = every_column(1500, seed)
    counter = CategoryColumns(VOCABULARIES, codes_of(VOCABULARIES))
    assert (counter.counter is None) == (counted == "python")
    assert counter.amounts(columns, rows).tolist() == each_column_alone(columns, rows)


def test_the_counter_adds_to_its_out_skipping_none() -> None:
    speedups = require_speedups()
    vocabularies = [("a", "b"), ("No internet service",)]
    counter = speedups.CategoryCounter(vocabularies)
    out = np.ones(counter.slots)
    columns: list[Any] = [["a", fresh("b"), "c", None], None]
    counter.amounts(columns, codes_of(vocabularies), 4, out)
    assert counter.slots == 5 + 4
    assert out.tolist() == [2, 2, 2, 2, 2] + [1] * 4


def test_the_counter_refuses_a_column_of_other_length_and_passes_code_errors() -> None:
    speedups = require_speedups()
    vocabularies = [("a",), ("b",)]
    counter = speedups.CategoryCounter(vocabularies)
    codes = codes_of(vocabularies)
    out = np.zeros(counter.slots)
    with pytest.raises(ValueError, match="expected 2 values per column, got 3"):
        counter.amounts([["a", "a"], ["b", "b", "b"]], codes, 2, out)
    with pytest.raises(ZeroDivisionError):
        counter.amounts([["a", 1], None], [lambda v: 1 // 0, codes[1]], 2, out)
    with pytest.raises(ValueError, match="out: 3 slots, not 8"):
        counter.amounts([None, None], codes, 2, np.zeros(3))
    with pytest.raises(TypeError, match="lists of 2"):
        counter.amounts([None], codes, 2, out)
    with pytest.raises(TypeError, match="categories must be str"):
        speedups.CategoryCounter([("a", 1)])


# -- compact ASCII texts, found by their length --------------------------------------------------

#: Texts whose prefixes are each other's: the first words of texts of different lengths agree.
LETTERS = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ!#$%&()*+,-./:;<=>?@[]^_{}"


def near_misses(text: str) -> list[str]:
    """Texts of ``text``'s length that differ from it in one character (at each position),
    and the texts a character shorter and longer."""
    changed = [
        text[:p] + ("y" if text[p] != "y" else "z") + text[p + 1 :] for p in range(len(text))
    ]
    return [*changed, text[:-1], text + "x", "x" + text]


def assert_counted_as_by_hashing(values: list[Any], vocabulary: tuple[str, ...]) -> None:
    """The C counter counts ``values`` as hashing does: alone (``count_categories``) and through
    a ``CategoryCounter`` (its tables made once), from a list and an array of objects."""
    speedups = require_speedups()
    code = CategoricalSeries("f", vocabulary, []).code
    want = count_by_hashing(values, vocabulary, code)
    assert speedups.count_categories(values, vocabulary, code) == want
    counter = speedups.CategoryCounter([vocabulary])
    out = np.zeros(counter.slots)
    counter.amounts([objects(values)], [code], len(values), out)
    assert out.tolist() == [*want, want[len(vocabulary)]]


def with_headers_of_every_kind(texts: list[str]) -> list[str]:
    """Each text as a fresh str, an interned one and one whose hash is computed: the header
    bytes before a short text differ, and are not compared."""
    hashed = [fresh(t) for t in texts]
    for text in hashed:
        hash(text)
    return [fresh(t) for t in texts] + [sys.intern(fresh(t)) for t in texts] + hashed


@pytest.mark.parametrize("longest", [0, 7, 8, 9, 16, 17, 24, 25, 32, 33, 63, 64, 71])
def test_every_byte_of_a_text_is_compared(longest: int) -> None:
    """A category of each length (a table reads the words its longest needs; over 32 compared
    in its middle too, over 63 through the chained buckets); values that differ from one in
    one place, or in length, and texts of every length."""
    vocabulary = tuple(LETTERS[:length] for length in range(longest + 1))
    values = [miss for text in vocabulary for miss in near_misses(text)]
    values += with_headers_of_every_kind([LETTERS[:length] for length in range(0, 80)])
    assert_counted_as_by_hashing(values, vocabulary)


#: Vocabularies whose categories share lengths: set apart by a few bits of their last 8
#: bytes (the first character of the year, the last of "ab"), or by none (found by hash, or
#: by the chained buckets when apart only before their last 8 bytes); a latin-1 text of an
#: ASCII one's length.
SHARED_LENGTHS = [
    ("Month-to-month", "One year", "Two year"),
    ("ab", "ba", "a", "b", "", "abc"),
    ("aa", "ab", "ba", "bb"),
    tuple(f"No{i:02d}" for i in range(20)),
    ("AL", "AK", "AZ", "AR", "CA", "CO", "CT", "DE", "FL", "GA", "HI", "ID", "IL", "IN", "IA"),
    ("café", "cafe", "caff", "日本語"),
    tuple(f"{i:02d}" + "x" * 30 for i in range(3)),  # apart only in their first word
]


@pytest.mark.parametrize("vocabulary", SHARED_LENGTHS, ids=lambda v: v[0] + "...")
def test_categories_of_one_length_are_set_apart(vocabulary: tuple[str, ...]) -> None:
    values = with_headers_of_every_kind(list(vocabulary))
    values += [miss for text in vocabulary for miss in near_misses(text)]
    values += [*vocabulary, "", "zz", "One yeaR", "Ona year", None, 1]
    assert_counted_as_by_hashing(values, vocabulary)


@pytest.mark.parametrize("seed", range(12))
def test_texts_of_two_letters_count_as_by_hashing(seed: int) -> None:
    """Random categories of two letters share lengths, prefixes and suffixes; the values are
    the categories, their near misses and other texts of the same lengths."""
    rng = np.random.default_rng(seed)
    lengths = rng.choice([*range(0, 41), 62, 63, 64, 65], size=int(rng.integers(1, 20)))
    vocabulary = tuple(dict.fromkeys("".join(rng.choice(list("ab"), n)) for n in lengths))
    values = with_headers_of_every_kind(list(vocabulary))
    values += [miss for text in vocabulary for miss in near_misses(text)]
    values += ["".join(rng.choice(list("ab"), n)) for n in rng.choice(lengths, 200)]
    assert_counted_as_by_hashing(values, vocabulary)


# -- pandas' column forms -----------------------------------------------------------------------


def texts_with_gaps(rows: int, seed: int) -> list[Any]:
    rng = np.random.default_rng(seed)
    texts: list[Any] = rng.choice(["No", "Yes", "Maybe", "日本語"], rows).tolist()
    for i in range(0, rows, 7):
        texts[i] = None
    return texts


def string_columns() -> dict[str, Any]:
    texts = texts_with_gaps(300, 3)
    forms: dict[str, Any] = {
        "str (python, NaN)": pd.Series(texts, dtype=pd.StringDtype("python", na_value=np.nan)),
        "string (python, NA)": pd.Series(texts, dtype=pd.StringDtype("python")),
        "object": pd.Series(texts, dtype=object),
        "category": pd.Series(texts, dtype="category"),
        "category, unused and unordered": pd.Series(
            pd.Categorical(texts, categories=["Yes", "Never", "No", "Maybe", "日本語"])
        ),
        "category of numbers": pd.Series([1, 2, None, 2.5, 1] * 60, dtype="category"),
        "numbers": pd.Series([1, 2, 3, 2, 1] * 60),
        "booleans with NA": pd.Series([True, None, False] * 100, dtype="boolean"),
        "numpy texts": np.array([t or "" for t in texts]),
    }
    try:
        import pyarrow
    except ImportError:
        pass
    else:  # pragma: no cover - pyarrow is optional
        forms["string (pyarrow)"] = pd.Series(texts, dtype=pd.StringDtype("pyarrow"))
        forms["ArrowDtype"] = pd.Series(texts, dtype=pd.ArrowDtype(pyarrow.string()))
    return forms


@pytest.mark.parametrize("form", list(string_columns()))
def test_every_pandas_column_form_counts_as_its_values_one_by_one(
    counter: SlotCounter, form: str
) -> None:
    column = string_columns()[form]
    categories = ("No", "Yes", "日本語", "1", "2.5")
    code = CategoricalSeries("f", categories, []).code
    want = one_by_one(column.tolist(), categories)
    stored = FrameColumns(pd.DataFrame({"f": column}))("f")  # as the frame reader reads it
    assert count_slots(column, categories, code) == want
    assert count_slots(stored, categories, code) == want


@pytest.mark.parametrize("read", ["in place", "through to_numpy"])
@pytest.mark.parametrize("na_value", [pd.NA, np.nan], ids=["NA", "NaN"])
def test_a_string_array_counts_alike_read_in_place_or_through_to_numpy(
    counter: SlotCounter, read: str, na_value: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pandas' StringArray is read through its public ``to_numpy`` the first time, then its
    storage in place; without that, always through ``to_numpy``."""
    monkeypatch.setattr(_categories, "_READ_IN_PLACE", set())
    if read != "in place":
        monkeypatch.setattr(_categories, "_note_storage", lambda kind: None)
    column = pd.array(texts_with_gaps(300, 3), dtype=pd.StringDtype("python", na_value=na_value))
    categories = ("No", "Yes", "日本語")
    code = CategoricalSeries("f", categories, []).code
    want = one_by_one(column.tolist(), categories)
    to_numpy, calls = type(column).to_numpy, []

    def counted_to_numpy(self: Any, **options: Any) -> Any:
        calls.append(options)
        return to_numpy(self, **options)

    monkeypatch.setattr(type(column), "to_numpy", counted_to_numpy)
    assert count_slots(column, categories, code) == want
    assert CategoryColumns([categories], [code]).amounts([column], 300).tolist() == [
        *want,
        want[3],
    ]
    assert len(calls) == (1 if read == "in place" else 2)
    if read == "in place":
        assert _categories._as_list(column) is column._ndarray


def test_a_category_column_counts_by_its_codes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each category is coded once, not each row."""
    column = pd.Categorical(["b", "a", None] * 400, categories=["a", "b", "z"])
    coded: list[Any] = []
    series = CategoricalSeries("f", ("a", "b"), [])

    def code(v: Any) -> int:
        coded.append(v)
        return series.code(v)

    assert count_slots(column, ("a", "b"), code) == [400, 400, 0, 400]
    assert coded == ["a", "b"]  # "z" has no row


# -- through record_prediction ------------------------------------------------------------------


@pytest.mark.parametrize("frame_reader", ["stored arrays", "pandas' public path"])
@pytest.mark.parametrize("form", [f for f in string_columns() if "numpy" not in f])
def test_a_frame_records_what_a_dict_of_lists_records(
    profile: ReferenceProfile,
    counter: SlotCounter,
    form: str,
    frame_reader: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    if frame_reader != "stored arrays":  # as where pandas' internals moved
        unreadable_blocks(monkeypatch, AttributeError("moved"))
    contract = string_columns()[form]
    rows = len(contract)
    delta = np.linspace(-9, 9, rows)
    frame = pd.DataFrame({"Contract": contract, "delta": delta})
    recorded = []
    for inputs in (frame, {"Contract": contract.tolist(), "delta": delta.tolist()}):
        with registered(profile) as registry:
            signals.record_prediction(inputs)
            recorded.append(contract_samples(registry, profile))
    assert recorded[0] == recorded[1]
    assert sum(recorded[0].values()) == rows


@contextmanager
def registered(profile: ReferenceProfile) -> Iterator[CollectorRegistry]:
    with isolated_signals() as registry:
        signals.register_model(profile)
        yield registry


def contract_samples(registry: CollectorRegistry, profile: ReferenceProfile) -> dict[str, Any]:
    key = {"feature": "Contract"}
    bins = profile.feature("Contract").bins
    samples = {b: value(registry, "model_feature_bin_total", **key, bin=b) for b in bins}
    samples["missing"] = value(registry, "model_feature_missing_total", **key)
    assert value(registry, "model_feature_unseen_total", **key) == samples[UNSEEN]
    return samples
