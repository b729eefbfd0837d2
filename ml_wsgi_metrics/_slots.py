"""This process's slot values: which file each value lives in, and keeping it there.

:class:`SlotValue` is prometheus_client's value interface over a double in a mapped slot file
(:mod:`ml_wsgi_metrics._slotfile`). This module owns the process's open files (:class:`State`),
the one lock around every value (:func:`storage_lock`), the fail-open path (a file that cannot
be opened is left alone for :data:`RETRY_SECONDS`, its values kept in memory meanwhile and
carried in when it opens), reopening everything after a fork or under a new identifier, and
:func:`compact`. ``State.generation`` changes whenever values move to other files: cells taken
before then (:mod:`ml_wsgi_metrics._series`, the C record) are stale and taken again.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client.mmap_dict import mmap_key

from . import _errors, _retired
from ._slotfile import MODEL_FILES, CorruptFile, Slot, SlotFile, private_slot, rewritten

__all__ = [
    "RETRY_SECONDS",
    "SlotValue",
    "State",
    "close_files",
    "compact",
    "process_identifier",
    "reopen_all",
    "retry_unavailable",
    "storage_lock",
]

log = logging.getLogger("ml_wsgi_metrics")

#: How long a file that could not be opened (or grown) is left alone before the next try.
RETRY_SECONDS = 1.0

_lock = threading.RLock()  # re-entrant: a fallback may call ``inc`` under it


class _FileUnavailable(OSError):
    """The file could not be opened (already reported); it is tried again later."""


class _UnavailableFile:
    """Stands in for a file that could not be opened: its values stay in memory meanwhile."""

    def slot(self, key: str) -> Slot:
        raise _FileUnavailable(key)

    def close(self) -> None:
        pass


_UNAVAILABLE = _UnavailableFile()


class State:
    """The storage of this process: its directory, identifier, files and values."""

    directory: str | None = None
    identifier: str | None = None  # None: the pid
    owned_directory: bool = False
    previous_value_class: Any = None
    files: dict[str, SlotFile | _UnavailableFile] = {}
    values: list[SlotValue] = []
    unavailable: dict[str, float] = {}  # file prefix -> when to try it again (monotonic)
    generation: int = 0  # read by the request series and the C record: see the module doc


def storage_lock() -> threading.RLock:
    """The lock guarding every slot value of this process (the same object for its lifetime)."""
    return _lock


def process_identifier() -> str:
    """The identifier this process writes its files under: its slot, else its pid."""
    return State.identifier or str(os.getpid())


def _unavailable(prefix: str) -> None:
    """Leave ``prefix``'s file alone for a while: its values stay in memory until then."""
    State.unavailable.setdefault(prefix, time.monotonic() + RETRY_SECONDS)


def _open_file(prefix: str) -> SlotFile | _UnavailableFile:
    handle = State.files.get(prefix)
    if handle is None:
        kind, models, _ = prefix.partition(MODEL_FILES)
        name = f"{kind}_{process_identifier()}{models}.db"
        path = os.path.join(State.directory or ".", name)
        try:
            try:
                handle = SlotFile(path)
            except CorruptFile as error:  # unreadable, so never scraped: start a new one
                _errors.report("storage_open", error, where=f"opening {path}")
                os.replace(path, path + ".corrupt")
                log.warning("ml_wsgi_metrics: moved %s aside to %s.corrupt", path, path)
                handle = SlotFile(path)
            if models:
                handle = _without_retired(handle)
        except Exception as error:  # full, unwritable, gone: fail open, retry later
            State.files[prefix] = _UNAVAILABLE  # first: counting the error writes a value
            _unavailable(prefix)
            _errors.report("storage_open", error, where=f"opening {path}")
            return _UNAVAILABLE
        State.files[prefix] = handle
    return handle


def _is_model_series(labelnames: Sequence[str] | None, multiprocess_mode: str) -> bool:
    """A series of one model version (``model`` and ``version`` labels). Gauges whose mode
    keeps a ``pid`` label or dies with the process (``all``, ``live*``) stay in the usual files."""
    names = tuple(labelnames or ())
    if multiprocess_mode == "all" or multiprocess_mode.startswith("live"):
        return False
    return "model" in names and "version" in names


