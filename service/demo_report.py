"""What the demo prints at the end: requests sent against counted, predictions, PSI per
feature before and during the drift, accuracy, and the alerts, all read from Prometheus."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ml_wsgi_metrics.profile import ReferenceProfile
from service._servers import Prometheus
from service.loadgen import Summary

__all__ = ["DRIFT_ALERTS", "EXPECTED_ALERTS", "Report", "Snapshot", "number"]

DRIFT_ALERTS = ("ModelFeatureDrift", "ModelScoreDrift")
EXPECTED_ALERTS = ("ModelFeatureDrift", "ModelAccuracyDrop")


@dataclass
class Snapshot:
    """What Prometheus says about the model after a phase."""

    psi: dict[str, float]
    critical: dict[str, float]
    rows: float
    accuracy: float | None
    labels: float
    fired: set[str]  # alerts that fired at any time during the phase


def number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


class Report:
    """The demo's final report, printed with ``out``; ``window`` is the rules' window, and
    ``verdict`` says whether the alerts fired during the drift phase only (full runs)."""

    def __init__(self, out: Callable[[str], Any], window: str, *, verdict: bool) -> None:
        self.out = out
        self.window = window
        self.verdict = verdict

    def __call__(
        self,
        prometheus: Prometheus,
        sent: Summary,
        profile: ReferenceProfile,
        before: Snapshot,
        during: Snapshot,
        alerts: list[dict[str, Any]],
    ) -> None:
        self.out("")
        self.report_requests(prometheus, sent)
        self.report_predictions(prometheus)
        self.report_drift(profile, before, during)
        self.report_alerts(before, alerts)

    def report_requests(self, prometheus: Prometheus, sent: Summary) -> None:
        """Requests sent against requests counted, then rate and p95 latency per route."""
        w, out = self.window, self.out
        counted = prometheus.values(
            "sum by (method, route, status) (http_requests_total)", "method", "route", "status"
        )
        out("Requests: sent by the load generator / counted by Prometheus (http_requests_total)")
        for key in sorted(set(counted) | set(sent.requests)):
            mark = "" if counted.get(key, 0) == sent.requests.get(key, 0) else "   MISMATCH"
            method, route, status = key
            out(
                f"  {method:<6} {route:<13} {status:>5} {sent.requests.get(key, 0):>7} / "
                f"{counted.get(key, 0):>7.0f}{mark}"
            )
        rates = prometheus.values(f"sum by (route) (rate(http_requests_total[{w}]))", "route")
        p95 = prometheus.values(f"ml:http_request_duration_seconds:p95_{w}", "route")
        out(f"Per route over the last {w}: request rate and p95 latency")
        for (route,), rate in sorted(rates.items()):
            latency = p95.get((route,))
            shown = "-" if latency is None or latency != latency else f"{latency * 1000:.0f} ms"
            out(f"  {route:<13} {rate:>7.1f}/s   p95 {shown}")

    def report_predictions(self, prometheus: Prometheus) -> None:
        """Rows predicted per model version and class, and the p95 prediction latency."""
        predictions = prometheus.values(
            "sum by (model, version, class) (model_predictions_total)", "model", "version", "class"
        )
        latency = prometheus.values(
            f"ml:prediction_latency_seconds:p95_{self.window}", "model", "version"
        )
        self.out("Predictions by model and version (model_predictions_total)")
        by_model: dict[tuple[str, str], dict[str, float]] = {}
        for (model, version, label), value in predictions.items():
            if value:  # classes never predicted (pre-created at zero) are left out
                by_model.setdefault((model, version), {})[label] = value
        for (model, version), classes in sorted(by_model.items()):
            split = ", ".join(f"{c}: {v:.0f}" for c, v in sorted(classes.items()))
            p = latency.get((model, version))
            shown = "" if p is None or p != p else f", p95 prediction latency {p * 1000:.1f} ms"
            self.out(f"  {model} {version}: {sum(classes.values()):.0f} rows ({split}){shown}")

    def report_drift(self, profile: ReferenceProfile, before: Snapshot, during: Snapshot) -> None:
        """PSI per feature before and during the drift, and accuracy against the reference."""
        w, out = self.window, self.out
        out(f"PSI per feature over {w} (ml:feature_psi:{w}; drift when above the critical value)")
        out(f"  {'feature':<17} {'before':>8} {'during':>8} {'critical':>9}")
        for feature in sorted(during.psi, key=lambda f: -during.psi[f]):
            value, limit = during.psi[feature], during.critical.get(feature)
            flag = "  DRIFT" if limit is not None and value > limit else ""
            out(
                f"  {feature:<17} {number(before.psi.get(feature)):>8} {number(value):>8} "
                f"{number(limit):>9}{flag}"
            )
        out(f"  rows in the window: before {before.rows:.0f}, during {during.rows:.0f}")
        out(
            f"Accuracy over {w} (ml:accuracy:{w}): before {number(before.accuracy, 3)} "
            f"({before.labels:.0f} labels), during {number(during.accuracy, 3)} "
            f"({during.labels:.0f} labels); held-out reference {number(profile.accuracy, 3)}"
        )

    def report_alerts(self, before: Snapshot, alerts: list[dict[str, Any]]) -> None:
        """The alerts active now, and whether only the drift phase raised them."""
        out = self.out
        out("Alerts (Prometheus /api/v1/alerts)")
        early = sorted(before.fired & {*DRIFT_ALERTS, "ModelAccuracyDrop"})
        out(f"  during the undrifted phase: {', '.join(early) or 'no drift or accuracy alert'}")
        for alert in sorted(alerts, key=lambda a: (a["state"], a["labels"]["alertname"])):
            labels = alert["labels"]
            subject = labels.get("feature", "")
            value = float(alert.get("value", "nan"))
            out(
                f"  {alert['state']:<8} {labels['alertname']:<20} {subject:<15} "
                f"value {value:.4f}  {alert['annotations'].get('summary', '')}"
            )
        fired = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        verdict = (
            "as expected" if set(EXPECTED_ALERTS) <= fired and not early else "NOT as expected"
        )
        if self.verdict:
            out(f"  drift and accuracy alerts fired during the drift phase only: {verdict}")
