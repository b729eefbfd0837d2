"""Issue 3 acceptance, end to end: model signals of the churn service under gunicorn (4 workers)
turned into PSI, means, standard deviations, accuracy and alerts by a real Prometheus running
the rules ``python -m ml_wsgi_metrics rules`` generates. No mocks.

One gunicorn, one Prometheus (scraping and evaluating every second) for the module. Three model
versions are live at once and each gets its own traffic, in its own series:

- version 1: 1,200 undrifted rows, feedback with the true labels  -> no alert
- version 2: the same size, ``MonthlyCharges`` x 1.3, true labels  -> ``ModelFeatureDrift``
- version 3: 1,200 undrifted rows, every label flipped             -> ``ModelAccuracyDrop``

Why the PromQL values are exact: ``increase()`` over ``[T - W, T]`` scales each series' raw
increase by ``(sampled + to_start + to_end) / sampled``. The service registers every live
version (all its series at zero) before Prometheus starts, so every model series' first sample
is a zero from Prometheus' first scrape (checked). The rules' window is an hour: for every
evaluation ``T`` of the module it starts before the traffic, so each series' first sample in
it is that zero (``to_start`` is cut to the zero point: 0) and all share ``to_end``: one factor
for all, which cancels in every ratio (shares, mean, E[x^2], accuracy). Every evaluation after
a version's traffic was scraped is therefore exact, however long the traffic took; they are
compared with the Python computation on the very bytes sent (see
``../shared/notes/prometheus.md``).

But for one case: Prometheus runs each rule of a group as its own query, so a scrape committed
while a group is being evaluated is seen by its later rules and not by its earlier ones; their
factors then differ (by about a second over the series' age) and so do the ratios built from
both. Such an evaluation is recognised by the rules' own counts: every row was labelled, so the
group's first ``increase()`` (the feature bins: rows) and its last (the confusion matrix:
labels) count the same number unless they saw different scrapes. Every evaluation that saw one
scrape is compared; rules are evaluated every 1.1 s against 1 s scrapes so that their phase
turns and no run sees only mixed evaluations.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import pytest
from e2e_support import (
    MODEL,
    Answer,
    Expectation,
    ServiceServer,
    assert_close,
    feature_rows,
    parallel,
    pinned_request,
    predict_body,
    profile_path,
    range_samples,
    score_batches,
    serve_version,
    service_features,
    train_versions,
    write_rules,
)
from itsdangerous import URLSafeTimedSerializer
from support import FEEDBACK_TOKEN, PrometheusServer, bearer, http_request, wait_until

from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.signals import REJECT_REASONS
from service.pipeline import MODEL_FILE, POSITIVE_CLASS

pytestmark = pytest.mark.requires_tool("prometheus", "promtool")

WINDOW, WINDOW_SECONDS = "1h", 3600  # the rules' --window: longer than the module runs
ALERT_FOR = 4  # seconds a drift or accuracy condition holds before the alert fires
#: Relative tolerance of every recorded value against Python (absolute for values below 1:
#: a PSI near 0 is a sum of near-zero terms). The largest errors seen were about 3e-14.
TOLERANCE = 1e-13
#: Evaluations compared per version, at least.
EVALUATIONS = 3
ROWS, BATCH = 1200, 50
VERSIONS = ("1", "2", "3")
# Samples chosen once for a clear margin: undrifted, every feature's PSI over the whole sample
# is at most 0.6 of its critical value. Drifted: MonthlyCharges x 1.3 empties its lowest
# reference bin (the PSI rule's "or 0 * share" fill matters) and a tenth of PaymentMethod is a
# category never seen in training (the unseen bin, reference share 0, clamped).
TRAFFIC: dict[str, dict[str, Any]] = {
    "1": {"seed": 1007},
    "2": {"seed": 1002, "scale": {"MonthlyCharges": 1.3}, "unseen": {"PaymentMethod": "Bitcoin"}},
    "3": {"seed": 1003, "flip": True},
}
FLIPPED = {"Yes": "No", "No": "Yes"}


@dataclass
class Phase:
    """The traffic of one version and when it happened (wall clock, as Prometheus stamps)."""

    version: str
    expectation: Expectation
    started: float = 0.0
    scraped: float = 0.0  # every prediction and label seen by Prometheus by then
    predictions: list[tuple[bytes, Answer]] = field(default_factory=list)
    feedback: list[tuple[int, Answer]] = field(default_factory=list)  # (predicting pid, answer)

    def exact_interval(self) -> tuple[float, float]:
        """Evaluation times whose window starts before the traffic (at least a scrape before)
        and ends after everything was scraped."""
        return self.scraped + 1.0, self.started + WINDOW_SECONDS - 1.5


@dataclass
class Stack:
    service: ServiceServer
    prometheus: PrometheusServer
    models: Path
    profiles: dict[str, ReferenceProfile]


@dataclass
class Scenario:
    stack: Stack
    visible: float  # Prometheus' first scrape: every series of every version at zero
    phases: dict[str, Phase]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The service (4 workers, versions 1-3 trained, 3 served) and Prometheus with the rules."""
    root = tmp_path_factory.mktemp("e2e-signals")
    models = root / "models"
    profiles = {p.version: p for p in train_versions(models, len(VERSIONS))}
    rules = write_rules(
        [profile_path(models, v) for v in VERSIONS],
        root / "rules.yml",
        window=WINDOW,
        ops_window="1m",
        alert_for=f"{ALERT_FOR}s",
        ops_for="1m",
    )
    service = ServiceServer(
        models,
        multiproc_dir=root / "multiproc",
        workers=4,
        env={"ML_WSGI_METRICS_LIVE_VERSIONS": str(len(VERSIONS))},  # all three live at once
    )
    with service:
        # Every live version registered (all its series at zero) before the first scrape.
        status, body = http_request(service.url + "/healthz")
        assert status == 200, body
        assert json.loads(body)["live_versions"] == list(VERSIONS)
        prometheus = PrometheusServer(
            [service.address], rule_files=[rules], evaluation_interval="1100ms"
        )
        with prometheus:
            yield Stack(service, prometheus, models, profiles)


