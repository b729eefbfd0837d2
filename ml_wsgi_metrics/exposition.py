"""The ``/metrics`` endpoint: text or OpenMetrics by ``Accept``, gzip, optional protection.

In multiprocess mode every scrape builds a fresh registry from all workers' files, so every
worker answers with the same merged totals. :func:`serve_metrics` serves the same endpoint on a
port of its own (a gunicorn master's, say), with the same protection.
"""

from __future__ import annotations

import gzip
import hmac
import ipaddress
import json
import logging
import os
import socket
import threading
import weakref
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from . import _errors, _settings, multiprocess
from ._retired import without_retired
from .process import WorkerProcessCollector

__all__ = [
    "MetricsExposition",
    "MetricsProtection",
    "MetricsServer",
    "exposition_bytes",
    "scrape_registry",
    "serve_metrics",
]

log = logging.getLogger("ml_wsgi_metrics")

#: Fast compression: at level 9 (gzip's default) 5 MB of text take longer than merging them;
#: level 1 is about 8x faster for about a third more bytes.
GZIP_LEVEL = 1

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def scrape_registry(registry: CollectorRegistry, namespace: str = "") -> CollectorRegistry:
    """The registry to expose now: ``registry``, or all processes' files in multiprocess mode
    (this package's slot files, or prometheus_client's own files when only
    ``PROMETHEUS_MULTIPROC_DIR`` is set)."""
    directory = multiprocess.merged_directory()
    if directory is None:
        return registry
    merged = CollectorRegistry(auto_describe=False)
    merged.register(without_retired(multiprocess.SlotFilesCollector(directory), directory))
    if multiprocess.active_directory() is not None:  # the pid files of this package's hooks
        merged.register(WorkerProcessCollector(directory, namespace))
    return merged


def exposition_bytes(
    registry: CollectorRegistry, encoder: Callable[[Any], bytes], namespace: str = ""
) -> bytes:
    """What :func:`scrape_registry` would encode: in multiprocess mode the directory's merge
    (:mod:`._merge`: shared by concurrent scrapes, only values re-read), then the workers'
    process metrics."""
    directory = multiprocess.merged_directory()
    if directory is None:
        return encoder(registry)
    multiprocess.retry_unavailable()
    _errors.export_kept()
    from ._merge import merger_for  # numpy: loaded at the first scrape, not at import

    ours = multiprocess.active_directory() is not None  # slot files, not prometheus_client's
    merged = merger_for(directory, multiprocess.SLOT_FILE, share_files=ours).text(encoder)
    others = CollectorRegistry(auto_describe=False)
    if ours:  # the pid files of this package's hooks
        others.register(WorkerProcessCollector(directory, namespace))
    return merged + encoder(others)


def _mapped_to_v4(network: Network) -> Network:
    """``::ffff:10.0.0.0/104`` as ``10.0.0.0/8``: the form a dual-stack server's clients take."""
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network(f"{mapped}/{network.prefixlen - 96}")
    return network


def _parse_networks(networks: Iterable[str] | str | None) -> frozenset[Network] | None:
    if networks is None:
        return None
    if isinstance(networks, str):
        networks = [part for part in networks.replace(",", " ").split() if part]
    try:
        return frozenset(
            _mapped_to_v4(ipaddress.ip_network(network, strict=False)) for network in networks
        )
    except ValueError as error:
        raise ValueError(f"metrics_allowed_networks: {error}") from None


def _parse_token(token: str | None) -> bytes | None:
    """The token without surrounding whitespace (a secret file's newline); ``None``: no token."""
    if token is None:
        return None
    token = token.strip()
    if not token:
        raise ValueError("metrics_token: an empty token would protect nothing")
    if not all("!" <= character <= "~" for character in token):
        raise ValueError(
            "metrics_token: use printable ASCII without spaces; an Authorization header "
            "cannot carry this token reliably"
        )
    return token.encode()


