"""The PromQL builder every generated selector goes through (rules and dashboards)."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_rules import PROMTOOL, run_promtool_tests

from ml_wsgi_metrics._promql import (
    LOOKBACK,
    MODEL,
    Names,
    Selector,
    duration,
    duration_ms,
    exact_increase,
    increase,
    model_selector,
    on,
    positive,
    rate,
    sum_by,
)


@pytest.mark.parametrize(
    ("selector", "text"),
    [
        pytest.param(Selector(), "", id="empty"),
        pytest.param(model_selector("churn", "3"), '{model="churn",version="3"}', id="model"),
        pytest.param(
            model_selector("churn", "3").where(sign="positive"),
            '{model="churn",version="3",sign="positive"}',
            id="where-appends",
        ),
        pytest.param(
            Selector(model="$model").matching("status", "5.."),
            '{model="$model",status=~"5.."}',
            id="grafana-variable-and-regex",
        ),
        pytest.param(
            Selector().variables("job", "instance"),
            '{job=~"$job",instance=~"$instance"}',
            id="grafana-variables",
        ),
        pytest.param(
            Selector(model="churn").variables("version").where(feature="x"),
            '{model="churn",version=~"$version",feature="x"}',
            id="variables-in-order",
        ),
        pytest.param(Selector().one_of("feature", ["x"]), '{feature="x"}', id="one-value"),
        pytest.param(
            Selector().one_of("feature", ["a.b", "c|d", "e"]),
            '{feature=~"a\\\\.b|c\\\\|d|e"}',
            id="alternation-escaped",
        ),
        pytest.param(Selector(model='we"ird\\'), '{model="we\\"ird\\\\"}', id="string-escaped"),
    ],
)
def test_selector_text(selector: Selector, text: str) -> None:
    assert str(selector) == text


def test_selectors_are_values() -> None:
    base = Selector(model="m")
    extended = base.where(version="1")
    assert str(base) == '{model="m"}'  # where() returns a new selector
    assert extended == Selector(model="m", version="1")
    assert hash(extended) == hash(Selector(model="m", version="1"))
    assert extended != base


def test_series_and_expressions() -> None:
    model = model_selector("churn", "3")
    assert model.series("up") == 'up{model="churn",version="3"}'
    assert Selector().range("x_total", "5m") == "x_total[5m]"
    assert sum_by((*MODEL, "le"), rate(model, "h_bucket", "1m")) == (
        'sum by (model, version, le) (rate(h_bucket{model="churn",version="3"}[1m]))'
    )
    assert increase(Selector(), "x_total", "1h") == "increase(x_total[1h])"
    assert f"a / {on(MODEL)} {positive('b')}" == "a / on (model, version) (b > 0)"


@pytest.mark.parametrize(
    ("namespace", "metric", "record"),
    [("", "model_predictions_total", "ml:psi"), ("svc", "svc_model_predictions_total", "svc:psi")],
)
def test_names(namespace: str, metric: str, record: str) -> None:
    names = Names(namespace)
    assert names.metric("model_predictions_total") == metric
    assert names.record("psi") == record


def test_exact_increase_text() -> None:
    """From the baseline (or zero) unless the counter went down from the lookback before the
    window on; plus its largest value when it went down once in the window and stayed below;
    else ``increase()``."""
    assert duration(duration_ms("1h") + duration_ms(LOOKBACK)) == "1h5m"
    assert [duration(duration_ms(d)) for d in ("90m", "1d2h", "1500ms", "14d")] == [
        "1h30m",
        "1d2h",
        "1s500ms",
        "2w",
    ]
    last, base = (
        'last_over_time(x{k="a"}[30m])',
        '(last_over_time(x{k="a"}[5m] offset 30m) or 0 * last_over_time(x{k="a"}[30m]))',
    )
    assert exact_increase(Selector(k="a"), "x", "30m") == (
        f"{last} - {base}\n"
        'unless resets(x{k="a"}[35m]) > 0\n'
        f'or (max_over_time(x{{k="a"}}[30m]) > {last}) + {last} - {base}\n'
        '  and resets(x{k="a"}[35m]) == 1 and resets(x{k="a"}[30m]) == 1\n'
        'or increase(x{k="a"}[30m])'
    )


#: One series per case, sampled every minute; ``exact_increase`` over 10 m at 30m30s: the
#: window holds minutes 21-30, each series' baseline is its last sample by 20m30s (minute 20).
EXACT_CASES = {
    # case: (input series, the exact increase; None: absent, or increase()'s)
    "at-the-start": ("100+1x30", 10.0),  # 130 - 120; increase() gives 10 too (aligned)
    "born-in-window": ("_x22 7+2x8", 23.0),  # 7..23 from zero; increase() gives 18
    "stale-in-window": ("0+1x24 stale", 4.0),  # 24 - 20: the last sample before it went stale
    "stale-at-the-start": ("0+1x19 stale 21+1x10", 11.0),  # 30 - 19: a failed scrape at 20
    "no-sample-in-window": ("0+1x15", None),  # absent: no increase to add
    "absent-at-the-start": ("0+1x10 _x11 15+1x8", 23.0),  # no baseline within 5m: counted whole
    "reset-in-window": ("0+10x25 3+1x5", 57.0),  # 250 - 200, then 3..7 from zero
    "born-then-reset": ("_x22 5+1x3 0+1x5", 12.0),  # 5..8 from zero, then 0..4
    "reset-and-above": ("0+1x25 0+20x5", None),  # 21..25 then 0..80: increase()
    "two-resets": ("100+1x22 0+1x3 0+1x4", None),  # increase()
    "reset-before-the-window": ("50+1x20 1+1x10", None),  # 70 -> 1 between baseline and window
}
ESTIMATED = ("reset-and-above", "two-resets", "reset-before-the-window")


@pytest.mark.requires_tool(PROMTOOL)
def test_exact_increase_on_promtool(tmp_path: Path) -> None:
    """What Prometheus (promtool's engine) makes of each case of :data:`EXACT_CASES`: exact
    values where the expression claims them, ``increase()``'s own value for the resets it
    cannot count (never a negative or a partial count), nothing for a series with no sample
    in the window."""
    exact = sum_by(("case",), exact_increase(Selector(), "c", "10m"))
    estimated = ESTIMATED
    expected = [
        {"labels": f'{{case="{case}"}}', "value": value}
        for case, (_, value) in EXACT_CASES.items()
        if value is not None
    ]
    resets = f'c{{case=~"{"|".join(estimated)}"}}'
    test = {
        "interval": "1m",
        "input_series": [
            {"series": f'c{{case="{case}"}}', "values": values}
            for case, (values, _) in EXACT_CASES.items()
        ],
        "promql_expr_test": [
            {"expr": f"{exact} unless {resets}", "eval_time": "30m30s", "exp_samples": expected},
            {
                "expr": f"{exact} - sum by (case) (increase({resets}[10m]))",
                "eval_time": "30m30s",
                "exp_samples": [{"labels": f'{{case="{case}"}}', "value": 0} for case in estimated],
            },
        ],
    }
    run_promtool_tests(tmp_path, {"groups": []}, [test])
