"""Reading the app's inputs: a DataFrame's columns as pandas stores them (or through its
public path), and numeric features read as the whole-frame conversion reads them."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest
from signals_support import unreadable_blocks

from ml_wsgi_metrics._inputs import FrameColumns, as_floats, columns, is_scalar, numeric_matrix

ROWS = 6


def numeric_forms() -> dict[str, Any]:
    """A feature column in every dtype an app may send for a numeric feature."""
    return {
        "float": [1.5, -2.0, math.nan, math.inf, 0.0, 7.25],
        "int": np.arange(ROWS) - 2,
        "nullable Int64": pd.array([1, None, 3, 4, None, -6], dtype="Int64"),
        "nullable Float64": pd.array([1.5, None, 3.0, -4.5, None, 6.0], dtype="Float64"),
        "bool": [True, False, True, True, False, False],
        "boolean with NA": pd.array([True, None, False, True, None, False], dtype="boolean"),
        "objects": np.array([1, None, 2.5, "4", pd.NA, "x"], dtype=object),
        "numeric text": pd.array(["12.5", " ", "abc", None, "-3", "1e3"], dtype="str"),
        "dates": pd.date_range("2026-01-01", periods=ROWS),
        "category of numbers": pd.Categorical([1.0, 2.0, None, 2.0, 1.0, 3.5]),
        "text": ["No", "Yes", None, "No", "x", "y"],
    }


def the_whole_frame_at_once(frame: pd.DataFrame, names: list[str]) -> np.ndarray:
    """How numeric features were read before columns were read one by one: one conversion of
    the frame's features, else the public ``Series`` of each column."""
    try:
        converted: np.ndarray = frame.reindex(columns=names).to_numpy(
            dtype=np.float64, na_value=math.nan
        )
        return converted
    except (TypeError, ValueError):
        matrix = np.full((len(frame), len(names)), math.nan)
        for j, name in enumerate(names):
            if name in frame.columns:
                matrix[:, j] = as_floats(frame[name], len(frame))
        return matrix


@pytest.mark.parametrize("accessor", ["stored arrays", "pandas' public path"])
@pytest.mark.parametrize("form", list(numeric_forms()))
def test_numeric_features_read_as_the_whole_frame_conversion_reads_them(
    form: str, accessor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if accessor != "stored arrays":
        unreadable_blocks(monkeypatch, AttributeError("moved"))
    features = ["a", form, "absent"]
    frame = pd.DataFrame(
        {"a": np.linspace(0, 1, ROWS), form: numeric_forms()[form], "text": ["t"] * ROWS}
    )
    rows, column = columns(frame)
    read = numeric_matrix(frame, column, features, rows)
    np.testing.assert_array_equal(read, the_whole_frame_at_once(frame, features))
    assert read.shape == (ROWS, 3) and np.isnan(read[:, 2]).all()


def test_a_frame_of_exactly_the_features_is_one_view() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, math.nan]})
    rows, column = columns(frame)
    read = numeric_matrix(frame, column, ["a", "b"], rows)
    np.testing.assert_array_equal(read, [[1.0, 3.0], [2.0, math.nan]])


def test_columns_are_read_as_pandas_stores_them() -> None:
    frame = pd.DataFrame(
        {"n": [1.0, 2.0], "s": pd.array(["a", None], dtype="str"), "c": ["x", "y"]}
    ).astype({"c": "category"})
    rows, column = columns(frame)
    assert rows == 2
    assert isinstance(column("n"), np.ndarray) and column("n").tolist() == [1.0, 2.0]
    assert isinstance(column("s"), pd.api.extensions.ExtensionArray)
    assert isinstance(column("c"), pd.Categorical)
    assert column("absent") is None


