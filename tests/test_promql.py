"""The PromQL builder every generated selector goes through (rules and dashboards)."""

from __future__ import annotations

import pytest

from ml_wsgi_metrics._promql import (
    MODEL,
    Names,
    Selector,
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
