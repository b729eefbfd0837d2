"""Issue 12, parts 1 and 2: a fleet through agents and remote write, alerts delivered by
Alertmanager. No mocks.

Three instances of the churn service (gunicorn, 2 workers each) on 127.0.0.1, each scraped
every second by its own agent-mode Prometheus running ``prometheus/agent.yml`` (labelled
``host=host-<i>``), all remote-writing to one central Prometheus running
``prometheus/central.yml`` with the generated rules (1 h window, drift alerts after 2 s),
which alerts a real Alertmanager running ``alertmanager.yml``, whose webhook is a small HTTP
server of the test. Two model versions are live at once, each with its own series:

- version 2 (undrifted): 300 rows per instance, different rows on each, in two rounds; the
  second round is sent while the agent of ``host-2`` is stopped for 30 s;
- version 1 (drifted, ``MonthlyCharges`` x 1.3): the same size, the same 300 rows on each
  instance (see :func:`test_fleet_psi_from_the_central_rules_equals_the_pooled_rows` for why).

Every version's series exist at zero before the first scrape, and the rules' window starts
before the traffic: each series' first sample in it is that zero.
"""

from __future__ import annotations

import json
import math
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import pandas as pd
import pytest
import yaml
from e2e_support import (
    MODEL,
    ServiceServer,
    assert_close,
    bin_counts,
    feature_rows,
    parallel,
    predict_body,
    profile_path,
    psi,
    range_samples,
    running,
    score_batches,
    serve_version,
    service_features,
    train_versions,
    write_rules,
)
from fleet_support import (
    AGENT_FILE,
    ALERTMANAGER,
    ALERTMANAGER_FILE,
    CENTRAL_FILE,
    AgentServer,
    AlertmanagerServer,
    CentralServer,
    Webhook,
)
from support import FEEDBACK_TOKEN, REPO, bearer, http_request, parse_samples, wait_until

from ml_wsgi_metrics import UNMATCHED
from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.rules import critical_value, effective_bins
from service.pipeline import MODEL_FILE, POSITIVE_CLASS

pytestmark = pytest.mark.requires_tool("prometheus", "promtool", "amtool", ALERTMANAGER)

HOSTS = 3
UNDRIFTED, DRIFTED = "2", "1"  # 2 is LATEST when the fleet starts: served first
WINDOW = "1h"  # longer than the module runs: every evaluation's window starts before traffic
ALERT_FOR = 2  # seconds
BATCH = 50
ROUNDS = (4, 2)  # batches per instance: before the outage, during it
OUTAGE = 30.0  # seconds the agent of host-2 is stopped
#: PSI of the central rules against Python's, for the drifted version (relative; absolute
#: below 1): the acceptance criterion.
TOLERANCE = 1e-6
EVALUATIONS = 3  # consistent rule evaluations compared, at least
#: Chosen once for a clear margin: over the 900 undrifted rows every feature's and the
#: score's PSI is at most 0.3 of its critical value (0.5 is typical of random seeds).
UNDRIFTED_SEED = 1203
Key = tuple[str, str, str]  # (method, route, status)


# -- the fleet ----------------------------------------------------------------------------------


@dataclass
class Fleet:
    root: Path
    models: Path
    profiles: dict[str, ReferenceProfile]
    services: list[ServiceServer]
    agents: list[AgentServer]
    central: CentralServer
    alertmanager: AlertmanagerServer
    webhook: Webhook
    stack: ExitStack

    def agent(self, index: int) -> AgentServer:
        """A new agent for instance ``index`` (not started), on its write-ahead log."""
        return AgentServer(
            self.services[index].address,
            central=self.central.url,
            host=f"host-{index}",
            storage=self.root / f"agent-{index}",
        )


