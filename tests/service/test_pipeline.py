"""The training pipeline: versioned model directories, LATEST, loading, held-out quality."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import service.pipeline as pipeline
import service.published as published
from ml_wsgi_metrics.profile import ReferenceProfile
from service.data import generate
from service.pipeline import (
    DEFAULT_CONFIG,
    LoadedModel,
    TrainResult,
    latest_version,
    load_config,
    load_latest,
    main,
    train,
)

NAME = json.loads(DEFAULT_CONFIG.read_text())["name"]


def write_config(directory: Path, **changes: Any) -> Path:
    config = json.loads(DEFAULT_CONFIG.read_text()) | changes
    path = directory / "config.json"
    path.write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One training on the default config, shared by the read-only tests (its duration is
    measured by ``bench/bench_training.py``)."""
    return train(models_dir=tmp_path_factory.mktemp("models"))


def test_train_writes_a_versioned_model(trained: TrainResult) -> None:
    result = trained
    assert (result.name, result.version) == (NAME, "1")
    assert result.path == result.path.parent / "1"
    assert sorted(p.name for p in result.path.iterdir()) == [
        "metrics.json",
        "model.joblib",
        "profile.json",
    ]
    assert (result.path.parent / "LATEST").read_text().strip() == "1"
    assert json.loads((result.path / "metrics.json").read_text()) == result.metrics
    profile = ReferenceProfile.load(result.path / "profile.json")
    assert (profile.model, profile.version, profile.rows) == (NAME, "1", 5634)
    assert profile.classes == ("No", "Yes")
    assert profile.accuracy == result.metrics["accuracy"]
    assert profile.estimated_accuracy == result.metrics["estimated_accuracy"]
    assert [f.name for f in profile.features] == load_config().features  # raw, not one-hot


def test_held_out_quality_is_realistic(trained: TrainResult) -> None:
    metrics = trained.metrics
    assert abs(metrics["roc_auc"] - 0.84) <= 0.01  # README: about 0.84
    assert abs(metrics["accuracy"] - 0.81) <= 0.01  # README: about 0.81
    # logistic regression is well calibrated: its mean predicted-class probability is close
    assert abs(metrics["estimated_accuracy"] - metrics["accuracy"]) <= 0.02
    assert 0.5 <= metrics["precision"] <= 0.8
    assert 0.4 <= metrics["recall"] <= 0.75
    assert (metrics["n_train"], metrics["n_test"]) == (5634, 1409)


def test_load_latest_scores_raw_rows(trained: TrainResult) -> None:
    result = trained
    loaded = load_latest(result.path.parent.parent, NAME)
    assert isinstance(loaded, LoadedModel)
    assert loaded.version == "1"
    assert loaded.classes == ["No", "Yes"]
    assert loaded.feature_columns == load_config().features
    assert loaded.profile_path == result.path / "profile.json"
    rows = generate(300, seed=99)
    rows = rows.assign(TotalCharges=rows["TotalCharges"].where(rows.index % 50 != 0, " "))
    scores = loaded.predict_proba(rows)
    assert scores.shape == (300,)
    assert np.all((scores >= 0) & (scores <= 1))
    churned = (rows["Churn"] == "Yes").to_numpy()
    assert scores[churned].mean() > scores[~churned].mean() + 0.15
    predicted = loaded.model.predict(rows[loaded.feature_columns].assign(TotalCharges=0.0))
    assert set(predicted) <= {"No", "Yes"}


def test_unknown_category_is_ignored(trained: TrainResult) -> None:
    loaded = load_latest(trained.path.parent.parent, NAME)
    rows = generate(2, seed=5).assign(PaymentMethod="Bitcoin")
    assert loaded.predict_proba(rows).shape == (2,)


def test_second_training_bumps_version_and_latest(tmp_path: Path) -> None:
    first = train(models_dir=tmp_path)
    second = train(models_dir=tmp_path)
    assert (first.version, second.version) == ("1", "2")
    assert latest_version(tmp_path, NAME) == "2"
    assert load_latest(tmp_path, NAME).version == "2"
    assert (first.path / "model.joblib").exists()  # old versions are kept


def test_versions_count_up_from_the_highest(tmp_path: Path) -> None:
    (tmp_path / NAME / "9").mkdir(parents=True)
    assert train(models_dir=tmp_path).version == "10"
    assert train(models_dir=tmp_path).version == "11"


def _reserve(root: Path) -> str:
    version, _, writing = published.reserve_version(root)
    os.close(writing)
    return version


