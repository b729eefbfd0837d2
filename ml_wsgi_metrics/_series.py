"""How a value is added to: cells and adders over stored values, and the request series.

Every metric value is a double kept by prometheus_client's value object: a :class:`~ml_wsgi_
metrics._slots.SlotValue` (this package's multiprocess storage), prometheus_client's in-memory
``MutexValue`` (single process) or its own file-backed value. There is one way to add to it,
``stored += amount``, reached through one of two handles:

- a **cell** ``(store, key)``, where ``store[key] += amount`` adds (an item assignment, no call):
  the request path's handle, in Python (:class:`RouteSeries`) and in C (``_speedups.c``
  ``add_to_cell``, which writes a ``memoryview`` store in place). A cell is stale once the
  storage moves (``_slots.State.generation`` changes: a fork, a worker given its slot, a file
  retried), and is taken again then;
- an **adder** ``add(amount)``, which follows the value wherever it moves: the handle the
  signals API keeps for the life of a registered model, one value at a time.

A recorder's slots are kept as :class:`SlotCells`: their values, and cells taken lazily (at the
first add, and again after a move) to which a vector of amounts is added in one call (C
``add_amounts`` when the extension is built). Every handle adds without locking, prometheus_
client's in-memory value included: the caller holds :func:`~ml_wsgi_metrics._slots.
storage_lock` around all the updates of one request or call. A value of a class unknown here is
reached through its ``inc``, whatever the handle.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from prometheus_client.values import MutexValue

from . import _settings
from ._slots import SlotValue, State, storage_lock

if TYPE_CHECKING:  # numpy is imported by the signals API only, not by the middleware
    import numpy as np
    import numpy.typing as npt

    from .metrics import RequestMetrics

    FloatArray = npt.NDArray[np.float64]

__all__ = [
    "Adder",
    "Cell",
    "RouteSeries",
    "SlotCells",
    "child_adder",
    "fast_observer",
    "noop",
    "speedups",
    "stored_value",
    "take_cell",
    "value_adder",
    "value_cell",
]


class Store(Protocol):
    def __getitem__(self, key: Any, /) -> float: ...
    def __setitem__(self, key: Any, amount: float, /) -> None: ...


Cell = tuple[Store, Any]  # (store, key): ``store[key] += amount`` adds to a stored value
Adder = Callable[[float], None]  # add(amount): adds to a stored value, wherever it lives
Histogram = tuple[tuple[float, ...], list[Cell], Cell]  # upper bounds, bucket cells, sum cell

_H = TypeVar("_H")


class _IncStore:
    """A store whose ``store[key] += amount`` calls ``inc(amount)``: a value kept elsewhere."""

    __slots__ = ("_inc",)

    def __init__(self, inc: Callable[[float], object]) -> None:
        self._inc = inc

    def __getitem__(self, key: object) -> float:
        return 0.0

    def __setitem__(self, key: object, amount: float) -> None:
        self._inc(amount)


_NOWHERE = _IncStore(lambda amount: None)


def value_cell(value: Any) -> Cell:
    """``(store, key)`` such that ``store[key] += amount`` adds to a stored metric value.

    A slot value's cell is its double in the mapped file (while its file is unavailable, a
    store that adds through the value, so nothing counted meanwhile is lost); prometheus_client's
    in-memory value is its ``_value`` attribute; anything else, prometheus_client's own
    file-backed value included (``PROMETHEUS_MULTIPROC_DIR`` without this package's storage),
    is reached through its ``inc``, which writes the file. Take and use it under the storage
    lock.
    """
    if isinstance(value, SlotValue):
        slot = value.file_slot()
        return slot if slot is not None else (_IncStore(value.inc), 0)
    if type(value) is MutexValue:
        attributes = getattr(value, "__dict__", None)
        if attributes is not None and type(attributes.get("_value")) is float:
            return attributes, "_value"
    return _IncStore(value.inc), 0


def noop(amount: float) -> None:
    """The adder of a slot that is not recorded."""
    return None


def _cell_adder(store: Store, key: Any) -> Adder:
    def add(amount: float) -> None:
        store[key] += amount

    return add


def value_adder(value: Any) -> Adder:
    """``add(amount)`` to a stored value, unlocked (the caller holds the storage lock): a slot
    value's ``add_unlocked``, prometheus_client's in-memory value's attribute (its ``inc`` would
    take its own lock), anything else's ``inc``."""
    if isinstance(value, SlotValue):
        return value.add_unlocked
    store, key = value_cell(value)
    add: Adder = value.inc if isinstance(store, _IncStore) else _cell_adder(store, key)
    return add


