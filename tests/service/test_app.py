"""The churn service's happy paths: predictions, ids that verify, the results page, retraining
picked up by another instance without a restart, first-start training, health."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from support import wait_until

from ml_wsgi_metrics import _prediction_ids, signals
from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.testing import TEST_SECRET_KEY, isolated_signals, reset_signals
from service.app import ModelStore, create_app
from service.pipeline import latest_version, load_latest

NAME = "churn_logreg"
AppFactory = Callable[..., Flask]


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def predict(client: FlaskClient, payload: Any) -> dict[str, Any]:
    response = client.post("/predict", json=payload)
    assert response.status_code == 200, response.json
    return response.json


# -- POST /predict -------------------------------------------------------------------------


def test_predict_one_row(
    client: FlaskClient, raw_rows: list[dict[str, Any]], registry: CollectorRegistry
) -> None:
    body = predict(client, raw_rows[0])
    assert (body["model"], body["version"]) == (NAME, "1")
    [item] = body["predictions"]
    assert list(item) == ["customerID", "id", "churn_probability", "churn"]
    assert item["customerID"] == raw_rows[0]["customerID"]
    assert 0.0 <= item["churn_probability"] <= 1.0
    assert item["churn"] == ("Yes" if item["churn_probability"] > 0.5 else "No")
    assert total(registry, "model_predictions_total", model=NAME, version="1") == 1
    assert total(registry, "model_predictions_total", **{"class": item["churn"]}) == 1
    assert total(registry, "model_prediction_latency_seconds_count", model=NAME) == 1
    # The inputs were recorded too: one row in the tenure bins, one score.
    assert total(registry, "model_feature_bin_total", feature="tenure") == 1
    assert total(registry, "model_score_bin_total", model=NAME) == 1


@pytest.mark.parametrize(
    "wrap", [pytest.param(True, id="rows-object"), pytest.param(False, id="list")]
)
def test_predict_a_batch(
    client: FlaskClient, raw_rows: list[dict[str, Any]], registry: CollectorRegistry, wrap: bool
) -> None:
    body = predict(client, {"rows": raw_rows} if wrap else raw_rows)
    items = body["predictions"]
    assert [i["customerID"] for i in items] == [r["customerID"] for r in raw_rows]
    assert len({i["id"] for i in items}) == len(raw_rows)
    assert total(registry, "model_predictions_total") == len(raw_rows)
    assert total(registry, "model_prediction_latency_seconds_count") == 1  # one model call


def test_predict_accepts_the_raw_data_forms(
    client: FlaskClient, raw_rows: list[dict[str, Any]], registry: CollectorRegistry
) -> None:
    """Blank or numeric TotalCharges, no customerID, an unseen category (counted, not refused)."""
    base = {k: v for k, v in raw_rows[0].items() if k != "customerID"}
    rows = [
        base | {"tenure": 0, "TotalCharges": " "},
        base | {"TotalCharges": None, "tenure": 0},
        base | {"TotalCharges": 1234.5},
        base | {"Contract": "Three year"},
    ]
    body = predict(client, rows)
    assert len(body["predictions"]) == 4
    assert "customerID" not in body["predictions"][0]
    assert total(registry, "model_feature_unseen_total", feature="Contract") == 1
    assert total(registry, "model_feature_missing_total", feature="TotalCharges") == 0


def test_predictions_match_the_pipeline_model(
    client: FlaskClient, raw_rows: list[dict[str, Any]], models_dir: Path
) -> None:
    model = load_latest(models_dir, NAME)
    expected = model.predict_proba(pd.DataFrame(raw_rows).astype({"TotalCharges": str}))
    got = [p["churn_probability"] for p in predict(client, raw_rows)["predictions"]]
    assert got == pytest.approx(expected.tolist(), abs=1e-6)


# -- POST /feedback ------------------------------------------------------------------------


def test_prediction_ids_verify_through_feedback(
    client: FlaskClient, raw_rows: list[dict[str, Any]], registry: CollectorRegistry
) -> None:
    items = predict(client, raw_rows)["predictions"]
    first = client.post("/feedback", json={"id": items[0]["id"], "actual": "Yes"})
    assert first.status_code == 200
    assert first.json == {
        "model": NAME,
        "version": "1",
        "predicted": items[0]["churn"],
        "actual": "Yes",
        "correct": items[0]["churn"] == "Yes",
    }
    batch = [{"id": i["id"], "actual": "No"} for i in items[1:]]
    response = client.post("/feedback", json={"feedback": batch})
    assert response.status_code == 200
    assert (response.json["accepted"], response.json["rejected"]) == (len(batch), 0)
    assert total(registry, "model_confusion_total") == len(items)
    assert total(registry, "model_confusion_total", actual="Yes") == 1


def test_feedback_from_another_instance_counts(
    client: FlaskClient,
    make_app: AppFactory,
    raw_rows: list[dict[str, Any]],
    registry: CollectorRegistry,
) -> None:
    """Ids are self-contained: an instance that never saw the prediction scores it."""
    items = predict(client, raw_rows[:3])["predictions"]
    other = make_app().test_client()
    response = other.post("/feedback", json=[{"id": i["id"], "actual": "No"} for i in items])
    assert response.json["accepted"] == 3
    assert total(registry, "model_confusion_total", actual="No") == 3


def test_feedback_says_which_ids_are_bad(
    client: FlaskClient,
    raw_rows: list[dict[str, Any]],
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    good = predict(client, raw_rows[0])["predictions"][0]["id"]
    head, row = good.split(".")
    cases = {
        "tampered": f"{head}.{row[:-4]}{'AAAA' if row[-4:] != 'AAAA' else 'BBBB'}",
        "malformed": "not-a-prediction-id",
    }
    for reason, token in cases.items():
        response = client.post("/feedback", json={"id": token, "actual": "No"})
        assert response.status_code == 400
        assert response.json["reason"] == reason
        assert reason in response.json["error"]
    batch = client.post(
        "/feedback", json=[{"id": good, "actual": "No"}, {"id": cases["tampered"], "actual": "No"}]
    )
    assert batch.status_code == 200
    assert (batch.json["accepted"], batch.json["rejected"]) == (1, 1)
    assert batch.json["results"][1]["reason"] == "tampered"
    # Expired: the same id read 31 days later (the default maximum age is 30 days).
    later = time.time() + 31 * 86400
    monkeypatch.setattr(_prediction_ids, "time", types.SimpleNamespace(time=lambda: later))
    response = client.post("/feedback", json={"id": good, "actual": "No"})
    assert (response.status_code, response.json["reason"]) == (410, "expired")
    for reason, count in {"tampered": 2, "malformed": 1, "expired": 1}.items():
        assert total(registry, "model_feedback_rejected_total", reason=reason) == count


# -- GET /predict --------------------------------------------------------------------------


def model_series(registry: CollectorRegistry) -> dict[tuple[str, tuple[Any, ...]], float]:
    """Every ``model_*`` sample: ``(name, labels) -> value``."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name.startswith("model_")
    }