def _client_address(environ: dict[str, Any]) -> IPAddress | None:
    """``REMOTE_ADDR``, an IPv4-mapped IPv6 address (``::ffff:10.0.0.5``) as IPv4."""
    try:
        address = ipaddress.ip_address(environ.get("REMOTE_ADDR", ""))
    except ValueError:
        return None
    if address.version == 6 and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class MetricsProtection:
    """Who may read the metrics: a bearer token, and allow-lists an address must all be in.

    Middlewares stacked around one app share the :meth:`combined` protection of them all.
    The address checked is ``REMOTE_ADDR``, as the server (or a middleware outside) set it.
    """

    __slots__ = ("_network_lists", "_token")

    def __init__(
        self, token: str | None = None, allowed_networks: Iterable[str] | str | None = None
    ) -> None:
        self._token = _parse_token(token)
        networks = _parse_networks(allowed_networks)
        self._network_lists: tuple[frozenset[Network], ...] = (
            () if networks is None else (networks,)
        )

    @classmethod
    def from_settings(
        cls, token: str | None = None, allowed_networks: Iterable[str] | str | None = None
    ) -> MetricsProtection:
        """The given settings, else ``$ML_WSGI_METRICS_TOKEN`` and
        ``$ML_WSGI_METRICS_ALLOWED_NETWORKS``."""
        if token is None:
            token = _settings.TOKEN.get()
        if allowed_networks is None:
            allowed_networks = _settings.ALLOWED_NETWORKS.get()
        return cls(token, allowed_networks)

    @property
    def protects(self) -> bool:
        """Whether anything is required: a token or an allow-list."""
        return self._token is not None or bool(self._network_lists)

    def combined(self, other: MetricsProtection) -> MetricsProtection:
        """The strictest of both: either token (two different ones are refused), every list."""
        if self._token and other._token and not hmac.compare_digest(self._token, other._token):
            raise ValueError(
                "metrics_token: MetricsMiddleware stacked around one app (in the app and in "
                "the server's config, say) set different tokens; set one token"
            )
        combined = MetricsProtection()
        combined._token = self._token or other._token
        combined._network_lists = self._network_lists + tuple(
            networks for networks in other._network_lists if networks not in self._network_lists
        )
        return combined

    def laxer_setting(self, other: MetricsProtection) -> str | None:
        """The first setting in which this protects less than ``other`` does, else ``None``."""
        if other._token is not None and (
            self._token is None or not hmac.compare_digest(self._token, other._token)
        ):
            return "metrics_token"
        if any(networks not in self._network_lists for networks in other._network_lists):
            return "metrics_allowed_networks"
        return None

    def refusal(self, environ: dict[str, Any]) -> tuple[str, str] | None:
        """``(status, message)`` when this request may not read the metrics, else ``None``."""
        if self._network_lists:
            address = _client_address(environ)
            if address is None or not all(
                any(address in network for network in networks) for networks in self._network_lists
            ):
                return "403 Forbidden", "metrics are not served to this address"
        if self._token is not None:
            scheme, _, given = environ.get("HTTP_AUTHORIZATION", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), self._token
            ):
                return "401 Unauthorized", "a valid bearer token is required"
        return None


class MetricsExposition:
    """A WSGI app serving the metrics of ``registry`` (or of all workers' files).

    :param token: require ``Authorization: Bearer <token>`` (default ``$ML_WSGI_METRICS_TOKEN``).
    :param allowed_networks: serve only to these networks (default
        ``$ML_WSGI_METRICS_ALLOWED_NETWORKS``).
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        namespace: str = "",
        token: str | None = None,
        allowed_networks: Iterable[str] | str | None = None,
    ) -> None:
        self._registry = registry
        self._namespace = namespace
        self.protection = MetricsProtection.from_settings(token, allowed_networks)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        refusal = self.protection.refusal(environ)
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
        output = exposition_bytes(self._registry, encoder, self._namespace)
        headers = [("Content-Type", content_type)]
        if "gzip" in environ.get("HTTP_ACCEPT_ENCODING", ""):
            output = gzip.compress(output, compresslevel=GZIP_LEVEL)
            headers.append(("Content-Encoding", "gzip"))
        headers.append(("Content-Length", str(len(output))))
        start_response("200 OK", headers)
        return [b""] if environ.get("REQUEST_METHOD") == "HEAD" else [output]


class _RequestHandler(WSGIRequestHandler):
    timeout = 30  # seconds a client may stall a read or a write before it is dropped

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("ml_wsgi_metrics: metrics port: " + format, *args)


class MetricsServer(ThreadingMixIn, WSGIServer):
    """A small threaded HTTP server for metrics on a port of their own (see :func:`serve_metrics`).

    Each connection gets a daemon thread; a forked child closes its copy of the listening
    socket, so only the process that started the server serves the port.
    """

    daemon_threads = True

    def __init__(self, address: str, port: int, app: Callable[..., Iterable[bytes]]) -> None:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        self.address_family = family
        super().__init__((address, port), _RequestHandler)
        self.set_app(app)
        self._thread = threading.Thread(
            target=self.serve_forever, name="ml_wsgi_metrics-port", daemon=True
        )
        child_closes = weakref.WeakMethod(self._close_in_child)
        os.register_at_fork(after_in_child=lambda: (close := child_closes()) and close())

    def _close_in_child(self) -> None:
        self.socket.close()  # the parent's socket and thread are untouched

    def stop(self) -> None:
        """Stop serving and close the port (idempotent)."""
        if self._thread.is_alive():
            self.shutdown()
            self._thread.join()
        self.server_close()

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_metrics(
    address: str, port: int, exposition: MetricsExposition, path: str = "/metrics"
) -> MetricsServer:
    """Serve ``exposition`` at ``http://address:port/path`` from a daemon thread, now.

    Other paths answer 404. The exposition's protection (token, allow-list), formats, gzip,
    HEAD and 405 apply as on any other path serving metrics. ``port`` 0 picks a free one
    (``server.server_port``). Stop it with ``server.stop()`` or a ``with`` block.
    """

    def metrics_only(
        environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != path:
            body = json.dumps({"error": f"metrics are served at {path}"}).encode()
            start_response(
                "404 Not Found",
                [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return exposition(environ, start_response)

    server = MetricsServer(address, port, metrics_only)
    server._thread.start()
    return server