def _without_retired(handle: SlotFile) -> SlotFile:
    """A model file just opened (a dead predecessor's, say) without retired versions' keys."""
    try:
        retirements = _retired.read(State.directory or ".")
    except (OSError, ValueError) as error:
        _errors.report("storage_read", error, where=f"reading {_retired.RECORD}")
        return handle
    drop = retirements.key_filter()
    if retirements and any(map(drop, handle.keys())):
        try:
            return rewritten(handle, drop)
        except (OSError, ValueError) as error:  # the file stays as it is; scrapes filter it
            _errors.report("storage_write", error, where=f"compacting {handle.path}")
    return handle


def compact(drop: Callable[[str], bool]) -> None:
    """Forget this process's values whose key ``drop`` selects, and rewrite its files without them.

    Keys are prometheus_client's ``mmap_key`` JSON strings. Forgotten values count on in memory
    only (a stale reference writes nowhere); the others reopen in the rewritten files at their
    next use, continuing their values, and cells taken from them are stale (the generation
    changes). Only model files (:data:`MODEL_FILES`) are rewritten: the request series' cells
    never move during a request.
    """
    with _lock:
        kept = []
        for value in State.values:
            if drop(value._key):
                value.forget()
            else:
                kept.append(value)
        State.values = kept
        for prefix, handle in list(State.files.items()):
            if MODEL_FILES not in prefix or not isinstance(handle, SlotFile):
                continue
            if not any(map(drop, handle.keys())):
                continue
            for value in kept:
                if value._prefix == prefix:
                    value._view = None  # reopens in the new file at its next use
            State.generation += 1  # cells of the old file's values (a model's slots) are stale
            try:
                State.files[prefix] = rewritten(handle, drop)
            except (OSError, ValueError) as error:  # the old file stays, keys and all
                _errors.report("storage_write", error, where=f"compacting {handle.path}")


class SlotValue:
    """A metric value stored in this process's slot file (prometheus_client's value interface).

    The value is ``view[index]``, a double in the mapped file itself: adding to it is one
    item assignment. ``view`` is ``None`` until the value is (re)opened in this process, and
    while its file is unavailable: the value is then kept in ``_memory`` (what was added, or
    what was set) and carried into the file when it opens.
    """

    __slots__ = ("_index", "_key", "_memory", "_memory_is_set", "_prefix", "_view")
    _multiprocess = True

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Sequence[str],
        labelvalues: Sequence[str],
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: object,
    ) -> None:
        self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        if _is_model_series(labelnames, multiprocess_mode):
            self._prefix += MODEL_FILES
        self._key: str = mmap_key(metric_name, name, list(labelnames), list(labelvalues), help_text)
        self._view: memoryview[float] | None = None
        self._index = 0
        self._memory: memoryview[float] | None = None
        self._memory_is_set = False
        with _lock:
            State.values.append(self)
            self._open()

    def _open(self) -> None:
        """(Re)open this value in its file, carrying what was kept in memory; the lock is held.

        A file that failed is tried again only by :func:`_retry`, at most once a second.
        """
        self._view = None
        if self._prefix not in State.unavailable:
            try:
                view, index = _open_file(self._prefix).slot(self._key)
            except _FileUnavailable:
                pass
            except Exception as error:  # the file could not grow
                _unavailable(self._prefix)
                _errors.report("storage_open", error, where=f"opening {self._prefix}")
            else:
                memory = self._memory
                if memory is not None:
                    if self._memory_is_set:
                        view[index], view[index + 1] = memory[0], memory[1]
                    else:
                        view[index] += memory[0]
                    self._memory = None
                self._view, self._index = view, index
                return
        if self._memory is None:
            self._memory, _ = private_slot()
            self._memory_is_set = False

    def _current(self) -> Slot:
        """The double holding the value: in its file, else in memory; the lock is held."""
        if self._view is None:
            if State.unavailable:
                _retry()
            if self._view is None:
                self._open()
        if self._view is None:
            assert self._memory is not None  # _open keeps the value in memory
            return self._memory, 0
        return self._view, self._index

    def file_slot(self) -> Slot | None:
        """The value's double in its file, or ``None`` while it is kept in memory (its file
        unavailable); the lock is held. The slot is stale once ``State.generation`` changes."""
        view, index = self._current()
        return (view, index) if self._view is not None else None

    def inc(self, amount: float) -> None:
        with _lock:
            self.add_unlocked(amount)

    def add_unlocked(self, amount: float) -> None:
        """``inc`` for a caller that holds :func:`storage_lock` around several updates."""
        try:
            self._view[self._index] += amount  # type: ignore[index]
        except (TypeError, ValueError):  # not opened in this process yet, or closed under us
            if self._view is not None:
                self._view = None
                _unavailable(self._prefix)
                closed = ValueError("the file was closed")
                _errors.report("storage_write", closed, where=f"writing {self._prefix}")
            view, index = self._current()
            view[index] += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            view, index = self._current()
            view[index] = float(value)
            view[index + 1] = float(timestamp or 0.0)
            if self._view is None:
                self._memory_is_set = True

    def set_exemplar(self, exemplar: object) -> None:
        return None

    def get(self) -> float:
        with _lock:
            view, index = self._current()
            return float(view[index])

    def carry(self) -> None:
        """Keep the current value in memory, as if set: it moves into a fresh file."""
        view, index = self._current()
        memory, _ = private_slot()
        memory[0], memory[1] = view[index], view[index + 1]
        self._view, self._memory, self._memory_is_set = None, memory, True

    def forget(self) -> None:
        """Count on in this process's memory only (the storage is deactivated)."""
        self._view, self._index = private_slot()
        self._memory = None

    def get_exemplar(self) -> None:
        return None


