"""Flask adapter: the route template comes from Flask's own match (``request.url_rule``).

Flask stores the matched rule on its request object right after routing. The adapter gives the
app a request class whose ``url_rule`` attribute reports that rule as it is stored: no URL
matching of its own and no hook for Flask to call on every request.
"""

from __future__ import annotations

from typing import Any

from flask import Flask
from werkzeug.routing import Rule

from . import set_route

__all__ = ["handles", "install"]


class _ReportedRule:
    """A data descriptor standing in for ``Request.url_rule``: reports the rule when set."""

    def __get__(self, request: Any, owner: type | None = None) -> Rule | None:
        if request is None:
            return self  # type: ignore[return-value]
        return request.__dict__.get("url_rule")

    def __set__(self, request: Any, rule: Rule | None) -> None:
        request.__dict__["url_rule"] = rule
        if rule is not None:
            set_route(request.environ, rule.rule)


def handles(app: Any) -> bool:
    return isinstance(app, Flask)


def install(app: Flask) -> None:
    """Subclass the app's request class once so that routing names the route."""
    if isinstance(app.request_class.__dict__.get("url_rule"), _ReportedRule):
        return
    app.request_class = type(
        app.request_class.__name__,
        (app.request_class,),
        {"url_rule": _ReportedRule(), "__module__": app.request_class.__module__},
    )
