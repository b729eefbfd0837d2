"""What a merge of given files produces, before any value is read: the layout.

prometheus_client's ``MultiProcessCollector`` decides, sample by sample, which merged series a
file's value adds to and in which order families and samples come out; none of it depends on
the values (except for ``mostrecent`` gauges, whose order is settled per scrape). The layout
makes those decisions once for a set of files, following that code step by step, and records
them as arrays: per file, which entries combine into which accumulator and how (sum, min, max,
last, most recent); per merged sample, where its value comes from (an accumulator, or a
cumulative bucket of a histogram). A scrape then only reads values and runs the arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.utils import floatToGoString

from ._slot_index import Key, SlotIndex

if TYPE_CHECKING:
    from ._slot_index import BoolArray, IntArray

__all__ = [
    "MAX",
    "MIN",
    "RECENT",
    "SET",
    "SUM",
    "FamilyLayout",
    "Layout",
    "build",
    "go_float",
    "signature",
]

#: How a series' values combine across files (``SET``: the last file's value, for ``all`` gauges
#: whose series differ by ``pid``).
SUM, MIN, MAX, SET, RECENT = range(5)

_GAUGE_KINDS = {
    "min": MIN,
    "livemin": MIN,
    "max": MAX,
    "livemax": MAX,
    "sum": SUM,
    "livesum": SUM,
    "mostrecent": RECENT,
    "livemostrecent": RECENT,
}

Labels = tuple[tuple[str, str], ...]

#: prometheus_client's formatting of a float (``+Inf``, ``1e+06``...), typed.
go_float: Callable[[float], str] = floatToGoString


class FamilyLayout:
    """One merged family: its header fields and the range of its samples in the layout."""

    __slots__ = ("buckets", "documentation", "dynamic", "groups", "mode", "name", "start",
                 "stop", "typ")  # fmt: skip

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name, self.documentation, self.typ = name, documentation, typ
        self.mode = ""
        self.start = self.stop = 0
        self.dynamic = False  # mostrecent: which samples appear, and in which order, vary
        #: While building: label set -> {(sample name, labels): source}; histograms' buckets.
        self.groups: dict[Labels, dict[tuple[str, Labels], Any]] = {}
        self.buckets: dict[Labels, dict[float, int]] = {}

    @property
    def kind(self) -> int:
        """How its series combine across files."""
        return _GAUGE_KINDS.get(self.mode, SET) if self.typ == "gauge" else SUM

    @property
    def drops_pid(self) -> bool:
        """Whether a gauge file's ``pid`` label is dropped (every mode but ``all``, ``liveall``)."""
        return self.typ == "gauge" and self.mode in _GAUGE_KINDS


class _Block:
    """Histograms' bucket rows with the same number of buckets: cumulated row by row."""

    def __init__(self) -> None:
        self.accumulators: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.counts: list[int] = []


class Layout:
    """A merge of given files, as arrays (see the module's docstring)."""

    def __init__(self, files: Sequence[SlotIndex]) -> None:
        self.signature = signature(files)
        self.files = list(files)
        self.families: list[FamilyLayout] = []
        self.names: list[str] = []  # per merged sample
        self.labels: list[Labels] = []
        self.accumulator_kinds: list[int] = []
        #: Per file: (kind, entries, accumulators) steps; accumulators are unique in a step.
        self.steps: list[list[tuple[int, IntArray, IntArray]]] = []
        self.direct: tuple[IntArray, IntArray] = (_ints([]), _ints([]))  # outputs, accumulators
        self.blocks: list[tuple[IntArray, IntArray, IntArray]] = []  # accs, outputs, counts
        self.needs_timestamps = False

    def __len__(self) -> int:
        return len(self.names)


def _ints(values: Any) -> IntArray:
    return np.asarray(values, dtype=np.int64)


def signature(files: Sequence[SlotIndex]) -> tuple[tuple[str, tuple[int, int], int], ...]:
    """What a layout depends on: the files, in order, and how many entries each has."""
    return tuple((f.name, f.inode, len(f.ids)) for f in files)


