"""PromQL text, written one way: series names, label selectors, the expression shapes the
generated rules repeat, and the rule file entries that carry them.

Every selector of the generated rules is a :class:`Selector`; every metric and recorded series
name comes from :class:`Names`. A dashboard or any other generator that must read the same series
imports these rather than writing PromQL by hand::

    names = Names("svc")                            # the metrics' namespace, "" for none
    model = model_selector("churn", "3")            # Selector().variables(*MODEL) in Grafana
    model.series(names.record("feature_psi:1h"))
    # svc:feature_psi:1h{model="churn",version="3"}
    features = model.one_of("feature", ["tenure", "charges"])
    sum_by((*MODEL, "feature"), increase(features, names.metric("model_feature_bin_total"), "1h"))
    # sum by (model, version, feature) (increase(svc_model_feature_bin_total{model="churn",
    #   version="3",feature=~"tenure|charges"}[1h]))

Label values are escaped as PromQL strings, so values from Grafana variables (``"$model"``) pass
through unchanged.
"""

from __future__ import annotations

import json
import re
import textwrap
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "LOOKBACK",
    "MODEL",
    "Names",
    "Rule",
    "Selector",
    "alerting_rule",
    "alternation",
    "duration",
    "duration_ms",
    "exact_increase",
    "increase",
    "label_list",
    "max_by",
    "model_selector",
    "number",
    "on",
    "positive",
    "rate",
    "recording_rule",
    "string",
    "sum_by",
]

#: The labels that identify one model version on every model series.
MODEL = ("model", "version")
#: Prometheus' default ``--query.lookback-delta``, how long before a window's start the rules
#: look for a series' last sample (a series absent longer is new to them).
LOOKBACK = "5m"

_UNITS = {"y": 31_536_000_000, "w": 604_800_000, "d": 86_400_000, "h": 3_600_000}
_UNITS |= {"m": 60_000, "s": 1_000, "ms": 1}
_PART = re.compile(r"(\d+)(ms|[smhdwy])")

_REGEX_SPECIAL = re.compile(r"([\\.+*?()|\[\]{}^$])")


def string(value: str) -> str:
    """A PromQL string literal (JSON escapes are a subset of what PromQL reads)."""
    return json.dumps(value)


def alternation(values: Iterable[str]) -> str:
    """An RE2 alternation matching exactly ``values``."""
    return "|".join(_REGEX_SPECIAL.sub(r"\\\1", value) for value in values)


def number(value: float) -> str:
    """A float literal that reads back as the same float."""
    return repr(float(value))


def duration_ms(duration: str) -> int:
    """A Prometheus duration (``1h30m``) in milliseconds."""
    return sum(int(n) * _UNITS[unit] for n, unit in _PART.findall(duration))


def duration(ms: int) -> str:
    """Milliseconds as Prometheus writes a duration: ``3_900_000`` is ``1h5m``."""
    parts = []
    for unit, size in _UNITS.items():
        if ms >= size:
            parts.append(f"{ms // size}{unit}")
            ms %= size
    return "".join(parts) or "0s"


class Selector:
    """Label matchers, rendered in the order given: ``{model="churn",version="3"}``.

    ``Selector(**labels)`` matches labels by equality; :meth:`where`, :meth:`one_of`,
    :meth:`matching` and :meth:`variables` return a new selector with more matchers. No
    matchers render as nothing, so ``Selector().series(name)`` is the bare ``name``.
    """

    __slots__ = ("_matchers",)

    def __init__(self, /, **labels: str) -> None:
        self._matchers = tuple((label, "=", value) for label, value in labels.items())

    def _with(self, *matchers: tuple[str, str, str]) -> Selector:
        selector = Selector()
        selector._matchers = (*self._matchers, *matchers)
        return selector

    def where(self, /, **labels: str) -> Selector:
        """More equality matchers."""
        return self._with(*((label, "=", value) for label, value in labels.items()))

    def matching(self, label: str, pattern: str) -> Selector:
        """A regular-expression matcher: ``label=~"pattern"``."""
        return self._with((label, "=~", pattern))

    def variables(self, *labels: str) -> Selector:
        """Each label matched to the Grafana variable of its name: ``job=~"$job"`` (a regex,
        as multi-value variables and "All" expand to alternations)."""
        return self._with(*((label, "=~", f"${label}") for label in labels))

    def one_of(self, label: str, values: Sequence[str]) -> Selector:
        """``label`` equal to one of ``values``: ``=`` for one value, an alternation for more."""
        if len(values) == 1:
            return self.where(**{label: values[0]})
        return self.matching(label, alternation(values))

    def series(self, name: str) -> str:
        """``name{matchers}``: an instant vector selector."""
        return f"{name}{self}"

    def range(self, name: str, window: str) -> str:
        """``name{matchers}[window]``: a range vector selector."""
        return f"{name}{self}[{window}]"

    def __str__(self) -> str:
        if not self._matchers:
            return ""
        return "{" + ",".join(f"{k}{op}{string(v)}" for k, op, v in self._matchers) + "}"

    def __repr__(self) -> str:
        return f"Selector({self})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Selector) and self._matchers == other._matchers

    def __hash__(self) -> int:
        return hash(self._matchers)


