"""Vectorised recording: exact counts against a numpy computation for every input form,
every series at zero after register, bad inputs refused before anything counts, threads and
multiprocess storage."""

from __future__ import annotations

import itertools
import math
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from signals_support import CLASSES, MODEL, merged, rejected, value
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import signals_registry as signals_registry  # fixture "registry"

from ml_wsgi_metrics import signals
from ml_wsgi_metrics._recorders import record_batch
from ml_wsgi_metrics.profile import (
    UNSEEN,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    build_profile,
)
from ml_wsgi_metrics.signals import NO_CLASS, REJECT_REASONS
from ml_wsgi_metrics.testing import isolated_signals


def live_columns(rows: int = 500, seed: int = 5) -> dict[str, list[Any]]:
    """Live inputs with every case: missing, infinities, out of range, unseen, ignored."""
    rng = np.random.default_rng(seed)
    charges: list[Any] = np.round(rng.uniform(0, 150, rows), 2).tolist()
    delta: list[Any] = rng.normal(0.0, 8.0, rows).tolist()
    contract: list[Any] = rng.choice(
        ["Month-to-month", "One year", "Two year", "Three year"], rows
    ).tolist()
    for i in range(0, rows, 17):
        charges[i] = [None, math.nan, math.inf, -math.inf][i % 4]
    for i in range(3, rows, 23):
        delta[i] = math.nan
        contract[i] = None
    return {
        "MonthlyCharges": charges,
        "delta": delta,
        "Contract": contract,
        "ignored": ["x"] * rows,  # not in the profile
    }


def live_outputs(rows: int = 500, seed: int = 6) -> tuple[list[float], list[str]]:
    rng = np.random.default_rng(seed)
    scores = rng.random(rows).tolist()
    scores[7] = math.nan
    classes = ["Yes" if s > 0.5 else "No" for s in scores]
    classes[9] = "Maybe"  # not a class of the profile
    return scores, classes


def interval_counts(x: np.ndarray, edges: tuple[float, ...]) -> list[int]:
    """Counts per bin (edges[i-1], edges[i]] by comparisons (independent of searchsorted)."""
    bounds = [-math.inf, *edges, math.inf]
    return [int(np.sum((x > lo) & (x <= hi))) for lo, hi in itertools.pairwise(bounds)]


def expected_numeric(values: list[Any], edges: tuple[float, ...], low: float, high: float):
    x = np.array([np.nan if v is None else v for v in values], dtype=float)
    finite = x[np.isfinite(x)]
    return {
        "bins": interval_counts(finite, edges),
        "missing": len(x) - len(finite),
        "out_of_range": int(np.sum((finite < low) | (finite > high))),
        "positive": float(finite[finite > 0].sum()),
        "negative": float(-finite[finite < 0].sum()),
        "squares": float((finite**2).sum()),
    }


def check_recorded(
    registry: CollectorRegistry, profile: ReferenceProfile, columns, scores, classes
):
    """Every series equals the independent computation (counts exactly, sums to 1e-12)."""
    for feature in profile.features:
        key = {"feature": feature.name}
        bins = [value(registry, "model_feature_bin_total", **key, bin=b) for b in feature.bins]
        missing = value(registry, "model_feature_missing_total", **key)
        if isinstance(feature, NumericProfile):
            want = expected_numeric(columns[feature.name], feature.edges, feature.min, feature.max)
            assert bins == want["bins"]
            assert missing == want["missing"]
            oor = value(registry, "model_feature_out_of_range_total", **key)
            assert oor == want["out_of_range"]
            for sign in ("positive", "negative"):
                got = value(registry, "model_feature_sum_total", **key, sign=sign)
                assert got == pytest.approx(want[sign], rel=1e-12)
            squares = value(registry, "model_feature_sum_squares_total", **key)
            assert squares == pytest.approx(want["squares"], rel=1e-12)
        else:
            assert isinstance(feature, CategoricalProfile)
            raw = columns[feature.name]
            counts = Counter(v if v in feature.categories else UNSEEN for v in raw if v is not None)
            assert bins == [counts[b] for b in feature.bins]
            assert missing == sum(v is None for v in raw)
            assert value(registry, "model_feature_unseen_total", **key) == counts[UNSEEN]
        assert sum(bins) + missing == len(columns[feature.name])  # count = sum of bins
    assert profile.score is not None
    want = expected_numeric(scores, profile.score.edges, -math.inf, math.inf)
    assert [value(registry, "model_score_bin_total", bin=b) for b in profile.score.bins] == want[
        "bins"
    ]
    assert value(registry, "model_score_missing_total") == want["missing"]
    assert value(registry, "model_score_sum_total", sign="positive") == pytest.approx(
        want["positive"], rel=1e-12
    )
    assert value(registry, "model_score_sum_squares_total") == pytest.approx(
        want["squares"], rel=1e-12
    )
    predicted = Counter(c if c in CLASSES else UNSEEN for c in classes)
    for label in [*CLASSES, UNSEEN, NO_CLASS]:
        assert value(registry, "model_predictions_total", **{"class": label}) == predicted[label]


