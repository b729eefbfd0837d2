"""Bottle adapter: the route template comes from Bottle's own match (``bottle.route``)."""

from __future__ import annotations

from typing import Any

import bottle

from . import set_route

__all__ = ["handles", "install"]


class _RouteNamer:
    """An ``after_request`` hook of one app: it names the route that app matched.

    Bottle fires ``after_request`` after routing and the callback, whatever their outcome
    (``before_request`` fires *before* routing). A 404 or 405 leaves ``bottle.route`` unset.
    A Bottle app mounted as a plain WSGI app runs its own ``_handle`` on the same environ and
    overwrites ``bottle.app``/``bottle.route``, so each hook names only requests its own app
    handled, and skips the parent's catch-all mount route.
    """

    __slots__ = ("app",)

    def __init__(self, app: bottle.Bottle) -> None:
        self.app = app

    def __call__(self) -> None:
        environ = bottle.request.environ
        route = environ.get("bottle.route")
        if (
            route is not None
            and environ.get("bottle.app") is self.app
            and "mountpoint.target" not in route.config
        ):
            set_route(environ, route.rule)


def handles(app: Any) -> bool:
    return isinstance(app, bottle.Bottle)


def install(app: bottle.Bottle) -> None:
    """Add the hook to ``app`` and to every Bottle app mounted in it by then, once each.

    ``app.mount('/p/', child)`` copies the child's routes (rule already prefixed) into the
    parent, so the parent's hook names them; a child mounted as WSGI gets its own hook.
    """
    if any(isinstance(hook, _RouteNamer) for hook in app._hooks["after_request"]):
        return
    app.add_hook("after_request", _RouteNamer(app))
    for route in app.routes:
        target = route.config.get("mountpoint.target")  # nested route config is flattened
        if isinstance(target, bottle.Bottle):
            install(target)
