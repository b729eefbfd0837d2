"""Pyramid adapter: the route template comes from Pyramid's own match (``matched_route``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pyramid.router import Router

from . import set_route

__all__ = ["handles", "install"]


class _RouteNamingTween:
    """The outermost tween: after the request is handled, name the route Pyramid matched.

    Reading ``matched_route`` in ``finally`` names the route even when traversal or a view
    raised or a predicate mismatch gave a 404. Traversal-only apps and unmatched URLs have
    no ``matched_route`` and stay unnamed. Unlike a ``ContextFound`` subscriber, it does not
    switch on Pyramid's event notifications for apps that have no subscribers.
    """

    __slots__ = ("handler",)

    def __init__(self, handler: Callable[[Any], Any]) -> None:
        self.handler = handler

    def __call__(self, request: Any) -> Any:
        try:
            return self.handler(request)
        finally:
            route = request.__dict__.get("matched_route")
            if route is not None:
                pattern = route.pattern
                set_route(request.environ, pattern if pattern[:1] == "/" else "/" + pattern)


def handles(app: Any) -> bool:
    return isinstance(app, Router)


def install(app: Router) -> None:
    """Wrap the router's tween chain (``router.handle_request``), as Pyramid itself does.

    Tweens are composed when the router is built, so one added to the registry later would
    never run; wrapping the composed chain is the equivalent for an existing router.
    """
    if not isinstance(app.handle_request, _RouteNamingTween):
        app.handle_request = _RouteNamingTween(app.handle_request)
