"""Flask adapter: the route template comes from Flask's own match (``request.url_rule``).

Flask stores the matched rule on its request object right after routing. The adapter gives the
app a request class whose ``url_rule`` attribute reports that rule as it is stored: no URL
matching of its own and no hook for Flask to call on every request. Reading the attribute,
which Flask does several times a request, stays a C-level attribute lookup.
"""

from __future__ import annotations

from operator import attrgetter
from typing import Any

from flask import Flask
from werkzeug.routing import Rule

from . import REQUEST_KEY

__all__ = ["handles", "install"]

_STORED = "_ml_wsgi_metrics_url_rule"


def _store_rule(request: Any, rule: Rule | None) -> None:
    request._ml_wsgi_metrics_url_rule = rule  # _STORED
    if rule is not None:  # set_route(), inlined: this runs on every request
        environ = request.environ
        timed = environ.get(REQUEST_KEY)
        if timed is not None:
            timed.set_route(rule.rule, environ.get("SCRIPT_NAME", ""))


_reported_rule = property(attrgetter(_STORED), _store_rule, doc="The matched URL rule.")


def handles(app: Any) -> bool:
    return isinstance(app, Flask)


def install(app: Flask) -> None:
    """Subclass the app's request class once so that routing names the route."""
    if app.request_class.__dict__.get("url_rule") is _reported_rule:
        return
    app.request_class = type(
        app.request_class.__name__,
        (app.request_class,),
        {"url_rule": _reported_rule, _STORED: None, "__module__": app.request_class.__module__},
    )
