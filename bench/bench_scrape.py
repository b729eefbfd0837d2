"""Scrape time after 0 and after 1,000 real worker restarts: slot files vs one file set per pid.

    python bench/bench_scrape.py                    # about 2-4 minutes on 2 cores
    python bench/bench_scrape.py --restarts 200     # quicker

Two storages behind the same ``MetricsMiddleware`` metrics, under real gunicorn (4 sync
workers, ``preload_app`` on so that restarts are cheap to produce):

* *ours*: the repo's ``gunicorn.conf.py``; a replacement worker continues its slot's files.
* *plain*: prometheus_client's documented multiprocess mode: one file set per pid,
  ``mark_process_dead`` in ``child_exit`` (which drops only live gauges).

Restarts are real: ``max_requests`` = 4 and a request loop over six routes, so each dead
worker leaves about 4 routes' series (~120 label sets) behind. Each variant runs once with no
restart and once after ``--restarts``; the scrape is a GET of the merged metrics from the
master's metrics port (the same merge a worker's ``/metrics`` does, but without feeding the
restart loop), timed on the client, median of many. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # tests.apps (the app below), support

from tests.apps.flask_app import create_app  # noqa: E402 (the repo is on sys.path now)

#: The tests' app (``/``, ``/items/<int:item_id>``, ``POST /items``...) and two more routes.
app = create_app()


@app.get("/users/<name>")
def user(name: str) -> dict[str, str]:
    return {"name": name}


@app.get("/orders/<int:order_id>/lines")
def order_lines(order_id: int) -> dict[str, list[int]]:
    return {"lines": [order_id]}


PLAIN_CONFIG = """\
# prometheus_client's documented multiprocess setup, for comparison.
import glob
import os

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from ml_wsgi_metrics import MetricsMiddleware

bind = os.environ["BIND"]
workers = int(os.environ["WEB_CONCURRENCY"])
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
preload_app = os.environ.get("GUNICORN_PRELOAD", "") == "1"
control_socket_disable = True
directory = os.environ["PROMETHEUS_MULTIPROC_DIR"]


def on_starting(server):
    for path in glob.glob(os.path.join(directory, "*.db")):
        os.remove(path)


def when_ready(server):
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=directory)
    start_http_server(int(os.environ["ML_WSGI_METRICS_PORT"]), "127.0.0.1", registry=registry)


def post_worker_init(worker):
    worker.wsgi = MetricsMiddleware(worker.wsgi, metrics_path=None)


def child_exit(server, worker):
    mark_process_dead(worker.pid, directory)
"""

APP = "bench.bench_scrape:app"
MAX_REQUESTS = 4


def traffic(count: int, rng: random.Random) -> list[tuple[str, str, bytes | None]]:
    """``count`` requests over six routes (one of them a 404)."""
    choices = [
        lambda: ("GET", "/", None),
        lambda: ("GET", f"/items/{rng.randrange(10**6)}", None),
        lambda: ("POST", "/items", b"x" * rng.randrange(1, 3000)),
        lambda: ("GET", f"/users/u{rng.randrange(10**6)}", None),
        lambda: ("GET", f"/orders/{rng.randrange(10**6)}/lines", None),
        lambda: ("GET", f"/missing/{rng.randrange(10**6)}", None),
    ]
    return [rng.choice(choices)() for _ in range(count)]


def restarts_so_far(server: object, workers: int) -> int:
    return server.log().count("Booting worker with pid") - workers  # type: ignore[attr-defined]


def directory_size(directory: Path) -> tuple[int, float]:
    """Files and MiB really allocated on disk (the files are sparse)."""
    files = [path.stat() for path in directory.iterdir()]
    return len(files), sum(stat.st_blocks * 512 for stat in files) / 2**20


def time_scrapes(url: str, budget: float, least: int = 5, most: int = 200) -> tuple[float, int]:
    """Median milliseconds of GET ``url``: up to ``most`` scrapes or ``budget`` seconds."""
    from support import http_request

    times: list[float] = []
    started = time.perf_counter()
    while len(times) < most and (len(times) < least or time.perf_counter() - started < budget):
        begin = time.perf_counter()
        status, body = http_request(url, timeout=300)
        times.append((time.perf_counter() - begin) * 1000)
        if status != 200 or b"http_requests_total" not in body:
            raise RuntimeError(f"scrape failed: {status} {body[:300]!r}")
    return statistics.median(times), len(times)


def run(variant: str, target: int, workers: int, budget: float) -> dict[str, float]:
    from support import GunicornServer, free_port, send_all, wait_until

    rng = random.Random(1)
    with tempfile.TemporaryDirectory() as temp:
        directory = Path(temp, "multiproc")
        directory.mkdir(mode=0o700)
        port = free_port()
        env = {
            "PROMETHEUS_MULTIPROC_DIR": str(directory),
            "ML_WSGI_METRICS_PORT": str(port),
            "GUNICORN_PRELOAD": "1",
            "GUNICORN_MAX_REQUESTS": str(MAX_REQUESTS if target else 0),
        }
        config = REPO / "gunicorn.conf.py"
        if variant == "plain":
            config = Path(temp, "plain.conf.py")
            config.write_text(PLAIN_CONFIG)
        with GunicornServer(APP, config=config, env=env, workers=workers, ready_path="/") as server:
            started = time.perf_counter()
            send_all(server.url, traffic(100 * workers, rng))  # every live worker sees every route
            while (missing := target - restarts_so_far(server, workers)) > 0:
                batch = min(200, max(10, missing * MAX_REQUESTS // 2))  # do not overshoot much
                send_all(server.url, traffic(batch, rng), clients=4)
            wait_until(lambda: len(server.worker_pids()) == workers, 30)
            restarts = restarts_so_far(server, workers)
            production = time.perf_counter() - started
            files, mib = directory_size(directory)
            milliseconds, scrapes = time_scrapes(f"http://127.0.0.1:{port}/metrics", budget)
    return {
        "restarts": restarts,
        "files": files,
        "mib": mib,
        "ms": milliseconds,
        "scrapes": scrapes,
        "production": production,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--restarts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of scrapes per run")
    parser.add_argument("--variants", nargs="+", default=["ours", "plain"])
    args = parser.parse_args()
    os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)

    results: dict[tuple[str, int], dict[str, float]] = {}
    for variant in args.variants:
        for target in (0, args.restarts):
            result = run(variant, target, args.workers, args.budget)
            results[(variant, target)] = result
            print(f"{variant:5} restarts {result['restarts']:5.0f}: {result['files']:5.0f} files "
                  f"{result['mib']:7.1f} MiB, scrape {result['ms']:8.2f} ms (median of "
                  f"{result['scrapes']:.0f}; restarts made in {result['production']:.0f} s)",
                  flush=True)  # fmt: skip

    print(f"\nscrape time of the merged metrics, {args.workers} workers, median ms")
    print(f"{'':6} {'0 restarts':>11} {'after':>8} {'restarts':>9} {'ratio':>7} "
          f"{'ms per dead worker':>19} {'files':>12}")  # fmt: skip
    for variant in args.variants:
        none, many = results[(variant, 0)], results[(variant, args.restarts)]
        per_worker = (many["ms"] - none["ms"]) / max(many["restarts"], 1)
        print(f"{variant:6} {none['ms']:11.2f} {many['ms']:8.2f} {many['restarts']:9.0f} "
              f"{many['ms'] / none['ms']:7.2f} {per_worker:19.4f} "
              f"{none['files']:5.0f} -> {many['files']:.0f}")  # fmt: skip
    print("target: ours after the restarts <= 1.2 x ours with none")


if __name__ == "__main__":
    main()
