"""Train, evaluate and publish a versioned churn model, driven by ``service/config.json``.

A training splits the data, fits, evaluates on the held-out part, builds the reference profile
and publishes a new version (:mod:`service.published`: the models directory's layout, ``LATEST``
and pruning). Relative paths in the config file resolve against its directory.

Command line: ``python -m service.pipeline [--config F] [--data CSV] [--models-dir D] [--keep N]``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
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
from service.published import (
    LATEST_FILE,
    METRICS_FILE,
    MODEL_FILE,
    NEGATIVE_CLASS,
    POSITIVE_CLASS,
    PROFILE_FILE,
    LoadedModel,
    classify,
    latest_version,
    load_latest,
    prune_versions,
    publish,
    reserve_version,
    write_atomic,
)

__all__ = [
    "DEFAULT_CONFIG",
    # a published version's names, from service.published
    "LATEST_FILE",
    "MODEL_FILE",
    "NEGATIVE_CLASS",
    "POSITIVE_CLASS",
    "PROFILE_FILE",
    "Config",
    "LoadedModel",
    "TrainResult",
    "build_model",
    "classify",
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


def _dump(model: Pipeline) -> bytes:
    buffer = io.BytesIO()
    joblib.dump(model, buffer)
    return buffer.getvalue()


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
    metrics = _evaluate(model, x_test, y_test)
    metrics |= {
        "n_train": len(x_train),
        "n_test": len(x_test),
        "positive_rate_test": float(np.mean(y_test == POSITIVE_CLASS)),
        "positive_class": POSITIVE_CLASS,
        "classes": [str(c) for c in model.classes_],
        "features": config.features,
        "fit_seconds": round(fit_seconds, 4),
        "data": source,
        "sklearn_version": sklearn.__version__,
        "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    version, path = _write_version(root, config, model, x_train, metrics)
    if keep_versions is not None:
        try:
            prune_versions(root.parent, config.name, keep_versions)
        except OSError as error:  # published all the same; the next training prunes again
            log.warning("could not remove old versions of %s: %r", config.name, error)
    return TrainResult(name=config.name, version=version, path=path, metrics=metrics)


def _evaluate(model: Pipeline, x_test: pd.DataFrame, y_test: np.ndarray) -> dict[str, Any]:
    """Held-out accuracy, estimated accuracy, ROC AUC, precision, recall and F1 of a model."""
    classes = [str(c) for c in model.classes_]
    test_scores = model.predict_proba(x_test)[:, classes.index(POSITIVE_CLASS)]
    predicted = model.predict(x_test)
    return {
        "accuracy": float(accuracy_score(y_test, predicted)),
        # what a calibrated model expects its accuracy to be: live, it needs no labels
        "estimated_accuracy": estimate_accuracy(test_scores, predicted, classes=classes),
        "roc_auc": float(roc_auc_score(y_test == POSITIVE_CLASS, test_scores)),
        "precision": float(precision_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
        "recall": float(recall_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
        "f1": float(f1_score(y_test, predicted, pos_label=POSITIVE_CLASS)),
    }


def _write_version(
    root: Path, config: Config, model: Pipeline, x_train: pd.DataFrame, metrics: dict[str, Any]
) -> tuple[str, Path]:
    """Reserve the next version, write its profile, model and metrics, publish it:
    ``(version, directory)``. A failure leaves no version behind."""
    classes = [str(c) for c in model.classes_]
    train_scores = model.predict_proba(x_train)[:, classes.index(POSITIVE_CLASS)]
    version, path, writing = reserve_version(root)
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
        write_atomic(path / MODEL_FILE, _dump(model))
        write_atomic(path / METRICS_FILE, json.dumps(metrics, indent=2).encode() + b"\n")
    except BaseException:
        shutil.rmtree(path, ignore_errors=True)  # never leave a half-written version behind
        os.close(writing)
        raise
    try:
        publish(root, version)
    finally:
        os.close(writing)
    return version, path


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
