"""Multiprocess storage whose file count does not grow with worker restarts.

prometheus_client's multiprocess mode keeps one set of ``*.db`` files per pid for ever, so every
restarted worker adds files and every scrape reads them all. Here each process writes under a
*process identifier*: gunicorn workers get a stable slot (``w0``, ``w1``, ...) assigned by the
master, so a replacement worker reopens its predecessor's files and continues its counters.
Two live processes never share an identifier: the master hands out a slot only once its previous
holder has been reaped. Anything else (the master, a script) writes under its pid.

The files keep prometheus_client's format, so :class:`prometheus_client.multiprocess.
MultiProcessCollector` merges them unchanged. The directory must be private to this user
(:func:`check_directory`); no file is opened through a symbolic link, and only the names this
package writes (:data:`SLOT_FILE`) are read or removed.

Writes fail open: a value whose file cannot be opened (a directory missing, unwritable or full, a
link planted there) is kept in memory, the error is logged and exported
(:mod:`ml_wsgi_metrics._errors`), and the file is tried again at most once a second; when it
opens, what was counted meanwhile is carried into it. A file that does not read whole is moved
aside and started anew.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import mmap
import os
import re
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import prometheus_client.values
from prometheus_client.mmap_dict import (
    MmapedDict,
    _pack_integer,
    _read_all_values,
    _unpack_integer,
    mmap_key,
)
from prometheus_client.multiprocess import mark_process_dead

from . import _errors, _retired

__all__ = [
    "ENV_VAR",
    "CorruptFile",
    "SlotFilesCollector",
    "activate",
    "active_directory",
    "check_directory",
    "clear_directory",
    "compact",
    "deactivate",
    "instrumentation_errors",
    "mark_dead",
    "merged_directory",
    "process_identifier",
    "readable_file",
    "remove_file",
    "report_error",
    "retry_unavailable",
    "slot_files",
    "storage_generation",
    "storage_lock",
    "use_identifier",
]

log = logging.getLogger("ml_wsgi_metrics")

#: prometheus_client's documented variable; a directory given there is the one used.
ENV_VAR = "PROMETHEUS_MULTIPROC_DIR"

#: How long a file that could not be opened (or grown) is left alone before the next try.
RETRY_SECONDS = 1.0

#: An identifier: a pid, or a slot (letters then a number: ``w0``, ``w1``...).
IDENTIFIER = re.compile(r"[a-z]*[0-9]+")
_PREFIX = "(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))"
#: The name of a file this package (or prometheus_client) writes: ``counter_w0.db``,
#: ``gauge_livesum_12345.db``, ``counter_w0.models.db`` (model versions' series: see
#: :func:`compact`)... Nothing else in the directory is read or removed.
SLOT_FILE = re.compile(rf"{_PREFIX}_{IDENTIFIER.pattern}(?:\.models)?\.db")

_lock = threading.RLock()  # re-entrant: a fallback may call ``inc`` under it


class _State:
    directory: str | None = None
    identifier: str | None = None  # None: the pid
    owned_directory: bool = False
    previous_value_class: Any = None
    files: dict[str, Any] = {}
    values: list[SlotValue] = []
    unavailable: dict[str, float] = {}  # file prefix -> when to try it again (monotonic)
    generation: int = 0


def instrumentation_errors() -> int:
    """How many storage errors (files not opened, grown, read or written) this process had."""
    return _errors.count()


def report_error(where: str, error: BaseException, stage: str = "storage_write") -> None:
    """Log a storage error (the first of each ``where`` in full), count and export it."""
    _errors.report(stage, error, where=where)


def check_directory(
    path: str | os.PathLike[str], *, setting: str = ENV_VAR, create: bool = True
) -> str:
    """``path`` made absolute, created private (0700) if missing and ``create``, checked private.

    Another local user must not be able to plant files or links there: a directory that is
    missing, a symbolic link, belongs to another user or is writable by group or others is
    refused with a ``ValueError`` naming ``setting`` (default :data:`ENV_VAR`).
    """
    path = os.path.abspath(os.fspath(path))
    if create:
        try:
            os.makedirs(path, mode=0o700)
        except FileExistsError:
            pass
        except OSError as error:
            raise ValueError(f"{setting}: cannot create {path!r}: {error.strerror}") from None
    try:
        info = os.lstat(path)
    except OSError as error:
        raise ValueError(f"{setting}: {path!r} cannot be used: {error.strerror}") from None
    if stat.S_ISLNK(info.st_mode):
        raise ValueError(f"{setting}: {path!r} is a symbolic link: give the directory itself")
    if not stat.S_ISDIR(info.st_mode):
        raise ValueError(f"{setting}: {path!r} is not a directory")
    if info.st_uid != os.geteuid():
        raise ValueError(
            f"{setting}: {path!r} belongs to uid {info.st_uid}, not to this user "
            f"(uid {os.geteuid()}): use a directory of this user's"
        )
    if info.st_mode & 0o022:
        raise ValueError(
            f"{setting}: {path!r} is writable by group or others (mode "
            f"{stat.S_IMODE(info.st_mode):o}) and must not be writable by other users: "
            "chmod 700 it, or name a new directory"
        )
    return path


class CorruptFile(ValueError):
    """A slot file whose content is not prometheus_client's layout."""


