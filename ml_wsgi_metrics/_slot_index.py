"""The slot files a merge reads: each file's keys parsed once, only its values read per scrape.

Keys in prometheus_client's files are append-only: an entry, once written, keeps its key and its
place, and the header says how far entries go (the *key region*). A file's index (its keys and
where their values are) is parsed once and extended when the region grows. A cached file is kept
open, so its inode cannot be freed and reused: a file replaced under the same name (a directory
cleared, a model file rewritten without retired versions) always has another inode, and is parsed
afresh. A file that does not parse is left out of the merge and reported, at every scrape, as
prometheus_client's own collector would fail on it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import stat
import struct
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from . import _errors

__all__ = ["IndexCache", "Key", "KeyParser", "SlotIndex", "Unreadable"]

#: Files kept open (and indexed) at most; others are parsed at every scrape (a directory of
#: prometheus_client's own per-pid files may hold thousands).
MAX_OPEN = 256

_INT = struct.Struct("<i")
_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

#: A parsed key: metric name, sample name, labels sorted by name, help text.
Key = tuple[str, str, tuple[tuple[str, str], ...], str]

if TYPE_CHECKING:  # numpy.typing is not imported at run time (it loads numpy.ma)
    import numpy.typing as npt

    FloatArray = npt.NDArray[np.float64]
    IntArray = npt.NDArray[np.int64]
    BoolArray = npt.NDArray[np.bool_]


class Unreadable(ValueError):
    """A file whose key region is not prometheus_client's layout."""