def stored_value(child: Any) -> Any:
    """What keeps a counter or gauge child's value: its value object, or the child itself
    (added to through its ``inc``) when prometheus_client's internals changed."""
    value = getattr(child, "_value", None)
    return value if hasattr(value, "inc") else child


def child_adder(child: Any) -> Adder:
    """The adder of a counter or gauge child's stored value, without its per-call checks."""
    return value_adder(stored_value(child))


def take_cell(value: Any) -> Cell:
    """:func:`value_cell`, after reopening a slot value whose file was closed under it
    (reported, its value kept in memory): the ``take`` of :class:`SlotCells`."""
    if isinstance(value, SlotValue):
        value.add_unlocked(0.0)  # adds nothing; a closed view is found and replaced
    return value_cell(value)


def _add_amounts(
    cells: list[Cell | None], values: list[Any], take: Callable[[Any], Cell], amounts: FloatArray, /
) -> None:
    """Add each non-zero amount to its slot, taking the cells still ``None`` (the C
    ``add_amounts`` when the extension is built)."""
    for index, amount in enumerate(amounts.tolist()):
        if not amount:
            continue
        if values[index] is None:  # a slot not recorded
            continue
        for attempt in (0, 1):
            cell = cells[index]
            if cell is None:
                cell = cells[index] = take(values[index])
            store, key = cell
            try:
                store[key] += amount
                break
            except ValueError:  # a released view: its file was closed, the cell taken again
                if attempt:
                    raise
                cells[index] = None


class SlotCells:
    """A recorder's slots: their stored values (``None``: a slot not recorded) and cells,
    taken at a slot's first add and again once the storage moved; adds amounts in bulk."""

    __slots__ = ("_cells", "_generation", "values")

    def __init__(self, values: Sequence[Any]) -> None:
        self.values = list(values)
        self._cells: list[Cell | None] = [None] * len(self.values)
        self._generation = State.generation

    def __len__(self) -> int:
        return len(self.values)

    def cells(self) -> list[Cell | None]:
        """The cells (``None`` until taken) as they are now; the storage lock is held."""
        if self._generation != State.generation:
            self._generation = State.generation
            self._cells = [None] * len(self.values)
        return self._cells

    def add(self, amounts: FloatArray) -> None:
        """Add a float64 vector of one amount per slot (zeros skipped); the lock is held."""
        add_amounts(self.cells(), self.values, take_cell, amounts)

    def adders(self) -> list[Adder]:
        """One adder per slot, for updates one value at a time."""
        return [noop if value is None else value_adder(value) for value in self.values]


def _histogram(child: Any, take: Callable[[Any], _H]) -> tuple[tuple[float, ...], list[_H], _H]:
    """A histogram child's upper bounds, and ``take`` of each bucket's value and the sum's.

    Raises ``AttributeError`` when prometheus_client's internals changed."""
    bounds = tuple(child._upper_bounds)
    return bounds, [take(bucket) for bucket in child._buckets], take(child._sum)


def histogram_cells(child: Any) -> Histogram:
    """Upper bounds, bucket cells and the sum's cell of one labelled histogram child."""
    try:
        return _histogram(child, value_cell)
    except AttributeError:  # prometheus_client internals changed: observe through its API
        return (), [(_NOWHERE, 0)], (_IncStore(child.observe), 0)


class _HistogramAdders:
    """The adders of one labelled histogram child, for updates under one lock."""

    __slots__ = ("_bounds", "_buckets", "_sum", "fast", "observe")

    def __init__(self, child: Any) -> None:
        try:
            self._bounds, self._buckets, self._sum = _histogram(child, value_adder)
            self.observe: Adder = self._observe
            self.fast = True
        except AttributeError:  # prometheus_client internals changed: take the public path
            self.observe = child.observe
            self.fast = False

    def _observe(self, amount: float) -> None:
        if amount != amount:  # NaN: in no bucket, and never in the sum
            return
        self._buckets[bisect_left(self._bounds, amount)](1)
        self._sum(amount)


