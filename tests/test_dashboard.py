"""``python -m ml_wsgi_metrics dashboard``: the Grafana dashboard generated from profiles.

Two models with different features (``alpha``: age, plan; ``beta``: weight, colour, distance,
no held-out accuracy) get their own rows of panels; every query of every panel, its template
variables resolved as Grafana does (each variable's own ``label_values`` query, all values
selected), returns data from a real Prometheus evaluating the generated rules over a real
gunicorn serving both models (``tests/apps/models_app.py``) with predictions and feedback.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from e2e_support import SECRET_KEY, running, write_rules
from support import GunicornServer, PrometheusServer, http_request, wait_until

from ml_wsgi_metrics import dashboard as dashboards
from ml_wsgi_metrics.__main__ import main
from ml_wsgi_metrics._grafana import panel
from ml_wsgi_metrics.dashboard import MODEL_PANELS, ModelView, generate_dashboard, render_json
from ml_wsgi_metrics.profile import ReferenceProfile, build_profile
from ml_wsgi_metrics.rules import RuleSettings

#: Rule windows long enough to hold the traffic while every query is checked.
WINDOWS = {"window": "5m", "ops_window": "2m"}
FEATURES = {"alpha": {"age", "plan"}, "beta": {"weight", "colour", "distance"}}
VERSIONS = {"alpha": "1", "beta": "7"}
CLASSES = {"alpha": ["no", "yes"], "beta": ["cat", "dog"]}


def _frame(model: str, rows: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    if model == "alpha":
        return pd.DataFrame(
            {"age": rng.normal(40, 12, rows).round(1), "plan": rng.choice(["basic", "pro"], rows)}
        )
    return pd.DataFrame(
        {
            "weight": rng.gamma(4, 2, rows).round(2),
            "colour": rng.choice(["red", "green", "blue"], rows, p=[0.5, 0.3, 0.2]),
            "distance": rng.uniform(0, 10, rows).round(3),
        }
    )


def _profile(model: str) -> ReferenceProfile:
    frame = _frame(model, 2000, seed=1)
    scores = np.random.default_rng(2).uniform(0, 1, len(frame))
    return build_profile(
        frame,
        model=model,
        version=VERSIONS[model],
        scores=scores,
        classes=CLASSES[model],
        accuracy=0.8 if model == "alpha" else None,
    )


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("profiles")
    paths = {}
    for model in FEATURES:
        paths[model] = directory / f"{model}.json"
        _profile(model).save(paths[model])
    return paths


def _load(profiles: dict[str, Path]) -> list[ReferenceProfile]:
    return [ReferenceProfile.load(path) for path in profiles.values()]


def _rows(board: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """The panels under each row (a collapsed row's own, or those that follow an open one)."""
    rows: dict[str, list[dict[str, Any]]] = {}
    current: list[dict[str, Any]] = []
    for item in board["panels"]:
        if item["type"] == "row":
            current = rows.setdefault(item["title"], list(item["panels"]))
        else:
            current.append(item)
    return rows


def _targets(board: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(panel title, expr)`` of every target, collapsed rows included."""
    for items in _rows(board).values():
        for item in items:
            for target in item["targets"]:
                yield item["title"], target["expr"]


# -- the generated JSON ------------------------------------------------------------------


def test_each_model_gets_its_own_feature_panels(profiles: dict[str, Path]) -> None:
    rows = _rows(generate_dashboard(_load(profiles)))
    for model, features in FEATURES.items():
        panels = rows[f"Model {model}: features"]
        titled = {p["title"].split(":")[0] for p in panels}
        assert titled == features  # and none of the other model's
        queries = [t["expr"] for p in panels for t in p["targets"]]
        assert all(f'model="{model}"' in q for q in queries)
        named = {re.search(r'feature="([^"]+)"', q).group(1) for q in queries}  # type: ignore[union-attr]
        assert named == features
        kinds = {p["title"] for p in panels}
        numeric = {"age", "weight", "distance"} & features
        categorical = features - numeric
        assert kinds == (
            {f"{f}: PSI and critical value" for f in features}
            | {f"{f}: mean and standard deviation" for f in numeric}
            | {f"{f}: category shares" for f in categorical}
        )
        assert [p["title"] for p in rows[f"Model {model}"]] == [
            f"{model}: predictions by class",
            f"{model}: score PSI, mean and standard deviation",
            f"{model}: data quality",
            f"{model}: accuracy, precision and recall",
            f"{model}: estimated accuracy (no labels)",
        ]
    accuracy = {
        model: [t["legendFormat"] for t in rows[f"Model {model}"][3]["targets"]]
        for model in FEATURES
    }
    assert "held-out {{version}}" in accuracy["alpha"]
    assert "held-out {{version}}" not in accuracy["beta"]  # beta's profile has no accuracy


def test_panels_are_numbered_once_and_never_overlap(profiles: dict[str, Path]) -> None:
    board = generate_dashboard(_load(profiles))
    ids = [p["id"] for p in board["panels"]] + [
        p["id"] for row in board["panels"] for p in row.get("panels", [])
    ]
    assert sorted(ids) == list(range(1, len(ids) + 1))
    # Top-level panels never overlap, nor do a collapsed row's, which start right below it
    # (Grafana moves what follows down when the row is opened).
    layers = [board["panels"]] + [row["panels"] for row in board["panels"] if row.get("panels")]
    collapsed = [None, *(r for r in board["panels"] if r.get("panels"))]
    for row, layer in zip(collapsed, layers, strict=True):
        cells: set[tuple[int, int]] = set()
        for item in layer:
            grid = item["gridPos"]
            assert grid["x"] + grid["w"] <= 24
            area = {
                (x, y)
                for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])
            }
            assert not area & cells, item["title"]
            cells |= area
        if row is not None:
            assert min(y for _, y in cells) == row["gridPos"]["y"] + 1
    for _, items in _rows(board).items():
        for item in items:
            refs = [t["refId"] for t in item["targets"]]
            assert refs == [chr(ord("A") + i) for i in range(len(refs))]


def test_series_follow_the_rules_settings(profiles: dict[str, Path]) -> None:
    settings = RuleSettings(namespace="shop", window="30m", ops_window="1m")
    queries = [q for _, q in _targets(generate_dashboard(_load(profiles), settings))]
    assert any(q.startswith("shop:feature_psi:30m{") for q in queries)
    assert any("shop:prediction_latency_seconds:p95_1m{" in q for q in queries)
    assert any("shop_http_requests_total{" in q for q in queries)
    assert not any(re.search(r"(?<![\w:])(ml:|http_requests_total)", q) for q in queries)


def test_a_model_panel_is_one_function(
    profiles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What issue 12's estimated accuracy will need: one more function in MODEL_PANELS."""

    def estimated(view: ModelView) -> list[dict[str, Any]]:
        query = view.recorded(f"estimated_accuracy:{view.window}")
        return [panel("timeseries", f"{view.name}: estimated", [(query, "")])]

    monkeypatch.setattr(dashboards, "MODEL_PANELS", (*MODEL_PANELS, estimated))
    rows = _rows(generate_dashboard(_load(profiles)))
    for model in FEATURES:
        added = rows[f"Model {model}"][-1]
        assert added["title"] == f"{model}: estimated"
        assert added["targets"][0]["expr"] == (
            f'ml:estimated_accuracy:1h{{model="{model}",version=~"$version"}}'
        )


def test_command_line(profiles: dict[str, Path], tmp_path: Path) -> None:
    output = tmp_path / "dashboard.json"
    arguments = ["dashboard", "--window", "30m", "--uid", "u1", "--title", "T", "-o", str(output)]
    for path in profiles.values():
        arguments += ["--profile", str(path)]
    assert main(arguments) == 0
    expected = generate_dashboard(_load(profiles), RuleSettings(window="30m"), uid="u1", title="T")
    assert output.read_text() == render_json(expected)
    assert json.loads(output.read_text())["uid"] == "u1"
    twice = [*arguments, "--profile", str(profiles["alpha"])]
    assert main(twice) == 2  # the same model version twice


# -- every query on a real Prometheus -------------------------------------------------------


def _post(url: str, payload: dict[str, Any]) -> Any:
    status, answer = http_request(
        url, "POST", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    assert status == 200, answer
    return json.loads(answer)


def _send_traffic(url: str, run: int) -> int:
    """Predictions of both models (both classes) and feedback for each; the labels sent."""
    labels = 0
    for index, model in enumerate(FEATURES):
        seed = 10 * run + index
        frame = _frame(model, 60, seed=100 + seed)
        scores = np.random.default_rng(200 + seed).uniform(0, 1, len(frame))
        actual = np.random.default_rng(300 + seed).choice(CLASSES[model], len(frame))
        for start in range(0, len(frame), 20):
            batch = slice(start, start + 20)
            body = {
                "rows": frame.iloc[batch].to_dict("records"),
                "scores": scores[batch].tolist(),
                "classes": [CLASSES[model][int(s > 0.5)] for s in scores[batch]],
            }
            path = f"/predict/{model}/{VERSIONS[model]}"
            ids = _post(url + path, body)["ids"]
            for prediction_id, truth in zip(ids, actual[batch], strict=True):
                _post(url + "/feedback", {"id": prediction_id, "actual": str(truth)})
                labels += 1
    return labels


def _resolve(prometheus: PrometheusServer, variables: list[dict[str, Any]]) -> dict[str, str]:
    """Each query variable's values from its own ``label_values`` query (earlier variables
    substituted), formatted as Grafana formats "All" of a multi-value Prometheus variable."""
    resolved: dict[str, str] = {}
    values: dict[str, list[str]] = {}
    for variable in variables:
        if variable["type"] != "query":
            continue
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"])
        assert match is not None, variable["query"]
        series = prometheus.api("series", **{"match[]": _substitute(match.group(1), resolved)})
        values[variable["name"]] = sorted({s[match.group(2)] for s in series})
        escaped = [re.escape(v).replace("\\", "\\\\") for v in values[variable["name"]]]
        resolved[variable["name"]] = "(" + "|".join(escaped) + ")"
    assert values["model"] == sorted(FEATURES)
    assert values["version"] == sorted(VERSIONS.values())
    assert values["job"] == ["app"] and len(values["instance"]) == 1
    return resolved


def _substitute(expr: str, resolved: dict[str, str]) -> str:
    for name in sorted(resolved, key=len, reverse=True):
        expr = expr.replace("$" + name, resolved[name])
    assert "$" not in expr, expr
    return expr


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(r["value"][1])) for r in result)


@pytest.mark.requires_tool("prometheus", "promtool")
def test_every_query_returns_data_on_a_real_prometheus(
    profiles: dict[str, Path], tmp_path: Path
) -> None:
    paths = [str(path) for path in profiles.values()]
    rules = write_rules(list(profiles.values()), tmp_path / "rules.yml", **WINDOWS)
    settings = RuleSettings(**WINDOWS)
    board = generate_dashboard(_load(profiles), settings)
    server = GunicornServer(
        "tests.apps.models_app:app",
        env={"TEST_PROFILES": ":".join(paths), "ML_WSGI_METRICS_SECRET_KEY": SECRET_KEY},
        workers=2,
    )
    prometheus = PrometheusServer([server.address], rule_files=[rules])
    with running(server, prometheus):
        labels = 0
        for run in range(2):  # the second after Prometheus saw the series the first made
            labels += _send_traffic(server.url, run)
            wait_until(
                lambda sent=labels: prometheus.value("sum(model_confusion_total)") == sent,
                30,
                interval=0.5,
                message="Prometheus never scraped every label",
            )
        resolved = _resolve(prometheus, board["templating"]["list"])
        pending = {(title, _substitute(expr, resolved)) for title, expr in _targets(board)}
        assert len(pending) >= 40

        def answered() -> bool:
            for item in list(pending):
                if _finite(prometheus.query(item[1])):  # raises on a PromQL error
                    pending.discard(item)
            return not pending

        with contextlib.suppress(TimeoutError):
            wait_until(answered, 30, interval=0.5)
        assert not pending, f"queries without data: {sorted(pending)}"
