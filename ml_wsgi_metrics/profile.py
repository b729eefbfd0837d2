"""The reference profile: what the training data looked like, as a small versioned JSON file.

Built once from the training features (and the model's scores on them), saved beside the model
and loaded by every worker. For each numeric feature it keeps the bin edges (reference deciles,
rounded, duplicates removed), the share of reference rows in each of the ``len(edges) + 1`` bins
(bin ``i`` is ``(edges[i-1], edges[i]]``), min/max, mean, standard deviation and missing rate;
for each categorical feature its vocabulary and shares; the same numeric summary for the score.
Live bin counts are compared with these shares in PromQL (PSI), see :mod:`ml_wsgi_metrics.rules`.

This module owns the format (the classes, their checks, JSON in and out) and
:func:`build_profile`; the statistics of a training column are computed in
:mod:`ml_wsgi_metrics._profiling`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any

import numpy as np

from ._expected import mean_expected
from ._profiling import (
    categorical_fields,
    is_categorical,
    numeric_fields,
    positive_scores,
    round_edges,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MAX_CATEGORIES",
    "MIN_CATEGORY_SHARE",
    "UNSEEN",
    "CategoricalProfile",
    "NumericProfile",
    "ReferenceProfile",
    "build_profile",
    "estimate_accuracy",
    "positive_scores",
    "round_edges",
]

FORMAT = "ml-wsgi-metrics/profile"
FORMAT_VERSION = 1

#: The bin of categorical values outside the vocabulary (unseen or folded as rare).
UNSEEN = "__unseen__"
#: At most this many categories are kept per feature; the rest fold into :data:`UNSEEN`.
MAX_CATEGORIES = 50
#: Categories rarer than this share of the non-missing reference rows fold into :data:`UNSEEN`.
MIN_CATEGORY_SHARE = 0.001

_SHARE_TOLERANCE = 1e-6


def _fail(where: str, message: str) -> ValueError:
    return ValueError(f"profile: {where}: {message}")


def _check_shares(where: str, shares: Sequence[float], expected: int) -> None:
    if len(shares) != expected:
        raise _fail(where, f"expected {expected} shares, got {len(shares)}")
    if any(not math.isfinite(s) or s < 0 or s > 1 for s in shares):
        raise _fail(where, "shares must be numbers in [0, 1]")
    if abs(math.fsum(shares) - 1.0) > _SHARE_TOLERANCE:
        raise _fail(where, f"shares must sum to 1, got {math.fsum(shares)!r}")


def _check_rate(where: str, rate: float) -> None:
    if not (math.isfinite(rate) and 0 <= rate <= 1):
        raise _fail(where, f"missing_rate must be in [0, 1], got {rate!r}")


@dataclass(frozen=True)
class NumericProfile:
    """A numeric feature (or the score): reference bins and summary statistics.

    ``count`` is the number of non-missing reference values, ``std`` the population standard
    deviation (the one the PromQL rules compute).
    """

    name: str
    edges: tuple[float, ...]
    shares: tuple[float, ...]
    count: int
    missing_rate: float
    min: float
    max: float
    mean: float
    std: float
    kind: str = field(default="numeric", init=False)

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if not self.edges or any(not math.isfinite(e) for e in self.edges):
            raise _fail(where, "edges must be a non-empty list of finite numbers")
        if any(b <= a for a, b in zip(self.edges, self.edges[1:], strict=False)):
            raise _fail(where, "edges must be strictly increasing")
        _check_shares(where, self.shares, len(self.edges) + 1)
        if not isinstance(self.count, int) or self.count < 1:
            raise _fail(where, f"count must be a positive integer, got {self.count!r}")
        _check_rate(where, self.missing_rate)
        stats = (self.min, self.max, self.mean, self.std)
        if any(not math.isfinite(v) for v in stats) or self.min > self.max or self.std < 0:
            raise _fail(where, "min, max, mean, std must be finite, min <= max and std >= 0")

    @property
    def bins(self) -> tuple[str, ...]:
        """The ``bin`` label values: ``"0"`` .. ``str(len(edges))``."""
        return tuple(str(i) for i in range(len(self.edges) + 1))

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


@dataclass(frozen=True)
class CategoricalProfile:
    """A categorical feature: vocabulary and shares; ``shares[-1]`` is the :data:`UNSEEN` bin.

    Categories beyond :data:`MAX_CATEGORIES` or rarer than :data:`MIN_CATEGORY_SHARE` are left
    out of the vocabulary (``folded`` counts them): live values of theirs count as unseen, and
    the reference share of the unseen bin is their total share, so PSI stays consistent.
    """

    name: str
    categories: tuple[str, ...]
    shares: tuple[float, ...]
    count: int
    missing_rate: float
    folded: int = 0
    kind: str = field(default="categorical", init=False)

    def __post_init__(self) -> None:
        where = f"feature {self.name!r}"
        if any(not isinstance(c, str) for c in self.categories):
            raise _fail(where, "categories must be strings")
        if len(set(self.categories)) != len(self.categories) or UNSEEN in self.categories:
            raise _fail(where, f"categories must be unique and not {UNSEEN!r}")
        _check_shares(where, self.shares, len(self.categories) + 1)
        if not isinstance(self.count, int) or self.count < 1:
            raise _fail(where, f"count must be a positive integer, got {self.count!r}")
        if not isinstance(self.folded, int) or self.folded < 0:
            raise _fail(where, f"folded must be a non-negative integer, got {self.folded!r}")
        _check_rate(where, self.missing_rate)

    @property
    def bins(self) -> tuple[str, ...]:
        """The ``bin`` label values: the categories, then :data:`UNSEEN`."""
        return (*self.categories, UNSEEN)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


FeatureProfile = NumericProfile | CategoricalProfile


def _as_dict(feature: FeatureProfile) -> dict[str, Any]:
    """The JSON form: name, kind, then the other fields in order, tuples as lists."""
    data: dict[str, Any] = {"name": feature.name, "kind": feature.kind}
    for name in (f.name for f in fields(feature)):
        value = getattr(feature, name)
        data.setdefault(name, list(value) if isinstance(value, tuple) else value)
    return data


@dataclass(frozen=True)
class ReferenceProfile:
    """The reference of one model version: features, score, classes and row count ``rows``.

    ``accuracy`` (optional) is the model's held-out accuracy; the accuracy-drop alert uses it.
    ``estimated_accuracy`` (optional) is its mean predicted-class probability on the same rows
    (:func:`estimate_accuracy`), what live estimated accuracy is compared with; the gap between
    the two says how well calibrated the model is.
    """

    model: str
    version: str
    rows: int
    features: tuple[FeatureProfile, ...]
    score: NumericProfile | None = None
    classes: tuple[str, ...] | None = None
    accuracy: float | None = None
    estimated_accuracy: float | None = None

    def __post_init__(self) -> None:
        for name in ("model", "version"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise _fail(name, f"must be a non-empty string, got {value!r}")
        if not isinstance(self.rows, int) or self.rows < 1:
            raise _fail("rows", f"must be a positive integer, got {self.rows!r}")
        names = [f.name for f in self.features]
        if any(not isinstance(n, str) or not n for n in names):
            raise _fail("features", "every feature needs a non-empty string name")
        if len(set(names)) != len(names):
            raise _fail("features", "feature names must be unique")
        for feature in (*self.features, *([self.score] if self.score else [])):
            if feature.count > self.rows:
                raise _fail(f"feature {feature.name!r}", "count exceeds the reference rows")
        if self.classes is not None:
            if not self.classes or any(not isinstance(c, str) or not c for c in self.classes):
                raise _fail("classes", "must be non-empty strings")
            if len(set(self.classes)) != len(self.classes):
                raise _fail("classes", "must be unique")
        for name in ("accuracy", "estimated_accuracy"):
            value = getattr(self, name)
            if value is not None and not (0 <= value <= 1):
                raise _fail(name, f"must be in [0, 1], got {value!r}")

    @property
    def key(self) -> tuple[str, str]:
        return (self.model, self.version)

    def feature(self, name: str) -> FeatureProfile:
        for feature in self.features:
            if feature.name == name:
                return feature
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "classes": list(self.classes) if self.classes is not None else None,
            "accuracy": self.accuracy,
            "estimated_accuracy": self.estimated_accuracy,
            "score": self.score.to_dict() if self.score is not None else None,
            "features": [f.to_dict() for f in self.features],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReferenceProfile:
        """Validate and build; any problem is a ``ValueError`` saying where."""
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise _fail("format", f"not a profile (expected format {FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise _fail(
                "format_version",
                f"{data.get('format_version')!r} is not supported (this is {FORMAT_VERSION})",
            )
        try:
            features = tuple(_feature_from_dict(f) for f in _list(data, "features"))
            score = data.get("score")
            classes = data.get("classes")
            estimate = data.get("estimated_accuracy")  # absent from older profiles
            return cls(
                model=data["model"],
                version=data["version"],
                rows=data["rows"],
                features=features,
                score=_numeric_from_dict(score) if score is not None else None,
                classes=tuple(_list(data, "classes")) if classes is not None else None,
                accuracy=_number(data["accuracy"]) if data.get("accuracy") is not None else None,
                estimated_accuracy=_number(estimate) if estimate is not None else None,
            )
        except KeyError as missing:
            raise _fail("keys", f"missing key {missing}") from None
        except TypeError as error:
            raise _fail("types", str(error)) from None

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON, atomically (a reader never sees half a file)."""
        text = json.dumps(self.to_dict(), indent=1, allow_nan=False) + "\n"
        directory = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".profile-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> ReferenceProfile:
        """Read and validate a profile written by :meth:`save`."""
        with open(path, encoding="utf-8") as handle:
            try:
                data = json.load(handle)
            except json.JSONDecodeError as error:
                raise ValueError(f"profile: {os.fspath(path)}: not JSON ({error})") from None
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{os.fspath(path)}: {error}") from None