def _check_entries(data: Any, used: int) -> None:
    """Raise :class:`CorruptFile` unless ``data[:used]`` holds well-formed entries."""
    if used % 8 or not 8 <= used <= len(data):
        raise CorruptFile(f"corrupt header: {used} bytes used of {len(data)}")
    try:
        for key, _, _, _ in _read_all_values(data, used):
            _metric, _name, labels, _help = json.loads(key)
            if not isinstance(labels, dict):
                raise ValueError(f"labels {labels!r}")
    except Exception as error:
        raise CorruptFile(f"corrupt entry: {error!r}") from error


def readable_file(path: str) -> bool:
    """Whether the slot file ``path`` reads whole; a file that does not is reported."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with open(fd, "rb") as handle:
            data = handle.read()
        if not data:
            return False  # being created: empty until its blocks are allocated
        _check_entries(data, _unpack_integer(data, 0)[0] if len(data) >= 8 else 0)
    except FileNotFoundError:
        return False  # removed since it was listed: a dead worker's live gauges
    except Exception as error:
        report_error(f"reading {path}", error, stage="storage_read")
        return False
    return True


Cell = tuple[memoryview, int]  # a view of a file's doubles, and a value's index in it


def _private_cell() -> Cell:
    """Storage in this process's memory only: a value and its timestamp."""
    return memoryview(bytearray(16)).cast("d"), 0


