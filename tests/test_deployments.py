"""The deployments users run, each serving the real churn service with real servers.

gunicorn sync workers with ``preload_app`` off and on, gunicorn ``gthread`` and ``gevent``
workers (the repository's ``gunicorn.conf.py``), and uWSGI (``uwsgi.ini``), all restarting their
workers during the traffic (``max_requests``). For each: exact totals per route and status from
every worker, ``model_feature_reference_share`` equal to the profile's shares, and no drift alert
on undrifted traffic from a real Prometheus running the rules generated from the profile.

One Prometheus for the module, every deployment's port reserved up front (targets added later
would wait for Prometheus' first-scrape throttle again). The deployments run side by side; each
serves its own model version (a models directory holding that version only, identical models),
so the rules, which aggregate by model and version, see each deployment alone: a deployment
whose reference shares scrape as 0 cannot borrow another's through ``max by``.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_support import (
    MODEL,
    SECRET_KEY,
    ServiceServer,
    feature_rows,
    predict_body,
    profile_path,
    publish,
    range_samples,
    running,
    train_versions,
    write_rules,
)
from support import (
    UWSGI,
    GunicornServer,
    PrometheusServer,
    UwsgiServer,
    free_port,
    http_request,
    parallel,
    parse_samples,
    wait_until,
)
from test_gunicorn import RequestKey, assert_exact, expected_counts, scrape

from ml_wsgi_metrics import UNMATCHED
from ml_wsgi_metrics.profile import ReferenceProfile

pytestmark = pytest.mark.requires_tool("prometheus", "promtool", UWSGI)

WORKERS = 2
MAX_REQUESTS = "30"  # a worker restarts after 30-45 requests: about 8 restarts a deployment
ROWS, SINGLE = 400, 200  # rows predicted: 200 one per request, 200 in batches of 10
# Undrifted rows: every feature's and the score's PSI is at most 0.6 of its critical value over
# any 360 or more of them. The drift alert is gated on 360 rows (MIN_ROWS), so it judges this
# sample and not its small random prefixes (of which, over 20 features and many evaluations as
# the window fills, some would cross the critical value now and then: about 3-19 % of runs).
SEED = 2024
MIN_ROWS = 360
WINDOW, ALERT_FOR = "10m", "4s"  # the whole traffic fits in the window
SCRAPES = 6


@dataclass(frozen=True)
class Deployment:
    id: str
    server: str  # "gunicorn" or "uwsgi"
    env: dict[str, str] = field(default_factory=dict)
    preload: bool = False


DEPLOYMENTS = [
    Deployment("gunicorn-sync", "gunicorn"),
    Deployment("gunicorn-sync-preload", "gunicorn", preload=True),
    Deployment(
        "gunicorn-gthread",
        "gunicorn",
        {"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "4"},
    ),
    Deployment("gunicorn-gevent", "gunicorn", {"GUNICORN_WORKER_CLASS": "gevent"}),
    Deployment(
        "uwsgi-max-requests",
        "uwsgi",
        {"UWSGI_MIN_WORKER_LIFETIME": "0", "UWSGI_FORKBOMB_DELAY": "0"},
    ),
]


@dataclass
class Running:
    """One deployment: its model version, its server, and the traffic it was sent."""

    deployment: Deployment
    version: str
    profile: ReferenceProfile
    server: GunicornServer | UwsgiServer
    expected: dict[RequestKey, int] = field(default_factory=dict)
    started: float = 0.0
    done: float = 0.0
    error: BaseException | None = None


def _server(
    deployment: Deployment, models: Path, multiproc: Path, port: int
) -> GunicornServer | UwsgiServer:
    if deployment.server == "gunicorn":
        env = {"GUNICORN_MAX_REQUESTS": MAX_REQUESTS, "GUNICORN_MAX_REQUESTS_JITTER": "15"}
        return ServiceServer(
            models,
            multiproc_dir=multiproc,
            workers=WORKERS,
            preload=deployment.preload,
            port=port,
            env={**env, **deployment.env},
        )
    env = {
        "CHURN_MODELS_DIR": str(models),
        "ML_WSGI_METRICS_SECRET_KEY": SECRET_KEY,
        "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
        "UWSGI_MAX_REQUESTS": MAX_REQUESTS,
    }
    return UwsgiServer(
        "service.app:app",
        env={**env, **deployment.env},
        workers=WORKERS,
        port=port,
        startup_timeout=60.0,
    )


def _plan() -> list[tuple[str, str, bytes | None, RequestKey]]:
    """Undrifted predictions (single rows and batches), malformed bodies and unknown paths."""
    rows, _ = feature_rows(ROWS, seed=SEED)
    predict = ("POST", "/predict", "200")
    plan: list[tuple[str, str, bytes | None, RequestKey]] = [
        ("POST", "/predict", json.dumps(row).encode(), predict) for row in rows[:SINGLE]
    ]
    plan += [
        ("POST", "/predict", predict_body(rows[i : i + 10]), predict)
        for i in range(SINGLE, ROWS, 10)
    ]
    plan += [("POST", "/predict", b'{"rows": [', ("POST", "/predict", "400"))] * 10
    plan += [("GET", f"/no-such-page/{i}", None, ("GET", UNMATCHED, "404")) for i in range(10)]
    random.Random(SEED).shuffle(plan)
    return plan


def _drive(deployment: Running) -> None:
    """Send the plan from 8 clients (never retried); every answer has its planned status."""
    plan = _plan()

    def send(request: tuple[str, str, bytes | None, RequestKey]) -> str:
        method, path, body, _ = request
        headers = {"Content-Type": "application/json"} if body is not None else None
        status, _ = http_request(deployment.server.url + path, method, body, headers)
        return str(status)

    deployment.started = time.time()
    try:
        statuses = parallel(send, plan, threads=8)
        assert statuses == [key[2] for *_, key in plan]
        deployment.expected = expected_counts(plan)
    except BaseException as error:  # reported by this deployment's tests, not the others'
        deployment.error = error
    deployment.done = time.time()


@dataclass
class Matrix:
    prometheus: PrometheusServer
    deployments: dict[str, Running]


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    root = tmp_path_factory.mktemp("deployments")
    trained = root / "trained"
    profiles = train_versions(trained, len(DEPLOYMENTS))
    rules = write_rules(
        [profile_path(trained, p.version) for p in profiles],
        root / "rules.yml",
        window=WINDOW,
        alert_for=ALERT_FOR,
        min_rows=MIN_ROWS,
    )
    deployments = {}
    for deployment, profile in zip(DEPLOYMENTS, profiles, strict=True):
        models = root / deployment.id / "models"  # this version only: none registered beside it
        shutil.copytree(trained / MODEL / profile.version, models / MODEL / profile.version)
        publish(models, profile.version)
        server = _server(deployment, models, root / deployment.id / "multiproc", free_port())
        deployments[deployment.id] = Running(deployment, profile.version, profile, server)
    servers = [d.server for d in deployments.values()]
    prometheus = PrometheusServer(
        [s.address for s in servers], rule_files=[rules], startup_timeout=120.0
    )
    with running(prometheus, *servers):  # type: ignore[arg-type]
        parallel(_drive, list(deployments.values()), threads=len(deployments))
        yield Matrix(prometheus, deployments)


def _deployment(matrix: Matrix, deployment_id: str) -> Running:
    deployment = matrix.deployments[deployment_id]
    if deployment.error is not None:
        raise deployment.error
    return deployment


IDS = [pytest.param(d.id, id=d.id) for d in DEPLOYMENTS]


@pytest.mark.parametrize("deployment_id", IDS)
def test_exact_totals_from_every_worker(matrix: Matrix, deployment_id: str) -> None:
    """Every scrape, whichever worker serves it, counts exactly the requests sent."""
    deployment = _deployment(matrix, deployment_id)
    assert sum(deployment.expected.values()) == SINGLE + (ROWS - SINGLE) // 10 + 20
    for _ in range(SCRAPES):
        text = scrape(deployment.server.url)
        assert_exact(text, deployment.expected)
        predictions = sum(
            s.value
            for s in parse_samples(text)
            if s.name == "model_predictions_total" and s.labels["version"] == deployment.version
        )
        assert predictions == ROWS


@pytest.mark.parametrize("deployment_id", IDS)
def test_reference_shares_equal_the_profile(matrix: Matrix, deployment_id: str) -> None:
    """``model_{feature,score}_reference_share`` scrape as the profile's shares, every bin."""
    deployment = _deployment(matrix, deployment_id)
    profile = deployment.profile
    assert profile.score is not None
    expected = {
        (f.name, b): share
        for f in profile.features
        for b, share in zip(f.bins, f.shares, strict=True)
    }
    expected.update(
        {("score", b): s for b, s in zip(profile.score.bins, profile.score.shares, strict=True)}
    )
    for _ in range(SCRAPES):
        shares = {}
        for s in parse_samples(scrape(deployment.server.url)):
            if s.labels.get("version") != deployment.version:
                continue
            if s.name == "model_feature_reference_share":
                shares[(s.labels["feature"], s.labels["bin"])] = s.value
            elif s.name == "model_score_reference_share":
                shares[("score", s.labels["bin"])] = s.value
        assert shares == expected


@pytest.mark.parametrize("deployment_id", IDS)
def test_no_drift_alert_on_undrifted_traffic(matrix: Matrix, deployment_id: str) -> None:
    """Prometheus evaluates PSI over every row sent: neither drift alert is ever pending."""
    deployment = _deployment(matrix, deployment_id)
    prometheus = matrix.prometheus
    version = f'model="{MODEL}", version="{deployment.version}"'
    rows = f"ml:score_rows:increase{WINDOW}{{{version}}}"

    def evaluated_with_every_row() -> bool:
        samples = range_samples(prometheus, rows, deployment.done + 1)
        return any(value >= ROWS for _, values in samples for _, value in values)

    wait_until(
        evaluated_with_every_row,
        30,
        interval=0.5,
        message=f"Prometheus never evaluated {rows} over the {ROWS} rows sent",
    )
    for alert in ("ModelFeatureDrift", "ModelScoreDrift"):
        selector = f'ALERTS{{alertname="{alert}", {version}}}'
        assert range_samples(prometheus, selector, deployment.started) == [], alert
