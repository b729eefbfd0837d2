"""Prediction ids whose feedback was counted on this host, so an id sent again is refused.

One SQLite file shared by every process that opens it (the workers of a server, the instances
of a host), or this process's memory without a file. An entry is the second an id was signed
and a 16-byte digest of its content (never the token's text, which has several encodings);
entries are needed while ids are accepted (``lifetime`` seconds after signing). At most
``capacity`` are kept: when full, expired entries go first, then the oldest ones (an id so
forgotten would count again).

The file is created 0600 in a directory that only its owner can write, and neither it nor
SQLite's side files (``-wal``, ``-shm``, ``-journal``) may be symlinks. WAL journaling lets
one process write while the others read; a write holds the lock for tens of microseconds.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from .multiprocess import check_directory

__all__ = ["FILE_NAME", "ReplayStore"]

log = logging.getLogger("ml_wsgi_metrics")

#: The store's name in a multiprocess directory.
FILE_NAME = "feedback-ids.sqlite3"
_SIDE_FILES = ("-wal", "-shm", "-journal")
_BUSY_TIMEOUT = 5.0  # seconds a process waits for another's write
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS ids (signed_at INTEGER NOT NULL, digest BLOB NOT NULL, "
    "PRIMARY KEY (signed_at, digest)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS size (n INTEGER NOT NULL)",
    "INSERT INTO size SELECT 0 WHERE NOT EXISTS (SELECT 1 FROM size)",
)
# Connections a forked child inherited: never used, never closed (closing one could act on
# the parent's locks and files).
_inherited: list[sqlite3.Connection] = []
_stores: weakref.WeakSet[ReplayStore] = weakref.WeakSet()


def _refuse(path: str, problem: str) -> ValueError:
    return ValueError(f"replay_store: {path} {problem}")


def _make_private(path: str, *, create: bool) -> None:
    """Open ``path`` without following a symlink (creating it 0600 if ``create``), check
    that it is this user's regular file and narrow its mode to 0600."""
    flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_CREAT if create else 0)
    try:
        descriptor = os.open(path, flags, 0o600)
    except FileNotFoundError:
        if create:
            raise
        return  # an absent side file: SQLite creates it with the database's mode
    except OSError as error:
        if os.path.islink(path):
            raise _refuse(path, "is a symlink: it is not followed") from None
        raise _refuse(path, f"cannot be opened: {error}") from None
    try:
        info = os.fstat(descriptor)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            raise _refuse(path, "is not a regular file of this user")
        if stat.S_IMODE(info.st_mode) != 0o600:
            os.fchmod(descriptor, 0o600)
    finally:
        os.close(descriptor)


class ReplayStore:
    """The ids already counted: :meth:`add` tells a first time from a replay.

    :param path: the SQLite file, shared by the processes that open it; ``None``: this
        process's memory.
    :param lifetime: seconds after signing during which an id is accepted (kept that long).
    :param capacity: the most entries kept (``replay_capacity``).
    """

    def __init__(
        self, path: str | os.PathLike[str] | None, *, lifetime: float, capacity: int
    ) -> None:
        self.path = None if path is None else os.path.abspath(os.fspath(path))
        self.lifetime = lifetime
        self.capacity = capacity
        self._lock = threading.Lock()
        self._connection: sqlite3.Connection | None = None
        self.evicted = 0  #: unexpired ids this process dropped because the store was full
        _stores.add(self)

    def __repr__(self) -> str:
        return f"<ReplayStore {self.path or ':memory:'} capacity={self.capacity}>"

    def add(self, signed_at: int, content: bytes, now: float | None = None) -> bool:
        """Record the id signed at ``signed_at`` with ``content``; ``False`` if recorded before.

        Raises ``sqlite3.Error``, ``OSError`` or ``ValueError`` (a file that is not safe to
        use) when the store cannot be used.
        """
        digest = hashlib.blake2b(content, digest_size=16).digest()
        now = time.time() if now is None else now
        with self._lock:
            connection = self._connect()
            connection.execute("BEGIN IMMEDIATE")
            try:
                cursor = connection.execute(
                    "INSERT OR IGNORE INTO ids VALUES (?, ?)", (signed_at, digest)
                )
                added = cursor.rowcount == 1
                if added:
                    connection.execute("UPDATE size SET n = n + 1")
                    (size,) = connection.execute("SELECT n FROM size").fetchone()
                    if size > self.capacity:
                        self._make_room(connection, size, now)
            except BaseException:
                if connection.in_transaction:
                    connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")
        return added

    def open(self) -> None:
        """Open (and create) the store now: a ValueError names what is unsafe about it."""
        with self._lock:
            self._connect()

    def __len__(self) -> int:
        with self._lock:
            (size,) = self._connect().execute("SELECT n FROM size").fetchone()
        return int(size)

    def _make_room(self, connection: sqlite3.Connection, size: int, now: float) -> None:
        """Drop the expired entries, then the oldest ones, down to ``capacity``."""
        cursor = connection.execute("DELETE FROM ids WHERE signed_at < ?", (now - self.lifetime,))
        size -= max(cursor.rowcount, 0)
        if size > self.capacity:
            excess = size - self.capacity
            connection.execute(
                "DELETE FROM ids WHERE (signed_at, digest) IN "
                "(SELECT signed_at, digest FROM ids ORDER BY signed_at LIMIT ?)",
                (excess,),
            )
            size -= excess
            if not self.evicted:
                log.warning(
                    "ml_wsgi_metrics: the feedback replay store %s holds its capacity of %d "
                    "unexpired ids: the oldest are forgotten (they would count again); raise "
                    "replay_capacity or lower max_feedback_age",
                    self.path or ":memory:",
                    self.capacity,
                )
            self.evicted += excess
        connection.execute("UPDATE size SET n = ?", (size,))

    def _connect(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = self._open()
        return self._connection

    def _open(self) -> sqlite3.Connection:
        options: dict[str, Any] = {"isolation_level": None, "check_same_thread": False}
        connection: sqlite3.Connection
        if self.path is None:
            connection = sqlite3.connect(":memory:", **options)
        else:
            check_directory(os.path.dirname(self.path), setting="replay_store", create=False)
            _make_private(self.path, create=True)
            for suffix in _SIDE_FILES:
                _make_private(self.path + suffix, create=False)
            uri = Path(self.path).as_uri() + "?mode=rw"  # the file exists: never create it
            connection = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT, **options)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")  # WAL: durable at checkpoints
        for statement in _SCHEMA:
            connection.execute(statement)
        return connection

    def _after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self._connection is not None:
            _inherited.append(self._connection)
            self._connection = None


def _after_fork_in_child() -> None:
    for store in list(_stores):
        store._after_fork_in_child()


os.register_at_fork(after_in_child=_after_fork_in_child)