def _model_series(text: str) -> int:
    return sum(1 for line in text.splitlines() if f'model="{MODEL}"' in line)


def _first_scrape(stack: Stack) -> float:
    """When Prometheus first scraped the service, after checking that every model series
    was in that scrape, at zero (the premise of the exact increase())."""
    _, text = http_request(stack.service.url + "/metrics")
    expected = _model_series(text.decode())
    selector = f'{{__name__=~"model_.+", model="{MODEL}"}}'
    wait_until(
        lambda: stack.prometheus.value(f"count({selector})") == expected,
        30,
        interval=0.2,
        message=f"Prometheus never saw the {expected} model series",
    )
    (up,) = stack.prometheus.query("up[1h]")
    first = float(up["values"][0][0])
    series = stack.prometheus.query(f"{selector}[1h]")
    assert len(series) == expected
    for found in series:
        stamp, value = found["values"][0]
        assert float(stamp) == first, f"{found['metric']} first scraped at {stamp}, not {first}"
        if found["metric"]["__name__"].endswith(("_total", "_bucket", "_count", "_sum")):
            assert float(value) == 0, found["metric"]  # counters; gauges hold the profile's
    return first


def _traffic(stack: Stack, phase: Phase) -> None:
    """Predictions from 4 concurrent clients, then feedback for each prediction call posted
    to a worker other than the one that served it."""
    setting = TRAFFIC[phase.version]
    rows, labels = feature_rows(
        ROWS, setting["seed"], scale=setting.get("scale"), unseen=setting.get("unseen")
    )
    bodies = [predict_body(rows[i : i + BATCH]) for i in range(0, ROWS, BATCH)]
    phase.started = time.time()
    answers = parallel(lambda body: pinned_request(stack.service, "POST", "/predict", body), bodies)
    phase.predictions = list(zip(bodies, answers, strict=True))

    posts = []
    for i, (_, answer) in enumerate(phase.predictions):
        assert answer.status == 200, answer.body
        items = answer.json()["predictions"]
        actual = labels[i * BATCH : i * BATCH + len(items)]
        if setting.get("flip"):
            actual = [FLIPPED[label] for label in actual]
        feedback = [{"id": p["id"], "actual": a} for p, a in zip(items, actual, strict=True)]
        posts.append((answer.pid, json.dumps({"feedback": feedback}).encode()))
        for item, label in zip(items, actual, strict=True):
            phase.expectation.label(item["churn"], label)

    def post(item: tuple[int, bytes]) -> tuple[int, Answer]:
        pid, body = item
        return pid, pinned_request(
            stack.service,
            "POST",
            "/feedback",
            body,
            accept=lambda other: other != pid,
            headers=bearer(FEEDBACK_TOKEN),
        )

    phase.feedback = parallel(post, posts)
    version = phase.version
    predicted = f'sum(model_predictions_total{{version="{version}"}})'
    labelled = f'sum(model_confusion_total{{version="{version}"}})'
    wait_until(
        lambda: (
            stack.prometheus.value(predicted) == ROWS and stack.prometheus.value(labelled) == ROWS
        ),
        20,
        interval=0.1,
        message=f"version {version}: Prometheus never saw all {ROWS} predictions and labels",
    )
    phase.scraped = time.time()


