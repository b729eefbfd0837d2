"""Merged values as exposition text: each sample's line prefix formatted once, values per scrape.

The prefixes come from prometheus_client's own encoder: the layout's families are encoded once
with placeholder values (sample ``i`` has the value ``i``), and each line is split at its value.
Escaping, label order, the ``_total`` suffix and OpenMetrics' header fields are therefore exactly
the encoder's. A scrape formats only the values that changed since the previous one (with
prometheus_client's ``floatToGoString``) and joins the pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.samples import Sample

from ._merge_layout import FamilyLayout, Layout, go_float

if TYPE_CHECKING:
    import numpy.typing as npt

    from ._slot_index import BoolArray, FloatArray, IntArray

__all__ = ["Encoder", "Rendering", "metric_families"]

Encoder = Callable[[Any], bytes]  # prometheus_client's generate_latest (either format)

_EOF = "# EOF\n"


class _Collector:
    def __init__(self, families: list[Metric]) -> None:
        self._families = families

    def collect(self) -> list[Metric]:
        return self._families


def metric_families(
    layout: Layout, values: Sequence[float], orders: Mapping[int, Sequence[int]]
) -> list[Metric]:
    """The merged families as prometheus_client builds them (``orders``: the samples of the
    families whose order varies, by family index)."""
    families = []
    for number, family in enumerate(layout.families):
        metric = Metric(family.name, family.documentation, family.typ)
        if family.typ == "gauge":
            metric._multiprocess_mode = family.mode  # type: ignore[attr-defined]
        order = orders.get(number, range(family.start, family.stop))
        names, labels = layout.names, layout.labels
        metric.samples = [Sample(names[o], dict(labels[o]), values[o]) for o in order]
        families.append(metric)
    return families


def _line_of(value: float) -> str:
    return go_float(value) + "\n"


def _format_into(pieces: list[str], positions: IntArray, values: FloatArray) -> None:
    """``pieces[position] = value's text``; whole numbers below 1e6 (most counts) the quick way,
    to the same text as ``floatToGoString`` (``12.0``)."""
    whole = (values >= 0) & (values < 1e6) & (values == np.floor(values)) & ~np.signbit(values)
    texts = map("{}.0\n".format, values[whole].astype(np.int64).tolist())
    for position, text in zip(positions[whole].tolist(), texts, strict=True):
        pieces[position] = text
    rest = ~whole
    for position, value in zip(positions[rest].tolist(), values[rest].tolist(), strict=True):
        pieces[position] = _line_of(value)


class Rendering:
    """One format's text of one layout: pieces (headers, then per sample its prefix and its
    value) kept between scrapes. Not thread-safe: the merger renders under its lock."""

    def __init__(self, layout: Layout, encoder: Encoder) -> None:
        self.layout = layout
        count = len(layout)
        placeholders = list(map(float, range(count)))
        text = encoder(_Collector(metric_families(layout, placeholders, {}))).decode("utf-8")
        if text.endswith(_EOF):  # OpenMetrics: the exposition ends it after other collectors'
            text = text[: -len(_EOF)]
        self.pieces: list[str] = []
        self.prefixes: list[str] = [""] * count
        positions = [0] * count
        token_of = {go_float(value): number for number, value in enumerate(placeholders)}
        for line in text.splitlines(keepends=True):
            if line.startswith("#"):
                self.pieces.append(line)
                continue
            prefix, _, token = line[:-1].rpartition(" ")
            number = token_of[token]
            self.prefixes[number] = prefix + " "
            self.pieces.append(self.prefixes[number])
            positions[number] = len(self.pieces)
            self.pieces.append("")
        self.positions: IntArray = np.asarray(positions, dtype=np.int64)
        self.shown: npt.NDArray[np.uint64] | None = None  # the values the pieces show
        self.hidden = np.zeros(count, dtype=bool)  # retired versions' samples
        self.dynamic = self.hidden.copy()  # in a family rendered whole at every scrape
        for family in layout.families:
            self.dynamic[family.start : family.stop] = family.dynamic
        self.skipped = self.dynamic.copy()

    def hide(self, hidden: BoolArray) -> None:
        """Leave out the samples ``hidden`` selects (retired versions'), show the others."""
        if np.array_equal(hidden, self.hidden):
            return
        for number in np.flatnonzero(hidden != self.hidden).tolist():
            position = int(self.positions[number])
            self.pieces[position - 1] = "" if hidden[number] else self.prefixes[number]
            self.pieces[position] = ""
        self.hidden = hidden.copy()
        self.skipped = hidden | self.dynamic
        self.shown = None

    def render(self, values: FloatArray, orders: Mapping[int, Sequence[int]]) -> str:
        """The text of ``values`` (``orders``: the samples of families whose order varies)."""
        bits = values.view(np.uint64)
        if self.shown is None:
            changed = np.flatnonzero(~self.skipped)
        else:
            changed = np.flatnonzero((bits != self.shown) & ~self.skipped)
        _format_into(self.pieces, self.positions[changed], values[changed])
        self.shown = bits.copy()
        for number, order in orders.items():
            self._render_whole(self.layout.families[number], values, order)
        return "".join(self.pieces)

    def _render_whole(self, family: FamilyLayout, values: FloatArray, order: Sequence[int]) -> None:
        """A family whose samples vary: all its lines in the first sample's place."""
        if family.start == family.stop:
            return
        span = self.positions[family.start : family.stop]
        for position in span.tolist():
            self.pieces[position - 1] = self.pieces[position] = ""
        lines = [self.prefixes[o] + _line_of(float(values[o])) for o in order if not self.hidden[o]]
        self.pieces[int(span.min()) - 1] = "".join(lines)
