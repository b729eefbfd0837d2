"""Drift detection quality of the generated alert, simulated with the same math.

:func:`ml_wsgi_metrics.rules.drift_condition` is the ``ModelFeatureDrift`` condition (PSI with
clamped shares above ``max(floor, chi2.ppf(q, B - 1) * (1/n + 1/m))``, at least ``min_rows``),
with the defaults the ``rules`` command uses. Live windows are samples of a Telco-like
``MonthlyCharges`` population; the reference is a separate sample of 5,000 rows profiled by
:func:`build_profile`. The bin counts of a window of ``n`` rows drawn from the population are
multinomial with the population's bin probabilities, so windows are drawn that way (cheap), and
checked against drawing the rows themselves.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import pytest

from ml_wsgi_metrics.profile import NumericProfile, build_profile
from ml_wsgi_metrics.rules import RuleSettings, drift_condition, psi
from service.data import generate

SIZES = (100, 200, 500, 1000, 2000, 5000)
WINDOWS = 20_000  # per size: 0.5 % of them is 100 windows
REFERENCE_ROWS = 5_000
POPULATION_ROWS = 100_000


def telco_like(rows: int, seed: int) -> np.ndarray:
    """About 22 % phone-only customers near 20, the rest spread over 45-115, 0.05 steps."""
    rng = np.random.default_rng(seed)
    low = rng.random(rows) < 0.22
    values = np.where(low, rng.uniform(18.25, 25.0, rows), rng.triangular(45, 85, 115, rows))
    return np.round(values * 20) / 20


def service_data(rows: int, seed: int) -> np.ndarray:
    return generate(rows, seed=seed)["MonthlyCharges"].to_numpy()


class Population:
    def __init__(self, draw: Callable[[int, int], np.ndarray]) -> None:
        reference = pd.DataFrame({"MonthlyCharges": draw(REFERENCE_ROWS, 1)})
        feature = build_profile(reference, model="churn", version="1").features[0]
        assert isinstance(feature, NumericProfile)
        self.feature = feature
        self.edges = np.asarray(feature.edges)
        self.values = draw(POPULATION_ROWS, 2)

    def probabilities(self, scale: float = 1.0) -> np.ndarray:
        bins = np.searchsorted(self.edges, self.values * scale, side="left")
        return np.bincount(bins, minlength=len(self.edges) + 1) / len(self.values)

    def alarm_rate(self, counts: np.ndarray, settings: RuleSettings | None = None) -> float:
        f = self.feature
        return float(drift_condition(counts, f.shares, f.count, settings).mean())


@pytest.fixture(scope="module", params=["synthetic", "service.data"])
def population(request: pytest.FixtureRequest) -> Population:
    return Population(telco_like if request.param == "synthetic" else service_data)


def test_undrifted_windows_rarely_raise_the_drift_condition(population: Population) -> None:
    rng = np.random.default_rng(3)
    p = population.probabilities()
    rates = {n: population.alarm_rate(rng.multinomial(n, p, size=WINDOWS)) for n in SIZES}
    assert all(rate < 0.005 for rate in rates.values()), rates


def test_five_percent_price_rise_is_detected_in_2000_row_windows(population: Population) -> None:
    rng = np.random.default_rng(4)
    counts = rng.multinomial(2000, population.probabilities(1.05), size=WINDOWS)
    assert population.alarm_rate(counts) >= 0.95


def test_drawing_rows_gives_the_same_rates(population: Population) -> None:
    """The multinomial shortcut against windows of actual rows, binned like the live path."""
    rng = np.random.default_rng(5)
    edges, values = population.edges, population.values
    size = len(edges) + 1

    def windows(n: int, count: int, scale: float) -> np.ndarray:
        rows = values[rng.integers(0, len(values), size=(count, n))] * scale
        codes = np.searchsorted(edges, rows, side="left") + size * np.arange(count)[:, None]
        return np.bincount(codes.ravel(), minlength=size * count).reshape(count, size)

    assert population.alarm_rate(windows(100, WINDOWS, 1.0)) < 0.005
    assert population.alarm_rate(windows(2000, 2000, 1.05)) >= 0.95


def test_beats_a_fixed_psi_threshold(population: Population) -> None:
    """Evidently's fixed PSI > 0.1: false alarms on small windows, blind on large ones."""
    rng = np.random.default_rng(6)
    f = population.feature
    small = rng.multinomial(100, population.probabilities(), size=WINDOWS)
    large = rng.multinomial(2000, population.probabilities(1.05), size=WINDOWS)
    fixed_false_alarms = float((psi(small, f.shares) > 0.1).mean())
    fixed_detection = float((psi(large, f.shares) > 0.1).mean())
    assert fixed_false_alarms > 0.1 and fixed_detection < 0.5
    assert population.alarm_rate(small) < fixed_false_alarms / 20
    assert population.alarm_rate(large) > fixed_detection + 0.5
