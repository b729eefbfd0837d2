"""Retired model versions: which they are, the record every process shares, the scrape filter.

A retired version's series are gone from the scrapes and from the files. Which versions are
retired is a small JSON record in the multiprocess directory, so a worker that retires one tells
every other: scrapes drop its samples at once, and each process removes its own series when it
next reads the record. Per model the record holds a *floor* (versions ordered below it are
retired: the oldest beyond the live ones) and the versions retired one by one, so its size
does not grow with retraining.

Versions are ordered the same way in every process and host: numbers inside a version compare
as numbers (``9 < 10``, ``1.9 < 1.10``, ISO dates in date order), the rest as text.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import stat
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from . import _errors

__all__ = [
    "RECORD",
    "Retirements",
    "read",
    "remove",
    "update",
    "version_key",
    "without_retired",
]

#: The record's file name in the multiprocess directory (not ``*.db``: no collector reads it).
RECORD = "retired-models.json"

_NUMBERS = re.compile(r"(\d+)")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # never a symlink, never a FIFO wait


def version_key(version: str) -> tuple[tuple[str | int, ...], str]:
    """The order of versions: text parts as text, number parts as numbers, then the text."""
    parts = _NUMBERS.split(version)  # text, number, text, ...: same types at the same places
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), version


class Retirements:
    """Per model: a floor (versions ordered below it are retired) and versions retired by name."""

    __slots__ = ("floors", "named")

    def __init__(
        self,
        floors: Mapping[str, str] | None = None,
        named: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        self.floors: dict[str, str] = dict(floors or {})
        self.named: dict[str, set[str]] = {m: set(v) for m, v in (named or {}).items()}

    def __bool__(self) -> bool:
        return bool(self.floors or self.named)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Retirements):
            return NotImplemented
        return (self.floors, self.named) == (other.floors, other.named)

    def __repr__(self) -> str:
        return f"Retirements(floors={self.floors!r}, named={self.named!r})"

    def is_retired(self, model: str, version: str) -> bool:
        if version in self.named.get(model, ()):
            return True
        floor = self.floors.get(model)
        return floor is not None and version_key(version) < version_key(floor)

    def retire_below(self, model: str, floor: str) -> None:
        """Retire every version of ``model`` ordered below ``floor`` (a floor only rises)."""
        current = self.floors.get(model)
        if current is not None and version_key(floor) <= version_key(current):
            return
        self.floors[model] = floor
        lowest = version_key(floor)
        named = {v for v in self.named.pop(model, ()) if version_key(v) >= lowest}
        if named:
            self.named[model] = named

    def retire(self, model: str, version: str) -> None:
        """Retire one version of ``model``."""
        if not self.is_retired(model, version):
            self.named.setdefault(model, set()).add(version)

    def merged(self, other: Retirements) -> Retirements:
        """A new record retiring what either retires."""
        merged = Retirements(self.floors, self.named)
        for model, floor in other.floors.items():
            merged.retire_below(model, floor)
        for model, versions in other.named.items():
            for version in versions:
                merged.retire(model, version)
        return merged

    def hides(self, labels: Mapping[str, str]) -> bool:
        """Whether a series with these labels belongs to a retired version."""
        model, version = labels.get("model"), labels.get("version")
        return model is not None and version is not None and self.is_retired(model, version)

    def key_filter(self) -> Callable[[str], bool]:
        """``drop(key)``: whether a slot file's key (prometheus_client's ``mmap_key``) is a
        series of a retired version."""

        def drop(key: str) -> bool:
            try:
                labels = json.loads(key)[2]
            except (ValueError, IndexError, TypeError):
                return False
            return isinstance(labels, dict) and self.hides(labels)

        return drop

    def to_json(self) -> bytes:
        named = {m: sorted(v, key=version_key) for m, v in sorted(self.named.items())}
        record = {"floors": dict(sorted(self.floors.items())), "named": named}
        return json.dumps(record, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, data: bytes) -> Retirements:
        record = json.loads(data)
        floors, named = record.get("floors", {}), record.get("named", {})
        if not (
            isinstance(floors, dict)
            and isinstance(named, dict)
            and all(isinstance(m, str) and isinstance(v, str) for m, v in floors.items())
            and all(
                isinstance(v, list) and all(isinstance(x, str) for x in v) for v in named.values()
            )
        ):
            raise ValueError(f"{RECORD}: unexpected content")
        return cls(floors, named)


_EMPTY = Retirements()
_parsed: dict[str, tuple[bytes, Retirements]] = {}  # path -> (content, what it says)


def _open_regular(path: str, flags: int, mode: int = 0o600) -> int:
    fd = os.open(path, flags | _OPEN_FLAGS, mode)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file")
    return fd


def _read_all(fd: int) -> bytes:
    chunks = []
    offset = 0
    while chunk := os.pread(fd, 1 << 16, offset):
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def read(directory: str) -> Retirements:
    """The record in ``directory`` (empty when there is none). Treat it as read-only: the
    same object comes back while the record is unchanged. Raises ``OSError``/``ValueError``."""
    path = os.path.join(directory, RECORD)
    try:
        fd = _open_regular(path, os.O_RDONLY)
    except FileNotFoundError:
        return _EMPTY
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        data = _read_all(fd)
    finally:
        os.close(fd)
    cached = _parsed.get(path)
    if cached is not None and cached[0] == data:
        return cached[1]
    retirements = Retirements.from_json(data) if data else _EMPTY
    _parsed[path] = (data, retirements)
    return retirements


def update(directory: str, change: Callable[[Retirements], None]) -> Retirements:
    """Apply ``change`` to the record in ``directory`` under an exclusive lock; the result.

    The record is created private (0600), never through a symlink. Its blocks are allocated
    before it is rewritten in place, so a full disk fails the update and keeps the old record.
    """
    path = os.path.join(directory, RECORD)
    fd = _open_regular(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        data = _read_all(fd)
        try:
            retirements = Retirements.from_json(data) if data else Retirements()
        except ValueError:  # unreadable: start afresh rather than never record again
            retirements = Retirements()
        change(retirements)
        encoded = retirements.to_json()
        if encoded != data:
            os.posix_fallocate(fd, 0, len(encoded))
            os.pwrite(fd, encoded, 0)
            os.ftruncate(fd, len(encoded))
    finally:
        os.close(fd)
    return retirements


def remove(directory: str) -> None:
    """Forget the record (the server starts afresh: see ``multiprocess.clear_directory``)."""
    path = os.path.join(directory, RECORD)
    _parsed.pop(path, None)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class _LiveFamilies:
    """A collector passing on another's metric families less the samples of retired versions."""

    def __init__(self, collector: Any, directory: str) -> None:
        self._collector = collector
        self._directory = directory

    def collect(self) -> Iterable[Any]:
        try:
            retirements = read(self._directory)
        except (OSError, ValueError) as error:
            _errors.report("storage_write", error, where=f"reading {RECORD}")
            retirements = _EMPTY
        families: Iterable[Any] = self._collector.collect()
        if not retirements:
            return families
        hidden: dict[tuple[str | None, str | None], bool] = {}
        kept = []
        for family in families:
            samples = []
            for sample in family.samples:
                key = (sample.labels.get("model"), sample.labels.get("version"))
                retired = hidden.get(key)
                if retired is None:
                    retired = hidden[key] = retirements.hides(sample.labels)
                if not retired:
                    samples.append(sample)
            family.samples = samples
            kept.append(family)
        return kept


def without_retired(collector: Any, directory: str) -> _LiveFamilies:
    """``collector`` (e.g. prometheus_client's ``MultiProcessCollector``) less the samples of
    the versions the record in ``directory`` retires."""
    return _LiveFamilies(collector, directory)
