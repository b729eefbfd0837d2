"""Prometheus recording and alert rules generated from reference profiles.

Per model version (one rule group each, every alert after the recording rules it reads):
PSI per feature and for the score over a window, mean and standard deviation, missing /
out-of-range / unseen ratios, accuracy, precision and recall, estimated accuracy (no labels
needed), prediction rate and p95 latency; alerts for drift, accuracy drop, estimated accuracy
drop, high prediction latency and no predictions. One more group
covers HTTP: error ratio, p95 request duration per route, and an error-rate alert.

The drift alert compares PSI with a critical value that shrinks as the window fills: under no
drift, PSI over ``B`` bins is close to ``chi2(B - 1) * (1/n + 1/m)`` (``n`` live rows in the
window, ``m`` reference rows), so it fires when ``PSI > max(floor, chi2.ppf(q, B - 1) * (1/n +
1/m))`` and ``n >= min_rows``. :func:`psi` and :func:`critical_value` are the same math in
Python, used by the tests' drift simulation.

This module owns the settings and the rule file's groups; the drift rules are built in
:mod:`ml_wsgi_metrics._drift`, every selector and series name in :mod:`ml_wsgi_metrics._promql`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from ._drift import FeatureDrift, ScoreDrift, chi2_quantile, critical_value, effective_bins, psi
from ._promql import (
    MODEL,
    Names,
    Rule,
    Selector,
    alerting_rule,
    exact_increase,
    increase,
    label_list,
    max_by,
    model_selector,
    number,
    on,
    positive,
    rate,
    recording_rule,
    sum_by,
)
from ._yaml import render_yaml
from .profile import ReferenceProfile

__all__ = [
    "RuleSettings",
    "chi2_quantile",
    "critical_value",
    "drift_condition",
    "effective_bins",
    "generate_rules",
    "psi",
    "render_yaml",
]

_DURATION = re.compile(r"^(?:\d+(?:ms|s|m|h|d|w|y))+$")


@dataclass(frozen=True)
class RuleSettings:
    """What the generated rules look like; every field has a command line option.

    :param namespace: the metrics' namespace (names are ``<namespace>_model_...``); recorded
        series are named ``<namespace or "ml">:...``.
    :param window: the window of drift, mean/stddev and accuracy rules.
    :param ops_window: the window of rates, error ratio and latency quantiles.
    :param idle_window: no predictions for this long raises ``ModelNoPredictions``.
    :param quantile: chi-square quantile of the drift critical value (false alarm rate per
        evaluation, for each feature, about ``1 - quantile``).
    :param floor: the smallest PSI that counts as drift, however large the window.
    :param min_rows: no drift or estimated-accuracy alert with fewer live rows in the window.
    :param eps: live and reference shares are clamped at ``eps`` inside PSI.
    :param min_labels: no accuracy alert with fewer labelled predictions in the window.
    :param min_accuracy: fixed accuracy threshold; by default the profile's ``accuracy`` minus
        ``max(accuracy_drop, z(quantile) * sqrt(a (1 - a) / labels))``.
    :param estimate_drop: estimated accuracy this far below the profile's held-out estimate
        raises ``ModelEstimatedAccuracyDrop``.
    :param error_ratio: the 5xx share of requests that raises ``HTTPErrorRateHigh``.
    :param min_requests: no error-rate alert with fewer requests in ``ops_window``.
    :param max_prediction_latency: p95 prediction latency (seconds) that raises an alert.
    :param alert_for: how long a drift or accuracy condition holds before firing.
    :param ops_for: the same for error rate, latency and no predictions.
    """

    namespace: str = ""
    window: str = "1h"
    ops_window: str = "5m"
    idle_window: str = "15m"
    quantile: float = 0.9995
    floor: float = 0.01
    min_rows: int = 100
    eps: float = 1e-4
    min_labels: int = 100
    min_accuracy: float | None = None
    accuracy_drop: float = 0.05
    estimate_drop: float = 0.05
    error_ratio: float = 0.05
    min_requests: int = 20
    max_prediction_latency: float = 0.5
    alert_for: str = "10m"
    ops_for: str = "5m"

    def __post_init__(self) -> None:
        for name in ("window", "ops_window", "idle_window", "alert_for", "ops_for"):
            if not _DURATION.match(getattr(self, name)):
                raise ValueError(f"{name}: {getattr(self, name)!r} is not a Prometheus duration")
        if self.namespace and not re.match(r"^[a-zA-Z_][a-zA-Z0-9_]*$", self.namespace):
            raise ValueError(f"namespace: {self.namespace!r} is not a valid metric name prefix")
        if not 0.5 < self.quantile < 1:
            raise ValueError(f"quantile: must be in (0.5, 1), got {self.quantile!r}")
        positives = ("floor", "eps", "accuracy_drop", "estimate_drop", "error_ratio")
        for name in (*positives, "max_prediction_latency"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        for name in ("min_rows", "min_labels", "min_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.min_accuracy is not None and not 0 < self.min_accuracy < 1:
            raise ValueError(f"min_accuracy: must be in (0, 1), got {self.min_accuracy!r}")


def drift_condition(
    live_counts: Any,
    reference_shares: Sequence[float],
    m: int,
    settings: RuleSettings | None = None,
) -> Any:
    """Whether the drift alert's condition holds for each window of live bin counts."""
    settings = settings or RuleSettings()
    counts = np.asarray(live_counts, dtype=np.float64)
    n = counts.sum(axis=-1)
    bins = effective_bins(reference_shares)
    if bins < 2:
        return np.zeros(n.shape, dtype=bool)
    value = psi(counts, reference_shares, eps=settings.eps)
    with np.errstate(divide="ignore"):
        limit = critical_value(n, m, bins, quantile=settings.quantile, floor=settings.floor)
    return (n >= settings.min_rows) & (value > limit)


