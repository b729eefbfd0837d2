"""Per-worker process metrics, read from ``/proc`` at scrape time.

prometheus_client's process collector reports only the process that serves the scrape, and
nothing in multiprocess mode (client_python #433). Each gunicorn worker leaves a
``<identifier>.pid`` file in the multiprocess directory; whichever process serves the scrape
reads every live worker's ``/proc/<pid>`` and labels the samples by worker slot.
"""

from __future__ import annotations

import contextlib
import glob
import os
from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["WorkerProcessCollector", "remove_pid_file", "remove_pid_files", "write_pid_file"]

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _pid_path(directory: str, identifier: str) -> str:
    return os.path.join(directory, f"{identifier}.pid")


def write_pid_file(directory: str, identifier: str, pid: int | None = None) -> None:
    """Record which pid holds ``identifier`` (atomically: written aside, then renamed)."""
    path = _pid_path(directory, identifier)
    with open(path + ".tmp", "w") as handle:
        handle.write(str(os.getpid() if pid is None else pid))
    os.replace(path + ".tmp", path)


def remove_pid_file(directory: str, identifier: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(_pid_path(directory, identifier))


def remove_pid_files(directory: str) -> None:
    """Remove every pid file (and half-written one): a crashed run's pids may be reused."""
    for pattern in ("*.pid", "*.pid.tmp"):
        for path in glob.glob(os.path.join(directory, pattern)):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


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
        for path in sorted(glob.glob(os.path.join(self._directory, "*.pid"))):
            try:
                with open(path) as handle:
                    pid = handle.read().strip()
            except OSError:
                continue
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