def _model_series(url: str) -> int:
    _, text = http_request(url + "/metrics")
    return sum(1 for line in text.decode().splitlines() if f'model="{MODEL}"' in line)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    models = root / "models"
    profiles = {p.version: p for p in train_versions(models, 2)}  # LATEST = 2
    rules = write_rules(
        [profile_path(models, v) for v in ("1", "2")],
        root / "churn_rules.yml",
        window=WINDOW,
        ops_window="1m",
        alert_for=f"{ALERT_FOR}s",
        ops_for="1h",  # no "no predictions" alert for the version served second
    )
    services = [
        ServiceServer(models, multiproc_dir=root / f"multiproc-{i}", workers=2, preload=True)
        for i in range(HOSTS)
    ]
    with ExitStack() as stack:
        webhook = stack.enter_context(Webhook())
        alertmanager = AlertmanagerServer(webhook.url)
        central = CentralServer(rule_files=[rules], alertmanager=alertmanager.address)
        fleet = Fleet(root, models, profiles, services, [], central, alertmanager, webhook, stack)
        fleet.agents = [fleet.agent(i) for i in range(HOSTS)]
        stack.enter_context(running(alertmanager, central, *services, *fleet.agents))
        expected = {f"host-{i}": _model_series(s.url) for i, s in enumerate(services)}
        query = f'count by (host) ({{__name__=~"model_.+", model="{MODEL}"}})'
        wait_until(
            lambda: central.values(query, "host") == {(h,): n for h, n in expected.items()},
            60,
            interval=0.2,
            message=f"the central server never saw every model series: {expected}",
        )
        yield fleet


# -- traffic ------------------------------------------------------------------------------------


@dataclass
class Sent:
    """What was sent to the fleet: requests by host, rows by host, and the features and
    scores each version recorded (computed from the bytes sent, as the service does)."""

    requests: dict[str, Counter[Key]] = field(default_factory=dict)
    rows: Counter[str] = field(default_factory=Counter)
    frames: dict[str, list[pd.DataFrame]] = field(default_factory=dict)
    scores: dict[str, list[float]] = field(default_factory=dict)

    def count(self, host: str, key: Key, n: int = 1) -> None:
        self.requests.setdefault(host, Counter())[key] += n

    def by_host(self) -> dict[tuple[str, ...], float]:
        return {
            (host, *key): float(n)
            for host, sent in self.requests.items()
            for key, n in sent.items()
        }


def _send(url: str, method: str, path: str, body: bytes | None, token: bool = True) -> Any:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    if path == "/feedback" and token:
        headers |= bearer(FEEDBACK_TOKEN)
    return http_request(url + path, method, body, headers)


def _predict(
    fleet: Fleet, sent: Sent, version: str, batches: Sequence[Sequence[bytes]]
) -> list[list[str]]:
    """``batches[i]``: the ``/predict`` bodies for instance ``i``, sent from one thread per
    instance; returns each instance's prediction ids."""
    model = joblib.load(fleet.models / MODEL / version / MODEL_FILE)
    columns = [str(c) for c in model.feature_names_in_]

    def send(index: int) -> list[str]:
        ids = []
        for body in batches[index]:
            status, answer = _send(fleet.services[index].url, "POST", "/predict", body)
            assert status == 200, answer
            served = json.loads(answer)
            assert served["version"] == version
            ids += [p["id"] for p in served["predictions"]]
        return ids

    ids = parallel(send, list(range(HOSTS)), threads=HOSTS)
    for index, bodies in enumerate(batches):
        frames = [service_features(body, columns) for body in bodies]
        sent.count(f"host-{index}", ("POST", "/predict", "200"), len(bodies))
        sent.rows[f"host-{index}"] += sum(len(frame) for frame in frames)
        sent.frames.setdefault(version, []).extend(frames)
        for scores in score_batches(model, frames, POSITIVE_CLASS):
            sent.scores.setdefault(version, []).extend(scores.tolist())
    return ids


