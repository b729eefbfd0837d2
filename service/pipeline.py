"""Train, evaluate and publish a versioned churn model, driven by ``service/config.json``.

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
complete ones stay, never one being written. Relative paths in the config file resolve against
its directory.

Command line: ``python -m service.pipeline [--config F] [--data CSV] [--models-dir D] [--keep N]``.
"""

from __future__ import annotations

import argparse
import fcntl
import io
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import sklearn
from sklearn.compose import ColumnTransformer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score, roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import build_profile, estimate_accuracy
from service.data import COLUMNS, DEFAULT_ROWS, DEFAULT_SEED, TARGET, load_data, preprocess

__all__ = [
    "DEFAULT_CONFIG",
    "Config",
    "LoadedModel",
    "TrainResult",
    "held_out_split",
    "latest_version",
    "load_config",
    "load_latest",
    "main",
    "prune_versions",
    "train",
]

log = logging.getLogger("service")

#: The config file shipped with the service.
DEFAULT_CONFIG = Path(__file__).with_name("config.json")

MODEL_FILE = "model.joblib"
METRICS_FILE = "metrics.json"
PROFILE_FILE = "profile.json"
LATEST_FILE = "LATEST"
#: A version: a positive integer without leading zeros, at most 9 digits.
_VERSION = re.compile(r"[1-9][0-9]{0,8}")
#: The model predicts the raw data's labels: ``predict`` returns these strings.
POSITIVE_CLASS, NEGATIVE_CLASS = "Yes", "No"


@dataclass(frozen=True)
class Config:
    """The training settings read from a config file (see ``service/config.json``)."""

    name: str
    test_size: float
    random_state: int
    numeric: tuple[str, ...]
    categorical: tuple[str, ...]
    model: dict[str, Any]
    models_dir: Path
    data_path: Path | None = None
    n_rows: int = DEFAULT_ROWS
    seed: int = DEFAULT_SEED

    @property
    def features(self) -> list[str]:
        return [*self.numeric, *self.categorical]


