"""Published model versions on disk: reserved, written, published through ``LATEST``, pruned,
and loaded ready to score.

Layout of the models directory (one directory per model name)::

    <models_dir>/<name>/LATEST          # "3": the published version, replaced atomically
    <models_dir>/<name>/<version>/      # "1", "2", ... never rewritten once published
        model.joblib                    # the fitted scikit-learn Pipeline
        metrics.json                    # held-out metrics, sizes, timings, the config used
        profile.json                    # reference profile for drift monitoring

Versions are reserved with an atomic ``mkdir`` and ``LATEST`` only moves forward (under a file
lock), so concurrent trainings get distinct versions and a server that re-reads ``LATEST``
sees complete versions only. ``LATEST`` is read as a version number only (a ValueError
otherwise), so it can never point a loader outside ``<name>/``; but loading a version runs its
pickle: the models directory must be writable by the service's user only. Old versions are
pruned after a training (:func:`prune_versions`): the one ``LATEST`` names and the newest
complete ones stay, never one being written.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from service.data import preprocess

__all__ = [
    "LATEST_FILE",
    "METRICS_FILE",
    "MODEL_FILE",
    "NEGATIVE_CLASS",
    "POSITIVE_CLASS",
    "PROFILE_FILE",
    "LoadedModel",
    "classify",
    "latest_version",
    "load_latest",
    "prune_versions",
    "publish",
    "reserve_version",
    "write_atomic",
]

MODEL_FILE = "model.joblib"
METRICS_FILE = "metrics.json"
PROFILE_FILE = "profile.json"
LATEST_FILE = "LATEST"
#: A version: a positive integer without leading zeros, at most 9 digits.
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
#: The model predicts the raw data's labels: ``predict`` returns these strings.
POSITIVE_CLASS, NEGATIVE_CLASS = "Yes", "No"


@dataclass(frozen=True)
class LoadedModel:
    """A published model version, ready to score raw rows."""

    name: str
    version: str
    path: Path
    model: Pipeline
    profile_path: Path
    feature_columns: list[str]
    classes: list[str]
    metrics: dict[str, Any]

    @property
    def positive_class(self) -> str:
        return POSITIVE_CLASS

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        """Positive-class probabilities for raw rows (preprocessed as in training)."""
        return self.scores(preprocess(frame[self.feature_columns]))

    def scores(self, features: pd.DataFrame) -> np.ndarray:
        """Positive-class probabilities for preprocessed ``features``."""
        column = self.classes.index(self.positive_class)
        return self.model.predict_proba(features)[:, column]


def classify(scores: np.ndarray) -> np.ndarray:
    """The class each positive-class probability predicts (positive above 0.5)."""
    return np.where(scores > 0.5, POSITIVE_CLASS, NEGATIVE_CLASS)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see the old file or the whole new one."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o644)  # mkstemp's 0600 would hide it from other users
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_latest(root: Path) -> str | None:
    """The version ``LATEST`` names (``None``: none published); ValueError unless a number."""
    try:
        text = (root / LATEST_FILE).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    if not text:
        return None
    if not _VERSION.fullmatch(text):
        raise ValueError(f"{root / LATEST_FILE}: not a version number: {text[:40]!r}")
    return text


def _published(root: Path) -> int:
    """The published version number, 0 when none (or ``LATEST`` is not a number: replaced)."""
    try:
        return int(_read_latest(root) or 0)
    except ValueError:
        return 0


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    """The model's lock, across processes: reserving, publishing and pruning versions take it."""
    with open(root / ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _lock_directory(path: Path, *, wait: bool) -> int | None:
    """An open descriptor holding an exclusive lock on a version directory, or ``None`` when
    another holds it (``wait=False``). A trainer holds its version's until it is published."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def _versions(root: Path) -> list[str]:
    """The version directories' names, oldest first."""
    names = [
        p.name
        for p in root.iterdir()
        if p.name.isascii() and p.name.isdigit() and p.is_dir() and not p.is_symlink()
    ]
    return sorted(names, key=int)


def reserve_version(root: Path) -> tuple[str, Path, int]:
    """Claim the next integer version (an atomic ``mkdir``, safe across processes) and lock it
    for writing: ``(version, directory, the lock's descriptor)``."""
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):  # a pruner sees the new directory locked, never between mkdir and lock
        while True:
            taken = [int(name) for name in _versions(root)]
            version = str(max([*taken, _published(root)]) + 1)
            try:
                (root / version).mkdir()
            except FileExistsError:
                continue
            fd = _lock_directory(root / version, wait=True)
            assert fd is not None
            return version, root / version, fd


def publish(root: Path, version: str) -> bool:
    """Point ``LATEST`` at ``version`` unless a newer version is already published."""
    with _locked(root):
        if _published(root) >= int(version):
            return False
        write_atomic(root / LATEST_FILE, f"{version}\n".encode())
        return True


def prune_versions(models_dir: str | os.PathLike[str], name: str, keep: int) -> list[str]:
    """Remove the version directories of ``name`` that no server registers any more; return
    the versions removed.

    Kept: the one ``LATEST`` names and the ``keep`` newest complete ones (the model signals'
    ``live_versions``: a starting worker registers those). A version being written is never
    removed (its trainer holds a lock on its directory from reservation to publication), and
    pruning, reserving and publishing take the model's lock, so concurrent trainers, in any
    process, are safe. Directories left by a trainer that died are removed.
    """
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise ValueError(f"keep: must be an integer of at least 1, got {keep!r}")
    root = Path(models_dir) / name
    removed = []
    with _locked(root):
        versions = _versions(root)
        complete = [v for v in versions if (root / v / METRICS_FILE).exists()]
        kept = {*complete[-keep:], str(_published(root))}
        for version in versions:
            if version in kept:
                continue
            fd = _lock_directory(root / version, wait=False)
            if fd is None:
                continue  # being written
            try:
                shutil.rmtree(root / version)
            finally:
                os.close(fd)
            removed.append(version)
    return removed


def latest_version(models_dir: str | os.PathLike[str], name: str) -> str | None:
    """The published version of ``name`` (one small file read: cheap enough to poll);
    ValueError when ``LATEST`` holds anything but a version number."""
    return _read_latest(Path(models_dir) / name)


def load_latest(models_dir: str | os.PathLike[str], name: str) -> LoadedModel:
    """Load the version ``LATEST`` points at; FileNotFoundError when none is published,
    ValueError when ``LATEST`` is not a version number (nothing is loaded then)."""
    root = Path(models_dir) / name
    version = _read_latest(root)
    if version is None:
        raise FileNotFoundError(f"no published model {name!r} in {models_dir} (train one first)")
    path = root / version
    model = joblib.load(path / MODEL_FILE)
    metrics = json.loads((path / METRICS_FILE).read_text())
    return LoadedModel(
        name=name,
        version=version,
        path=path,
        model=model,
        profile_path=path / PROFILE_FILE,
        feature_columns=[str(c) for c in model.feature_names_in_],
        classes=[str(c) for c in model.classes_],
        metrics=metrics,
    )
