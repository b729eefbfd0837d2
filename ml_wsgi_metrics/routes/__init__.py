"""Route adapters: each framework names the matched route *template* of a request.

The core knows WSGI only. An adapter hooks into its framework's own URL matching (so the URL
map is never matched twice) and calls :func:`set_route` with the template, e.g.
``/items/<int:id>``. Requests that no route matched are labelled :data:`UNMATCHED`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any, Protocol

__all__ = [
    "REQUEST_KEY",
    "UNMATCHED",
    "RouteResolver",
    "install_adapter",
    "set_route",
]

log = logging.getLogger("ml_wsgi_metrics")

#: Environ key under which the middleware keeps the request being measured.
REQUEST_KEY = "ml_wsgi_metrics.request"

#: The one ``route`` label value shared by every request that matched no route.
UNMATCHED = "<unmatched>"

#: A plain hook for any other framework: ``environ -> template`` (``None`` when unmatched).
RouteResolver = Callable[[dict[str, Any]], "str | None"]


class _NamedRequest(Protocol):
    def set_route(self, route: str) -> None: ...


def set_route(environ: dict[str, Any], template: str) -> None:
    """Name the route template matched for this request (called by adapters).

    The template is taken relative to the application's mount point: ``SCRIPT_NAME`` as seen
    by the adapter is prefixed, so two apps mounted under one middleware stay distinct.
    Without a :class:`~ml_wsgi_metrics.MetricsMiddleware` around the app this does nothing.
    """
    request: _NamedRequest | None = environ.get(REQUEST_KEY)
    if request is not None:
        request.set_route(environ.get("SCRIPT_NAME", "") + template)


# Framework adapters, tried in order; each module has ``handles(app)`` and ``install(app)``.
_ADAPTERS = ("flask", "django", "falcon", "bottle", "pyramid")


def _framework_app(app: Any) -> Any:
    """The framework object behind ``app`` (``flask_app.wsgi_app`` is a bound method)."""
    return getattr(app, "__self__", app)


def _mounted_apps(app: Any) -> list[Any] | None:
    """The apps mounted in a werkzeug ``DispatcherMiddleware``, else ``None``."""
    if type(app).__module__ == "werkzeug.middleware.dispatcher" and hasattr(app, "mounts"):
        return [app.app, *app.mounts.values()]
    return None


def install_adapter(app: Any, _depth: int = 0) -> str | None:
    """Install the route adapter matching ``app``'s framework; return its name, or ``None``.

    Middlewares in between (``ProxyFix(app)``, another ``MetricsMiddleware``: anything keeping
    the app it wraps in ``.app``) are looked through. Installing is idempotent, so wrapping an
    app twice installs one hook.
    """
    target = _framework_app(app)
    mounted = _mounted_apps(target)
    if mounted is not None:  # werkzeug's DispatcherMiddleware: each mounted app names its routes
        found = {install_adapter(sub_app) for sub_app in mounted} - {None}
        return ",".join(sorted(found)) or None  # type: ignore[arg-type]
    packages = {cls.__module__.partition(".")[0] for cls in type(target).__mro__}
    for name in _ADAPTERS:
        if name not in packages:
            continue
        adapter = importlib.import_module(f"{__name__}.{name}")
        if adapter.handles(target):
            adapter.install(target)
            return name
    inner = getattr(target, "app", None)  # a middleware (werkzeug's convention, and ours)
    if inner is not None and inner is not target and _depth < 8:
        return install_adapter(inner, _depth + 1)
    return None
