"""The merge behind ``/metrics`` in multiprocess mode: exact, fast, shared by concurrent scrapes.

The result is what prometheus_client's ``MultiProcessCollector`` gives over the same files, in
the same order, sample for sample and bit for bit: files are read in the directory's order (that
of its ``glob``), values add up in that order from 0.0, histogram buckets cumulate left to
right, gauges combine by their mode. What makes it fast: each file's keys are parsed once
(:mod:`._slot_index`), the merge's structure is decided once per set of keys (:mod:`.
_merge_layout`), each sample's line prefix is formatted once (:mod:`._merge_render`); a scrape
reads the values, combines them with a few array operations and formats what changed.

Scrapes in flight at the same time share a merge, and each gets every count made before it
arrived: a scrape arriving while a merge runs waits for it and takes the next one, which all
the scrapes that waited share (threads of a process here; processes through
:mod:`._scrape_cache`). So N scrapes arriving together cost at most two merges.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

import numpy as np
from prometheus_client.metrics_core import Metric

from . import _errors, _retired
from ._merge_layout import MIN, RECENT, SET, SUM, Layout, build, signature
from ._merge_render import Encoder, Rendering, metric_families
from ._scrape_cache import ScrapeCache, arrival
from ._slot_index import IndexCache

if TYPE_CHECKING:
    from ._slot_index import BoolArray, FloatArray, IntArray

__all__ = ["MergeResult", "Merger", "forget", "merger_for"]


class MergeResult:
    """One merge: the layout, the merged values, the order of ``mostrecent`` families, and
    when the merge began (before it listed the files: :func:`._scrape_cache.arrival`)."""

    __slots__ = ("began", "layout", "orders", "values")

    def __init__(
        self, layout: Layout, values: FloatArray, orders: dict[int, list[int]], began: int
    ) -> None:
        self.layout, self.values, self.orders, self.began = layout, values, orders, began


class _Flight:
    """A merge in progress, which scrapes arriving meanwhile wait for."""

    def __init__(self) -> None:
        self.finished = threading.Event()
        self.result: MergeResult | None = None
        self.error: BaseException | None = None

    def wait(self) -> MergeResult:
        self.finished.wait()
        if self.result is None:
            raise RuntimeError("the shared merge failed") from self.error
        return self.result


def _combine(layout: Layout, began: int) -> MergeResult:
    """Read every file's values and combine them as the layout says."""
    with np.errstate(all="ignore"):  # inf - inf is NaN, as in Python, without a warning
        return _combine_values(layout, began)


def _combine_values(layout: Layout, began: int) -> MergeResult:
    count = len(layout.accumulator_kinds)
    totals = np.zeros(count)
    seen = np.zeros(count, dtype=bool)
    newest = np.zeros(count) if layout.needs_timestamps else totals
    first_set = np.full(count, np.iinfo(np.int64).max)
    for number, (index, steps) in enumerate(zip(layout.files, layout.steps, strict=True)):
        values, stamps = index.values(layout.signature[number][2], layout.needs_timestamps)
        for kind, entries, accumulators in steps:
            value = values[entries]
            if kind == SUM:
                totals[accumulators] += value
                continue
            if kind == SET:
                take = np.ones(len(entries), dtype=bool)
            elif kind == RECENT:
                stamp = stamps[entries]  # type: ignore[index]
                take = newest[accumulators] < stamp
                fresh = accumulators[take & ~seen[accumulators]]
                first_set[fresh] = (number << 32) | entries[take & ~seen[accumulators]]
                newest[accumulators[take]] = stamp[take]
            else:
                current = totals[accumulators]
                better = value < current if kind == MIN else value > current
                take = better | ~seen[accumulators]
            totals[accumulators[take]] = value[take]
            seen[accumulators[take]] = True
    merged = np.empty(len(layout))
    outputs, sources = layout.direct
    merged[outputs] = totals[sources]
    for accumulators, outputs, counts in layout.blocks:
        cumulated = np.cumsum(totals[accumulators], axis=1)  # left to right, as a loop adds
        merged[outputs] = cumulated
        merged[counts] = cumulated[:, -1]
    return MergeResult(layout, merged, _recent_orders(layout, seen, first_set), began)


def _recent_orders(layout: Layout, seen: BoolArray, first_set: IntArray) -> dict[int, list[int]]:
    """``mostrecent`` families' samples: those ever set, in the order they were first set."""
    orders = {}
    outputs, sources = layout.direct
    for number, family in enumerate(layout.families):
        if family.dynamic:
            samples = np.arange(family.start, family.stop)
            accumulators = sources[np.searchsorted(outputs, samples)]
            ever = seen[accumulators]
            order = np.argsort(first_set[accumulators][ever], kind="stable")
            orders[number] = samples[ever][order].tolist()
    return orders


#: Formats kept rendered at once (text, OpenMetrics, their escaping variants).
MAX_RENDERINGS = 8


def _encoder_key(encoder: Encoder) -> Hashable:
    """The same for equal encoders: ``choose_encoder`` makes a new ``partial`` at every call."""
    if isinstance(encoder, functools.partial):
        return (encoder.func, encoder.args, tuple(sorted(encoder.keywords.items())))
    return encoder


def _form(encoder: Encoder) -> str:
    """The encoder's format by name, the same in every process."""
    if isinstance(encoder, functools.partial):
        arguments = (encoder.args, sorted(encoder.keywords.items()))
        return f"{encoder.func.__module__}.{encoder.func.__qualname__}{arguments!r}"
    return f"{encoder.__module__}.{encoder.__qualname__}"


