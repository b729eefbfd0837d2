"""Multiprocess storage whose file count does not grow with worker restarts.

prometheus_client's multiprocess mode keeps one set of ``*.db`` files per pid for ever, so every
restarted worker adds files and every scrape reads them all. Here each process writes under a
*process identifier*: gunicorn workers get a stable slot (``w0``, ``w1``, ...) assigned by the
master, so a replacement worker reopens its predecessor's files and continues its counters.
Two live processes never share an identifier: the master hands out a slot only once its previous
holder has been reaped. Anything else (the master, a script) writes under its pid.

The files keep prometheus_client's format, so :class:`prometheus_client.multiprocess.
MultiProcessCollector` merges them unchanged. Writes fail open: a directory that is missing,
unwritable or full is logged and counted, and the value is kept in memory instead.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable
from typing import Any

import prometheus_client.values
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import mark_process_dead

from . import _retired

__all__ = [
    "ENV_VAR",
    "activate",
    "active_directory",
    "clear_directory",
    "compact",
    "deactivate",
    "instrumentation_errors",
    "mark_dead",
    "process_identifier",
    "storage_generation",
    "storage_lock",
    "use_identifier",
]

log = logging.getLogger("ml_wsgi_metrics")

#: prometheus_client's documented variable; a directory given there is the one used.
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

_lock = threading.RLock()  # re-entrant: a fallback may call ``inc`` under it


class _State:
    directory: str | None = None
    identifier: str | None = None  # None: the pid
    owned_directory: bool = False
    previous_value_class: Any = None
    files: dict[str, Any] = {}
    values: list[SlotValue] = []
    errors: int = 0
    reported: set[str] = set()
    generation: int = 0


def instrumentation_errors() -> int:
    """How many metric writes this process could not store in the multiprocess directory."""
    return _State.errors


def report_error(where: str, error: BaseException) -> None:
    """Count an instrumentation error and log it (once per ``where`` and process)."""
    _State.errors += 1
    if where not in _State.reported:
        _State.reported.add(where)
        log.warning("ml_wsgi_metrics: %s failed, metrics degraded: %r", where, error)


Cell = tuple[memoryview, int]  # a view of a file's doubles, and a value's index in it


def _private_cell() -> Cell:
    """Storage in this process's memory only, for a value whose file is unavailable."""
    return memoryview(bytearray(16)).cast("d"), 0


class _SlotFile(MmapedDict):
    """One slot file: an ``MmapedDict`` whose values are also reachable as ``view[index]``.

    Blocks are really allocated before they are mapped: prometheus_client grows files with
    ``truncate``, i.e. sparse blocks that, on a full disk, kill the process with SIGBUS at the
    first write. Allocating first turns that into an ``OSError``.
    """

    def __init__(self, filename: str) -> None:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            size = os.fstat(fd).st_size
            try:
                os.posix_fallocate(fd, 0, max(size, 1 << 16))
            except OSError:
                if size == 0:  # an empty file has no header: every scrape would fail on it
                    os.remove(filename)
                raise
        finally:
            os.close(fd)
        super().__init__(filename)
        self._views: list[memoryview] = []
        self._viewed: Any = None  # the mapping the newest view covers

    def _init_value(self, key: str) -> None:
        needed = self._used + len(key.encode()) + 32
        if needed > self._capacity:
            capacity = self._capacity
            while needed > capacity:
                capacity *= 2
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)

    def cell(self, key: str) -> Cell:
        """Where ``key``'s value lives (its timestamp follows it), created if new.

        Growing the file maps it anew; views of older mappings stay valid for what they cover.
        """
        if key not in self._positions:
            self._init_value(key)
        if self._viewed is not self._m:
            with memoryview(self._m) as raw:
                self._views.append(raw.cast("d"))
            self._viewed = self._m
        return self._views[-1], self._positions[key] // 8

    def close(self) -> None:
        for view in self._views:
            view.release()
        self._views.clear()
        self._viewed = None
        super().close()


class _UnavailableFile:
    """Stands in for a file that could not be opened: values live in memory only."""

    def cell(self, key: str) -> Cell:
        return _private_cell()

    def close(self) -> None:
        pass


_UNAVAILABLE = _UnavailableFile()


def process_identifier() -> str:
    """The identifier this process writes its files under: its slot, else its pid."""
    return _State.identifier or str(os.getpid())


#: Model-version series live in files of their own (``counter_w0.models.db``...), so retiring a
#: version rewrites files that hold no request series (their cells never move during a request).
MODEL_FILES = ".models"


def _open_file(prefix: str) -> _SlotFile | _UnavailableFile:
    handle = _State.files.get(prefix)
    if handle is None:
        kind, models, _ = prefix.partition(MODEL_FILES)
        name = f"{kind}_{process_identifier()}{models}.db"
        path = os.path.join(_State.directory or ".", name)
        try:
            handle = _SlotFile(path)
            if models:
                handle = _without_retired(handle)
        except (OSError, ValueError) as error:
            report_error(f"opening {path}", error)
            handle = _UNAVAILABLE
        _State.files[prefix] = handle
    return handle


