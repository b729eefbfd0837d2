"""The per-model panels of a generated dashboard, and the series names every panel reads.

Owns :class:`ModelView` (one model of the profiles, every version given) and
:data:`MODEL_PANELS` (one function per panel of a model's row), the feature panels of its
collapsed row, and :class:`Series` (the rules' settings and names), shared with
:mod:`ml_wsgi_metrics.dashboard`, which places them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ._grafana import Panel, Query, panel, ratio
from ._promql import MODEL, Names, Selector, max_by, rate, sum_by
from .profile import CategoricalProfile, FeatureProfile, NumericProfile, ReferenceProfile
from .rules import RuleSettings, effective_bins

__all__ = ["CHOSEN", "HOSTS", "MODEL_PANELS", "ModelView", "Series", "feature_panels", "timeseries"]

#: The variables' matchers: raw series of the selected job and instances; chosen models.
HOSTS = Selector().variables("job", "instance")
CHOSEN = Selector().variables(*MODEL)


def timeseries(title: str, queries: Sequence[Query], **options: Any) -> Panel:
    return panel("timeseries", title, queries, **options)


@dataclass(frozen=True)
class Series:
    """The rules' settings and names: series as the package exports them (of the selected
    job and instances by default) and as the rules record them."""

    settings: RuleSettings
    names: Names

    def raw(self, name: str, selector: Selector = HOSTS) -> str:
        return selector.series(self.names.metric(name))

    def recorded(self, name: str, selector: Selector = CHOSEN) -> str:
        return selector.series(self.names.record(name))


# -- per model of the profiles -------------------------------------------------------------


@dataclass(frozen=True)
class ModelView:
    """A model of the profiles (every version given) and the series its panels read."""

    name: str
    profiles: tuple[ReferenceProfile, ...]
    series: Series

    @property
    def window(self) -> str:
        return self.series.settings.window

    def recorded(self, name: str, **labels: str) -> str:
        """A recorded series of this model, in the versions the variable selects."""
        selector = Selector(model=self.name).variables("version").where(**labels)
        return self.series.recorded(name, selector)

    @property
    def hosts(self) -> Selector:
        """Raw series of this model on the selected hosts, in the selected versions."""
        return HOSTS.where(model=self.name).variables("version")

    def features(self) -> list[list[FeatureProfile]]:
        """Each feature (first seen first), as profiled in each version that has it."""
        found: dict[str, list[FeatureProfile]] = {}
        for profile in self.profiles:
            for feature in profile.features:
                found.setdefault(feature.name, []).append(feature)
        return list(found.values())


def _psi_queries(
    view: ModelView, kind: str, profiled: Sequence[FeatureProfile], **labels: str
) -> list[Query]:
    """PSI of a feature or the score, and its critical value (recorded for two or more
    reference bins)."""
    w = view.window
    queries = [(view.recorded(f"{kind}_psi:{w}", **labels), "PSI {{version}}")]
    if any(effective_bins(p.shares) >= 2 for p in profiled):
        critical = view.recorded(f"{kind}_psi_critical:{w}", **labels)
        queries.append((critical, "critical {{version}}"))
    return queries


def _model_predictions(view: ModelView) -> list[Panel]:
    counts = view.series.names.metric("model_predictions_total")
    query = sum_by(("version", "class"), rate(view.hosts, counts, view.series.settings.ops_window))
    return [timeseries(f"{view.name}: predictions by class", [(query, "{{class}} {{version}}")])]


def _model_score(view: ModelView) -> list[Panel]:
    scores = [p.score for p in view.profiles if p.score is not None]
    if not scores:
        return []
    w = view.window
    queries = _psi_queries(view, "score", scores)
    queries += [
        (view.recorded(f"score_mean:{w}"), "mean {{version}}"),
        (view.recorded(f"score_stddev:{w}"), "stddev {{version}}"),
    ]
    return [timeseries(f"{view.name}: score PSI, mean and standard deviation", queries)]


def _model_quality(view: ModelView) -> list[Panel]:
    w = view.window
    queries = [
        (view.recorded(f"feature_{what}_ratio:{w}"), what.replace("_", " ") + " {{feature}}")
        for what in ("missing", "out_of_range", "unseen")
    ]
    if any(p.score is not None for p in view.profiles):
        queries.append((view.recorded(f"score_missing_ratio:{w}"), "missing score"))
    return [
        timeseries(
            f"{view.name}: data quality",
            queries,
            description="Shares of rows with a feature missing, a number outside the "
            "reference range, a category outside the vocabulary; scores missing.",
            unit="percentunit",
            defaults=ratio(),
        )
    ]


def _model_accuracy(view: ModelView) -> list[Panel]:
    if not any(p.classes for p in view.profiles):
        return []  # no confusion matrix: the rules record no accuracy
    w = view.window
    queries = [
        (view.recorded(f"accuracy:{w}"), "accuracy {{version}}"),
        (view.recorded(f"precision:{w}"), "precision {{class}} {{version}}"),
        (view.recorded(f"recall:{w}"), "recall {{class}} {{version}}"),
    ]
    if any(p.accuracy is not None for p in view.profiles):
        held_out = view.series.raw("model_reference_accuracy", view.hosts)
        queries.append((max_by(("version",), held_out), "held-out {{version}}"))
    return [
        timeseries(
            f"{view.name}: accuracy, precision and recall",
            queries,
            description=f"From the labels received over {w} (model_confusion_total).",
            unit="percentunit",
            defaults=ratio(),
        )
    ]


def _model_estimated_accuracy(view: ModelView) -> list[Panel]:
    if not any(p.score is not None for p in view.profiles):
        return []  # no scores: nothing to estimate from
    w = view.window
    queries = [(view.recorded(f"estimated_accuracy:{w}"), "estimated {{version}}")]
    if any(p.estimated_accuracy is not None for p in view.profiles):
        queries.append((view.recorded("reference_estimated_accuracy"), "held-out {{version}}"))
    return [
        timeseries(
            f"{view.name}: estimated accuracy (no labels)",
            queries,
            description=f"Mean predicted-class probability over {w}: no label needed.",
            unit="percentunit",
            defaults=ratio(),
        )
    ]


#: The panels of each model's row, in order; each function gives zero or more panels.
MODEL_PANELS: tuple[Callable[[ModelView], list[Panel]], ...] = (
    _model_predictions,
    _model_score,
    _model_quality,
    _model_accuracy,
    _model_estimated_accuracy,
)


def feature_panels(view: ModelView, profiled: Sequence[FeatureProfile]) -> list[Panel]:
    """PSI against the critical value; mean and stddev, or category shares."""
    name, w = profiled[0].name, view.window
    panels = [
        timeseries(
            f"{name}: PSI and critical value",
            _psi_queries(view, "feature", profiled, feature=name),
            description=f"Model {view.name}, feature {name}: PSI over {w}; drift above the "
            "critical value.",
            width=12,
        )
    ]
    if any(isinstance(p, NumericProfile) for p in profiled):
        mean = view.recorded(f"feature_mean:{w}", feature=name)
        stddev = view.recorded(f"feature_stddev:{w}", feature=name)
        queries = [(mean, "mean {{version}}"), (stddev, "stddev {{version}}")]
        panels.append(timeseries(f"{name}: mean and standard deviation", queries, width=12))
    if any(isinstance(p, CategoricalProfile) for p in profiled):
        live = view.recorded(f"feature_live_share:{w}", feature=name)
        reference = view.recorded("feature_reference_share", feature=name)
        queries = [(live, "live {{bin}}"), (reference, "reference {{bin}}")]
        panels.append(
            panel("bargauge", f"{name}: category shares", queries, unit="percentunit", width=12)
        )
    return panels