def test_concurrent_reservations_get_distinct_versions(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        versions = list(pool.map(_reserve, [tmp_path] * 16))
    assert sorted(versions, key=int) == [str(i) for i in range(1, 17)]


def _fake_versions(root: Path, complete: range, incomplete: range, latest: str) -> None:
    for number in complete:
        (root / str(number)).mkdir(parents=True)
        (root / str(number) / "metrics.json").write_text("{}")
    for number in incomplete:
        (root / str(number)).mkdir(parents=True)
    (root / "LATEST").write_text(f"{latest}\n")


def test_pruning_keeps_latest_and_the_newest_complete_versions(tmp_path: Path) -> None:
    # 1-5 published in turn, LATEST rolled back to 2; 6 left half-written by a dead trainer.
    _fake_versions(tmp_path / NAME, range(1, 6), range(6, 7), "2")
    assert pipeline.prune_versions(tmp_path, NAME, 2) == ["1", "3", "6"]
    assert sorted(p.name for p in (tmp_path / NAME).iterdir()) == [".lock", "2", "4", "5", "LATEST"]
    assert pipeline.prune_versions(tmp_path, NAME, 2) == []
    assert pipeline.prune_versions(tmp_path, NAME, 1) == ["4"]


@pytest.mark.parametrize("keep", [0, -1, True, 1.5])
def test_pruning_refuses_a_bad_keep(tmp_path: Path, keep: Any) -> None:
    with pytest.raises(ValueError, match="keep"):
        pipeline.prune_versions(tmp_path, NAME, keep)


WRITER = """
import sys
from pathlib import Path
import service.published as published
version, _, _ = published.reserve_version(Path(sys.argv[1]))
print(version, flush=True)
sys.stdin.read()  # holds the version's lock until the parent closes stdin
"""


def test_pruning_never_removes_a_version_another_process_is_writing(tmp_path: Path) -> None:
    root = tmp_path / NAME
    _fake_versions(root, range(1, 4), range(0), "3")
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(root)],
        cwd=Path(pipeline.__file__).parent.parent,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert writer.stdout is not None
        assert writer.stdout.readline().strip() == "4"
        assert pipeline.prune_versions(tmp_path, NAME, 1) == ["1", "2"]
        assert (root / "4").is_dir()  # being written: kept although not complete
    finally:
        writer.communicate(timeout=60)
    assert writer.returncode == 0
    assert pipeline.prune_versions(tmp_path, NAME, 1) == ["4"]  # its writer died without it


def test_training_prunes_what_no_server_registers(tmp_path: Path) -> None:
    for _ in range(4):
        result = train(models_dir=tmp_path, keep_versions=2)
    assert result.version == "4"
    assert sorted(p.name for p in (tmp_path / NAME).iterdir() if p.name.isdigit()) == ["3", "4"]
    assert load_latest(tmp_path, NAME).version == "4"


def test_latest_never_moves_backwards(tmp_path: Path) -> None:
    assert published.publish(tmp_path, "3")
    assert not published.publish(tmp_path, "2")
    assert latest_version(tmp_path.parent, tmp_path.name) == "3"


def test_failed_training_leaves_no_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("profile failed")

    monkeypatch.setattr(pipeline, "build_profile", broken)
    with pytest.raises(RuntimeError, match="profile failed"):
        train(models_dir=tmp_path)
    assert list((tmp_path / NAME).glob("[0-9]*")) == []
    assert latest_version(tmp_path, NAME) is None


def test_train_on_a_csv_with_relative_models_dir(tmp_path: Path) -> None:
    data = tmp_path / "customers.csv"
    generate(1500, seed=3).to_csv(data, index=False)
    config = write_config(tmp_path, models_dir="out", test_size=0.3)
    result = train(config, data_path=data)
    assert result.path == tmp_path / "out" / NAME / "1"
    assert (result.metrics["n_train"], result.metrics["n_test"]) == (1050, 450)
    assert result.metrics["data"] == str(data)


def test_load_latest_without_a_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train one first"):
        load_latest(tmp_path, NAME)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        pytest.param({"numeric": ["tenure", "Salary"]}, "Salary", id="unknown-column"),
        pytest.param({"categorical": ["Churn"]}, "Churn", id="target-as-feature"),
        pytest.param({"test_size": 1.5}, "test_size", id="test-size"),
        pytest.param({"name": "../x"}, "name", id="name"),
        pytest.param({"learning_rate": 0.1}, "learning_rate", id="unknown-key"),
    ],
)
def test_bad_config(tmp_path: Path, changes: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(write_config(tmp_path, **changes))


def test_config_missing_key(tmp_path: Path) -> None:
    config = json.loads(DEFAULT_CONFIG.read_text())
    del config["models_dir"]
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="models_dir"):
        load_config(path)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"trained {NAME} version 1" in out
    assert "roc_auc" in out
    assert main(["--models-dir", str(tmp_path), "--data", str(tmp_path / "nope.csv")]) == 2
    assert "nope.csv" in capsys.readouterr().err
