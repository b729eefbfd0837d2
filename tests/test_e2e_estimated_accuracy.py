"""Issue 12 part 4 acceptance, end to end: accuracy estimated from scores alone, under gunicorn
(2 workers) and a real Prometheus running the generated rules, before any label arrives.

Two versions of the churn model (identical models) are live, each with its own series:

- version 2 (served first): 1,200 undrifted rows -> its estimated accuracy is within 0.02 of
  the held-out accuracy, and ``ModelEstimatedAccuracyDrop`` never fires;
- version 1 (served next): 600 rows the model is unsure of (scores in [0.3, 0.7], a covariate
  shift toward the decision boundary) -> the estimate drops and the alert fires, with no
  feedback sent.

The counter is checked exactly against the scores recomputed from the bytes sent; the recorded
series against the counter (every version registered before Prometheus' first scrape, so each
``increase()`` in the 1 h window starts at a zero and the ratio is exact).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import joblib
import numpy as np
import pytest
from e2e_support import (
    MODEL,
    ServiceServer,
    feature_rows,
    predict_body,
    profile_path,
    score_batches,
    serve_version,
    service_features,
    train_versions,
    write_rules,
)
from support import PrometheusServer, http_request, parallel, wait_until

from ml_wsgi_metrics.profile import ReferenceProfile
from service.pipeline import MODEL_FILE, POSITIVE_CLASS

pytestmark = pytest.mark.requires_tool("prometheus", "promtool")

WINDOW = "1h"
ALERT = "ModelEstimatedAccuracyDrop"
BATCH = 50


@dataclass
class Stack:
    service: ServiceServer
    prometheus: PrometheusServer
    models: Path
    profiles: dict[str, ReferenceProfile]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-estimate")
    models = root / "models"
    profiles = {p.version: p for p in train_versions(models, 2)}  # LATEST: 2
    rules = write_rules(
        [profile_path(models, v) for v in profiles],
        root / "rules.yml",
        window=WINDOW,
        ops_window="1m",
        alert_for="2s",
        ops_for="1m",
    )
    service = ServiceServer(
        models,
        multiproc_dir=root / "multiproc",
        workers=2,
        env={"ML_WSGI_METRICS_LIVE_VERSIONS": "2"},
    )
    with service:
        status, body = http_request(service.url + "/healthz")
        assert status == 200, body
        assert json.loads(body)["live_versions"] == ["1", "2"]  # both at zero before a scrape
        prometheus = PrometheusServer(
            [service.address], rule_files=[rules], evaluation_interval="1100ms"
        )
        with prometheus:
            yield Stack(service, prometheus, models, profiles)


def expected_correct(scores: np.ndarray) -> np.ndarray:
    """Each row's predicted-class probability: the service predicts "Yes" above 0.5."""
    return np.where(scores > 0.5, scores, 1 - scores)


def send(stack: Stack, version: str, rows: list[dict[str, object]]) -> np.ndarray:
    """Predict ``rows`` in batches; the scores the service computed, recomputed from the bytes
    sent (each answer checked against them)."""
    bodies = [predict_body(rows[i : i + BATCH]) for i in range(0, len(rows), BATCH)]
    url, json_body = stack.service.url + "/predict", {"Content-Type": "application/json"}
    answers = parallel(lambda body: http_request(url, "POST", body, json_body), bodies)
    scores = scores_of(stack, version, bodies)
    for (status, body), batch in zip(answers, np.split(scores, len(bodies)), strict=True):
        assert status == 200, body
        served = json.loads(body)
        assert served["version"] == version
        assert [p["churn_probability"] for p in served["predictions"]] == [
            round(float(s), 6) for s in batch
        ]
    return scores


def scores_of(stack: Stack, version: str, bodies: list[bytes]) -> np.ndarray:
    model = joblib.load(stack.models / MODEL / version / MODEL_FILE)
    columns = [str(c) for c in model.feature_names_in_]
    frames = [service_features(body, columns) for body in bodies]
    return np.concatenate(score_batches(model, frames, POSITIVE_CLASS))


def unsure_rows(stack: Stack, count: int) -> list[dict[str, object]]:
    """Rows of the usual population the model scores in [0.3, 0.7]."""
    rows, _ = feature_rows(6000, seed=2024)
    scores = scores_of(stack, "1", [predict_body(rows)])
    chosen = [row for row, s in zip(rows, scores, strict=True) if 0.3 <= s <= 0.7]
    assert len(chosen) >= count
    return chosen[:count]


def raw_estimate(stack: Stack, version: str) -> float | None:
    """The counters' own ratio (they started at zero with this service)."""
    selector = f'{{model="{MODEL}",version="{version}"}}'
    return stack.prometheus.value(
        f"sum(model_expected_correct_total{selector}) / sum(model_score_bin_total{selector})"
    )


def recorded(stack: Stack, version: str) -> float | None:
    return stack.prometheus.value(
        f'ml:estimated_accuracy:{WINDOW}{{model="{MODEL}",version="{version}"}}'
    )


def settle(stack: Stack, version: str, rows: int, python: float) -> float:
    """Wait until Prometheus scraped every row and the rule recorded the exact estimate."""
    total = f'sum(model_score_bin_total{{model="{MODEL}",version="{version}"}})'
    wait_until(lambda: stack.prometheus.value(total) == rows, 30, 0.2, "rows never scraped")
    value = raw_estimate(stack, version)
    assert value is not None and math.isclose(value, python, rel_tol=1e-12), (value, python)
    wait_until(
        lambda: math.isclose(recorded(stack, version) or 0.0, value, rel_tol=1e-9),
        30,
        0.3,
        f"ml:estimated_accuracy:{WINDOW} of version {version} never equalled {value}",
    )
    return value


def firing(stack: Stack, version: str) -> list[dict[str, object]]:
    return stack.prometheus.query(f'ALERTS{{alertname="{ALERT}",version="{version}"}}')


def test_estimate_holds_on_undrifted_traffic_and_drops_before_any_label(stack: Stack) -> None:
    held_out = stack.profiles["2"].accuracy
    assert held_out is not None
    rows, _ = feature_rows(1200, seed=1007)
    undrifted = settle(stack, "2", 1200, float(expected_correct(send(stack, "2", rows)).mean()))
    assert abs(undrifted - held_out) <= 0.02, (undrifted, held_out)

    serve_version(stack.models, "1", [stack.service])
    unsure = unsure_rows(stack, 600)
    shifted = settle(stack, "1", 600, float(expected_correct(send(stack, "1", unsure)).mean()))
    reference = stack.profiles["1"].estimated_accuracy
    assert reference is not None and shifted < reference - 0.05

    wait_until(
        lambda: any(a["metric"]["alertstate"] == "firing" for a in firing(stack, "1")),
        60,
        0.5,
        f"{ALERT} never fired for version 1",
    )
    labels = stack.prometheus.value(f'sum(model_confusion_total{{model="{MODEL}"}})')
    assert labels == 0  # no feedback was sent: the alert came before any label
    history = stack.prometheus.query(f'ALERTS{{alertname="{ALERT}",version="2"}}[1h]')
    assert history == []  # the undrifted version's alert never even went pending