class Names:
    """Metric names under a namespace and the names of the series the rules record.

    Metrics are ``<namespace>_<name>`` (or ``<name>`` with no namespace); recorded series are
    ``<namespace or "ml">:<name>``, as Prometheus' naming convention has it (level:metric:ops).
    """

    __slots__ = ("namespace", "prefix")

    def __init__(self, namespace: str = "") -> None:
        self.namespace = namespace
        self.prefix = namespace or "ml"

    def metric(self, name: str) -> str:
        return f"{self.namespace}_{name}" if self.namespace else name

    def record(self, name: str) -> str:
        return f"{self.prefix}:{name}"


def model_selector(model: str, version: str) -> Selector:
    """The series of one model version: ``{model="churn",version="3"}``."""
    return Selector(model=model, version=version)


def label_list(names: Sequence[str]) -> str:
    """A label list as aggregations and matchings write it: ``model, version``."""
    return ", ".join(names)


def sum_by(by: Sequence[str], expr: str) -> str:
    """``sum by (by) (expr)``; an ``expr`` of several lines goes indented on its own lines."""
    if "\n" in expr:
        return f"sum by ({label_list(by)}) (\n{textwrap.indent(expr, '  ')}\n)"
    return f"sum by ({label_list(by)}) ({expr})"


def max_by(by: Sequence[str], expr: str) -> str:
    return f"max by ({label_list(by)}) ({expr})"


def on(by: Sequence[str]) -> str:
    """A vector matching clause: ``on (model, version)``."""
    return f"on ({label_list(by)})"


def increase(selector: Selector, name: str, window: str) -> str:
    return f"increase({selector.range(name, window)})"


def exact_increase(selector: Selector, name: str, window: str) -> str:
    """Each counter's increase over ``window``, not extrapolated: its last sample in the
    window less its baseline, its last sample at the window's start (found within
    :data:`LOOKBACK`, through a staleness marker, as a failed scrape writes one; 0 without
    one: a series born in the window counts from zero). A counter
    that went down once in the window (a restart) and stays below its value before adds that
    value (its largest); one that went down otherwise (twice, between its baseline and the
    window, or back above its old value) takes ``increase()``, Prometheus' estimate.

    Summed over hosts scraped at different moments, these are the counts between each host's
    baseline and last scrape, where ``increase()`` scales each host's count by a factor of its
    own scrape phase.
    """
    within = selector.range(name, window)
    widened = selector.range(name, duration(duration_ms(window) + duration_ms(LOOKBACK)))
    last = f"last_over_time({within})"
    start = f"last_over_time({selector.range(name, LOOKBACK)} offset {window})"
    baseline = f"({start} or 0 * {last})"
    return (
        f"{last} - {baseline}\nunless resets({widened}) > 0\n"
        f"or (max_over_time({within}) > {last}) + {last} - {baseline}\n"
        f"  and resets({widened}) == 1 and resets({within}) == 1\n"
        f"or {increase(selector, name, window)}"
    )


def rate(selector: Selector, name: str, window: str) -> str:
    return f"rate({selector.range(name, window)})"


def positive(expr: str) -> str:
    """``(expr > 0)``: no traffic gives no series (not a division by zero)."""
    return f"({expr} > 0)"


# -- rule file entries ----------------------------------------------------------------------

#: One entry of a rule group, as Prometheus' rule file has it.
Rule = dict[str, Any]


def recording_rule(name: str, expr: str, labels: dict[str, str] | None = None) -> Rule:
    rule: Rule = {"record": name, "expr": expr}
    if labels:
        rule["labels"] = labels
    return rule


def alerting_rule(
    name: str, expr: str, duration: str, severity: str, summary: str, description: str
) -> Rule:
    return {
        "alert": name,
        "expr": expr,
        "for": duration,
        "labels": {"severity": severity},
        "annotations": {"summary": summary, "description": description},
    }
