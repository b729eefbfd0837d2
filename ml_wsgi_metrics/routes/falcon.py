"""Falcon adapter: the route template comes from Falcon's own match (``req.uri_template``)."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi

from . import set_route

__all__ = ["handles", "install"]


class _RouteNamer:
    """Middleware naming the matched template as the resource is about to be called.

    Falcon calls ``process_resource`` only when a route matched (a 405 keeps its template;
    404s, sinks and static routes have no ``uri_template`` and stay unnamed). Naming before
    the responder lets the per-route in-progress gauge see the request. A middleware added
    earlier may complete the response in its own ``process_resource`` (an auth check, say),
    which skips ours: ``process_response`` names those, and is a single check otherwise.
    """

    __slots__ = ()

    def process_resource(
        self, req: falcon.Request, resp: falcon.Response, resource: object, params: dict[str, Any]
    ) -> None:
        template = req.uri_template
        if template is not None:  # a custom router may not report it
            set_route(req.env, template)

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        if resp.complete and req.uri_template is not None:
            set_route(req.env, req.uri_template)


def handles(app: Any) -> bool:
    return isinstance(app, falcon.App) and not isinstance(app, falcon.asgi.App)


def install(app: falcon.App[Any, Any]) -> None:
    """Append the naming middleware with ``app.add_middleware`` (once)."""
    if not any(isinstance(mw, _RouteNamer) for mw in app._unprepared_middleware):
        app.add_middleware(_RouteNamer())
