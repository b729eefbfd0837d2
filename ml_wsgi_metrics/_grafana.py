"""Grafana's JSON model as plain dicts: panels with Prometheus targets, a grid that places
them, template variables. What the panels show is :mod:`ml_wsgi_metrics.dashboard`'s; their
PromQL is :mod:`ml_wsgi_metrics._promql`'s."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "ALL",
    "DATASOURCE",
    "Grid",
    "Panel",
    "Query",
    "datasource_variable",
    "line_at",
    "panel",
    "query_variable",
    "ratio",
    "render_json",
]

Panel = dict[str, Any]
Query = tuple[str, str]  # (expr, legend)
#: Every panel's and target's datasource: the dashboard's datasource variable.
DATASOURCE = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
#: What a query variable's "All" stands for in PromQL.
ALL = ".*"


_OPTIONS: dict[str, dict[str, Any]] = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "bargauge": {"orientation": "vertical", "displayMode": "basic", "showUnfilled": True},
    "stat": {"colorMode": "background", "graphMode": "none", "textMode": "value_and_name"},
}


def panel(
    kind: str,
    title: str,
    queries: Sequence[Query],
    *,
    description: str = "",
    unit: str = "short",
    width: int = 8,
    height: int = 8,
    defaults: Mapping[str, Any] | None = None,
) -> Panel:
    """A panel of ``kind`` (timeseries, bargauge, stat) with one target per query; bar gauges
    and stats show the last value (instant queries). :class:`Grid` sets its place and id."""
    instant = kind != "timeseries"
    targets = [
        {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": expr,
            "legendFormat": legend,
            "instant": instant,
            "range": not instant,
        }
        for index, (expr, legend) in enumerate(queries)
    ]
    options = dict(_OPTIONS[kind])
    if instant:
        options["reduceOptions"] = {"calcs": ["lastNotNull"], "fields": "", "values": False}
    return {
        "id": 0,  # numbered by Grid.add
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "gridPos": {"h": height, "w": width, "x": 0, "y": 0},
        "fieldConfig": {"defaults": {"unit": unit, **(defaults or {})}, "overrides": []},
        "options": options,
        "targets": targets,
    }


def ratio() -> dict[str, Any]:
    """Field defaults of a share: 0 to 1."""
    return {"min": 0, "max": 1}


def line_at(value: float) -> dict[str, Any]:
    """Field defaults drawing a dashed threshold at ``value`` (red above)."""
    return {
        "thresholds": {
            "mode": "absolute",
            "steps": [{"color": "green", "value": None}, {"color": "red", "value": value}],
        },
        "custom": {"thresholdsStyle": {"mode": "dashed"}},
    }


class Grid:
    """Places panels left to right on lines of 24 columns, under rows, and numbers them.

    A collapsed row holds its panels (Grafana draws them when it is opened); the next row
    comes right below it.
    """

    def __init__(self) -> None:
        self.panels: list[Panel] = []
        self._into = self.panels
        self._next_id = 1
        self._x = self._y = self._height = 0
        self._after_collapsed: int | None = None

    def row(self, title: str, *, collapsed: bool = False) -> None:
        self._new_line()
        if self._after_collapsed is not None:
            self._y, self._after_collapsed = self._after_collapsed, None
        row: Panel = {
            "type": "row",
            "title": title,
            "id": self._take_id(),
            "collapsed": collapsed,
            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self._y},
            "panels": [],
        }
        self.panels.append(row)
        self._y += 1
        self._into = row["panels"] if collapsed else self.panels
        if collapsed:
            self._after_collapsed = self._y

    def add(self, *panels: Panel) -> None:
        for item in panels:
            grid = item["gridPos"]
            if self._x + grid["w"] > 24:
                self._new_line()
            grid.update(x=self._x, y=self._y)
            item["id"] = self._take_id()
            self._into.append(item)
            self._x += grid["w"]
            self._height = max(self._height, grid["h"])

    def _new_line(self) -> None:
        self._y += self._height
        self._x = self._height = 0

    def _take_id(self) -> int:
        self._next_id += 1
        return self._next_id - 1


def datasource_variable() -> dict[str, Any]:
    """``DS_PROMETHEUS``: every Prometheus datasource; ``prometheus`` (the provisioned uid)
    first."""
    return {
        "name": "DS_PROMETHEUS",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {"selected": False, "text": "Prometheus", "value": "prometheus"},
        "hide": 0,
        "includeAll": False,
        "multi": False,
        "options": [],
        "refresh": 1,
        "regex": "",
        "skipUrlSync": False,
    }


def query_variable(name: str, label: str, query: str) -> dict[str, Any]:
    """A multi-value variable listing a label's values (``label_values(...)``), "All" first."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": query,
        "query": query,
        "refresh": 2,  # at each time range change: new instances and versions appear
        "includeAll": True,
        "allValue": ALL,
        "multi": True,
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "options": [],
        "regex": "",
        "sort": 1,
        "hide": 0,
        "skipUrlSync": False,
    }


def render_json(dashboard: Mapping[str, Any]) -> str:
    """The dashboard as committed and imported: indented, keys in the order built."""
    return json.dumps(dashboard, indent=2, ensure_ascii=False) + "\n"