def test_results_page_draws_the_scores_and_records_nothing(
    client: FlaskClient, models_dir: Path, registry: CollectorRegistry
) -> None:
    assert client.get("/healthz").status_code == 200  # the model registered, series at zero
    before = model_series(registry)
    for _ in range(3):
        response = client.get("/predict")
        assert response.status_code == 200
    assert response.mimetype == "text/html"
    html = response.get_data(as_text=True)
    svg = re.search(r"<svg[^>]*>(.*?)</svg>", html, re.S)
    assert svg is not None
    heights = [
        float(h) for h in re.findall(r'<rect class="(?:stay|churn)"[^>]*height="([\d.]+)"', svg[1])
    ]
    assert sum(h > 0 for h in heights) >= 10
    # The accuracy shown is the held-out accuracy the pipeline measured: the same rows.
    metrics = json.loads((models_dir / NAME / "1" / "metrics.json").read_text())
    assert f"{metrics['accuracy'] * 100:.1f} %" in html
    assert re.search(r'id="confusion"', html)
    # Held-out rows are not live traffic: no live series moved, none was added.
    assert model_series(registry) == before
    assert total(registry, "model_predictions_total") == 0
    # Held-out accuracy has a series of its own, per version, from the profile.
    profile = ReferenceProfile.load(models_dir / NAME / "1" / "profile.json")
    assert profile.accuracy == metrics["accuracy"]
    reference = {"model": NAME, "version": "1"}
    assert registry.get_sample_value("model_reference_accuracy", reference) == profile.accuracy