def _other_requests(fleet: Fleet, sent: Sent, ids: Sequence[Sequence[str]]) -> None:
    """Per instance: a malformed body (400), an unknown path (404), ten labels (200; too few
    for an accuracy alert) and the same without the back office's token (401)."""
    for index, server in enumerate(fleet.services):
        labels = [{"id": i, "actual": "No"} for i in ids[index][:10]]
        feedback = json.dumps({"feedback": labels}).encode()
        requests = [
            ("POST", "/predict", b'{"rows": [', True, "/predict"),
            ("GET", "/no-such-page", None, True, UNMATCHED),
            ("POST", "/feedback", feedback, True, "/feedback"),
            ("POST", "/feedback", feedback, False, "/feedback"),
        ]
        for method, path, body, token, route in requests:
            status, _ = _send(server.url, method, path, body, token)
            sent.count(f"host-{index}", (method, route, str(status)))
    statuses = {key[2] for counter in sent.requests.values() for key in counter}
    assert statuses == {"200", "400", "401", "404"}


def _central_requests(fleet: Fleet, *labels: str) -> dict[tuple[str, ...], float]:
    """``sum by (labels) (http_requests_total)`` on the central server, zeros left out."""
    query = f"sum by ({', '.join(labels)}) (http_requests_total)"
    return {k: v for k, v in fleet.central.values(query, *labels).items() if v}


def _synchronise(fleet: Fleet, sent: Sent) -> float:
    """Wait until the central server holds every instance's current request and prediction
    counts; return the time it did."""
    expected = sent.by_host()
    rows = {(host,): float(n) for host, n in sent.rows.items()}
    wait_until(
        lambda: (
            _central_requests(fleet, "host", "method", "route", "status") == expected
            and fleet.central.values("sum by (host) (model_predictions_total)", "host") == rows
        ),
        30,
        interval=0.2,
        message=f"the central server never caught up with {expected}",
    )
    return time.time()


def _bodies(rows: Sequence[Any], batches: range) -> list[bytes]:
    return [predict_body(rows[b * BATCH : (b + 1) * BATCH]) for b in batches]


@dataclass
class Scenario:
    fleet: Fleet
    sent: Sent
    started: float  # before any traffic
    before_outage: Counter[Key]  # what host-2 had counted when its agent stopped
    after_outage: Counter[Key]  # and when it started again
    stopped: float  # the agent of host-2 stopped (after the central server had it all)
    restarting: float  # its new agent started
    undrifted: float  # every undrifted row at the central server
    drifted: float  # every drifted row at the central server


@pytest.fixture(scope="module")
def scenario(fleet: Fleet) -> Scenario:
    """Undrifted rows (different on each instance), in two rounds, the second while the
    agent of host-2 is stopped for :data:`OUTAGE` s; then the drifted rows, the same on each
    instance, each in its own order."""
    sent, started = Sent(), time.time()
    rows = [feature_rows(sum(ROUNDS) * BATCH, seed=UNDRIFTED_SEED + i)[0] for i in range(HOSTS)]
    first, second = range(ROUNDS[0]), range(ROUNDS[0], sum(ROUNDS))
    ids = _predict(fleet, sent, UNDRIFTED, [_bodies(r, first) for r in rows])
    _other_requests(fleet, sent, ids)
    _synchronise(fleet, sent)

    before_outage = Counter(sent.requests["host-2"])
    fleet.agents[2].stop()
    stopped = time.time()
    _predict(fleet, sent, UNDRIFTED, [_bodies(r, second) for r in rows])
    after_outage = Counter(sent.requests["host-2"])
    time.sleep(max(0.0, stopped + OUTAGE - time.time()))  # the outage itself, not a wait
    restarting = time.time()
    fleet.agents[2] = fleet.stack.enter_context(fleet.agent(2))  # on the same WAL
    undrifted = _synchronise(fleet, sent)

    serve_version(fleet.models, DRIFTED, fleet.services)
    drifted_rows, _ = feature_rows(sum(ROUNDS) * BATCH, seed=1212, scale={"MonthlyCharges": 1.3})
    bodies = _bodies(drifted_rows, range(sum(ROUNDS)))
    _predict(fleet, sent, DRIFTED, [bodies[i:] + bodies[:i] for i in range(HOSTS)])
    drifted = _synchronise(fleet, sent)
    return Scenario(
        fleet, sent, started, before_outage, after_outage, stopped, restarting, undrifted, drifted
    )


# -- the files ----------------------------------------------------------------------------------


