"""``/metrics``: formats by ``Accept``, gzip, HEAD, protection, per-worker process metrics."""

from __future__ import annotations

import gzip
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter
from support import http_request, listening_addresses

from ml_wsgi_metrics import MetricsMiddleware
from ml_wsgi_metrics.exposition import MetricsExposition, serve_metrics
from ml_wsgi_metrics.process import WorkerProcessCollector, remove_pid_file, write_pid_file

TOKEN = "s3cret-token"


@pytest.fixture
def served(registry: CollectorRegistry, hello: Any, call: Callable[..., Any]) -> Any:
    """A middleware whose registry has seen one request."""
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    call(app, "/r")
    return app


def scrape(call: Callable[..., Any], app: Any, **environ: Any) -> Any:
    return call(app, "/metrics", environ.pop("method", "GET"), **environ)


# -- formats --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "content_type", "openmetrics"),
    [
        pytest.param(None, "text/plain", False, id="no-accept"),
        pytest.param("text/plain", "text/plain", False, id="text"),
        pytest.param("*/*", "text/plain", False, id="anything"),
        pytest.param(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            "application/openmetrics-text",
            True,
            id="openmetrics",
        ),
        pytest.param(
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
            "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
            "application/openmetrics-text",
            True,
            id="prometheus-scraper-accept",
        ),
    ],
)
def test_format_follows_accept(
    accept: str | None,
    content_type: str,
    openmetrics: bool,
    served: Any,
    call: Callable[..., Any],
) -> None:
    headers = {"Accept": accept} if accept else {}
    response = scrape(call, served, headers=headers)

    assert response.code == 200
    assert response.header("Content-Type").startswith(content_type)
    assert response.header("Content-Length") == str(len(response.body))
    assert b'http_requests_total{method="GET",route="/r",status="200"} 1.0' in response.body
    assert response.body.endswith(b"# EOF\n") is openmetrics


@pytest.mark.parametrize(
    "accept",
    [
        pytest.param(None, id="text"),
        pytest.param("application/openmetrics-text; version=1.0.0", id="openmetrics"),
    ],
)
def test_gzip_when_asked(accept: str | None, served: Any, call: Callable[..., Any]) -> None:
    headers = {"Accept": accept} if accept else {}
    plain = scrape(call, served, headers=headers)
    zipped = scrape(call, served, headers={**headers, "Accept-Encoding": "gzip, deflate, br"})

    assert plain.header("Content-Encoding") is None
    assert zipped.header("Content-Encoding") == "gzip"
    assert zipped.header("Content-Type") == plain.header("Content-Type")
    assert zipped.header("Content-Length") == str(len(zipped.body))
    assert gzip.decompress(zipped.body) == plain.body


def test_head_sends_headers_only(served: Any, call: Callable[..., Any]) -> None:
    get = scrape(call, served)
    head = scrape(call, served, method="HEAD")
    assert head.code == 200
    assert head.body == b""
    assert head.header("Content-Type") == get.header("Content-Type")
    assert head.header("Content-Length") == str(len(get.body))


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_refused(method: str, served: Any, call: Callable[..., Any]) -> None:
    response = scrape(call, served, method=method)
    assert response.code == 405
    assert response.header("Allow") == "GET, HEAD"
    assert b"http_requests_total" not in response.body


def test_serves_its_own_registry_only(
    registry: CollectorRegistry, hello: Any, call: Callable[..., Any]
) -> None:
    Counter("mine", "Mine.", registry=registry).inc()
    Counter("elsewhere", "Elsewhere.", registry=CollectorRegistry()).inc()
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    body = scrape(call, app).body
    assert b"mine_total 1.0" in body
    assert b"elsewhere" not in body


# -- bearer token ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        pytest.param(None, 401, id="missing"),
        pytest.param("Bearer wrong", 401, id="wrong-token"),
        pytest.param(f"Bearer {TOKEN}x", 401, id="token-with-suffix"),
        pytest.param(f"Bearer {TOKEN[:-1]}", 401, id="token-prefix"),
        pytest.param(f"Basic {TOKEN}", 401, id="wrong-scheme"),
        pytest.param(TOKEN, 401, id="no-scheme"),
        pytest.param("Bearer ", 401, id="empty-token"),
        pytest.param(f"Bearer {TOKEN}", 200, id="right"),
        pytest.param(f"bearer {TOKEN}", 200, id="scheme-case-insensitive"),
    ],
)
def test_bearer_token(
    authorization: str | None,
    code: int,
    registry: CollectorRegistry,
    hello: Any,
    call: Callable[..., Any],
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", metrics_token=TOKEN
    )
    headers = {"Authorization": authorization} if authorization else {}
    response = scrape(call, app, headers=headers)

    assert response.code == code
    if code == 401:
        assert response.header("WWW-Authenticate") == 'Bearer realm="metrics"'
        assert b"http_requests_total" not in response.body
        assert TOKEN.encode() not in response.body
    else:
        assert response.header("WWW-Authenticate") is None
        assert response.header("Content-Type").startswith("text/plain")


