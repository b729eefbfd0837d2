"""The reference profile: edges and shares on known data, JSON round trip, validation."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from ml_wsgi_metrics.profile import (
    FORMAT_VERSION,
    UNSEEN,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    build_profile,
    round_edges,
)


def reference_shares(values: np.ndarray, edges: tuple[float, ...]) -> list[float]:
    """Bin shares computed independently of the package: bin i is (edges[i-1], edges[i]]."""
    bounds = [-math.inf, *edges, math.inf]
    return [float(np.mean((values > lo) & (values <= hi))) for lo, hi in itertools.pairwise(bounds)]


@pytest.fixture
def frame() -> pd.DataFrame:
    rng = np.random.default_rng(7)
    n = 2000
    return pd.DataFrame(
        {
            "ramp": np.arange(1, n + 1, dtype=np.int64) % 100 + 1,
            "charges": np.round(rng.uniform(18, 119, n), 2),
            "contract": rng.choice(
                ["Month-to-month", "One year", "Two year"], n, p=[0.6, 0.25, 0.15]
            ),
            "paperless": rng.random(n) < 0.6,
        }
    )


def test_numeric_edges_are_rounded_deciles_and_shares_match(frame: pd.DataFrame) -> None:
    profile = build_profile(frame, model="churn", version="1")
    ramp = profile.feature("ramp")
    assert isinstance(ramp, NumericProfile)
    # 1..100 repeated: deciles 10.9, 20.8, ... (range 99: rounded to 0.01)
    assert ramp.edges == (10.9, 20.8, 30.7, 40.6, 50.5, 60.4, 70.3, 80.2, 90.1)
    assert ramp.shares == pytest.approx([0.1] * 10, abs=1e-12)
    assert ramp.bins == tuple(str(i) for i in range(10))
    assert (ramp.min, ramp.max, ramp.count, ramp.missing_rate) == (1.0, 100.0, 2000, 0.0)
    assert ramp.mean == pytest.approx(50.5)
    assert ramp.std == pytest.approx(np.std(frame["ramp"]))  # population, as PromQL computes

    charges = profile.feature("charges")
    assert isinstance(charges, NumericProfile)
    values = frame["charges"].to_numpy()
    expected = np.round(np.quantile(values, np.arange(1, 10) / 10), 1)  # range ~100: 0.1 steps
    assert charges.edges == tuple(expected)
    assert list(charges.shares) == pytest.approx(reference_shares(values, charges.edges))
    assert math.fsum(charges.shares) == pytest.approx(1.0)


def test_duplicate_edges_are_removed_and_missing_values_counted() -> None:
    values = [0.0] * 60 + [1.0, 2.0, 3.0, 4.0, 5.0] * 6 + [np.nan] * 5 + [np.inf] * 3 + [None] * 2
    frame = pd.DataFrame({"x": pd.array(values, dtype="Float64")})
    profile = build_profile(frame, model="m", version="1")
    x = profile.feature("x")
    assert isinstance(x, NumericProfile)
    finite = np.array([v for v in values if v is not None and np.isfinite(v)])
    assert len(x.edges) == len(set(x.edges)) < 9
    assert x.edges[0] == 0.0
    assert list(x.shares) == pytest.approx(reference_shares(finite, x.edges))
    assert x.count == 90
    assert x.missing_rate == pytest.approx(10 / 100)
    assert x.max == 5.0  # infinities are missing, not the maximum


def test_categorical_vocabulary_shares_and_bool(frame: pd.DataFrame) -> None:
    profile = build_profile(frame, model="m", version="1")
    contract = profile.feature("contract")
    assert isinstance(contract, CategoricalProfile)
    assert contract.categories == ("Month-to-month", "One year", "Two year")  # most frequent first
    counts = frame["contract"].value_counts(normalize=True)
    assert list(contract.shares[:-1]) == pytest.approx([counts[c] for c in contract.categories])
    assert contract.shares[-1] == 0.0
    assert contract.bins[-1] == UNSEEN
    paperless = profile.feature("paperless")
    assert isinstance(paperless, CategoricalProfile)
    assert set(paperless.categories) == {"True", "False"}


def test_rare_categories_fold_into_unseen() -> None:
    values = ["a"] * 500 + ["b"] * 300 + ["c"] * 150 + ["d"] * 49 + ["e"] + [None] * 10
    frame = pd.DataFrame({"cat": pd.Series(values, dtype="category")})
    capped = build_profile(frame, model="m", version="1", max_categories=2).feature("cat")
    assert isinstance(capped, CategoricalProfile)
    assert capped.categories == ("a", "b")
    assert capped.shares == pytest.approx((0.5, 0.3, 0.2))
    assert capped.folded == 3
    assert capped.missing_rate == pytest.approx(10 / 1010)
    rare = build_profile(frame, model="m", version="1", min_category_share=0.01).feature("cat")
    assert isinstance(rare, CategoricalProfile)
    assert rare.categories == ("a", "b", "c", "d")
    assert rare.shares[-1] == pytest.approx(0.001)


def test_scores_classes_and_accuracy(frame: pd.DataFrame) -> None:
    rng = np.random.default_rng(1)
    proba = rng.random(len(frame))
    profile = build_profile(
        frame,
        model="m",
        version="2",
        scores=np.column_stack([1 - proba, proba]),  # predict_proba: column 1 is used
        classes=[0, 1],
        accuracy=0.8,
    )
    assert profile.score is not None
    deciles = np.quantile(proba, np.arange(1, 10) / 10)
    assert profile.score.edges == tuple(np.round(deciles, 4))  # range just under 1: 1e-4 steps
    assert profile.score.count == len(frame)
    assert profile.classes == ("0", "1")
    assert profile.rows == len(frame)
    assert profile.accuracy == 0.8


@pytest.mark.parametrize(
    ("quantiles", "low", "high", "expected"),
    [
        pytest.param([0.12345, 0.5], 0.0, 1.0, [0.123, 0.5], id="probabilities"),
        pytest.param([20.05, 70.349], 18.25, 118.75, [20.0, 70.3], id="charges"),
        pytest.param([1234.5, 5678.9], 0.0, 9000.0, [1234.0, 5679.0], id="thousands"),
        pytest.param([7.0, 7.0], 7.0, 7.0, [7.0], id="constant"),
    ],
)
def test_round_edges(
    quantiles: list[float], low: float, high: float, expected: list[float]
) -> None:
    assert round_edges(np.array(quantiles), low, high).tolist() == expected


def test_save_load_round_trip(tmp_path: Path, frame: pd.DataFrame) -> None:
    profile = build_profile(frame, model="churn", version="7", scores=np.linspace(0, 1, len(frame)))
    path = tmp_path / "profile.json"
    profile.save(path)
    data = json.loads(path.read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert [f["kind"] for f in data["features"]] == [
        "numeric",
        "numeric",
        "categorical",
        "categorical",
    ]
    assert ReferenceProfile.load(path) == profile
    assert path.stat().st_size < 10_000
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_several_models_and_versions(tmp_path: Path, frame: pd.DataFrame) -> None:
    paths = []
    for model, version in [("churn", "1"), ("churn", "2"), ("upsell", "1")]:
        path = tmp_path / f"{model}-{version}.json"
        build_profile(frame, model=model, version=version).save(path)
        paths.append(path)
    keys = [ReferenceProfile.load(p).key for p in paths]
    assert keys == [("churn", "1"), ("churn", "2"), ("upsell", "1")]


def valid_dict() -> dict[str, Any]:
    frame = pd.DataFrame({"x": np.arange(100.0), "c": ["a", "b"] * 50})
    return build_profile(frame, model="m", version="1", scores=np.linspace(0, 1, 100)).to_dict()


def _set(path: str, value: Any) -> Any:
    def mutate(data: dict[str, Any]) -> None:
        target: Any = data
        *parents, last = path.split(".")
        for part in parents:
            target = target[int(part)] if part.isdigit() else target[part]
        if value is KeyError:
            del target[int(last) if last.isdigit() else last]
        elif isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value

    return mutate


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(_set("format", "other"), "not a profile", id="format"),
        pytest.param(_set("format_version", 99), "format_version", id="version"),
        pytest.param(_set("model", ""), "model", id="empty-model"),
        pytest.param(_set("rows", 0), "rows", id="rows"),
        pytest.param(_set("features.0.edges", [3.0, 2.0, 5.0]), "increasing", id="unsorted"),
        pytest.param(_set("features.0.edges", []), "edges", id="no-edges"),
        pytest.param(_set("features.0.shares.0", 0.5), "sum to 1", id="share-sum"),
        pytest.param(_set("features.0.shares", [1.0]), "shares", id="share-count"),
        pytest.param(_set("features.0.count", -1), "count", id="count"),
        pytest.param(_set("features.0.count", 10_000), "exceeds", id="count-rows"),
        pytest.param(_set("features.0.missing_rate", 2), "missing_rate", id="missing"),
        pytest.param(_set("features.0.min", 1e9), "min <= max", id="min-max"),
        pytest.param(_set("features.0.kind", "text"), "unknown feature kind", id="kind"),
        pytest.param(_set("features.1.name", "x"), "unique", id="duplicate-name"),
        pytest.param(_set("features.1.categories.0", UNSEEN), "not '__unseen__'", id="reserved"),
        pytest.param(_set("features.0.edges", ["1", "2"]), "number", id="string-edges"),
        pytest.param(_set("features.0.std", KeyError), "missing key", id="missing-key"),
        pytest.param(_set("score", {"kind": "categorical"}), "score", id="score-kind"),
        pytest.param(_set("classes", ["a", "a"]), "classes", id="classes"),
        pytest.param(_set("accuracy", 1.5), "accuracy", id="accuracy"),
    ],
)
def test_invalid_profiles_raise_value_error(mutate: Any, message: str, tmp_path: Path) -> None:
    data = valid_dict()
    mutate(data)
    with pytest.raises(ValueError, match=message):
        ReferenceProfile.from_dict(data)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"bad\.json"):
        ReferenceProfile.load(path)


def test_load_rejects_non_json(tmp_path: Path) -> None:
    path = tmp_path / "profile.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        ReferenceProfile.load(path)


@pytest.mark.parametrize(
    ("features", "kwargs", "message"),
    [
        pytest.param([[1, 2]], {}, "DataFrame", id="not-frame"),
        pytest.param(pd.DataFrame({"x": []}), {}, "no rows", id="empty"),
        pytest.param(pd.DataFrame({"x": [1.0, 2.0]}), {"bins": 1}, "bins", id="bins"),
        pytest.param(pd.DataFrame({"x": [np.nan, np.inf]}), {}, "no finite", id="all-missing"),
        pytest.param(pd.DataFrame({"c": [None, None]}, dtype=object), {}, "no non-missing", id="c"),
        pytest.param(
            pd.DataFrame({"t": pd.to_datetime(["2024-01-01"])}), {}, "convert", id="datetime"
        ),
        pytest.param(pd.DataFrame({"x": [1.0, 2.0]}), {"scores": [0.5]}, "scores", id="scores"),
        pytest.param(pd.DataFrame({"c": [UNSEEN, "a"]}), {}, "reserved", id="reserved"),
    ],
)
def test_build_profile_rejects_bad_input(
    features: Any, kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        build_profile(features, model="m", version="1", **kwargs)
