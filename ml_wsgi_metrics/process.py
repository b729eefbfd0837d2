"""Per-worker process metrics, read from ``/proc`` at scrape time.

prometheus_client's process collector reports only the process that serves the scrape, and
nothing in multiprocess mode (client_python #433). Each gunicorn worker leaves a
``<identifier>.pid`` file in the multiprocess directory; whichever process serves the scrape
reads every live worker's ``/proc/<pid>`` and labels the samples by worker slot.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .multiprocess import IDENTIFIER, remove_file

__all__ = [
    "WorkerProcessCollector",
    "pid_files",
    "remove_pid_file",
    "remove_pid_files",
    "write_pid_file",
]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: ``w0.pid``: which pid holds slot ``w0``; ``w0.pid.tmp`` while it is being written.
PID_FILE = re.compile(rf"({IDENTIFIER.pattern})\.pid")
_PARTIAL_PID_FILE = re.compile(rf"{IDENTIFIER.pattern}\.pid\.tmp")


def _pid_path(directory: str, identifier: str) -> str:
    if not IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"identifier: {identifier!r} must be letters then digits, e.g. 'w0'")
    return os.path.join(directory, f"{identifier}.pid")


def write_pid_file(directory: str, identifier: str, pid: int | None = None) -> None:
    """Record which pid holds ``identifier``: written to a new private file (created, never
    opened through a link), then renamed over the old one (which replaces a link, too)."""
    path = _pid_path(directory, identifier)
    temporary = path + ".tmp"
    with contextlib.suppress(FileNotFoundError):  # a crashed predecessor's; a link goes itself
        os.remove(temporary)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        with open(os.open(temporary, flags, 0o600), "w") as handle:
            handle.write(str(os.getpid() if pid is None else pid))
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def remove_pid_file(directory: str, identifier: str) -> None:
    remove_file(_pid_path(directory, identifier))


def pid_files(directory: str, *, partial: bool = False) -> list[str]:
    """The pid files in ``directory`` (``partial``: and half-written ones), sorted by name."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    return sorted(
        os.path.join(directory, name)
        for name in names
        if PID_FILE.fullmatch(name) or (partial and _PARTIAL_PID_FILE.fullmatch(name))
    )


def remove_pid_files(directory: str) -> None:
    """Remove every pid file (and half-written one): a crashed run's pids may be reused.
    Other files in the directory are left alone."""
    for path in pid_files(directory, partial=True):
        remove_file(path)


def _boot_time() -> float:
    with open("/proc/stat") as handle:
        for line in handle:
            if line.startswith("btime "):
                return float(line.split()[1])
    return 0.0


class WorkerProcessCollector:
    """CPU seconds, resident memory, open fds and start time of every live worker."""

    def __init__(self, directory: str, namespace: str = "", proc: str = "/proc") -> None:
        self._directory = directory
        self._prefix = f"{namespace}_" if namespace else ""
        self._proc = proc
        try:
            self._btime = _boot_time()
        except OSError:
            self._btime = 0.0

    def _workers(self) -> Iterator[tuple[str, str]]:
        for path in pid_files(self._directory):
            try:
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
                with open(fd) as handle:
                    pid = handle.read(32).strip()
            except (OSError, UnicodeDecodeError):
                continue
            if pid.isascii() and pid.isdigit():
                yield os.path.basename(path)[: -len(".pid")], pid

    def collect(self) -> Iterator[Metric]:
        name = self._prefix + "gunicorn_worker_"
        cpu = CounterMetricFamily(name + "cpu_seconds", "Worker CPU time.", labels=["worker"])
        memory = GaugeMetricFamily(
            name + "resident_memory_bytes", "Worker resident memory.", labels=["worker"]
        )
        fds = GaugeMetricFamily(
            name + "open_fds", "Worker open file descriptors.", labels=["worker"]
        )
        start = GaugeMetricFamily(
            name + "start_time_seconds",
            "Worker start, in seconds since the epoch.",
            labels=["worker"],
        )
        for worker, pid in self._workers():
            try:
                with open(os.path.join(self._proc, pid, "stat"), "rb") as handle:
                    # Fields after the parenthesised command name, which may contain spaces.
                    fields = handle.read().rsplit(b")", 1)[1].split()
                open_fds = len(os.listdir(os.path.join(self._proc, pid, "fd")))
            except (OSError, IndexError):
                continue  # the worker exited since its pid file was read
            cpu.add_metric([worker], (float(fields[11]) + float(fields[12])) / _TICKS)
            memory.add_metric([worker], float(fields[21]) * _PAGE)
            fds.add_metric([worker], float(open_fds))
            start.add_metric([worker], float(fields[19]) / _TICKS + self._btime)
        yield from (cpu, memory, fds, start)
