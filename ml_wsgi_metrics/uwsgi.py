"""uWSGI integration: two lines of ``uwsgi.ini`` wire multiprocess metrics.

    shared-import = ml_wsgi_metrics.uwsgi        ; the master: hooks, the directory emptied once
    module = ml_wsgi_metrics.uwsgi:load_app()    ; $WSGI_APP, wrapped in MetricsMiddleware

``shared-import`` runs in the master before any app is loaded, with ``lazy-apps`` on or off.
Importing this module there switches to multiprocess mode in ``$PROMETHEUS_MULTIPROC_DIR`` or a
private temporary directory (removed at exit by ``uwsgi.ini``), empties it once, and installs a
post-fork hook: each worker writes under its uWSGI worker id (``w1``, ``w2``...). The master
gives an id to a new worker only once the previous holder has exited, so a worker restarted by
``max-requests`` (or killed) reopens its predecessor's files and continues its counters: the
directory holds at most one file set per worker plus the master's, whatever the restarts.
Each worker leaves a pid file for the per-worker process metrics, removed when it exits.

uWSGI calls :func:`load_app` to load the app (in the master, or in each worker with
``lazy-apps``): the app ``$WSGI_APP`` names (``module:attribute``) wrapped in
:class:`~ml_wsgi_metrics.MetricsMiddleware` with the options given to :func:`configure`. An app
that wraps itself is served as usual (``module = mypackage.wsgi:app``): the hooks alone do the
multiprocess part.
"""

from __future__ import annotations

import atexit
import importlib
import logging
import os
from typing import Any

try:
    import uwsgi
except ImportError as error:
    raise ImportError("ml_wsgi_metrics.uwsgi runs inside uWSGI: uwsgi --ini uwsgi.ini") from error

from . import _prefork, _settings, multiprocess
from .middleware import MetricsMiddleware

__all__ = ["APP_ENV_VAR", "PRIVATE_DIRECTORY_ENV_VAR", "configure", "load_app", "post_fork"]

log = logging.getLogger("ml_wsgi_metrics")

#: The environment variable naming the app :func:`load_app` serves, as ``module:attribute``.
APP_ENV_VAR = "WSGI_APP"

#: Names the private directory the master made, if no directory was given.
PRIVATE_DIRECTORY_ENV_VAR = _settings.PRIVATE_DIRECTORY.name


class _Settings:
    middleware: dict[str, Any] = {}
    wrap_app = True


def configure(*, wrap_app: bool = True, **middleware_options: Any) -> None:
    """Set the options of the middleware that wraps the app :func:`load_app` loads.

    :param wrap_app: wrap the app in ``MetricsMiddleware`` (``False``: it wraps itself).
    :param middleware_options: keyword arguments of :class:`~ml_wsgi_metrics.MetricsMiddleware`;
        ``ML_WSGI_METRICS_*`` variables supply defaults, as under gunicorn.
    Bad options raise ``ValueError`` here. Call it before uWSGI loads the app: from a
    module of ``shared-import`` listed after this one, for example.
    """
    _prefork.check_middleware_options(middleware_options)
    _Settings.middleware = middleware_options
    _Settings.wrap_app = wrap_app


def load_app(spec: str | None = None) -> Any:
    """The WSGI app ``spec`` names (default ``$WSGI_APP``), wrapped as configured.

    uWSGI calls it to load the app (``module = ml_wsgi_metrics.uwsgi:load_app()``): in the
    master, or in each worker with ``lazy-apps``. Errors are logged with their traceback
    (uWSGI itself only says "callable not found or import error").
    """
    spec = spec if spec is not None else os.environ.get(APP_ENV_VAR, "")
    try:
        module_name, _, attribute = spec.partition(":")
        if not module_name or not attribute:
            raise ValueError(f"{APP_ENV_VAR}: {spec!r} is not module:attribute")
        app = getattr(importlib.import_module(module_name), attribute)
        if not callable(app):
            raise ValueError(f"{APP_ENV_VAR}: {spec!r} is not a WSGI callable")
        return MetricsMiddleware(app, **_Settings.middleware) if _Settings.wrap_app else app
    except Exception:
        log.exception("ml_wsgi_metrics: could not load the app %r", spec)
        raise


def _slot() -> str | None:
    """This process's slot: ``w<worker id>`` in a worker, ``None`` in the master or a mule."""
    worker = uwsgi.worker_id()
    return f"w{worker}" if worker > 0 else None


def post_fork() -> None:
    """After each fork: a worker takes over its slot's files; a mule or spooler its pid's."""
    slot = _slot()
    if slot is None:
        multiprocess.use_identifier(None)  # never the parent's files
    else:
        _prefork.take_slot(slot)


def _at_exit() -> None:
    """A worker that exits releases its slot (the master runs no Python at exit)."""
    slot = _slot()
    if slot is not None and multiprocess.process_identifier() == slot:
        _prefork.release_slot(slot)


def _activate() -> str:
    """Multiprocess mode in ``$PROMETHEUS_MULTIPROC_DIR``, else in a private directory.

    The master runs no Python at exit: the private directory is named in
    ``$ML_WSGI_METRICS_PRIVATE_DIRECTORY`` for ``uwsgi.ini``'s exit command to remove. A
    reloaded master (the same process, exec'ed) finds it there and makes it again.
    """
    private = _settings.PRIVATE_DIRECTORY.get()
    given = os.environ.get(multiprocess.ENV_VAR)
    if given and given != private:
        return multiprocess.activate(given)
    directory = multiprocess.activate(private)
    os.environ[PRIVATE_DIRECTORY_ENV_VAR] = directory
    return directory


def _start() -> None:
    """In the master: multiprocess mode, the directory emptied, the hooks."""
    if uwsgi.masterpid() == 0:
        raise RuntimeError(
            "ml_wsgi_metrics.uwsgi needs the master (master = true): it restarts the workers "
            "and hands out their ids"
        )
    if _slot() is not None:  # first imported by a worker: the directory can't be emptied now
        raise RuntimeError(
            "ml_wsgi_metrics.uwsgi must be imported in the master, before the workers start: "
            "add 'shared-import = ml_wsgi_metrics.uwsgi' to the uWSGI config"
        )
    import uwsgidecorators  # after the check: it raises a bare Exception without the master

    directory = _activate()
    _prefork.empty_directory()
    uwsgidecorators.postfork(post_fork)  # first in uWSGI's chain of post-fork hooks
    atexit.register(_at_exit)
    log.info("ml_wsgi_metrics: multiprocess metrics in %s", directory)


_start()
