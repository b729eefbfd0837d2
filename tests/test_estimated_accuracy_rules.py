"""The estimated-accuracy rules under ``promtool test rules``: the recorded estimate equals
expected correct predictions over scored rows, summed across instances, and
``ModelEstimatedAccuracyDrop`` fires on a drop below the held-out estimate with enough rows
only."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from test_rules import (
    MODEL,
    Series,
    alert_test,
    close_to,
    make_profile,
    needs_promtool,
    run_promtool_tests,
)

from ml_wsgi_metrics.__main__ import main
from ml_wsgi_metrics.rules import RuleSettings, generate_rules

SELECTOR = '{model="churn",version="3"}'


def scored(series: Series, rows_per_minute: float, expected_per_minute: float) -> None:
    """Score bins (the rows with a finite score) and the expected-correct counter, split over
    two instances; the profile's held-out estimate as every worker exports it."""
    for bin_label in ("0", "1"):
        labels = {**MODEL, "bin": bin_label}
        series.counter("model_score_bin_total", labels, rows_per_minute / 2)
    series.counter("model_expected_correct_total", MODEL, expected_per_minute)
    series.gauge("model_reference_estimated_accuracy", MODEL, 0.78)


def scenario(rows: float, expected: float, firing: list[float]) -> dict[str, object]:
    series = Series()
    scored(series, rows, expected)
    estimate = expected / rows
    return {
        "interval": "1m",
        "input_series": series.items,
        "promql_expr_test": [
            close_to(f"ml:estimated_accuracy:1h{SELECTOR}", estimate, SELECTOR),
            close_to(f"ml:reference_estimated_accuracy{SELECTOR}", 0.78, SELECTOR),
        ],
        "alert_rule_test": [
            alert_test(RULES, "ModelEstimatedAccuracyDrop", [(MODEL, v) for v in firing])
        ],
    }


RULES, _ = generate_rules([make_profile()])


@needs_promtool
def test_promtool_estimate_and_alert(tmp_path: Path) -> None:
    run_promtool_tests(
        tmp_path,
        RULES,
        [
            scenario(rows=20, expected=16, firing=[]),  # 0.8: at the held-out 0.78
            scenario(rows=20, expected=14.8, firing=[]),  # 0.74: within the 0.05 margin
            scenario(rows=20, expected=12, firing=[0.6]),  # 0.6: a drop
            scenario(rows=1.5, expected=0.9, firing=[]),  # 0.6, but 90 rows < min_rows 100
        ],
    )


@needs_promtool
def test_promtool_margin_and_min_rows_come_from_the_settings(tmp_path: Path) -> None:
    rules, _ = generate_rules([make_profile()], RuleSettings(estimate_drop=0.01, min_rows=50))
    series = Series()
    scored(series, 1.5, 1.125)  # 0.75, 90 rows: fires with these settings
    test = {
        "interval": "1m",
        "input_series": series.items,
        "alert_rule_test": [alert_test(rules, "ModelEstimatedAccuracyDrop", [(MODEL, 0.75)])],
    }
    run_promtool_tests(tmp_path, rules, [test])


def test_without_a_held_out_estimate_the_alert_is_left_out_with_a_warning() -> None:
    rules, warnings = generate_rules([make_profile(estimated_accuracy=None)])
    assert warnings == [
        "churn 3: no estimated_accuracy in the profile: the estimated accuracy alert is left out"
    ]
    names = {r.get("alert") or r.get("record") for g in rules["groups"] for r in g["rules"]}
    assert "ml:estimated_accuracy:1h" in names  # the estimate itself needs no reference
    assert "ModelEstimatedAccuracyDrop" not in names


def test_without_a_score_profile_there_is_no_estimate() -> None:
    profile = dataclasses.replace(make_profile(), score=None)
    rules, _ = generate_rules([profile])
    text = str(rules)
    assert "estimated_accuracy" not in text and "expected_correct" not in text


def test_the_command_line_takes_the_margin(tmp_path: Path) -> None:
    make_profile().save(tmp_path / "profile.json")
    output = tmp_path / "rules.yml"
    arguments = ["rules", "--profile", str(tmp_path / "profile.json"), "-o", str(output)]
    assert main([*arguments, "--estimate-drop", "0.02"]) == 0
    assert 'ml:reference_estimated_accuracy{model="churn",version="3"} - 0.02)' in (
        output.read_text()
    )


@pytest.mark.parametrize("bad", [0, -0.1, float("nan")])
def test_the_margin_is_validated(bad: float) -> None:
    with pytest.raises(ValueError, match="estimate_drop"):
        RuleSettings(estimate_drop=bad)