# -- the rules -----------------------------------------------------------------------------


def _accuracy_rules(names: Names, settings: RuleSettings, profile: ReferenceProfile) -> list[Rule]:
    """The confusion matrix, labelled predictions, accuracy, precision and recall per class."""
    w, model, classes = settings.window, model_selector(*profile.key), profile.classes or ()
    confusion = names.record(f"confusion:increase{w}")
    labelled = names.record(f"labels:increase{w}")
    diagonal = " or ".join(model.where(predicted=c, actual=c).series(confusion) for c in classes)
    rules = [
        recording_rule(
            confusion,
            sum_by(
                (*MODEL, "predicted", "actual"),
                exact_increase(model, names.metric("model_confusion_total"), w),
            ),
        ),
        recording_rule(labelled, sum_by(MODEL, model.series(confusion))),
        recording_rule(
            names.record(f"accuracy:{w}"),
            f"sum by ({label_list(MODEL)}) (\n  {diagonal}\n)\n"
            f"/ {on(MODEL)} {positive(model.series(labelled))}",
        ),
    ]
    for c in classes:
        hit = sum_by(MODEL, model.where(predicted=c, actual=c).series(confusion))
        for name, side in (("precision", "predicted"), ("recall", "actual")):
            rules.append(
                recording_rule(
                    names.record(f"{name}:{w}"),
                    f"{hit}\n/ {on(MODEL)} (\n"
                    f"  {sum_by(MODEL, model.where(**{side: c}).series(confusion))} > 0\n)",
                    {"class": c},
                )
            )
    return rules


