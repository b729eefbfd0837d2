"""Django adapter: the route template comes from Django's own resolve (``resolver_match.route``)."""

from __future__ import annotations

from typing import Any

from django.core.handlers.wsgi import WSGIHandler

from . import set_route

__all__ = ["handles", "install"]


def _name_route(request: Any, view_func: Any, view_args: Any, view_kwargs: Any) -> None:
    """A ``process_view`` hook: Django calls it after a successful resolve, before the view."""
    route = request.resolver_match.route
    if route is not None:
        set_route(request.META, "/" + route)


def handles(app: Any) -> bool:
    return isinstance(app, WSGIHandler)


def install(app: WSGIHandler) -> None:
    """Put the hook first in the handler's view-middleware list (filled at construction).

    Django runs it only when a URL pattern matched (a ``Resolver404`` skips view middleware),
    before any other ``process_view`` can answer early. ``request.META`` is the WSGI environ.
    ``re_path`` patterns are named by their regex, which is bounded too.
    """
    hooks = app._view_middleware
    if _name_route not in hooks:
        hooks.insert(0, _name_route)
