"""Issue 4 end to end: the churn service under gunicorn, a fleet of three instances scraped by
one real Prometheus (job ``flask_app``, every second), the seed's queries, every Grafana panel,
the load generator's drift phase, and the results page in headless Chromium. No mocks.

One Prometheus for the module, its three targets known from the start: instance A (4 workers,
the default ``gunicorn.conf.py``: no preload) and B, C (2 workers each, preloaded: they start in
2 s). All share one models directory and one secret key, so a label posted to any instance
scores a prediction made by any other. Scenarios use different model versions:

- version 1: request totals and the dashboards (rules with the committed settings: 1h / 5m),
- version 2: the fleet, with instance C killed and restarted in the middle,
- version 3: the load generator, under rules with a 30 s window so its phases are seen apart.
"""

from __future__ import annotations

import contextlib
import functools
import html
import http.server
import json
import math
import os
import re
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import pytest
from e2e_support import (
    EPS,
    MODEL,
    ServiceServer,
    assert_close,
    bin_counts,
    chromium,
    decode_png,
    feature_rows,
    parallel,
    predict_body,
    profile_path,
    psi,
    range_samples,
    rules_increase,
    running,
    score_batches,
    serve_version,
    service_features,
    train_versions,
    write_rules,
)
from support import (
    FEEDBACK_TOKEN,
    REPO,
    PrometheusServer,
    bearer,
    http_request,
    parse_samples,
    wait_until,
)

from ml_wsgi_metrics import UNMATCHED
from ml_wsgi_metrics._promql import Selector, exact_increase
from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.rules import RuleSettings
from service import loadgen
from service.pipeline import MODEL_FILE, POSITIVE_CLASS

pytestmark = pytest.mark.requires_tool("prometheus", "promtool")

JOB = "flask_app"  # the seed's job, as in prometheus.yml
SHORT_WINDOW, ALERT_FOR = 30, 4  # seconds: the load generator version's rules
DASHBOARDS = sorted((REPO / "grafana" / "dashboards").glob("*.json"))
#: Grafana's built-in variables, as concrete PromQL for an instant query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "$__range_s": "300",
    "$__range_ms": "300000",
    # the dashboard's own variables, all values selected ("All" is their allValue)
    "$job": ".*",
    "$instance": ".*",
    "$model": ".*",
    "$version": ".*",
}

Key = tuple[str, str, str]  # (method, route, status), as http_requests_total labels them
#: Versions 1-3 serve one scenario each, all live at once (the default keeps 2).
ALL_LIVE = {"ML_WSGI_METRICS_LIVE_VERSIONS": "3"}


# -- the stack ------------------------------------------------------------------------------


@dataclass
class Fleet:
    root: Path
    models: Path
    profiles: dict[str, ReferenceProfile]
    servers: list[ServiceServer]
    prometheus: PrometheusServer
    stack: ExitStack
    visible: float = 0.0  # every model series of every instance scraped (at zero) by then

    @property
    def names(self) -> list[str]:
        return [server.address for server in self.servers]

    def restart(self, index: int, signum: int = signal.SIGKILL) -> ServiceServer:
        """Kill an instance (master and workers at once) and start it again on its port, with
        the same (so far unemptied) multiprocess directory."""
        old = self.servers[index]
        assert old.process is not None
        os.killpg(old.pid, signum)
        old.process.wait(30)
        new = ServiceServer(
            self.models,
            multiproc_dir=self.root / f"multiproc-{index}",
            workers=2,
            preload=True,
            port=old.port,
            env=ALL_LIVE,
        )
        self.stack.enter_context(new)
        self.servers[index] = new
        return new


def _model_series(url: str) -> int:
    _, text = http_request(url + "/metrics")
    return sum(1 for line in text.decode().splitlines() if f'model="{MODEL}"' in line)