# -- POST /pipeline ------------------------------------------------------------------------


def test_retraining_reaches_another_instance_without_a_restart(
    make_app: AppFactory,
    models_dir: Path,
    raw_rows: list[dict[str, Any]],
    registry: CollectorRegistry,
) -> None:
    first = make_app().test_client()
    second = make_app(MODEL_RELOAD_INTERVAL=0.2).test_client()
    assert second.get("/healthz").json["version"] == "1"
    old_id = predict(second, raw_rows[0])["predictions"][0]["id"]

    response = first.post("/pipeline", json={"seed": 11})
    assert response.status_code == 201
    assert response.json["version"] == "2"
    assert response.json["previous_version"] == "1"
    assert response.json["overrides"] == {"seed": 11}
    assert 0.7 < response.json["metrics"]["accuracy"] < 0.9
    assert latest_version(models_dir, NAME) == "2"
    assert first.get("/healthz").json["version"] == "2"  # the training worker: at once

    wait_until(  # the other one: at its next LATEST check (every 0.2 s)
        lambda: second.get("/healthz").json["version"] == "2",
        10,
        message="the second instance never served version 2",
    )
    assert predict(second, raw_rows[0])["version"] == "2"
    assert second.get("/healthz").json["live_versions"] == ["1", "2"]
    # Both versions are live in the metrics; feedback for the old version still counts.
    for version in ("1", "2"):
        assert total(registry, "model_predictions_total", version=version) == 1
    assert second.post("/feedback", json={"id": old_id, "actual": "No"}).status_code == 200
    assert total(registry, "model_confusion_total", version="1") == 1


def test_retraining_retires_the_oldest_version_and_removes_its_directory(
    client: FlaskClient,
    models_dir: Path,
    raw_rows: list[dict[str, Any]],
    registry: CollectorRegistry,
) -> None:
    """Two versions stay live (the model signals' default): a third retires the first, its
    series go, feedback for its ids is refused with its own reason (410, counted), and its
    directory is removed."""
    old_id = predict(client, raw_rows[0])["predictions"][0]["id"]
    for version in ("2", "3"):
        response = client.post("/pipeline", json={"n_rows": 500})
        assert (response.status_code, response.json["version"]) == (201, version)
    assert client.get("/healthz").json["live_versions"] == ["2", "3"]
    assert sorted(p.name for p in (models_dir / NAME).iterdir() if p.name.isdigit()) == ["2", "3"]
    versions = {s.labels.get("version") for m in registry.collect() for s in m.samples}
    assert versions == {None, "2", "3"}  # no series of version 1 left
    response = client.post("/feedback", json={"id": old_id, "actual": "No"})
    assert response.status_code == 410
    assert (response.json["code"], response.json["reason"]) == ("invalid_prediction_id", "retired")
    assert total(registry, "model_feedback_rejected_total", reason="retired") == 1
    new_id = predict(client, raw_rows[0])["predictions"][0]["id"]
    assert client.post("/feedback", json={"id": new_id, "actual": "No"}).status_code == 200


def test_retraining_without_a_body(client: FlaskClient) -> None:
    response = client.post("/pipeline")
    assert response.status_code == 201
    assert (response.json["version"], response.json["overrides"]) == ("2", {})


