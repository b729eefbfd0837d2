"""Grafana dashboards generated from reference profiles, beside the rules of :mod:`.rules`.

One dashboard serves a fleet and several models: template variables pick the datasource, the
job, the instances, the models and the versions. Request and worker panels read the raw series,
which the job and instance variables filter; model panels read the series recorded by the rules
``python -m ml_wsgi_metrics rules`` writes with the same namespace and windows (exact across
workers and hosts, so for every instance at once), which the model and version variables filter.
Each model of the profiles gets a row of its own panels (:data:`MODEL_PANELS`: one function
each) and a collapsed row with, per feature, PSI against its critical value, then mean and
standard deviation (numeric) or category shares (categorical).

The JSON is built with plain dicts (:mod:`._grafana`); the README says why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ._grafana import (
    Grid,
    Panel,
    datasource_variable,
    line_at,
    panel,
    query_variable,
    ratio,
    render_json,
)
from ._model_panels import (
    HOSTS,
    MODEL_PANELS,
    ModelView,
    Series,
    feature_panels,
    timeseries,
)
from ._promql import MODEL, Names, Selector, increase, max_by, on, positive, rate, sum_by
from .profile import ReferenceProfile
from .rules import RuleSettings

__all__ = ["MODEL_PANELS", "ModelView", "generate_dashboard", "render_json"]

# -- every dashboard: service and models ----------------------------------------------------


def _request_panels(s: Series) -> list[Panel]:
    ow, requests = s.settings.ops_window, s.names.metric("http_requests_total")
    per_job = sum_by(("job",), rate(HOSTS, requests, ow))
    client_errors = sum_by(("job",), rate(HOSTS.matching("status", "4.."), requests, ow))
    duration = s.names.metric("http_request_duration_seconds_bucket")

    def quantile(q: float) -> str:
        return f"histogram_quantile({q}, {sum_by(('le', 'route'), rate(HOSTS, duration, ow))})"

    return [
        timeseries(
            "Request rate by route and status",
            [(sum_by(("route", "status"), rate(HOSTS, requests, ow)), "{{route}} {{status}}")],
            unit="reqps",
        ),
        timeseries(
            "Error rate",
            [
                (s.recorded(f"http_error_ratio:{ow}", Selector().variables("job")), "5xx {{job}}"),
                (
                    f"(\n  {client_errors}\n  or {on(('job',))} 0 * {per_job}\n)\n"
                    f"/ {on(('job',))} {positive(per_job)}",
                    "4xx {{job}}",
                ),
            ],
            description="Share of requests answered 5xx (the recorded ratio HTTPErrorRateHigh "
            "reads, per job) and 4xx (the selected instances).",
            unit="percentunit",
            defaults=ratio(),
        ),
        timeseries(
            "In-progress requests",
            [(sum_by(("route",), s.raw("http_requests_in_progress")), "{{route}}")],
        ),
        timeseries("Request latency p95 per endpoint", [(quantile(0.95), "{{route}}")], unit="s"),
        timeseries(
            "Request latency p50 and p99 per endpoint",
            [(quantile(0.5), "p50 {{route}}"), (quantile(0.99), "p99 {{route}}")],
            unit="s",
        ),
        timeseries(
            "Requests per instance",
            [(sum_by(("instance",), rate(HOSTS, requests, ow)), "{{instance}}")],
            unit="reqps",
        ),
    ]


def _worker_panels(s: Series) -> list[Panel]:
    ow, w, names = s.settings.ops_window, s.settings.window, s.names
    cpu = rate(HOSTS, names.metric("gunicorn_worker_cpu_seconds_total"), ow)
    restarts = increase(HOSTS, names.metric("gunicorn_worker_restarts_total"), w)
    each = "{{instance}} {{worker}}"
    return [
        timeseries(
            "Worker memory (RSS)",
            [(s.raw("gunicorn_worker_resident_memory_bytes"), each)],
            unit="bytes",
        ),
        timeseries("Worker CPU", [(cpu, each)], unit="percentunit"),
        timeseries(
            "Workers alive and restarts",
            [
                (sum_by(("instance",), s.raw("gunicorn_workers")), "alive {{instance}}"),
                (sum_by(("instance",), restarts), "restarts {{instance}}"),
            ],
        ),
    ]


def _prediction_panels(s: Series) -> list[Panel]:
    ow, mv = s.settings.ops_window, "{{model}} {{version}}"
    predictions = s.raw("model_predictions_total", HOSTS.variables(*MODEL))
    return [
        timeseries("Total predictions by model", [(sum_by(MODEL, predictions), mv)]),
        timeseries("Prediction rate", [(s.recorded(f"predictions:rate{ow}"), mv)], unit="ops"),
        timeseries(
            "Prediction latency p95",
            [(s.recorded(f"prediction_latency_seconds:p95_{ow}"), mv)],
            unit="s",
        ),
    ]


def _drift_panels(s: Series) -> list[Panel]:
    w = s.settings.window
    psi = s.recorded(f"feature_psi:{w}")
    critical = s.recorded(f"feature_psi_critical:{w}")
    return [
        timeseries(
            "PSI per feature",
            [(psi, "{{model}} {{version}} {{feature}}")],
            description=f"Population stability index over {w} against the reference profile.",
            width=12,
        ),
        timeseries(
            "Drift: PSI / critical value per feature",
            [
                (
                    f"{psi}\n/ {on((*MODEL, 'feature'))} {critical}",
                    "{{model}} {{version}} {{feature}}",
                )
            ],
            description="Above 1: more drift than the rows in the window explain "
            "(ModelFeatureDrift fires once enough rows came).",
            width=12,
            defaults=line_at(1),
        ),
        panel(
            "bargauge",
            "Score distribution",
            [
                (s.recorded(f"score_live_share:{w}"), "live {{model}} {{bin}}"),
                (s.recorded("score_reference_share"), "reference {{model}} {{bin}}"),
            ],
            description=f"Share of scores per reference bin over {w}, live and reference.",
            unit="percentunit",
            width=24,
            defaults=ratio(),
        ),
    ]


def _ground_truth_panels(s: Series) -> list[Panel]:
    w, mv, chosen = s.settings.window, "{{model}} {{version}}", HOSTS.variables(*MODEL)
    held_out = s.raw("model_reference_accuracy", chosen)
    delay = rate(chosen, s.names.metric("model_label_delay_seconds_bucket"), w)
    rejected = increase(HOSTS, s.names.metric("model_feedback_rejected_total"), w)
    firing = Selector(alertstate="firing").series("ALERTS")
    alerts = f"count by (alertname) ({firing}) or {on(())} vector(0)"
    return [
        timeseries(
            "Accuracy",
            [
                (s.recorded(f"accuracy:{w}"), f"accuracy {mv}"),
                (max_by(MODEL, held_out), f"held-out {mv}"),
            ],
            description=f"Accuracy of the labelled predictions over {w}, and the held-out "
            "accuracy of the profile.",
            unit="percentunit",
            defaults=ratio(),
        ),
        timeseries(
            "Labels received and rejected",
            [
                (s.recorded(f"labels:increase{w}"), f"labels {mv}"),
                (sum_by(("reason",), rejected), "rejected {{reason}}"),
            ],
        ),
        timeseries(
            "Label delay (median)",
            [(f"histogram_quantile(0.5, {sum_by(('le', *MODEL), delay)})", mv)],
            unit="s",
        ),
        panel(
            "stat",
            "Alerts firing",
            [(alerts, "{{alertname}}")],
            width=24,
            height=5,
            defaults=line_at(1),
        ),
    ]


# -- the dashboard -------------------------------------------------------------------------


def _variables(s: Series) -> list[dict[str, Any]]:
    requests = s.names.metric("http_requests_total")
    predictions = s.names.metric("model_predictions_total")
    of_job = Selector().variables("job").series(requests)
    of_model = Selector().variables("model").series(predictions)
    return [
        datasource_variable(),
        query_variable("job", "Job", f"label_values({requests}, job)"),
        query_variable("instance", "Instance", f"label_values({of_job}, instance)"),
        query_variable("model", "Model", f"label_values({predictions}, model)"),
        query_variable("version", "Version", f"label_values({of_model}, version)"),
    ]


def _models(profiles: Sequence[ReferenceProfile], series: Series) -> list[ModelView]:
    if len({p.key for p in profiles}) != len(profiles):
        raise ValueError("profiles: the same model version is given twice")
    grouped: dict[str, list[ReferenceProfile]] = {}
    for profile in profiles:
        grouped.setdefault(profile.model, []).append(profile)
    return [ModelView(name, tuple(group), series) for name, group in grouped.items()]


def _panels(profiles: Sequence[ReferenceProfile], series: Series) -> list[Panel]:
    grid = Grid()
    grid.row("Service: traffic, errors, latency (job and instance variables)")
    grid.add(*_request_panels(series), *_worker_panels(series))
    grid.row("Models: predictions, drift, ground truth (model and version variables)")
    grid.add(*_prediction_panels(series), *_drift_panels(series), *_ground_truth_panels(series))
    for view in _models(profiles, series):
        grid.row(f"Model {view.name}")
        grid.add(*(item for make in MODEL_PANELS for item in make(view)))
        grid.row(f"Model {view.name}: features", collapsed=True)
        for profiled in view.features():
            grid.add(*feature_panels(view, profiled))
    return grid.panels


def generate_dashboard(
    profiles: Sequence[ReferenceProfile],
    settings: RuleSettings | None = None,
    *,
    uid: str = "ml-wsgi-metrics",
    title: str = "ML WSGI metrics",
) -> dict[str, Any]:
    """The Grafana dashboard (its JSON model) for ``profiles``; ``settings`` as given to the
    rules (namespace, window, ops window), so the panels read the series they record."""
    settings = settings or RuleSettings()
    series = Series(settings, Names(settings.namespace))
    described = ", ".join(f"{p.model} {p.version}" for p in profiles)
    return {
        "uid": uid,
        "title": title,
        "description": f"Generated by python -m ml_wsgi_metrics dashboard from the profiles "
        f"of {described}. Model panels read the series recorded by python -m ml_wsgi_metrics "
        f"rules (window {settings.window}, ops window {settings.ops_window}).",
        "tags": ["ml-wsgi-metrics", "gunicorn", "ml"],
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "refresh": "10s",
        "schemaVersion": 39,
        "time": {"from": "now-1h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "version": 1,
        "weekStart": "",
        "annotations": {"list": []},
        "templating": {"list": _variables(series)},
        "panels": _panels(profiles, series),
    }
