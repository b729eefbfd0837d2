"""Training from the service: the first version when none is published (one worker trains,
the others wait), and retraining on ``POST /pipeline`` (one at a time on the host, others 409).

Both hold an exclusive ``flock`` in the models directory, so every worker and every instance
sharing the directory agrees; :mod:`service.pipeline` does the training itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from service.pipeline import Config, TrainResult, train
from service.published import latest_version
from service.validation import InputError

__all__ = ["Trainer", "file_lock"]

log = logging.getLogger("service")


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` for the ``with`` block, shared by every process on the
    host; yields whether it was taken (always when ``wait``). The file is created 0600 and never
    opened through a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(descriptor)  # releases the lock


class Trainer:
    """Trains versions of the configured model into ``models_dir``."""

    def __init__(self, config_path: Path, config: Config, models_dir: Path) -> None:
        self.config_path = config_path
        self.config = config
        self.models_dir = models_dir
        #: Held while a version is trained by :meth:`retrain`, by any process on the host.
        self.lock_path = models_dir / f".{config.name}.training.lock"

    def train_if_none(self) -> None:
        """Train the first version; of several workers starting together, one trains."""
        name = self.config.name
        if latest_version(self.models_dir, name) is not None:
            return
        with file_lock(self.models_dir / f".{name}.first-training.lock", wait=True):
            if latest_version(self.models_dir, name) is None:
                log.info("no %s model in %s: training one", name, self.models_dir)
                train(self.config_path, models_dir=self.models_dir)

    def retrain(self, overrides: Mapping[str, Any], *, keep: int) -> TrainResult:
        """Train and publish a new version with ``overrides`` of the config (seed, n_rows),
        keeping the ``keep`` newest versions' directories.

        One training at a time on the host, whatever the worker or instance: another call
        meanwhile is a 409.
        """
        with file_lock(self.lock_path, wait=False) as taken:
            if not taken:
                raise InputError(
                    "a training is already running (in this or another worker); retry when it ends",
                    code="training_in_progress",
                    status=409,
                )
            if not overrides:
                return train(self.config_path, models_dir=self.models_dir, keep_versions=keep)
            with tempfile.NamedTemporaryFile("w", suffix=".json") as config:
                json.dump(self._overridden(overrides), config)
                config.flush()
                return train(config.name, models_dir=self.models_dir, keep_versions=keep)

    def _overridden(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        """The config file's content with ``overrides``, its paths made absolute."""
        raw: dict[str, Any] = json.loads(self.config_path.read_text()) | dict(overrides)
        data_path = self.config.data_path
        raw["data_path"] = None if data_path is None else os.fspath(data_path)
        raw["models_dir"] = os.fspath(self.models_dir.absolute())
        return raw
