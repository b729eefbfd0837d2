"""Signed prediction ids and feedback: lazy signing, the secret key, rejected ids counted by
reason, an id counted once per host, clock skew, and feedback from another process."""

from __future__ import annotations

import base64
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import itsdangerous
import pytest
from prometheus_client import CollectorRegistry
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import merged, rejected, value
from signals_support import signals_registry as signals_registry  # fixture "registry"

from ml_wsgi_metrics import multiprocess, signals
from ml_wsgi_metrics.profile import (
    UNSEEN,
    ReferenceProfile,
)
from ml_wsgi_metrics.signals import REJECT_REASONS, InvalidPredictionId
from ml_wsgi_metrics.testing import TEST_SECRET_KEY, isolated_signals


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
    """The id with another predicted class index, its tag unchanged."""
    head, row = token.split(".")
    data = bytearray(base64.urlsafe_b64decode(row))
    data[5] ^= 1  # the class index's low byte (after the 4-byte row index)
    return f"{head}.{base64.urlsafe_b64encode(bytes(data)).decode()}"


def _minted(offset: float, monkeypatch: pytest.MonkeyPatch, **inputs: Any) -> list[str]:
    """Ids of a prediction made on a host whose clock is ``offset`` seconds ahead."""
    now = time.time
    monkeypatch.setattr(time, "time", lambda: now() + offset)
    try:
        prediction = signals.record_prediction(**inputs)
    finally:
        monkeypatch.undo()
    return prediction.ids


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
    [old] = _minted(-3600, monkeypatch, inputs={"delta": 1.0}, classes="Yes")
    signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_feedback_age=60)
    with pytest.raises(InvalidPredictionId) as raised:
        signals.record_feedback(old, "Yes")
    assert raised.value.reason == "expired"
    assert rejected(registry, "expired") == 1
    assert value(registry, "model_confusion_total", predicted="Yes", actual="Yes") == 0


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


# -- feedback counted once, signed classes checked, clocks a few seconds apart ---------------


def test_the_replayed_reason_is_created_at_zero(registry: CollectorRegistry) -> None:
    assert "replayed" in REJECT_REASONS
    assert rejected(registry, "replayed") == 0


def test_an_id_counts_once(registry: CollectorRegistry) -> None:
    ids = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["Yes", "No"]).ids
    assert signals.record_feedback(ids[0], "Yes").correct is True
    for replay in (ids[0], ids[0]):  # an old id re-encoded: test_prediction_id_format.py
        with pytest.raises(InvalidPredictionId) as raised:
            signals.record_feedback(replay, "No")
        assert raised.value.reason == "replayed"
        assert "already counted" in str(raised.value)
    assert signals.record_feedback(ids[1], "No").correct is True
    assert rejected(registry, "replayed") == 2
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
    ahead = _minted(3, monkeypatch, inputs={"delta": [1.0, 2.0]}, classes=["Yes", "No"])
    assert signals.record_feedback(ahead[0], "Yes").correct is True
    far_ahead = _minted(30, monkeypatch, inputs={"delta": 1.0}, classes="Yes")
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
