"""The store of feedback ids already counted on this host (``ml_wsgi_metrics._replay``):
shared by processes, bounded, private, never following a symlink."""

from __future__ import annotations

import multiprocessing
import os
import stat
import time
from pathlib import Path

import pytest

from ml_wsgi_metrics._replay import ReplayStore

NOW = 1_700_000_000


def key(i: int) -> bytes:
    return f'["churn","3","Yes",1,{NOW},"{i:08x}"]'.encode()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    directory = tmp_path / "private"
    directory.mkdir(mode=0o700)
    return directory / "ids.sqlite3"


@pytest.mark.parametrize(
    "in_file", [pytest.param(True, id="file"), pytest.param(False, id="memory")]
)
def test_an_id_is_added_once(path: Path, in_file: bool) -> None:
    store = ReplayStore(path if in_file else None, lifetime=60, capacity=100)
    assert store.add(NOW, key(1), now=NOW) is True
    assert store.add(NOW, key(1), now=NOW) is False
    assert store.add(NOW + 1, key(1), now=NOW) is True  # signed at another time: another id
    assert store.add(NOW, key(2), now=NOW) is True
    assert len(store) == 3


def test_stores_on_one_file_share_their_ids(path: Path) -> None:
    first, second = (ReplayStore(path, lifetime=60, capacity=100) for _ in range(2))
    assert first.add(NOW, key(1), now=NOW) is True
    assert second.add(NOW, key(1), now=NOW) is False
    assert second.add(NOW, key(2), now=NOW) is True
    assert first.add(NOW, key(2), now=NOW) is False
    assert ReplayStore(None, lifetime=60, capacity=100).add(NOW, key(1), now=NOW) is True


def _add_in_child(store: ReplayStore, results: multiprocessing.Queue) -> None:
    results.put([store.add(NOW, key(1), now=NOW), store.add(NOW, key(3), now=NOW)])


def test_a_forked_child_uses_the_parents_store(path: Path) -> None:
    store = ReplayStore(path, lifetime=60, capacity=100)
    assert store.add(NOW, key(1), now=NOW) is True  # the parent's connection is open
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    child = context.Process(target=_add_in_child, args=(store, results))
    child.start()
    child.join(timeout=30)
    assert child.exitcode == 0
    assert results.get(timeout=5) == [False, True]
    assert store.add(NOW, key(3), now=NOW) is False


def test_expired_ids_are_dropped_first_when_full(path: Path) -> None:
    store = ReplayStore(path, lifetime=60, capacity=4)
    for i in range(2):
        assert store.add(NOW - 100, key(i), now=NOW)  # expired: their tokens are refused anyway
    for i in range(2, 5):
        assert store.add(NOW - i, key(i), now=NOW)
    assert len(store) == 3  # both expired ids went when the fifth came
    for i in range(2, 5):
        assert store.add(NOW - i, key(i), now=NOW) is False


def test_a_full_store_forgets_its_oldest_ids(path: Path) -> None:
    store = ReplayStore(path, lifetime=600, capacity=10)
    for i in range(11):
        assert store.add(NOW - 100 + i, key(i), now=NOW)
        assert len(store) <= 10
    assert len(store) == 10
    assert store.add(NOW - 100, key(0), now=NOW) is True  # the oldest was forgotten
    for i in range(2, 11):
        assert store.add(NOW - 100 + i, key(i), now=NOW) is False


def test_the_file_is_private(path: Path) -> None:
    umask = os.umask(0)  # whatever the umask lets through
    try:
        store = ReplayStore(path, lifetime=60, capacity=10)  # open: its WAL files exist
        store.add(NOW, key(1), now=NOW)
    finally:
        os.umask(umask)
    for name in (path.name, f"{path.name}-wal", f"{path.name}-shm"):
        assert stat.S_IMODE((path.parent / name).stat().st_mode) == 0o600, name
    path.chmod(0o644)  # widened since: narrowed again
    ReplayStore(path, lifetime=60, capacity=10).add(NOW, key(2), now=NOW)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("planted", ["", "-wal", "-shm", "-journal"])
def test_a_planted_symlink_is_never_followed(path: Path, tmp_path: Path, planted: str) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    target.chmod(0o644)
    (path.parent / f"{path.name}{planted}").symlink_to(target)
    with pytest.raises(ValueError, match="symlink"):
        ReplayStore(path, lifetime=60, capacity=10).add(NOW, key(1), now=NOW)
    assert target.read_bytes() == b"precious"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644


def test_a_directory_others_can_write_is_refused(path: Path) -> None:
    path.parent.chmod(0o777)
    with pytest.raises(ValueError, match="writable by other users"):
        ReplayStore(path, lifetime=60, capacity=10).add(NOW, key(1), now=NOW)
    assert not path.exists()


def test_the_store_reads_now_from_the_clock_by_default(path: Path) -> None:
    store = ReplayStore(path, lifetime=60, capacity=1)
    assert store.add(int(time.time()) - 3600, key(1))
    assert store.add(int(time.time()), key(2))  # the expired one makes room
    assert len(store) == 1
