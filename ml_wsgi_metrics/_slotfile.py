"""The slot-file format: prometheus_client's ``*.db`` layout, opened safely, read whole.

A slot file is an ``MmapedDict`` file (so :class:`prometheus_client.multiprocess.
MultiProcessCollector` merges it unchanged) whose values are also reachable as doubles in a
``memoryview`` of the mapping. This module owns the names a file may have (:data:`SLOT_FILE`),
opening one (no symbolic link, created 0600, blocks allocated before use), checking that a file
reads whole (:class:`CorruptFile`), and rewriting one without some keys (:func:`rewritten`).
Which process writes which file, and when, is :mod:`ml_wsgi_metrics._slots`'s job.
"""

from __future__ import annotations

import contextlib
import errno
import json
import mmap
import os
import re
import stat
from collections.abc import Callable
from typing import TypeAlias

from prometheus_client.mmap_dict import (
    MmapedDict,
    _pack_integer,
    _read_all_values,
    _unpack_integer,
)

from . import _errors

__all__ = [
    "IDENTIFIER",
    "MODEL_FILES",
    "SLOT_FILE",
    "CorruptFile",
    "Slot",
    "SlotFile",
    "private_slot",
    "readable_file",
    "rewritten",
]

#: An identifier: a pid, or a slot (letters then a number: ``w0``, ``w1``...).
IDENTIFIER = re.compile(r"[a-z]*[0-9]+")
_PREFIX = "(?:counter|histogram|summary|gauge_(?:live)?(?:all|min|max|sum|mostrecent))"
#: The name of a file this package (or prometheus_client) writes: ``counter_w0.db``,
#: ``gauge_livesum_12345.db``, ``counter_w0.models.db`` (model versions' series: see
#: :data:`MODEL_FILES`)... Nothing else in the directory is read or removed.
SLOT_FILE = re.compile(rf"{_PREFIX}_{IDENTIFIER.pattern}(?:\.models)?\.db")
#: Model-version series live in files of their own (``counter_w0.models.db``...), so retiring a
#: version rewrites files that hold no request series (their cells never move during a request).
MODEL_FILES = ".models"

#: A view of doubles, and a value's index in it (its timestamp follows it).
Slot: TypeAlias = "tuple[memoryview[float], int]"


def private_slot() -> Slot:
    """Storage in this process's memory only: a value and its timestamp."""
    return memoryview(bytearray(16)).cast("d"), 0


class CorruptFile(ValueError):
    """A slot file whose content is not prometheus_client's layout."""


def _check_entries(data: bytes | mmap.mmap, used: int) -> None:
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
        _errors.report("storage_read", error, where=f"reading {path}")
        return False
    return True


class SlotFile(MmapedDict):
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
            self._used: int = _unpack_integer(self._m, 0)[0]
            if self._used == 0:
                self._used = 8
                _pack_integer(self._m, 0, self._used)
            _check_entries(self._m, self._used)
            for key, _, _, pos in self._read_all_values():  # type: ignore[no-untyped-call]
                self._positions[key] = pos
        except BaseException:
            super().close()  # type: ignore[no-untyped-call]
            raise
        self._views: list[memoryview[float]] = []
        self._viewed: mmap.mmap | None = None  # the mapping the newest view covers

    @property
    def path(self) -> str:
        return str(self._fname)

    def keys(self) -> list[str]:
        """The keys stored in this file."""
        return list(self._positions)

    def _init_value(self, key: str) -> None:
        needed = self._used + len(key.encode()) + 32
        if needed > self._capacity:
            capacity = self._capacity
            while needed > capacity:
                capacity *= 2
            os.posix_fallocate(self._f.fileno(), 0, capacity)
        super()._init_value(key)  # type: ignore[no-untyped-call]

    def slot(self, key: str) -> Slot:
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
        super().close()  # type: ignore[no-untyped-call]


def rewritten(handle: SlotFile, drop: Callable[[str], bool]) -> SlotFile:
    """``handle``'s file without the keys ``drop`` selects: written aside, then renamed over it
    (a scrape reads the old file or the new one, never half of one). Closes ``handle``."""
    path = handle.path
    temporary = f"{path}.compacting"  # not *.db: no collector reads it
    with contextlib.suppress(FileNotFoundError):
        os.unlink(temporary)
    fresh = SlotFile(temporary)
    try:
        for key, value, timestamp in handle.read_all_values():  # type: ignore[no-untyped-call]
            if not drop(key):
                fresh.write_value(key, value, timestamp)  # type: ignore[no-untyped-call]
        os.replace(temporary, path)
    except BaseException:
        fresh.close()
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    handle.close()
    fresh._fname = path
    return fresh