def _warm_up(fleet: Fleet, servers: Sequence[ServiceServer]) -> None:
    """Let each instance register its live versions (every series at zero) and wait until
    Prometheus scraped them all."""
    expected = {}
    for server in servers:
        status, _ = http_request(server.url + "/healthz")  # not measured
        assert status == 200
        expected[server.address] = _model_series(server.url)
    query = f'count by (instance) ({{__name__=~"model_.+", model="{MODEL}"}})'

    def seen() -> bool:
        counts = {
            r["metric"]["instance"]: float(r["value"][1]) for r in fleet.prometheus.query(query)
        }
        return all(counts.get(name) == count for name, count in expected.items())

    wait_until(seen, 30, interval=0.2, message=f"model series not all scraped: {expected}")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("e2e-service")
    models = root / "models"
    profiles = {p.version: p for p in train_versions(models, 3)}  # LATEST = 3: 1-3 registered
    dashboard_rules = write_rules(  # the committed rules' settings, for versions 1 and 2
        [profile_path(models, "1"), profile_path(models, "2")], root / "churn_rules.yml"
    )
    loadgen_rules = write_rules(
        [profile_path(models, "3")],
        root / "loadgen_rules.yml",
        window=f"{SHORT_WINDOW}s",
        ops_window="1m",
        alert_for=f"{ALERT_FOR}s",
        ops_for="1m",
    )
    servers = [
        ServiceServer(models, multiproc_dir=root / "multiproc-0", workers=4, env=ALL_LIVE),
        *(
            ServiceServer(
                models, multiproc_dir=root / f"multiproc-{i}", workers=2, preload=True, env=ALL_LIVE
            )
            for i in (1, 2)
        ),
    ]
    prometheus = PrometheusServer(
        [s.address for s in servers], job=JOB, rule_files=[dashboard_rules, loadgen_rules]
    )
    with ExitStack() as stack:
        stack.enter_context(running(prometheus, *servers))
        fleet = Fleet(root, models, profiles, servers, prometheus, stack)
        _warm_up(fleet, servers)
        fleet.visible = time.time()
        yield fleet


def _use_version(fleet: Fleet, version: str) -> None:
    serve_version(fleet.models, version, fleet.servers)


def _send(url: str, method: str, path: str, body: bytes | None, kind: str = "json") -> Any:
    """One request; to ``/feedback`` with the back office's token."""
    headers = {"Content-Type": "application/json" if kind == "json" else "text/plain"}
    if path == "/feedback":
        headers |= bearer(FEEDBACK_TOKEN)
    status, answer = http_request(url + path, method, body, headers if body else None)
    return status, answer


def _prometheus_requests(fleet: Fleet, selector: str = "") -> dict[Key, float]:
    query = f"sum by (method, route, status) (http_requests_total{selector})"
    return {
        (r["metric"]["method"], r["metric"]["route"], r["metric"]["status"]): float(r["value"][1])
        for r in fleet.prometheus.query(query)
    }


def _direct_requests(url: str) -> dict[Key, float]:
    """``http_requests_total`` as the instance itself serves it (a scrape: not measured)."""
    _, text = http_request(url + "/metrics")
    found: Counter[Key] = Counter()
    for sample in parse_samples(text.decode()):
        if sample.name == "http_requests_total":
            labels = sample.labels
            found[(labels["method"], labels["route"], labels["status"])] += sample.value
    return dict(found)


# -- version 1: request totals, the seed's queries, the dashboards ----------------------------


@dataclass
class Baseline:
    sent: Counter[Key]
    rows: int


def _mixed_requests(url: str, seed: int) -> tuple[Counter[Key], int]:
    """Single rows, batches, the results page, the index, feedback, 4xx of several kinds and
    /healthz (excluded from the metrics), from 8 clients; what was sent and rows predicted."""
    rows, labels = feature_rows(130, seed=seed)
    plan: list[tuple[str, str, bytes | None, str, str]] = []  # method, path, body, kind, route
    plan += [("POST", "/predict", json.dumps(r).encode(), "json", "/predict") for r in rows[:30]]
    plan += [
        ("POST", "/predict", predict_body(rows[i : i + 10]), "json", "/predict")
        for i in range(30, 130, 10)
    ]
    plan += [("GET", "/predict", None, "", "/predict")]
    plan += [("GET", "/", None, "", "/")] * 3
    plan += [("POST", "/predict", b'{"rows": [', "json", "/predict")] * 4
    plan += [("POST", "/predict", json.dumps(rows[0]).encode(), "text", "/predict")] * 3
    plan += [("GET", "/no-such-page", None, "", UNMATCHED)] * 4
    plan += [("DELETE", "/predict", None, "", UNMATCHED)] * 2
    plan += [("GET", "/healthz", None, "", "")] * 3

    def send(item: tuple[str, str, bytes | None, str, str]) -> tuple[Key, bytes]:
        method, path, body, kind, route = item
        status, answer = _send(url, method, path, body, kind)
        return (method, route, str(status)), answer

    sent: Counter[Key] = Counter()
    ids = []
    for key, answer in parallel(send, plan, threads=8):
        if key[1]:
            sent[key] += 1
        if key[:2] == ("POST", "/predict") and key[2] == "200":
            ids += [p["id"] for p in json.loads(answer)["predictions"]]
    assert len(ids) == 130
    truth = [{"id": i, "actual": label} for i, label in zip(ids, labels, strict=True)]
    feedback = json.dumps({"feedback": truth}).encode()  # both classes: recall has data
    forged = json.dumps({"id": "x" * 40, "actual": "No"}).encode()
    for body in (feedback, forged, forged):
        status, _ = _send(url, "POST", "/feedback", body)
        sent[("POST", "/feedback", str(status))] += 1
    return sent, len(ids)


