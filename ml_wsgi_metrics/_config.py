"""The model-signal state of this process: its configuration and the models registered.

Owns :class:`Config` (registry, namespace, settings, the registered models, the versions
retired here or by other processes, the id signer, the store of feedback ids already counted),
the one current configuration (:func:`current`, :func:`install`, :func:`reset`), the
``live_versions`` setting and the lookup of the model a verb means (:func:`resolve`).
:mod:`.signals` validates what the app passes and calls these.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from . import _context, _retired, _settings
from ._model import CompiledModel
from ._prediction_ids import REJECT_REASONS, IdSigner
from ._recorders import Inc
from ._replay import FILE_NAME, ReplayStore
from ._retired import Retirements, version_key
from ._series import child_adder
from .metrics import ModelMetrics, forget_model, shared
from .multiprocess import (
    ENV_VAR,
    active_directory,
    compact,
    merged_directory,
    report_error,
    storage_lock,
)

__all__ = ["LIVE_VERSIONS_ENV", "Config", "current", "install", "live_versions", "reset", "resolve"]

#: Environment variable supplying the default ``live_versions``.
LIVE_VERSIONS_ENV = _settings.LIVE_VERSIONS.name
_DEFAULT_LIVE_VERSIONS = _settings.LIVE_VERSIONS.default
_SYNC_INTERVAL = 1.0  # seconds between two reads of the retired-versions record by the verbs
_monotonic = time.monotonic


class Config:
    """What :func:`~ml_wsgi_metrics.signals.configure` set, and the models registered under it."""

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        const_labels: dict[str, str],
        secret_key: Any,
        max_feedback_age: float,
        metric_settings: dict[str, Any],
        *,
        max_clock_skew: float = 5.0,
        replay_store: str | os.PathLike[str] | None = None,
        replay_capacity: int = 1_000_000,
        live_versions: int = _DEFAULT_LIVE_VERSIONS,
    ) -> None:
        self.registry = registry
        self.namespace = namespace
        self.const_labels = const_labels
        self.signer = IdSigner(secret_key)
        self.max_feedback_age = max_feedback_age
        self.max_clock_skew = max_clock_skew
        self.metric_settings = metric_settings
        self._replay_path = replay_store
        self._replay_capacity = replay_capacity
        self._replay: ReplayStore | None = None
        self.live_versions = live_versions
        self.models: dict[tuple[str, str], CompiledModel] = {}
        self.lock = threading.Lock()
        self.retired = Retirements()  # this process's view: its own and the record's
        self._record: Retirements | None = None  # the record as last read
        self._synced = -math.inf
        self._metrics: ModelMetrics | None = None
        self._rejected: dict[str, Inc] = {}

    @property
    def metrics(self) -> ModelMetrics:
        if self._metrics is None:
            with self.lock:
                if self._metrics is None:
                    metrics = shared(
                        ModelMetrics,
                        self.registry,
                        namespace=self.namespace,
                        const_labels=self.const_labels,
                        **self.metric_settings,
                    )
                    const = tuple(self.const_labels.values())
                    self._rejected = {
                        r: child_adder(metrics.feedback_rejected.labels(*const, r))
                        for r in REJECT_REASONS
                    }
                    self._metrics = metrics
        return self._metrics

    def sync(self, *, now: bool = False) -> None:
        """Retire here what other processes retired (the directory's record), reading the
        record at most once a second unless ``now``."""
        moment = _monotonic()
        if not now and moment - self._synced < _SYNC_INTERVAL:
            return
        self._synced = moment
        directory = merged_directory()  # prometheus_client's own, without this package's hooks
        if directory is None:
            return
        try:
            record = _retired.read(directory)
        except (OSError, ValueError) as error:
            report_error(f"reading {_retired.RECORD}", error, stage="storage_read")
            return
        if record is not self._record:
            self._record = record
            self.retired = self.retired.merged(record)
            self._drop_retired()

    def retire(self, change: Callable[[Retirements], None]) -> None:
        """Retire versions (``change`` edits a record): here, in the directory's record so every
        process follows, and their series with them."""
        retired = self.retired.merged(Retirements())
        change(retired)
        directory = merged_directory()
        if directory is not None:
            try:
                retired = retired.merged(_retired.update(directory, change))
            except (OSError, ValueError) as error:  # this process retires them all the same
                report_error(f"writing {_retired.RECORD}", error)
        self.retired = retired
        self._drop_retired()

    def retire_beyond_live(self, model: str) -> None:
        """Retire the versions of ``model`` older than its ``live_versions`` newest registered
        here (registered or not: a version older than those is beyond the live ones)."""
        versions = self.versions(model)
        if len(versions) < self.live_versions:
            return
        floor = versions[-self.live_versions]
        current = self.retired.floors.get(model)
        if current is None or version_key(current) < version_key(floor):
            self.retire(lambda record: record.retire_below(model, floor))

    def versions(self, model: str) -> list[str]:
        """The registered versions of ``model``, oldest first."""
        with self.lock:
            return sorted((v for m, v in self.models if m == model), key=version_key)

    def _drop_retired(self) -> None:
        """Remove the registered versions that are retired, and their series."""
        with self.lock:
            gone = [key for key in self.models if self.retired.is_retired(*key)]
            dropped = [self.models.pop(key) for key in gone]
        for model in dropped:
            model.remove()
            forget_model(self.registry, (model.name, model.version))
        if dropped and active_directory() is not None:
            compact(self.retired.key_filter())

    def reject(self, reason: str) -> None:
        _ = self.metrics
        with storage_lock():
            self._rejected[reason](1)

    @property
    def replay(self) -> ReplayStore:
        """The ids counted so far: the configured file, else the multiprocess directory's,
        else this process's memory (kept when ``configure`` is called again)."""
        if self._replay is None:
            path = self._replay_path
            if path is None:
                directory = active_directory() or os.environ.get(ENV_VAR)
                path = os.path.join(directory, FILE_NAME) if directory else None
            settings = (self.max_feedback_age + self.max_clock_skew, self._replay_capacity)
            with _config_lock:
                store = _memory_stores.get(settings) if path is None else None
                if store is None:
                    store = ReplayStore(path, lifetime=settings[0], capacity=settings[1])
                    if path is None:
                        _memory_stores[settings] = store
            with self.lock:
                if self._replay is None:
                    self._replay = store
        return self._replay

    def first_time(self, signed_at: int, content: bytes) -> bool:
        """Whether an id is counted for the first time on this host. When the store cannot
        be used the id counts (fail open), and the error is logged and counted."""
        try:
            return self.replay.add(signed_at, content)
        except (sqlite3.Error, OSError, ValueError) as error:
            report_error("the feedback replay store", error)
            return True


_config: Config | None = None
_config_lock = threading.Lock()
# The in-memory replay stores of this process, by (lifetime, capacity).
_memory_stores: dict[tuple[float, int], ReplayStore] = {}


def install(config: Config) -> None:
    """Make ``config`` the current configuration."""
    global _config
    with _config_lock:
        _config = config


def reset() -> None:
    """Forget the configuration and registered models (for tests: see :mod:`.testing`)."""
    global _config
    with _config_lock:
        _config = None
        _memory_stores.clear()
    _context.reset()


def current() -> Config:
    """The configuration; the defaults of ``configure`` until it is called."""
    global _config
    config = _config
    if config is None:
        with _config_lock:
            if _config is None:
                namespace = _settings.NAMESPACE.get()
                live = live_versions(None)
                _config = Config(
                    REGISTRY, namespace, {}, None, 30 * 86400.0, {}, live_versions=live
                )
            config = _config
    return config


def live_versions(setting: Any) -> int:
    """The ``live_versions`` setting, checked (default: the environment, else 2)."""
    if setting is None:
        setting = _settings.LIVE_VERSIONS.get()
    if not isinstance(setting, int) or isinstance(setting, bool) or setting < 1:
        raise ValueError(f"live_versions: must be an integer of at least 1, got {setting!r}")
    return setting


def resolve(model: str | None, version: str | None) -> tuple[Config, CompiledModel]:
    """The configuration and the model a verb means: the one named, else the bound one, else
    the only one registered."""
    config = current()
    config.sync()
    if model is None:
        bound = _context.current()
        if bound is not None:
            model, version = bound
        else:
            models = list(config.models.values())  # a copy: other threads may register
            if len(models) == 1:
                return config, models[0]
            raise ValueError(
                f"model: {len(models)} models are registered and none is bound; call "
                f"bind_model(name, version) or pass model=..., version=..."
            )
    if version is None:
        versions = [k for k in list(config.models) if k[0] == model]
        if len(versions) != 1:
            raise ValueError(
                f"version: give the version of model {model!r} ({len(versions)} known)"
            )
        version = versions[0][1]
    found = config.models.get((model, version))
    if found is None and config.retired.is_retired(model, version):
        raise ValueError(f"model: {model!r} version {version!r} is retired")
    if found is None:
        raise ValueError(
            f"model: {model!r} version {version!r} is not registered; call "
            f"register_model(profile) first (registered: {sorted(config.models)})"
        )
    return config, found
