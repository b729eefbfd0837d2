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

import ipaddress
import itertools
import logging
from typing import Any

from prometheus_client import CollectorRegistry

from . import _prefork, _settings, multiprocess
from .exposition import MetricsExposition, MetricsProtection, MetricsServer, serve_metrics
from .metrics import ServerMetrics, shared
from .middleware import MetricsMiddleware, stacked_middlewares
from .process import remove_pid_file, remove_pid_files

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
    metrics_server: MetricsServer | None = None


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
        (default: ``$ML_WSGI_METRICS_PORT``, else none), with the middleware's protection
        (``metrics_token``, ``metrics_allowed_networks``).
    :param metrics_address: the address that port binds (default:
        ``$ML_WSGI_METRICS_ADDRESS``, else ``127.0.0.1``).
    :param middleware_options: keyword arguments of :class:`~ml_wsgi_metrics.MetricsMiddleware`.
    Bad options raise ``ValueError`` here, when gunicorn reads its config.
    """
    _prefork.check_middleware_options(middleware_options)
    if metrics_port is None:
        metrics_port = _settings.PORT.get()
    if metrics_port is not None and (
        not isinstance(metrics_port, int)
        or isinstance(metrics_port, bool)
        or not 0 < metrics_port < 65536
    ):
        raise ValueError(f"metrics_port: {metrics_port!r} is not a TCP port")
    _Settings.middleware = middleware_options
    _Settings.wrap_app = wrap_app
    _Settings.metrics_port = metrics_port
    _Settings.metrics_address = metrics_address or _settings.ADDRESS.get()


def _identifier(worker: Any) -> str:
    return f"w{getattr(worker, _SLOT)}"


def _namespace() -> str:
    return _Settings.middleware.get("namespace") or _settings.NAMESPACE.get()


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


def _port_protection() -> MetricsProtection:
    options = _Settings.middleware
    return MetricsProtection.from_settings(
        options.get("metrics_token"), options.get("metrics_allowed_networks")
    )


def _refuse_a_laxer_port(app: Any) -> None:
    """Raise ``ValueError`` if a ``MetricsMiddleware`` in ``app`` protects its metrics more
    than the master's port would: the port would serve them unprotected."""
    if _Settings.metrics_port is None:
        return
    port = _port_protection()
    for _, middleware in stacked_middlewares(app):
        setting = port.laxer_setting(middleware.exposition.protection)
        if setting is not None:
            raise ValueError(
                f"{setting}: the app's MetricsMiddleware requires a {setting} that the "
                f"master's metrics port (metrics_port) would not: give configure() the same "
                f"{setting}, or set it once in the environment"
            )


def when_ready(server: Any) -> None:
    """Master: serve the merged metrics on a port of its own, if configured.

    The port applies the configured protection. With ``preload_app`` the app is checked here
    (without it, each worker checks in :func:`post_worker_init`): one protected more than the
    port stops the server at start-up.
    """
    if _Settings.metrics_port is None:
        return
    preloaded = getattr(getattr(server, "app", None), "callable", None)
    if preloaded is not None:
        try:
            _refuse_a_laxer_port(preloaded)
        except ValueError:
            on_exit(server)  # gunicorn does not call it when when_ready raises
            raise
    options = _Settings.middleware
    exposition = MetricsExposition(
        CollectorRegistry(),  # a multiprocess scrape merges the files, this registry unused
        namespace=_namespace(),
        token=options.get("metrics_token"),
        allowed_networks=options.get("metrics_allowed_networks"),
    )
    path = options.get("metrics_path") or "/metrics"
    address, port = _Settings.metrics_address, _Settings.metrics_port
    _Settings.metrics_server = serve_metrics(address, port, exposition, path)
    log.info("ml_wsgi_metrics: metrics on http://%s:%s%s", address, port, path)
    if not exposition.protection.protects and not _is_loopback(address):
        log.warning(
            "ml_wsgi_metrics: metrics on %s:%s are served to anyone who can reach that "
            "address; set metrics_token or metrics_allowed_networks",
            address,
            port,
        )


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def pre_fork(server: Any, worker: Any) -> None:
    """Master: give the new worker the lowest slot no live worker holds."""
    taken = {getattr(other, _SLOT, None) for other in server.WORKERS.values()}
    slot = next(slot for slot in itertools.count() if slot not in taken)
    setattr(worker, _SLOT, slot)
    if _Settings.server_metrics is not None:
        _Settings.server_metrics.workers_alive.set(len(server.WORKERS) + 1)


def post_fork(server: Any, worker: Any) -> None:
    """Worker: take over the slot's files, continuing its predecessor's counters."""
    _prefork.take_slot(_identifier(worker))


def post_worker_init(worker: Any) -> None:
    """Worker: wrap the loaded app, whichever app gunicorn was told to serve.

    Raises ``ValueError`` (the worker fails to boot, gunicorn halts) when the app's own
    ``MetricsMiddleware`` is protected with a different token, or more than the master's
    metrics port.
    """
    if _Settings.wrap_app:
        worker.wsgi = MetricsMiddleware(worker.wsgi, **_Settings.middleware)
    _refuse_a_laxer_port(worker.wsgi)


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
    """Master, at exit: stop the metrics port, remove the directory if it was a private
    temporary one."""
    if _Settings.metrics_server is not None:
        _Settings.metrics_server.stop()
        _Settings.metrics_server = None
    multiprocess.deactivate()