class _Builder:
    """Builds a :class:`Layout`, mirroring ``MultiProcessCollector._accumulate_metrics``.

    Each file's entries find their accumulator through a table by key id (by key id and pid
    for gauges that keep the ``pid`` label); only a key not seen before runs Python code.
    """

    def __init__(
        self, layout: Layout, families: dict[str, FamilyLayout], keys: Sequence[Key]
    ) -> None:
        self.layout, self.families, self.keys = layout, families, keys
        self.entries: list[IntArray] = []  # per file, its entries
        self.accumulators: list[IntArray] = []  # and where each goes
        self.shared = np.full(len(keys), -1, dtype=np.int64)  # key id -> accumulator
        self.by_pid: dict[str, IntArray] = {}  # the same, for gauges that keep the pid
        self.direct: list[tuple[int, int]] = []  # (output, accumulator)
        self.blocks: dict[int, _Block] = {}

    def accumulator(self, kind: int) -> int:
        self.layout.accumulator_kinds.append(kind)
        return len(self.layout.accumulator_kinds) - 1

    def file(self, index: SlotIndex) -> None:
        """Where each entry of ``index`` goes; new samples placed in first-appearance order."""
        ids = index.ids
        keeps_pid, by_pid = None, self.shared
        accumulators = self.shared[ids]
        if index.typ == "gauge":
            by_pid = self.by_pid.setdefault(index.pid, np.full(len(self.keys), -1, np.int64))
            keeps_pid = self._keeps_pid(ids)
            accumulators = np.where(keeps_pid, by_pid[ids], accumulators)
        for entry in np.flatnonzero(accumulators < 0).tolist():
            key_id = int(ids[entry])
            table = by_pid if keeps_pid is not None and keeps_pid[entry] else self.shared
            if table[key_id] < 0:  # else: the same key earlier in this file
                metric_name, name, labels, _ = self.keys[key_id]
                if keeps_pid is not None:
                    labels = (*labels, ("pid", index.pid))
                table[key_id] = self.place(self.families[metric_name], name, labels)
            accumulators[entry] = table[key_id]
        self.entries.append(np.arange(len(ids), dtype=np.int64))
        self.accumulators.append(accumulators)

    def _keeps_pid(self, ids: IntArray) -> BoolArray:
        """Per entry of a gauge file: whether its family keeps the ``pid`` label."""
        unique, where = np.unique(ids, return_inverse=True)
        families, keys = self.families, self.keys
        keeps = [not families[keys[key_id][0]].drops_pid for key_id in unique.tolist()]
        return np.asarray(keeps, dtype=bool)[where]

    def place(self, family: FamilyLayout, name: str, labels: Labels) -> int:
        """The accumulator of a sample first seen, as ``_accumulate_metrics`` files it."""
        if family.drops_pid:
            labels = tuple(label for label in labels if label[0] != "pid")
        if family.typ == "histogram":
            le = next((value for label, value in labels if label == "le"), None)
            if le is not None:
                without_le = tuple(label for label in labels if label[0] != "le")
                row = family.buckets.setdefault(without_le, {})
                edge = float(le)
                if edge not in row:
                    row[edge] = self.accumulator(SUM)
                return row[edge]
        group = family.groups.setdefault(labels, {})
        source = group.get((name, labels))
        if source is None:
            source = group[(name, labels)] = self.accumulator(family.kind)
        return int(source)

    def emit(self, family: FamilyLayout) -> None:
        """The family's samples, in prometheus_client's order."""
        family.dynamic = family.kind == RECENT
        self.layout.needs_timestamps |= family.dynamic
        for without_le, row in family.buckets.items():
            self.cumulate(family.name, family.groups.setdefault(without_le, {}), without_le, row)
        family.start = len(self.layout.names)
        for group in family.groups.values():
            for (name, labels), source in group.items():
                self.output(name, labels, source)
        family.stop = len(self.layout.names)
        family.groups, family.buckets = {}, {}
        self.layout.families.append(family)

    def cumulate(
        self, name: str, group: dict[Any, Any], labels: Labels, row: dict[float, int]
    ) -> None:
        edges = sorted(row)
        block = self.blocks.setdefault(len(edges), _Block())
        index = len(block.accumulators)
        block.accumulators.append([row[edge] for edge in edges])
        block.outputs.append([-1] * len(edges))
        block.counts.append(-1)
        for column, edge in enumerate(edges):
            bucket_labels = (*labels, ("le", go_float(edge)))
            group[(f"{name}_bucket", bucket_labels)] = (block, index, column)
        group[(f"{name}_count", labels)] = (block, index, None)

    def output(self, name: str, labels: Labels, source: Any) -> None:
        position = len(self.layout.names)
        self.layout.names.append(name)
        self.layout.labels.append(labels)
        if isinstance(source, int):
            self.direct.append((position, source))
            return
        block, index, column = source
        if column is None:
            block.counts[index] = position
        else:
            block.outputs[index][column] = position

    def finish(self) -> Layout:
        layout = self.layout
        kinds = _ints(layout.accumulator_kinds)
        for entries, accumulators in zip(self.entries, self.accumulators, strict=True):
            rounds = _occurrence(accumulators)  # a key twice in a file: a later round
            steps = []
            for round_ in range(int(rounds.max(initial=-1)) + 1):
                for kind in (SUM, MIN, MAX, SET, RECENT):
                    chosen = (rounds == round_) & (kinds[accumulators] == kind)
                    if chosen.any():
                        steps.append((kind, entries[chosen], accumulators[chosen]))
            layout.steps.append(steps)
        pairs = self.direct
        layout.direct = (_ints([o for o, _ in pairs]), _ints([a for _, a in pairs]))
        layout.blocks = [
            (_ints(b.accumulators), _ints(b.outputs), _ints(b.counts)) for b in self.blocks.values()
        ]
        return layout


def _occurrence(values: IntArray) -> IntArray:
    """For each element, how many equal ones come before it."""
    if len(np.unique(values)) == len(values):
        return np.zeros(len(values), dtype=np.int64)
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    positions = np.arange(len(values))
    starts = np.concatenate(([True], ordered[1:] != ordered[:-1]))
    first = np.maximum.accumulate(np.where(starts, positions, 0))
    occurrence = np.empty(len(values), dtype=np.int64)
    occurrence[order] = positions - first
    return occurrence


def build(files: Sequence[SlotIndex], keys: Sequence[Key]) -> Layout:
    """The layout of a merge of ``files``, in this order (as prometheus_client would read them);
    ``keys``: the parsed keys, by the ids the files hold."""
    families: dict[str, FamilyLayout] = {}
    for index in files:  # a family's type is its first file's, a gauge's mode its last file's
        for metric_name, help_text in index.families.items():
            family = families.get(metric_name)
            if family is None:
                family = families[metric_name] = FamilyLayout(metric_name, help_text, index.typ)
            if index.typ == "gauge":
                family.mode = index.mode
    builder = _Builder(Layout(files), families, keys)
    for index in files:
        builder.file(index)
    for family in families.values():
        builder.emit(family)
    return builder.finish()
