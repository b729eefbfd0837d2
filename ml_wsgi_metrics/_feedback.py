"""Feedback: the ground truth for a prediction id, checked and counted once per host.

Owns :class:`Feedback` and what an id decoded by :mod:`._prediction_ids` may count: its model
version registered here and not retired, its class one of the model's, the id not already
counted on this host (the replay store); then the confusion cell and the label delay. Every
rejection is counted under its reason.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from ._config import Config
from ._model import CompiledModel
from ._prediction_ids import InvalidPredictionId, compact_json
from ._recorders import NO_CLASS
from .multiprocess import storage_lock
from .profile import UNSEEN

__all__ = ["Feedback", "count_feedback"]


@dataclass(frozen=True)
class Feedback:
    """Ground truth counted for one prediction id."""

    model: str
    version: str
    predicted: str | None
    actual: str
    correct: bool | None
    delay: float


def count_feedback(config: Config, prediction_id: Any, actual: Any) -> Feedback:
    """Count ``actual`` for ``prediction_id``; an invalid id is counted under its reason and
    raised."""
    try:
        payload, compiled = _accepted(config, prediction_id)
    except InvalidPredictionId as error:
        config.reject(error.reason)
        raise
    model, version, predicted, _, stamp, _ = payload
    delay = max(0.0, time.time() - stamp)
    code = compiled.class_code(actual)
    label = compiled.classes[code] if code != compiled.class_codes[NO_CLASS] else UNSEEN
    correct = None
    if predicted is not None and compiled.profile.classes:
        inc = compiled.confusion_adder(predicted, label)
        with storage_lock():
            inc(1)
        correct = predicted == label
    compiled.observe_delay(delay)
    return Feedback(model, version, predicted, label, correct, delay)


def _accepted(config: Config, prediction_id: Any) -> tuple[list[Any], CompiledModel]:
    """The payload of an id that may count, and its model; else :class:`InvalidPredictionId`."""
    payload, signed_at = config.signer.decode(
        prediction_id, config.max_feedback_age, config.max_clock_skew
    )
    model, version, predicted, _, _, _ = payload
    compiled = config.models.get((model, version))
    if compiled is None:
        retired = config.retired.is_retired(model, version)
        raise InvalidPredictionId(
            "retired" if retired else "unknown_model",
            f"prediction id: model {model!r} version {version!r} is "
            + ("retired" if retired else "not registered here"),
        )
    if predicted is not None and (predicted == NO_CLASS or predicted not in compiled.class_codes):
        raise InvalidPredictionId(
            "malformed",
            f"prediction id: class {predicted[:60]!r} is not a class of model {model!r} "
            f"version {version!r}",
        )
    if not config.first_time(signed_at, compact_json(payload)):
        raise InvalidPredictionId(
            "replayed", "prediction id: feedback for it was already counted on this host"
        )
    return payload, compiled