def _parse_entries(data: bytes, start: int) -> tuple[list[bytes], list[int]]:
    """Keys and value word indexes of the entries in ``data``, the file's bytes from ``start``
    (a multiple of 8) to the end of its key region, walked as prometheus_client's
    ``_read_all_values`` walks them (same padding, same bounds)."""
    keys: list[bytes] = []
    words: list[int] = []
    unpack = _INT.unpack_from
    end = len(data)
    pos = 0
    try:
        while pos < end:
            length = unpack(data, pos)[0]
            if length < 0 or length + pos > end:
                raise Unreadable(f"an entry at {start + pos} runs beyond the key region")
            pos += 4
            keys.append(data[pos : pos + length])
            pos += length + (8 - (length + 4) % 8)
            if pos + 16 > end:
                raise Unreadable(f"a value at {start + pos} lies beyond the key region")
            words.append((start + pos) // 8)
            pos += 16
    except struct.error as error:
        raise Unreadable(f"corrupt entry at {start + pos}: {error!r}") from error
    return keys, words


class KeyParser:
    """Parses keys (prometheus_client's ``mmap_key`` JSON) once for all files, and numbers
    them: workers' files mostly hold the same keys."""

    def __init__(self) -> None:
        self._ids: dict[bytes, int] = {}  # by the key's bytes: most are known, not decoded
        self.keys: list[Key] = []  # by id

    def __call__(self, key: bytes) -> int:
        """The id of ``key`` (UTF-8 JSON). Raises :class:`Unreadable`."""
        key_id = self._ids.get(key)
        if key_id is None:
            try:
                metric_name, name, labels, help_text = json.loads(key.decode("utf-8"))
                labels_key = tuple(
                    (sys.intern(label), sys.intern(value))
                    for label, value in sorted(labels.items())
                )  # interned: workers' keys share names and values
                metric_name, name = sys.intern(metric_name), sys.intern(name)
            except (ValueError, TypeError, AttributeError) as error:  # UnicodeDecodeError too
                raise Unreadable(f"corrupt key {key[:200]!r}: {error!r}") from error
            key_id = self._ids[key] = len(self.keys)
            self.keys.append((metric_name, name, labels_key, help_text))
        return key_id

    def __len__(self) -> int:
        return len(self.keys)


class SlotIndex:
    """One open slot file: what its name says, its keys so far, where their values are."""

    __slots__ = (
        "_fd",
        "families",
        "ids",
        "inode",
        "mode",
        "name",
        "pid",
        "typ",
        "used",
        "words",
    )

    def __init__(self, name: str, fd: int, inode: tuple[int, int]) -> None:
        parts = name.split("_")
        self.name = name
        self.typ = parts[0]
        self.mode = parts[1] if self.typ == "gauge" else ""
        self.pid = parts[2][:-3] if self.typ == "gauge" else ""  # as prometheus_client takes it
        self._fd = fd
        self.inode = inode
        self.used = 8
        self.ids: IntArray = np.zeros(0, dtype=np.int64)  # each entry's key id
        self.families: dict[str, str] = {}  # metric name -> help, in first-appearance order
        self.words: IntArray = np.zeros(0, dtype=np.int64)  # each value's word in the file

    def refresh(self, parse: KeyParser) -> None:
        """Parse the entries added since the last call. Raises :class:`Unreadable`, ``OSError``."""
        header = os.pread(self._fd, 8, 0)
        if not header:
            return  # being created: no entries yet
        used = _INT.unpack_from(header.ljust(8, b"\0"))[0]
        if used <= 0:  # prometheus_client reads no entries then
            self.used, self.ids, self.words, self.families = 8, self.ids[:0], self.words[:0], {}
            return
        if used < self.used or used % 8:
            raise Unreadable(f"corrupt header: {used} bytes used")
        if used > self.used:
            data = os.pread(self._fd, used - self.used, self.used)
            if len(data) < used - self.used:
                raise Unreadable(f"corrupt header: {used} bytes used of a shorter file")
            keys, words = _parse_entries(data, self.used)
            ids = [parse(key) for key in keys]  # all or nothing
            parsed = parse.keys
            for key_id in dict.fromkeys(ids):
                metric_name, _, _, help_text = parsed[key_id]
                self.families.setdefault(metric_name, help_text)
            self.ids = np.concatenate((self.ids, np.asarray(ids, dtype=np.int64)))
            self.words = np.concatenate((self.words, np.asarray(words, dtype=np.int64)))
            self.used = used

    def values(self, count: int, timestamps: bool) -> tuple[FloatArray, FloatArray | None]:
        """The first ``count`` entries' values (and timestamps), read now."""
        data = os.pread(self._fd, self.used, 0)
        if len(data) < self.used:
            raise Unreadable(f"{self.name} shrank to {len(data)} bytes")
        doubles = np.frombuffer(data, dtype="<f8", count=self.used // 8)
        words = self.words[:count]
        return doubles[words], doubles[words + 1] if timestamps else None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _open(path: str) -> tuple[int, tuple[int, int]]:
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
    except BaseException:
        os.close(fd)
        raise
    return fd, (info.st_dev, info.st_ino)


class IndexCache:
    """The indexes of one directory's slot files, by name, listed in the directory's order
    (the order of prometheus_client's ``glob``, so values add up in the same order)."""

    def __init__(self, directory: str, names: Any) -> None:
        self._directory = directory
        self._names = names  # a compiled pattern: only the files this package writes
        self._cache: dict[str, SlotIndex] = {}
        self._transient: list[SlotIndex] = []  # beyond MAX_OPEN: closed by release()
        self.parse = KeyParser()

    def reset(self) -> None:
        """Forget every file and key: all are parsed again at the next listing."""
        self.close()
        self.parse = KeyParser()

    def current(self) -> list[SlotIndex]:
        """The readable slot files now, each refreshed; the others reported or skipped."""
        self.release()
        try:
            entries = list(os.scandir(self._directory))
        except OSError as error:
            _errors.report("storage_read", error, where=f"listing {self._directory}")
            entries = []
        names = {entry.name for entry in entries if self._names.fullmatch(entry.name)}
        for name in set(self._cache) - names:
            self._forget(name)
        indexes = [self._index(entry) for entry in entries if entry.name in names]
        return [index for index in indexes if index is not None]

    def _index(self, entry: os.DirEntry[str]) -> SlotIndex | None:
        path = entry.path
        index = self._cache.get(entry.name)
        try:
            if entry.is_symlink():  # prometheus_client would read what it points to
                raise OSError(errno.ELOOP, "a symbolic link: not read", path)
            if index is None or index.inode[1] != entry.inode():
                self._forget(entry.name)
                fd, inode = _open(path)
                index = SlotIndex(entry.name, fd, inode)
                if len(self._cache) < MAX_OPEN:
                    self._cache[entry.name] = index
                else:
                    self._transient.append(index)
            index.refresh(self.parse)
        except FileNotFoundError:
            self._forget(entry.name)
            return None  # removed since it was listed: a dead worker's live gauges
        except (OSError, Unreadable) as error:
            self._forget(entry.name)
            _errors.report("storage_read", error, where=f"reading {path}")
            return None
        return index

    def _forget(self, name: str) -> None:
        index = self._cache.pop(name, None)
        if index is not None:
            index.close()

    def release(self) -> None:
        """Close the files read but not kept open (beyond :data:`MAX_OPEN`)."""
        for index in self._transient:
            index.close()
        self._transient.clear()

    def close(self) -> None:
        self.release()
        for index in self._cache.values():
            index.close()
        self._cache.clear()
