"""Pyramid adapter: the route template comes from Pyramid's own match (``matched_route``)."""

from __future__ import annotations

from typing import Any

from pyramid.router import Router

from . import set_route

__all__ = ["handles", "install"]


class _RouteNamingMapper:
    """Stands in for the router's routes mapper: matches with it, then names the route.

    The router calls its mapper once per request, before traversal and the view, so the
    route is named even when the root factory, a predicate or the view fails afterwards.
    Everything else is delegated to the real mapper.
    """

    __slots__ = ("mapper",)

    def __init__(self, mapper: Any) -> None:
        self.mapper = mapper

    def __call__(self, request: Any) -> dict[str, Any]:
        info: dict[str, Any] = self.mapper(request)
        route = info["route"]
        if route is not None:
            pattern = route.pattern
            set_route(request.environ, pattern if pattern[:1] == "/" else "/" + pattern)
        return info

    def __getattr__(self, name: str) -> Any:
        return getattr(self.mapper, name)


def handles(app: Any) -> bool:
    return isinstance(app, Router)


def install(app: Router) -> None:
    """Wrap ``router.routes_mapper``, the one the router matches requests with.

    Costs one call per request, and unlike a ``ContextFound`` subscriber it does not switch
    on Pyramid's four per-request event notifications for apps that have no subscribers. URL
    generation uses the registry's mapper and is untouched. An app without routes
    (traversal only) has no mapper: its requests stay unnamed.
    """
    mapper = app.routes_mapper
    if mapper is not None and not isinstance(mapper, _RouteNamingMapper):
        app.routes_mapper = _RouteNamingMapper(mapper)
