"""The model signals' C kernel (``_speedups.NumericKernel``, ``add_amounts``): the same numbers
as the numpy and pure-Python paths, to the last bit, and slots that follow the storage."""

from __future__ import annotations

import ast
import json
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.mmap_dict import MmapedDict
from signals_support import CLASSES, merged, value
from signals_support import churn_profile as churn_profile  # fixture "profile"
from support import require_speedups

from ml_wsgi_metrics import _errors, _recorders, _series, _slots, multiprocess, signals
from ml_wsgi_metrics._recorders import NumericBlock, NumericSeries, NumericSlots
from ml_wsgi_metrics._series import SlotCells, value_adder, value_cell
from ml_wsgi_metrics.profile import ReferenceProfile, build_profile
from ml_wsgi_metrics.testing import isolated_signals

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["c", "python"])
def implementation(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Recording in C (the extension's kernel and bulk adds), then in numpy and Python."""
    if request.param == "c":
        require_speedups()
    else:
        monkeypatch.setattr(_recorders, "speedups", None)
        monkeypatch.setattr(_series, "add_amounts", _series._add_amounts)
    return str(request.param)


def block_of(edges: list[tuple[float, ...]], low: list[float], high: list[float]) -> NumericBlock:
    """A block of columns with no series behind them (``None``: slots not recorded)."""
    series = [
        NumericSeries(f"c{j}", e, lo, hi, NumericSlots([None] * (len(e) + 1), *[None] * 5))
        for j, (e, lo, hi) in enumerate(zip(edges, low, high, strict=True))
    ]
    return NumericBlock(series)


def awkward_matrix(rng: np.random.Generator, rows: int, edges: list[tuple[float, ...]]) -> Any:
    """Signs mixed, magnitudes apart, NaN, infinities, zeros and values equal to edges."""
    matrix = rng.normal(0, 50, (rows, len(edges))) * rng.choice([1e-6, 1.0, 1e6], (rows, 1))
    for j, column_edges in enumerate(edges):
        for i in range(min(rows, 12)):
            matrix[i, j] = [math.nan, math.inf, -math.inf, 0.0, -0.0, *column_edges][
                i % (5 + len(column_edges))
            ]
    return matrix


LAYOUTS: dict[str, Callable[[Any], Any]] = {
    "columns contiguous (a DataFrame's)": np.asfortranarray,
    "rows contiguous": np.ascontiguousarray,
    "every other row": lambda m: np.repeat(m, 2, axis=0)[::2],
}


@pytest.fixture(params=["avx2", "sse2"])
def simd(request: pytest.FixtureRequest) -> Iterator[str]:
    """The kernel with its AVX2 code (where the CPU has it), then with the code every CPU runs."""
    speedups = require_speedups()
    was = speedups.use_avx2(request.param == "avx2")
    yield str(request.param)
    speedups.use_avx2(was)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize(
    ("rows", "edge_counts"),
    [
        (1000, [9] * 20),  # the benchmark's shape: five groups of four columns
        (257, [0, 1, 9, 16, 17, 40, 3]),  # no edge, compared edges, searched edges
        (3, [2, 5, 9, 9, 1]),
        (1, [9]),
        (0, [4, 4, 4, 4, 4]),
    ],
)
def test_the_kernel_writes_numpys_numbers_to_the_bit(
    simd: str, layout: str, rows: int, edge_counts: list[int]
) -> None:
    speedups = require_speedups()
    rng = np.random.default_rng(rows + len(edge_counts))
    edges = [tuple(np.unique(rng.normal(0, 60, n).round(1)).tolist()) for n in edge_counts]
    low = [e[0] if e else -math.inf for e in edges]
    high = [e[-1] if e else math.inf for e in edges]
    block = block_of(edges, low, high)
    assert block.kernel is not None
    assert isinstance(block.kernel, speedups.NumericKernel)
    matrix = LAYOUTS[layout](awkward_matrix(rng, rows, edges))

    amounts = block.amounts(matrix)
    reference = block.numpy_amounts(matrix)
    assert amounts.shape == reference.shape == (block.kernel.slots,)
    assert amounts.tobytes() == (reference + 0.0).tobytes()  # -0.0 sums read as 0.0
    assert amounts.sum() == amounts.sum()  # nothing NaN


def test_the_kernel_refuses_what_does_not_fit() -> None:
    require_speedups()
    block = block_of([(1.0, 2.0)], [0.0], [3.0])
    assert block.kernel is not None
    with pytest.raises(ValueError, match="1 columns and 8 slots"):
        block.kernel.amounts(np.zeros((4, 2)), np.zeros(8))
    with pytest.raises(ValueError, match="1 columns and 8 slots"):
        block.kernel.amounts(np.zeros((4, 1)), np.zeros(9))
    with pytest.raises(TypeError, match="float64"):
        block.kernel.amounts(np.zeros((4, 1), dtype=np.float32), np.zeros(8))
    with pytest.raises(TypeError, match="float64"):
        block.kernel.amounts(np.zeros(4), np.zeros(8))
    kernel = type(block.kernel)
    for edges in ([(2.0, 1.0)], [(math.nan,)]):
        with pytest.raises(ValueError, match="sorted, without NaN"):
            kernel(edges, [0.0], [1.0])
    with pytest.raises(ValueError, match="one item per column"):
        kernel([(1.0,)], [0.0, 1.0], [1.0])


def recorded_samples(registry: CollectorRegistry) -> dict[tuple[Any, ...], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


def record_everything(profile: ReferenceProfile, directory: Path | None) -> dict[Any, float]:
    """A batch of every awkward value, then one call per row of them (rows as dicts of
    floats, ints, text, ``None``, absent keys, values float() refuses)."""
    rng = np.random.default_rng(3)
    charges: list[Any] = [*rng.uniform(0, 150, 200), math.nan, math.inf, -math.inf, None]
    delta: list[Any] = [*rng.normal(0, 9, 200), 0.0, -0.0, *profile.feature("delta").edges[:2]]
    contract = rng.choice(["Month-to-month", "One year", "Three year"], len(charges)).tolist()
    scores = [*rng.random(len(charges) - 2), math.nan, 1.5]
    classes = rng.choice(["Yes", "No", "Maybe"], len(charges)).tolist()
    columns = {"MonthlyCharges": charges, "delta": delta, "Contract": contract}
    with isolated_signals() as registry:
        signals.register_model(profile)
        signals.record_prediction(pd.DataFrame(columns), scores=scores, classes=classes)
        rows: list[dict[str, Any]] = [
            {"MonthlyCharges": "12.5", "delta": 3, "Contract": "One year"},
            {"MonthlyCharges": "n/a", "delta": True, "Contract": None},
            {"MonthlyCharges": object(), "Contract": "Two year"},  # delta absent
            {"MonthlyCharges": np.float64(7.25), "delta": np.int64(-4)},
            {"Contract": np.str_("One year")},  # a str subclass: found by its text
            {"Contract": math.nan},
            {"Contract": 7},
            {"Contract": ["a list"]},
        ]
        rows += [dict(zip(columns, r, strict=True)) for r in zip(*columns.values(), strict=True)]
        for i, row in enumerate(rows):
            signals.record_prediction(row, scores=scores[i % len(scores)], classes=classes[i % 3])
        return recorded_samples(registry if directory is None else merged(directory))


def test_c_and_python_record_the_same_numbers(
    profile: ReferenceProfile, mode: Path | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batches (the kernel) and single rows (``add_row``) alike, in both storage modes."""
    require_speedups()
    in_c = record_everything(profile, mode)
    if mode is not None:  # the second run must not see the first one's files
        multiprocess.activate(mode.parent / "second-run")
        mode = mode.parent / "second-run"
    monkeypatch.setattr(_recorders, "speedups", None)
    monkeypatch.setattr(_series, "add_amounts", _series._add_amounts)
    in_python = record_everything(profile, mode)
    assert in_c == in_python
    counted = in_c[("model_predictions_total", (("class", "__unseen__"), *MODEL_LABELS))]
    assert counted > 0


MODEL_LABELS = (("model", "churn"), ("version", "3"))


def test_a_row_value_that_breaks_float_raises_before_anything_counts(
    profile: ReferenceProfile,
) -> None:
    require_speedups()
    with isolated_signals() as registry:
        signals.register_model(profile)
        with pytest.raises(OverflowError):
            signals.record_prediction({"MonthlyCharges": 20.0, "delta": 10**400}, scores=0.5)
        bins = [
            value(registry, "model_feature_bin_total", feature="MonthlyCharges", bin=b)
            for b in profile.feature("MonthlyCharges").bins
        ]
        assert sum(bins) == 0


# -- slots added in bulk ---------------------------------------------------------------------


def counter_values(registry: CollectorRegistry, slots: int) -> tuple[Counter, list[Any]]:
    counter = Counter("kernel_slots", "Slots.", ["slot"], registry=registry)
    return counter, [_series.stored_value(counter.labels(str(i))) for i in range(slots)]


def test_bulk_adds_are_what_prometheus_client_adds(
    implementation: str, mode: Path | None, registry: CollectorRegistry
) -> None:
    """Each slot gets exactly the doubles ``inc`` would have given it, zeros skipped, and a
    slot without a value (``None``) is not recorded."""
    rng = np.random.default_rng(8)
    _, values = counter_values(registry, 6)
    twin = Counter("kernel_twin", "Twin.", ["slot"], registry=registry)
    slots = SlotCells([*values[:5], None])
    for _ in range(50):
        amounts = rng.choice([0.0, 1.0, 0.1, 1e-9, 123456.789], 6)
        with _slots.storage_lock():
            slots.add(amounts)
        for i, amount in enumerate(amounts[:5].tolist()):
            twin.labels(str(i)).inc(amount)
    scraped = merged(mode) if mode is not None else registry
    for i in range(5):
        expected = scraped.get_sample_value("kernel_twin_total", {"slot": str(i)})
        assert scraped.get_sample_value("kernel_slots_total", {"slot": str(i)}) == expected
    assert scraped.get_sample_value("kernel_slots_total", {"slot": "5"}) == 0


def test_cells_are_taken_at_a_slots_first_add_only(
    implementation: str, multiprocess_dir: Path, registry: CollectorRegistry
) -> None:
    """A worker opens no file entry for a slot it never adds to, as with adders."""
    _, values = counter_values(registry, 4)
    taken: list[int] = []
    slots = SlotCells(values)
    multiprocess.use_identifier("w1")  # values reopen lazily, as in a worker given its slot

    def take(stored: Any) -> Any:
        taken.append(values.index(stored))
        return value_cell(stored)

    with _slots.storage_lock():
        _series.add_amounts(slots.cells(), slots.values, take, np.array([0.0, 2.0, 0.0, 1.0]))
        _series.add_amounts(slots.cells(), slots.values, take, np.array([1.0, 2.0, 0.0, 0.0]))
    assert taken == [1, 3, 0]
    assert slots.cells()[2] is None
    keys = {k for path in multiprocess_dir.glob("counter_w1*.db") for k in _keys(path)}
    assert {("kernel_slots_total", "slot", s) for s in "013"} <= keys
    assert ("kernel_slots_total", "slot", "2") not in keys


def _keys(path: Path) -> set[tuple[str, str, str]]:
    """(sample name, label, label value) of every key in a file."""
    found = set()
    for key, _, _, _ in MmapedDict.read_all_values_from_file(str(path)):
        _, name, labels, _ = json.loads(key)
        found |= {(name, k, v) for k, v in labels.items()}
    return found


def test_slots_follow_the_storage_when_it_moves(
    implementation: str, multiprocess_dir: Path, registry: CollectorRegistry
) -> None:
    """Cells taken before a worker is given its slot are taken again (the generation moved)."""
    _, values = counter_values(registry, 3)
    slots = SlotCells(values)
    with _slots.storage_lock():
        slots.add(np.array([1.0, 0.0, 5.0]))
    multiprocess.use_identifier("w7")
    with _slots.storage_lock():
        slots.add(np.array([1.0, 1.0, 0.0]))
    scraped = merged(multiprocess_dir)
    totals = [scraped.get_sample_value("kernel_slots_total", {"slot": s}) for s in "012"]
    assert totals == [2.0, 1.0, 5.0]
    assert sorted(p.name for p in multiprocess_dir.glob("counter_w7*.db"))


def test_a_model_records_on_after_another_version_is_retired(
    implementation: str, multiprocess_dir: Path, profile: ReferenceProfile
) -> None:
    """Retiring a version rewrites the model files (their views released): the other
    version's cells are taken again, never written through a released view."""
    frame = pd.DataFrame({"MonthlyCharges": [20.0, 30.0], "delta": [1.0, -1.0]})
    with isolated_signals():
        signals.register_model(profile)
        other = build_profile(
            frame, model="churn", version="4", scores=np.array([0.2, 0.8]), classes=CLASSES
        )
        signals.register_model(other)
        for version in ("3", "4"):
            signals.record_prediction(frame, scores=[0.1, 0.9], model="churn", version=version)
        signals.retire_model("churn", "4")
        signals.record_prediction(frame, scores=[0.1, 0.9], model="churn", version="3")
        signals.record_prediction({"MonthlyCharges": 25.0, "delta": 2.0}, model="churn")
        scraped = merged(multiprocess_dir)
        positive = value(scraped, "model_feature_sum_total", feature="delta", sign="positive")
        assert positive == 1.0 + 1.0 + 2.0
        bins = [
            value(scraped, "model_feature_bin_total", feature="MonthlyCharges", bin=b)
            for b in profile.feature("MonthlyCharges").bins
        ]
        assert sum(bins) == 5


class CountingLock:
    """A lock that counts how often it is taken."""

    def __init__(self) -> None:
        self.taken = 0
        self._lock = threading.Lock()

    def __enter__(self) -> None:
        self.taken += 1
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_in_memory_values_are_added_to_without_their_lock(registry: CollectorRegistry) -> None:
    """Single-process mode: prometheus_client's value takes its own lock on ``inc``; under the
    storage lock the signals add to it directly (the same double)."""
    counter = Counter("kernel_unlocked", "Unlocked.", registry=registry)
    stored = _series.stored_value(counter)
    lock = stored._lock = CountingLock()
    add = value_adder(stored)
    with _slots.storage_lock():
        add(0.1)
        add(0.2)
    assert lock.taken == 0
    assert counter._value.get() == 0.1 + 0.2
    assert lock.taken == 1


def test_bulk_adds_refuse_what_does_not_fit(implementation: str) -> None:
    slots = SlotCells([None, None])
    with pytest.raises((TypeError, ValueError, IndexError)):
        _series.add_amounts(slots.cells(), slots.values, value_cell, np.ones(3))


def test_the_stub_types_the_kernel_the_extension_exports() -> None:
    kernel = require_speedups().NumericKernel
    stub = ast.parse((REPO / "ml_wsgi_metrics" / "_speedups.pyi").read_text())
    (typed,) = (n for n in stub.body if isinstance(n, ast.ClassDef) and n.name == "NumericKernel")
    names = {n.name for n in typed.body if isinstance(n, ast.FunctionDef)}
    assert names == {"__init__", "slots", "amounts", "add_row"}
    assert [name for name in names if not hasattr(kernel, name)] == []


def test_a_model_file_closed_under_its_cells_fails_open(
    implementation: str,
    multiprocess_dir: Path,
    profile: ReferenceProfile,
    storage_clock: Any,
) -> None:
    """A released view is never written through: the value reopens (the error reported), what
    is counted meanwhile is kept in memory and reaches the file when it opens again."""
    frame = pd.DataFrame({"MonthlyCharges": [20.0, 30.0], "delta": [1.0, -1.5]})
    with isolated_signals():
        signals.register_model(profile)
        signals.record_prediction(frame, scores=[0.1, 0.9])
        errors_before = _errors.count(("storage_write",))
        for handle in _slots.State.files.values():  # closed without telling anyone
            handle.close()
        signals.record_prediction(frame, scores=[0.1, 0.9])
        signals.record_prediction({"MonthlyCharges": 25.0, "delta": 2.0}, scores=0.5)
        storage_clock.advance(multiprocess.RETRY_SECONDS)
        multiprocess.retry_unavailable()
        scraped = merged(multiprocess_dir)
        assert _errors.count(("storage_write",)) > errors_before
        sums = [
            value(scraped, "model_feature_sum_total", feature="delta", sign=sign)
            for sign in ("positive", "negative")
        ]
        assert sums == [1.0 + 1.0 + 2.0, 1.5 + 1.5]
        assert value(scraped, "model_score_sum_total", sign="positive") == 1.0 + 1.0 + 0.5
