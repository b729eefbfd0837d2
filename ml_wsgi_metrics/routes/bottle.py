"""Bottle adapter: the route template comes from Bottle's own match (the route's ``rule``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import bottle

from . import set_route

__all__ = ["handles", "install", "mounts"]


class _RouteNamer:
    """A Bottle plugin: each route's callback first names that route's rule.

    Bottle calls a route's callback only after its router matched (a 404 or 405 never gets
    here), so naming costs nothing for unmatched requests and happens before the callback
    runs. The rule is read per request, so a route re-prefixed by ``mount`` is named right.
    Routes declared with ``skip=True`` (or ``skip=['ml_wsgi_metrics']``) stay unnamed.
    """

    __slots__ = ()
    name = "ml_wsgi_metrics"
    api = 2

    def apply(self, callback: Callable[..., Any], route: bottle.Route) -> Callable[..., Any]:
        def named_route(*args: Any, **kwargs: Any) -> Any:
            set_route(bottle.request.environ, route.rule)
            return callback(*args, **kwargs)

        return named_route


_PLUGIN = _RouteNamer()


def handles(app: Any) -> bool:
    return isinstance(app, bottle.Bottle)


def mounts(app: bottle.Bottle) -> list[tuple[str, Any]]:
    """``(prefix, app)`` of the apps mounted in ``app`` as WSGI apps: Bottle moves the prefix
    into ``SCRIPT_NAME``. (A Bottle app mounted at ``'/p/'`` has its routes copied, rules
    prefixed: nothing moves.)"""
    found = {}
    for route in app.routes:
        target = route.config.get("mountpoint.target")
        if target is not None:
            found[route.config.get("mountpoint.prefix", "")] = target
    return list(found.items())


def install(app: bottle.Bottle) -> None:
    """Make the plugin the outermost of ``app`` and of every Bottle app mounted in it by then.

    Outermost, so an auth plugin that answers early does not hide the route. Routes copied
    in by ``app.mount('/p/', child)`` take their plugins from ``child``; a child mounted as a
    plain WSGI app matches on its own. Each app gets the plugin once.
    """
    _install(app, set())


def _install(app: bottle.Bottle, seen: set[int]) -> None:
    if id(app) in seen:
        return
    seen.add(id(app))
    if not any(isinstance(plugin, _RouteNamer) for plugin in app.plugins):
        app.plugins.insert(0, _PLUGIN)
        app.reset()  # re-apply plugins to routes already prepared
    for route in app.routes:
        if route.app is not app:
            _install(route.app, seen)
        target = route.config.get("mountpoint.target")  # nested route config is flattened
        if isinstance(target, bottle.Bottle):
            _install(target, seen)