def load_config(path: str | os.PathLike[str] | None = None) -> Config:
    """Read and check a config file; ValueError names what is wrong."""
    path = Path(path) if path is not None else DEFAULT_CONFIG
    raw = json.loads(path.read_text())
    required = ("name", "test_size", "random_state", "numeric", "categorical", "model")
    missing = [key for key in (*required, "models_dir") if key not in raw]
    if missing:
        raise ValueError(f"{path}: missing key(s): {', '.join(missing)}")
    unknown = set(raw) - set(Config.__dataclass_fields__)
    if unknown:
        raise ValueError(f"{path}: unknown key(s): {', '.join(sorted(unknown))}")
    name = raw["name"]
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(
            f"{path}: name must be an identifier (a directory and a label), got {name!r}"
        )
    if not 0.0 < float(raw["test_size"]) < 1.0:
        raise ValueError(f"{path}: test_size must be between 0 and 1, got {raw['test_size']!r}")
    features = [*raw["numeric"], *raw["categorical"]]
    bad = [column for column in features if column not in COLUMNS or column == TARGET]
    if bad or not features or len(set(features)) != len(features):
        raise ValueError(
            f"{path}: features must be distinct schema columns; check {bad or features}"
        )
    base = path.parent.absolute()

    def resolve(value: str | None) -> Path | None:
        return None if value is None else Path(os.path.normpath(base / value))

    return Config(
        name=name,
        test_size=float(raw["test_size"]),
        random_state=int(raw["random_state"]),
        numeric=tuple(raw["numeric"]),
        categorical=tuple(raw["categorical"]),
        model=dict(raw["model"]),
        models_dir=Path(os.path.normpath(base / raw["models_dir"])),
        data_path=resolve(raw.get("data_path")),
        n_rows=int(raw.get("n_rows", DEFAULT_ROWS)),
        seed=int(raw.get("seed", DEFAULT_SEED)),
    )


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train` produced: ``path`` is the version directory."""

    name: str
    version: str
    path: Path
    metrics: dict[str, Any]


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
        features = preprocess(frame[self.feature_columns])
        column = self.classes.index(self.positive_class)
        return self.model.predict_proba(features)[:, column]


def build_model(config: Config) -> Pipeline:
    """The unfitted Pipeline: scaled numbers, one-hot categories, logistic regression."""
    columns = ColumnTransformer(
        [
            ("numeric", StandardScaler(), list(config.numeric)),
            ("categorical", OneHotEncoder(handle_unknown="ignore"), list(config.categorical)),
        ]
    )
    params = {"random_state": config.random_state, **config.model}
    return Pipeline(
        [
            ("columns", columns),
            ("classifier", LogisticRegression(**params)),
        ]
    )


def _write_atomic(path: Path, data: bytes) -> None:
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


def _dump(model: Pipeline) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


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


def _reserve_version(root: Path) -> tuple[str, Path, int]:
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


def _publish(root: Path, version: str) -> bool:
    """Point ``LATEST`` at ``version`` unless a newer version is already published."""
    with _locked(root):
        if _published(root) >= int(version):
            return False
        _write_atomic(root / LATEST_FILE, f"{version}\n".encode())
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


def held_out_split(
    config: Config, data: str | os.PathLike[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """``(x_train, x_test, y_train, y_test)``: the training split :func:`train` uses.

    The config's data (or the CSV ``data``), preprocessed, features only, labelled with the
    class names; ``test_size`` of it held out, stratified on the labels, seeded with
    ``random_state``: the same rows every time, so the held-out rows stay unseen by the model.
    """
    path = data if data is not None else config.data_path
    frame = preprocess(load_data(path, n_rows=config.n_rows, seed=config.seed))
    labels = np.where(frame[TARGET] == 1, POSITIVE_CLASS, NEGATIVE_CLASS)
    x_train, x_test, y_train, y_test = train_test_split(
        frame[config.features],
        labels,
        test_size=config.test_size,
        random_state=config.random_state,
        stratify=labels,
    )
    return x_train, x_test, y_train, y_test


def train(
    config_path: str | os.PathLike[str] | None = None,
    data_path: str | os.PathLike[str] | None = None,
    models_dir: str | os.PathLike[str] | None = None,
    *,
    keep_versions: int | None = None,
) -> TrainResult:
    """Train on a split of the data, evaluate on the held-out part, save and publish a version.

    ``data_path`` (a CSV of the Telco schema) and ``models_dir`` override the config file.
    ``keep_versions``: then prune older versions (see :func:`prune_versions`); ``None`` keeps all.
    """
    config = load_config(config_path)
    data_path = data_path if data_path is not None else config.data_path
    root = Path(models_dir if models_dir is not None else config.models_dir) / config.name

    x_train, x_test, y_train, y_test = held_out_split(config, data_path)
    source = f"generated: {config.n_rows} rows, seed {config.seed}"
    if data_path is not None:
        source = os.fspath(data_path)

    model = build_model(config)
    started = time.perf_counter()
    model.fit(x_train, y_train)
    fit_seconds = time.perf_counter() - started
    classes = [str(c) for c in model.classes_]
    positive = classes.index(POSITIVE_CLASS)
    test_scores = model.predict_proba(x_test)[:, positive]
    predicted = model.predict(x_test)
    metrics: dict[str, Any] = {
        "accuracy": float(accuracy_score(y_test, predicted)),
        # what a calibrated model expects its accuracy to be: live, it needs no labels
        "estimated_accuracy": estimate_accuracy(test_scores, predicted, classes=classes),
        "roc_auc": float(roc_auc_score(y_test == POSITIVE_CLASS, test_scores)),
        "precision": float(precision_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
        "recall": float(recall_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
        "f1": float(f1_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
        "n_train": len(x_train),
        "n_test": len(x_test),
        "positive_rate_test": float(np.mean(y_test == POSITIVE_CLASS)),
        "positive_class": POSITIVE_CLASS,
        "classes": classes,
        "features": config.features,
        "fit_seconds": round(fit_seconds, 4),
        "data": source,
        "sklearn_version": sklearn.__version__,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }

    train_scores = model.predict_proba(x_train)[:, positive]
    version, path, writing = _reserve_version(root)
    metrics["version"] = version
    try:
        # Raw (pre-one-hot) training features: the reference the live inputs are compared with;
        # the held-out accuracy is the reference for live accuracy from feedback.
        profile = build_profile(
            x_train,
            model=config.name,
            version=version,
            scores=train_scores,
            classes=classes,
            accuracy=metrics["accuracy"],
            estimated_accuracy=metrics["estimated_accuracy"],
        )
        profile.save(path / PROFILE_FILE)
        _write_atomic(path / MODEL_FILE, _dump(model))
        _write_atomic(path / METRICS_FILE, json.dumps(metrics, indent=2).encode() + b"\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # never leave a half-written version behind
        os.close(writing)
        raise
    try:
        _publish(root, version)
    finally:
        os.close(writing)
    if keep_versions is not None:
        try:
            prune_versions(root.parent, config.name, keep_versions)
        except OSError as error:  # published all the same; the next training prunes again
            log.warning("could not remove old versions of %s: %r", config.name, error)
    return TrainResult(name=config.name, version=version, path=path, metrics=metrics)


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


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: train one version and print what was trained."""
    parser = argparse.ArgumentParser(
        prog="python -m service.pipeline",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="config file (default: service/config.json)")
    parser.add_argument("--data", help="CSV of the Telco schema (default: generated data)")
    parser.add_argument("--models-dir", help="models directory (default: from the config)")
    parser.add_argument(
        "--keep",
        type=int,
        default=signals.live_versions(),
        metavar="N",
        help="then remove all but the N newest versions and LATEST's (default: the model "
        f"signals' live_versions, ${signals.LIVE_VERSIONS_ENV} or 2; 0 keeps all)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        keep = args.keep if args.keep > 0 else None
        result = train(args.config, args.data, args.models_dir, keep_versions=keep)
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    m = result.metrics
    print(
        f"trained {result.name} version {result.version} in {time.perf_counter() - started:.2f} s"
    )
    print(f"  saved to  {result.path}")
    print(f"  data      {m['data']}: {m['n_train']} train / {m['n_test']} held-out rows")
    print(
        f"  held-out  accuracy {m['accuracy']:.3f}  roc_auc {m['roc_auc']:.3f}  "
        f"precision {m['precision']:.3f}  recall {m['recall']:.3f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