def _accuracy_alert(names: Names, settings: RuleSettings, profile: ReferenceProfile) -> Rule | str:
    """``ModelAccuracyDrop``, or why there is none."""
    w, model, reference = settings.window, model_selector(*profile.key), profile.accuracy
    labelled = model.series(names.record(f"labels:increase{w}"))
    if settings.min_accuracy is not None:
        threshold = number(settings.min_accuracy)
        explain = f"below {settings.min_accuracy}"
    elif reference is not None:
        spread = number(
            NormalDist().inv_cdf(settings.quantile) * math.sqrt(reference * (1 - reference))
        )
        threshold = (
            f"{on(MODEL)} (\n  {number(reference)} - clamp_min({spread} / "
            f"sqrt({labelled}), {number(settings.accuracy_drop)})\n)"
        )
        explain = f"significantly below the reference {reference:.4f}"
    else:
        return (
            f"{profile.model} {profile.version}: no accuracy in the profile and no "
            f"--min-accuracy: the accuracy alert is left out"
        )
    return alerting_rule(
        "ModelAccuracyDrop",
        f"{model.series(names.record(f'accuracy:{w}'))}\n< {threshold}\n"
        f"and {on(MODEL)} {labelled} >= {settings.min_labels}",
        settings.alert_for,
        "warning",
        "Accuracy of model {{ $labels.model }} {{ $labels.version }} dropped",
        f'Accuracy over {w} of labelled predictions is {{{{ $value | printf "%.4f" }}}}, '
        f"{explain}.",
    )


def _estimated_accuracy_rules(
    names: Names, settings: RuleSettings, profile: ReferenceProfile
) -> tuple[list[Rule], list[str]]:
    """Accuracy a calibrated model expects, from its scores alone: expected correct predictions
    over the rows with a finite score (the score bins), and the alert on its drop below the
    profile's held-out estimate (exported by the app as a gauge)."""
    w, model = settings.window, model_selector(*profile.key)
    expected = names.record(f"expected_correct:increase{w}")
    estimate = model.series(names.record(f"estimated_accuracy:{w}"))
    rows = model.series(names.record(f"score_rows:increase{w}"))  # the score's drift rules
    rules = [
        recording_rule(
            expected,
            sum_by(MODEL, exact_increase(model, names.metric("model_expected_correct_total"), w)),
        ),
        recording_rule(
            names.record(f"estimated_accuracy:{w}"),
            f"{model.series(expected)}\n/ {on(MODEL)} {positive(rows)}",
        ),
    ]
    if profile.estimated_accuracy is None:
        return rules, [
            f"{profile.model} {profile.version}: no estimated_accuracy in the profile: the "
            f"estimated accuracy alert is left out"
        ]
    reference = names.record("reference_estimated_accuracy")
    gauge = names.metric("model_reference_estimated_accuracy")
    rules += [
        recording_rule(reference, max_by(MODEL, model.series(gauge))),
        alerting_rule(
            "ModelEstimatedAccuracyDrop",
            f"{estimate}\n< {on(MODEL)} ({model.series(reference)} - "
            f"{number(settings.estimate_drop)})\n"
            f"and {on(MODEL)} {rows} >= {settings.min_rows}",
            settings.alert_for,
            "warning",
            "Estimated accuracy of model {{ $labels.model }} {{ $labels.version }} dropped",
            f"The accuracy the model expects from its scores over {w} is "
            f'{{{{ $value | printf "%.4f" }}}}, more than {settings.estimate_drop} below its '
            f"held-out estimate; no label is needed, and a concept drift that leaves the "
            f"scores unchanged is not seen.",
        ),
    ]
    return rules, []


def _model_ops_rules(names: Names, settings: RuleSettings, profile: ReferenceProfile) -> list[Rule]:
    ow, idle = settings.ops_window, settings.idle_window
    model = model_selector(*profile.key)
    predictions = names.metric("model_predictions_total")
    latency = names.record(f"prediction_latency_seconds:p95_{ow}")
    bucket = names.metric("model_prediction_latency_seconds_bucket")
    return [
        recording_rule(
            names.record(f"predictions:rate{ow}"), sum_by(MODEL, rate(model, predictions, ow))
        ),
        recording_rule(
            latency,
            f"histogram_quantile(0.95, {sum_by((*MODEL, 'le'), rate(model, bucket, ow))})",
        ),
        alerting_rule(
            "ModelPredictionLatencyHigh",
            f"{model.series(latency)} > {number(settings.max_prediction_latency)}",
            settings.ops_for,
            "warning",
            "Model {{ $labels.model }} {{ $labels.version }} predicts slowly",
            f'p95 prediction latency over {ow} is {{{{ $value | printf "%.3f" }}}} s '
            f"(threshold {settings.max_prediction_latency} s).",
        ),
        alerting_rule(
            "ModelNoPredictions",
            f"{sum_by(MODEL, increase(model, predictions, idle))} == 0\n"
            f"or absent({model.series(predictions)})",
            settings.ops_for,
            "warning",
            "Model {{ $labels.model }} {{ $labels.version }} made no predictions",
            f"No predictions recorded in the last {idle}.",
        ),
    ]


