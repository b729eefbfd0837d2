"""Expected correctness: the counter's exact sums on the single-row and batch paths, for every
form of predicted classes, across forked processes, and the profile's held-out estimate.

Scores are multiples of 1/1024, so every sum is exact whatever the order of the additions and
the counts compare with ``==``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from signals_support import MODEL, merged, value
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import signals_registry as signals_registry  # fixture "registry"
from storage_support import in_child

from ml_wsgi_metrics import multiprocess, signals
from ml_wsgi_metrics._expected import ExpectedCorrect, kinds
from ml_wsgi_metrics.profile import ReferenceProfile, build_profile, estimate_accuracy
from ml_wsgi_metrics.testing import isolated_signals

EXPECTED = "model_expected_correct_total"


def dyadic_scores(rows: int, seed: int) -> list[float]:
    """Scores k/1024 in [0, 1], with a NaN, both infinities and two out of [0, 1]."""
    scores = (np.random.default_rng(seed).integers(0, 1025, rows) / 1024).tolist()
    scores[3], scores[5], scores[8] = math.nan, math.inf, -math.inf
    scores[11], scores[13] = 1.5, -0.25
    return scores


def expected_by_hand(
    scores: Sequence[float], predicted: Sequence[Any] | None, classes: Sequence[str] | None
) -> float:
    """The definition, one row at a time: the predicted class's probability."""
    total = 0.0
    for i, score in enumerate(scores):
        if not math.isfinite(score):
            continue
        s = min(max(score, 0.0), 1.0)
        label = None if predicted is None or predicted[i] is None else str(predicted[i])
        scored = classes is not None and (len(classes) != 2 or label == classes[1])
        if scored:
            total += s
        elif classes is not None and label == classes[0]:
            total += 1 - s
        else:
            total += max(s, 1 - s)
    return total


def binary_classes(scores: Sequence[float]) -> list[Any]:
    """Thresholded at 0.3 (not 0.5: max(s, 1 - s) would be wrong), with an unknown class and a
    missing one."""
    predicted: list[Any] = ["Yes" if s > 0.3 else "No" for s in scores]
    predicted[1], predicted[2] = "Maybe", None
    return predicted


def profile_with(classes: list[str] | None, **fields: Any) -> ReferenceProfile:
    frame = pd.DataFrame({"x": np.arange(50.0)})
    scores = np.linspace(0, 1, 50)
    return build_profile(frame, model="m", version="1", scores=scores, classes=classes, **fields)


# -- the batch and single-row paths ----------------------------------------------------------


@pytest.mark.parametrize(
    "form",
    [
        pytest.param(lambda c: np.array(c, dtype=object), id="object-array"),
        pytest.param(lambda c: c, id="list"),
        pytest.param(lambda c: pd.Series(c, index=np.arange(len(c)) * 3), id="series"),
        pytest.param(lambda c: tuple(c), id="tuple"),
    ],
)
def test_a_batch_adds_the_predicted_class_probabilities(
    registry: CollectorRegistry, form: Any
) -> None:
    scores = dyadic_scores(400, seed=1)
    predicted = binary_classes(scores)
    signals.record_prediction(scores=scores, classes=form(predicted))
    assert value(registry, EXPECTED) == expected_by_hand(scores, predicted, ["No", "Yes"])