def _retry() -> None:
    """Try again the files whose time has come, carrying in the values kept in memory.

    The lock is held. Cells taken before are not lost (they add through the values) but are
    slower: the generation changes, so request series take the files' cells again.
    """
    now = time.monotonic()
    due = {prefix for prefix, when in State.unavailable.items() if when <= now}
    if not due:
        return
    for prefix in due:
        del State.unavailable[prefix]
        handle = State.files.get(prefix)
        if handle is _UNAVAILABLE or getattr(handle, "_f", True) is None:  # failed, or closed
            del State.files[prefix]
    for value in State.values:
        if value._memory is not None and value._prefix in due:
            value._open()
    State.generation += 1


def retry_unavailable() -> None:
    """Try again the files that could not be opened, if a second has passed since."""
    if State.unavailable:
        with _lock:
            _retry()


def close_files() -> None:
    """Close this process's files; cells taken from them are stale now. The lock is held."""
    for handle in State.files.values():
        handle.close()
    State.files.clear()
    State.unavailable.clear()
    State.generation += 1


def reopen_all(*, lazily: bool = False) -> None:
    """Close this process's files and reopen every value under the current identifier.

    ``lazily``: each value reopens when next used (read or written), so a process that took
    its values over from another (a forked worker) leaves no file for those it never uses;
    values with something kept in memory reopen at once, to carry it. Otherwise every value
    is in the files at once, zeros included (a series made at zero must be scraped at zero).
    """
    with _lock:
        close_files()
        for value in State.values:
            if lazily and value._memory is None:
                value._view = None
            else:
                value._open()


def _after_fork_in_child() -> None:
    """A child must not write into its parent's files: reopen lazily, at the first write.

    Lazily, because a gunicorn worker is given its slot right after the fork: opening under
    the pid first would leave a file set per worker start behind. What the parent kept in
    memory is the parent's to carry. The lock is reinitialised in place (another thread of
    the parent may have held it at the fork), as the standard library does for its own
    locks, so hot paths may keep a reference to it.
    """
    _lock._at_fork_reinit()  # type: ignore[attr-defined]
    State.identifier = None
    for value in State.values:
        value._memory = None
    reopen_all(lazily=True)


os.register_at_fork(after_in_child=_after_fork_in_child)
