"""The deployment files and the demo: prometheus.yml, the committed rules, the Grafana dashboard
and its provisioning, the load generator against a real gunicorn, and a quick demo run.

The full end-to-end Prometheus scenarios (fleet, exact PSI, alerts firing) live elsewhere; here a
real Prometheus runs only inside the demo.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from support import (
    FEEDBACK_TOKEN,
    REPO,
    SERVICE_TOKENS,
    GunicornServer,
    clean_environment,
    http_request,
    listening_addresses,
    parse_samples,
)

from ml_wsgi_metrics.__main__ import main as rules_main
from ml_wsgi_metrics.metrics import ModelMetrics, RequestMetrics, ServerMetrics
from ml_wsgi_metrics.process import WorkerProcessCollector
from ml_wsgi_metrics.profile import ReferenceProfile
from service import loadgen, loadplan
from service.pipeline import PROFILE_FILE, TrainResult, train

PROMETHEUS_YML = REPO / "prometheus.yml"
RULES = REPO / "prometheus" / "churn_rules.yml"
DASHBOARD = REPO / "grafana" / "dashboards" / "ml-wsgi-metrics.json"
DATASOURCES = REPO / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = REPO / "grafana" / "provisioning" / "dashboards" / "ml-wsgi-metrics.yml"

REQUIRED_PANELS = {
    "Request latency p95 per endpoint",  # the seed's three
    "Total predictions by model",
    "Prediction latency p95",
    "Error rate",
    "In-progress requests",
    "Worker memory (RSS)",
    "Worker CPU",
    "PSI per feature",
    "Score distribution",
    "Accuracy",
}
#: Series Prometheus makes itself.
BUILTIN_SERIES = {"ALERTS", "ALERTS_FOR_STATE", "up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or"}
PROMQL_WORDS |= {"unless", "bool", "offset", "inf", "nan"}

needs_promtool = pytest.mark.requires_tool("promtool")
needs_prometheus = pytest.mark.requires_tool("prometheus")


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """Version 1 of the default model, freshly trained (read-only: copy it to write)."""
    return train(models_dir=tmp_path_factory.mktemp("models"))


# -- prometheus.yml and the committed rules ----------------------------------------------------


@needs_promtool
def test_promtool_checks_the_config_and_its_rule_files() -> None:
    result = subprocess.run(
        ["promtool", "check", "config", "prometheus.yml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "prometheus/churn_rules.yml" in result.stdout  # the glob found the generated rules
    assert "SUCCESS" in result.stdout


def test_the_config_scrapes_the_seed_job_on_loopback() -> None:
    text = PROMETHEUS_YML.read_text()
    assert re.search(r"^\s*-\s*job_name:\s*flask_app\s*$", text, re.M)
    assert re.search(r"^\s*metrics_path:\s*/metrics\s*$", text, re.M)
    assert '- targets: ["127.0.0.1:8000"]' in text
    interval = re.search(r"^\s*scrape_interval:\s*(\d+)s\s*$", text, re.M)
    assert interval is not None and int(interval.group(1)) <= 5
    glob = re.search(r"^rule_files:\n\s*-\s*(\S+)\s*$", text, re.M)
    assert glob is not None
    assert RULES in set(REPO.glob(glob.group(1)))


#: How far the held-out accuracy embedded in the committed rules may be from a fresh
#: training's: 14 of the 1,409 held-out predictions (a library upgrade may flip a few).
ACCURACY_TOLERANCE = 0.01


def _committed_accuracy(text: str) -> float:
    """The reference accuracy the committed ``ModelAccuracyDrop`` alert was generated with."""
    found = re.findall(r"^\s*([0-9.]+) - clamp_min\(", text, re.M)
    assert len(found) == 1, found
    return float(found[0])


def test_the_committed_rules_equal_a_fresh_generation(
    trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte for byte, but for the one model-derived number: the held-out accuracy, which must
    be within :data:`ACCURACY_TOLERANCE` of a fresh training's. Everything else (structure,
    features, bins, reference rows, quantiles) depends on the data and the code only."""
    committed = RULES.read_text()
    accuracy = _committed_accuracy(committed)
    fresh = ReferenceProfile.load(trained.path / PROFILE_FILE)
    assert fresh.accuracy is not None
    assert abs(fresh.accuracy - accuracy) <= ACCURACY_TOLERANCE, (fresh.accuracy, accuracy)
    profile = tmp_path / PROFILE_FILE
    dataclasses.replace(fresh, accuracy=accuracy).save(profile)
    output = tmp_path / "churn_rules.yml"
    code = rules_main(["rules", "--profile", str(profile), "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    assert output.read_text() == committed, (
        "prometheus/churn_rules.yml is stale: regenerate it from a fresh training with\n"
        "  python -m service.pipeline --models-dir /tmp/m && python -m ml_wsgi_metrics rules "
        "--profile /tmp/m/churn_logreg/1/profile.json -o prometheus/churn_rules.yml"
    )


def test_the_rules_comparison_tolerates_only_the_accuracy(
    trained: TrainResult, tmp_path: Path
) -> None:
    """The check above would catch anything but a small accuracy change: a shifted accuracy
    changes only the numbers it derives."""
    fresh = ReferenceProfile.load(trained.path / PROFILE_FILE)
    assert fresh.accuracy is not None
    texts = []
    for accuracy in (fresh.accuracy, fresh.accuracy - 0.004):
        profile = tmp_path / f"{accuracy}" / PROFILE_FILE
        profile.parent.mkdir()
        dataclasses.replace(fresh, accuracy=accuracy).save(profile)
        output = profile.parent / "rules.yml"
        assert rules_main(["rules", "--profile", str(profile), "-o", str(output)]) == 0
        texts.append(output.read_text())
    assert _committed_accuracy(texts[1]) == pytest.approx(fresh.accuracy - 0.004)
    changed = [
        (a, b) for a, b in zip(texts[0].splitlines(), texts[1].splitlines(), strict=True) if a != b
    ]
    assert len(changed) == 2  # the threshold line and the description quoting it


# -- the dashboard --------------------------------------------------------------------------

DASHBOARD_TITLE = "ML WSGI metrics: churn service"


def test_the_committed_dashboard_equals_a_fresh_generation(
    trained: TrainResult, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte for byte: the dashboard depends on the profile's features, bins and classes (the
    data and the code), never on the trained model's numbers."""
    output = tmp_path / "dashboard.json"
    profile = str(trained.path / PROFILE_FILE)
    arguments = ["dashboard", "--profile", profile, "--title", DASHBOARD_TITLE, "-o", str(output)]
    assert rules_main(arguments) == 0, capsys.readouterr().err
    assert output.read_text() == DASHBOARD.read_text(), (
        "grafana/dashboards/ml-wsgi-metrics.json is stale: regenerate it with\n"
        "  python -m service.pipeline --models-dir /tmp/m && python -m ml_wsgi_metrics "
        "dashboard --profile /tmp/m/churn_logreg/1/profile.json "
        f"--title '{DASHBOARD_TITLE}' -o grafana/dashboards/ml-wsgi-metrics.json"
    )


def _dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows' collapsed panels included (rows themselves left out)."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels", []))
        else:
            found.append(panel)
    return found


def _queries() -> list[tuple[str, str]]:
    """``(panel title, expr)`` of every target of every panel: the one list of queries."""
    return [(p["title"], t["expr"]) for p in _panels(_dashboard()) for t in p["targets"]]


def _exported_names() -> set[str]:
    """Every sample name the package can expose (metrics.py and the worker collector)."""
    registry = CollectorRegistry()
    RequestMetrics(registry)
    ServerMetrics(registry)
    ModelMetrics(registry)
    families = list(registry.collect())
    families += WorkerProcessCollector("/nonexistent-directory").collect()
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    return {
        family.name + suffix for family in families for suffix in suffixes.get(family.type, ("",))
    }


def _recorded_names() -> set[str]:
    return set(re.findall(r'^\s*- record: "([^"]+)"$', RULES.read_text(), re.M))


def _series_names(expr: str) -> set[str]:
    """The metric and recorded-series names an expression reads (a small PromQL lexer)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)  # strings
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()", text):
        if match.group(1).lower() not in PROMQL_WORDS:
            names.add(match.group(1))
    return names


def test_the_dashboard_is_importable_json() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "ml-wsgi-metrics"
    assert dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "id" not in dashboard or dashboard["id"] is None  # import assigns one
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource" and source["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]] + [
        p["id"] for row in dashboard["panels"] for p in row.get("panels", [])
    ]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']!r} overlaps another panel"
        cells |= area
    for panel in _panels(dashboard):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
            assert target["expr"].strip(), panel["title"]


def test_the_dashboard_has_the_required_panels() -> None:
    titles = {p["title"] for p in _panels(_dashboard())}
    assert titles >= REQUIRED_PANELS, REQUIRED_PANELS - titles


def test_the_seed_panels_are_in_our_metric_names() -> None:
    """The seed's three panels, on the series the template variables select (the prediction
    latency as the rules record it: the same quantile, summed over instances)."""
    queries = dict(_queries())
    hosts = 'job=~"$job",instance=~"$instance"'
    models = 'model=~"$model",version=~"$version"'
    assert queries["Request latency p95 per endpoint"] == (
        "histogram_quantile(0.95, sum by (le, route) "
        f"(rate(http_request_duration_seconds_bucket{{{hosts}}}[5m])))"
    )
    assert queries["Total predictions by model"] == (
        f"sum by (model, version) (model_predictions_total{{{hosts},{models}}})"
    )
    assert queries["Prediction latency p95"] == (
        f"ml:prediction_latency_seconds:p95_5m{{{models}}}"
    )
    assert (
        "histogram_quantile(0.95, sum by (model, version, le) "
        '(rate(model_prediction_latency_seconds_bucket{model="churn_logreg",version="1"}[5m])))'
    ) in RULES.read_text()


def test_every_quantile_sums_rates_by_le() -> None:
    for title, expr in _queries():
        if "histogram_quantile" not in expr:
            continue
        match = re.fullmatch(
            r"histogram_quantile\(0\.\d+, sum by \(([^)]*)\) "
            r"\(rate\((\w+)_bucket(?:\{[^}]*\})?\[\w+\]\)\)\)",
            expr,
        )
        assert match is not None, f"{title}: {expr}"
        assert "le" in [label.strip() for label in match.group(1).split(",")], title


def test_every_query_reads_series_that_exist() -> None:
    known = _exported_names() | _recorded_names() | BUILTIN_SERIES
    for title, expr in _queries():
        names = _series_names(expr)
        assert names, f"{title}: no series in {expr!r}"
        assert names <= known, f"{title}: unknown series {names - known} in {expr!r}"


def test_the_lexer_finds_series_names() -> None:
    expr = (
        'sum by (job) (rate(http_requests_total{status=~"4.."}[5m])) / on (job) '
        "ml:http_requests:rate5m > 0 or on () vector(0)"
    )
    assert _series_names(expr) == {"http_requests_total", "ml:http_requests:rate5m"}
    assert _series_names("histogram_quantile(0.95, sum by (le) (rate(x_bucket[5m])))") == {
        "x_bucket"
    }


@needs_promtool
def test_every_query_is_valid_promql(tmp_path: Path) -> None:
    """promtool parses each query as the expression of a recording rule."""
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(_queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    result = subprocess.run(
        ["promtool", "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_provisioning_points_at_the_dashboard() -> None:
    providers = DASHBOARD_PROVIDERS.read_text()
    assert re.search(r"^\s*type:\s*file\s*$", providers, re.M)
    path = re.search(r"^\s*path:\s*(\S+)\s*$", providers, re.M)
    assert path is not None and path.group(1).startswith("/")
    # the documented mount puts grafana/dashboards/ (holding the dashboard) at that path
    assert f'"$PWD/grafana/dashboards:{path.group(1)}:ro"' in providers
    assert DASHBOARD.parent == REPO / "grafana" / "dashboards"

    datasources = DATASOURCES.read_text()
    variable = next(v for v in _dashboard()["templating"]["list"] if v["name"] == "DS_PROMETHEUS")
    uid = re.search(r"^\s*uid:\s*(\S+)\s*$", datasources, re.M)
    assert uid is not None and uid.group(1) == variable["current"]["value"]
    assert re.search(r"^\s*type:\s*prometheus\s*$", datasources, re.M)
    assert re.search(r"^\s*url:\s*http://127\.0\.0\.1:9090\s*$", datasources, re.M)


# -- the load generator ---------------------------------------------------------------------


def test_the_load_generator_plans_the_same_run_from_the_same_seed() -> None:
    import numpy as np

    rows, _ = loadgen.load_rows()
    plans = [
        loadplan.plan_requests(300, rows, np.random.default_rng(5), 150, loadplan.Drift(), 100)
        for _ in range(2)
    ]
    assert plans[0] == plans[1]
    kinds = Counter(r.kind for r in plans[0])
    assert kinds["page"] == 2  # requests 0 and 100; 200 is drifted
    assert kinds["single"] > kinds["batch"] > 0
    assert sum(n for k, n in kinds.items() if k.startswith("bad:")) > 0
    assert all(r.drifted == (i >= 150) for i, r in enumerate(plans[0]) if r.rows)


def test_the_load_generator_sends_to_loopback_only() -> None:
    with pytest.raises(ValueError, match=r"127\.0\.0\.1"):
        loadgen.run("http://192.0.2.1:8000", 1)


def _samples(url: str) -> dict[str, Counter[tuple[tuple[str, str], ...]]]:
    status, body = http_request(url + "/metrics")
    assert status == 200
    found: dict[str, Counter[tuple[tuple[str, str], ...]]] = {}
    for sample in parse_samples(body.decode()):
        found.setdefault(sample.name, Counter())[tuple(sorted(sample.labels.items()))] += int(
            sample.value
        )
    return found


def test_the_load_generator_summary_matches_the_service_metrics(
    trained: TrainResult, tmp_path: Path
) -> None:
    models = shutil.copytree(trained.path.parent.parent, tmp_path / "models")
    env = {"CHURN_MODELS_DIR": str(models), **SERVICE_TOKENS}
    with GunicornServer("service.app:app", env=env) as server:
        summary = loadgen.run(
            server.url,
            400,
            concurrency=8,
            drift_from=200,
            flip=0.5,
            feedback_delay=0.2,
            page_every=150,
            seed=11,
            feedback_token=FEEDBACK_TOKEN,
        )
        metrics = _samples(server.url)

    assert summary.errors == 0 and summary.feedback_dropped == 0
    requests = {
        (dict(labels)["method"], dict(labels)["route"], dict(labels)["status"]): value
        for labels, value in metrics["http_requests_total"].items()
    }
    assert requests == dict(summary.requests)
    assert sum(summary.requests.values()) >= 400
    assert summary.kinds["page"] == summary.pages == 2
    # The results pages scored the held-out rows and recorded none of them.
    assert sum(metrics["model_predictions_total"].values()) == summary.rows
    assert sum(metrics["model_confusion_total"].values()) == summary.feedback_accepted
    assert summary.feedback_items == summary.feedback_accepted == summary.rows
    assert (
        sum(metrics["model_feedback_rejected_total"].values())
        == (summary.kinds["bad:forged_feedback"])
    )
    assert 0 < summary.drifted_rows < summary.rows
    # labels are flipped on drifted rows only, about half of them
    assert 0.3 * summary.drifted_rows < summary.feedback_flipped < 0.7 * summary.drifted_rows
    assert summary.versions == Counter({"churn_logreg 1": summary.rows})


# -- the demo ---------------------------------------------------------------------------------


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class _Demo:
    """``python -m service.demo`` in a child process, its output read line by line."""

    def __init__(self, *args: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "service.demo", *args],
            cwd=REPO,
            env=clean_environment(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> str:
        """The first new line matching ``pattern``."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no {pattern!r} in:\n" + "\n".join(self.lines)) from None
            if line is None:
                raise AssertionError(f"demo ended before {pattern!r}:\n" + "\n".join(self.lines))
            self.lines.append(line)
            if re.search(pattern, line):
                return line

    def finish(self, timeout: float) -> int:
        code = self.process.wait(timeout)
        while (line := self._queue.get(timeout=5)) is not None:
            self.lines.append(line)
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def server_pids(self) -> list[int]:
        return [int(pid) for pid in re.findall(r"\(pid (\d+)\)", self.output)]

    def stop(self) -> None:
        """Whatever happened: stop the demo, and its servers if it could not."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        for pid in self.server_pids():  # each server leads its own process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


@contextlib.contextmanager
def demo(*args: str) -> Iterator[_Demo]:
    run = _Demo(*args)
    try:
        yield run
    finally:
        run.stop()


def _assert_all_stopped(run: _Demo) -> None:
    pids = run.server_pids()
    assert len(pids) == 2, run.output  # gunicorn's master and Prometheus
    assert not [pid for pid in pids if _alive(pid)], run.output
    ports = re.findall(r"workers on http://127\.0\.0\.1:(\d+) ", run.output)
    ports += re.findall(r"Prometheus on http://127\.0\.0\.1:(\d+) ", run.output)
    assert len(ports) == 2, run.output
    assert not [port for port in ports if listening_addresses(int(port))], run.output
    temporary = re.search(r" in (\S+)/prometheus/churn_rules\.yml", run.output)
    assert temporary is not None and not Path(temporary.group(1)).exists()


def _psi_row(output: str, feature: str) -> tuple[float, float, float, bool]:
    """``(before, during, critical, flagged)`` of a feature in the demo's PSI table."""
    row = re.search(
        rf"^  {re.escape(feature)} +(\d\.\d{{4}}) +(\d\.\d{{4}}) +(\d\.\d{{4}})( +DRIFT)?$",
        output,
        re.M,
    )
    assert row is not None, f"no PSI row for {feature}:\n{output}"
    return float(row[1]), float(row[2]), float(row[3]), row[4] is not None