def _python_side(stack: Stack, phase: Phase) -> None:
    """The features and scores the service recorded, recomputed from the bytes sent."""
    model = joblib.load(stack.models / MODEL / phase.version / MODEL_FILE)
    columns = [str(c) for c in model.feature_names_in_]
    frames = [service_features(body, columns) for body, _ in phase.predictions]
    for frame, scores, (_, answer) in zip(
        frames, score_batches(model, frames, POSITIVE_CLASS), phase.predictions, strict=True
    ):
        served = answer.json()
        assert served["version"] == phase.version, "a worker served another version"
        rounded = [p["churn_probability"] for p in served["predictions"]]
        assert [round(float(s), 6) for s in scores] == rounded
        phase.expectation.add(frame, scores)


@pytest.fixture(scope="module")
def scenario(stack: Stack) -> Scenario:
    """Send each version's traffic in turn, then wait until the rules were evaluated long
    enough after the last of it for a condition that held to fire an alert, and each version
    has :data:`EVALUATIONS` evaluations that saw one scrape."""
    visible = _first_scrape(stack)
    phases: dict[str, Phase] = {}
    for version in ("3", "1", "2"):  # 3 is served first: it is LATEST
        if version != "3":
            serve_version(stack.models, version, [stack.service])
        phase = phases[version] = Phase(version, Expectation(stack.profiles[version]))
        _traffic(stack, phase)
    for phase in phases.values():
        _python_side(stack, phase)
    settled = max(phase.scraped for phase in phases.values()) + ALERT_FOR + 2
    scenario = Scenario(stack, visible, phases)

    def evaluated() -> bool:
        found = [_one_scrape_evaluations(scenario, v) for v in VERSIONS]
        return all(len(times) >= EVALUATIONS and max(times) >= settled for times in found)

    wait_until(evaluated, 60, interval=0.5, message="too few evaluations saw one scrape")
    return scenario


def _recorded(scenario: Scenario, name: str, version: str) -> dict[str, dict[float, float]]:
    """Recorded values of ``name`` for ``version`` evaluated in the version's exact interval:
    ``{series: {evaluation time: value}}``."""
    low, high = scenario.phases[version].exact_interval()
    found = {}
    selector = f'{name}{{model="{MODEL}", version="{version}"}}'
    for labels, samples in range_samples(scenario.stack.prometheus, selector, low, high):
        key = labels.get("feature") or labels.get("class") or ""
        found[key] = dict(samples)
    return found


def _one_scrape_evaluations(scenario: Scenario, version: str) -> set[float]:
    """The evaluations of ``version``'s rules in its exact interval whose first and last
    ``increase()`` saw the same scrapes: the rows of every feature equal the labels."""
    rows = _recorded(scenario, f"ml:feature_rows:increase{WINDOW}", version)
    (labels,) = _recorded(scenario, f"ml:labels:increase{WINDOW}", version).values() or [{}]
    return {
        t
        for t, counted in labels.items()
        if all(math.isclose(r.get(t, math.nan), counted, rel_tol=1e-12) for r in rows.values())
    }


