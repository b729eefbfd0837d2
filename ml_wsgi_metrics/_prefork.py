"""What the pre-fork server integrations (``gunicorn.py``, ``uwsgi.py``) share.

The middleware's options checked once at start-up; the directory emptied when the server
starts; a worker taking over its slot's files; a dead worker's slot released.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry

from . import _errors, multiprocess
from .middleware import MetricsMiddleware
from .process import remove_pid_file, remove_pid_files, write_pid_file

__all__ = ["check_middleware_options", "empty_directory", "release_slot", "take_slot"]


def _no_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    return []


def _no_route(environ: dict[str, Any]) -> None:
    return None


def check_middleware_options(options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming a bad keyword argument of ``MetricsMiddleware``."""
    unknown = set(options) - set(inspect.signature(MetricsMiddleware).parameters)
    if unknown:
        raise ValueError(f"configure: unknown option(s) {', '.join(sorted(unknown))}")
    # Validate by building one, registering nothing for real.
    probe = {"route_resolver": _no_route, **options, "registry": CollectorRegistry()}
    MetricsMiddleware(_no_app, **probe)


def empty_directory() -> None:
    """Server start: remove every value and pid file a previous run left behind."""
    multiprocess.clear_directory()
    directory = multiprocess.active_directory()
    if directory is not None:
        remove_pid_files(directory)


def take_slot(identifier: str) -> None:
    """Worker, after the fork: continue the slot's counters and record which pid holds it.

    A predecessor that died unreaped (SIGKILL) left live gauges: they are dropped first.
    """
    multiprocess.mark_dead(identifier)
    multiprocess.use_identifier(identifier)
    directory = multiprocess.active_directory()
    if directory is None:
        return
    try:
        write_pid_file(directory, identifier)
    except OSError as error:  # raising here would fail the worker's boot
        _errors.report("storage_write", error, where=f"writing {identifier}.pid")


def release_slot(identifier: str) -> None:
    """The slot's holder exited: drop its live gauges and its pid file."""
    multiprocess.mark_dead(identifier)
    directory = multiprocess.active_directory()
    if directory is not None:
        remove_pid_file(directory, identifier)
