"""In-process per-request cost: bare Flask vs MetricsMiddleware vs prometheus_flask_exporter.

    python bench/bench_middleware.py            # prints a table of us/request and ratios

Each variant runs in its own subprocess (prometheus_client picks its storage at import), all in
this one run, interleaved and repeated; the table shows the median of the repeats.
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

VARIANTS = ("bare", "ours", "pfe")
MODES = ("single", "multiprocess")
ROUTES = ("hello", "param")


def build_app(variant: str, mode: str):
    from flask import Flask

    app = Flask("bench")

    @app.route("/")
    def hello() -> str:
        return "Hello, World!"

    @app.route("/items/<int:item_id>")
    def item(item_id: int) -> str:
        return f"item {item_id}"

    if variant == "ours":
        from prometheus_client import CollectorRegistry

        from ml_wsgi_metrics import MetricsMiddleware

        app.wsgi_app = MetricsMiddleware(app.wsgi_app, registry=CollectorRegistry())
    elif variant == "pfe":
        if mode == "multiprocess":
            from prometheus_flask_exporter.multiprocess import MultiprocessPrometheusMetrics

            MultiprocessPrometheusMetrics(app, group_by="url_rule")
        else:
            from prometheus_client import CollectorRegistry
            from prometheus_flask_exporter import PrometheusMetrics

            PrometheusMetrics(app, registry=CollectorRegistry(), group_by="url_rule")
    return app


def run_one(variant: str, mode: str, route: str, requests: int) -> float:
    """Microseconds per request for one variant, in this process."""
    if mode == "multiprocess":
        directory = tempfile.mkdtemp(prefix="bench-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        if variant == "ours":
            from ml_wsgi_metrics import multiprocess

            multiprocess.activate(directory)
    app = build_app(variant, mode)

    def start_response(status, headers, exc_info=None):
        return None

    def environ(path: str) -> dict:
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

    paths = ["/"] if route == "hello" else [f"/items/{i}" for i in range(1000)]
    envs = [environ(p) for p in paths]
    call = app  # Flask.__call__ -> wsgi_app (wrapped or not)
    for env in envs[:200]:  # warm up
        result = call(dict(env), start_response)
        b"".join(result)
        result.close()
    count = len(envs)
    started = time.perf_counter()
    for i in range(requests):
        result = call(dict(envs[i % count]), start_response)
        for _ in result:
            pass
        result.close()
    return (time.perf_counter() - started) / requests * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one", nargs=3, metavar=("VARIANT", "MODE", "ROUTE"))
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(*args.one, args.requests)))
        return
    results: dict[tuple[str, str, str], list[float]] = {}
    for _ in range(args.repeats):
        for mode in MODES:
            for route in ROUTES:
                for variant in VARIANTS:
                    out = subprocess.run(
                        [sys.executable, __file__, "--requests", str(args.requests), "--one",
                         variant, mode, route],
                        check=True, capture_output=True, text=True,
                    ).stdout  # fmt: skip
                    results.setdefault((variant, mode, route), []).append(json.loads(out))
    print(f"{'mode':13} {'route':6} {'bare us':>8} {'ours us':>8} {'pfe us':>8} "
          f"{'ours/bare':>9} {'pfe/bare':>8} {'added ours/pfe':>14}")  # fmt: skip
    for mode in MODES:
        for route in ROUTES:
            bare, ours, pfe = (statistics.median(results[(v, mode, route)]) for v in VARIANTS)
            print(
                f"{mode:13} {route:6} {bare:8.2f} {ours:8.2f} {pfe:8.2f} {ours / bare:9.3f} "
                f"{pfe / bare:8.3f} {(ours - bare) / (pfe - bare):14.2f}"
            )


if __name__ == "__main__":
    main()
