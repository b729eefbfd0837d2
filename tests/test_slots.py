"""This process's slot values (``_slots``): writes fail open, are retried, lose nothing, and
a corrupt file is moved aside; compaction rewrites the model files only."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.mmap_dict import MmapedDict
from storage_support import (
    CORRUPTIONS,
    ERRORS,
    corrupt,
    db_files,
    hello_middleware,
    in_child,
    merged,
    requests_to,
)
from support import missing_capability

from ml_wsgi_metrics import multiprocess
from ml_wsgi_metrics.exposition import scrape_registry

# -- failing open ---------------------------------------------------------------------------


def test_a_vanished_directory_fails_open(
    multiprocess_dir: Path,
    caplog: pytest.LogCaptureFixture,
    call: Callable[..., Any],
    hello: Any,
) -> None:
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)
    call(app, "/before")
    errors = multiprocess.instrumentation_errors()
    shutil.rmtree(multiprocess_dir)

    with caplog.at_level(logging.WARNING, logger="ml_wsgi_metrics"):
        responses = [call(app, path) for path in ("/before", "/new", "/new")]
        Gauge("late", "G.", registry=registry, multiprocess_mode="max").set(3)
        multiprocess.use_identifier("w0")
        call(app, "/after-slot")

    assert all((r.status, r.body) == ("200 OK", b"hello") for r in responses)
    assert multiprocess.instrumentation_errors() > errors
    assert str(multiprocess_dir) in caplog.text
    assert "metrics degraded" in caplog.text


@contextlib.contextmanager
def tiny_tmpfs(path: Path, size: str = "256k") -> Iterator[Path]:
    """A small tmpfs at ``path`` for the ``with`` block (root only: skipped elsewhere, and
    failed under CI, which runs as root)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        missing_capability(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def remount(mount: Path, mode: str) -> None:
    """``mode``: ``ro`` (every write fails, root's too) or ``rw``."""
    subprocess.run(["mount", "-o", f"remount,{mode}", str(mount)], check=True)


def fill(directory: Path) -> None:
    """Write a filler file until the filesystem is full."""
    with open(directory / "filler", "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(b"\0" * 4096)
        except OSError as error:
            assert error.errno == errno.ENOSPC
    assert os.statvfs(directory).f_bavail == 0


def test_a_full_filesystem_fails_open(tmp_path: Path, call: Callable[..., Any], hello: Any) -> None:
    with tiny_tmpfs(tmp_path / "tiny") as mount:
        directory = Path(multiprocess.activate(mount / "metrics"))
        try:
            registry = CollectorRegistry()
            app = hello_middleware(registry, hello)
            call(app, "/before")  # files allocated while there was room
            fill(mount)

            def worker() -> dict[str, Any]:
                records: list[str] = []
                handler = logging.Handler()
                handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
                logging.getLogger("ml_wsgi_metrics").addHandler(handler)
                errors = multiprocess.instrumentation_errors()
                # Enough new series to outgrow the files allocated before the disk filled,
                # a metric type with no file yet, and a slot whose files cannot be created.
                bodies = {call(app, f"/route/{n}").body for n in range(400)}
                Gauge("late", "G.", registry=registry, multiprocess_mode="max").set(3)
                multiprocess.use_identifier("w0")
                bodies |= {call(app, path).body for path in ("/before", "/after-slot")}
                return {
                    "bodies": bodies,
                    "errors": multiprocess.instrumentation_errors() - errors,
                    "log": records,
                }

            result = in_child(worker)
            assert result["bodies"] == {b"hello"}
            assert result["errors"] > 0
            assert any("No space left on device" in line for line in result["log"])

            # The metrics endpoint still answers, now and once space is free again.
            assert call(app, "/metrics").code == 200
            (mount / "filler").unlink()
            response = call(app, "/metrics")
            assert response.code == 200
            assert b'route="/before"' in response.body
        finally:
            multiprocess.deactivate()
    assert not directory.exists() or not any(directory.iterdir())


# -- compaction (retired model versions) -----------------------------------------------------


def test_compact_rewrites_the_model_files_only_and_values_continue(
    multiprocess_dir: Path,
) -> None:
    registry = CollectorRegistry()
    by_version = Counter("served", "Served.", ["model", "version"], registry=registry)
    shares = Gauge(
        "share", "Share.", ["model", "version"], multiprocess_mode="max", registry=registry
    )
    requests = Counter("requests", "Requests.", ["route"], registry=registry)
    for version, amount in (("1", 2), ("2", 3)):
        by_version.labels("m", version).inc(amount)
        shares.labels("m", version).set(0.5)
    requests.labels("/").inc(5)
    pid = os.getpid()
    assert db_files(multiprocess_dir) == {
        f"counter_{pid}.db",
        f"counter_{pid}.models.db",
        f"gauge_max_{pid}.models.db",
    }
    untouched = (multiprocess_dir / f"counter_{pid}.db").stat().st_ino

    multiprocess.compact(lambda key: '"version": "1"' in key)

    assert merged(registry, "served_total", model="m", version="1") == 0
    assert (
        scrape_registry(registry).get_sample_value("share", {"model": "m", "version": "1"}) is None
    )
    assert merged(registry, "served_total", model="m", version="2") == 3
    by_version.labels("m", "2").inc()  # continues in the rewritten file
    by_version.labels("m", "1").inc()  # a stale child writes nowhere
    assert merged(registry, "served_total", model="m", version="2") == 4
    assert merged(registry, "served_total", model="m", version="1") == 0
    assert merged(registry, "share", model="m", version="2") == 0.5
    assert merged(registry, "requests_total", route="/") == 5
    assert (multiprocess_dir / f"counter_{pid}.db").stat().st_ino == untouched
    assert not list(multiprocess_dir.glob("*.compacting"))
    keys = "".join(
        key for path in multiprocess_dir.glob("*.models.db") for key, *_ in
        MmapedDict.read_all_values_from_file(str(path))
    )  # fmt: skip
    assert '"version": "2"' in keys and '"version": "1"' not in keys


# -- failing open: retried later, nothing counted meanwhile is lost ------------------------


def test_counts_made_while_the_disk_is_full_reach_the_files_once_it_is_freed(
    tmp_path: Path, call: Callable[..., Any], hello: Any, storage_clock: Any
) -> None:
    with tiny_tmpfs(tmp_path / "tiny", size="1m") as mount:  # room for 16 files once freed
        multiprocess.activate(mount / "metrics")
        try:
            registry = CollectorRegistry()
            app = hello_middleware(registry, hello)
            call(app, "/before")
            fill(mount)

            def worker() -> dict[str, Any]:
                multiprocess.use_identifier("w0")  # its files cannot be created
                bodies = {call(app, "/a").body for _ in range(30)}
                errors = multiprocess.instrumentation_errors()
                bodies |= {call(app, "/a").body for _ in range(30)}
                storage_clock.advance(multiprocess.RETRY_SECONDS)  # retried: still full
                bodies |= {call(app, "/a").body for _ in range(10)}
                retried = multiprocess.instrumentation_errors() - errors
                full = (call(app, "/metrics").code, requests_to(registry, "/a"))
                (mount / "filler").unlink()
                storage_clock.advance(multiprocess.RETRY_SECONDS)
                bodies |= {call(app, "/a").body for _ in range(5)}
                return {"bodies": bodies, "retried": retried, "while_full": full}

            result = in_child(worker)
            assert result["bodies"] == {b"hello"}
            # 40 requests, one second: one more try per file (counter, histogram, livesum)
            assert result["retried"] == 3
            assert result["while_full"] == (200, 0)  # served; the counts were in memory
            assert requests_to(registry, "/a") == 75
            assert requests_to(registry, "/before") == 1
            assert (
                merged(registry, "http_request_duration_seconds_count", method="GET", route="/a")
                == 75
            )
            assert merged(registry, "http_requests_in_progress", method="GET", route="/a") == 0
            assert merged(registry, ERRORS, stage="storage_open") == 6
            assert {p.name for p in (mount / "metrics").glob("*_w0.db")} == {
                "counter_w0.db",
                "histogram_w0.db",
                "gauge_livesum_w0.db",
            }
        finally:
            multiprocess.deactivate()


@contextlib.contextmanager
def unwritable(directory: Path) -> Iterator[None]:
    """``directory`` and its files out of this process's reach for the ``with`` block: for
    root (who ignores file modes) by acting as ``nobody``, for anyone else by a mode."""
    if os.geteuid() == 0:
        os.seteuid(65534)
        try:
            yield
        finally:
            os.seteuid(0)
    else:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)


def test_an_unwritable_directory_fails_open_and_recovers(
    multiprocess_dir: Path, call: Callable[..., Any], hello: Any, storage_clock: Any
) -> None:
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)
    call(app, "/before")

    def worker() -> dict[str, Any]:
        with unwritable(multiprocess_dir):
            multiprocess.use_identifier("w1")
            paths = ["/a"] * 20 + ["/status/404"] * 2
            bodies = {call(app, path).body for path in paths}
            scrape = call(app, "/metrics").code
        storage_clock.advance(multiprocess.RETRY_SECONDS)
        bodies |= {call(app, "/a").body}
        return {"bodies": bodies, "scrape": scrape}

    assert in_child(worker) == {"bodies": {b"hello"}, "scrape": 200}
    assert requests_to(registry, "/a") == 21
    assert requests_to(registry, "/status/404", "404") == 2
    assert requests_to(registry, "/before") == 1
    assert merged(registry, ERRORS, stage="storage_open") == 3  # counter, histogram, livesum


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_a_corrupt_slot_file_is_moved_aside_and_counting_goes_on(
    how: str, multiprocess_dir: Path, call: Callable[..., Any], hello: Any
) -> None:
    from ml_wsgi_metrics import signals
    from ml_wsgi_metrics.profile import build_profile
    from ml_wsgi_metrics.testing import isolated_signals

    # request counters and histograms, and the model's reference shares (its own file)
    for name in ("counter_w0.db", "histogram_w0.db", "gauge_max_w0.models.db"):
        corrupt(multiprocess_dir / name, how)
    profile = build_profile(
        pandas.DataFrame({"x": [1.0, 2.0, 3.0, 4.0]}),
        model="m",
        version="1",
        scores=[0.1, 0.2, 0.7, 0.9],
    )
    registry = CollectorRegistry()
    app = hello_middleware(registry, hello)

    def worker() -> set[bytes]:
        multiprocess.use_identifier("w0")
        with isolated_signals(registry):
            signals.register_model(profile)  # raised struct.error before
            return {call(app, "/a").body for _ in range(6)}

    assert in_child(worker) == {b"hello"}
    assert requests_to(registry, "/a") == 6
    assert (
        merged(
            registry,
            "model_feature_reference_share",
            model="m",
            version="1",
            feature="x",
            bin=profile.features[0].bins[0],
        )
        == profile.features[0].shares[0]
    )
    assert merged(registry, ERRORS, stage="storage_open") == 3
    aside = sorted(p.name for p in multiprocess_dir.glob("*.corrupt"))
    assert aside == [
        "counter_w0.db.corrupt",
        "gauge_max_w0.models.db.corrupt",
        "histogram_w0.db.corrupt",
    ]