def _list(data: Mapping[str, Any], key: str) -> list[Any]:
    value = data[key]
    if not isinstance(value, list):
        raise TypeError(f"{key!r} must be a list")
    return value


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"expected a number, got {value!r}")
    return float(value)


def _numbers(data: Mapping[str, Any], key: str) -> tuple[float, ...]:
    return tuple(_number(v) for v in _list(data, key))


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _numeric_from_dict(data: Mapping[str, Any]) -> NumericProfile:
    if not isinstance(data, Mapping) or data.get("kind") != "numeric":
        raise _fail("score", "must be a numeric feature profile")
    return NumericProfile(
        name=data["name"],
        edges=_numbers(data, "edges"),
        shares=_numbers(data, "shares"),
        count=_integer(data["count"]),
        missing_rate=_number(data["missing_rate"]),
        min=_number(data["min"]),
        max=_number(data["max"]),
        mean=_number(data["mean"]),
        std=_number(data["std"]),
    )


def _feature_from_dict(data: Any) -> FeatureProfile:
    kind = data.get("kind") if isinstance(data, Mapping) else None
    if kind == "numeric":
        return _numeric_from_dict(data)
    if kind == "categorical":
        return CategoricalProfile(
            name=data["name"],
            categories=tuple(_list(data, "categories")),
            shares=_numbers(data, "shares"),
            count=_integer(data["count"]),
            missing_rate=_number(data["missing_rate"]),
            folded=_integer(data.get("folded", 0)),
        )
    raise _fail("features", f"unknown feature kind {kind!r} (numeric or categorical)")


