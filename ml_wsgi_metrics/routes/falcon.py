"""Falcon adapter: the route template comes from Falcon's own match (``req.uri_template``)."""

from __future__ import annotations

from typing import Any

import falcon
import falcon.asgi

from . import set_route

__all__ = ["handles", "install"]


class _RouteNamer:
    """Middleware naming the matched template once the response is ready.

    ``process_response`` runs for every request, even when another middleware completed the
    response in ``process_resource`` (an auth check, say) or the responder raised; a
    ``process_resource`` hook would miss those. Falcon sets ``uri_template`` only when a route
    matched (a 405 keeps its template); sinks, static routes and 404s leave it ``None``.
    """

    __slots__ = ()

    def process_response(
        self, req: falcon.Request, resp: falcon.Response, resource: object, req_succeeded: bool
    ) -> None:
        template = req.uri_template
        if template is not None:
            set_route(req.env, template)


def handles(app: Any) -> bool:
    return isinstance(app, falcon.App) and not isinstance(app, falcon.asgi.App)


def install(app: falcon.App) -> None:
    """Append the naming middleware with ``app.add_middleware`` (once)."""
    if not any(isinstance(mw, _RouteNamer) for mw in app._unprepared_middleware):
        app.add_middleware(_RouteNamer())
