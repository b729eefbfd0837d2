"""Drift of a model version's inputs: PSI and its critical value, in Python and in PromQL.

Under no drift, PSI over ``B`` bins is close to ``chi2(B - 1) * (1/n + 1/m)`` (``n`` live rows
in the window, ``m`` reference rows). :func:`psi` and :func:`critical_value` compute it in
Python (the tests' drift simulation runs them on many windows); :class:`FeatureDrift` and
:class:`ScoreDrift` write the same computation as recording rules and the drift alert, with the
mean, standard deviation and missing ratios beside them. :mod:`ml_wsgi_metrics.rules` assembles
the rule file and exports the Python functions.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from ._promql import (
    MODEL,
    Names,
    Rule,
    Selector,
    alerting_rule,
    exact_increase,
    label_list,
    max_by,
    model_selector,
    number,
    on,
    positive,
    recording_rule,
    sum_by,
)
from .profile import FeatureProfile, NumericProfile, ReferenceProfile

if TYPE_CHECKING:
    from .rules import RuleSettings

__all__ = [
    "FeatureDrift",
    "ScoreDrift",
    "chi2_quantile",
    "critical_value",
    "effective_bins",
    "psi",
]


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


def critical_value(
    n: Any, m: int, bins: int, *, quantile: float = 0.9995, floor: float = 0.01
) -> Any:
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


# -- the same as recording rules ------------------------------------------------------------


class _Distribution:
    """Rules comparing the live distribution of one kind of input (features or the score) of
    one model version with its reference: PSI and its critical value, mean and stddev (numeric
    inputs), missing ratio, the drift alert. Subclasses say what differs per kind."""

    kind: ClassVar[str]
    by: ClassVar[tuple[str, ...]]  # the labels of one input's series
    subject: ClassVar[str]  # who drifted, in the alert's summary

    def __init__(self, names: Names, settings: RuleSettings, profile: ReferenceProfile) -> None:
        self.names, self.settings, self.w = names, settings, settings.window
        self.model = model_selector(*profile.key)
        self.by_bin = (*self.by, "bin")
        self.rows = self.record(f"rows:increase{self.w}")

    def record(self, name: str) -> str:
        return self.names.record(f"{self.kind}_{name}")

    def metric(self, name: str) -> str:
        return self.names.metric(f"model_{self.kind}_{name}")

    def increase(self, metric: str, selector: Selector | None = None) -> str:
        """``metric``'s increase over the window, summed over this kind's labels (per series
        first, not extrapolated: :func:`~ml_wsgi_metrics._promql.exact_increase`)."""
        return sum_by(self.by, exact_increase(selector or self.model, self.metric(metric), self.w))

    def per_row(self, expr: str, gap: str = " ") -> str:
        """``expr`` divided by the rows seen in the window (absent without rows)."""
        return f"{expr}{gap}/ {on(self.by)} {positive(self.model.series(self.rows))}"

    def rules(self, inputs: Sequence[FeatureProfile]) -> list[Rule]:
        """The rules for ``inputs`` (the features, or the score), the alert last."""
        # The critical value: one term per (bins, reference rows), usually one for all inputs.
        groups: dict[tuple[int, int], list[str]] = {}
        for profile in inputs:
            bins = effective_bins(profile.shares)
            if bins >= 2:
                groups.setdefault((bins, profile.count), []).append(profile.name)
        rules = self.psi_rules()
        if groups:
            rules.append(self.critical_rule(groups))
        if any(isinstance(profile, NumericProfile) for profile in inputs):
            rules += self.moment_rules()
        rules.append(self.missing_rule())
        rules += self.ratio_rules()
        if groups:
            rules.append(self.drift_alert())
        return rules

    def psi_rules(self) -> list[Rule]:
        w, model, by, by_bin = self.w, self.model, self.by, self.by_bin
        bins, share = self.record(f"bin:increase{w}"), self.record("reference_share")
        live, value = self.record(f"live_share:{w}"), self.record(f"psi:{w}")
        eps = number(self.settings.eps)
        live_clamped = f"clamp_min({model.series(live)}, {eps})"
        share_clamped = f"clamp_min({model.series(share)}, {eps})"
        return [
            recording_rule(
                bins, sum_by(by_bin, exact_increase(model, self.metric("bin_total"), w))
            ),
            recording_rule(share, max_by(by_bin, model.series(self.metric("reference_share")))),
            recording_rule(self.rows, sum_by(by, model.series(bins))),
            recording_rule(
                live,
                f"(\n  {model.series(bins)}\n  or {on(by_bin)} 0 * {model.series(share)}\n)\n"
                f"/ {on(by)} group_left () {positive(model.series(self.rows))}",
            ),
            recording_rule(
                value,
                f"sum by ({label_list(by)}) (\n"
                f"  ({live_clamped} - {on(by_bin)} {share_clamped})\n"
                f"  * {on(by_bin)}\n"
                f"  ln({live_clamped} / {on(by_bin)} {share_clamped})\n"
                f")",
            ),
        ]

    def members(self, names: Sequence[str]) -> Selector:
        """The series of the inputs named ``names``."""
        raise NotImplementedError

    def critical_rule(self, groups: dict[tuple[int, int], list[str]]) -> Rule:
        floor = number(self.settings.floor)
        terms = [
            f"clamp_min({number(chi2_quantile(self.settings.quantile, bins - 1))} * "
            f"(1 / {positive(self.members(names).series(self.rows))} + 1 / {m}), {floor})"
            for (bins, m), names in groups.items()
        ]
        return recording_rule(self.record(f"psi_critical:{self.w}"), "\nor ".join(terms))

    def moment_rules(self) -> list[Rule]:
        w, model, by = self.w, self.model, self.by
        positive_sum = self.increase("sum_total", model.where(sign="positive"))
        negative_sum = self.increase("sum_total", model.where(sign="negative"))
        total, squares = self.record(f"sum:increase{w}"), self.record(f"sum_squares:increase{w}")
        mean, stddev = self.record(f"mean:{w}"), self.record(f"stddev:{w}")
        return [
            recording_rule(  # rows: every feature's, numeric ones with a sum of each sign
                total,
                f"{positive_sum}\n- {on(by)} (\n"
                f"{textwrap.indent(negative_sum, '  ')}\n"
                f"  or {on(by)} 0 * {model.series(self.rows)}\n)",
            ),
            recording_rule(squares, self.increase("sum_squares_total")),
            recording_rule(mean, self.per_row(model.series(total))),
            recording_rule(
                stddev,
                f"sqrt(clamp_min(\n  {self.per_row(model.series(squares))}\n"
                f"  - {on(by)} {model.series(mean)} ^ 2,\n  0\n))",
            ),
        ]

    def missing_rule(self) -> Rule:
        missing, by = self.increase("missing_total"), self.by
        return recording_rule(
            self.record(f"missing_ratio:{self.w}"),
            f"{missing}\n/ {on(by)} (\n"
            f"  ({missing} + {on(by)} {self.model.series(self.rows)}) > 0\n)",
        )

    def ratio_rules(self) -> list[Rule]:
        """More ``*_ratio`` rules of values per row."""
        return []

    def drift_alert(self) -> Rule:
        w, model, settings = self.w, self.model, self.settings
        return alerting_rule(
            f"Model{self.kind.capitalize()}Drift",
            f"{model.series(self.record(f'psi:{w}'))}\n"
            f"> {on(self.by)} {model.series(self.record(f'psi_critical:{w}'))}\n"
            f"and {on(self.by)} {model.series(self.rows)} >= {settings.min_rows}",
            settings.alert_for,
            "warning",
            f"{self.subject} of model {{{{ $labels.model }}}} {{{{ $labels.version }}}} drifted",
            f'PSI over {w} is {{{{ $value | printf "%.4f" }}}}, above the critical '
            f"value for the rows seen (chi-square q={settings.quantile}, "
            f"floor {settings.floor}).",
        )


class FeatureDrift(_Distribution):
    """Per feature (label ``feature``); out-of-range and unseen ratios too."""

    kind, by, subject = "feature", (*MODEL, "feature"), "Feature {{ $labels.feature }}"

    def members(self, names: Sequence[str]) -> Selector:
        return self.model.one_of("feature", names)

    def ratio_rules(self) -> list[Rule]:
        return [
            recording_rule(
                self.record(f"{what}_ratio:{self.w}"),
                self.per_row(self.increase(f"{what}_total"), "\n"),
            )
            for what in ("out_of_range", "unseen")
        ]


class ScoreDrift(_Distribution):
    """The model's score: one distribution per model version."""

    kind, by, subject = "score", MODEL, "The score"

    def members(self, names: Sequence[str]) -> Selector:
        return self.model