def _is_model_series(labelnames: Any, multiprocess_mode: str) -> bool:
    """A series of one model version (``model`` and ``version`` labels). Gauges whose mode
    keeps a ``pid`` label or dies with the process (``all``, ``live*``) stay in the usual files."""
    names = tuple(labelnames or ())
    if multiprocess_mode == "all" or multiprocess_mode.startswith("live"):
        return False
    return "model" in names and "version" in names


def _rewritten(handle: _SlotFile, drop: Callable[[str], bool]) -> _SlotFile:
    """``handle``'s file without the keys ``drop`` selects: written aside, then renamed over it
    (a scrape reads the old file or the new one, never half of one). Closes ``handle``."""
    path = handle._fname
    temporary = f"{path}.compacting"  # not *.db: no collector reads it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fresh = _SlotFile(temporary)
    try:
        for key, value, timestamp in handle.read_all_values():
            if not drop(key):
                fresh.write_value(key, value, timestamp)
        os.replace(temporary, path)
    except BaseException:
        fresh.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    handle.close()
    fresh._fname = path
    return fresh


def _without_retired(handle: _SlotFile) -> _SlotFile:
    """A model file just opened (a dead predecessor's, say) without retired versions' keys."""
    try:
        retirements = _retired.read(_State.directory or ".")
    except (OSError, ValueError) as error:
        report_error(f"reading {_retired.RECORD}", error)
        return handle
    drop = retirements.key_filter()
    if retirements and any(map(drop, handle._positions)):
        try:
            return _rewritten(handle, drop)
        except (OSError, ValueError) as error:  # the file stays as it is; scrapes filter it
            report_error(f"compacting {handle._fname}", error)
    return handle


def compact(drop: Callable[[str], bool]) -> None:
    """Forget this process's values whose key ``drop`` selects, and rewrite its files without them.

    Keys are prometheus_client's ``mmap_key`` JSON strings. Forgotten values count on in memory
    only (a stale reference writes nowhere); the others reopen in the rewritten files at their
    next use, continuing their values. Only model files (:data:`MODEL_FILES`) are rewritten:
    the request series' cells never move during a request.
    """
    with _lock:
        kept = []
        for value in _State.values:
            if drop(value._key):
                value._view, value._index = _private_cell()
            else:
                kept.append(value)
        _State.values = kept
        for prefix, handle in list(_State.files.items()):
            if MODEL_FILES not in prefix or not isinstance(handle, _SlotFile):
                continue
            if not any(map(drop, handle._positions)):
                continue
            for value in kept:
                if value._prefix == prefix:
                    value._view = None  # reopens in the new file at its next use
            try:
                _State.files[prefix] = _rewritten(handle, drop)
            except (OSError, ValueError) as error:  # the old file stays, keys and all
                report_error(f"compacting {handle._fname}", error)


class SlotValue:
    """A metric value stored in this process's slot file (prometheus_client's value interface).

    The value is ``view[index]``, a double in the mapped file itself: adding to it is one
    item assignment. ``view`` is ``None`` until the value is (re)opened in this process.
    """

    __slots__ = ("_index", "_key", "_prefix", "_view")
    _multiprocess = True

    def __init__(
        self,
        typ: str,
        metric_name: str,
        name: str,
        labelnames: Any,
        labelvalues: Any,
        help_text: str,
        multiprocess_mode: str = "",
        **kwargs: Any,
    ) -> None:
        self._prefix = f"gauge_{multiprocess_mode}" if typ == "gauge" else typ
        if _is_model_series(labelnames, multiprocess_mode):
            self._prefix += MODEL_FILES
        self._key = mmap_key(metric_name, name, labelnames, labelvalues, help_text)
        self._view: memoryview | None = None
        self._index = 0
        with _lock:
            _State.values.append(self)
            self._open()

    def _open(self) -> None:
        """(Re)open this value in its file (continuing what is stored there); the lock is held."""
        try:
            self._view, self._index = _open_file(self._prefix).cell(self._key)
        except (OSError, ValueError, RuntimeError) as error:
            report_error(f"opening {self._prefix}", error)
            self._view, self._index = _private_cell()

    def cell(self) -> Cell:
        """``(view, index)``: the value is ``view[index]``; the lock is held."""
        if self._view is None:
            self._open()
        return self._view, self._index  # type: ignore[return-value]

    def inc(self, amount: float) -> None:
        with _lock:
            self.add_unlocked(amount)

    def add_unlocked(self, amount: float) -> None:
        """``inc`` for a caller that holds :func:`storage_lock` around several updates."""
        try:
            self._view[self._index] += amount  # type: ignore[index]
        except (TypeError, ValueError):  # not opened in this process yet, or closed under us
            if self._view is not None:
                report_error(f"writing {self._prefix}", ValueError("the file was closed"))
                self._view, self._index = _private_cell()
            self.cell()[0][self._index] += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            view, index = self.cell()
            view[index] = float(value)
            view[index + 1] = float(timestamp or 0.0)

    def set_exemplar(self, exemplar: Any) -> None:
        return None

    def get(self) -> float:
        with _lock:
            view, index = self.cell()
            return view[index]

    def get_exemplar(self) -> None:
        return None


