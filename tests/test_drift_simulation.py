"""Drift detection quality of the generated alert, simulated with the same math.

:func:`ml_wsgi_metrics.rules.drift_condition` is the ``ModelFeatureDrift`` condition (PSI with
clamped shares above ``max(floor, chi2.ppf(q, B - 1) * (1/n + 1/m))``, at least ``min_rows``),
with the defaults the ``rules`` command uses. Live windows are samples of a Telco-like
``MonthlyCharges`` population; the reference is a separate sample of 5,000 rows profiled by
:func:`build_profile`. The bin counts of a window of ``n`` rows drawn from the population are
multinomial with the population's bin probabilities, so windows are drawn that way (cheap), and
checked against drawing the rows themselves.

The README's table is the simulation on the service's data (``service.data``): every cell is
checked against it with a Clopper-Pearson interval for the number of windows simulated, and
the PromQL alert is checked against the Python condition window by window in ``promtool``.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from test_rules import render_annotation

from ml_wsgi_metrics.profile import NumericProfile, ReferenceProfile, build_profile
from ml_wsgi_metrics.rules import (
    RuleSettings,
    critical_value,
    drift_condition,
    effective_bins,
    generate_rules,
    psi,
    render_yaml,
)
from service.data import generate

SIZES = (100, 200, 500, 1000, 2000, 5000)
WINDOWS = 20_000  # per size: 0.5 % of them is 100 windows
REFERENCE_ROWS = 5_000
POPULATION_ROWS = 100_000
README = Path(__file__).resolve().parent.parent / "README.md"
#: A README rate is accepted when its rounding interval meets the Clopper-Pearson interval of
#: the simulated count at this confidence: a figure the simulation contradicts fails.
CONFIDENCE = 0.999
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


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

    def alarms(self, counts: np.ndarray, settings: RuleSettings | None = None) -> np.ndarray:
        f = self.feature
        return np.asarray(drift_condition(counts, f.shares, f.count, settings))

    def alarm_rate(self, counts: np.ndarray, settings: RuleSettings | None = None) -> float:
        return float(self.alarms(counts, settings).mean())


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


# -- the README's table --------------------------------------------------------------------


@dataclasses.dataclass
class Table:
    """Windows raising the alert, out of :data:`WINDOWS` per size, on the service's data:
    undrifted (false alarms) and with MonthlyCharges +5 % (detected); and what a fixed
    ``PSI > 0.1`` does on the same windows."""

    false_alarms: dict[int, int]
    detected: dict[int, int]
    fixed_false_alarms_100: int
    fixed_detected_2000: int


@pytest.fixture(scope="module")
def service_population() -> Population:
    return Population(service_data)


@pytest.fixture(scope="module")
def table(service_population: Population) -> Table:
    population, f = service_population, service_population.feature
    undrifted, drifted = np.random.default_rng(3), np.random.default_rng(4)
    false_alarms, detected, fixed = {}, {}, {}
    for n in SIZES:
        quiet = undrifted.multinomial(n, population.probabilities(), size=WINDOWS)
        risen = drifted.multinomial(n, population.probabilities(1.05), size=WINDOWS)
        false_alarms[n] = int(population.alarms(quiet).sum())
        detected[n] = int(population.alarms(risen).sum())
        fixed[n] = (
            int((psi(quiet, f.shares) > 0.1).sum()),
            int((psi(risen, f.shares) > 0.1).sum()),
        )
    return Table(false_alarms, detected, fixed[100][0], fixed[2000][1])


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The exact two-sided binomial interval of the rate behind ``k`` successes in ``n``."""
    alpha = 1 - confidence
    low = float(stats.beta.ppf(alpha / 2, k, n - k + 1)) if k > 0 else 0.0
    high = float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k)) if k < n else 1.0
    return low, high


def assert_consistent(cell: str, written: str, k: int, n: int = WINDOWS) -> None:
    """The README's percentage ``written`` (as rounded there) against ``k`` of ``n``."""
    decimals = len(written.partition(".")[2])
    half = 0.5 * 10.0**-decimals / 100
    value = float(written) / 100
    low, high = clopper_pearson(k, n)
    assert value - half <= high and low <= value + half, (
        f"README {cell}: {written} % but the simulation gives {k}/{n} = {k / n:.4%} "
        f"({CONFIDENCE:.1%} interval {low:.4%} .. {high:.4%})"
    )


def readme_table() -> dict[int, tuple[str, str]]:
    """``{live rows: (false alarms %, detected %)}`` as the README writes them."""
    found = re.findall(
        r"^\| ([\d,]+) \| ([\d.]+) % \| ([\d.]+) % \|$", README.read_text(), re.MULTILINE
    )
    return {int(rows.replace(",", "")): (alarms, detected) for rows, alarms, detected in found}


def test_clopper_pearson_is_the_exact_interval() -> None:
    low, high = clopper_pearson(0, 20_000, 0.95)
    assert low == 0 and high == pytest.approx(1 - 0.025 ** (1 / 20_000), rel=1e-9)
    low, high = clopper_pearson(50, 100, 0.95)
    assert stats.binom.sf(49, 100, low) == pytest.approx(0.025)
    assert stats.binom.cdf(50, 100, high) == pytest.approx(0.025)


def test_every_cell_of_the_readme_drift_table(table: Table) -> None:
    """False alarms and detection by window size, as written in the README."""
    written = readme_table()
    assert sorted(written) == list(SIZES)
    for n, (false_alarms, detected) in written.items():
        assert_consistent(f"{n} rows, false alarms", false_alarms, table.false_alarms[n])
        assert_consistent(f"{n} rows, +5 % detected", detected, table.detected[n])


