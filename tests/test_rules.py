"""Generated rules: ``promtool check rules``, and ``promtool test rules`` on synthetic series
covering every alert firing and not firing, with recording rules equal to Python's numbers."""

from __future__ import annotations

import math
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy import stats

from ml_wsgi_metrics.profile import CategoricalProfile, NumericProfile, ReferenceProfile
from ml_wsgi_metrics.rules import (
    RuleSettings,
    chi2_quantile,
    critical_value,
    generate_rules,
    psi,
    render_yaml,
)

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
needs_promtool = pytest.mark.requires_tool(PROMTOOL)

MINUTES = 90  # samples per series, one a minute
EVAL = "80m"  # the 1h window is fully sampled and the 10m "for" has elapsed


def make_profile(
    accuracy: float | None = 0.8, estimated_accuracy: float | None = 0.78
) -> ReferenceProfile:
    return ReferenceProfile(
        model="churn",
        version="3",
        rows=1000,
        features=(
            NumericProfile("x", (10.0, 20.0, 30.0), (0.25,) * 4, 1000, 0.0, 0.0, 40.0, 20.0, 11.5),
            CategoricalProfile("plan", ("basic", "pro"), (0.6, 0.4, 0.0), 1000, 0.0),
        ),
        score=NumericProfile("score", (0.5,), (0.5, 0.5), 1000, 0.0, 0.0, 1.0, 0.5, 0.29),
        classes=("No", "Yes"),
        accuracy=accuracy,
        estimated_accuracy=estimated_accuracy,
    )


# -- the math ------------------------------------------------------------------------------


@pytest.mark.parametrize("dof", [1, 2, 3, 5, 9, 19, 49])
@pytest.mark.parametrize("q", [0.9, 0.99, 0.999, 0.9995])
def test_chi2_quantile_matches_scipy(q: float, dof: int) -> None:
    assert chi2_quantile(q, dof) == pytest.approx(stats.chi2.ppf(q, dof), rel=1e-10)


def test_psi_and_critical_value() -> None:
    shares = [0.25, 0.25, 0.25, 0.25]
    assert psi([5, 5, 5, 5], shares) == 0
    assert psi([[1, 1, 1, 1], [3, 1, 0, 0]], shares)[1] == pytest.approx(
        (0.75 - 0.25) * math.log(3) + 3e-4 * 0 + (1e-4 - 0.25) * math.log(1e-4 / 0.25) * 2
    )
    limits = critical_value([100, 1000, 10**6], 10**5, 10, quantile=0.999, floor=0.01)
    assert limits[0] == pytest.approx(chi2_quantile(0.999, 9) * (1 / 100 + 1 / 10**5))
    assert limits[0] > limits[1] > limits[2] == 0.01  # shrinks with n, down to the floor
    with pytest.raises(ValueError):
        chi2_quantile(1.5, 3)


@pytest.mark.parametrize(
    ("field", "bad"),
    [("window", "1 hour"), ("quantile", 1.0), ("min_rows", 0), ("floor", -1), ("namespace", "a-b")],
)
def test_settings_are_validated(field: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=field):
        RuleSettings(**{field: bad})


# -- promtool check rules ------------------------------------------------------------------


def write_rules(tmp_path: Path, profiles: list[ReferenceProfile], **settings: Any) -> Path:
    rules, _ = generate_rules(profiles, RuleSettings(**settings))
    path = tmp_path / "rules.yml"
    path.write_text(render_yaml(rules))
    return path


@needs_promtool
@pytest.mark.parametrize("namespace", ["", "svc"])
def test_promtool_check_rules_passes(tmp_path: Path, namespace: str) -> None:
    bare = ReferenceProfile(
        model="odd model",
        version='v"1"',
        rows=10,
        features=(NumericProfile("a.b|c", (1.0,), (0.5, 0.5), 10, 0.0, 0.0, 2.0, 1.0, 0.5),),
    )  # no score, no classes; names that need quoting and regex escaping
    path = write_rules(tmp_path, [make_profile(), bare], namespace=namespace)
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout and "FAILED" not in result.stdout + result.stderr


