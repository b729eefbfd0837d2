"""Scrapes shared across the processes of one directory: the last merged text, per format.

Sync workers serve one scrape each, so scrapes in flight at the same time run in different
processes. Each format's last exposition is kept in a file of the directory,
``scrape-<format>.cache``, with the time its merge began (``CLOCK_MONOTONIC``, one clock for
every process of the host, and the boot it belongs to). A scrape takes the file's lock
(``flock``; threads of one process queue on a lock first), then serves the text if its merge
began after the scrape arrived, so it holds every count made before; otherwise it merges, and
leaves its text for the scrapes queued behind it: in the file when a scrape of another process
waits (each holds ``scrape-waiting.cache`` shared while it waits), in memory when a thread of
this one does; a scrape nobody waits for writes nothing. Scrapes arriving together cost at most
two merges: the one running when they arrive, and the one they share.

A file is opened without following a symlink, as this user's regular file, mode 0600; a file
that cannot be used is reported and the scrape merges on its own. The files are removed with
the slot files when the directory is cleared at start. A directory of prometheus_client's own
files (no slots: ``PROMETHEUS_MULTIPROC_DIR`` alone) gets none: scrapes are shared by the
threads of a process only.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import stat
import struct
import threading
import time
from collections.abc import Callable

from . import _errors

__all__ = ["PREFIX", "ScrapeCache", "arrival", "remove"]

PREFIX, SUFFIX = "scrape-", ".cache"
WAITING = PREFIX + "waiting" + SUFFIX  # held shared by each waiting scrape (any format)
_HEADER = struct.Struct("<16sQQ")  # boot id, merge began (monotonic ns), text length
_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _boot_id() -> bytes:
    """This boot's id: a monotonic time is comparable only within one boot."""
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as file:
            return hashlib.blake2b(file.read().strip(), digest_size=16).digest()
    except OSError:
        return bytes(16)


_BOOT = _boot_id()


def arrival() -> int:
    """Now, as the cache records when a merge began."""
    return time.monotonic_ns()


class ScrapeCache:
    """The directory's shared texts; one per merger (and so per process). With ``files``
    false (a directory of prometheus_client's own files, not this package's), texts are shared
    by the threads of this process only, and nothing is written to the directory."""

    def __init__(self, directory: str, *, files: bool = True) -> None:
        self.directory = directory
        self.files = files
        self._lock = threading.Lock()  # one thread of this process at the files at a time
        self._queue_lock = threading.Lock()
        self._queued = 0  # threads of this process waiting for ``_lock``
        self._kept: dict[str, tuple[int, bytes]] = {}  # the last text, while threads queue
        self._files: dict[str, int] = {}
        self.served = 0  # scrapes this process answered from another merge's text

    def text(self, form: str, arrived: int, merge: Callable[[], tuple[int, bytes]]) -> bytes:
        """The text of format ``form`` for a scrape that ``arrived``: a text whose merge began
        since, or ``merge()``'s (which returns when it began, and its text), left for the
        scrapes waiting meanwhile."""
        with self._queue_lock:
            self._queued += 1
        with self._lock:
            with self._queue_lock:
                self._queued -= 1
            began, text = self._kept.get(form, (-1, b""))
            if began >= arrived:
                self.served += 1
                return self._keep(form, began, text)
            if not self.files:
                return self._keep(form, *merge())
            try:
                fd, waiting = self._open(_name(form)), self._open(WAITING)
                fcntl.flock(waiting, fcntl.LOCK_SH)  # says "a scrape waits" to the holder
                fcntl.flock(fd, fcntl.LOCK_EX)
                fcntl.flock(waiting, fcntl.LOCK_UN)
            except OSError as error:
                _errors.report("storage_read", error, where=f"the shared scrape of {form}")
                return self._keep(form, *merge())
            try:
                kept = _read(fd, arrived)
                if kept is not None:
                    self.served += 1
                    return self._keep(form, *kept)
                began, text = merge()
                if _others_wait(waiting):
                    _write(fd, began, text)
                return self._keep(form, began, text)
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)

    def _keep(self, form: str, began: int, text: bytes) -> bytes:
        """``text``, kept in memory while threads of this process wait for it."""
        if self._queued:
            self._kept[form] = began, text
        else:
            self._kept.pop(form, None)
        return text

    def _open(self, name: str) -> int:
        fd = self._files.get(name)
        if fd is None:
            fd = os.open(os.path.join(self.directory, name), _FLAGS, 0o600)
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                os.close(fd)
                raise OSError(f"{name}: not a regular file of this user")
            self._files[name] = fd
        return fd

    def close(self) -> None:
        with self._lock:
            self.drop()

    def drop(self) -> None:
        """Close the files without the lock (a forked child: a thread of the parent may hold
        it; the parent's lock on a file stays the parent's)."""
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()
        self._kept.clear()


def _name(form: str) -> str:
    return PREFIX + hashlib.blake2b(form.encode(), digest_size=8).hexdigest() + SUFFIX


def _others_wait(waiting: int) -> bool:
    """Whether a scrape of another process waits (holds the waiting file shared)."""
    try:
        fcntl.flock(waiting, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    fcntl.flock(waiting, fcntl.LOCK_UN)
    return False


def _read(fd: int, arrived: int) -> tuple[int, bytes] | None:
    """When the kept text's merge began, and the text, if that is at or after ``arrived``
    (this boot); else ``None``."""
    header = os.pread(fd, _HEADER.size, 0)
    if len(header) != _HEADER.size:
        return None
    boot, began, length = _HEADER.unpack(header)
    if boot != _BOOT or began < arrived:
        return None
    text = os.pread(fd, length, _HEADER.size)
    return (began, text) if len(text) == length else None  # a torn write: merge again


def _write(fd: int, began: int, text: bytes) -> None:
    """The header last, after the text: a writer stopped halfway leaves no header to trust."""
    try:
        os.pwrite(fd, bytes(_HEADER.size), 0)
        if os.pwrite(fd, text, _HEADER.size) != len(text):
            raise OSError("the disk took only part of the text")
        os.ftruncate(fd, _HEADER.size + len(text))
        os.pwrite(fd, _HEADER.pack(_BOOT, began, len(text)), 0)
    except OSError as error:
        _errors.report("storage_write", error, where="the shared scrape")


def remove(directory: str) -> None:
    """Remove the shared texts left in ``directory`` (the directory is cleared at start)."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(PREFIX) and name.endswith(SUFFIX):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