def test_the_readme_fixed_threshold_figures(table: Table) -> None:
    sentence = re.search(
        r"a fixed `PSI > 0\.1` raises ([\d.]+) % false alarms at 100 rows and detects ([\d.]+) %"
        r" of the \+5 % drift at 2,000 rows",
        " ".join(README.read_text().split()),
    )
    assert sentence is not None
    assert_consistent(
        "fixed PSI > 0.1, false alarms at 100", sentence[1], table.fixed_false_alarms_100
    )
    assert_consistent("fixed PSI > 0.1, detected at 2,000", sentence[2], table.fixed_detected_2000)


def test_the_bounds_would_catch_a_tenfold_change(table: Table) -> None:
    """Not vacuous: for every rate of the table up to 10 %, ten times it (0.1 % for a rate
    of 0) and a tenth of it are outside the interval."""
    for k in [*table.false_alarms.values(), *table.detected.values()]:
        rate = k / WINDOWS
        if rate > 0.1:
            continue
        low, high = clopper_pearson(k, WINDOWS)
        assert high < max(10 * rate, 0.001), (k, high)
        assert rate == 0 or low > rate / 10, (k, low)


# -- the PromQL alert, window by window ----------------------------------------------------

PROMQL_SETTINGS = RuleSettings(window="4m", alert_for="1m")
#: Every bin counter is 0 until minute 4, then its count: at minute 7 the 4m window holds the
#: zero and the step (increase() is exact) and the condition has held for over a minute.
STEP, EVALUATED = "0x3 {}x4", "7m"
#: promtool lets a query load 10,000 samples: 100 windows x 10 bins x 5 samples a test.
PER_TEST = 100


def promql_windows(population: Population) -> tuple[np.ndarray, np.ndarray]:
    """About 400 windows: the 150 closest to the critical value (either side), 100 undrifted
    and 100 drifted ones of every size, and 50 strongly drifted ones below ``min_rows``;
    their counts, and whether Python's condition holds."""
    rng = np.random.default_rng(7)
    f = population.feature
    pools = [
        rng.multinomial(n, population.probabilities(scale), size=2000)
        for n in SIZES
        for scale in (1.0, 1.05)
    ]
    pool = np.concatenate(pools)
    n = pool.sum(axis=1)
    bins = effective_bins(f.shares)
    limit = critical_value(n, f.count, bins, quantile=PROMQL_SETTINGS.quantile)
    closeness = np.abs(np.log(psi(pool, f.shares) / limit))
    near = np.argsort(closeness)[:150]
    assert closeness[near].min() > 1e-9  # none so close that rounding could decide
    others = rng.choice(np.setdiff1d(np.arange(len(pool)), near), size=200, replace=False)
    few = np.stack(
        [rng.multinomial(int(k), population.probabilities(1.3)) for k in rng.integers(40, 100, 50)]
    )
    counts = np.concatenate([pool[near], pool[others], few])
    return counts, population.alarms(counts, PROMQL_SETTINGS)


def promql_test(
    rules: dict[str, Any],
    features: tuple[NumericProfile, ...],
    counts: np.ndarray,
    fires: np.ndarray,
) -> dict[str, Any]:
    """A promtool test: one feature per window, its bins stepping from 0 to its counts."""
    alert = next(
        r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "ModelFeatureDrift"
    )
    model = {"model": "sim", "version": "1"}
    series: list[dict[str, str]] = []
    expected = []
    for feature, window, firing in zip(features, counts, fires, strict=True):
        labels = {**model, "feature": feature.name}
        for label, count, share in zip(feature.bins, window, feature.shares, strict=True):
            selector = ",".join(f'{k}="{v}"' for k, v in {**labels, "bin": label}.items())
            series.append(
                {"series": f"model_feature_bin_total{{{selector}}}", "values": STEP.format(count)}
            )
            series.append(
                {
                    "series": f"model_feature_reference_share{{{selector}}}",
                    "values": f"{share!r}x8",
                }
            )
        if firing:
            value = float(psi(window, feature.shares))
            expected.append(
                {
                    "exp_labels": {**labels, **alert["labels"]},
                    "exp_annotations": {
                        key: render_annotation(text, labels, value)
                        for key, text in alert["annotations"].items()
                    },
                }
            )
    return {
        "interval": "1m",
        "input_series": series,
        "alert_rule_test": [
            {
                "eval_time": EVALUATED,
                "alertname": "ModelFeatureDrift",
                "exp_alerts": expected,
            }
        ],
    }


@pytest.mark.requires_tool(PROMTOOL)
def test_the_promql_alert_agrees_with_python_window_by_window(
    service_population: Population, tmp_path: Path
) -> None:
    """``ModelFeatureDrift`` fires, in one ``promtool test rules`` run, for exactly the windows
    where :func:`drift_condition` holds, on 400 windows chosen around the critical value (in
    tests of :data:`PER_TEST` windows)."""
    counts, fires = promql_windows(service_population)
    assert len(counts) == 400 and 50 < fires.sum() < 350
    reference = service_population.feature
    profile = ReferenceProfile(
        model="sim",
        version="1",
        rows=reference.count,
        features=tuple(
            dataclasses.replace(reference, name=f"w{i:03d}") for i in range(len(counts))
        ),
    )
    rules, _ = generate_rules([profile], PROMQL_SETTINGS)
    (tmp_path / "rules.yml").write_text(render_yaml(rules))
    parts = [slice(i, i + PER_TEST) for i in range(0, len(counts), PER_TEST)]
    spec: dict[str, Any] = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": "1m",
        "tests": [promql_test(rules, profile.features[p], counts[p], fires[p]) for p in parts],
    }
    (tmp_path / "test.yml").write_text(render_yaml(spec))
    done = subprocess.run(
        [PROMTOOL, "test", "rules", "test.yml"], capture_output=True, text=True, cwd=tmp_path
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-5000:]