@pytest.fixture(scope="module")
def baseline(fleet: Fleet) -> Baseline:
    """Two rounds of mixed requests to instance A on version 1, a scrape apart: the first
    creates the request series, the second makes them grow, so ``rate()`` has data."""
    _use_version(fleet, "1")
    a = fleet.servers[0]
    sent, rows = _mixed_requests(a.url, seed=21)
    total = f'sum(http_requests_total{{instance="{a.address}"}})'
    wait_until(lambda: fleet.prometheus.value(total) == sum(sent.values()), 15, interval=0.2)
    more, more_rows = _mixed_requests(a.url, seed=22)
    return Baseline(sent + more, rows + more_rows)  # GET /predict records no prediction


def test_request_totals_from_promql_equal_what_was_sent(fleet: Fleet, baseline: Baseline) -> None:
    """``sum(http_requests_total)``, and per method/route/status, equal the requests sent to
    the 4-worker instance; /healthz is not counted; nothing else reached the fleet."""
    expected = {key: float(n) for key, n in baseline.sent.items()}
    assert {status for _, _, status in expected} >= {"200", "400", "404", "405", "415"}
    a = f'{{instance="{fleet.servers[0].address}"}}'
    wait_until(
        lambda: fleet.prometheus.value(f"sum(http_requests_total{a})") == sum(expected.values()),
        15,
        interval=0.2,
        message=f"Prometheus totals never reached {sum(expected.values())}",
    )
    assert _prometheus_requests(fleet, a) == expected
    assert fleet.prometheus.value("sum(http_requests_total)") == sum(expected.values())
    assert fleet.prometheus.value('sum(model_predictions_total{version="1"})') == baseline.rows


def _finite(result: list[dict[str, Any]]) -> list[float]:
    values = [float(r["value"][1]) for r in result]
    return [v for v in values if math.isfinite(v)]


def test_the_seed_queries_return_data(fleet: Fleet, baseline: Baseline) -> None:
    """The seed's three dashboard queries, in our metric names."""
    prometheus = fleet.prometheus
    latency = prometheus.query(
        "histogram_quantile(0.95, "
        "sum(rate(http_request_duration_seconds_bucket[5m])) by (le, route))"
    )
    by_route = {r["metric"]["route"]: float(r["value"][1]) for r in latency}
    assert {"/predict", "/feedback", "/"} <= set(by_route)
    assert 0 < by_route["/predict"] < 10
    predictions = prometheus.query("sum(model_predictions_total) by (model)")
    assert [(r["metric"], float(r["value"][1])) for r in predictions] == [
        ({"model": MODEL}, baseline.rows)
    ]
    prediction_latency = prometheus.query(
        "histogram_quantile(0.95, "
        "sum(rate(model_prediction_latency_seconds_bucket[5m])) by (le, model))"
    )
    assert [r["metric"] for r in prediction_latency] == [{"model": MODEL}]
    assert 0 < _finite(prediction_latency)[0] < 10