class _SlotFile(MmapedDict):
    """One slot file: an ``MmapedDict`` whose values are also reachable as ``view[index]``.

    Opened once, without following a symbolic link, created 0600, checked whole before use.
    Blocks are really allocated before they are mapped: prometheus_client grows files with
    ``truncate``, i.e. sparse blocks that, on a full disk, kill the process with SIGBUS at the
    first write. Allocating first turns that into an ``OSError``.
    """

    def __init__(self, filename: str) -> None:
        fd = os.open(filename, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise OSError(errno.EINVAL, "not a regular file", filename)
            try:
                os.posix_fallocate(fd, 0, max(info.st_size, 1 << 16))
            except OSError:
                if info.st_size == 0:  # an empty file has no header: every scrape would fail
                    os.remove(filename)
                raise
            self._capacity = os.fstat(fd).st_size
            self._m = mmap.mmap(fd, self._capacity, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(fd)
            raise
        self._f = open(fd, "r+b")  # noqa: SIM115 - closed by close()
        self._fname = filename
        self._positions: dict[str, int] = {}
        try:
            self._used = _unpack_integer(self._m, 0)[0]
            if self._used == 0:
                self._used = 8
                _pack_integer(self._m, 0, self._used)
            _check_entries(self._m, self._used)
            for key, _, _, pos in self._read_all_values():
                self._positions[key] = pos
        except BaseException:
            super().close()
            raise
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


class _FileUnavailable(OSError):
    """The file could not be opened (already reported); it is tried again later."""


class _UnavailableFile:
    """Stands in for a file that could not be opened: its values stay in memory meanwhile."""

    def cell(self, key: str) -> Cell:
        raise _FileUnavailable(key)

    def close(self) -> None:
        pass


_UNAVAILABLE = _UnavailableFile()


def process_identifier() -> str:
    """The identifier this process writes its files under: its slot, else its pid."""
    return _State.identifier or str(os.getpid())


#: Model-version series live in files of their own (``counter_w0.models.db``...), so retiring a
#: version rewrites files that hold no request series (their cells never move during a request).
MODEL_FILES = ".models"


def _unavailable(prefix: str) -> None:
    """Leave ``prefix``'s file alone for a while: its values stay in memory until then."""
    _State.unavailable.setdefault(prefix, time.monotonic() + RETRY_SECONDS)


def _open_file(prefix: str) -> _SlotFile | _UnavailableFile:
    handle = _State.files.get(prefix)
    if handle is None:
        kind, models, _ = prefix.partition(MODEL_FILES)
        name = f"{kind}_{process_identifier()}{models}.db"
        path = os.path.join(_State.directory or ".", name)
        try:
            try:
                handle = _SlotFile(path)
            except CorruptFile as error:  # unreadable, so never scraped: start a new one
                report_error(f"opening {path}", error, stage="storage_open")
                os.replace(path, path + ".corrupt")
                log.warning("ml_wsgi_metrics: moved %s aside to %s.corrupt", path, path)
                handle = _SlotFile(path)
            if models:
                handle = _without_retired(handle)
        except Exception as error:  # full, unwritable, gone: fail open, retry later
            _State.files[prefix] = _UNAVAILABLE  # first: counting the error writes a value
            _unavailable(prefix)
            report_error(f"opening {path}", error, stage="storage_open")
            return _UNAVAILABLE
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
        report_error(f"reading {_retired.RECORD}", error, stage="storage_read")
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
                value._memory = None
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


class _ThroughValue:
    """A cell's store for a value kept in memory: ``store[key] += amount`` calls its ``inc``,
    so the amount reaches the file once the value can move there."""

    __slots__ = ("_value",)

    def __init__(self, value: SlotValue) -> None:
        self._value = value

    def __getitem__(self, key: object) -> float:
        return 0.0

    def __setitem__(self, key: object, amount: float) -> None:
        self._value.inc(amount)


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
        self._memory: memoryview | None = None
        self._memory_is_set = False
        with _lock:
            _State.values.append(self)
            self._open()

    def _open(self) -> None:
        """(Re)open this value in its file, carrying what was kept in memory; the lock is held.

        A file that failed is tried again only by :func:`_retry`, at most once a second.
        """
        self._view = None
        if self._prefix not in _State.unavailable:
            try:
                view, index = _open_file(self._prefix).cell(self._key)
            except _FileUnavailable:
                pass
            except Exception as error:  # the file could not grow
                _unavailable(self._prefix)
                report_error(f"opening {self._prefix}", error, stage="storage_open")
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
            self._memory, _ = _private_cell()
            self._memory_is_set = False

    def _raw_cell(self) -> Cell:
        """The double holding the value: in its file, else in memory; the lock is held."""
        if self._view is None:
            if _State.unavailable:
                _retry()
            if self._view is None:
                self._open()
        if self._view is None:
            return self._memory, 0  # type: ignore[return-value]
        return self._view, self._index

    def cell(self) -> tuple[Any, int]:
        """``(store, key)``: ``store[key] += amount`` adds to the value; the lock is held.

        The file's view when the value is there; otherwise a store that adds through
        :meth:`inc`, so nothing counted meanwhile is lost when the file opens.
        """
        view, index = self._raw_cell()
        return (view, index) if self._view is not None else (_ThroughValue(self), 0)

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
                report_error(f"writing {self._prefix}", ValueError("the file was closed"))
            view, index = self._raw_cell()
            view[index] += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        with _lock:
            view, index = self._raw_cell()
            view[index] = float(value)
            view[index + 1] = float(timestamp or 0.0)
            if self._view is None:
                self._memory_is_set = True

    def set_exemplar(self, exemplar: Any) -> None:
        return None

    def get(self) -> float:
        with _lock:
            view, index = self._raw_cell()
            return view[index]

    def _carry(self) -> None:
        """Keep the current value in memory, as if set: it moves into a fresh file."""
        view, index = self._raw_cell()
        memory, _ = _private_cell()
        memory[0], memory[1] = view[index], view[index + 1]
        self._view, self._memory, self._memory_is_set = None, memory, True

    def get_exemplar(self) -> None:
        return None


def _retry() -> None:
    """Try again the files whose time has come, carrying in the values kept in memory.

    The lock is held. Cells taken before are not lost (they add through the values) but are
    slower: the generation changes, so request series take the files' cells again.
    """
    now = time.monotonic()
    due = {prefix for prefix, when in _State.unavailable.items() if when <= now}
    if not due:
        return
    for prefix in due:
        del _State.unavailable[prefix]
        handle = _State.files.get(prefix)
        if handle is _UNAVAILABLE or getattr(handle, "_f", True) is None:  # failed, or closed
            del _State.files[prefix]
    for value in _State.values:
        if value._memory is not None and value._prefix in due:
            value._open()
    _State.generation += 1


def retry_unavailable() -> None:
    """Try again the files that could not be opened, if a second has passed since."""
    if _State.unavailable:
        with _lock:
            _retry()


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
    _State.unavailable.clear()
    _State.generation += 1


def _reopen_all(*, lazily: bool = False) -> None:
    """Close this process's files and reopen every value under the current identifier.

    ``lazily``: each value reopens when next used (read or written), so a process that took
    its values over from another (a forked worker) leaves no file for those it never uses;
    values with something kept in memory reopen at once, to carry it. Otherwise every value
    is in the files at once, zeros included (a series made at zero must be scraped at zero).
    """
    with _lock:
        _close_files()
        for value in _State.values:
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
    _State.identifier = None
    for value in _State.values:
        value._memory = None
    _reopen_all(lazily=True)


os.register_at_fork(after_in_child=_after_fork_in_child)


def active_directory() -> str | None:
    """The multiprocess directory in use, or ``None`` in single-process mode."""
    return _State.directory if prometheus_client.values.ValueClass is SlotValue else None


def merged_directory() -> str | None:
    """The directory whose files a scrape merges: this package's, or else prometheus_client's
    own (``PROMETHEUS_MULTIPROC_DIR`` set when it was imported: one file set per pid)."""
    directory = active_directory()
    if directory is None and getattr(prometheus_client.values.ValueClass, "_multiprocess", False):
        directory = os.environ.get(ENV_VAR) or os.environ.get(ENV_VAR.lower())
    return directory


def slot_files(directory: str) -> list[str]:
    """The paths of the files named as this package writes them, sorted."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(os.path.join(directory, n) for n in names if SLOT_FILE.fullmatch(n))


class SlotFilesCollector:
    """prometheus_client's merge of the slot files in ``directory`` (no other file is read).

    A file that does not read whole (corrupt, or removed meanwhile) is left out of the scrape
    and reported; the others are still served. Each scrape also retries this process's
    unavailable files (at most once a second).
    """

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Any:
        retry_unavailable()
        _errors.export_kept()
        from ._merge import merger_for  # numpy: loaded at the first scrape, not at import

        return merger_for(self._directory, SLOT_FILE).families()


def activate(directory: str | os.PathLike[str] | None = None) -> str:
    """Switch prometheus_client to multiprocess mode with slot files; return the directory.

    The directory is, in order: ``directory``, ``$PROMETHEUS_MULTIPROC_DIR``, or a fresh private
    temporary directory (removed by :func:`deactivate`). It is created (0700) if missing,
    refused if another user could write there (:func:`check_directory`), and exported in
    ``PROMETHEUS_MULTIPROC_DIR`` for child processes. Metrics created before this call keep
    their storage, so activate before defining metrics.
    """
    path = os.fspath(directory) if directory is not None else os.environ.get(ENV_VAR)
    owned = not path
    if owned:
        path = tempfile.mkdtemp(prefix="ml-wsgi-metrics-")
    path = check_directory(path)  # type: ignore[arg-type]
    with _lock:
        if prometheus_client.values.ValueClass is not SlotValue:
            _State.previous_value_class = prometheus_client.values.ValueClass
        _State.directory = path
        _State.owned_directory = owned
        os.environ[ENV_VAR] = path
        prometheus_client.values.ValueClass = SlotValue
    _reopen_all()
    return path


def deactivate() -> None:
    """Close all files and return to the value class in use before :func:`activate`."""
    with _lock:
        _close_files()
        merge = sys.modules.get(f"{__package__}._merge")  # its merger keeps the files open
        if merge is not None and _State.directory:
            merge.forget(_State.directory)
        for value in _State.values:  # values still referenced count on in memory
            value._view, value._index = _private_cell()
            value._memory = None
        _State.values.clear()
        _State.identifier = None
        _errors.export_storage_errors_with(None)  # its counter's values are gone too
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
    if identifier is not None and not IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"identifier: {identifier!r} must be letters then digits, e.g. 'w0'")
    _State.identifier = identifier
    _reopen_all(lazily=True)


def mark_dead(identifier: str) -> None:
    """Drop the live gauges (``livesum``, ``liveall``, ...) of a process that has exited."""
    if _State.directory:
        try:
            mark_process_dead(identifier, _State.directory)
        except OSError as error:
            report_error(f"removing the live gauges of {identifier}", error)


def remove_file(path: str) -> None:
    """Remove ``path`` (not what a link there points to); a failure is reported, not raised."""
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        report_error(f"removing {path}", error)


def clear_directory() -> None:
    """Start afresh: remove the slot files left in the directory (a previous run's), and the
    record of retired model versions, and write this process's values into new ones.

    This process's values keep their current value (a gauge set, a counter counted before
    the server started, e.g. a model registered in the gunicorn master with ``preload_app``):
    their old files are gone, so each is counted once.
    """
    with _lock:
        for value in _State.values:
            value._carry()
        _close_files()
        if _State.directory:
            for path in slot_files(_State.directory):
                remove_file(path)
            _retired.remove(_State.directory)
        for value in _State.values:
            value._open()