@pytest.mark.parametrize(
    "failure", [AttributeError("moved"), TypeError("changed"), IndexError("0")], ids=repr
)
def test_unreadable_blocks_fall_back_to_the_public_series(
    failure: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    unreadable_blocks(monkeypatch, failure)
    frame = pd.DataFrame({"n": [1.0, 2.0], "s": ["a", "b"]})
    _, column = columns(frame)
    assert isinstance(column("s"), pd.Series) and column("s").tolist() == ["a", "b"]
    assert column("absent") is None
    assert numeric_matrix(frame, column, ["n"], 2).tolist() == [[1.0], [2.0]]


def frames() -> dict[str, pd.DataFrame]:
    """Frames laid out in blocks every way pandas lays them out."""
    rng = np.random.default_rng(5)
    mixed = pd.DataFrame(
        {
            "x": rng.normal(size=ROWS),
            "s": pd.array(list("abcdef"), dtype="str"),
            "i": np.arange(ROWS),
            "y": rng.normal(size=ROWS),
            "o": np.array([1, "a", None, 2.5, "b", pd.NA], dtype=object),
            "c": pd.Categorical(list("abcabc")),
            "d": pd.date_range("2026-01-01", periods=ROWS, tz="UTC"),
            "n": pd.array([1, None, 3, 4, None, -6], dtype="Int64"),
        }
    )
    grown = mixed.copy()
    grown["z"] = rng.normal(size=ROWS)  # a block of its own, not consolidated
    grown.insert(0, "w", rng.normal(size=ROWS))
    return {
        "mixed": mixed,
        "grown": grown,
        "reordered": mixed[["y", "c", "x", "s", "n", "o", "i", "d"]],
        "sliced": pd.concat([mixed, mixed]).iloc[3:9],
        "transposed": pd.DataFrame(rng.normal(size=(3, ROWS)), index=list("abc")).T,
        "no rows": mixed.iloc[:0],
        "no columns": pd.DataFrame(index=range(ROWS)),
    }


@pytest.mark.parametrize("name", list(frames()))
def test_each_stored_column_is_what_pandas_gives_for_it(name: str) -> None:
    frame = frames()[name]
    column = FrameColumns(frame)
    assert column.stored is not None  # read from the blocks, not the fallback
    for label in frame.columns:
        stored = column(label)
        assert getattr(stored, "ndim", 0) == 1 and len(stored) == len(frame)
        pd.testing.assert_series_equal(
            pd.Series(stored, name=label), frame[label].reset_index(drop=True), check_index=False
        )
    assert column("absent") is None


@pytest.mark.parametrize("name", list(frames()))
def test_float_columns_of_one_block_are_read_without_a_conversion(name: str) -> None:
    frame = frames()[name]
    floats = [c for c in frame.columns if frame[c].dtype == np.float64]
    column = FrameColumns(frame)
    for names in (floats, floats[::-1], floats[1:], floats[:1]):
        matrix = column.float_matrix(names)
        if matrix is None:  # the columns are in different blocks
            blocks = {id(column.stored[n][0]) for n in names}
            assert len(blocks) > 1 or not names
            continue
        np.testing.assert_array_equal(matrix, frame[names].to_numpy(dtype=np.float64))
    assert column.float_matrix(["s"] if "s" in frame else ["absent"]) is None


def test_consecutive_float_columns_are_a_view_of_their_block() -> None:
    frame = pd.DataFrame({"a": [1.0, 2.0], "b": [3.0, 4.0], "t": ["x", "y"], "c": [5.0, 6.0]})
    column = FrameColumns(frame)
    matrix = column.float_matrix(["a", "b"])
    assert matrix is not None and np.shares_memory(matrix, frame._mgr.blocks[0].values)
    assert numeric_matrix(frame, column, ["a", "b"], 2) is not None


def test_duplicate_column_names_keep_pandas_own_choice() -> None:
    frame = pd.DataFrame([[1.0, 2.0]], columns=["n", "n"])
    _, column = columns(frame)
    assert isinstance(column("n"), pd.DataFrame)  # what frame["n"] gives


@pytest.mark.parametrize(
    ("value", "scalar"),
    [
        *[(v, True) for v in (None, "Yes", b"Yes", 1, 1.5, True, np.float64(1), np.str_("a"))],
        (np.array(0.5), True),  # a 0-d array: one value
        *[(v, False) for v in ([], [0.5], (0.5,), [[1, 2]], ["Yes"] * 1000, np.array([0.5]))],
        (pd.Series([0.5]), False),
    ],
)
def test_one_value_is_told_from_a_sequence(value: Any, scalar: bool) -> None:
    assert is_scalar(value) is scalar