def test_token_does_not_protect_the_app(
    registry: CollectorRegistry, hello: Any, call: Callable[..., Any]
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", metrics_token=TOKEN
    )
    assert call(app, "/r").body == b"hello"


def test_token_from_environment(
    monkeypatch: pytest.MonkeyPatch,
    registry: CollectorRegistry,
    hello: Any,
    call: Callable[..., Any],
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", TOKEN)
    app = MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r")
    assert scrape(call, app).code == 401
    assert scrape(call, app, headers={"Authorization": f"Bearer {TOKEN}"}).code == 200


def test_token_argument_wins_over_environment(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry, call: Callable[..., Any]
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", "from-env")
    exposition = MetricsExposition(registry, token=TOKEN)
    assert call(exposition, headers={"Authorization": "Bearer from-env"}).code == 401
    assert call(exposition, headers={"Authorization": f"Bearer {TOKEN}"}).code == 200


def test_empty_token_in_environment_is_refused(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", " ")
    with pytest.raises(ValueError, match=r"^metrics_token"):
        MetricsExposition(registry)


@pytest.mark.parametrize(
    "configured",
    [
        pytest.param(f"{TOKEN}\n", id="newline-from-a-file"),
        pytest.param(f"  {TOKEN}\r\n", id="crlf-and-spaces"),
        pytest.param(f"\t{TOKEN}", id="leading-tab"),
    ],
)
def test_token_with_surrounding_whitespace_matches(
    configured: str, monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry, call: Any
) -> None:
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert call(MetricsExposition(registry, token=configured), headers=right).code == 200
    assert call(MetricsExposition(registry, token=configured)).code == 401
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", configured)
    assert call(MetricsExposition(registry), headers=right).code == 200


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("two words", id="inner-space"),
        pytest.param("tab\tinside", id="inner-tab"),
        pytest.param("line\nbreak", id="inner-newline"),
        pytest.param("naïve-token", id="non-ascii"),
        pytest.param("bell\x07char", id="control-character"),
    ],
)
def test_token_that_a_header_cannot_carry_is_refused(
    token: str, monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry
) -> None:
    with pytest.raises(ValueError, match=r"^metrics_token") as raised:
        MetricsExposition(registry, token=token)
    assert token not in str(raised.value)  # a secret is never echoed
    monkeypatch.setenv("ML_WSGI_METRICS_TOKEN", token)
    with pytest.raises(ValueError, match=r"^metrics_token"):
        MetricsExposition(registry)


# -- allowed networks -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "remote_addr", "code"),
    [
        pytest.param(["10.0.0.0/8"], "10.1.2.3", 200, id="v4-inside"),
        pytest.param(["10.0.0.0/8"], "192.168.1.1", 403, id="v4-outside"),
        pytest.param(["10.0.0.0/8", "127.0.0.1"], "127.0.0.1", 200, id="single-address"),
        pytest.param("10.0.0.0/8, 127.0.0.0/8", "127.0.0.2", 200, id="comma-string"),
        pytest.param("10.0.0.0/8 192.168.0.0/16", "192.168.9.9", 200, id="space-string"),
        pytest.param(["::1/128"], "::1", 200, id="v6-loopback"),
        pytest.param(["2001:db8::/32"], "2001:db8::5", 200, id="v6-inside"),
        pytest.param(["2001:db8::/32"], "2001:db9::5", 403, id="v6-outside"),
        pytest.param(["2001:db8::/32"], "10.1.2.3", 403, id="v4-against-v6"),
        pytest.param(["10.0.0.1/8"], "10.9.9.9", 200, id="host-bits-set"),
        pytest.param(["10.0.0.0/8"], "", 403, id="no-address"),
        pytest.param(["10.0.0.0/8"], "not-an-ip", 403, id="garbage-address"),
        pytest.param([], "127.0.0.1", 403, id="empty-list-allows-nobody"),
        pytest.param(["10.0.0.0/8"], "::ffff:10.0.0.5", 200, id="v4-mapped-inside"),
        pytest.param(["10.0.0.0/8"], "::ffff:192.168.0.1", 403, id="v4-mapped-outside"),
        pytest.param(["::ffff:10.0.0.0/104"], "10.0.0.5", 200, id="mapped-network-v4-client"),
        pytest.param(["::ffff:10.0.0.0/104"], "::ffff:10.9.0.5", 200, id="mapped-network"),
        pytest.param(["::ffff:10.0.0.0/104"], "11.0.0.1", 403, id="mapped-network-outside"),
        pytest.param(["::ffff:10.0.0.5"], "10.0.0.5", 200, id="mapped-single-address"),
    ],
)
def test_allowed_networks(
    networks: list[str] | str,
    remote_addr: str,
    code: int,
    registry: CollectorRegistry,
    hello: Any,
    call: Callable[..., Any],
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", metrics_allowed_networks=networks
    )
    response = scrape(call, app, remote_addr=remote_addr)
    assert response.code == code
    assert (b"http_requests_total" in response.body) is (code == 200)
    assert call(app, "/r", remote_addr=remote_addr).body == b"hello"  # the app is not guarded