@pytest.mark.parametrize("version", VERSIONS)
def test_psi_mean_stddev_accuracy_equal_python(scenario: Scenario, version: str) -> None:
    """PSI (every feature and the score), mean and stddev (numeric features and the score),
    accuracy, precision and recall from the recording rules equal Python within
    :data:`TOLERANCE`, at every evaluation after the version's traffic was scraped."""
    phase = scenario.phases[version]
    w = WINDOW
    errors: dict[str, float] = {}
    evaluations = _one_scrape_evaluations(scenario, version)
    assert len(evaluations) >= EVALUATIONS

    def check(statistic: str, recorded: str, expected: dict[str, float]) -> None:
        values = _recorded(scenario, recorded, version)
        assert set(values) == set(expected), f"{recorded}: series {sorted(values)}"
        for key, python in expected.items():
            assert evaluations <= set(values[key]), f"{recorded}{{{key}}}: evaluations missing"
            for value in (values[key][t] for t in evaluations):
                error = assert_close(
                    f"{recorded}{{{key}}}", value, python, rel=TOLERANCE, abs_=TOLERANCE
                )
                errors[statistic] = max(errors.get(statistic, 0.0), error)

    distributions = phase.expectation.distributions()
    for statistic in ("psi", "mean", "stddev"):
        features = {f: v for (s, f), v in distributions.items() if s == statistic and f != "score"}
        check(statistic, f"ml:feature_{statistic}:{w}", features)
        check(statistic, f"ml:score_{statistic}:{w}", {"": distributions[(statistic, "score")]})
    assert len([k for k in distributions if k[0] == "psi"]) == 20  # 19 features + the score
    accuracy = phase.expectation.accuracy()
    check("accuracy", f"ml:accuracy:{w}", {"": accuracy["accuracy"]})
    for kind in ("precision", "recall"):
        expected = {k.split(":")[1]: v for k, v in accuracy.items() if k.startswith(kind)}
        check(kind, f"ml:{kind}:{w}", expected)
    summary = ", ".join(f"{k} {v:.1e}" for k, v in errors.items())
    mixed = len(_recorded(scenario, f"ml:labels:increase{w}", version)[""]) - len(evaluations)
    print(
        f"\nversion {version}: {len(evaluations)} evaluations compared ({mixed} saw two "
        f"scrapes); largest relative errors: {summary}"
    )


def _alert_features(scenario: Scenario, alert: str, version: str, state: str) -> set[str]:
    selector = (
        f'ALERTS{{alertname="{alert}", model="{MODEL}", version="{version}", alertstate="{state}"}}'
    )
    samples = range_samples(scenario.stack.prometheus, selector, scenario.visible)
    return {labels.get("feature", "") for labels, _ in samples}


def _wait_firing(scenario: Scenario, alert: str, version: str, feature: str) -> None:
    wait_until(
        lambda: feature in _alert_features(scenario, alert, version, "firing"),
        30,
        interval=0.5,
        message=f"{alert} never fired for version {version} {feature}",
    )


def _never_active(scenario: Scenario, alert: str, version: str) -> None:
    """Neither firing at any time, nor even pending while the window held the whole sample."""
    assert _alert_features(scenario, alert, version, "firing") == set()
    low, high = scenario.phases[version].exact_interval()
    selector = f'ALERTS{{alertname="{alert}", version="{version}"}}'
    until = min(high, time.time())
    assert range_samples(scenario.stack.prometheus, selector, low, until) == []


def test_drift_alert_fires_on_drift_and_not_on_undrifted_traffic(scenario: Scenario) -> None:
    """``MonthlyCharges`` x 1.3 fires ``ModelFeatureDrift`` for it; the undrifted samples of
    the same size fire no drift alert, for any feature or the score."""
    _wait_firing(scenario, "ModelFeatureDrift", "2", "MonthlyCharges")
    for version in ("1", "3"):
        _never_active(scenario, "ModelFeatureDrift", version)
        _never_active(scenario, "ModelScoreDrift", version)