class Merger:
    """Merges one directory's slot files; one per directory and process (:func:`merger_for`)."""

    def __init__(self, directory: str, names: Any, *, share_files: bool = True) -> None:
        self.directory = directory
        self._files = IndexCache(directory, names)
        self._layout: Layout | None = None
        self._renderings: dict[Any, Rendering] = {}
        self._hidden: tuple[Any, Layout | None, BoolArray | None] = (None, None, None)
        self._lock = threading.Lock()  # files, layout, renderings
        self._flight_lock = threading.Lock()
        self._flight: _Flight | None = None
        self._shared = ScrapeCache(directory, files=share_files)
        self.merges = 0  # merges run so far
        self.waiting = 0  # scrapes waiting now for a merge in flight

    def merge(self, arrived: int | None = None) -> MergeResult:
        """The merged values of a merge begun since ``arrived`` (default: now): one in flight
        that began since, else a new merge, which scrapes arriving meanwhile share."""
        arrived = arrival() if arrived is None else arrived
        while True:
            with self._flight_lock:
                flight, leader = self._flight, self._flight is None
                if flight is None:
                    flight = self._flight = _Flight()
                else:
                    self.waiting += 1
            if leader:
                break
            try:
                result = flight.wait()
            finally:
                with self._flight_lock:
                    self.waiting -= 1
            if result.began >= arrived:
                return result
        try:
            flight.result = self._merge_now()
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._flight_lock:
                self._flight = None
            flight.finished.set()
        return flight.result

    def _merge_now(self) -> MergeResult:
        with self._lock:
            began = arrival()
            try:
                files = self._files.current()
                layout = self._layout
                if layout is None or layout.signature != signature(files):
                    if len(self._files.parse) > 2 * sum(len(f.ids) for f in files) + 1024:
                        self._files.reset()  # most keys parsed so far are gone: start afresh
                        files = self._files.current()
                    layout = self._layout = build(files, self._files.parse.keys)
                    self._renderings.clear()
                result = _combine(layout, began)
            finally:
                self._files.release()
            self.merges += 1
            return result

    def families(self) -> list[Metric]:
        """The merged families, as ``MultiProcessCollector.collect`` returns them."""
        result = self.merge()
        return metric_families(result.layout, result.values.tolist(), dict(result.orders))

    def text(self, encoder: Encoder) -> bytes:
        """The merged families less retired versions' samples, encoded as ``encoder`` does
        (OpenMetrics: without ``# EOF``, which ends the whole exposition), as of a merge begun
        after this call: shared with the scrapes of other processes."""
        arrived = arrival()
        return self._shared.text(_form(encoder), arrived, lambda: self._text(encoder, arrived))

    def _text(self, encoder: Encoder, arrived: int) -> tuple[int, bytes]:
        result = self.merge(arrived)
        key = _encoder_key(encoder)
        with self._lock:
            rendering = self._renderings.get(key)
            if rendering is None or rendering.layout is not result.layout:
                if len(self._renderings) >= MAX_RENDERINGS:
                    self._renderings.clear()
                rendering = self._renderings[key] = Rendering(result.layout, encoder)
            rendering.hide(self._retired_samples(result.layout))
            text = rendering.render(result.values, result.orders)
        return result.began, text.encode("utf-8")

    def _retired_samples(self, layout: Layout) -> BoolArray:
        """Which samples belong to retired model versions (the scrape filter of ``_retired``)."""
        try:
            retirements = _retired.read(self.directory)
        except (OSError, ValueError) as error:
            _errors.report("storage_write", error, where=f"reading {_retired.RECORD}")
            retirements = _retired.Retirements()
        cached_for, cached_layout, hidden = self._hidden
        if cached_for is retirements and cached_layout is layout and hidden is not None:
            return hidden
        hidden = np.zeros(len(layout), dtype=bool)
        if retirements:
            verdicts: dict[tuple[str | None, str | None], bool] = {}
            for number, labels in enumerate(layout.labels):
                mapping = dict(labels)
                pair = (mapping.get("model"), mapping.get("version"))
                if pair not in verdicts:
                    verdicts[pair] = retirements.hides(mapping)
                hidden[number] = verdicts[pair]
        self._hidden = (retirements, layout, hidden)
        return hidden

    def close(self) -> None:
        with self._lock:
            self._files.close()
        self._shared.close()


class _Mergers:
    by_directory: dict[str, Merger] = {}
    lock = threading.Lock()


def merger_for(directory: str, names: Any, *, share_files: bool = True) -> Merger:
    """This process's merger of ``directory`` (``names``: the pattern of file names read;
    ``share_files``: share merges with other processes through files of the directory)."""
    with _Mergers.lock:
        merger = _Mergers.by_directory.get(directory)
        if merger is None:
            merger = Merger(directory, names, share_files=share_files)
            _Mergers.by_directory[directory] = merger
        return merger


def forget(directory: str) -> None:
    """Close ``directory``'s merger, if any (its files are kept open between scrapes)."""
    with _Mergers.lock:
        merger = _Mergers.by_directory.pop(directory, None)
    if merger is not None:
        merger.close()


def _after_fork_in_child() -> None:
    """A child starts without its parent's mergers (their locks may be held by a thread)."""
    for merger in _Mergers.by_directory.values():
        merger._files.close()
        merger._shared.drop()
    _Mergers.by_directory = {}
    _Mergers.lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