def test_yaml_output_parses_to_the_same_rules() -> None:
    rules, _ = generate_rules([make_profile()])
    assert yaml.safe_load(render_yaml(rules)) == rules


def test_every_alert_comes_after_the_rules_it_reads() -> None:
    rules, _ = generate_rules([make_profile()])
    for group in rules["groups"]:
        recorded: set[str] = set()
        for rule in group["rules"]:
            used = set(re.findall(r"[a-z_]+:[a-z_0-9]+:?[a-z_0-9]*", rule["expr"]))
            assert used <= recorded, (rule.get("alert") or rule.get("record"), used - recorded)
            if "record" in rule:
                recorded.add(rule["record"])
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == {
        "ModelFeatureDrift",
        "ModelScoreDrift",
        "ModelAccuracyDrop",
        "ModelEstimatedAccuracyDrop",
        "ModelPredictionLatencyHigh",
        "ModelNoPredictions",
        "HTTPErrorRateHigh",
    }


def test_command_line(tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    make_profile().save(first)
    ReferenceProfile.from_dict({**make_profile(None).to_dict(), "version": "4"}).save(second)
    output = tmp_path / "rules.yml"
    command = [sys.executable, "-m", "ml_wsgi_metrics", "rules", "--profile", str(first)]
    result = subprocess.run(
        [*command, "--profile", str(second), "--window", "30m", "--output", str(output)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "no accuracy in the profile" in result.stderr  # version 4 has no accuracy
    text = output.read_text()
    assert "ml:feature_psi:30m" in text and "ml_wsgi_metrics:churn:4" in text
    failed = subprocess.run([*command, "--window", "soon"], capture_output=True, text=True)
    assert failed.returncode == 2 and "window" in failed.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "ml_wsgi_metrics", "rules", "--profile", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert missing.returncode == 2 and "error:" in missing.stderr


# -- promtool test rules -------------------------------------------------------------------

MODEL = {"model": "churn", "version": "3"}
INSTANCES = ("host-a:8000", "host-b:8000")  # every count is split across two targets


def _selector(name: str, labels: dict[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"


class Series:
    """Input series for one promtool test: counters growing at a rate per minute, gauges."""

    def __init__(self) -> None:
        self.items: list[dict[str, str]] = []

    def counter(self, name: str, labels: dict[str, str], per_minute: float) -> None:
        """Split over both instances; each grows linearly from 0 so increase() is exact."""
        halves = (per_minute / 2, per_minute / 2)
        for instance, rate in zip(INSTANCES, halves, strict=True):
            full = {**labels, "instance": instance, "job": "churn-service"}
            self.items.append({"series": _selector(name, full), "values": f"0+{rate}x{MINUTES}"})

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        for instance in INSTANCES:  # every worker exports the same reference share
            full = {**labels, "instance": instance, "job": "churn-service"}
            self.items.append({"series": _selector(name, full), "values": f"{value}+0x{MINUTES}"})


def model_series(
    series: Series,
    profile: ReferenceProfile,
    *,
    x: list[float],
    plan: list[float],
    score: list[float],
    sums: tuple[float, float, float],
    confusion: dict[tuple[str, str], float],
    predictions: float,
    latency_bucket: str,
) -> None:
    """Per-minute rates of every model series (bins in profile order)."""
    for feature, rates in zip(profile.features, (x, plan), strict=True):
        key = {**MODEL, "feature": feature.name}
        for bin_label, rate, share in zip(feature.bins, rates, feature.shares, strict=True):
            series.counter("model_feature_bin_total", {**key, "bin": bin_label}, rate)
            series.gauge("model_feature_reference_share", {**key, "bin": bin_label}, share)
        series.counter("model_feature_missing_total", key, 1)
        if isinstance(feature, CategoricalProfile):
            series.counter("model_feature_unseen_total", key, rates[-1])
    key = {**MODEL, "feature": "x"}
    positive, negative, squares = sums
    series.counter("model_feature_sum_total", {**key, "sign": "positive"}, positive)
    series.counter("model_feature_sum_total", {**key, "sign": "negative"}, negative)
    series.counter("model_feature_sum_squares_total", key, squares)
    series.counter("model_feature_out_of_range_total", key, 1)
    assert profile.score is not None
    for bin_label, rate, share in zip(profile.score.bins, score, profile.score.shares, strict=True):
        series.counter("model_score_bin_total", {**MODEL, "bin": bin_label}, rate)
        series.gauge("model_score_reference_share", {**MODEL, "bin": bin_label}, share)
    for (predicted, actual), rate in confusion.items():
        labels = {**MODEL, "predicted": predicted, "actual": actual}
        series.counter("model_confusion_total", labels, rate)
    for label in ("No", "Yes"):
        series.counter("model_predictions_total", {**MODEL, "class": label}, predictions / 2)
    for le in ("0.01", "0.5", "1.0", "+Inf"):
        rate = 10 if float(le) >= float(latency_bucket) else 0
        name = "model_prediction_latency_seconds_bucket"
        series.counter(name, {**MODEL, "le": le}, rate)


def http_series(series: Series, ok: float, errors: float) -> None:
    base = {"method": "POST", "route": "/predict"}
    series.counter("http_requests_total", {**base, "status": "200"}, ok)
    series.counter("http_requests_total", {**base, "status": "500"}, errors)
    for le, share in (("0.05", 0.5), ("0.1", 0.9), ("0.25", 1.0), ("+Inf", 1.0)):
        series.counter("http_request_duration_seconds_bucket", {**base, "le": le}, share * 20)


def close_to(expr: str, expected: float, labels: str, tolerance: float = 1e-9) -> dict[str, Any]:
    """A promql_expr_test that holds when ``expr`` is within ``tolerance`` (relative)."""
    bound = tolerance * max(1.0, abs(expected))
    return {
        "expr": f"abs({expr} - {expected!r}) < bool {bound!r}",
        "eval_time": EVAL,
        "exp_samples": [{"labels": labels, "value": 1}],
    }


def render_annotation(template: str, labels: dict[str, str], value: float) -> str:
    """Go template rendering for the two forms our annotations use."""
    text = re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels[m.group(1)], template)
    return re.sub(
        r'\{\{ \$value \| printf "%\.(\d)f" \}\}', lambda m: f"{value:.{m.group(1)}f}", text
    )


def alert_test(
    rules: dict[str, Any], name: str, firing: list[tuple[dict[str, str], float]]
) -> dict[str, Any]:
    """An alert_rule_test expecting exactly ``firing`` (labels, $value) at EVAL."""
    rule = next(r for g in rules["groups"] for r in g["rules"] if r.get("alert") == name)
    return {
        "eval_time": EVAL,
        "alertname": name,
        "exp_alerts": [
            {
                "exp_labels": {**labels, **rule["labels"]},
                "exp_annotations": {
                    key: render_annotation(text, labels, value)
                    for key, text in rule["annotations"].items()
                },
            }
            for labels, value in firing
        ],
    }


def python_psi(rates: list[float], shares: tuple[float, ...]) -> float:
    return float(psi(np.asarray(rates) * 60, shares))


def run_promtool_tests(tmp_path: Path, rules: dict[str, Any], tests: list[dict[str, Any]]) -> None:
    (tmp_path / "rules.yml").write_text(render_yaml(rules))
    test_file = tmp_path / "rules_test.yml"
    spec = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": tests}
    test_file.write_text(render_yaml(spec))
    result = subprocess.run(
        [PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr


ACCURATE = {("No", "No"): 4, ("Yes", "Yes"): 4, ("No", "Yes"): 1, ("Yes", "No"): 1}
INACCURATE = {("No", "No"): 2.5, ("Yes", "Yes"): 2.5, ("No", "Yes"): 2.5, ("Yes", "No"): 2.5}


@needs_promtool
def test_promtool_healthy_model_raises_nothing_and_rules_equal_python(tmp_path: Path) -> None:
    profile = make_profile()
    rules, _ = generate_rules([profile])
    series = Series()
    x, plan, score = [5, 5, 5, 5], [6, 4, 0], [10, 10]  # exactly the reference shares
    model_series(
        series,
        profile,
        x=x,
        plan=plan,
        score=score,
        sums=(100, 10, 2000),
        confusion=ACCURATE,
        predictions=20,
        latency_bucket="0.01",
    )
    http_series(series, ok=100, errors=1)
    x_labels = '{feature="x",model="churn",version="3"}'
    mv = '{model="churn",version="3"}'
    checks = [
        close_to('ml:feature_psi:1h{feature="x"}', 0.0, x_labels),
        close_to('ml:feature_rows:increase1h{feature="x"}', 1200.0, x_labels),
        close_to('ml:feature_mean:1h{feature="x"}', (100 - 10) / 20, x_labels),
        close_to('ml:feature_stddev:1h{feature="x"}', math.sqrt(2000 / 20 - 4.5**2), x_labels),
        close_to('ml:feature_missing_ratio:1h{feature="x"}', 1 / 21, x_labels),
        close_to('ml:feature_out_of_range_ratio:1h{feature="x"}', 1 / 20, x_labels),
        close_to("ml:accuracy:1h", 0.8, mv),
        close_to('ml:precision:1h{class="Yes"}', 0.8, '{class="Yes",model="churn",version="3"}'),
        close_to('ml:recall:1h{class="No"}', 0.8, '{class="No",model="churn",version="3"}'),
        close_to("ml:http_error_ratio:5m", 1 / 101, '{job="churn-service"}'),
        close_to("ml:predictions:rate5m", 20 / 60, mv),
    ]
    alerts = [
        alert_test(rules, name, [])
        for name in (
            "ModelFeatureDrift",
            "ModelScoreDrift",
            "ModelAccuracyDrop",
            "ModelPredictionLatencyHigh",
            "ModelNoPredictions",
            "HTTPErrorRateHigh",
        )
    ]
    test = {
        "interval": "1m",
        "input_series": series.items,
        "promql_expr_test": checks,
        "alert_rule_test": alerts,
    }
    run_promtool_tests(tmp_path, rules, [test])


@needs_promtool
def test_promtool_every_alert_fires(tmp_path: Path) -> None:
    profile = make_profile()
    rules, _ = generate_rules([profile])
    series = Series()
    x, plan, score = [1, 2, 7, 10], [2, 3, 1], [3, 17]
    model_series(
        series,
        profile,
        x=x,
        plan=plan,
        score=score,
        sums=(300, 0, 9000),
        confusion=INACCURATE,
        predictions=0,  # and yet bins grow: the series are synthetic
        latency_bucket="1.0",
    )
    http_series(series, ok=80, errors=20)
    x_psi = python_psi(x, profile.features[0].shares)
    plan_psi = python_psi(plan, profile.features[1].shares)
    assert profile.score is not None
    score_psi = python_psi(score, profile.score.shares)
    mv = {"model": "churn", "version": "3"}
    checks = [
        close_to(
            'ml:feature_psi:1h{feature="x"}', x_psi, '{feature="x",model="churn",version="3"}'
        ),
        close_to(
            'ml:feature_psi:1h{feature="plan"}',
            plan_psi,
            '{feature="plan",model="churn",version="3"}',
        ),
        close_to("ml:score_psi:1h", score_psi, '{model="churn",version="3"}'),
        close_to(
            'ml:feature_stddev:1h{feature="x"}',
            math.sqrt(450 - 15**2),
            '{feature="x",model="churn",version="3"}',
        ),
        close_to(
            'ml:feature_unseen_ratio:1h{feature="plan"}',
            1 / 6,
            '{feature="plan",model="churn",version="3"}',
        ),
    ]
    alerts = [
        alert_test(
            rules,
            "ModelFeatureDrift",
            [({**mv, "feature": "plan"}, plan_psi), ({**mv, "feature": "x"}, x_psi)],
        ),
        alert_test(rules, "ModelScoreDrift", [(mv, score_psi)]),
        alert_test(rules, "ModelAccuracyDrop", [(mv, 0.5)]),
        alert_test(rules, "ModelPredictionLatencyHigh", [(mv, 0.975)]),
        alert_test(rules, "ModelNoPredictions", [(mv, 1.0)]),
        alert_test(rules, "HTTPErrorRateHigh", [({"job": "churn-service"}, 0.2)]),
    ]
    test = {
        "interval": "1m",
        "input_series": series.items,
        "promql_expr_test": checks,
        "alert_rule_test": alerts,
    }
    run_promtool_tests(tmp_path, rules, [test])


def _drift_only(
    profile: ReferenceProfile, x_rates: list[float], confusion: dict[tuple[str, str], float]
) -> Series:
    series = Series()
    model_series(
        series,
        profile,
        x=x_rates,
        plan=[6, 4, 0],
        score=[10, 10],
        sums=(1, 0, 1),
        confusion=confusion,
        predictions=20,
        latency_bucket="0.01",
    )
    return series


@needs_promtool
def test_promtool_drift_threshold_shrinks_with_the_window(tmp_path: Path) -> None:
    """The same moderate shift: silent on a few hundred rows, an alert on thousands; nothing
    below min_rows however strong; the accuracy alert likewise gated on labelled rows."""
    profile = make_profile()
    rules, _ = generate_rules([profile])
    settings = RuleSettings()
    shares = profile.features[0].shares
    moderate = [0.15, 0.25, 0.25, 0.35]
    few, many = [4 * s for s in moderate], [100 * s for s in moderate]  # 240 and 6,000 rows
    value = python_psi(moderate, shares)
    limit = lambda n: float(critical_value(n, 1000, 4, quantile=settings.quantile))  # noqa: E731
    assert limit(6000) < value < limit(240)  # the premise of this test
    strong = [1.5, 0, 0, 0]  # 90 rows, all in one bin: huge PSI, below min_rows
    assert python_psi(strong, shares) > limit(90)
    scarce = {cell: rate / 10 for cell, rate in INACCURATE.items()}  # 60 labels: too few
    mv = {"model": "churn", "version": "3", "feature": "x"}
    tests = []
    for rates, confusion, drift in (
        (few, scarce, []),
        (many, ACCURATE, [(mv, value)]),
        (strong, scarce, []),
    ):
        tests.append(
            {
                "interval": "1m",
                "input_series": _drift_only(profile, rates, confusion).items,
                "alert_rule_test": [
                    alert_test(rules, "ModelFeatureDrift", drift),
                    alert_test(rules, "ModelAccuracyDrop", []),
                ],
            }
        )
    run_promtool_tests(tmp_path, rules, tests)


@needs_promtool
def test_promtool_fixed_accuracy_threshold_and_namespace(tmp_path: Path) -> None:
    profile = make_profile(accuracy=None)
    rules, warnings = generate_rules([profile], RuleSettings(min_accuracy=0.85, namespace="svc"))
    assert not warnings
    series = _drift_only(profile, [5, 5, 5, 5], ACCURATE)  # accuracy 0.8 < 0.85
    for item in series.items:
        item["series"] = "svc_" + item["series"]
    test = {
        "interval": "1m",
        "input_series": series.items,
        "promql_expr_test": [close_to("svc:accuracy:1h", 0.8, '{model="churn",version="3"}')],
        "alert_rule_test": [
            alert_test(rules, "ModelAccuracyDrop", [({"model": "churn", "version": "3"}, 0.8)]),
            alert_test(rules, "ModelFeatureDrift", []),
        ],
    }
    run_promtool_tests(tmp_path, rules, [test])


def test_profile_without_accuracy_warns_and_leaves_the_alert_out() -> None:
    rules, warnings = generate_rules([make_profile(accuracy=None)])
    assert any("no accuracy" in w for w in warnings)
    names = {r.get("alert") for g in rules["groups"] for r in g["rules"]}
    assert "ModelAccuracyDrop" not in names and "ModelFeatureDrift" in names