def test_accuracy_alert_fires_on_flipped_labels_only(scenario: Scenario) -> None:
    """Flipped ground truth fires ``ModelAccuracyDrop``; the true labels do not."""
    _wait_firing(scenario, "ModelAccuracyDrop", "3", "")
    _never_active(scenario, "ModelAccuracyDrop", "1")
    assert scenario.phases["3"].expectation.accuracy()["accuracy"] < 0.3
    assert scenario.phases["1"].expectation.accuracy()["accuracy"] > 0.75


def test_feedback_counts_whichever_worker_receives_it(scenario: Scenario) -> None:
    """Every label was posted to a worker other than the one that made the prediction, and
    every one counts: the confusion counters hold exactly the labels sent, per cell."""
    prometheus = scenario.stack.prometheus
    workers = set(scenario.stack.service.worker_pids())
    for version, phase in scenario.phases.items():
        predicting = {answer.pid for _, answer in phase.predictions}
        assert predicting <= workers and len(predicting) >= 2
        for pid, answer in phase.feedback:
            assert answer.status == 200, answer.body
            assert answer.pid != pid
            assert answer.json()["accepted"] == BATCH and answer.json()["rejected"] == 0
        cells = prometheus.query(
            f'sum by (predicted, actual) (model_confusion_total{{version="{version}"}})'
        )
        counted = {
            (c["metric"]["predicted"], c["metric"]["actual"]): int(c["value"][1]) for c in cells
        }
        expected = phase.expectation.pairs
        assert {k: v for k, v in counted.items() if v} == {k: v for k, v in expected.items() if v}
        assert sum(expected.values()) == ROWS


def _tamper(token: str) -> str:
    """The same token with one character of its signature changed."""
    head, signature = token.rsplit(".", 1)
    swapped = "A" if signature[5] != "A" else "B"
    return f"{head}.{signature[:5]}{swapped}{signature[6:]}"


def test_tampered_feedback_is_rejected_and_counted(scenario: Scenario) -> None:
    """A prediction id with a changed signature, or with a changed payload, is a 400 naming
    the reason, counted in ``model_feedback_rejected_total{reason="tampered"}``; nothing else
    moves. A token that is not one is ``malformed``."""
    stack = scenario.stack
    _, answer = scenario.phases["1"].predictions[0]
    token = answer.json()["predictions"][0]["id"]
    payload, rest = token.split(".", 1)
    forged_payload = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    cases = [
        (_tamper(token), "tampered"),
        (f"{forged_payload}.{rest}", "tampered"),
        (URLSafeTimedSerializer("another key").dumps([MODEL, "1", "Yes", 0, 0, "0"]), "tampered"),
        ("not-a-prediction-id", "malformed"),
    ]
    query = "sum by (reason) (model_feedback_rejected_total)"

    def rejected() -> dict[str, float]:
        return {r["metric"]["reason"]: float(r["value"][1]) for r in stack.prometheus.query(query)}

    before = rejected()
    confusion = stack.prometheus.value("sum(model_confusion_total)")
    for bad, reason in cases:
        body = json.dumps({"id": bad, "actual": "Yes"}).encode()
        answer = pinned_request(
            stack.service, "POST", "/feedback", body, headers=bearer(FEEDBACK_TOKEN)
        )
        assert answer.status == 400, answer.body
        error: dict[str, Any] = answer.json()
        assert error["code"] == "invalid_prediction_id" and error["reason"] == reason, error
        assert reason in error["error"]
    expected = dict(before)
    for _, reason in cases:
        expected[reason] = expected.get(reason, 0.0) + 1
    wait_until(lambda: rejected() == expected, 15, interval=0.2, message=f"{rejected()}")
    assert set(expected) == set(REJECT_REASONS)  # every reason exists, at zero or more
    assert stack.prometheus.value("sum(model_confusion_total)") == confusion
