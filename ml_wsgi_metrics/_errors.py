"""One channel for errors inside the instrumentation: logged, counted, exported.

Request errors (a broken route resolver, a failed record) and storage errors (a file that cannot
be opened, grown or read) all end up in ``ml_wsgi_metrics_instrumentation_errors_total{stage}``.
Request errors are exported by the request's own metrics. Storage errors are exported by the
process's *exporter*, the latest request metrics made in multiprocess mode; until one exists, or
while one is being exported (the counter's own file may be the broken one), errors are kept and
exported with the next one, never recursively.

:func:`report` is the channel; two callers adapt it to where they stand:
``_response.instrumentation_failed(record, stage, error)`` (the request records, C and Python,
export through the request's own metrics) and ``multiprocess.report_error(where, error)`` (a
storage error, exported by the process's exporter).
"""

from __future__ import annotations

import collections
import logging
import os
import threading
from collections.abc import Callable

__all__ = ["STORAGE_STAGES", "count", "export_kept", "export_storage_errors_with", "report"]

log = logging.getLogger("ml_wsgi_metrics")

#: The ``stage`` label of storage errors: a file not opened, created or grown; a file not read
#: at a scrape; a value not written (its file was closed under it, a pid file).
STORAGE_STAGES = ("storage_open", "storage_read", "storage_write")

Export = Callable[[str, float], object]  # export(stage, amount)


class _Channel:
    logged: set[str] = set()  # places already logged in full
    counts: collections.Counter[str] = collections.Counter()  # by stage, in this process
    unexported: collections.Counter[str] = collections.Counter()
    exporter: Export | None = None
    exporting = threading.Lock()  # held while exporting: errors meanwhile wait for the next


def report(
    stage: str, error: BaseException, *, where: str | None = None, export: Export | None = None
) -> None:
    """Log an instrumentation error (the first of each place in full), count it, export it.

    :param stage: the exported ``stage`` label.
    :param where: what failed, for the log (default: the stage).
    :param export: ``export(stage, amount)`` adds to the exported counter (default: the
        process's storage exporter).
    """
    place = where or stage
    if place not in _Channel.logged:
        _Channel.logged.add(place)
        log.warning(
            "ml_wsgi_metrics: %s failed, metrics degraded: %r", place, error, exc_info=error
        )
    else:
        log.debug("ml_wsgi_metrics: %s failed: %r", place, error)
    _Channel.counts[stage] += 1
    _Channel.unexported[stage] += 1
    _export(export or _Channel.exporter)


def _export(export: Export | None) -> None:
    if export is None or not _Channel.exporting.acquire(blocking=False):
        return  # kept for the next export
    try:
        waiting = list(_Channel.unexported.items())
        _Channel.unexported.clear()
        for stage, amount in waiting:
            try:
                export(stage, amount)
            except Exception:
                log.exception("ml_wsgi_metrics: could not count an instrumentation error")
    finally:
        _Channel.exporting.release()


def export_kept() -> None:
    """Export the errors kept so far (made while exporting, or before an exporter existed)."""
    if _Channel.unexported:
        _export(_Channel.exporter)


def export_storage_errors_with(export: Export | None) -> None:
    """Export storage errors (and those kept so far) through ``export(stage, amount)``;
    ``None``: keep them until an exporter is given."""
    _Channel.exporter = export
    _export(export)


def count(stages: tuple[str, ...] = STORAGE_STAGES) -> int:
    """How many errors of these stages this process has had."""
    return sum(_Channel.counts[stage] for stage in stages)


def _after_fork_in_child() -> None:
    """A child exports its own errors only: those kept by its parent are its parent's."""
    _Channel.unexported.clear()
    _Channel.exporting = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