@pytest.mark.parametrize(
    "networks",
    [
        pytest.param(["10.0.0.0/33"], id="prefix-too-long"),
        pytest.param(["300.0.0.0/8"], id="bad-octet"),
        pytest.param("localhost", id="a-name"),
        pytest.param(["10.0.0.0/8", "fe80::/129"], id="bad-v6"),
    ],
)
def test_bad_network_raises_value_error(networks: list[str] | str) -> None:
    with pytest.raises(ValueError, match=r"^metrics_allowed_networks"):
        MetricsExposition(CollectorRegistry(), allowed_networks=networks)


def test_networks_from_environment(
    monkeypatch: pytest.MonkeyPatch, registry: CollectorRegistry, call: Callable[..., Any]
) -> None:
    monkeypatch.setenv("ML_WSGI_METRICS_ALLOWED_NETWORKS", "10.0.0.0/8,::1")
    exposition = MetricsExposition(registry)
    assert call(exposition, remote_addr="10.0.0.7").code == 200
    assert call(exposition, remote_addr="::1").code == 200
    assert call(exposition, remote_addr="127.0.0.1").code == 403


def test_network_and_token_both_apply(
    registry: CollectorRegistry, call: Callable[..., Any]
) -> None:
    exposition = MetricsExposition(registry, token=TOKEN, allowed_networks=["10.0.0.0/8"])
    right = {"Authorization": f"Bearer {TOKEN}"}
    assert call(exposition, remote_addr="10.0.0.7", headers=right).code == 200
    assert call(exposition, remote_addr="10.0.0.7").code == 401
    assert call(exposition, remote_addr="192.168.0.1", headers=right).code == 403


# -- multiprocess scrape --------------------------------------------------------------------


def process_samples(body: bytes, prefix: str = "") -> dict[tuple[str, str], float]:
    """``(metric, worker) -> value`` for the per-worker process metrics in a text exposition."""
    found = {}
    for line in body.decode().splitlines():
        if line.startswith(prefix + "gunicorn_worker_") and "{" in line:
            name, rest = line.split("{", 1)
            labels, value = rest.rsplit("} ", 1)
            worker = labels.split('worker="', 1)[1].split('"', 1)[0]
            found[name[len(prefix) :], worker] = float(value)
    return found


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


@pytest.mark.parametrize("namespace", [pytest.param("", id="plain"), pytest.param("shop", id="ns")])
def test_multiprocess_scrape_includes_per_worker_process_metrics(
    namespace: str,
    multiprocess_dir: Path,
    registry: CollectorRegistry,
    hello: Any,
    call: Callable[..., Any],
) -> None:
    app = MetricsMiddleware(
        hello, registry=registry, route_resolver=lambda e: "/r", namespace=namespace
    )
    call(app, "/r")
    write_pid_file(str(multiprocess_dir), "w0")  # this process is worker w0
    write_pid_file(str(multiprocess_dir), "w1", dead_pid())  # w1 exited since

    response = scrape(call, app)
    prefix = f"{namespace}_" if namespace else ""
    samples = process_samples(response.body, prefix)

    assert response.code == 200
    assert f'{prefix}http_requests_total{{method="GET",route="/r",status="200"}} 1.0' in (
        response.body.decode()
    )
    assert {worker for _, worker in samples} == {"w0"}
    assert samples["gunicorn_worker_resident_memory_bytes", "w0"] > 1 << 20
    assert samples["gunicorn_worker_cpu_seconds_total", "w0"] > 0
    assert samples["gunicorn_worker_open_fds", "w0"] >= 3
    started = samples["gunicorn_worker_start_time_seconds", "w0"]
    assert time.time() - 24 * 3600 * 365 < started <= time.time() + 1