# -- building (the numbers come from _profiling) -------------------------------------------


def estimate_accuracy(
    scores: Any, predicted: Any = None, *, classes: Sequence[str] | None = None
) -> float:
    """The mean predicted-class probability of rows, read as live predictions are: what a
    calibrated model expects its accuracy on them to be (a profile's ``estimated_accuracy``,
    from held-out rows).

    :param scores: as :func:`~ml_wsgi_metrics.signals.record_prediction` takes them.
    :param predicted: the predicted class per row (compared as strings), or ``None``.
    :param classes: the profile's classes.
    """
    return mean_expected(positive_scores(scores), predicted, classes)


def build_profile(
    features: pd.DataFrame,
    *,
    model: str,
    version: str,
    scores: np.ndarray | None = None,
    classes: list[str] | None = None,
    bins: int = 10,
    accuracy: float | None = None,
    estimated_accuracy: float | None = None,
    max_categories: int = MAX_CATEGORIES,
    min_category_share: float = MIN_CATEGORY_SHARE,
) -> ReferenceProfile:
    """Profile the training ``features`` (raw, before encoding) and the model's ``scores``.

    Numeric dtypes (bool excluded) are binned at the reference quantiles ``1/bins .. (bins-1)/
    bins``; object, string, category and bool columns are categorical. NaN, None and
    infinities are missing. ``classes`` are the model's class labels (as strings).
    ``accuracy`` and ``estimated_accuracy`` are measured on held-out rows, the second with
    :func:`estimate_accuracy`.
    """
    import pandas as pd

    if not isinstance(features, pd.DataFrame):
        raise ValueError("build_profile: features must be a pandas DataFrame")
    if len(features) == 0:
        raise ValueError("build_profile: features has no rows")
    if not isinstance(bins, int) or bins < 2:
        raise ValueError(f"build_profile: bins must be an integer >= 2, got {bins!r}")
    if max_categories < 1 or not (0 <= min_category_share < 1):
        raise ValueError("build_profile: max_categories >= 1 and 0 <= min_category_share < 1")
    profiles = [
        _feature_profile(str(name), features[name], bins, max_categories, min_category_share)
        for name in features.columns
    ]
    score = None
    if scores is not None:
        values = positive_scores(scores)
        if len(values) != len(features):
            raise ValueError(
                f"build_profile: {len(values)} scores for {len(features)} feature rows"
            )
        score = _numeric_profile("score", values, bins)
    return ReferenceProfile(
        model=model,
        version=version,
        rows=len(features),
        features=tuple(profiles),
        score=score,
        classes=_class_labels(classes) if classes is not None else None,
        accuracy=accuracy,
        estimated_accuracy=estimated_accuracy,
    )


def _feature_profile(
    name: str, column: pd.Series, bins: int, max_categories: int, min_share: float
) -> FeatureProfile:
    if is_categorical(name, column):
        return CategoricalProfile(
            name, **categorical_fields(name, column, max_categories, min_share, UNSEEN)
        )
    return _numeric_profile(name, column.to_numpy(dtype=np.float64, na_value=np.nan), bins)


def _numeric_profile(name: str, values: np.ndarray, bins: int) -> NumericProfile:
    return NumericProfile(name, **numeric_fields(name, values, bins))


def _class_labels(classes: Iterable[Any]) -> tuple[str, ...]:
    return tuple(str(c) for c in classes)
