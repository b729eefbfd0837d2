"""In-process per-request cost: bare Flask vs MetricsMiddleware vs prometheus_flask_exporter.

    python bench/bench_middleware.py            # prints a table of us/request and ratios

One process per mode (prometheus_client picks its multiprocess storage at import) holds every
variant, each its own Flask app: the bare app, ours with the C record (``_speedups``), ours with
the pure-Python record, and prometheus_flask_exporter (PFE). Rounds of requests interleave the
variants, so they share the machine's state; the table shows the median round. The
``fallback`` mode is multiprocess mode without this package's storage (``PROMETHEUS_MULTIPROC_DIR``
set, no gunicorn hooks): every variant writes prometheus_client's own files.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

MODES = ("single", "multiprocess", "fallback")
ROUTES = ("hello", "param")
VARIANTS = ("bare", "ours", "ours-python", "pfe")


def flask_app() -> Any:
    from flask import Flask

    app = Flask("bench")

    @app.route("/")
    def hello() -> str:
        return "Hello, World!"

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return f"item {item_id}"

    return app


def build_apps(mode: str) -> dict[str, Any]:
    """Every variant, PFE first: its metrics must take prometheus_client's own storage."""
    from prometheus_client import CollectorRegistry

    apps = {"bare": flask_app(), "pfe": flask_app()}
    if mode != "single":
        from prometheus_flask_exporter.multiprocess import MultiprocessPrometheusMetrics

        MultiprocessPrometheusMetrics(apps["pfe"], group_by="url_rule")
    if mode == "multiprocess":
        from ml_wsgi_metrics import multiprocess

        multiprocess.activate(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    else:
        from prometheus_flask_exporter import PrometheusMetrics

        PrometheusMetrics(apps["pfe"], registry=CollectorRegistry(), group_by="url_rule")

    from ml_wsgi_metrics import MetricsMiddleware
    from ml_wsgi_metrics._response import PythonTimedResponse, speedups

    if speedups is None:
        sys.exit("ml_wsgi_metrics._speedups is not built: pip install -e . builds it")
    for name in ("ours", "ours-python"):
        app = apps[name] = flask_app()
        app.wsgi_app = MetricsMiddleware(app.wsgi_app, registry=CollectorRegistry())
    apps["ours-python"].wsgi_app.response_class = PythonTimedResponse
    return apps


def environ(path: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": path,
        "SCRIPT_NAME": "",
        "QUERY_STRING": "",
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(),
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }


def timer(app: Callable[..., Any], paths: list[str]) -> Callable[[int], float]:
    """``run(n)``: microseconds per request over ``n`` requests, served as a server would."""
    environs = [environ(path) for path in paths]

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> None:
        return None

    def run(requests: int) -> float:
        started = time.perf_counter()
        for i in range(requests):
            result = app(dict(environs[i % len(environs)]), start_response)
            for _ in result:
                pass
            result.close()
        return (time.perf_counter() - started) / requests * 1e6

    return run


def measure(mode: str, requests: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median microseconds per request, by route and variant, in this process."""
    if mode != "single":
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="bench-")
    apps = build_apps(mode)
    paths = {"hello": ["/"], "param": [f"/items/{i}" for i in range(1000)]}
    results: dict[str, dict[str, float]] = {}
    for route in ROUTES:
        runs = {name: timer(apps[name], paths[route]) for name in VARIANTS}
        for run in runs.values():
            run(1000)  # warm up: every id's series exists before timing
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(rounds):
            for name, run in runs.items():
                times[name].append(run(requests))
        results[route] = {name: statistics.median(t) for name, t in times.items()}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000, help="requests per round")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(measure(args.mode, args.requests, args.rounds)))
        return
    print(
        f"{'mode':13} {'route':6} {'bare us':>8} {'ours us':>8} {'python':>8} {'pfe us':>8} "
        f"{'ours/bare':>9} {'python/bare':>11} {'pfe/bare':>8} {'added ours/pfe':>14}"
    )
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--requests", str(args.requests)]
        command += ["--rounds", str(args.rounds)]
        out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        for route, us in json.loads(out).items():
            bare, ours, python, pfe = (us[name] for name in VARIANTS)
            print(
                f"{mode:13} {route:6} {bare:8.2f} {ours:8.2f} {python:8.2f} {pfe:8.2f} "
                f"{ours / bare:9.3f} {python / bare:11.3f} {pfe / bare:8.3f} "
                f"{(ours - bare) / (pfe - bare):14.2f}"
            )


if __name__ == "__main__":
    main()
