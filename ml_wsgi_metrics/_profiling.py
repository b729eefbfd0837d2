"""Summaries of training columns: the numbers a reference profile keeps of each.

A numeric column gives bin edges (reference deciles, rounded, duplicates removed), the share of
rows in each bin and its moments; a categorical column its vocabulary (rare values folded) and
shares. The functions return the fields of :class:`~ml_wsgi_metrics.profile.NumericProfile` and
:class:`~ml_wsgi_metrics.profile.CategoricalProfile`, which validate them;
:func:`ml_wsgi_metrics.profile.build_profile` is the public entry.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "categorical_fields",
    "is_categorical",
    "numeric_fields",
    "positive_scores",
    "round_edges",
]


def positive_scores(scores: Any) -> np.ndarray:
    """Scores as a float vector: a ``(n, 2)`` ``predict_proba`` result gives its column 1."""
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim == 2 and array.shape[1] == 2:
        return array[:, 1]
    if array.ndim == 2 and array.shape[1] == 1:
        return array[:, 0]
    if array.ndim != 1:
        raise ValueError(f"scores: expected one score per row, got shape {array.shape}")
    return array


def round_edges(quantiles: np.ndarray, low: float, high: float) -> np.ndarray:
    """Edges rounded to 4 significant digits of the reference range, duplicates removed.

    A range of 100 gives 0.1 steps; of 1 (probabilities) 0.001; a constant feature keeps its
    value. Rounding only moves edges: the shares are computed afterwards, with these edges.
    """
    span = high - low
    scale = span if span > 0 else max(abs(low), 1.0)
    decimals = 3 - math.floor(math.log10(scale))
    return np.unique(np.round(quantiles, decimals))


def numeric_fields(name: str, values: np.ndarray, bins: int) -> dict[str, Any]:
    """Bins at the ``1/bins .. (bins-1)/bins`` quantiles (rounded), shares and moments."""
    total = len(values)
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        raise ValueError(f"build_profile: feature {name!r} has no finite values")
    low, high = float(finite.min()), float(finite.max())
    quantiles = np.quantile(finite, np.arange(1, bins) / bins)
    edges = round_edges(quantiles, low, high)
    counts = np.bincount(np.searchsorted(edges, finite, side="left"), minlength=len(edges) + 1)
    return dict(
        edges=tuple(float(e) for e in edges),
        shares=tuple((counts / finite.size).tolist()),
        count=int(finite.size),
        missing_rate=float(1 - finite.size / total),
        min=low,
        max=high,
        mean=float(finite.mean()),
        std=float(finite.std()),
    )


def categorical_fields(
    name: str, column: pd.Series, max_categories: int, min_share: float, unseen: str
) -> dict[str, Any]:
    """The most frequent values (at most ``max_categories``, each at least ``min_share`` of
    the rows) and their shares; the last share is the rest's, the ``unseen`` bin."""
    total = len(column)
    present = column[~column.isna()]
    if present.empty:
        raise ValueError(f"build_profile: feature {name!r} has no non-missing values")
    labels = present.astype(object).map(str)
    if (labels == unseen).any():
        raise ValueError(f"build_profile: feature {name!r} uses the reserved value {unseen!r}")
    counts = labels.value_counts(sort=False)
    # Most frequent first, ties by name: the same data always gives the same vocabulary.
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    m = len(labels)
    kept = [(c, n) for c, n in ordered[:max_categories] if n / m >= min_share]
    kept_rows = sum(n for _, n in kept)
    return dict(
        categories=tuple(c for c, _ in kept),
        shares=(*(n / m for _, n in kept), (m - kept_rows) / m),
        count=m,
        missing_rate=float(1 - m / total),
        folded=len(ordered) - len(kept),
    )


def is_categorical(name: str, column: pd.Series) -> bool:
    """Numeric dtypes but bool are binned; object, string, category and bool are categorical."""
    import pandas as pd

    dtype = column.dtype
    if pd.api.types.is_datetime64_any_dtype(dtype) or pd.api.types.is_timedelta64_dtype(dtype):
        raise ValueError(
            f"build_profile: feature {name!r} has dtype {dtype}: convert it to numbers"
        )
    return bool(pd.api.types.is_bool_dtype(dtype) or not pd.api.types.is_numeric_dtype(dtype))
