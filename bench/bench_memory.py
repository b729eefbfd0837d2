"""Memory a worker gains from the package: a bare worker vs the same worker instrumented.

    python bench/bench_memory.py        # about 20 s

Each variant is a fresh interpreter shaped like a gunicorn sync worker of the reference service:
Flask, gunicorn's worker module and, for the ML worker, numpy, pandas and scikit-learn (what
the service's model needs anyway). The *bare* worker serves its requests without metrics; the
*instrumented* one is wrapped in ``MetricsMiddleware`` in multiprocess mode (slot files, slot
``w0``) with a service-sized registry: the service's 7 routes x methods x statuses, and model
signals for 20 features x 11 bins (counts and reference shares), 10 score bins, a confusion
matrix and a latency histogram, plus three other workers' files of the same series. After the
requests, it answers three ``/metrics`` scrapes (so the merge's caches are built). Both then
report ``Rss``, private memory (``Private_Clean`` + ``Private_Dirty``) and ``Pss`` from
``/proc/self/smaps_rollup``; the gains are the differences, in MiB. RSS counts every page the
worker maps and is the one gated; PSS shares library pages among the processes mapping them, so
on a machine running other Python processes it moves with them (printed, not gated).

Exits 1 when the ML worker's RSS gains more than 10 MiB. A worker that imports no numpy of its own
(the *plain* rows) also pays for numpy at its first scrape (the merge uses it): printed, not
gated; serving scrapes from the master's port (``metrics_port``) keeps it out of workers.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 10.0
ROUTES = ("/", "/predict", "/feedback", "/pipeline", "/healthz", "/models", "/missing")
STATUSES = ("200", "400", "404", "500")
FEATURES, BINS = 20, 11


def memory_kib() -> dict[str, int]:
    fields = {}
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup.read().splitlines()[1:]:
            name, _, value = line.partition(":")
            fields[name] = int(value.split()[0])
    private = fields["Private_Clean"] + fields["Private_Dirty"]
    return {"rss": fields["Rss"], "pss": fields["Pss"], "private": private}


def flask_app() -> Any:
    from flask import Flask

    app = Flask("bench")
    for number, route in enumerate(ROUTES[:-1]):
        app.add_url_rule(route, f"r{number}", lambda: "ok", methods=["GET", "POST"])
    return app


def requests(app: Any) -> None:
    from werkzeug.test import Client

    client = Client(app)
    for _ in range(3):
        for route in ROUTES:
            for method in ("GET", "POST"):
                client.open(route, method=method).close()


def model_signals(slot: str) -> None:
    """Series shaped like the model signals' (``ModelMetrics``), in this process's files."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

    from ml_wsgi_metrics import multiprocess

    multiprocess.use_identifier(slot)
    registry = CollectorRegistry()
    labels = ("model", "version", "feature", "bin")
    bins = Counter("model_feature_bin", "Rows by bin.", labels, registry=registry)
    shares = Gauge("model_feature_reference_share", "Shares.", labels, registry=registry,
                   multiprocess_mode="max")  # fmt: skip
    scores = Counter("model_score_bin", "Scores.", ("model", "version", "bin"), registry=registry)
    confusion = Counter("model_outcomes", "Outcomes.", ("model", "version", "outcome"),
                        registry=registry)  # fmt: skip
    latency = Histogram("model_prediction_latency_seconds", "Latency.", ("model", "version"),
                        registry=registry)  # fmt: skip
    for feature in range(FEATURES):
        for bin_ in range(BINS):
            bins.labels("churn", "3", f"f{feature}", str(bin_)).inc()
            shares.labels("churn", "3", f"f{feature}", str(bin_)).set(1 / BINS)
    for bin_ in range(10):
        scores.labels("churn", "3", str(bin_)).inc()
    for outcome in ("tp", "fp", "tn", "fn"):
        confusion.labels("churn", "3", outcome).inc()
    latency.labels("churn", "3").observe(0.002)


def other_worker(directory: str, slot: str) -> None:
    from ml_wsgi_metrics import MetricsMiddleware, multiprocess

    multiprocess.activate(directory)
    multiprocess.use_identifier(slot)
    requests(MetricsMiddleware(flask_app(), metrics_path=None))
    model_signals(slot)


def child(variant: str, ml: bool, directory: str) -> dict[str, int]:
    import gunicorn.workers.sync  # noqa: F401 - a worker has it loaded

    if ml:
        import numpy  # noqa: F401
        import pandas  # noqa: F401
        import sklearn.linear_model  # noqa: F401
    app = flask_app()
    if variant == "instrumented":
        from ml_wsgi_metrics import MetricsMiddleware, multiprocess

        multiprocess.activate(directory)
        multiprocess.use_identifier("w0")
        app = MetricsMiddleware(app)
        model_signals("w0")
    requests(app)
    if variant == "instrumented":
        from werkzeug.test import Client

        for _ in range(3):
            response = Client(app).get("/metrics")
            assert response.status_code == 200 and b"model_feature_bin_total" in response.data
            response.close()
    import gc

    gc.collect()
    return memory_kib()


def measure(variant: str, ml: bool) -> dict[str, int]:
    with tempfile.TemporaryDirectory() as temp:
        directory = temp + "/mp"
        if variant == "instrumented":
            for slot in ("w1", "w2", "w3"):  # the other workers' files, written before
                worker = [sys.executable, __file__, "--other", directory, slot]
                subprocess.run(worker, check=True, cwd=REPO)
        command = [sys.executable, __file__, "--child", variant, str(int(ml)), directory]
        output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO)
        return json.loads(output.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--other", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.other:
        other_worker(*args.other)
        return 0
    if args.child:
        variant, ml, directory = args.child
        print(json.dumps(child(variant, ml == "1", directory)))
        return 0
    print(
        f"{'worker':<8} {'bare RSS':>9} {'ours RSS':>9} {'gain RSS':>9} {'private':>9} {'PSS':>9}"
    )
    worst = 0.0
    for ml in (True, False):
        bare, ours = measure("bare", ml), measure("instrumented", ml)
        rss, private, pss = ((ours[k] - bare[k]) / 1024 for k in ("rss", "private", "pss"))
        mib = (bare["rss"] / 1024, ours["rss"] / 1024, rss, private, pss)
        print(f"{'ML' if ml else 'plain':<8} " + " ".join(f"{value:>9.1f}" for value in mib))
        if ml:
            worst = rss
    if worst > LIMIT_MIB:
        print(f"FAIL: the ML worker gains {worst:.1f} MiB, over {LIMIT_MIB:.0f} MiB")
        return 1
    print(f"ok: the ML worker gains at most {worst:.1f} MiB (limit {LIMIT_MIB:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
