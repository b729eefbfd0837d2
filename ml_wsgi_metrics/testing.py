"""Helpers for tests, the package's and the app's: isolated model-signal configurations.

from ml_wsgi_metrics.testing import isolated_signals

def test_prediction_is_counted():
    with isolated_signals() as registry:
        signals.register_model(profile)
        signals.record_prediction({"x": 1.0}, classes="yes")
        assert registry.get_sample_value(
            "model_predictions_total", {"model": "m", "version": "1", "class": "yes"}
        ) == 1
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CollectorRegistry

from . import signals

__all__ = ["TEST_SECRET_KEY", "isolated_signals", "reset_signals"]

#: The secret key :func:`isolated_signals` signs prediction ids with.
TEST_SECRET_KEY = "ml-wsgi-metrics-test-key"


def reset_signals() -> None:
    """Forget the model-signal configuration, registered models and the context's binding."""
    signals._reset()


@contextmanager
def isolated_signals(
    registry: CollectorRegistry | None = None,
    *,
    secret_key: str | None = TEST_SECRET_KEY,
    **settings: Any,
) -> Iterator[CollectorRegistry]:
    """Configure model signals on a fresh registry for the ``with`` block; reset after it.

    ``settings`` go to :func:`ml_wsgi_metrics.signals.configure`.
    """
    registry = CollectorRegistry() if registry is None else registry
    signals.configure(registry=registry, secret_key=secret_key, **settings)
    try:
        yield registry
    finally:
        reset_signals()
