"""The model a worker serves: loaded (after a first training if none is published) on first
use, reloaded when ``LATEST`` moves, scored and recorded with the model signals.

:class:`ModelStore` composes the rooms beside it: the shared prediction-id key
(:mod:`service.keys`), the versions registered with the signals (:mod:`service.versions`) and
training (:mod:`service.training`).
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from prometheus_client import CollectorRegistry

from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import ReferenceProfile
from service.keys import shared_key
from service.pipeline import DEFAULT_CONFIG, TrainResult, held_out_split, load_config
from service.published import LoadedModel, classify, latest_version, load_latest
from service.training import Trainer
from service.versions import LiveVersions

__all__ = ["ModelStore"]

log = logging.getLogger("service")


class ModelStore:
    """The model an app serves: trained on first use if none is published, then reloaded
    (and registered with the model signals) whenever ``LATEST`` moves.

    ``current()`` reads ``LATEST`` at most once per ``reload_interval`` seconds, so a new
    version reaches every worker without a restart. The newest versions stay registered, so
    feedback for them still counts: as many as the model signals' ``live_versions`` (2 unless
    ``$ML_WSGI_METRICS_LIVE_VERSIONS`` says otherwise); registering a newer one retires the
    oldest, and retraining removes the directories of versions no longer live.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str] | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        registry: CollectorRegistry | None = None,
        secret_key: str | None = None,
        reload_interval: float = 1.0,
    ) -> None:
        self.config_path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
        self.config = load_config(self.config_path)
        self.name = self.config.name
        self.models_dir = Path(models_dir) if models_dir is not None else self.config.models_dir
        self.reload_interval = reload_interval
        self.trainer = Trainer(self.config_path, self.config, self.models_dir)
        self.versions = LiveVersions()
        self._registry, self._secret_key = registry, secret_key
        self._model: LoadedModel | None = None
        self._checked = -math.inf
        self._lock = threading.Lock()
        self._evaluation: tuple[pd.DataFrame, np.ndarray] | None = None

    @property
    def training_lock(self) -> Path:
        """Held while a version is trained by ``retrain``, by any process on the host."""
        return self.trainer.lock_path

    @property
    def live(self) -> list[str]:
        """The versions registered with the model signals (not retired), oldest first."""
        return self.versions.live

    def current(self) -> LoadedModel:
        """The model to serve now (loading, or training, it on first use)."""
        model = self._model
        if model is not None and time.monotonic() - self._checked < self.reload_interval:
            return model
        with self._lock:
            if self._model is None:
                self._start()
            elif time.monotonic() - self._checked >= self.reload_interval:
                self._refresh()
            assert self._model is not None
            return self._model

    def _start(self) -> None:
        """Configure the model signals if there is something to set, then load (or train)."""
        secret_key = self._secret_key
        if secret_key is None and not os.environ.get(signals.SECRET_KEY_ENV):
            secret_key = shared_key(self.models_dir)
        if secret_key is not None or self._registry is not None:
            signals.configure(registry=self._registry, secret_key=secret_key)
        self.trainer.train_if_none()
        self._load()
        assert self._model is not None
        self.versions.register_previous(self.models_dir / self.name, self._model.version)

    def _refresh(self, *, force: bool = False) -> None:
        """Load the version ``LATEST`` names if it changed (or, ``force``, if this one is no
        longer live)."""
        self._checked = time.monotonic()
        assert self._model is not None
        try:
            latest = latest_version(self.models_dir, self.name)
            if latest is None or (latest == self._model.version and not force):
                return
            self._load()
        except Exception:  # a bad version on disk must not stop a serving worker
            log.exception("could not load a new version; still serving %s", self._model.version)

    def _load(self) -> None:
        model = load_latest(self.models_dir, self.name)
        self.versions.register(model.version, ReferenceProfile.load(model.profile_path))
        self._model = model
        self._checked = time.monotonic()
        log.info("serving %s version %s", model.name, model.version)

    def ensure_registered(self) -> None:
        """Register the live versions again if the signals were reconfigured meanwhile."""
        self.versions.ensure_registered()

    def catch_up(self) -> None:
        """Load the version ``LATEST`` names now if it moved, not at the next reload interval:
        feedback may be for a version another worker has just published and predicted with."""
        with self._lock:
            if self._model is not None:
                self._refresh()

    def _served(self) -> LoadedModel:
        """The model to serve, registered. Another worker may have retired this worker's
        version (two newer ones published within a reload interval): then ``LATEST`` now."""
        model = self.current()
        self.ensure_registered()
        if model.version in self.live:
            return model
        with self._lock:
            self._refresh(force=True)
            assert self._model is not None
            return self._model

    def predict(self, features: pd.DataFrame) -> tuple[LoadedModel, np.ndarray, signals.Prediction]:
        """Score preprocessed ``features`` and record the prediction with its latency."""
        model = self._served()
        try:
            return _predict(model, features)
        except ValueError:
            if model.version in self.live:
                raise
            return _predict(self._served(), features)  # retired just now: see _served

    def retrain(self, overrides: Mapping[str, Any]) -> TrainResult:
        """Train and publish a new version with ``overrides`` of the config (seed, n_rows);
        one training at a time on the host (see :meth:`service.training.Trainer.retrain`)."""
        self.current()
        result = self.trainer.retrain(overrides, keep=signals.live_versions())
        with self._lock:
            self._refresh()  # this worker serves it now; the others within a second
        return result

    def evaluation_set(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The held-out rows of the configured data (preprocessed features, actual labels).

        The held-out part of :func:`service.pipeline.held_out_split`, the split training uses,
        so the default model never saw them.
        """
        if self._evaluation is None:
            _, features, _, actual = held_out_split(self.config)
            self._evaluation = features, actual
        return self._evaluation


def _predict(
    model: LoadedModel, features: pd.DataFrame
) -> tuple[LoadedModel, np.ndarray, signals.Prediction]:
    """Score ``features`` with ``model``, timed and recorded with the model signals."""
    signals.bind_model(model.name, model.version)  # the middleware clears it per request
    with signals.time_prediction() as timer:
        scores = model.scores(features)
    prediction = timer.record(features, scores=scores, classes=classify(scores))
    return model, scores, prediction
