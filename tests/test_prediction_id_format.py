"""The prediction id format: one keyed BLAKE2b tag per row under a head shared by the call.

Round trip, every character tampered, wrong and rotated keys, expiry, ids signed with the key
but unreadable, and ids minted in the format before (itsdangerous tokens) still counted.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from bisect import bisect_left
from typing import Any

import itsdangerous
import numpy as np
import pandas as pd
import pytest
from itsdangerous.encoding import base64_encode
from prometheus_client import CollectorRegistry
from signals_support import churn_profile as churn_profile  # fixture "profile"
from signals_support import rejected, value
from signals_support import signals_registry as signals_registry  # fixture "registry"

from ml_wsgi_metrics import _config, signals
from ml_wsgi_metrics._prediction_ids import NONE, compact_json
from ml_wsgi_metrics.profile import UNSEEN, ReferenceProfile, build_profile
from ml_wsgi_metrics.signals import InvalidPredictionId
from ml_wsgi_metrics.testing import TEST_SECRET_KEY, isolated_signals

ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
DAY = 86400.0


def legacy_ids(key: Any, rows: list[tuple[str | None, int | None]], stamp: float) -> list[str]:
    """Ids minted as the code before the batch format did (``IdSigner.sign_rows`` then)."""
    sign = itsdangerous.URLSafeTimedSerializer(key, salt="ml_wsgi_metrics.prediction")
    signer = sign.make_signer()
    return [
        signer.sign(base64_encode(compact_json(["churn", "3", c, b, stamp, f"{i:08x}"]))).decode()
        for i, (c, b) in enumerate(rows)
    ]


def decoded(token: str) -> list[Any]:
    payload, _ = _config.current().signer.decode(token, 30 * DAY, 5.0)
    return payload


def reason(token: Any) -> str:
    with pytest.raises(InvalidPredictionId) as raised:
        signals.record_feedback(token, "Yes")
    return raised.value.reason


def test_ids_carry_class_bin_and_time(
    registry: CollectorRegistry, profile: ReferenceProfile
) -> None:
    scores = [0.9, 0.2, math.nan, 0.5]
    before = time.time()
    prediction = signals.record_prediction(
        {"delta": [1.0, 2.0, 3.0, 4.0]}, scores=scores, classes=["Yes", "No", None, "Maybe"]
    )
    ids = prediction.ids
    assert len(set(ids)) == 4 and len({i.split(".")[0] for i in ids}) == 1  # one head
    assert profile.score is not None
    bins = [bisect_left(profile.score.edges, s) for s in (0.9, 0.2)] + [None, None]
    bins[3] = bisect_left(profile.score.edges, 0.5)
    payloads = [decoded(i) for i in ids]
    assert [p[:4] for p in payloads] == [
        ["churn", "3", "Yes", bins[0]],
        ["churn", "3", "No", bins[1]],
        ["churn", "3", None, None],
        ["churn", "3", UNSEEN, bins[3]],
    ]
    assert all(before - 0.001 <= p[4] <= time.time() + 0.001 for p in payloads)  # ms
    assert len({p[5] for p in payloads}) == 4  # the replay store tells rows apart
    results = [signals.record_feedback(i, "Yes") for i in ids]
    assert [r.correct for r in results] == [True, False, None, False]
    assert value(registry, "model_confusion_total", predicted="No", actual="Yes") == 1


def test_equal_classes_of_other_types_carry_the_class_they_were_counted_as() -> None:
    """1, 1.0 and True are equal keys but read as "1", "1.0" and "True", as the counts read them."""
    frame = pd.DataFrame({"x": np.linspace(0, 1, 100)})
    profile = build_profile(frame, model="m", version="1", classes=["0", "1"])
    classes = [1, 1.0, True, 0, False, 0.0, "1", np.int64(1)]
    with isolated_signals(secret_key="k") as registry:
        signals.register_model(profile)
        ids = signals.record_prediction({"x": [0.5] * len(classes)}, classes=classes).ids
        labels = [decoded(i)[2] for i in ids]
        counted = {c: value(registry, "model_predictions_total", model="m", version="1",
                            **{"class": c}) for c in ("0", "1", UNSEEN)}  # fmt: skip
    assert labels == ["1", UNSEEN, UNSEEN, "0", UNSEEN, UNSEEN, "1", "1"]
    assert counted == {c: float(labels.count(c)) for c in ("0", "1", UNSEEN)}


def test_one_row_and_no_rows(registry: CollectorRegistry) -> None:
    token = signals.record_prediction({"delta": 1.0}, scores=0.7, classes=np.str_("No")).id
    assert decoded(token)[2] == "No"
    assert signals.record_prediction({"delta": []}, scores=[], classes=[]).ids == []


def test_every_character_tampered_is_rejected(registry: CollectorRegistry) -> None:
    """Head (format, time, nonce, model, version, classes), row index, class, bin and tag."""
    token = signals.record_prediction({"delta": 1.0}, scores=0.3, classes="Yes").id
    forged = [
        token[:i] + ALPHABET[(ALPHABET.index(token[i]) + shift) % 64] + token[i + 1 :]
        for i in range(len(token))
        if token[i] != "."
        for shift in (1, 32)
    ]
    assert len(set(forged)) == 2 * (len(token) - 1)
    assert {reason(f) for f in forged} == {"tampered"}
    assert rejected(registry, "tampered") == len(forged)
    head, row = token.split(".")
    for bad in (head + "." + row[:-4], head[:-1] + "." + row, head + row, token + "AAAA"):
        assert reason(bad) == "malformed"
    assert signals.record_feedback(token, "Yes").correct is True


def test_wrong_key_and_rotated_keys(profile: ReferenceProfile) -> None:
    with isolated_signals(secret_key="old key"):
        signals.register_model(profile)
        old = signals.record_prediction({"delta": [1.0, 2.0, 3.0]}, classes=["Yes"] * 3).ids
    with isolated_signals(secret_key=["old key", "new key"]):  # type: ignore[arg-type]
        signals.register_model(profile)
        new = signals.record_prediction({"delta": [1.0, 2.0]}, classes=["No"] * 2).ids
        assert signals.record_feedback(old[0], "Yes").correct is True  # the old key verifies
        assert signals.record_feedback(new[0], "No").correct is True
    with isolated_signals(secret_key="new key"):  # the old key retired
        signals.register_model(profile)
        assert signals.record_feedback(new[1], "No").correct is True  # signed with the newest
        assert reason(old[1]) == "tampered"
    with isolated_signals(secret_key="another key"):
        signals.register_model(profile)
        assert reason(old[2]) == "tampered"


def test_expired_and_future_ids(
    registry: CollectorRegistry, profile: ReferenceProfile, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = time.time()
    signer = _config.current().signer
    one = (np.array([0]), np.array([NONE]))
    old, late, ahead, far = (
        signer.sign_rows("churn", "3", ["Yes"], *one, now + offset)[0]
        for offset in (-61, -30, 3, 30)
    )
    signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_feedback_age=60)
    signals.register_model(profile)
    assert reason(old) == "expired"
    assert signals.record_feedback(late, "Yes").correct is True
    assert signals.record_feedback(ahead, "Yes").correct is True  # within max_clock_skew
    with pytest.raises(InvalidPredictionId, match="in the future") as raised:
        signals.record_feedback(far, "Yes")
    assert raised.value.reason == "expired"
    assert rejected(registry, "expired") == 2


def test_signed_but_unreadable_ids_are_malformed(registry: CollectorRegistry) -> None:
    """Only a holder of the key can make these: another version's ids, or a bug."""
    signer = _config.current().signer
    [token] = signer.sign_rows("churn", "3", ["Yes"], np.array([5]), np.array([NONE]), time.time())
    assert reason(token) == "malformed"  # class index 5 of a one-class table
    head, row = (base64.urlsafe_b64decode(part) for part in token.split("."))
    other_format = b"\x03" + head[1:]
    tag = hashlib.blake2b(other_format + row[:8], key=signer.keys[0], digest_size=16).digest()
    encode = base64.urlsafe_b64encode
    forged = f"{encode(other_format).decode()}.{encode(row[:8] + tag).decode()}"
    assert reason(forged) == "malformed"
    [other] = signer.sign_rows("other", "1", ["Yes"], np.array([0]), np.array([NONE]), time.time())
    assert reason(other) == "unknown_model"
    assert rejected(registry, "malformed") == 2


