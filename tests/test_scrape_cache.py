"""Scrapes shared across processes (ml_wsgi_metrics._scrape_cache): sync workers scraped at
the same time cost at most two merges, and each scrape holds every count made before it."""

from __future__ import annotations

import multiprocessing
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import generate_latest as text_format
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics
from support import wait_until
from test_merge import count_arrivals, hold_first_merge, run_process, theirs, work

from ml_wsgi_metrics import _errors, _merge, _scrape_cache, multiprocess

SCRAPERS = 4


def _scrape_in_child(directory: str, answers: Any) -> None:

    merger = _merge.Merger(directory, multiprocess.SLOT_FILE)
    text = merger.text(text_format)
    answers.put((text, merger.merges, merger._shared.served))


def test_scrapes_in_other_processes_share_one_merge(
    multiprocess_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four processes scrape while this one merges: none takes this merge (its files were
    read before they arrived), one merges for all four, three serve its text; all four hold
    the count made after this process's merge read the files."""
    run_process(work, 1, slot="w0")
    before = theirs(multiprocess_dir, text_format)
    merger = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    read, release = hold_first_merge(monkeypatch)
    first: list[bytes] = []
    leader = threading.Thread(target=lambda: first.append(merger.text(text_format)))
    leader.start()
    assert read.wait(timeout=30)
    run_process(work, 2, slot="w1")
    after = theirs(multiprocess_dir, text_format)

    context = multiprocessing.get_context("fork")
    arrived, answers = context.Value("i", 0), context.Queue()

    def one_more() -> None:
        with arrived.get_lock():
            arrived.value += 1

    count_arrivals(monkeypatch, one_more)
    children = [
        context.Process(target=_scrape_in_child, args=(str(multiprocess_dir), answers))
        for _ in range(SCRAPERS)
    ]
    try:
        for child in children:
            child.start()
        wait_until(lambda: arrived.value == SCRAPERS, timeout=30)  # all queued on the file
        release.set()
        leader.join(timeout=60)
        results = [answers.get(timeout=60) for _ in children]
    finally:
        release.set()
        for child in children:
            child.join(timeout=60)
        merger.close()

    assert first == [before] != [after]
    assert [text for text, _, _ in results] == [after] * SCRAPERS
    assert sum(merges for _, merges, _ in results) == 1
    assert sum(served for _, _, served in results) == SCRAPERS - 1
    assert all(child.exitcode == 0 for child in children)


def cache_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.name.startswith(_scrape_cache.PREFIX))


def test_a_scrape_nobody_waits_for_writes_no_text_and_each_format_has_its_file(
    multiprocess_dir: Path,
) -> None:
    run_process(work, 1, slot="w0")
    merger = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    try:
        text, metrics = merger.text(text_format), merger.text(openmetrics)
        again = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
        try:  # another process's merger, scraping later: merges again, the same text
            assert again.text(text_format) == text and again.text(openmetrics) == metrics
            assert again.merges == 2 and again._shared.served == 0
        finally:
            again.close()
    finally:
        merger.close()
    files = cache_files(multiprocess_dir)
    assert [p.name for p in files].count(_scrape_cache.WAITING) == 1 and len(files) == 3
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}
    assert {p.stat().st_size for p in files} == {0}


def test_a_kept_text_is_served_only_to_scrapes_that_arrived_before_its_merge(
    tmp_path: Path,
) -> None:
    """What a merge leaves for the scrapes waiting: served to those that arrived before the
    merge began; never when its header is zeroed (a writer stopped halfway), from another boot
    or shorter than it says."""
    fd = os.open(tmp_path / "kept", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        _scrape_cache._write(fd, 1000, b"text")
        assert _scrape_cache._read(fd, 999) == (1000, b"text")
        assert _scrape_cache._read(fd, 1000) == (1000, b"text")
        assert _scrape_cache._read(fd, 1001) is None
        _scrape_cache._write(fd, 2000, b"shorter")  # a shorter text than the file held
        assert _scrape_cache._read(fd, 0) == (2000, b"shorter")
        header = os.pread(fd, 32, 0)
        for torn in (
            bytes(32),
            b"\x01" * 16 + header[16:],
            header[:24] + (99).to_bytes(8, "little"),
        ):
            os.pwrite(fd, torn, 0)
            assert _scrape_cache._read(fd, 0) is None
    finally:
        os.close(fd)


def test_a_planted_symlink_is_not_followed_and_the_scrape_is_served(
    multiprocess_dir: Path, tmp_path: Path
) -> None:
    run_process(work, 1, slot="w0")
    merger = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    merger.text(text_format)
    merger.close()
    (kept,) = [p for p in cache_files(multiprocess_dir) if p.name != _scrape_cache.WAITING]
    kept.unlink()
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    kept.symlink_to(target)
    before = _errors.count(("storage_read",))

    fresh = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    try:
        assert fresh.text(text_format) == theirs(multiprocess_dir, text_format)
        assert fresh.text(text_format) == theirs(multiprocess_dir, text_format)
    finally:
        fresh.close()
    assert _errors.count(("storage_read",)) - before == 2  # at each scrape
    assert target.read_bytes() == b""  # nothing written through the link


def test_clearing_the_directory_removes_the_kept_texts(multiprocess_dir: Path) -> None:
    run_process(work, 1, slot="w0")
    merger = _merge.Merger(str(multiprocess_dir), multiprocess.SLOT_FILE)
    merger.text(text_format)
    merger.close()
    assert any(p.name.startswith(_scrape_cache.PREFIX) for p in multiprocess_dir.iterdir())
    multiprocess.clear_directory()
    assert not any(p.name.startswith(_scrape_cache.PREFIX) for p in multiprocess_dir.iterdir())
