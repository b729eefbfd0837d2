"""gunicorn integration: one line in ``gunicorn.conf.py`` wires multiprocess metrics.

    from ml_wsgi_metrics.gunicorn import *  # noqa: F403

Importing this module (gunicorn loads its config before the app, with ``preload_app`` on or
off) switches to multiprocess mode in ``$PROMETHEUS_MULTIPROC_DIR`` or a private temporary
directory. The hooks clear that directory at start, give each worker a stable slot so files
never pile up across restarts, drop dead workers' live gauges, record master metrics and wrap
the app each worker serves in :class:`~ml_wsgi_metrics.MetricsMiddleware`. Options go through
:func:`configure`. A config with hooks of its own calls these from them.
"""

from __future__ import annotations

import inspect
import itertools
import logging
import os
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

from . import multiprocess
from .exposition import scrape_registry
from .metrics import ServerMetrics, shared
from .middleware import MetricsMiddleware
from .process import remove_pid_file, remove_pid_files, write_pid_file

__all__ = [
    "child_exit",
    "configure",
    "on_exit",
    "on_starting",
    "post_fork",
    "post_worker_init",
    "pre_fork",
    "when_ready",
]

log = logging.getLogger("ml_wsgi_metrics")

_SLOT = "_ml_wsgi_metrics_slot"
_directory = multiprocess.activate()


class _Settings:
    middleware: dict[str, Any] = {}
    wrap_app = True
    metrics_port: int | None = None
    metrics_address = "127.0.0.1"
    server_metrics: ServerMetrics | None = None


def configure(
    *,
    wrap_app: bool = True,
    metrics_port: int | None = None,
    metrics_address: str | None = None,
    **middleware_options: Any,
) -> None:
    """Set the options of the wrapped app's middleware and of the master's metrics port.

    :param wrap_app: wrap whichever app gunicorn serves in ``MetricsMiddleware``.
    :param metrics_port: also serve the merged metrics from the master on this port
        (default: ``$ML_WSGI_METRICS_PORT``, else none).
    :param metrics_address: the address that port binds (default ``127.0.0.1``).
    :param middleware_options: keyword arguments of :class:`~ml_wsgi_metrics.MetricsMiddleware`.
    Bad options raise ``ValueError`` here, when gunicorn reads its config.
    """
    unknown = set(middleware_options) - set(inspect.signature(MetricsMiddleware).parameters)
    if unknown:
        raise ValueError(f"configure: unknown option(s) {', '.join(sorted(unknown))}")
    # Validate by building one, registering nothing for real.
    probe = {"route_resolver": _no_route, **middleware_options, "registry": CollectorRegistry()}
    MetricsMiddleware(_no_app, **probe)
    if metrics_port is None and os.environ.get("ML_WSGI_METRICS_PORT"):
        try:
            metrics_port = int(os.environ["ML_WSGI_METRICS_PORT"])
        except ValueError:
            raise ValueError("metrics_port: $ML_WSGI_METRICS_PORT is not an integer") from None
    if metrics_port is not None and (
        not isinstance(metrics_port, int)
        or isinstance(metrics_port, bool)
        or not 0 < metrics_port < 65536
    ):
        raise ValueError(f"metrics_port: {metrics_port!r} is not a TCP port")
    _Settings.middleware = middleware_options
    _Settings.wrap_app = wrap_app
    _Settings.metrics_port = metrics_port
    _Settings.metrics_address = (
        metrics_address or os.environ.get("ML_WSGI_METRICS_ADDRESS") or "127.0.0.1"
    )


def _no_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    return []


def _no_route(environ: dict[str, Any]) -> None:
    return None


def _identifier(worker: Any) -> str:
    return f"w{getattr(worker, _SLOT)}"


def _namespace() -> str:
    return _Settings.middleware.get("namespace") or os.environ.get("ML_WSGI_METRICS_NAMESPACE", "")


def on_starting(server: Any) -> None:
    """Master, at start: remove the previous run's files (what the app set before, with
    ``preload_app``, is kept), create the master's metrics."""
    multiprocess.clear_directory()
    remove_pid_files(_directory)
    _Settings.server_metrics = shared(
        ServerMetrics,
        CollectorRegistry(),
        namespace=_namespace(),
        const_labels=dict(_Settings.middleware.get("const_labels") or {}),
    )
    log.info("ml_wsgi_metrics: multiprocess metrics in %s", _directory)


def when_ready(server: Any) -> None:
    """Master: serve the merged metrics on a port of its own, if configured."""
    if _Settings.metrics_port is None:
        return
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_MergedCollector(_namespace()))
    start_http_server(_Settings.metrics_port, _Settings.metrics_address, registry=registry)
    log.info(
        "ml_wsgi_metrics: metrics on http://%s:%s/metrics",
        _Settings.metrics_address,
        _Settings.metrics_port,
    )


class _MergedCollector:
    def __init__(self, namespace: str) -> None:
        self._namespace = namespace

    def collect(self) -> Any:
        return scrape_registry(CollectorRegistry(), self._namespace).collect()


def pre_fork(server: Any, worker: Any) -> None:
    """Master: give the new worker the lowest slot no live worker holds."""
    taken = {getattr(other, _SLOT, None) for other in server.WORKERS.values()}
    slot = next(slot for slot in itertools.count() if slot not in taken)
    setattr(worker, _SLOT, slot)
    if _Settings.server_metrics is not None:
        _Settings.server_metrics.workers_alive.set(len(server.WORKERS) + 1)


def post_fork(server: Any, worker: Any) -> None:
    """Worker: take over the slot's files, continuing its predecessor's counters."""
    identifier = _identifier(worker)
    multiprocess.mark_dead(identifier)  # a predecessor that died unreaped left live gauges
    multiprocess.use_identifier(identifier)
    try:
        write_pid_file(_directory, identifier)
    except OSError as error:  # raising here would fail the boot, and gunicorn would halt
        multiprocess.report_error(f"writing {identifier}.pid", error)


def post_worker_init(worker: Any) -> None:
    """Worker: wrap the loaded app, whichever app gunicorn was told to serve."""
    if _Settings.wrap_app:
        worker.wsgi = MetricsMiddleware(worker.wsgi, **_Settings.middleware)


def child_exit(server: Any, worker: Any) -> None:
    """Master, after reaping a worker: drop its live gauges, count a restart or a timeout.

    An exit is a restart when the master will replace the worker: not while it shuts down
    (its listeners are closed first) nor when it is told to run fewer workers.
    """
    if not hasattr(worker, _SLOT):
        return
    identifier = _identifier(worker)
    multiprocess.mark_dead(identifier)
    remove_pid_file(_directory, identifier)
    metrics = _Settings.server_metrics
    if metrics is not None:
        if server.LISTENERS and len(server.WORKERS) < server.num_workers:
            metrics.restarts.inc()
        if getattr(worker, "aborted", False):
            metrics.timeouts.inc()
        metrics.workers_alive.set(len(server.WORKERS))


def on_exit(server: Any) -> None:
    """Master, at exit: remove the directory if it was a private temporary one."""
    multiprocess.deactivate()
