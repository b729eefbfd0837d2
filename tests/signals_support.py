"""What the model-signal tests share: the churn profile, the registry fixture, sample readers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from ml_wsgi_metrics import _inputs, signals
from ml_wsgi_metrics.profile import ReferenceProfile, build_profile
from ml_wsgi_metrics.testing import isolated_signals

MODEL = {"model": "churn", "version": "3"}
CLASSES = ["No", "Yes"]


@pytest.fixture(scope="module", name="profile")
def churn_profile() -> ReferenceProfile:
    """The churn model's profile, version 3 (two numeric features, one categorical)."""
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


@pytest.fixture(name="registry")
def signals_registry(profile: ReferenceProfile) -> Iterator[CollectorRegistry]:
    """A fresh registry with signals configured on it and the churn profile registered."""
    with isolated_signals() as registry:
        signals.register_model(profile)
        yield registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """A sample of the test model (``None`` when absent)."""
    return registry.get_sample_value(name, {**MODEL, **labels})


def rejected(registry: CollectorRegistry, reason: str) -> float | None:
    """How many feedback ids were rejected for ``reason``."""
    return registry.get_sample_value("model_feedback_rejected_total", {"reason": reason})


def merged(directory: Path) -> CollectorRegistry:
    """All processes' files read back through prometheus_client's own collector."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    return registry


def unreadable_blocks(monkeypatch: pytest.MonkeyPatch, failure: Exception) -> None:
    """Make reading a DataFrame's blocks fail with ``failure`` (as in a pandas whose internals
    moved): the frame reader falls back to pandas' public Series."""

    def broken(frame: pd.DataFrame, names: list[Any]) -> Any:
        raise failure

    monkeypatch.setattr(_inputs, "_stored_columns", broken)
