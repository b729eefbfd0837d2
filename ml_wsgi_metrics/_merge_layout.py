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
    from ._slot_index import IntArray

__all__ = ["MAX", "MIN", "RECENT", "SET", "SUM", "FamilyLayout", "Layout", "build", "go_float"]

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

    __slots__ = ("documentation", "dynamic", "mode", "name", "start", "stop", "typ")

    def __init__(self, name: str, documentation: str, typ: str) -> None:
        self.name, self.documentation, self.typ = name, documentation, typ
        self.mode = ""
        self.start = self.stop = 0
        self.dynamic = False  # mostrecent: which samples appear, and in which order, vary


class _Block:
    """Histograms' bucket rows with the same number of buckets: cumulated row by row."""

    def __init__(self) -> None:
        self.accumulators: list[list[int]] = []
        self.outputs: list[list[int]] = []
        self.counts: list[int] = []


class Layout:
    """A merge of given files, as arrays (see the module's docstring)."""

    def __init__(self, files: Sequence[SlotIndex]) -> None:
        self.signature = tuple((f.name, f.inode, len(f.keys)) for f in files)
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


class _Builder:
    """Builds a :class:`Layout`, mirroring ``MultiProcessCollector._accumulate_metrics``."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.entries: list[list[int]] = [[] for _ in layout.files]  # per file, in file order
        self.accumulators: list[list[int]] = [[] for _ in layout.files]  # and where each goes
        self.direct: list[tuple[int, int]] = []  # (output, accumulator)
        self.blocks: dict[int, _Block] = {}

    def accumulator(self, kind: int) -> int:
        self.layout.accumulator_kinds.append(kind)
        return len(self.layout.accumulator_kinds) - 1

    def family(self, family: FamilyLayout, raw: list[tuple[str, Labels, int, int]]) -> None:
        kind = _GAUGE_KINDS.get(family.mode, SET) if family.typ == "gauge" else SUM
        family.dynamic = kind == RECENT
        self.layout.needs_timestamps |= family.dynamic
        groups: dict[Labels, dict[tuple[str, Labels], Any]] = {}
        buckets: dict[Labels, dict[float, int]] = {}
        placed: dict[tuple[str, Labels], int] = {}  # a sample as read -> its accumulator
        entries, accumulators = self.entries, self.accumulators
        for name, labels, file, entry in raw:
            accumulator = placed.get((name, labels))
            if accumulator is None:
                accumulator = self.place(family, kind, name, labels, groups, buckets)
                placed[(name, labels)] = accumulator
            entries[file].append(entry)
            accumulators[file].append(accumulator)
        for without_le, row in buckets.items():
            self.cumulate(family.name, groups.setdefault(without_le, {}), without_le, row)
        family.start = len(self.layout.names)
        for group in groups.values():
            for (name, labels), source in group.items():
                self.output(name, labels, source)
        family.stop = len(self.layout.names)
        self.layout.families.append(family)

    def place(
        self,
        family: FamilyLayout,
        kind: int,
        name: str,
        labels: Labels,
        groups: dict[Labels, dict[tuple[str, Labels], Any]],
        buckets: dict[Labels, dict[float, int]],
    ) -> int:
        """The accumulator of a sample first seen, as ``_accumulate_metrics`` files it."""
        if family.typ == "gauge" and family.mode in _GAUGE_KINDS:
            labels = tuple(label for label in labels if label[0] != "pid")
        if family.typ == "histogram":
            le = next((value for label, value in labels if label == "le"), None)
            if le is not None:
                without_le = tuple(label for label in labels if label[0] != "le")
                row = buckets.setdefault(without_le, {})
                edge = float(le)
                if edge not in row:
                    row[edge] = self.accumulator(SUM)
                return row[edge]
        group = groups.setdefault(labels, {})
        source = group.get((name, labels))
        if source is None:
            source = group[(name, labels)] = self.accumulator(kind)
        return int(source)

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
            file_entries, file_accumulators = _ints(entries), _ints(accumulators)
            rounds = _occurrence(file_accumulators)  # a key twice in a file: a later round
            steps = []
            for round_ in range(int(rounds.max(initial=-1)) + 1):
                for kind in (SUM, MIN, MAX, SET, RECENT):
                    chosen = (rounds == round_) & (kinds[file_accumulators] == kind)
                    if chosen.any():
                        steps.append((kind, file_entries[chosen], file_accumulators[chosen]))
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


def build(files: Sequence[SlotIndex]) -> Layout:
    """The layout of a merge of ``files``, in this order (as prometheus_client would read them)."""
    families: dict[str, tuple[FamilyLayout, list[tuple[str, Labels, int, int]]]] = {}
    for number, index in enumerate(files):
        gauge = index.typ == "gauge"
        pid = (("pid", index.pid),)
        key: Key
        for entry, key in enumerate(index.keys):
            metric_name, name, labels, help_text = key
            found = families.get(metric_name)
            if found is None:
                found = families[metric_name] = (
                    FamilyLayout(metric_name, help_text, index.typ),
                    [],
                )
            if gauge:
                found[0].mode = index.mode
                labels = labels + pid
            found[1].append((name, labels, number, entry))
    builder = _Builder(Layout(files))
    for family, raw in families.values():
        builder.family(family, raw)
    return builder.finish()