def _check(*command: str) -> str:
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"{' '.join(command)}:\n{done.stdout}{done.stderr}"
    return done.stdout + done.stderr


def test_the_fleet_files_pass_promtool_and_amtool() -> None:
    """``promtool check config`` (agent mode for the agent; the central one checks the
    generated rules it loads), ``amtool check-config``; and what the files promise: the agent
    labels its host and remote-writes, the central server scrapes nothing, receives writes and
    alerts Alertmanager, which groups by model, version and feature into a webhook."""
    _check("promtool", "check", "config", "--agent", str(AGENT_FILE))
    checked = _check("promtool", "check", "config", str(CENTRAL_FILE))
    assert "rule files found" in checked and "churn_rules.yml" in checked
    _check("amtool", "check-config", str(ALERTMANAGER_FILE))

    files = (AGENT_FILE, CENTRAL_FILE, ALERTMANAGER_FILE)
    agent, central, manager = (yaml.safe_load(file.read_text()) for file in files)
    assert agent["global"]["external_labels"] == {"host": "${FLEET_HOST}"}
    assert [job["job_name"] for job in agent["scrape_configs"]] == ["flask_app"]
    assert [r["url"] for r in agent["remote_write"]] == ["http://127.0.0.1:9090/api/v1/write"]
    assert "scrape_configs" not in central and central["rule_files"] == ["*_rules.yml"]
    assert central["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert manager["route"]["group_by"] == ["model", "version", "feature"]
    (webhook,) = manager["receivers"][0]["webhook_configs"]
    assert webhook["send_resolved"] is True


# -- the fleet's numbers ------------------------------------------------------------------------


def test_request_totals_from_the_central_server_equal_what_was_sent(scenario: Scenario) -> None:
    """Per host, method, route and status, and fleet-wide, the central server's
    ``http_requests_total`` equals what was sent; each host's series carry its instance."""
    fleet, sent = scenario.fleet, scenario.sent
    assert _central_requests(fleet, "host", "method", "route", "status") == sent.by_host()
    fleet_wide: Counter[Key] = sum(sent.requests.values(), Counter())
    expected = {key: float(n) for key, n in fleet_wide.items()}
    assert _central_requests(fleet, "method", "route", "status") == expected
    assert sum(expected.values()) == HOSTS * (2 * sum(ROUNDS) + 4)
    instances = fleet.central.values("count by (host, instance) (up)", "host", "instance")
    assert set(instances) == {(f"host-{i}", s.address) for i, s in enumerate(fleet.services)}
    rows = fleet.central.values("sum by (version) (model_predictions_total)", "version")
    assert rows == {(UNDRIFTED,): 900.0, (DRIFTED,): 900.0}


#: The series Prometheus adds to every target's own: up, scrape_duration_seconds,
#: scrape_samples_scraped, scrape_samples_post_metric_relabeling, scrape_series_added.
SCRAPE_SERIES = 5


def test_every_host_writes_its_own_series_to_the_central_server(scenario: Scenario) -> None:
    """Each host's agent writes exactly its instance's series (and the scrape's own) under
    its ``host`` label; prints the central server's series count for the three hosts."""
    central = scenario.fleet.central
    expected = {
        (f"host-{i}",): float(len(parse_samples(http_request(s.url + "/metrics")[1].decode())))
        + SCRAPE_SERIES
        for i, s in enumerate(scenario.fleet.services)
    }
    written = 'count by (host) ({__name__=~".+", host!=""})'
    assert central.values(written, "host") == expected
    assert central.value('count({__name__=~".+", host=""})') is not None  # the rules' output
    recorded = central.value('count({__name__=~".+", host=""})')
    print(
        f"\ncentral series, three hosts: {sum(expected.values()):.0f} written by the agents "
        f"({', '.join(f'{n:.0f}' for n in expected.values())}), {recorded:.0f} recorded by the "
        "rules (two model versions)"
    )


def _pooled_psi(fleet: Fleet, sent: Sent, version: str) -> dict[str, float]:
    """PSI of every feature and of the score (as ``(score)``) over the pooled rows."""
    profile = fleet.profiles[version]
    frame = pd.concat(sent.frames[version], ignore_index=True)
    found = {f.name: psi(bin_counts(f, frame[f.name].tolist()), f.shares) for f in profile.features}
    assert profile.score is not None
    found["(score)"] = psi(bin_counts(profile.score, sent.scores[version]), profile.score.shares)
    return found


def _recorded(fleet: Fleet, name: str, version: str, since: float) -> dict[str, dict[float, float]]:
    """``{feature or "(score)": {evaluation time: value}}`` of a recorded series."""
    selector = f'{name}{{model="{MODEL}", version="{version}"}}'
    found = {}
    for labels, samples in range_samples(fleet.central, selector, since):
        assert set(labels) <= {"__name__", "model", "version", "feature"}, labels
        found[labels.get("feature", "(score)")] = dict(samples)
    return found


def _central_psi(fleet: Fleet, version: str, since: float) -> dict[float, dict[str, float]]:
    """The PSI the central rules recorded per evaluation since ``since``, only evaluations
    whose rules all saw the same samples of each host: every feature and the score count the
    same rows (a host's scrape written in two requests, one evaluated before the other,
    would give its series two extrapolation factors)."""
    rows = _recorded(fleet, f"ml:feature_rows:increase{WINDOW}", version, since)
    rows |= _recorded(fleet, f"ml:score_rows:increase{WINDOW}", version, since)
    values = _recorded(fleet, f"ml:feature_psi:{WINDOW}", version, since)
    values |= _recorded(fleet, f"ml:score_psi:{WINDOW}", version, since)
    found: dict[float, dict[str, float]] = {}
    times = [set(series) for series in values.values()]
    for t in set.intersection(*times) if times else ():
        counted = [r.get(t, math.nan) for r in rows.values()]
        if all(math.isclose(c, counted[0], rel_tol=1e-12) for c in counted):
            found[t] = {name: series[t] for name, series in values.items()}
    return found


def test_fleet_psi_from_the_central_rules_equals_the_pooled_rows(scenario: Scenario) -> None:
    """The drifted version's PSI per feature and for the score, recorded by the central rules
    over the three hosts, equals the PSI of the pooled rows within :data:`TOLERANCE`.

    Why every instance got the same rows: ``increase()`` scales a series' raw increase by
    ``(sampled + to_end) / sampled`` (its first sample in the window is the zero from before
    the traffic), one factor per host, since a host's series are scraped together; each
    host's factor depends on its own scrape phase. Summed over hosts, the factors cancel in
    the live shares only when the hosts' bin counts are proportional. With different rows on
    each host (the undrifted version), the gap to the pooled rows' PSI is printed.
    """
    fleet = scenario.fleet
    expected = _pooled_psi(fleet, scenario.sent, DRIFTED)
    since = scenario.drifted + 2  # every drifted sample stored before the evaluation
    evaluations = wait_until(
        lambda: (
            (found := _central_psi(fleet, DRIFTED, since)) and len(found) >= EVALUATIONS and found
        ),
        30,
        interval=0.5,
        message="too few consistent evaluations of the drifted version's PSI",
    )
    assert len(expected) == 20  # 19 features and the score
    worst = 0.0
    for t, recorded in evaluations.items():
        assert set(recorded) == set(expected), t
        for name, value in recorded.items():
            error = assert_close(
                f"PSI {name} at {t}", value, expected[name], rel=TOLERANCE, abs_=TOLERANCE
            )
            worst = max(worst, error)

    undrifted = _pooled_psi(fleet, scenario.sent, UNDRIFTED)
    gaps = [
        (abs(value - undrifted[name]), abs(value - undrifted[name]) / undrifted[name])
        for recorded in _central_psi(fleet, UNDRIFTED, scenario.undrifted + 2).values()
        for name, value in recorded.items()
    ]
    print(
        f"\nfleet PSI, the same rows on each host: {len(evaluations)} evaluations, largest "
        f"relative error {worst:.1e}; different rows on each host: largest gap "
        f"{max(gaps)[0]:.1e} (relative {max(g for _, g in gaps):.1e})"
    )


def test_an_agent_stopped_for_30_s_loses_no_count(scenario: Scenario) -> None:
    """The agent of host-2 stopped for 30 s while its instance served another round, then
    started again on its write-ahead log: the central server has no sample of host-2 in
    between, and no counter of host-2 ever goes down; the last sample before the stop holds
    exactly what host-2 had counted, the first after the restart exactly what it counted
    during the outage on top (requests, and rows predicted)."""
    fleet = scenario.fleet
    counters = "http_requests_total|model_predictions_total|model_feature_bin_total"
    selector = f'{{host="host-2", __name__=~"{counters}"}}'
    series = range_samples(fleet.central, selector, scenario.stopped - 10, scenario.undrifted)
    assert len(series) > 100
    requests: dict[Key, tuple[float, float]] = {}
    rows = 0.0, 0.0
    for labels, samples in series:
        values = [v for _, v in samples]
        assert values == sorted(values), f"{labels} went down: {samples}"
        stamps = [t for t, _ in samples]
        assert not [t for t in stamps if scenario.stopped < t < scenario.restarting], labels
        before = [v for t, v in samples if t < scenario.stopped][-1]
        after = next(v for t, v in samples if t > scenario.restarting)
        if labels["__name__"] == "http_requests_total":
            requests[(labels["method"], labels["route"], labels["status"])] = before, after
        elif labels["__name__"] == "model_predictions_total":
            rows = rows[0] + before, rows[1] + after

    assert {k: b for k, (b, _) in requests.items() if b} == scenario.before_outage
    during = {k: a - b for k, (b, a) in requests.items() if a - b}
    assert during == {("POST", "/predict", "200"): ROUNDS[1]}
    assert scenario.after_outage == scenario.before_outage + Counter(during)
    assert rows == (ROUNDS[0] * BATCH, sum(ROUNDS) * BATCH)


# -- alerts -------------------------------------------------------------------------------------


def _alerts_of(notification: dict[str, Any], **labels: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in notification["alerts"]
        if all(alert["labels"].get(k) == v for k, v in labels.items())
    ]


def test_the_drift_alert_reaches_the_webhook_through_alertmanager(scenario: Scenario) -> None:
    """The drifted version's ``ModelFeatureDrift`` for ``MonthlyCharges`` reaches the
    webhook through Alertmanager, grouped by model, version and feature; the undrifted
    version, as many rows, never raises a drift alert (not even pending) and nothing of it
    is delivered."""
    fleet, sent = scenario.fleet, scenario.sent
    drift = {"alertname": "ModelFeatureDrift", "model": MODEL, "version": DRIFTED}
    notification = fleet.webhook.wait_for(
        lambda n: (
            n["status"] == "firing" and bool(_alerts_of(n, **drift, feature="MonthlyCharges"))
        ),
        60,
        "no ModelFeatureDrift notification for MonthlyCharges",
    )
    assert notification["receiver"] == "webhook"
    assert notification["groupLabels"] == {
        "model": MODEL,
        "version": DRIFTED,
        "feature": "MonthlyCharges",
    }
    (alert,) = notification["alerts"]
    assert alert["labels"]["severity"] == "warning" and alert["status"] == "firing"
    assert "MonthlyCharges" in alert["annotations"]["summary"]

    assert len(sent.scores[UNDRIFTED]) == len(sent.scores[DRIFTED]) == 900
    profile = fleet.profiles[UNDRIFTED]
    for name, value in _pooled_psi(fleet, sent, UNDRIFTED).items():
        feature = profile.score if name == "(score)" else profile.feature(name)
        limit = critical_value(900, profile.rows, effective_bins(feature.shares))
        assert value < 0.5 * limit, f"the undrifted sample is too close to drift in {name}"
    delivered = [n for n in fleet.webhook.received() if _alerts_of(n, version=UNDRIFTED)]
    assert delivered == []
    drift_alerts = f'ALERTS{{alertname=~".+Drift", version="{UNDRIFTED}"}}'
    assert range_samples(fleet.central, drift_alerts, scenario.started) == []
