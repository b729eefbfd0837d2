"""The context API: exact counts against a numpy computation, zero series, threads,
multiprocess storage, signed prediction ids and feedback from another process."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import itsdangerous
import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import MultiProcessCollector

from ml_wsgi_metrics import MetricsMiddleware, _config, _context, _retired, multiprocess, signals
from ml_wsgi_metrics._retired import version_key
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.profile import (
    UNSEEN,
    CategoricalProfile,
    NumericProfile,
    ReferenceProfile,
    build_profile,
)
from ml_wsgi_metrics.signals import NO_CLASS, REJECT_REASONS, InvalidPredictionId
from ml_wsgi_metrics.testing import TEST_SECRET_KEY, isolated_signals

MODEL = {"model": "churn", "version": "3"}
CLASSES = ["No", "Yes"]


@pytest.fixture(scope="module")
def profile() -> ReferenceProfile:
    rng = np.random.default_rng(11)
    n = 3000
    frame = pd.DataFrame(
        {
            "MonthlyCharges": np.round(rng.uniform(18.25, 118.75, n), 2),
            "delta": rng.normal(0.0, 5.0, n),  # negative and positive values
            "Contract": rng.choice(["Month-to-month", "One year", "Two year"], n),
        }
    )
    return build_profile(
        frame, model="churn", version="3", scores=rng.random(n), classes=CLASSES, accuracy=0.8
    )


@pytest.fixture
def registry(profile: ReferenceProfile) -> Iterator[CollectorRegistry]:
    with isolated_signals() as registry:
        signals.register_model(profile)
        yield registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """A sample of the test model (``None`` when absent)."""
    return registry.get_sample_value(name, {**MODEL, **labels})


def rejected(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("model_feedback_rejected_total", {"reason": reason})


def merged(directory: Path) -> CollectorRegistry:
    """All processes' files read back through prometheus_client's own collector."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


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


def test_unknown_model_and_binding(registry: CollectorRegistry, profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="not registered"):
        signals.record_prediction({"delta": 1.0}, model="nope", version="1")
    other = ReferenceProfile.from_dict({**profile.to_dict(), "version": "4"})
    signals.register_model(other)
    with pytest.raises(ValueError, match="bind_model"):
        signals.record_prediction({"delta": 1.0})  # two models, none bound
    with signals.model_context("churn", "4"):
        with signals.model_context("churn", "3"):
            signals.record_prediction({"delta": 1.0})
        assert signals.current_model() == ("churn", "4")
        signals.record_prediction({"delta": 1.0})
    assert signals.current_model() is None
    signals.bind_model("churn", "4")
    signals.record_prediction({"delta": 1.0})
    signals.unbind_model()
    for version, count in (("3", 1), ("4", 2)):
        labels = {"model": "churn", "version": version, "class": NO_CLASS}
        assert registry.get_sample_value("model_predictions_total", labels) == count
    with pytest.raises(ValueError, match="give the version"):
        signals.record_prediction(model="churn")


def test_register_model_from_path_idempotent_and_versioned(
    tmp_path: Path, profile: ReferenceProfile
) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    with isolated_signals():
        assert signals.register_model(path) == profile
        assert signals.register_model(profile) == profile
        assert signals.registered_models() == [("churn", "3")]
        changed = ReferenceProfile.from_dict({**profile.to_dict(), "rows": profile.rows + 1})
        with pytest.raises(ValueError, match="new version"):
            signals.register_model(changed)


def test_configure_validates(profile: ReferenceProfile) -> None:
    with pytest.raises(ValueError, match="max_feedback_age"):
        signals.configure(max_feedback_age=0)
    with pytest.raises(ValueError, match="unknown setting"):
        signals.configure(buckets=[1])
    with pytest.raises(ValueError, match="const_labels"):
        signals.configure(registry=CollectorRegistry(), const_labels={"model": "x"})
    with isolated_signals(namespace="svc", const_labels={"service": "churn"}) as registry:
        signals.register_model(profile)
        signals.record_prediction({"delta": 1.0})
        labels = {"service": "churn", **MODEL, "class": NO_CLASS}
        assert registry.get_sample_value("svc_model_predictions_total", labels) == 1


