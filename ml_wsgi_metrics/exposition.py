"""The ``/metrics`` endpoint: text or OpenMetrics by ``Accept``, gzip, optional protection.

In multiprocess mode every scrape builds a fresh registry from all workers' files, so every
worker answers with the same merged totals.
"""

from __future__ import annotations

import gzip
import hmac
import ipaddress
import json
import os
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector

from . import multiprocess
from ._retired import without_retired
from .process import WorkerProcessCollector

__all__ = ["MetricsExposition", "scrape_registry"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def scrape_registry(registry: CollectorRegistry, namespace: str = "") -> CollectorRegistry:
    """The registry to expose now: ``registry``, or all workers' files in multiprocess mode."""
    directory = multiprocess.active_directory()
    if directory is None:
        return registry
    merged = CollectorRegistry(auto_describe=False)
    merged.register(without_retired(MultiProcessCollector(None, path=directory), directory))
    merged.register(WorkerProcessCollector(directory, namespace))
    return merged


def _parse_networks(networks: Iterable[str] | str | None) -> tuple[Network, ...] | None:
    if networks is None:
        return None
    if isinstance(networks, str):
        networks = [part for part in networks.replace(",", " ").split() if part]
    try:
        return tuple(ipaddress.ip_network(network, strict=False) for network in networks)
    except ValueError as error:
        raise ValueError(f"metrics_allowed_networks: {error}") from None


class MetricsExposition:
    """A WSGI app serving the metrics of ``registry`` (or of all workers' files)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "",
        token: str | None = None,
        allowed_networks: Iterable[str] | str | None = None,
    ) -> None:
        token = token if token is not None else os.environ.get("ML_WSGI_METRICS_TOKEN")
        if token is not None and not token.strip():
            raise ValueError("metrics_token: an empty token would protect nothing")
        if allowed_networks is None:
            allowed_networks = os.environ.get("ML_WSGI_METRICS_ALLOWED_NETWORKS")
        self._registry = registry
        self._namespace = namespace
        self._token = token.encode() if token else None
        self._networks = _parse_networks(allowed_networks)

    def _refusal(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        if self._networks is not None:
            try:
                address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
            except ValueError:
                address = None
            if address is None or not any(address in network for network in self._networks):
                return "403 Forbidden", "metrics are not served to this address"
        if self._token is not None:
            scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                return "401 Unauthorized", "a valid bearer token is required"
        return None

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        refusal = self._refusal(environ)
        if refusal is not None:
            status, message = refusal
            body = json.dumps({"error": message}).encode()
            headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            if status.startswith("401"):
                headers.append(("WWW-Authenticate", 'Bearer realm="metrics"'))
            start_response(status, headers)
            return [body]
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD")])
            return [b""]
        encoder, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        output = encoder(scrape_registry(self._registry, self._namespace))
        headers = [("Content-Type", content_type)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            output = gzip.compress(output)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(output))))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [output]