def _http_rules(names: Names, settings: RuleSettings) -> list[Rule]:
    ow, job, every = settings.ops_window, ("job",), Selector()
    requests = names.metric("http_requests_total")
    enough = f"{sum_by(job, increase(every, requests, ow))} >= {settings.min_requests}"
    rate_, ratio = names.record(f"http_requests:rate{ow}"), names.record(f"http_error_ratio:{ow}")
    errors = sum_by(job, rate(every.matching("status", "5.."), requests, ow))
    duration = names.metric("http_request_duration_seconds_bucket")
    return [
        recording_rule(rate_, sum_by(job, rate(every, requests, ow))),
        recording_rule(
            ratio,
            f"(\n  {errors}\n  or {on(job)} 0 * {rate_}\n)\n/ {on(job)} {positive(rate_)}",
        ),
        recording_rule(
            names.record(f"http_request_duration_seconds:p95_{ow}"),
            f"histogram_quantile(0.95, {sum_by((*job, 'route', 'le'), rate(every, duration, ow))})",
        ),
        alerting_rule(
            "HTTPErrorRateHigh",
            f"{ratio} > {number(settings.error_ratio)}\nand {on(job)} {enough}",
            settings.ops_for,
            "critical",
            "Server errors in {{ $labels.job }}",
            f'A share of {{{{ $value | printf "%.4f" }}}} of requests over {ow} failed with a 5xx '
            f"status (threshold {settings.error_ratio:.0%}).",
        ),
    ]


def model_labels(profile: ReferenceProfile) -> dict[str, str]:
    return {"model": profile.model, "version": profile.version}


def generate_rules(
    profiles: Sequence[ReferenceProfile], settings: RuleSettings | None = None
) -> tuple[dict[str, Any], list[str]]:
    """The rule file (a dict, see :func:`render_yaml`) for ``profiles``, and warnings."""
    settings = settings or RuleSettings()
    keys = [p.key for p in profiles]
    if len(set(keys)) != len(keys):
        raise ValueError("profiles: the same model version is given twice")
    names = Names(settings.namespace)
    groups, warnings = [], []
    for profile in profiles:
        rules = FeatureDrift(names, settings, profile).rules(profile.features)
        if profile.score is not None:
            rules += ScoreDrift(names, settings, profile).rules([profile.score])
        if profile.classes:
            rules += _accuracy_rules(names, settings, profile)
            alert = _accuracy_alert(names, settings, profile)
            if isinstance(alert, str):
                warnings.append(alert)
            else:
                rules.append(alert)
        if profile.score is not None:
            estimated, notes = _estimated_accuracy_rules(names, settings, profile)
            rules += estimated
            warnings += notes
        if not profile.classes:
            warnings.append(f"{profile.model} {profile.version}: no classes: no accuracy rules")
        rules += _model_ops_rules(names, settings, profile)
        for rule in rules:  # the values the series carry anyway; keeps promtool's lint happy
            rule["labels"] = {**model_labels(profile), **rule.get("labels", {})}
        groups.append(
            {"name": f"ml_wsgi_metrics:{profile.model}:{profile.version}", "rules": rules}
        )
    groups.append({"name": "ml_wsgi_metrics:http", "rules": _http_rules(names, settings)})
    return {"groups": groups}, warnings
