"""What the load generator sends: every request of a run decided up front from a seed (the
same seed, the same run), drawn from the configured data set, drifted from a given request on.

See :mod:`service.loadgen`, which sends the plan and posts the labels.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from ml_wsgi_metrics import UNMATCHED
from service.data import TARGET, load_data
from service.pipeline import load_config

__all__ = [
    "BAD_KINDS",
    "JSON",
    "MIX",
    "UNKNOWN_PATHS",
    "Drift",
    "Request",
    "dumps",
    "load_rows",
    "plan_requests",
]

JSON = "application/json"
#: Share of each kind of request (a ``GET /predict`` replaces every ``page_every``-th).
MIX: dict[str, float] = {"single": 0.62, "batch": 0.2, "index": 0.03, "bad": 0.09, "unknown": 0.06}
#: Bad requests: kind -> (method, path, route label). Bodies are made in :func:`bad_request`.
BAD_KINDS: dict[str, tuple[str, str, str]] = {
    "malformed_json": ("POST", "/predict", "/predict"),
    "wrong_content_type": ("POST", "/predict", "/predict"),
    "missing_column": ("POST", "/predict", "/predict"),
    "nan_value": ("POST", "/predict", "/predict"),
    "empty_batch": ("POST", "/predict", "/predict"),
    "forged_feedback": ("POST", "/feedback", "/feedback"),
    "method_not_allowed": ("PUT", "/predict", UNMATCHED),  # no route matches a refused method
}
UNKNOWN_PATHS = ("/admin", "/wp-login.php", "/predict/v2", "/.env", "/api/v1/predict")


@dataclass(frozen=True)
class Drift:
    """How drifted rows differ: MonthlyCharges times ``U(*charges)``, and a share of one- and
    two-year contracts turned month-to-month."""

    charges: tuple[float, float] = (1.10, 1.20)
    contract_share: float = 0.3

    def apply(self, row: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        row = dict(row)
        row["MonthlyCharges"] = round(row["MonthlyCharges"] * rng.uniform(*self.charges), 2)
        if row["Contract"] != "Month-to-month" and rng.random() < self.contract_share:
            row["Contract"] = "Month-to-month"
        return row


#: The drift of drifted rows unless a run gives its own.
DEFAULT_DRIFT = Drift()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    route: str
    kind: str
    body: bytes | None = None
    content_type: str | None = None
    rows: tuple[int, ...] = ()  # indices of the data rows sent
    drifted: bool = False


def load_rows(
    config_path: str | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The configured data set as request rows (JSON types, no label) and their labels."""
    config = load_config(config_path)
    frame = load_data(config.data_path, n_rows=config.n_rows, seed=config.seed)
    return rows_of(frame)


def rows_of(frame: pd.DataFrame) -> tuple[list[dict[str, Any]], list[str]]:
    labels = frame[TARGET].astype(str).tolist()
    rows = json.loads(frame.drop(columns=[TARGET]).to_json(orient="records"))
    return rows, labels


def dumps(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":")).encode()


def bad_request(kind: str, row: dict[str, Any]) -> tuple[bytes | None, str | None]:
    if kind == "malformed_json":
        return b'{"rows": [{"gender": "Female",', JSON
    if kind == "wrong_content_type":
        return dumps(row), "text/plain"
    if kind == "missing_column":
        return dumps({k: v for k, v in row.items() if k != "tenure"}), JSON
    if kind == "nan_value":
        return dumps({**row, "MonthlyCharges": float("nan")}), JSON  # a NaN token
    if kind == "empty_batch":
        return b'{"rows": []}', JSON
    if kind == "forged_feedback":
        forged = "WyJjaHVybl9sb2dyZWciXQ.aAaAaA." + "x" * 27
        return dumps({"id": forged, "actual": "Yes"}), JSON
    return None, None  # method_not_allowed


def plan_requests(
    count: int,
    rows: Sequence[dict[str, Any]],
    rng: np.random.Generator,
    drift_from: int | None,
    drift: Drift,
    page_every: int,
) -> list[Request]:
    """Every request of the run, decided up front from ``rng`` (the same seed, the same run)."""
    kinds = rng.choice(list(MIX), size=count, p=np.array(list(MIX.values())) / sum(MIX.values()))
    plan = []
    for i, kind in enumerate(kinds.tolist()):
        drifted = drift_from is not None and i >= drift_from
        if page_every and not drifted and i % page_every == 0:
            plan.append(Request("GET", "/predict", "/predict", "page"))
            continue
        if kind in ("single", "batch"):
            size = 1 if kind == "single" else int(rng.integers(2, 11))
            picked = tuple(int(r) for r in rng.integers(0, len(rows), size))
            sent = [drift.apply(rows[r], rng) if drifted else rows[r] for r in picked]
            payload: Any = sent[0] if kind == "single" else {"rows": sent}
            plan.append(
                Request("POST", "/predict", "/predict", kind, dumps(payload), JSON, picked, drifted)
            )
        elif kind == "index":
            plan.append(Request("GET", "/", "/", kind))
        elif kind == "unknown":
            path = UNKNOWN_PATHS[int(rng.integers(len(UNKNOWN_PATHS)))]
            plan.append(Request("GET", path, UNMATCHED, kind))
        else:
            bad = list(BAD_KINDS)[int(rng.integers(len(BAD_KINDS)))]
            method, path, route = BAD_KINDS[bad]
            body, content_type = bad_request(bad, rows[int(rng.integers(len(rows)))])
            plan.append(Request(method, path, route, f"bad:{bad}", body, content_type))
    return plan