def storage_lock() -> threading.RLock:
    """The lock guarding every slot value of this process (the same object for its lifetime)."""
    return _lock


def storage_generation() -> int:
    """Changes whenever values move to other files: cells taken before then are stale."""
    return _State.generation


def _close_files() -> None:
    """Close this process's files; cells taken from them are stale now. The lock is held."""
    for handle in _State.files.values():
        handle.close()
    _State.files.clear()
    _State.generation += 1


def _reopen_all(*, lazily: bool = False) -> None:
    """Close this process's files and reopen every value under the current identifier.

    ``lazily``: each value reopens when next used (read or written), so a process that took
    its values over from another (a forked worker) leaves no file for those it never uses.
    Otherwise every value is in the files at once, zeros included (a series made at zero
    must be scraped at zero).
    """
    with _lock:
        _close_files()
        for value in _State.values:
            if lazily:
                value._view = None
            else:
                value._open()


def _after_fork_in_child() -> None:
    """A child must not write into its parent's files: reopen lazily, at the first write.

    Lazily, because a gunicorn worker is given its slot right after the fork: opening under
    the pid first would leave a file set per worker start behind. The lock is reinitialised in
    place (another thread of the parent may have held it at the fork), as the standard library
    does for its own locks, so hot paths may keep a reference to it.
    """
    _lock._at_fork_reinit()  # type: ignore[attr-defined]
    _State.identifier = None
    _reopen_all(lazily=True)


os.register_at_fork(after_in_child=_after_fork_in_child)


def active_directory() -> str | None:
    """The multiprocess directory in use, or ``None`` in single-process mode."""
    return _State.directory if prometheus_client.values.ValueClass is SlotValue else None


def activate(directory: str | os.PathLike[str] | None = None) -> str:
    """Switch prometheus_client to multiprocess mode with slot files; return the directory.

    The directory is, in order: ``directory``, ``$PROMETHEUS_MULTIPROC_DIR``, or a fresh private
    temporary directory (removed by :func:`deactivate`). It is created if missing and exported
    in ``PROMETHEUS_MULTIPROC_DIR`` for child processes. Metrics created before this call keep
    their storage, so activate before defining metrics.
    """
    path = os.fspath(directory) if directory is not None else os.environ.get(ENV_VAR)
    owned = not path
    if owned:
        path = tempfile.mkdtemp(prefix="ml-wsgi-metrics-")
    elif os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{ENV_VAR}: {path!r} is not a directory")
    os.makedirs(path, exist_ok=True)
    with _lock:
        if prometheus_client.values.ValueClass is not SlotValue:
            _State.previous_value_class = prometheus_client.values.ValueClass
        _State.directory = os.path.abspath(path)
        _State.owned_directory = owned
        os.environ[ENV_VAR] = _State.directory
        prometheus_client.values.ValueClass = SlotValue
    _reopen_all()
    return _State.directory


def deactivate() -> None:
    """Close all files and return to the value class in use before :func:`activate`."""
    with _lock:
        _close_files()
        for value in _State.values:  # values still referenced count on in memory
            value._view, value._index = _private_cell()
        _State.values.clear()
        _State.identifier = None
        if _State.previous_value_class is not None:
            prometheus_client.values.ValueClass = _State.previous_value_class
        if _State.owned_directory and _State.directory:
            shutil.rmtree(_State.directory, ignore_errors=True)
        if _State.directory is not None and os.environ.get(ENV_VAR) == _State.directory:
            del os.environ[ENV_VAR]
        _State.directory = None
        _State.owned_directory = False


def use_identifier(identifier: str | None) -> None:
    """Write this process's values under ``identifier`` (a slot), continuing its stored values.

    The caller guarantees that no other live process uses the same identifier. Values are
    reopened when next used: those this process never uses stay where they are (a forked
    worker's copies of the master's metrics stay in the master's files).
    """
    if identifier is not None and ("_" in identifier or os.sep in identifier or not identifier):
        raise ValueError(f"identifier: {identifier!r} must be non-empty, without '_' or '/'")
    _State.identifier = identifier
    _reopen_all(lazily=True)


def mark_dead(identifier: str) -> None:
    """Drop the live gauges (``livesum``, ``liveall``, ...) of a process that has exited."""
    if _State.directory:
        mark_process_dead(identifier, _State.directory)


def clear_directory() -> None:
    """Remove every ``*.db`` file from the directory and reopen this process's values."""
    if _State.directory:
        for path in glob.glob(os.path.join(_State.directory, "*.db")):
            os.remove(path)
        _retired.remove(_State.directory)
    _reopen_all()
