"""The SVG geometry of the results page: the score histogram's bars, in SVG units."""

from __future__ import annotations

from typing import Any

import numpy as np

from service.published import NEGATIVE_CLASS, POSITIVE_CLASS

__all__ = ["score_histogram"]


def score_histogram(
    scores: np.ndarray, actual: np.ndarray, *, bins: int = 20, width: int = 640, height: int = 240
) -> dict[str, Any]:
    """Stacked bars of the score distribution (non-churners below churners), in SVG units.

    A non-empty bin is at least one unit high, so every count is visible.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    stay, _ = np.histogram(scores[actual == NEGATIVE_CLASS], bins=edges)
    churn, _ = np.histogram(scores[actual == POSITIVE_CLASS], bins=edges)
    top = max(int((stay + churn).max()), 1)
    bar = width / bins

    def units(count: int) -> float:
        return 0.0 if count == 0 else max(1.0, round(count / top * height, 1))

    bars = []
    for i, (low, high) in enumerate(zip(stay.tolist(), churn.tolist(), strict=True)):
        low_h, high_h = units(low), units(high)
        x = round(i * bar + 1, 1)
        bars.append(
            {
                "x": x,
                "width": round(bar - 2, 1),
                "label": f"{edges[i]:.2f}-{edges[i + 1]:.2f}",
                "stay": {"count": low, "y": round(height - low_h, 1), "height": low_h},
                "churn": {
                    "count": high,
                    "y": round(height - low_h - high_h, 1),
                    "height": high_h,
                },
            }
        )
    return {"bars": bars, "width": width, "height": height, "max_count": top}
