"""``/metrics`` protection under real gunicorn with the repository's ``gunicorn.conf.py``.

The config wraps whichever app it serves in ``MetricsMiddleware``; an app that wraps itself
with a token keeps it. The master's metrics port (``ML_WSGI_METRICS_PORT``) serves the merged
metrics through the same exposition: token, allow-list, HEAD, 405, gzip. An app protected more
than that port is refused at start-up instead of being served unprotected there.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import subprocess
import sys
from collections.abc import Iterator, Sequence

import pytest
from support import (
    REPO,
    TEST_APP,
    GunicornServer,
    clean_environment,
    free_port,
    http_request,
    parse_samples,
    send_all,
    tcp_sockets,
)

TOKEN = "gunicorn-s3cret"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PROTECTED_APP = "tests.apps.protected_app:app"
WORKERS = 2
REQUESTS = 40


def totals(text: bytes) -> dict[tuple[str, str, str], float]:
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in parse_samples(text.decode())
        if s.name == "http_requests_total"
    }


def send_requests(url: str) -> None:
    plan = [("GET", f"/items/{i}", None) for i in range(REQUESTS - 10)]
    plan += [("GET", "/nope", None)] * 10
    assert sorted({status for _, _, status in send_all(url, plan)}) == [200, 404]


def listening_holders(port: int, pids: Sequence[int]) -> set[int]:
    """The processes among ``pids`` holding a socket that listens on ``port``."""
    inodes = {
        f"socket:[{s.inode}]" for s in tcp_sockets() if s.state == "0A" and s.local[1] == port
    }
    holders = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                        holders.add(pid)
    return holders


# -- the app's own token ----------------------------------------------------------------------


def test_a_token_set_in_the_app_holds_under_the_repo_config() -> None:
    env = {"PROTECTED_APP_TOKEN": TOKEN}
    with GunicornServer(PROTECTED_APP, env=env, workers=WORKERS) as server:
        send_requests(server.url)
        status, body = http_request(server.url + "/metrics")
        assert (status, b"http_requests_total" in body) == (401, False)
        assert (
            http_request(server.url + "/metrics", headers={"Authorization": "Bearer x"})[0] == 401
        )
        status, body = http_request(server.url + "/metrics", headers=BEARER)
        assert status == 200
        assert sum(totals(body).values()) == REQUESTS
        assert totals(body)["GET", "/items/<int:item_id>", "200"] == REQUESTS - 10


# -- the master's port ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def protected_port() -> Iterator[tuple[GunicornServer, int]]:
    """A server whose token comes from the environment, with the master's metrics port."""
    port = free_port()
    env = {"ML_WSGI_METRICS_TOKEN": TOKEN + "\n", "ML_WSGI_METRICS_PORT": str(port)}
    with GunicornServer(TEST_APP, env=env, workers=WORKERS) as server:
        send_requests(server.url)
        yield server, port


def test_master_port_requires_the_token(protected_port: tuple[GunicornServer, int]) -> None:
    server, port = protected_port
    url = f"http://127.0.0.1:{port}/metrics"
    status, body = http_request(url)
    assert (status, b"http_requests_total" in body) == (401, False)
    assert http_request(url, headers={"Authorization": "Bearer wrong"})[0] == 401

    status, master = http_request(url, headers=BEARER)
    assert status == 200
    status, worker = http_request(server.url + "/metrics", headers=BEARER)
    assert status == 200
    assert totals(master) == totals(worker)
    assert sum(totals(master).values()) == REQUESTS


def test_master_port_speaks_like_the_middleware(protected_port: tuple[GunicornServer, int]) -> None:
    _, port = protected_port
    url = f"http://127.0.0.1:{port}/metrics"
    status, plain = http_request(url, headers=BEARER)
    assert status == 200
    assert http_request(url, "HEAD", headers=BEARER) == (200, b"")
    assert http_request(url, "POST", b"", headers=BEARER)[0] == 405
    status, zipped = http_request(url, headers={**BEARER, "Accept-Encoding": "gzip"})
    assert totals(gzip.decompress(zipped)) == totals(plain)
    accept = {**BEARER, "Accept": "application/openmetrics-text; version=1.0.0"}
    assert http_request(url, headers=accept)[1].endswith(b"# EOF\n")
    assert http_request(f"http://127.0.0.1:{port}/elsewhere", headers=BEARER)[0] == 404


def test_master_port_is_served_by_the_master_alone(
    protected_port: tuple[GunicornServer, int],
) -> None:
    server, port = protected_port
    workers = server.worker_pids()
    assert len(workers) == WORKERS
    assert listening_holders(port, [server.pid, *workers]) == {server.pid}


def test_allow_list_refuses_on_the_port_and_the_workers() -> None:
    port = free_port()
    env = {"ML_WSGI_METRICS_ALLOWED_NETWORKS": "10.0.0.0/8", "ML_WSGI_METRICS_PORT": str(port)}
    with GunicornServer(TEST_APP, env=env, workers=WORKERS) as server:
        send_requests(server.url)
        for url in (f"http://127.0.0.1:{port}/metrics", server.url + "/metrics"):
            status, body = http_request(url)
            assert (status, b"http_requests_total" in body) == (403, False), url
        assert http_request(server.url + "/items/1")[0] == 200  # the app is not guarded


# -- refused at start-up ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("preload", "exit_code"),
    [pytest.param("0", 3, id="worker-refuses-to-boot"), pytest.param("1", 1, id="preload")],
)
def test_an_app_protected_more_than_the_master_port_is_refused(
    preload: str, exit_code: int
) -> None:
    env = {
        **clean_environment(),
        "PROTECTED_APP_TOKEN": TOKEN,
        "ML_WSGI_METRICS_PORT": str(free_port()),
        "BIND": f"127.0.0.1:{free_port()}",
        "WEB_CONCURRENCY": "1",
        "GUNICORN_PRELOAD": preload,
    }
    command = [sys.executable, "-m", "gunicorn", "-c", str(REPO / "gunicorn.conf.py")]
    result = subprocess.run(
        [*command, PROTECTED_APP],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == exit_code, result.stderr[-2000:]
    assert "ValueError: metrics_token: " in result.stderr
    assert "metrics_port" in result.stderr
    assert TOKEN not in result.stderr
