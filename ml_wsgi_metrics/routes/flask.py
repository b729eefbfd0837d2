"""Flask adapter: the route template comes from Flask's own match (``request.url_rule``)."""

from __future__ import annotations

from typing import Any

from flask import Flask, request

from . import set_route

__all__ = ["handles", "install"]


def _name_route(endpoint: str | None, values: dict[str, Any] | None) -> None:
    rule = request.url_rule
    if rule is not None:
        set_route(request.environ, rule.rule)


def handles(app: Any) -> bool:
    return isinstance(app, Flask)


def install(app: Flask) -> None:
    """Register a URL value preprocessor, first in line, that names the matched rule.

    Flask runs it after routing and before ``before_request`` functions, for every request.
    """
    preprocessors = app.url_value_preprocessors.setdefault(None, [])
    if _name_route not in preprocessors:
        preprocessors.insert(0, _name_route)