def test_a_string_array_of_classes_is_compared_without_a_loop(registry: CollectorRegistry) -> None:
    scores = [s for s in dyadic_scores(300, seed=2) if 0 <= s <= 1]
    predicted = np.where(np.array(scores) > 0.7, "Yes", "No")  # numpy's own string dtype
    signals.record_prediction(scores=np.array(scores), classes=predicted)
    assert value(registry, EXPECTED) == expected_by_hand(scores, predicted.tolist(), ["No", "Yes"])


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param(lambda s: np.where(s > 0.3, "Yes", "No"), id="both-classes"),
        pytest.param(lambda s: np.full(len(s), "No"), id="only-the-first-class"),
        pytest.param(lambda s: np.full(len(s), "Yes"), id="only-the-second-class"),
        pytest.param(
            lambda s: np.array(["Yes", "No", "Maybe", ""])[np.arange(len(s)) % 4],
            id="unknown-and-empty-labels",
        ),
    ],
)
def test_a_string_array_with_any_scores_counts_classes_and_expected_alike(
    registry: CollectorRegistry, labels: Any
) -> None:
    """The class count's comparisons, reused by the expected sum: NaN, infinities and scores
    outside [0, 1] among them."""
    scores = np.array(dyadic_scores(500, seed=7))
    predicted = labels(scores)
    signals.record_prediction(scores=scores, classes=predicted)
    hand = predicted.tolist()
    assert value(registry, EXPECTED) == expected_by_hand(scores.tolist(), hand, ["No", "Yes"])
    for label in ("No", "Yes"):
        assert value(registry, "model_predictions_total", **{"class": label}) == hand.count(label)
    assert value(registry, "model_predictions_total", **{"class": "__unseen__"}) == sum(
        label not in ("No", "Yes") for label in hand
    )


def test_a_batch_sum_reads_each_rows_class_index() -> None:
    """Index 0 is "No" (1 - s), 1 "Yes" (s), 2 any other class (max(s, 1 - s)); ``None``: no
    class for every row. The NaN row adds nothing."""
    expected = ExpectedCorrect(kinds(["No", "Yes", "?"], ["No", "Yes"]), 2, lambda a: None)
    scores = np.array([0.25, 0.5, 0.75, 1.0, math.nan])
    assert expected.amount(scores, np.array([1, 1, 0, 0, 1])) == 0.25 + 0.5 + 0.25 + 0.0
    assert expected.amount(scores, np.array([2, 2, 2, 2, 2])) == 0.75 + 0.5 + 0.75 + 1.0
    assert expected.amount(scores, None) == 0.75 + 0.5 + 0.75 + 1.0
    assert expected.amount(scores[:0], np.array([], dtype=np.intp)) == 0.0


@pytest.mark.parametrize(
    ("classes", "predicted"),
    [
        pytest.param(None, None, id="no-classes-anywhere"),
        pytest.param(["No", "Yes"], None, id="binary-without-predicted-classes"),
        pytest.param(["0", "1"], "ints", id="integer-classes-as-strings"),
        pytest.param(["a", "b", "c"], "abc", id="three-classes-score-is-the-predicted-one"),
        pytest.param(["Yes", "No"], "yes-no", id="second-class-is-the-scored-one"),
    ],
)
def test_the_rule_follows_the_profile_classes(
    classes: list[str] | None, predicted: str | None
) -> None:
    scores = dyadic_scores(200, seed=3)
    labels: Any = None
    if predicted == "ints":
        labels = np.array([int(s > 0.5) for s in scores])
    elif predicted == "abc":
        labels = ["abc"[i % 3] for i in range(len(scores))]
    elif predicted == "yes-no":
        labels = binary_classes(scores)
    with isolated_signals() as registry:
        signals.register_model(profile_with(classes))
        signals.record_prediction(scores=scores, classes=labels)
        recorded = registry.get_sample_value(EXPECTED, {"model": "m", "version": "1"})
    hand = labels.tolist() if isinstance(labels, np.ndarray) else labels
    assert recorded == expected_by_hand(scores, hand, classes)


def test_single_rows_add_the_same_as_one_batch(registry: CollectorRegistry) -> None:
    scores = dyadic_scores(120, seed=4)
    predicted = binary_classes(scores)
    for score, label in zip(scores, predicted, strict=True):
        signals.record_prediction({"delta": 1.0}, scores=score, classes=label)
    one_by_one = value(registry, EXPECTED)
    signals.record_prediction(scores=scores, classes=predicted)
    assert one_by_one == expected_by_hand(scores, predicted, ["No", "Yes"])
    assert value(registry, EXPECTED) == 2 * one_by_one


def test_predictions_without_scores_add_nothing(registry: CollectorRegistry) -> None:
    signals.record_prediction({"delta": 1.0}, classes="Yes")
    signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"])
    assert value(registry, EXPECTED) == 0
    assert value(registry, "model_predictions_total", **{"class": "Yes"}) == 2