def test_latency_and_time_prediction(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    signals.record_prediction({"delta": 1.0}, latency=0.02)
    clock = [1000.0]  # perf_counter, moved by hand: the model "takes" exactly 0.25 s
    monkeypatch.setattr(time, "perf_counter", lambda: clock[0])
    with signals.time_prediction() as timer:
        clock[0] += 0.25
        prediction = timer.record({"delta": 2.0}, scores=0.4, classes="Yes")
    assert timer.elapsed == 0.25
    assert timer.prediction is prediction
    with pytest.raises(RuntimeError), signals.time_prediction():
        clock[0] += 1.0
        raise RuntimeError("the model failed: not a prediction")
    monkeypatch.undo()
    assert value(registry, "model_prediction_latency_seconds_count") == 2
    assert value(registry, "model_prediction_latency_seconds_sum") == 0.02 + 0.25
    assert value(registry, "model_prediction_latency_seconds_bucket", le="0.25") == 2
    assert value(registry, "model_predictions_total", **{"class": "Yes"}) == 1


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


def test_prediction_ids_are_lazy_and_need_a_secret_key(
    monkeypatch: pytest.MonkeyPatch, profile: ReferenceProfile
) -> None:
    monkeypatch.delenv(signals.SECRET_KEY_ENV, raising=False)
    with isolated_signals(secret_key=None):
        signals.register_model(profile)
        prediction = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"])
        assert prediction._ids is None  # nothing signed until read
        with pytest.raises(ValueError, match=signals.SECRET_KEY_ENV):
            _ = prediction.ids
    monkeypatch.setenv(signals.SECRET_KEY_ENV, "from-the-environment")
    with isolated_signals(secret_key=None):
        signals.register_model(profile)
        prediction = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"])
        assert len(set(prediction.ids)) == 2  # unique per row
        with pytest.raises(ValueError, match="2 rows"):
            _ = prediction.id
        assert signals.record_feedback(prediction.ids[0], "Yes").correct is True


def test_feedback_counts_confusion_and_label_delay(registry: CollectorRegistry) -> None:
    prediction = signals.record_prediction(
        {"delta": [1.0, 2.0, 3.0, 4.0]},
        scores=[0.9, 0.2, 0.7, math.nan],
        classes=["Yes", "No", "Yes", None],
    )
    ids = prediction.ids
    results = [
        signals.record_feedback(ids[0], "Yes"),
        signals.record_feedback(ids[1], "Yes"),
        signals.record_feedback(ids[2], "Perhaps"),  # not a class: counted as unseen
        signals.record_feedback(ids[3], "No"),  # no predicted class: delay only
    ]
    assert [r.correct for r in results] == [True, False, False, None]
    assert [r.predicted for r in results] == ["Yes", "No", "Yes", None]
    assert results[2].actual == UNSEEN
    assert all(0 <= r.delay < 60 for r in results)
    cells = {("Yes", "Yes"): 1, ("No", "Yes"): 1, ("Yes", UNSEEN): 1, ("No", "No"): 0}
    for (predicted, actual), count in cells.items():
        got = value(registry, "model_confusion_total", predicted=predicted, actual=actual)
        assert got == count
    assert value(registry, "model_label_delay_seconds_count") == 4
    with pytest.raises(ValueError, match="actual"):
        signals.record_feedback(ids[0], None)


def _tamper(token: str) -> str:
    payload, stamp, signature = token.split(".")
    data = json.loads(itsdangerous.encoding.base64_decode(payload))
    data[2] = "No" if data[2] == "Yes" else "Yes"  # flip the predicted class
    forged = itsdangerous.encoding.base64_encode(json.dumps(data, separators=(",", ":")))
    return ".".join([forged.decode(), stamp, signature])


def test_invalid_ids_are_rejected_and_counted(
    registry: CollectorRegistry, profile: ReferenceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = signals.record_prediction({"delta": 1.0}, classes="Yes").id
    foreign = itsdangerous.URLSafeTimedSerializer("another key", salt="ml_wsgi_metrics.prediction")
    cases = {
        "tampered": [_tamper(token), foreign.dumps(["churn", "3", "Yes", 1, time.time(), "x"])],
        "malformed": ["", "garbage", 42, None, "a.b.c", "x" * 5000, token + "é"],
        "unknown_model": [
            itsdangerous.URLSafeTimedSerializer(
                TEST_SECRET_KEY, salt="ml_wsgi_metrics.prediction"
            ).dumps(["other", "1", "Yes", 1, time.time(), "x"])
        ],
    }
    for reason, tokens in cases.items():
        for bad in tokens:
            with pytest.raises(InvalidPredictionId) as raised:
                signals.record_feedback(bad, "Yes")  # type: ignore[arg-type]
            assert raised.value.reason == reason, bad
            assert isinstance(raised.value, ValueError)
        count = rejected(registry, reason)
        assert count == len(tokens)
    # Expired: signed an hour ago, accepted for a minute.
    monkeypatch.setattr(
        itsdangerous.timed.TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 3600
    )
    old = signals.record_prediction({"delta": 1.0}, classes="Yes").id
    monkeypatch.undo()
    signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_feedback_age=60)
    with pytest.raises(InvalidPredictionId) as raised:
        signals.record_feedback(old, "Yes")
    assert raised.value.reason == "expired"
    assert rejected(registry, "expired") == 1
    assert value(registry, "model_confusion_total", predicted="Yes", actual="Yes") == 0


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


FEEDBACK_SCRIPT = """
import json, sys
from ml_wsgi_metrics import multiprocess
multiprocess.activate(sys.argv[1])
from prometheus_client import CollectorRegistry
from ml_wsgi_metrics import signals
signals.configure(registry=CollectorRegistry(), secret_key=sys.argv[2])
signals.register_model(sys.argv[3])
results = []
for token, actual in json.load(sys.stdin):
    try:
        results.append(signals.record_feedback(token, actual).correct)
    except signals.InvalidPredictionId as error:
        results.append(error.reason)
print(json.dumps(results))
"""


def feedback_in_another_process(
    multiprocess_dir: Path, profile_path: Path, feedback: list[list[str]]
) -> list[Any]:
    """``record_feedback`` for each ``[id, actual]`` in a fresh interpreter: ``correct`` or the
    rejection reason of each."""
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            FEEDBACK_SCRIPT,
            str(multiprocess_dir),
            TEST_SECRET_KEY,
            str(profile_path),
        ],
        input=json.dumps(feedback),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return json.loads(child.stdout)