def rows_of(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    names = list(columns)
    return [dict(zip(names, row, strict=True)) for row in zip(*columns.values(), strict=True)]


@pytest.mark.parametrize("form", ["frame", "columns", "arrays", "rows", "single rows"])
def test_counts_match_a_numpy_computation(
    registry: CollectorRegistry, profile: ReferenceProfile, form: str
) -> None:
    columns = live_columns()
    scores, classes = live_outputs()
    if form == "single rows":  # the plain-Python fast path, one call per row
        for row, score, predicted in zip(rows_of(columns), scores, classes, strict=True):
            signals.record_prediction(row, scores=score, classes=predicted)
    else:
        inputs: Any = {
            "frame": lambda: pd.DataFrame(columns),
            "columns": lambda: columns,
            "arrays": lambda: {k: np.asarray(v, dtype=object) for k, v in columns.items()},
            "rows": lambda: rows_of(columns),
        }[form]()
        prediction = signals.record_prediction(
            inputs, scores=np.asarray(scores), classes=np.asarray(classes)
        )
        assert prediction.rows == len(prediction) == 500
    check_recorded(registry, profile, columns, scores, classes)


def test_nan_and_infinities_never_poison_a_sum(registry: CollectorRegistry) -> None:
    signals.record_prediction(
        {"MonthlyCharges": [math.nan, math.inf, -math.inf, None, 50.0], "delta": [math.inf] * 5},
        scores=[math.nan, math.inf, 0.5, None, -math.inf],
    )
    assert value(registry, "model_feature_missing_total", feature="MonthlyCharges") == 4
    assert (
        value(registry, "model_feature_sum_total", feature="MonthlyCharges", sign="positive") == 50
    )
    assert value(registry, "model_feature_sum_squares_total", feature="MonthlyCharges") == 2500
    assert value(registry, "model_feature_missing_total", feature="delta") == 5
    assert value(registry, "model_score_missing_total") == 4
    assert value(registry, "model_score_sum_total", sign="positive") == 0.5
    assert value(registry, "model_predictions_total", **{"class": NO_CLASS}) == 5


def test_profile_features_absent_from_inputs_count_as_missing(registry: CollectorRegistry) -> None:
    signals.record_prediction({"delta": [1.0, 2.0], "unknown": [1, 2]})
    assert value(registry, "model_feature_missing_total", feature="MonthlyCharges") == 2
    assert value(registry, "model_feature_missing_total", feature="Contract") == 2
    assert value(registry, "model_feature_missing_total", feature="delta") == 0
    signals.record_prediction(scores=0.2)  # no inputs: no feature is touched
    assert value(registry, "model_feature_missing_total", feature="MonthlyCharges") == 2


def test_every_label_set_exists_at_zero_after_register(
    registry: CollectorRegistry, profile: ReferenceProfile
) -> None:
    expected: list[tuple[str, dict[str, str]]] = []
    for feature in profile.features:
        key = {"feature": feature.name}
        expected += [("model_feature_bin_total", {**key, "bin": b}) for b in feature.bins]
        expected.append(("model_feature_missing_total", key))
        if isinstance(feature, NumericProfile):
            expected.append(("model_feature_out_of_range_total", key))
            expected += [
                ("model_feature_sum_total", {**key, "sign": s}) for s in ("positive", "negative")
            ]
            expected.append(("model_feature_sum_squares_total", key))
        else:
            expected.append(("model_feature_unseen_total", key))
        for b, share in zip(feature.bins, feature.shares, strict=True):
            assert value(registry, "model_feature_reference_share", **key, bin=b) == share
    assert profile.score is not None
    expected += [("model_score_bin_total", {"bin": b}) for b in profile.score.bins]
    expected += [("model_score_sum_total", {"sign": s}) for s in ("positive", "negative")]
    expected += [("model_score_missing_total", {}), ("model_score_sum_squares_total", {})]
    expected += [("model_predictions_total", {"class": c}) for c in [*CLASSES, NO_CLASS, UNSEEN]]
    expected += [
        ("model_confusion_total", {"predicted": p, "actual": a})
        for p, a in itertools.product(CLASSES, CLASSES)
    ]
    expected += [
        ("model_prediction_latency_seconds_count", {}),
        ("model_label_delay_seconds_count", {}),
    ]
    for name, labels in expected:
        assert value(registry, name, **labels) == 0, (name, labels)
    for reason in REJECT_REASONS:
        assert rejected(registry, reason) == 0
    for b, share in zip(profile.score.bins, profile.score.shares, strict=True):
        assert value(registry, "model_score_reference_share", bin=b) == share


def test_bad_inputs_raise_before_anything_is_recorded(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match="scores: 3 values for 2 rows"):
        signals.record_prediction({"delta": [1.0, 2.0]}, scores=[0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="different lengths"):
        signals.record_prediction({"delta": [1.0, 2.0], "MonthlyCharges": [1.0]})
    with pytest.raises(ValueError, match="inputs"):
        signals.record_prediction("not inputs")
    with pytest.raises(ValueError, match="one score per row"):
        signals.record_prediction({"delta": [1.0]}, scores=np.ones((1, 3)))
    assert value(registry, "model_feature_bin_total", feature="delta", bin="5") == 0
    assert value(registry, "model_predictions_total", **{"class": NO_CLASS}) == 0


@pytest.mark.parametrize(
    ("scores", "classes"),
    [
        pytest.param(np.array([0.7]), np.array(["Yes"]), id="length-1 arrays"),
        pytest.param(np.array([[0.3, 0.7]]), ["Yes"], id="predict_proba row"),
        pytest.param([0.7], "Yes", id="list and scalar"),
    ],
)
def test_a_one_row_dict_takes_arrays_of_one(
    profile: ReferenceProfile, scores: Any, classes: Any
) -> None:
    """A single-row endpoint's natural call records exactly what the all-scalar call does."""
    row = {"MonthlyCharges": 70.0, "delta": -2.5, "Contract": "One year"}
    recorded = []
    for score, predicted in ((0.7, "Yes"), (scores, classes)):
        with isolated_signals() as registry:
            signals.register_model(profile)
            prediction = signals.record_prediction(row, scores=score, classes=predicted)
            assert prediction.rows == 1 and len(prediction.ids) == 1
            recorded.append(
                {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for m in registry.collect()
                    for s in m.samples
                    if not s.name.endswith("_created")  # when, not what
                }
            )
    assert recorded[0] == recorded[1]
    assert (
        recorded[1][("model_predictions_total", tuple(sorted({**MODEL, "class": "Yes"}.items())))]
        == 1
    )


def test_a_dict_mixing_one_row_and_columns_is_refused(registry: CollectorRegistry) -> None:
    with pytest.raises(ValueError, match=r"one row \(.*\) or columns"):
        signals.record_prediction({"delta": 1.0, "MonthlyCharges": [1.0, 2.0]}, scores=[0.5])
    assert value(registry, "model_predictions_total", **{"class": NO_CLASS}) == 0


def test_predict_proba_output_uses_the_positive_column(registry: CollectorRegistry) -> None:
    signals.record_prediction(scores=np.array([[0.9, 0.1], [0.3, 0.7]]), classes=["No", "Yes"])
    assert value(registry, "model_score_sum_total", sign="positive") == pytest.approx(0.8)


def test_threads_count_exactly(registry: CollectorRegistry) -> None:
    threads, calls = 8, 100
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        try:
            assert signals.current_model() is None  # a new thread starts unbound
            for i in range(calls):
                signals.record_prediction({"delta": [float(seed), -1.0]}, classes=["Yes", "No"])
                signals.record_prediction({"delta": float(i)}, scores=0.5, classes="Yes")
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    signals.bind_model("churn", "3")  # the main thread's binding is not inherited
    workers = [threading.Thread(target=work, args=(s,)) for s in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    signals.unbind_model()
    assert not errors
    assert value(registry, "model_predictions_total", **{"class": "Yes"}) == 2 * threads * calls
    assert value(registry, "model_predictions_total", **{"class": "No"}) == threads * calls
    assert value(registry, "model_feature_sum_total", feature="delta", sign="negative") == (
        threads * calls
    )
    positive = calls * sum(range(threads)) + threads * sum(range(calls))
    assert value(registry, "model_feature_sum_total", feature="delta", sign="positive") == positive


def test_multiprocess_mode_merges_exactly(
    multiprocess_dir: Path, profile: ReferenceProfile
) -> None:
    columns = live_columns(300)
    scores, classes = live_outputs(300)
    with isolated_signals():
        signals.register_model(profile)
        before = merged(multiprocess_dir)
        assert value(before, "model_feature_bin_total", feature="delta", bin="0") == 0
        assert value(before, "model_confusion_total", predicted="No", actual="Yes") == 0
        share = value(before, "model_feature_reference_share", feature="delta", bin="0")
        assert share == profile.feature("delta").shares[0]
        signals.record_prediction(pd.DataFrame(columns), scores=scores, classes=classes)
        check_recorded(merged(multiprocess_dir), profile, columns, scores, classes)


def test_text_in_a_numeric_feature_is_parsed_or_missing(registry: CollectorRegistry) -> None:
    frame = pd.DataFrame({"delta": pd.Series(["12.5", " ", "abc", None], dtype="str")})
    signals.record_prediction(frame)
    assert value(registry, "model_feature_missing_total", feature="delta") == 3
    assert value(registry, "model_feature_sum_total", feature="delta", sign="positive") == 12.5


@pytest.mark.parametrize("bins", [10, 30], ids=["edges-compared", "edges-searched"])
def test_a_batch_records_what_its_rows_record(bins: int) -> None:
    """Both binnings of a batch (edge by edge up to 16 edges, searchsorted beyond) and the
    classes given as an array of strings count exactly what one call per row counts."""
    rng = np.random.default_rng(5)
    reference = pd.DataFrame({"x": rng.normal(0, 3, 2000), "y": rng.uniform(-1, 9, 2000)})
    profile = build_profile(
        reference, model="churn", version="3", scores=rng.random(2000), classes=CLASSES, bins=bins
    )
    x = [*rng.normal(0, 4, 300), math.nan, math.inf, -math.inf, 0.0, *profile.features[0].edges]
    columns = {"x": x, "y": list(rng.uniform(-2, 10, len(x)))}
    scores = list(rng.random(len(x)))
    classes = np.asarray(rng.choice(["Yes", "No", "Maybe", NO_CLASS], len(x)))
    recorded = []
    for batch in (True, False):
        with isolated_signals() as registry:
            signals.register_model(profile)
            if batch:
                signals.record_prediction(columns, scores=np.asarray(scores), classes=classes)
            else:
                for row, score, label in zip(rows_of(columns), scores, classes, strict=True):
                    signals.record_prediction(row, scores=score, classes=str(label))
            recorded.append(
                {
                    (s.name, tuple(sorted(s.labels.items()))): s.value
                    for m in registry.collect()
                    for s in m.samples
                    if not s.name.endswith("_created")
                }
            )
    batch_samples, row_samples = recorded
    sums = ("_sum", "model_expected_correct_total")  # sums of floats: added in another order

    def counted(samples: dict[Any, float]) -> dict[Any, float]:
        return {k: v for k, v in samples.items() if not any(n in k[0] for n in sums)}

    counts = counted(batch_samples)
    assert counts == counted(row_samples)
    assert batch_samples == pytest.approx(row_samples, rel=1e-12)
    predicted = [v for k, v in counts.items() if k[0] == "model_predictions_total"]
    assert sum(predicted) == len(x)


@pytest.mark.parametrize(
    ("given", "kept"),
    [
        pytest.param(lambda: np.array(["No", "Yes"]), np.ndarray, id="str-array"),
        pytest.param(lambda: np.array(["No", "Yes"]).astype(">U3"), np.ndarray, id="swapped"),
        pytest.param(lambda: np.array(["No", "Yes"], dtype=object), list, id="object-array"),
        pytest.param(lambda: ["No", "Yes"], list, id="list"),
        pytest.param(lambda: ("No", "Yes"), list, id="tuple"),
        pytest.param(lambda: pd.Series(["No", "Yes"]), list, id="series"),
    ],
)
def test_a_batch_keeps_a_copy_of_its_classes_for_the_ids(
    registry: CollectorRegistry, given: Any, kept: type
) -> None:
    """What the ids read later (``Batch.classes``): an array of strings stays one (in native
    byte order, as the C pass reads it), anything else a list; a copy either way."""
    classes = given()
    batch = record_batch(signals.resolve(None, None)[1], None, [0.25, 0.75], classes)
    assert type(batch.classes) is kept and batch.classes is not classes
    if isinstance(classes, np.ndarray | list | pd.Series):
        classes[0] = "Yes"  # the caller's classes change after the call
    assert list(batch.classes) == ["No", "Yes"]
    assert not isinstance(batch.classes, np.ndarray) or batch.classes.dtype.isnative