def test_a_batch_is_one_add(registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever the rows, the counter is incremented once per call."""
    compiled = signals._config.current().models[("churn", "3")]
    adds: list[float] = []
    monkeypatch.setattr(compiled.expected, "inc", adds.append)
    scores = dyadic_scores(1000, seed=5)
    signals.record_prediction(scores=scores, classes=binary_classes(scores))
    assert adds == [expected_by_hand(scores, binary_classes(scores), ["No", "Yes"])]
    assert value(registry, EXPECTED) == 0  # the only add went to the list


def test_the_expected_series_leave_with_a_retired_version(registry: CollectorRegistry) -> None:
    signals.record_prediction(scores=[0.25], classes=["No"])
    assert value(registry, EXPECTED) == 0.75
    signals.retire_model("churn", "3")
    assert value(registry, EXPECTED) is None


# -- across processes ---------------------------------------------------------------------------


def test_forked_workers_add_up_exactly(multiprocess_dir: Path, profile: ReferenceProfile) -> None:
    """Three workers, each with single rows and a batch, as gunicorn's would: the merged
    counter is the sum of every row's expected correctness."""
    calls = {w: dyadic_scores(150, seed=10 + w) for w in range(3)}

    def worker(w: int) -> Any:
        def run() -> None:
            multiprocess.use_identifier(f"w{w}")
            scores = calls[w]
            predicted = binary_classes(scores)
            for score, label in zip(scores[:20], predicted[:20], strict=True):
                signals.record_prediction({"delta": 0.0}, scores=score, classes=label)
            signals.record_prediction(scores=scores[20:], classes=np.array(predicted[20:]))

        return run

    with isolated_signals():
        signals.register_model(profile)
        for w in calls:
            in_child(worker(w))
        total = merged(multiprocess_dir).get_sample_value(EXPECTED, MODEL)
    by_hand = sum(expected_by_hand(s, binary_classes(s), ["No", "Yes"]) for s in calls.values())
    assert total == by_hand


# -- the profile's held-out estimate ------------------------------------------------------------


def test_the_held_out_estimate_reads_rows_as_the_counter_does(registry: CollectorRegistry) -> None:
    scores = dyadic_scores(256, seed=6)
    predicted = binary_classes(scores)
    estimate = estimate_accuracy(scores, predicted, classes=["No", "Yes"])
    signals.record_prediction(scores=scores, classes=predicted)
    finite = sum(1 for s in scores if math.isfinite(s))
    assert estimate == value(registry, EXPECTED) / finite
    assert estimate_accuracy([[0.2, 0.8], [0.6, 0.4]], ["Yes", "No"], classes=["No", "Yes"]) == 0.7
    assert estimate_accuracy([0.2, 0.9]) == pytest.approx(0.85)
    with pytest.raises(ValueError, match="2 classes, 3 scores"):
        estimate_accuracy([0.1, 0.2, 0.3], ["No", "No"], classes=["No", "Yes"])
    with pytest.raises(ValueError, match="no finite scores"):
        estimate_accuracy([math.nan])


def test_the_profile_keeps_the_estimate_and_older_profiles_load(tmp_path: Path) -> None:
    profile = profile_with(["No", "Yes"], accuracy=0.8, estimated_accuracy=0.77)
    profile.save(tmp_path / "profile.json")
    assert ReferenceProfile.load(tmp_path / "profile.json") == profile
    older = profile.to_dict()
    del older["estimated_accuracy"]  # profiles written before the field existed
    assert ReferenceProfile.from_dict(older).estimated_accuracy is None
    with pytest.raises(ValueError, match="estimated_accuracy: must be in"):
        ReferenceProfile.from_dict({**older, "estimated_accuracy": 1.2})


def test_registering_exports_the_held_out_estimate() -> None:
    with isolated_signals() as registry:
        signals.register_model(profile_with(["No", "Yes"], estimated_accuracy=0.8125))
        labels = {"model": "m", "version": "1"}
        assert registry.get_sample_value("model_reference_estimated_accuracy", labels) == 0.8125
        assert registry.get_sample_value(EXPECTED, labels) == 0
        signals.register_model(dataclasses.replace(profile_with(None), version="2"))
        labels["version"] = "2"
        assert registry.get_sample_value("model_reference_estimated_accuracy", labels) is None
