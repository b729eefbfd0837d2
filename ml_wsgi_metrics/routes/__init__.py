"""Route adapters: each framework names the matched route *template* of a request.

The core knows WSGI only. An adapter hooks into its framework's own URL matching (so the URL
map is never matched twice) and calls :func:`set_route` with the template, e.g.
``/items/<int:id>``. Requests that no route matched are labelled :data:`UNMATCHED`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Collection, Iterator
from types import ModuleType
from typing import Any, Protocol

__all__ = [
    "REQUEST_KEY",
    "UNMATCHED",
    "RouteResolver",
    "install_adapter",
    "mount_prefix",
    "mount_prefixes",
    "set_route",
    "walk",
]

log = logging.getLogger("ml_wsgi_metrics")

#: Environ key under which the middleware keeps the request being measured.
REQUEST_KEY = "ml_wsgi_metrics.request"

#: The one ``route`` label value shared by every request that matched no route.
UNMATCHED = "<unmatched>"

#: A plain hook for any other framework: ``environ -> template`` (``None`` when unmatched).
RouteResolver = Callable[[dict[str, Any]], "str | None"]


class _NamedRequest(Protocol):
    def set_route(self, route: str, script_name: str | None = None) -> None: ...


def set_route(environ: dict[str, Any], template: str) -> None:
    """Name the route template matched for this request (called by adapters).

    The template is taken relative to the application's mount point: the mount prefix in
    ``SCRIPT_NAME`` as seen by the adapter is kept, so two apps mounted under one middleware
    stay distinct (see :func:`mount_prefix`). Without a
    :class:`~ml_wsgi_metrics.MetricsMiddleware` around the app this does nothing.
    """
    request: _NamedRequest | None = environ.get(REQUEST_KEY)
    if request is not None:
        request.set_route(template, environ.get("SCRIPT_NAME", ""))


# Framework adapters, tried in order; each module has ``handles(app)`` and ``install(app)``,
# and may have ``mounts(app)``: the ``(prefix, app)`` mounted by the framework itself.
_ADAPTERS = ("flask", "django", "falcon", "bottle", "pyramid")

#: How deep :func:`walk` looks through middlewares and mounts.
_MAX_DEPTH = 16


def _framework_app(app: Any) -> Any:
    """The framework object behind ``app`` (``flask_app.wsgi_app`` is a bound method)."""
    return getattr(app, "__self__", app)


def _adapter(target: Any) -> tuple[str, ModuleType] | None:
    """The adapter handling ``target``'s framework (imported only if it may), else ``None``."""
    packages = {cls.__module__.partition(".")[0] for cls in type(target).__mro__}
    for name in _ADAPTERS:
        if name in packages:
            adapter = importlib.import_module(f"{__name__}.{name}")
            if adapter.handles(target):
                return name, adapter
    return None


def _served_apps(target: Any) -> list[tuple[str, Any]]:
    """``(mount prefix, app)`` for the apps ``target`` hands requests to."""
    if type(target).__module__ == "werkzeug.middleware.dispatcher" and hasattr(target, "mounts"):
        return [("", target.app), *target.mounts.items()]  # werkzeug's DispatcherMiddleware
    found = _adapter(target)
    if found is None:  # a middleware keeping the app it wraps in .app (werkzeug's way, ours)
        inner = getattr(target, "app", None)
        return [] if inner is None else [("", inner)]
    served = list(getattr(found[1], "mounts", lambda app: [])(target))
    replaced = getattr(target, "__dict__", {}).get("wsgi_app")  # app.wsgi_app = Middleware(...)
    if replaced is not None:
        served.append(("", replaced))
    return served


def walk(app: Any) -> Iterator[tuple[str, Any]]:
    """``(mount prefix, app)`` for ``app`` and every app it passes requests to, each once.

    Looks through middlewares in between (``ProxyFix(app)``, another ``MetricsMiddleware``:
    anything keeping the app it wraps in ``.app``), a Flask app's replaced ``wsgi_app``, the
    apps mounted in werkzeug's ``DispatcherMiddleware`` and those a framework mounts (Bottle).
    The prefix is the part of the path those mounts move into ``SCRIPT_NAME``.
    """
    seen: set[int] = set()
    pending: list[tuple[str, Any, int]] = [("", app, 0)]
    while pending:
        prefix, current, depth = pending.pop()
        target = _framework_app(current)
        if id(target) in seen or depth > _MAX_DEPTH:
            continue
        seen.add(id(target))
        yield prefix, target
        for mount, served in reversed(_served_apps(target)):
            pending.append((prefix + mount.rstrip("/"), served, depth + 1))


def install_adapter(app: Any) -> str | None:
    """Install the route adapter of every framework app found by :func:`walk`; their names.

    ``None`` when none was found. Installing is idempotent, so wrapping an app twice
    installs one hook.
    """
    names = set()
    for _, target in walk(app):
        found = _adapter(target)
        if found is not None:
            found[1].install(target)
            names.add(found[0])
    return ",".join(sorted(names)) or None


def mount_prefixes(app: Any) -> frozenset[str]:
    """The mount prefixes under which :func:`walk` finds apps: a route label's closed set."""
    return frozenset(prefix for prefix, _ in walk(app) if prefix.startswith("/"))


def mount_prefix(mounts: Collection[str], base: str, script_name: str) -> str:
    """The prefix a route label keeps from the ``script_name`` an adapter saw.

    ``base``, the ``SCRIPT_NAME`` the request arrived with, is the server's: dropped. Of the
    rest only a known mount prefix is kept (the longest that ends it): a prefix set from a
    header (``ProxyFix(x_prefix=1)`` inside the middleware) never makes a new label.
    """
    if not isinstance(script_name, str) or not mounts:
        return ""
    if script_name.startswith(base):
        script_name = script_name[len(base) :]
    return max((mount for mount in mounts if script_name.endswith(mount)), key=len, default="")