def test_feedback_in_another_process_counts(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    with isolated_signals():
        signals.register_model(path)
        ids = signals.record_prediction(
            {"delta": [1.0, 2.0, 3.0]}, scores=[0.9, 0.1, 0.8], classes=["Yes", "No", "Yes"]
        ).ids
        feedback = [[ids[0], "Yes"], [ids[1], "Yes"], [ids[2], "Yes"], [_tamper(ids[0]), "No"]]
        assert feedback_in_another_process(multiprocess_dir, path, feedback) == [
            True,
            False,
            True,
            "tampered",
        ]
        scraped = merged(multiprocess_dir)
        assert value(scraped, "model_confusion_total", predicted="Yes", actual="Yes") == 2
        assert value(scraped, "model_confusion_total", predicted="No", actual="Yes") == 1
        assert value(scraped, "model_label_delay_seconds_count") == 3
        assert rejected(scraped, "tampered") == 1
        assert value(scraped, "model_predictions_total", **{"class": "Yes"}) == 2


def test_context_module_is_cheap() -> None:
    code = (
        "import sys, ml_wsgi_metrics._context as c; c.bind('m', '1'); c.reset(); "
        "assert c.current() is None; "
        "print(sorted({'numpy', 'pandas', 'itsdangerous'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    token = _context.bind("a", "1")
    _context.restore(token)
    assert _context.current() is None


def test_text_in_a_numeric_feature_is_parsed_or_missing(registry: CollectorRegistry) -> None:
    frame = pd.DataFrame({"delta": pd.Series(["12.5", " ", "abc", None], dtype="str")})
    signals.record_prediction(frame)
    assert value(registry, "model_feature_missing_total", feature="delta") == 3
    assert value(registry, "model_feature_sum_total", feature="delta", sign="positive") == 12.5


# -- retiring versions ----------------------------------------------------------------------


def versioned(profile: ReferenceProfile, version: str) -> ReferenceProfile:
    return dataclasses.replace(profile, version=version)


def scraped_by_version(registry: CollectorRegistry) -> Counter[str]:
    """How many series each version has in a scrape (merged files in multiprocess mode)."""
    return Counter(
        sample.labels["version"]
        for metric in scrape_registry(registry).collect()
        for sample in metric.samples
        if sample.labels.get("model") == "churn" and not sample.name.endswith("_created")
    )


def file_versions(directory: Path) -> Counter[str]:
    """How many keys of each version every slot file in ``directory`` holds."""
    found: Counter[str] = Counter()
    for path in directory.glob("*.db"):
        for key, _, _, _ in MmapedDict.read_all_values_from_file(str(path)):
            labels = json.loads(key)[2]
            if labels.get("model") == "churn":
                found[labels["version"]] += 1
    return found


def binding_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """Uses the model version named by the path (``/1``): a request the middleware counts
    under that version."""
    signals.bind_model("churn", environ["PATH_INFO"].strip("/"))
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]


def test_registering_beyond_live_versions_retires_the_oldest(
    mode: Path | None, profile: ReferenceProfile, call: Any
) -> None:
    """Every series of version 1 goes (model series, its held-out accuracy, its request series,
    and in multiprocess mode its keys in the files); its predictions and feedback are refused,
    the feedback counted under its own reason. Versions 2 and 3 are untouched."""
    with isolated_signals() as registry:
        app = MetricsMiddleware(binding_app, registry=registry, route_resolver=lambda e: "/m")
        signals.register_model(versioned(profile, "1"))
        ids = signals.record_prediction(
            {"delta": [1.0, 2.0]}, scores=[0.9, 0.2], classes=["Yes", "No"]
        ).ids
        assert call(app, "/1").code == 200
        per_version = scraped_by_version(registry)["1"]
        keys = file_versions(mode)["1"] if mode is not None else 0
        signals.register_model(versioned(profile, "2"))
        assert call(app, "/2").code == 200
        assert scraped_by_version(registry) == {"1": per_version, "2": per_version}

        signals.register_model(versioned(profile, "3"))  # live_versions=2: 1 retires
        assert signals.registered_models() == [("churn", "2"), ("churn", "3")]
        assert scraped_by_version(registry) == {"2": per_version, "3": per_version - 1}
        if mode is not None:  # gone from the files too, not only from the scrapes
            assert file_versions(mode) == {"2": keys, "3": keys - 1}
        with pytest.raises(ValueError, match="'1' is retired"):
            signals.record_prediction({"delta": 1.0}, model="churn", version="1")
        for prediction_id in ids:
            with pytest.raises(InvalidPredictionId) as raised:
                signals.record_feedback(prediction_id, "Yes")
            assert raised.value.reason == "retired"
        scraped = scrape_registry(registry)
        assert scraped.get_sample_value("model_feedback_rejected_total", {"reason": "retired"}) == 2
        for version in ("2", "3"):
            accuracy = {"model": "churn", "version": version}
            assert scraped.get_sample_value("model_reference_accuracy", accuracy) == 0.8
        signals.record_prediction({"delta": 1.0}, model="churn", version="2", classes="No")
        scraped = scrape_registry(registry)
        labels = {"model": "churn", "version": "2", "class": "No"}
        assert scraped.get_sample_value("model_predictions_total", labels) == 1


@pytest.mark.parametrize("setting", [0, -1, True, 1.5, "2"])
def test_live_versions_must_be_a_positive_integer(setting: Any) -> None:
    with pytest.raises(ValueError, match="live_versions"):
        signals.configure(registry=CollectorRegistry(), live_versions=setting)


def test_live_versions_from_the_environment(
    profile: ReferenceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(signals.LIVE_VERSIONS_ENV, "three")
    with pytest.raises(ValueError, match="live_versions"):
        signals.configure(registry=CollectorRegistry())
    monkeypatch.setenv(signals.LIVE_VERSIONS_ENV, "1")
    with isolated_signals():
        assert signals.live_versions() == 1
        signals.register_model(versioned(profile, "3"))
        signals.register_model(versioned(profile, "4"))
        assert signals.registered_models() == [("churn", "4")]
    with isolated_signals(live_versions=3):  # the keyword wins
        assert signals.live_versions() == 3


def test_versions_are_ordered_alike_in_every_process() -> None:
    versions = ["10", "9", "1.10", "1.9", "2024-12-01", "2024-05-01", "v2", "v10", "1.9.1"]
    assert sorted(versions, key=version_key) == [
        "1.9",
        "1.9.1",
        "1.10",
        "9",
        "10",
        "2024-05-01",
        "2024-12-01",
        "v2",
        "v10",
    ]


def test_newer_means_the_version_order_not_the_registration_order(
    profile: ReferenceProfile,
) -> None:
    with isolated_signals(live_versions=2):
        for version in ("10", "9"):
            signals.register_model(versioned(profile, version))
        signals.register_model(versioned(profile, "11"))  # retires 9, registered last
        assert signals.registered_models() == [("churn", "10"), ("churn", "11")]
        for older in ("9", "8"):  # 8 was never registered: older than the live ones all the same
            with pytest.raises(ValueError, match="is retired"):
                signals.register_model(versioned(profile, older))
        assert signals.registered_models() == [("churn", "10"), ("churn", "11")]


def test_retire_model_retires_one_version(mode: Path | None, profile: ReferenceProfile) -> None:
    with isolated_signals() as registry:
        signals.register_model(versioned(profile, "2"))
        signals.register_model(versioned(profile, "3"))
        token = signals.record_prediction({"delta": 1.0}, model="churn", version="3").id
        signals.retire_model("churn", "3")  # a bad release, withdrawn
        assert signals.registered_models() == [("churn", "2")]
        assert set(scraped_by_version(registry)) == {"2"}
        with pytest.raises(InvalidPredictionId, match="retired"):
            signals.record_feedback(token, "No")
        with pytest.raises(ValueError, match="retired"):
            signals.register_model(versioned(profile, "3"))
        signals.register_model(versioned(profile, "4"))
        assert signals.registered_models() == [("churn", "2"), ("churn", "4")]


RETIRING_SCRIPT = """
import sys
from ml_wsgi_metrics import multiprocess
multiprocess.activate(sys.argv[1])
multiprocess.use_identifier(sys.argv[2])
from prometheus_client import CollectorRegistry
from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import ReferenceProfile
signals.configure(registry=CollectorRegistry(), secret_key=sys.argv[3])
profile = ReferenceProfile.load(sys.argv[4])
for version in sys.argv[5:]:
    signals.register_model(ReferenceProfile.from_dict({**profile.to_dict(), "version": version}))
print(signals.registered_models())
"""


def run_worker(directory: Path, identifier: str, profile_file: Path, *versions: str) -> str:
    """Another process (worker ``identifier``) registers ``versions``; what it registered."""
    arguments = [str(directory), identifier, TEST_SECRET_KEY, str(profile_file), *versions]
    done = subprocess.run(
        [sys.executable, "-c", RETIRING_SCRIPT, *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def test_a_version_another_process_retires_leaves_every_scrape_and_this_process(
    multiprocess_dir: Path,
    profile: ReferenceProfile,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    with isolated_signals() as registry:
        signals.register_model(versioned(profile, "1"))
        signals.register_model(versioned(profile, "2"))
        token = signals.record_prediction({"delta": 1.0}, model="churn", version="1").id
        per_version = scraped_by_version(registry)["1"]
        # Another worker registers version 3: version 1 retires there, and in the record.
        assert run_worker(multiprocess_dir, "w1", profile_file, "2", "3") == (
            "[('churn', '2'), ('churn', '3')]"
        )
        # Every scrape drops it at once, this process's files still hold it...
        assert scraped_by_version(registry) == {"2": per_version, "3": per_version}
        assert (
            merged(multiprocess_dir).get_sample_value(
                "model_predictions_total", {**MODEL, "version": "1", "class": NO_CLASS}
            )
            == 1
        )
        # ...until this process next reads the record (at most a second later, when it uses
        # the verbs; at once here).
        monkeypatch.setattr(_config, "_SYNC_INTERVAL", 0.0)
        assert signals.registered_models() == [("churn", "2")]
        assert set(file_versions(multiprocess_dir)) == {"2", "3"}
        with pytest.raises(ValueError, match="retired"):
            signals.record_prediction({"delta": 1.0}, model="churn", version="1")
        with pytest.raises(InvalidPredictionId, match="retired"):
            signals.record_feedback(token, "No")


def test_a_successor_drops_retired_series_from_the_files_it_takes_over(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    with isolated_signals():
        multiprocess.use_identifier("w5")
        for version in ("1", "2"):
            signals.register_model(versioned(profile, version))
            signals.record_prediction({"delta": [1.0, 2.0]}, model="churn", version=version)
        multiprocess.use_identifier(None)  # the holder of slot w5 is gone
    _retired.update(str(multiprocess_dir), lambda record: record.retire_below("churn", "2"))
    assert file_versions(multiprocess_dir)["1"] > 0  # left in the dead holder's files
    run_worker(multiprocess_dir, "w5", profile_file, "2")  # its successor
    assert set(file_versions(multiprocess_dir)) == {"2"}
    predictions = {**MODEL, "version": "2", "class": NO_CLASS}
    assert merged(multiprocess_dir).get_sample_value("model_predictions_total", predictions) == 2


def test_the_record_is_private_and_never_read_through_a_link(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    directory = str(multiprocess_dir)
    record = multiprocess_dir / _retired.RECORD
    _retired.update(directory, lambda r: r.retire("churn", "1"))
    assert record.stat().st_mode & 0o777 == 0o600
    assert _retired.read(directory).is_retired("churn", "1")
    record.unlink()
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("{}")
    record.symlink_to(elsewhere)
    with pytest.raises(OSError):
        _retired.update(directory, lambda r: r.retire("churn", "1"))
    assert elsewhere.read_text() == "{}"
    record.unlink()
    os.mkfifo(record)
    with pytest.raises(OSError, match="not a regular file"):
        _retired.read(directory)  # refused at once, not a wait for a writer
    # The verbs fail open: the version retires in this process all the same, counted.
    errors = multiprocess.instrumentation_errors()
    with isolated_signals():
        signals.register_model(versioned(profile, "1"))
        signals.retire_model("churn", "1")
        assert signals.registered_models() == []
    assert multiprocess.instrumentation_errors() > errors


# -- feedback counted once, signed classes checked, clocks a few seconds apart ---------------


def _signed(offset: int, monkeypatch: pytest.MonkeyPatch, **inputs: Any) -> list[str]:
    """Ids of a prediction signed by a host whose clock is ``offset`` seconds ahead."""
    monkeypatch.setattr(
        itsdangerous.timed.TimestampSigner, "get_timestamp", lambda self: int(time.time()) + offset
    )
    try:
        return signals.record_prediction(**inputs).ids
    finally:
        monkeypatch.undo()


def _reencoded(token: str) -> str:
    """The same token with another last signature character that decodes to the same bytes
    (27 base64 characters carry 162 bits for a 160-bit signature)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet[alphabet.index(token[-1]) ^ 1]
    return token[:-1] + last


def test_the_replayed_reason_is_created_at_zero(registry: CollectorRegistry) -> None:
    assert "replayed" in REJECT_REASONS
    assert rejected(registry, "replayed") == 0


def test_an_id_counts_once(registry: CollectorRegistry) -> None:
    ids = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"]).ids
    assert signals.record_feedback(ids[0], "Yes").correct is True
    assert _reencoded(ids[0]) != ids[0]
    for replay in (ids[0], ids[0], _reencoded(ids[0])):
        with pytest.raises(InvalidPredictionId) as raised:
            signals.record_feedback(replay, "No")
        assert raised.value.reason == "replayed"
        assert "already counted" in str(raised.value)
    assert signals.record_feedback(ids[1], "No").correct is True
    assert rejected(registry, "replayed") == 3
    assert value(registry, "model_confusion_total", predicted="Yes", actual="Yes") == 1
    assert value(registry, "model_confusion_total", predicted="Yes", actual="No") == 0
    assert value(registry, "model_label_delay_seconds_count") == 2


def test_an_id_replayed_in_another_process_is_rejected(
    multiprocess_dir: Path, profile: ReferenceProfile, tmp_path: Path
) -> None:
    path = tmp_path / "profile.json"
    profile.save(path)
    with isolated_signals():
        signals.register_model(path)
        ids = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"]).ids
        signals.record_feedback(ids[0], "Yes")
        feedback = [[ids[0], "Yes"], [ids[1], "No"], [ids[1], "No"]]
        assert feedback_in_another_process(multiprocess_dir, path, feedback) == [
            "replayed",
            True,
            "replayed",
        ]
        scraped = merged(multiprocess_dir)
        assert rejected(scraped, "replayed") == 2
        assert value(scraped, "model_confusion_total", predicted="Yes", actual="Yes") == 1
        assert value(scraped, "model_confusion_total", predicted="No", actual="No") == 1
        store = multiprocess_dir / "feedback-ids.sqlite3"
        assert store.stat().st_mode & 0o777 == 0o600


def test_a_signed_class_that_is_not_the_models_is_rejected(registry: CollectorRegistry) -> None:
    """Even with the key, no token can create a series with a label value of its own."""
    signer = itsdangerous.URLSafeTimedSerializer(TEST_SECRET_KEY, salt="ml_wsgi_metrics.prediction")
    for i in range(3):
        token = signer.dumps(["churn", "3", f"attacker-{i}", 1, time.time(), f"{i:08x}"])
        with pytest.raises(InvalidPredictionId) as raised:
            signals.record_feedback(token, "Yes")
        assert raised.value.reason == "malformed"
        assert f"'attacker-{i}'" in str(raised.value)
    assert rejected(registry, "malformed") == 3
    values = {v for m in registry.collect() for s in m.samples for v in s.labels.values()}
    assert not {v for v in values if v.startswith("attacker")}
    # What a prediction's id can carry still counts: a class outside the profile, none.
    ids = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Maybe", None]).ids
    assert signals.record_feedback(ids[0], "Yes").predicted == UNSEEN
    assert signals.record_feedback(ids[1], "Yes").predicted is None


def test_feedback_allows_a_few_seconds_of_clock_skew(
    registry: CollectorRegistry, profile: ReferenceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The predicting host's clock is ahead: ids look signed in the future."""
    ahead = _signed(3, monkeypatch, inputs={"delta": [1.0, 2.0]}, classes=["Yes", "No"])
    assert signals.record_feedback(ahead[0], "Yes").correct is True
    far_ahead = _signed(30, monkeypatch, inputs={"delta": 1.0}, classes="Yes")
    with pytest.raises(InvalidPredictionId) as raised:
        signals.record_feedback(far_ahead[0], "Yes")
    assert raised.value.reason == "expired"
    assert "in the future" in str(raised.value) and "clock" in str(raised.value)
    signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_clock_skew=0)
    signals.register_model(profile)
    with pytest.raises(InvalidPredictionId) as raised:
        signals.record_feedback(ahead[1], "No")
    assert raised.value.reason == "expired"
    assert rejected(registry, "expired") == 2
    for bad in (-1, math.nan, "5"):
        with pytest.raises(ValueError, match="max_clock_skew"):
            signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_clock_skew=bad)


def test_replay_settings_are_checked(registry: CollectorRegistry, tmp_path: Path) -> None:
    for capacity in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="replay_capacity"):
            signals.configure(registry=registry, replay_capacity=capacity)
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(ValueError, match=r"replay_store: .* writable by other users"):
        signals.configure(registry=registry, replay_store=shared / "ids.sqlite3")
    signals.configure(registry=registry, replay_store=tmp_path / "ids.sqlite3")
    assert (tmp_path / "ids.sqlite3").stat().st_mode & 0o777 == 0o600


def test_feedback_counts_when_the_replay_store_cannot_be_used(
    profile: ReferenceProfile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fail open: a store that is not safe to use is logged and counted, feedback still
    counts (without the replay check)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(shared))
    with isolated_signals() as registry:
        signals.register_model(profile)
        [token] = signals.record_prediction({"delta": 1.0}, classes="Yes").ids
        errors = multiprocess.instrumentation_errors()
        assert signals.record_feedback(token, "Yes").correct is True
        assert signals.record_feedback(token, "Yes").correct is True
        assert multiprocess.instrumentation_errors() == errors + 2
        assert value(registry, "model_confusion_total", predicted="Yes", actual="Yes") == 2
        assert list(shared.iterdir()) == []


FALLBACK_SCRIPT = """
import sys
from prometheus_client import CollectorRegistry
from ml_wsgi_metrics import signals
from ml_wsgi_metrics.exposition import scrape_registry
from ml_wsgi_metrics.profile import ReferenceProfile
signals.configure(registry=CollectorRegistry(), secret_key="k")
profile = ReferenceProfile.load(sys.argv[1])
for version in ("1", "2", "3"):
    signals.register_model(ReferenceProfile.from_dict({**profile.to_dict(), "version": version}))
scraped = scrape_registry(CollectorRegistry())
print(sorted({s.labels["version"] for m in scraped.collect() for s in m.samples
              if s.labels.get("model") == "churn"}))
"""


def test_without_the_hooks_retired_versions_leave_the_scrapes_too(
    profile: ReferenceProfile, tmp_path: Path
) -> None:
    """prometheus_client's own files (``PROMETHEUS_MULTIPROC_DIR`` set, no hooks) keep every
    key for ever; the record in that directory hides the retired versions from the scrapes."""
    directory = tmp_path / "fallback"
    directory.mkdir(mode=0o700)
    profile_file = tmp_path / "profile.json"
    profile.save(profile_file)
    environment = {k: v for k, v in os.environ.items() if not k.startswith("ML_WSGI_METRICS_")}
    done = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(profile_file)],
        env={**environment, "PROMETHEUS_MULTIPROC_DIR": str(directory)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "['2', '3']"
    assert _retired.read(str(directory)).is_retired("churn", "1")
    assert file_versions(directory)["1"] > 0  # still in prometheus_client's file: hidden only