def fast_observer(histogram: Any) -> Adder:
    """``observe`` for one labelled histogram child, without its per-call checks.

    Writes exactly what ``Histogram.observe`` writes (one bucket and the sum, found by
    bisection), except that NaN is ignored instead of poisoning the sum. Under the storage lock
    of its own: use :class:`_HistogramAdders` inside a caller's lock.
    """
    adders = _HistogramAdders(histogram)
    if not adders.fast:
        return adders.observe
    observe_unlocked = adders._observe

    def observe(amount: float) -> None:
        with storage_lock():
            observe_unlocked(amount)

    return observe


class RouteSeries:
    """The series of one (method, route): everything a request adds to, under one lock.

    Values are held as cells, taken again whenever the storage moves. The C record writes the
    same cells as :meth:`finished`, reading the attributes that :mod:`ml_wsgi_metrics._response`
    lists in its docstring (``tests/test_speedups.py`` checks that every one exists).
    """

    __slots__ = ("_counts", "_duration", "_generation", "_histograms", "_in_progress",
                 "_in_progress_child", "_lock", "_request_size", "_requests", "_response_size",
                 "_statuses", "labels")  # fmt: skip

    def __init__(self, metrics: RequestMetrics, labels: tuple[str, ...]) -> None:
        self.labels = labels
        self._requests = metrics.requests
        self._statuses: dict[str, Any] = {}
        self._counts: dict[str, Cell] = {}
        self._histograms = tuple(
            histogram.labels(*labels)
            for histogram in (metrics.duration, metrics.request_size, metrics.response_size)
        )
        self._in_progress_child = metrics.in_progress.labels(*labels)
        self._lock = storage_lock()
        with self._lock:
            self._take_cells()

    def _take_cells(self) -> None:
        """(Re)take every cell from the stored values; the lock is held."""
        generation = State.generation  # a move while taking them: taken again next time
        self._duration: Histogram
        self._request_size: Histogram
        self._response_size: Histogram
        self._duration, self._request_size, self._response_size = (
            histogram_cells(child) for child in self._histograms
        )
        self._in_progress = value_cell(self._in_progress_child._value)
        self._counts = {status: value_cell(c._value) for status, c in self._statuses.items()}
        self._generation = generation

    def refresh(self) -> None:
        """Take the cells again (the C record calls this when the storage has moved)."""
        with self._lock:
            self._take_cells()

    def _add_status(self, status: str) -> Cell:
        """Create the counter of a status first seen; return its cell."""
        child = self._requests.labels(*self.labels, status)  # not under the storage lock
        with self._lock:
            self._statuses[status] = child
            cell = self._counts[status] = value_cell(child._value)
            return cell

    def started(self) -> None:
        """A request of this route is now in progress."""
        with self._lock:
            if self._generation != State.generation:
                self._take_cells()
            store, key = self._in_progress
            store[key] += 1

    def finished(
        self,
        status: str,
        duration: float,
        request_size: int,
        response_size: int,
        was_started: bool,
    ) -> None:
        """Record one finished request (requests without a body observe no request size)."""
        if status not in self._statuses:
            self._add_status(status)
        with self._lock:
            # started() took fresh cells: the storage moves only between requests (fork, slot).
            if not was_started and self._generation != State.generation:
                self._take_cells()
            store, key = self._counts[status]
            store[key] += 1
            bounds, buckets, (store, key) = self._duration
            store[key] += duration
            store, key = buckets[bisect_left(bounds, duration)]
            store[key] += 1
            if request_size:
                bounds, buckets, (store, key) = self._request_size
                store[key] += request_size
                store, key = buckets[bisect_left(bounds, request_size)]
                store[key] += 1
            bounds, buckets, (store, key) = self._response_size
            store[key] += response_size
            store, key = buckets[bisect_left(bounds, response_size)]
            store[key] += 1
            if was_started:
                store, key = self._in_progress
                store[key] -= 1


try:
    if _settings.PURE_PYTHON.get():
        raise ImportError("ML_WSGI_METRICS_PURE_PYTHON is set")
    from . import _speedups as speedups
except ImportError:
    speedups = None  # type: ignore[assignment]
    add_amounts = _add_amounts
else:
    add_amounts = speedups.add_amounts