def test_ids_minted_in_the_format_before_still_count(
    registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    stamp = round(time.time(), 3)
    ids = legacy_ids(TEST_SECRET_KEY, [("Yes", 3), ("No", None), (None, None)], stamp)
    assert [i.count(".") for i in ids] == [2, 2, 2]
    results = [signals.record_feedback(i, "Yes") for i in ids]
    assert [r.correct for r in results] == [True, False, None]
    assert value(registry, "model_confusion_total", predicted="Yes", actual="Yes") == 1
    # Counted once, whatever its encoding: 27 base64 characters carry 162 bits for 160.
    last = ALPHABET[ALPHABET.index(ids[0][-1]) ^ 1]
    for replay in (ids[0], ids[0][:-1] + last):
        assert reason(replay) == "replayed"
    payload, stamp_text, signature = ids[1].split(".")
    assert reason(f"{payload}.{stamp_text}.{signature[:-4]}AAAA") == "tampered"
    assert reason(legacy_ids("another key", [("Yes", 1)], stamp)[0]) == "tampered"
    monkeypatch.setattr(
        itsdangerous.timed.TimestampSigner, "get_timestamp", lambda self: int(time.time()) - 3600
    )
    expired = legacy_ids(TEST_SECRET_KEY, [("Yes", 1)], stamp)[0]
    monkeypatch.undo()
    signals.configure(registry=registry, secret_key=TEST_SECRET_KEY, max_feedback_age=60)
    assert reason(expired) == "expired"