def test_worker_process_metrics_follow_the_pid_files(tmp_path: Path) -> None:
    directory = str(tmp_path)
    collector = WorkerProcessCollector(directory)
    assert all(not metric.samples for metric in collector.collect())

    write_pid_file(directory, "w3", os.getpid())
    assert not list(tmp_path.glob("*.tmp"))  # written aside, then renamed
    memory = next(m for m in collector.collect() if m.name.endswith("resident_memory_bytes"))
    assert [s.labels for s in memory.samples] == [{"worker": "w3"}]

    remove_pid_file(directory, "w3")
    remove_pid_file(directory, "w3")  # already gone: no error
    assert all(not metric.samples for metric in collector.collect())


def test_multiprocess_scrape_merges_files_not_the_registry(
    multiprocess_dir: Path, hello: Any, call: Callable[..., Any]
) -> None:
    first = MetricsMiddleware(hello, registry=CollectorRegistry(), route_resolver=lambda e: "/r")
    second = MetricsMiddleware(hello, registry=CollectorRegistry(), route_resolver=lambda e: "/r")
    call(first, "/r")
    call(second, "/r")
    line = b'http_requests_total{method="GET",route="/r",status="200"} 2.0'
    assert line in scrape(call, first).body
    assert line in scrape(call, second).body


# -- a port of its own ----------------------------------------------------------------------


@pytest.fixture
def port_server(registry: CollectorRegistry, hello: Any, call: Callable[..., Any]) -> Any:
    """``serve_metrics`` on a free loopback port for ``registry`` (with one request counted),
    protected by ``TOKEN`` and a loopback allow-list; stopped after the test."""
    call(MetricsMiddleware(hello, registry=registry, route_resolver=lambda e: "/r"), "/r")
    exposition = MetricsExposition(registry, token=TOKEN, allowed_networks=["127.0.0.0/8"])
    with serve_metrics("127.0.0.1", 0, exposition) as server:
        yield server


def port_get(server: Any, method: str = "GET", path: str = "/metrics", **headers: str) -> Any:
    return http_request(f"http://127.0.0.1:{server.server_port}{path}", method, headers=headers)


def test_serve_metrics_speaks_like_the_middleware(port_server: Any) -> None:
    right = {"Authorization": f"Bearer {TOKEN}"}
    status, body = port_get(port_server)
    assert (status, b"http_requests_total" in body) == (401, False)
    status, plain = port_get(port_server, **right)
    assert status == 200
    assert b'http_requests_total{method="GET",route="/r",status="200"} 1.0' in plain
    assert port_get(port_server, "HEAD", **right) == (200, b"")
    assert port_get(port_server, "POST", **right)[0] == 405
    status, zipped = port_get(port_server, **right, **{"Accept-Encoding": "gzip"})
    assert (status, gzip.decompress(zipped)) == (200, plain)
    openmetrics = {"Accept": "application/openmetrics-text; version=1.0.0"}
    assert port_get(port_server, **right, **openmetrics)[1].endswith(b"# EOF\n")
    assert port_get(port_server, path="/elsewhere", **right)[0] == 404


def test_serve_metrics_checks_the_peer_address(registry: CollectorRegistry) -> None:
    exposition = MetricsExposition(registry, allowed_networks=["10.0.0.0/8"])
    with serve_metrics("127.0.0.1", 0, exposition) as server:
        assert port_get(server)[0] == 403


def test_serve_metrics_stops_and_frees_the_port(registry: CollectorRegistry) -> None:
    server = serve_metrics("127.0.0.1", 0, MetricsExposition(registry))
    port = server.server_port
    assert listening_addresses(port) == {"127.0.0.1"}
    server.stop()
    server.stop()  # idempotent
    assert listening_addresses(port) == set()
    with pytest.raises(OSError):
        http_request(f"http://127.0.0.1:{port}/metrics", timeout=5)
