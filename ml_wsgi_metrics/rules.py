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
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

from .profile import NumericProfile, ReferenceProfile

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
        positive = ("floor", "eps", "accuracy_drop", "estimate_drop", "error_ratio")
        for name in (*positive, "max_prediction_latency"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}: must be a positive number, got {value!r}")
        for name in ("min_rows", "min_labels", "min_requests"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.min_accuracy is not None and not 0 < self.min_accuracy < 1:
            raise ValueError(f"min_accuracy: must be in (0, 1), got {self.min_accuracy!r}")


# -- the math, shared with the drift simulation --------------------------------------------


def _regularized_gamma_p(a: float, x: float) -> float:
    """P(a, x), the regularized lower incomplete gamma function (Numerical Recipes 6.2)."""
    if x <= 0:
        return 0.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:  # series
        term = total = 1.0 / a
        n = a
        while abs(term) > abs(total) * 1e-17:
            n += 1
            term *= x / n
            total += term
        return min(1.0, total * math.exp(log_front))
    tiny = 1e-300  # continued fraction for Q = 1 - P (modified Lentz)
    b = x + 1 - a
    c, d = 1 / tiny, 1 / b
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        delta = d * c
        h *= delta
        if abs(delta - 1) < 1e-16:
            break
    return max(0.0, 1.0 - math.exp(log_front) * h)


def chi2_quantile(q: float, dof: int) -> float:
    """The ``q`` quantile of the chi-square distribution with ``dof`` degrees of freedom.

    Bisection on the CDF (no scipy needed at run time; the tests compare with scipy).
    """
    if not 0 < q < 1 or dof < 1:
        raise ValueError(f"chi2_quantile: need 0 < q < 1 and dof >= 1, got {q!r}, {dof!r}")
    low, high = 0.0, max(1.0, 2.0 * dof)
    while _regularized_gamma_p(dof / 2, high / 2) < q:
        low, high = high, 2 * high
    for _ in range(200):
        mid = (low + high) / 2
        if mid in (low, high):
            break
        if _regularized_gamma_p(dof / 2, mid / 2) < q:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def effective_bins(shares: Sequence[float]) -> int:
    """Bins that reference rows fall into: the chi-square has ``effective_bins - 1`` dof."""
    return sum(1 for share in shares if share > 0)


def critical_value(n: Any, m: int, bins: int, *, quantile: float = 0.9995, floor: float = 0.01):
    """``max(floor, chi2.ppf(quantile, bins - 1) * (1/n + 1/m))``, as the drift rule has it.

    ``n`` may be an array. Computed in the order the PromQL rule computes it.
    """
    c = chi2_quantile(quantile, bins - 1)
    return np.maximum(c * (1 / np.asarray(n, dtype=np.float64) + 1 / m), floor)


def psi(live_counts: Any, reference_shares: Sequence[float], *, eps: float = 1e-4) -> Any:
    """PSI of live bin counts (last axis: bins) against reference shares, shares clamped at
    ``eps`` as in the PromQL rule; ``NaN`` where a window has no rows."""
    counts = np.asarray(live_counts, dtype=np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        live = np.maximum(counts / total, eps)
    reference = np.maximum(np.asarray(reference_shares, dtype=np.float64), eps)
    return ((live - reference) * np.log(live / reference)).sum(axis=-1)


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


# -- PromQL building blocks ----------------------------------------------------------------


def _string(value: str) -> str:
    return json.dumps(value)


def _selector(**labels: str) -> str:
    return "{" + ",".join(f"{k}={_string(v)}" for k, v in labels.items()) + "}"


def _regex(values: Iterable[str]) -> str:
    """An RE2 alternation matching exactly ``values``."""
    return "|".join(re.sub(r"([\\.+*?()|\[\]{}^$])", r"\\\1", v) for v in values)


def _number(value: float) -> str:
    return repr(float(value))


class _Names:
    def __init__(self, settings: RuleSettings) -> None:
        self.namespace = settings.namespace
        self.prefix = settings.namespace or "ml"

    def metric(self, name: str) -> str:
        return f"{self.namespace}_{name}" if self.namespace else name

    def record(self, name: str) -> str:
        return f"{self.prefix}:{name}"


def _record(name: str, expr: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    rule: dict[str, Any] = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def _alert(
    name: str, expr: str, duration: str, severity: str, summary: str, description: str
) -> dict[str, Any]:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }


def _distribution_rules(
    names: _Names,
    settings: RuleSettings,
    profile: ReferenceProfile,
    kind: str,
    features: Sequence[NumericProfile] | Sequence[Any],
) -> list[dict[str, Any]]:
    """PSI, critical value, mean and stddev (numeric only) for features or for the score."""
    w, eps = settings.window, _number(settings.eps)
    model = _selector(model=profile.model, version=profile.version)
    by = "model, version, feature" if kind == "feature" else "model, version"
    by_bin = f"{by}, bin"
    r = lambda name: names.record(f"{kind}_{name}")  # noqa: E731
    bins, share, rows = r(f"bin:increase{w}"), r("reference_share"), r(f"rows:increase{w}")
    live, value = r(f"live_share:{w}"), r(f"psi:{w}")
    bin_total = names.metric(f"model_{kind}_bin_total")
    share_gauge = names.metric(f"model_{kind}_reference_share")
    clamped_live, clamped_share = (
        f"clamp_min({live}{model}, {eps})",
        f"clamp_min({share}{model}, {eps})",
    )
    rules = [
        _record(bins, f"sum by ({by_bin}) (increase({bin_total}{model}[{w}]))"),
        _record(share, f"max by ({by_bin}) ({share_gauge}{model})"),
        _record(rows, f"sum by ({by}) ({bins}{model})"),
        _record(
            live,
            f"(\n  {bins}{model}\n  or on ({by_bin}) 0 * {share}{model}\n)\n"
            f"/ on ({by}) group_left () ({rows}{model} > 0)",
        ),
        _record(
            value,
            f"sum by ({by}) (\n"
            f"  ({clamped_live} - on ({by_bin}) {clamped_share})\n"
            f"  * on ({by_bin})\n"
            f"  ln({clamped_live} / on ({by_bin}) {clamped_share})\n"
            f")",
        ),
    ]
    # The critical value: one term per (bins, reference rows), usually one for all features.
    groups: dict[tuple[int, int], list[str]] = {}
    for feature in features:
        b = effective_bins(feature.shares)
        if b >= 2:
            groups.setdefault((b, feature.count), []).append(feature.name)
    terms = []
    for (b, m), members in groups.items():
        selector = model
        if kind == "feature":
            match = (
                f"={_string(members[0])}" if len(members) == 1 else f"=~{_string(_regex(members))}"
            )
            selector = f"{model[:-1]},feature{match}}}"
        c = _number(chi2_quantile(settings.quantile, b - 1))
        terms.append(
            f"clamp_min({c} * (1 / ({rows}{selector} > 0) + 1 / {m}), {_number(settings.floor)})"
        )
    if terms:
        rules.append(_record(r(f"psi_critical:{w}"), "\nor ".join(terms)))
    if any(isinstance(f, NumericProfile) for f in features):
        metric = names.metric(f"model_{kind}_sum_total")
        positive = model[:-1] + ',sign="positive"}'
        negative = model[:-1] + ',sign="negative"}'
        total, squares = r(f"sum:increase{w}"), r(f"sum_squares:increase{w}")
        mean, stddev = r(f"mean:{w}"), r(f"stddev:{w}")
        rules += [
            _record(
                total,
                f"sum by ({by}) (increase({metric}{positive}[{w}]))\n- on ({by}) (\n"
                f"  sum by ({by}) (increase({metric}{negative}[{w}]))\n"
                f"  or on ({by}) 0 * sum by ({by}) (increase({metric}{positive}[{w}]))\n)",
            ),
            _record(
                squares,
                f"sum by ({by}) (increase({names.metric(f'model_{kind}_sum_squares_total')}"
                f"{model}[{w}]))",
            ),
            _record(mean, f"{total}{model} / on ({by}) ({rows}{model} > 0)"),
            _record(
                stddev,
                f"sqrt(clamp_min(\n  {squares}{model} / on ({by}) ({rows}{model} > 0)\n"
                f"  - on ({by}) {mean}{model} ^ 2,\n  0\n))",
            ),
        ]
    missing = names.metric(f"model_{kind}_missing_total")
    rules.append(
        _record(
            r(f"missing_ratio:{w}"),
            f"sum by ({by}) (increase({missing}{model}[{w}]))\n/ on ({by}) (\n"
            f"  (sum by ({by}) (increase({missing}{model}[{w}])) + on ({by}) {rows}{model})"
            f" > 0\n)",
        )
    )
    if kind == "feature":
        rules.extend(
            _record(
                r(f"{what}_ratio:{w}"),
                f"sum by ({by}) (increase({names.metric(f'model_feature_{what}_total')}"
                f"{model}[{w}]))\n/ on ({by}) ({rows}{model} > 0)",
            )
            for what in ("out_of_range", "unseen")
        )
    if groups:
        subject = "Feature {{ $labels.feature }}" if kind == "feature" else "The score"
        rules.append(
            _alert(
                f"Model{kind.capitalize()}Drift",
                f"{value}{model}\n> on ({by}) {r(f'psi_critical:{w}')}{model}\n"
                f"and on ({by}) {rows}{model} >= {settings.min_rows}",
                settings.alert_for,
                "warning",
                f"{subject} of model {{{{ $labels.model }}}} {{{{ $labels.version }}}} drifted",
                f'PSI over {w} is {{{{ $value | printf "%.4f" }}}}, above the critical '
                f"value for the rows seen (chi-square q={settings.quantile}, "
                f"floor {settings.floor}).",
            )
        )
    return rules


def _accuracy_rules(
    names: _Names, settings: RuleSettings, profile: ReferenceProfile
) -> tuple[list[dict[str, Any]], list[str]]:
    w = settings.window
    classes = profile.classes or ()
    model = _selector(model=profile.model, version=profile.version)
    mv = {"model": profile.model, "version": profile.version}
    confusion, labels = names.record(f"confusion:increase{w}"), names.record(f"labels:increase{w}")
    accuracy = names.record(f"accuracy:{w}")
    diagonal = " or ".join(f"{confusion}{_selector(**mv, predicted=c, actual=c)}" for c in classes)
    rules = [
        _record(
            confusion,
            f"sum by (model, version, predicted, actual) "
            f"(increase({names.metric('model_confusion_total')}{model}[{w}]))",
        ),
        _record(labels, f"sum by (model, version) ({confusion}{model})"),
        _record(
            accuracy,
            f"sum by (model, version) (\n  {diagonal}\n)\n"
            f"/ on (model, version) ({labels}{model} > 0)",
        ),
    ]
    for c in classes:
        hit = f"sum by (model, version) ({confusion}{_selector(**mv, predicted=c, actual=c)})"
        for name, side in (("precision", "predicted"), ("recall", "actual")):
            rules.append(
                _record(
                    names.record(f"{name}:{w}"),
                    f"{hit}\n/ on (model, version) (\n"
                    f"  sum by (model, version) ({confusion}{_selector(**mv, **{side: c})}) > 0\n)",
                    {"class": c},
                )
            )
    reference = profile.accuracy
    if settings.min_accuracy is not None:
        threshold = _number(settings.min_accuracy)
        explain = f"below {settings.min_accuracy}"
    elif reference is not None:
        z = NormalDist().inv_cdf(settings.quantile)
        spread = _number(z * math.sqrt(reference * (1 - reference)))
        threshold = (
            f"on (model, version) (\n  {_number(reference)} - clamp_min({spread} / "
            f"sqrt({labels}{model}), {_number(settings.accuracy_drop)})\n)"
        )
        explain = f"significantly below the reference {reference:.4f}"
    else:
        return rules, [
            f"{profile.model} {profile.version}: no accuracy in the profile and no "
            f"--min-accuracy: the accuracy alert is left out"
        ]
    rules.append(
        _alert(
            "ModelAccuracyDrop",
            f"{accuracy}{model}\n< {threshold}\n"
            f"and on (model, version) {labels}{model} >= {settings.min_labels}",
            settings.alert_for,
            "warning",
            "Accuracy of model {{ $labels.model }} {{ $labels.version }} dropped",
            f'Accuracy over {w} of labelled predictions is {{{{ $value | printf "%.4f" }}}}, '
            f"{explain}.",
        )
    )
    return rules, []


def _estimated_accuracy_rules(
    names: _Names, settings: RuleSettings, profile: ReferenceProfile
) -> tuple[list[dict[str, Any]], list[str]]:
    """Accuracy a calibrated model expects, from its scores alone: expected correct predictions
    over the rows with a finite score (the score bins), and the alert on its drop below the
    profile's held-out estimate (exported by the app as a gauge)."""
    w, by = settings.window, "model, version"
    model = _selector(model=profile.model, version=profile.version)
    expected, estimate = (
        names.record(f"expected_correct:increase{w}"),
        names.record(f"estimated_accuracy:{w}"),
    )
    reference = names.record("reference_estimated_accuracy")
    rows = names.record(f"score_rows:increase{w}")  # from the score's distribution rules
    metric = names.metric("model_expected_correct_total")
    rules = [
        _record(expected, f"sum by ({by}) (increase({metric}{model}[{w}]))"),
        _record(estimate, f"{expected}{model}\n/ on ({by}) ({rows}{model} > 0)"),
    ]
    if profile.estimated_accuracy is None:
        return rules, [
            f"{profile.model} {profile.version}: no estimated_accuracy in the profile: the "
            f"estimated accuracy alert is left out"
        ]
    gauge = names.metric("model_reference_estimated_accuracy")
    rules += [
        _record(reference, f"max by ({by}) ({gauge}{model})"),
        _alert(
            "ModelEstimatedAccuracyDrop",
            f"{estimate}{model}\n< on ({by}) ({reference}{model} - "
            f"{_number(settings.estimate_drop)})\n"
            f"and on ({by}) {rows}{model} >= {settings.min_rows}",
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


def _model_ops_rules(
    names: _Names, settings: RuleSettings, profile: ReferenceProfile
) -> list[dict[str, Any]]:
    ow, idle = settings.ops_window, settings.idle_window
    model = _selector(model=profile.model, version=profile.version)
    predictions = names.metric("model_predictions_total")
    latency = names.record(f"prediction_latency_seconds:p95_{ow}")
    return [
        _record(
            names.record(f"predictions:rate{ow}"),
            f"sum by (model, version) (rate({predictions}{model}[{ow}]))",
        ),
        _record(
            latency,
            f"histogram_quantile(0.95, sum by (model, version, le) "
            f"(rate({names.metric('model_prediction_latency_seconds_bucket')}{model}[{ow}])))",
        ),
        _alert(
            "ModelPredictionLatencyHigh",
            f"{latency}{model} > {_number(settings.max_prediction_latency)}",
            settings.ops_for,
            "warning",
            "Model {{ $labels.model }} {{ $labels.version }} predicts slowly",
            f'p95 prediction latency over {ow} is {{{{ $value | printf "%.3f" }}}} s '
            f"(threshold {settings.max_prediction_latency} s).",
        ),
        _alert(
            "ModelNoPredictions",
            f"sum by (model, version) (increase({predictions}{model}[{idle}])) == 0\n"
            f"or absent({predictions}{model})",
            settings.ops_for,
            "warning",
            "Model {{ $labels.model }} {{ $labels.version }} made no predictions",
            f"No predictions recorded in the last {idle}.",
        ),
    ]


def _http_rules(names: _Names, settings: RuleSettings) -> list[dict[str, Any]]:
    ow = settings.ops_window
    requests = names.metric("http_requests_total")
    rate, ratio = names.record(f"http_requests:rate{ow}"), names.record(f"http_error_ratio:{ow}")
    return [
        _record(rate, f"sum by (job) (rate({requests}[{ow}]))"),
        _record(
            ratio,
            f'(\n  sum by (job) (rate({requests}{{status=~"5.."}}[{ow}]))\n'
            f"  or on (job) 0 * {rate}\n)\n/ on (job) ({rate} > 0)",
        ),
        _record(
            names.record(f"http_request_duration_seconds:p95_{ow}"),
            f"histogram_quantile(0.95, sum by (job, route, le) "
            f"(rate({names.metric('http_request_duration_seconds_bucket')}[{ow}])))",
        ),
        _alert(
            "HTTPErrorRateHigh",
            f"{ratio} > {_number(settings.error_ratio)}\n"
            f"and on (job) sum by (job) (increase({requests}[{ow}])) >= {settings.min_requests}",
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
    names = _Names(settings)
    groups, warnings = [], []
    for profile in profiles:
        rules = _distribution_rules(names, settings, profile, "feature", profile.features)
        if profile.score is not None:
            rules += _distribution_rules(names, settings, profile, "score", [profile.score])
        if profile.classes:
            accuracy, notes = _accuracy_rules(names, settings, profile)
            rules += accuracy
            warnings += notes
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


# -- a small YAML writer (rule files are plain maps, lists and strings) ---------------------

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list | dict):  # only empty ones are written inline
        return "[]" if isinstance(value, list) else "{}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _as_block(text: str) -> bool:
    """Long or quoted strings read better as literal blocks (``|-``)."""
    if not text or text[0] in " \t" or text != text.rstrip() or "\t" in text:
        return False
    return "\n" in text or ('"' in text and len(text) > 60)


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            key_text = key if _PLAIN_KEY.match(key) else json.dumps(key)
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key_text}:")
                _emit(item, indent + 2, lines)
            elif isinstance(item, str) and _as_block(item):
                lines.append(f"{pad}{key_text}: |-")
                lines.extend(f"{pad}  {line}" for line in item.split("\n"))
            else:
                lines.append(f"{pad}{key_text}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            sub: list[str] = []
            _emit(item, indent + 2, sub)
            first = sub[0][indent + 2 :] if sub else "[]"
            lines.append(f"{pad}- {first}")
            lines.extend(sub[1:])
    else:
        lines.append(f"{pad}{_scalar(value)}")


def render_yaml(rules: dict[str, Any], header: str = "") -> str:
    """The rule file as YAML text (block style; expressions as literal blocks)."""
    lines = [f"# {line}" for line in header.splitlines()]
    _emit(rules, 0, lines)
    return "\n".join(lines) + "\n"