def _panel_targets() -> list[tuple[str, str, str]]:
    """``(dashboard, panel title, expr)`` of every target of every panel, rows included."""
    found = []

    def walk(dashboard: str, panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((dashboard, panel.get("title", "?"), target["expr"]))
            walk(dashboard, panel.get("panels", []))

    for path in DASHBOARDS:
        walk(path.name, json.loads(path.read_text())["panels"])
    return found


def concrete(expr: str) -> str:
    """A panel's query with Grafana's variables replaced by concrete values."""
    for name in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        value = GRAFANA_VARIABLES[name]
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    unknown = re.findall(r"\$\{?\w+", expr)
    assert not unknown, f"no concrete value for {unknown} in {expr!r}: add it to the test"
    return expr


def test_every_dashboard_panel_query_runs_and_returns_data(
    fleet: Fleet, baseline: Baseline
) -> None:
    """Every query of every panel of ``grafana/dashboards/*.json`` runs without error and
    returns at least one finite value (the recording rules it reads included)."""
    targets = _panel_targets()
    assert DASHBOARDS and len(targets) >= 10
    pending = {(d, t, concrete(e)) for d, t, e in targets}

    def answered() -> bool:
        for item in list(pending):
            if _finite(fleet.prometheus.query(item[2])):  # raises on a PromQL error
                pending.discard(item)
        return not pending

    wait_until(answered, 20, interval=0.5, message=f"panels without data: {sorted(pending)}")


# -- version 3: the load generator's phases ----------------------------------------------------


def _firing(fleet: Fleet, alerts: str, version: str, since: float, until: float | None = None):
    selector = f'ALERTS{{alertname=~"{alerts}", version="{version}", alertstate="firing"}}'
    return range_samples(fleet.prometheus, selector, since, until)


def test_the_load_generator_drift_phase_fires_the_drift_alert(fleet: Fleet) -> None:
    """``service.loadgen`` against the 4-worker instance, on version 3 (rules: 30 s window,
    ``for: 4s``): its undrifted phase fires no drift alert while its rows fill the window;
    its drift phase fires ``ModelFeatureDrift``."""
    _use_version(fleet, "3")
    url = fleet.servers[0].url
    common: dict[str, Any] = {
        "requests": 600,
        "concurrency": 4,
        "page_every": 0,  # no results page: it records nothing anyway
        "feedback_delay": 0.5,
        "max_seconds": 60.0,
    }
    predicted = 'sum(model_predictions_total{version="3"})'
    before = fleet.prometheus.value(predicted) or 0.0
    started = time.time()
    clean = loadgen.run(url, seed=41, **common)
    assert clean.errors == 0 and clean.drifted_rows == 0 and clean.rows >= 500
    assert clean.versions == Counter({f"{MODEL} 3": clean.rows})
    # A condition that held would fire within `for` plus an evaluation or two: wait for an
    # evaluation that late after Prometheus saw the whole undrifted phase (the window still
    # holds it).
    seen = before + clean.rows
    wait_until(lambda: fleet.prometheus.value(predicted) == seen, 15, interval=0.2)
    late = time.time() + ALERT_FOR + 2
    psi = f'ml:score_psi:{SHORT_WINDOW}s{{version="3"}}'
    wait_until(
        lambda: range_samples(fleet.prometheus, psi, late),
        ALERT_FOR + 20,
        interval=0.5,
        message=f"the rules were not evaluated after {late}",
    )
    drift_started = time.time()
    drift = loadgen.run(url, seed=42, drift_from=0, flip=0.3, **common)
    assert drift.errors == 0 and drift.drifted_rows == drift.rows >= 500
    wait_until(
        lambda: _firing(fleet, "ModelFeatureDrift", "3", drift_started),
        SHORT_WINDOW,
        interval=0.5,
        message="the drift phase never fired ModelFeatureDrift",
    )
    assert _firing(fleet, "ModelFeatureDrift|ModelScoreDrift", "3", started, drift_started) == []
    # not vacuous: the quiet rule saw the undrifted rows (the alert needs 100), all of them
    # when they were sent within the window (on a busy machine, the share a window could hold)
    rows = f'ml:feature_rows:increase{SHORT_WINDOW}s{{version="3", feature="MonthlyCharges"}}'
    ((_, quiet),) = range_samples(fleet.prometheus, rows, started, drift_started)
    held = clean.rows * min(1.0, SHORT_WINDOW / clean.seconds)
    assert max(value for _, value in quiet) >= 0.8 * held >= RuleSettings().min_rows
    drifted = {labels["feature"] for labels, _ in _firing(fleet, "ModelFeatureDrift", "3", started)}
    assert drifted & {"MonthlyCharges", "Contract"}, drifted


# -- the results page in headless Chromium ------------------------------------------------------

STAY, CHURN = (76, 120, 168), (245, 133, 24)  # the template's bar colours (#4c78a8, #f58518)
PROBE = """<!doctype html>
<html><body style="margin:0">
<iframe id="page" src="{url}" style="border:0;display:block;width:1200px;height:1600px"></iframe>
<pre id="layout">pending</pre>
<script>
document.getElementById("page").addEventListener("load", () => {{
  const out = document.getElementById("layout");
  try {{
    const page = document.getElementById("page").contentDocument;
    const view = page.defaultView;
    const box = (e) => {{
      const b = e.getBoundingClientRect();
      return [b.x, b.y, b.width, b.height];
    }};
    const svg = page.getElementById("score-histogram");
    out.textContent = JSON.stringify({{
      svg: box(svg),
      display: view.getComputedStyle(svg).display,
      visibility: view.getComputedStyle(svg).visibility,
      accuracy: page.getElementById("accuracy").textContent,
      bars: [...svg.querySelectorAll("g > g > rect")].map(  // each bar's group; not the legend
        (r) => [r.getAttribute("class"), ...box(r), view.getComputedStyle(r).fill]),
    }});
  }} catch (error) {{ out.textContent = "error: " + error; }}
}});
</script>
</body></html>
"""


@contextlib.contextmanager
def _static_server(directory: Path) -> Iterator[str]:
    """A loopback HTTP server for ``directory``: the layout probe needs an http origin."""
    handler = functools.partial(QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.mark.requires_tool("chromium")
def test_the_results_page_renders_with_its_plot_in_chromium(fleet: Fleet, tmp_path: Path) -> None:
    """GET /predict in headless Chromium: the screenshot has the score histogram's bars in
    the plot region, and the laid-out SVG (read in the browser) puts a bar of the right colour
    under every place the screenshot shows one."""
    url = fleet.servers[0].url + "/predict"
    screenshot = tmp_path / "predict.png"
    chromium(tmp_path / "profile-1", f"--screenshot={screenshot}", "--window-size=1200,1600", url)
    image = decode_png(screenshot.read_bytes())
    assert (image.width, image.height) == (1200, 1600)
    pixels = image.pixels
    colours = {
        name: np.all(pixels == rgb, axis=2) for name, rgb in (("stay", STAY), ("churn", CHURN))
    }
    assert colours["stay"].sum() > 5000 and colours["churn"].sum() > 1000
    ys, xs = np.nonzero(colours["stay"] | colours["churn"])
    width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
    assert width >= 500 and height >= 200, (width, height)  # a plot region, not a legend
    assert (pixels[:5] == 255).all()  # and the page around it is the white background

    (tmp_path / "probe").mkdir()
    (tmp_path / "probe" / "probe.html").write_text(PROBE.format(url=url))
    with _static_server(tmp_path / "probe") as origin:
        dom = chromium(
            tmp_path / "profile-2",
            "--dump-dom",
            "--disable-web-security",  # read the page's layout from the probe's frame
            "--disable-site-isolation-trials",
            "--virtual-time-budget=10000",
            "--window-size=1200,1600",
            f"{origin}/probe.html",
        )
    found = re.search(r'<pre id="layout">(.*?)</pre>', dom, re.S)
    assert found and found.group(1).startswith("{"), dom[-2000:]
    layout = json.loads(html.unescape(found.group(1)))
    assert layout["display"] != "none" and layout["visibility"] == "visible"
    assert re.fullmatch(r"Accuracy \d+\.\d %", " ".join(layout["accuracy"].split()))
    x, y, svg_width, svg_height = layout["svg"]
    assert svg_width >= 600 and svg_height >= 250
    bars = layout["bars"]
    assert len(bars) == 40  # 20 bins, stayed and churned
    drawn = [bar for bar in bars if bar[3] >= 3 and bar[4] >= 3]
    assert len(drawn) >= 20
    tallest = max(bar[4] for bar in bars)
    assert 100 <= tallest <= svg_height
    for kind, left, top, bar_width, bar_height, fill in drawn:
        assert x <= left and left + bar_width <= x + svg_width
        assert y <= top and top + bar_height <= y + svg_height
        expected = STAY if kind == "stay" else CHURN
        assert fill == "rgb({}, {}, {})".format(*expected)
        centre = pixels[int(top + bar_height / 2), int(left + bar_width / 2)]
        assert tuple(int(v) for v in centre) == expected, (kind, left, top, centre)


# -- version 2: the fleet, one instance killed and restarted ----------------------------------


@dataclass
class Instance:
    """What one instance of the fleet was sent, and when Prometheus saw it."""

    server: ServiceServer
    name: str
    sent: Counter[Key] = field(default_factory=Counter)  # after the baseline sample
    frames: list[Any] = field(default_factory=list)  # features recorded after it
    scores: list[float] = field(default_factory=list)
    all_frames: list[Any] = field(default_factory=list)  # every row it recorded (v2)
    labels: int = 0  # feedback items it counted after the baseline sample
    start_ms: int = 0  # Prometheus' sample of the baseline, and its last sample
    end_ms: int = 0


class FleetTraffic:
    """Predictions to each instance, their labels posted to the next one (another host)."""

    def __init__(self, fleet: Fleet, version: str) -> None:
        self.fleet, self.version = fleet, version
        self.model = joblib.load(fleet.models / MODEL / version / MODEL_FILE)
        self.columns = [str(c) for c in self.model.feature_names_in_]
        self.instances = [Instance(s, s.address) for s in fleet.servers]
        self.counting = False

    def _post(self, instance: Instance, path: str, body: bytes) -> dict[str, Any]:
        status, answer = _send(instance.server.url, "POST", path, body)
        assert status == 200, answer
        if self.counting:
            instance.sent[("POST", path, "200")] += 1
        return json.loads(answer)

    def round(self, batches: int, size: int, seed: int) -> None:
        """``batches`` predictions of ``size`` rows per instance, then every label."""
        labels: list[tuple[Instance, bytes]] = []
        for i, instance in enumerate(self.instances):
            rows, truth = feature_rows(batches * size, seed=seed + i)
            for b in range(batches):
                body = predict_body(rows[b * size : (b + 1) * size])
                answer = self._post(instance, "/predict", body)
                assert answer["version"] == self.version
                frame = service_features(body, self.columns)
                (scores,) = score_batches(self.model, [frame], POSITIVE_CLASS)
                instance.all_frames.append(frame)
                if self.counting:
                    instance.frames.append(frame)
                    instance.scores.extend(scores.tolist())
                items = [
                    {"id": p["id"], "actual": a}
                    for p, a in zip(answer["predictions"], truth[b * size :], strict=False)
                ]
                receiver = self.instances[(i + 1) % len(self.instances)]
                labels.append((receiver, json.dumps({"feedback": items}).encode()))
        for receiver, body in labels:
            answer = self._post(receiver, "/feedback", body)
            assert answer["rejected"] == 0
            if self.counting:
                receiver.labels += answer["accepted"]

    def synchronise(self) -> dict[str, int]:
        """Wait until Prometheus' last sample of every instance equals what the instance
        serves now; return each instance's last scrape time (ms)."""
        for instance in self.instances:
            direct = _direct_requests(instance.server.url)
            selector = f'{{instance="{instance.name}"}}'
            wait_until(
                lambda selector=selector, direct=direct: (
                    _prometheus_requests(self.fleet, selector) == direct
                ),
                20,
                interval=0.2,
                message=f"{instance.name}: Prometheus never caught up with {direct}",
            )
        times = {}
        for instance in self.instances:
            (up,) = self.fleet.prometheus.query(f'timestamp(up{{instance="{instance.name}"}})')
            times[instance.name] = round(float(up["value"][1]) * 1000)
        return times

    def aligned(self, name: str, matchers: str) -> str:
        """``increase()`` of each instance's series over exactly its own samples from the
        baseline to the last, joined: the extrapolation factor is exactly 1."""
        parts = [
            f'increase({name}{{{matchers}, instance="{i.name}"}}'
            f"[{i.end_ms - i.start_ms}ms] @ {i.end_ms / 1000:.3f})"
            for i in self.instances
        ]
        return "(\n  " + "\n  or ".join(parts) + "\n)"


def _psi_promql(bins: str, share: str, by: str) -> str:
    """The PSI of the notes (``../shared/notes/prometheus.md``) over given bin increases."""
    by_bin = f"{by}, bin" if by else "bin"
    live = (
        f"((sum by ({by_bin}) ({bins})) or on ({by_bin}) 0 * {share})\n"
        f"/ on ({by}) group_left () (sum by ({by}) ({bins}) > 0)"
    )
    left, right = f"clamp_min(({live}), {EPS})", f"clamp_min({share}, {EPS})"
    return (
        f"sum by ({by}) (\n  ({left} - on ({by_bin}) {right})\n"
        f"  * on ({by_bin}) ln({left} / on ({by_bin}) {right})\n)"
    )


def _counts(profile: ReferenceProfile, frames: list[Any], scores: list[float]) -> dict:
    """Python's bin counts per (feature, bin label), the score's under feature ``score``."""
    frame = pd.concat(frames, ignore_index=True)
    found: dict[tuple[str, str], int] = {}
    assert profile.score is not None
    for feature in [*profile.features, profile.score]:
        values = scores if feature is profile.score else frame[feature.name].tolist()
        for label, count in zip(feature.bins, bin_counts(feature, values), strict=True):
            found[("score" if feature is profile.score else feature.name, label)] = count
    return found


def _raw_bin_samples(
    fleet: Fleet, version: str, at: float
) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
    """Every target's raw ``model_feature_bin_total`` samples in the hour and lookback before
    ``at``, as ``(ms, value)``, by (feature, bin) and instance."""
    found: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for r in fleet.prometheus.query(f"model_feature_bin_total{{{version}}}[1h5m]", time=at):
        labels = r["metric"]
        samples = [(round(float(t) * 1000), float(v)) for t, v in r["values"]]
        found.setdefault((labels["feature"], labels["bin"]), {})[labels["instance"]] = samples
    return found


def _raw_increase(samples: Sequence[tuple[int, float]]) -> float:
    """What a counter's samples counted: their last value less the first, resets corrected."""
    total, last = 0.0, samples[0][1]
    for _, value in samples[1:]:
        total += value - last if value >= last else value
        last = value
    return total


def _rules_psi(
    fleet: Fleet, traffic: FleetTraffic, profile: ReferenceProfile, share: str, at: float
) -> tuple[dict[str, float], int, float]:
    """The rules' bins and PSI over the three targets at ``at``, checked per series against
    :func:`rules_increase`: exactly every row counted (``==``) for the instances that never
    restarted, and for the restarted one's series that went down once and stayed below their
    old value; ``increase()``'s estimate (1e-12) for its series that rose past it again. The
    PSI equals the PSI of those counts (1e-12) and lies within :func:`_psi_bound` of the
    pooled rows'. Returns the PSI per feature, how many series were estimated, and the
    largest relative distance to the rows' PSI."""
    model, end = Selector(model=MODEL, version="2"), round(at * 1000)
    bins = exact_increase(model, "model_feature_bin_total", "1h")
    computed = {
        r["metric"]["feature"]: float(r["value"][1])
        for r in fleet.prometheus.query(_psi_promql(bins, share, "feature"), time=at)
    }
    found = {
        (r["metric"]["feature"], r["metric"]["bin"], r["metric"]["instance"]): float(r["value"][1])
        for r in fleet.prometheus.query(bins, time=at)
    }
    raw = _raw_bin_samples(fleet, f'model="{MODEL}", version="2"', at)
    modelled = {
        (*key, i): (rules_increase(s, end - 3_600_000, end), _raw_increase(s))
        for key, targets in raw.items()
        for i, s in targets.items()
    }
    assert set(found) == {k for k, (value, _) in modelled.items() if value is not None}
    estimated = {k for k, (value, counted) in modelled.items() if value != counted}
    assert {k[2] for k in estimated} <= {traffic.instances[2].name}  # the restarted one
    for k, (value, counted) in modelled.items():
        if k in estimated:
            assert_close(f"estimated {k}", found[k], value, rel=1e-12)
        elif value is not None:
            assert found[k] == counted, k
    factors = [value / counted for value, counted in modelled.values() if value and counted]
    spread = max(factors) / min(factors)
    every_row = pd.concat([f for i in traffic.instances for f in i.all_frames])
    assert set(computed) == {f.name for f in profile.features}
    deviation = 0.0
    for f in profile.features:
        rows = bin_counts(f, every_row[f.name].tolist())
        series = [[k for k in modelled if k[:2] == (f.name, b)] for b in f.bins]
        assert [math.fsum(modelled[k][1] for k in keys) for keys in series] == rows
        live = [math.fsum(found.get(k, 0.0) for k in keys) for keys in series]
        assert_close(f"rules' PSI {f.name}", computed[f.name], psi(live, f.shares), rel=1e-12)
        pooled = psi(rows, f.shares)
        distance = abs(computed[f.name] - pooled)
        assert distance <= _psi_bound(rows, f.shares, spread), (f.name, distance, spread)
        deviation = max(deviation, distance / pooled)
    return computed, len(estimated), deviation


def _psi_bound(counts: Sequence[float], shares: Sequence[float], spread: float) -> float:
    """How far PSI can move from the PSI of ``counts`` when each count is scaled by its own
    factor in ``[f, f * spread]``: every live share then moves within ``[p / spread, p *
    spread]``, and each term ``(L - R) ln(L / R)`` (shares clamped at ``EPS``) by at most its
    slope's largest magnitude there (it is convex in ``L``: at an end) times that move."""
    total, bound = math.fsum(counts), 0.0
    for count, share in zip(counts, shares, strict=True):
        reference, low, high = max(share, EPS), count / total / spread, count / total * spread
        ends = (max(low, EPS), max(high, EPS))
        slope = max(abs(math.log(x / reference) + 1 - reference / x) for x in ends)
        bound += slope * (ends[1] - ends[0])
    return bound


def test_fleet_totals_and_psi_are_exact_across_a_restart(fleet: Fleet) -> None:
    """Three instances, one job: fleet-wide request totals, predictions, labels, bin counts and
    PSI from PromQL equal what was sent; instance C is SIGKILLed (master and workers) and
    restarted on its port between two rounds, and ``increase()`` still counts every request
    Prometheus had scraped before the kill.

    Exact: each instance's ``increase()`` runs from its sample of the baseline to its last
    sample (``[d ms] @ t``), so it extrapolates by exactly nothing; a counter reset (the
    restart) adds the value before it. The rules' PSI over the three targets (each series'
    increase over the hour, then summed; see :func:`_rules_psi`), evaluated by Prometheus at a
    chosen time once every scrape before it is stored: exact for the instances that never
    restarted and for the restarted one's series that stayed below their value before the
    kill; ``increase()``'s estimate for those that rose past it.
    """
    _use_version(fleet, "2")
    traffic = FleetTraffic(fleet, "2")
    traffic.round(1, 1, seed=300)  # every counted series exists on every instance
    for instance, start in zip(traffic.instances, traffic.synchronise().values(), strict=True):
        instance.start_ms = start
    traffic.counting = True
    traffic.round(6, 50, seed=310)
    traffic.synchronise()  # everything C answered is scraped: a "counted request"

    c = traffic.instances[2]
    c.server = fleet.restart(2)
    restarted = _direct_requests(c.server.url)
    assert restarted == {}, "the restarted instance did not start from an emptied directory"
    _warm_up(fleet, [c.server])  # its version 2 series scraped at zero: the reset is seen
    traffic.round(4, 50, seed=320)  # fewer than before the kill, per series: resets are seen
    for instance, end in zip(traffic.instances, traffic.synchronise().values(), strict=True):
        instance.end_ms = end

    # The raw counter lost the killed instance's history; increase() did not.
    raw = fleet.prometheus.value(f'sum(http_requests_total{{instance="{c.name}"}})')
    assert raw == 4 + 4 < sum(c.sent.values())  # the second round's predictions and labels

    every_request = traffic.aligned("http_requests_total", 'method=~".+"')
    requests = fleet.prometheus.query(f"sum by (instance, method, route, status) ({every_request})")
    counted = Counter()
    for r in requests:
        m = r["metric"]
        counted[(m["instance"], m["method"], m["route"], m["status"])] += float(r["value"][1])
    expected = Counter()
    for instance in traffic.instances:
        for key, n in instance.sent.items():
            expected[(instance.name, *key)] += n
    assert {k: v for k, v in counted.items() if v} == expected
    total = fleet.prometheus.value(f"sum({every_request})")
    assert total == sum(expected.values()) == 3 * (6 + 4) * 2

    version = f'model="{MODEL}", version="2"'
    rows = sum(len(i.scores) for i in traffic.instances)
    predictions = traffic.aligned("model_predictions_total", version)
    assert fleet.prometheus.value(f"sum({predictions})") == rows == 3 * 10 * 50
    confusion = traffic.aligned("model_confusion_total", version)
    assert fleet.prometheus.value(f"sum({confusion})") == rows
    assert [i.labels for i in traffic.instances] == [500, 500, 500]

    # Bin counts and PSI, fleet-wide, exact.
    profile = fleet.profiles["2"]
    python = _counts(
        profile,
        [f for i in traffic.instances for f in i.frames],
        [s for i in traffic.instances for s in i.scores],
    )
    feature_bins = traffic.aligned("model_feature_bin_total", version)
    score_bins = traffic.aligned("model_score_bin_total", version)
    promql = Counter()
    for r in fleet.prometheus.query(f"sum by (feature, bin) ({feature_bins})"):
        promql[(r["metric"]["feature"], r["metric"]["bin"])] = float(r["value"][1])
    for r in fleet.prometheus.query(f"sum by (bin) ({score_bins})"):
        promql[("score", r["metric"]["bin"])] = float(r["value"][1])
    assert promql == python

    shares = {f.name: f.shares for f in profile.features}
    assert profile.score is not None
    shares["score"] = profile.score.shares
    expected_psi = {
        name: psi([python[(name, b)] for b in labels], shares[name])
        for name, labels in (
            *((f.name, f.bins) for f in profile.features),
            ("score", profile.score.bins),
        )
    }
    feature_share = f"max by (feature, bin) (model_feature_reference_share{{{version}}})"
    score_share = f"max by (bin) (model_score_reference_share{{{version}}})"
    measured = {
        r["metric"]["feature"]: float(r["value"][1])
        for r in fleet.prometheus.query(_psi_promql(feature_bins, feature_share, "feature"))
    }
    (score,) = fleet.prometheus.query(_psi_promql(score_bins, score_share, ""))
    measured["score"] = float(score["value"][1])
    assert set(measured) == set(expected_psi)
    exact = max(
        assert_close(f"PSI {k}", measured[k], v, rel=1e-13, abs_=1e-13)
        for k, v in expected_psi.items()
    )

    # What the rules compute over the three targets (1h window: every row of version 2), at a
    # time T once every target has a scrape after T (scrapes of a target are stored in order,
    # so every one stamped before T is): one query, one view of the samples.
    at = max(i.end_ms for i in traffic.instances) / 1000 + 1.5
    wait_until(
        lambda: all(float(r["value"][1]) > at for r in fleet.prometheus.query("timestamp(up)")),
        15,
        interval=0.2,
        message=f"not every target was scraped after {at}",
    )
    computed, estimated, deviation = _rules_psi(fleet, traffic, profile, feature_share, at)
    wait_until(  # and the rules ran
        lambda: (
            {
                labels["feature"]
                for labels, _ in range_samples(
                    fleet.prometheus, f"ml:feature_psi:1h{{{version}}}", at
                )
            }
            == set(computed)
        ),
        15,
        interval=0.5,
        message="the rules never evaluated PSI after the traffic",
    )
    print(
        f"\nfleet PSI: aligned PromQL max relative error {exact:.1e}; the rules' PSI: "
        f"{estimated} series estimated (the restarted instance's, up past their old value), "
        f"{deviation:.1e} from the rows' PSI"
    )