@needs_prometheus
def test_the_demo_trains_serves_detects_the_drift_and_stops_everything(tmp_path: Path) -> None:
    """``make demo`` as documented (the full run, not ``--quick``): every request counted,
    ``MonthlyCharges`` below its critical value before the drift and flagged during it,
    accuracy down, ``ModelFeatureDrift`` and ``ModelAccuracyDrop`` firing, no drift or
    accuracy alert during the undrifted phase, and the demo's own verdict."""
    with demo("--port", "0", "--prometheus-port", "0", "--models-dir", str(tmp_path)) as run:
        run.wait_for(r"phase 2 done", 300)
        assert run.finish(180) == 0, run.output
        _assert_all_stopped(run)
    output = run.output
    assert "trained churn_logreg version 1" in output
    for heading in (
        "Requests: sent by the load generator / counted by Prometheus",
        "Per route over the last 1m",
        "Predictions by model and version",
        "PSI per feature over 1m",
        "Accuracy over 1m",
        "Alerts (Prometheus /api/v1/alerts)",
        "/classic/alerts",
        "grafana/dashboards/ml-wsgi-metrics.json",
    ):
        assert heading in output, heading
    assert "MISMATCH" not in output  # Prometheus counted every request sent
    assert re.search(r"churn_logreg 1: \d+ rows", output)
    before, during, critical, flagged = _psi_row(output, "MonthlyCharges")
    assert before < critical < during and flagged
    accuracy = re.search(r"before (\d\.\d{3}) \(\d+ labels\), during (\d\.\d{3})", output)
    assert accuracy is not None and float(accuracy[2]) < float(accuracy[1]) - 0.05
    assert "during the undrifted phase: no drift or accuracy alert" in output
    for alert in ("ModelFeatureDrift", "ModelAccuracyDrop"):
        assert re.search(rf"^  firing +{alert} ", output, re.M), alert
    assert "drift and accuracy alerts fired during the drift phase only: as expected" in output


@needs_prometheus
def test_the_demo_stops_everything_on_ctrl_c(trained: TrainResult, tmp_path: Path) -> None:
    models = shutil.copytree(trained.path.parent.parent, tmp_path / "models")
    with demo(
        "--quick", "--port", "0", "--prometheus-port", "0", "--models-dir", str(models)
    ) as run:
        run.wait_for(r"phase 1: ", 60)  # gunicorn and Prometheus are up
        run.process.send_signal(signal.SIGINT)
        assert run.finish(60) == 130, run.output
        _assert_all_stopped(run)
    assert "interrupted: gunicorn and Prometheus are stopped" in run.output