def test_a_restarted_worker_keeps_recent_versions_live(
    client: FlaskClient, make_app: AppFactory, raw_rows: list[dict[str, Any]]
) -> None:
    old_id = predict(client, raw_rows[0])["predictions"][0]["id"]
    assert client.post("/pipeline").status_code == 201
    reset_signals()  # a new process: nothing registered
    restarted = make_app(registry_=CollectorRegistry()).test_client()
    assert restarted.get("/healthz").json["live_versions"] == ["1", "2"]
    assert restarted.post("/feedback", json={"id": old_id, "actual": "Yes"}).status_code == 200


# -- first start ---------------------------------------------------------------------------


def _first_start(models_dir: str, results: Any) -> None:
    store = ModelStore(models_dir, secret_key=TEST_SECRET_KEY)
    results.put(store.current().version)


def test_workers_starting_together_train_one_model(tmp_path: Path) -> None:
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    workers = [
        context.Process(target=_first_start, args=(str(tmp_path), results)) for _ in range(4)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    assert sorted(results.get(timeout=5) for _ in workers) == ["1"] * 4
    assert sorted(p.name for p in (tmp_path / NAME).iterdir() if p.name.isdigit()) == ["1"]
    assert (tmp_path / ".prediction-id-key").exists() is False  # a key was given


def test_first_request_trains_and_shares_a_generated_key(
    tmp_path: Path,
    registry: CollectorRegistry,
    raw_rows: list[dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(signals.SECRET_KEY_ENV, raising=False)
    app = create_app(tmp_path, registry=registry)
    try:
        body = predict(app.test_client(), raw_rows[0])
        key = (tmp_path / ".prediction-id-key").read_text()
        assert len(key) >= 32
        assert (tmp_path / ".prediction-id-key").stat().st_mode & 0o077 == 0
        other = create_app(tmp_path, registry=registry).test_client()
        feedback = {"id": body["predictions"][0]["id"], "actual": "No"}
        assert other.post("/feedback", json=feedback).status_code == 200
    finally:
        reset_signals()


def test_the_app_keeps_the_signal_configuration_it_has_nothing_to_add_to(
    models_dir: Path, raw_rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the key in the environment and no registry given, the app does not reconfigure
    the model signals: a process (or a test's isolated_signals) decides where they go."""
    monkeypatch.setenv(signals.SECRET_KEY_ENV, TEST_SECRET_KEY)
    with isolated_signals() as registry:
        client = create_app(models_dir).test_client()
        items = predict(client, raw_rows[0])["predictions"]
        assert client.post("/feedback", json={"id": items[0]["id"], "actual": "No"}).json
        assert total(registry, "model_predictions_total") == 1
        assert total(registry, "model_confusion_total") == 1
    assert not (models_dir / ".prediction-id-key").exists()


# -- the rest ------------------------------------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json == {"status": "ok", "model": NAME, "version": "1", "live_versions": ["1"]}


def test_index_lists_the_routes(client: FlaskClient) -> None:
    assert "POST /predict" in client.get("/").json["routes"]


def test_importing_the_module_loads_nothing() -> None:
    import service.app

    assert "app" not in vars(service.app)  # only create_app and friends


def test_the_served_app_registers_its_model_before_the_first_request(tmp_path: Path) -> None:
    """gunicorn's ``service.app:app`` loads the model when the worker starts: every model
    series exists at zero before any request, so ``increase()`` sees the first predictions."""
    script = (
        "from prometheus_client import REGISTRY\n"
        "import service.app\n"
        "service.app.app\n"
        "labels = {'model': 'churn_logreg', 'version': '1', 'class': 'Yes'}\n"
        "print(REGISTRY.get_sample_value('model_predictions_total', labels))\n"
    )
    env = {**os.environ, "CHURN_MODELS_DIR": str(tmp_path / "models")}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0.0"


def test_errors_of_the_service_itself_are_json_too(app: Flask, tmp_path: Path) -> None:
    app.add_url_rule("/boom", view_func=lambda: 1 / 0)
    response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.json == {
        "error": "internal error: the service logged the details",
        "code": "internal",
    }
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    broken = create_app(blocked / "models", registry=CollectorRegistry(), secret_key="k")
    response = broken.test_client().get("/healthz")
    assert response.status_code == 503
    assert "no model to serve" in response.json["error"]
    reset_signals()
