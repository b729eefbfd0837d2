"""``MetricsMiddleware``: times and counts every request of any WSGI app."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry

from . import _settings, routes
from ._response import (
    METHODS,
    RequestRecord,
    StartResponse,
    TimedResponse,
    instrumentation_failed,
)
from .exposition import MetricsExposition
from .metrics import DEFAULT_DURATION_BUCKETS, DEFAULT_SIZE_BUCKETS, RequestMetrics, shared
from .routes import REQUEST_KEY, RouteResolver

__all__ = ["METHODS", "MetricsMiddleware", "stacked_middlewares"]

log = logging.getLogger("ml_wsgi_metrics")

WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


def _checked(
    app: object,
    metrics_path: str | None,
    route_resolver: RouteResolver | None,
    excluded_paths: Iterable[str],
) -> frozenset[str]:
    """Raise ``ValueError`` naming the first bad argument; the excluded paths."""
    if not callable(app):
        raise ValueError(f"app: {app!r} is not a WSGI callable")
    if metrics_path is not None and not metrics_path.startswith("/"):
        raise ValueError(f"metrics_path: {metrics_path!r} must start with '/'")
    if route_resolver is not None and not callable(route_resolver):
        raise ValueError("route_resolver: must be a callable taking the WSGI environ")
    excluded = frozenset(excluded_paths)
    if any(not isinstance(path, str) or not path.startswith("/") for path in excluded):
        raise ValueError(f"excluded_paths: every path must start with '/', got {excluded!r}")
    return excluded


class MetricsMiddleware:
    """Wrap a WSGI app to record request metrics and serve ``/metrics``.

    ``route`` labels are route *templates* named by the app's framework adapter (Flask,
    Django, Falcon, Bottle and Pyramid are detected), by ``route_resolver`` for anything
    else, or :data:`~ml_wsgi_metrics.routes.UNMATCHED`. Wrapping an app twice counts once:
    the outermost middleware measures, the inner ones pass requests through. Stacked
    middlewares (found through ``ProxyFix``, ``DispatcherMiddleware``...) share the strictest
    of their metrics protections, on every metrics path of the stack; two different tokens
    raise ``ValueError``.

    :param registry: where the metrics are registered (default: prometheus_client's).
    :param namespace: a prefix for every metric name.
    :param const_labels: labels added to every series, e.g. ``{"service": "churn"}``.
    :param metrics_path: the path serving the metrics; ``None`` serves none.
    :param excluded_paths: paths not measured (health checks).
    :param route_resolver: ``environ -> template or None``, called as each request arrives.
    :param group_status_codes: label statuses ``2xx``... instead of ``200``...
    :param metrics_token: serve metrics only with ``Authorization: Bearer <token>``.
    :param metrics_allowed_networks: serve metrics only to these networks (CIDR strings).
    :param count_metrics_requests: also measure the scrapes themselves.
    """

    #: The per-request record: the C one when built, else the pure-Python one.
    response_class: Callable[[RequestMetrics, dict[str, Any], StartResponse], RequestRecord] = (
        TimedResponse
    )

    def __init__(
        self,
        app: WSGIApp,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str | None = None,
        const_labels: Mapping[str, str] | None = None,
        duration_buckets: Iterable[float] = DEFAULT_DURATION_BUCKETS,
        size_buckets: Iterable[float] = DEFAULT_SIZE_BUCKETS,
        metrics_path: str | None = "/metrics",
        excluded_paths: Iterable[str] = (),
        route_resolver: RouteResolver | None = None,
        group_status_codes: bool = False,
        metrics_token: str | None = None,
        metrics_allowed_networks: Iterable[str] | str | None = None,
        count_metrics_requests: bool = False,
    ) -> None:
        excluded = _checked(app, metrics_path, route_resolver, excluded_paths)
        if namespace is None:
            namespace = _settings.NAMESPACE.get()
        registry = REGISTRY if registry is None else registry
        self.app = app
        self.metrics: RequestMetrics = shared(
            RequestMetrics,
            registry,
            namespace=namespace,
            const_labels=dict(sorted((const_labels or {}).items())),
            duration_buckets=tuple(duration_buckets),
            size_buckets=tuple(size_buckets),
            group_status_codes=group_status_codes,
        )
        self.exposition = MetricsExposition(
            registry,
            namespace=namespace,
            token=metrics_token,
            allowed_networks=metrics_allowed_networks,
        )
        self.metrics_path = metrics_path
        self._unmeasured_paths = self._stack(excluded, count_metrics_requests)
        self._name_routes(route_resolver)

    def _stack(self, excluded: frozenset[str], count_metrics_requests: bool) -> frozenset[str]:
        """Share protections with the middlewares inside; the paths not measured."""
        stacked = stacked_middlewares(self.app)
        self._share_protection([inner for _, inner in stacked])
        # Scrapes of a middleware inside are passed to it, unmeasured, and served there.
        inner_paths = {
            prefix + inner.metrics_path for prefix, inner in stacked if inner.metrics_path
        }
        if count_metrics_requests or self.metrics_path is None:
            return excluded | inner_paths
        return excluded | inner_paths | {self.metrics_path}

    def _name_routes(self, route_resolver: RouteResolver | None) -> None:
        """The resolver given, else the adapter of the app's framework (a warning if none)."""
        self.route_resolver = route_resolver
        self.adapter = None if route_resolver else routes.install_adapter(self.app)
        self.metrics.mount_prefixes.update(routes.mount_prefixes(self.app))
        # Only requests the app's framework names can skip the check in _name_route.
        self._adapter_names_routes = route_resolver is None and (
            self.metrics_path is None or self.metrics_path in self._unmeasured_paths
        )
        if route_resolver is None and self.adapter is None:
            log.warning(
                "ml_wsgi_metrics: no route adapter for %r; every request is labelled %r. "
                "Pass route_resolver= to name routes.",
                self.app,
                routes.UNMATCHED,
            )

    def _share_protection(self, stacked: list[MetricsMiddleware]) -> None:
        """Give this and every middleware inside the strictest of their protections."""
        protection = self.exposition.protection
        for inner in stacked:
            protection = protection.combined(inner.exposition.protection)
        for middleware in (self, *stacked):
            middleware.exposition.protection = protection

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in self._unmeasured_paths or REQUEST_KEY in environ:
            return self._pass_through(path, environ, start_response)
        timed = self.response_class(self.metrics, environ, start_response)  # into the environ
        app = self.app if self._adapter_names_routes else self._name_route(path, environ, timed)
        try:
            iterable = app(environ, timed.start_response)
        except BaseException as error:
            timed.failed(error)
            raise
        return timed.respond(iterable, environ)

    def _pass_through(
        self, path: str, environ: dict[str, Any], start_response: StartResponse
    ) -> Iterable[bytes]:
        """Requests not measured here: excluded, unmeasured scrapes, or measured outside."""
        if path == self.metrics_path and REQUEST_KEY not in environ:
            return self.exposition(environ, start_response)
        return self.app(environ, start_response)

    def _name_route(
        self, path: str, environ: dict[str, Any], timed: RequestRecord
    ) -> WSGIApp | MetricsExposition:
        """Name the route before the app runs (scrapes, ``route_resolver``); the app to call."""
        if path == self.metrics_path:
            timed.set_route(path)
            return self.exposition
        if self.route_resolver is not None:
            try:
                route = self.route_resolver(environ)
            except Exception as error:
                instrumentation_failed(timed, "route_resolver", error)
            else:
                if route is not None:
                    timed.set_route(route)
        return self.app


def stacked_middlewares(app: Any) -> list[tuple[str, MetricsMiddleware]]:
    """``(mount prefix, middleware)`` of every ``MetricsMiddleware`` serving within ``app``
    (``app`` included), found by :func:`~ml_wsgi_metrics.routes.walk`."""
    return [
        (prefix, found)
        for prefix, found in routes.walk(app)
        if isinstance(found, MetricsMiddleware)
    ]
