"""Throughput under gunicorn (4 sync workers): Flask hello world, bare vs wrapped, one run.

    python bench/bench_gunicorn.py                  # wrk if installed, else a Python loader
    python bench/bench_gunicorn.py --seconds 10 --rounds 6

The app is the tests' (``tests/apps/flask_app.py``), loaded at ``/``: hello world. *bare* serves
it with a plain gunicorn config of the same settings, without this package;
*wrapped* serves it with the repo's ``gunicorn.conf.py`` (multiprocess hooks, the app wrapped in
``MetricsMiddleware``). Both servers run side by side on 127.0.0.1; rounds alternate between
them (ABBA) with the same load generator, and the ratio of the median requests/s is printed
(target >= 0.97), with the server's CPU time per request (master and workers, from ``/proc``),
which other load on the machine disturbs less. Nothing is asserted: these are numbers to read.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

BARE_CONFIG = """\
import os
bind = os.environ["BIND"]
workers = int(os.environ["WEB_CONCURRENCY"])
control_socket_disable = True
"""


def run_wrk(url: str, seconds: int, connections: int, threads: int) -> tuple[float, int]:
    """requests/s and requests completed, as wrk reports them."""
    out = subprocess.run(
        ["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    if "Non-2xx" in out or ("Socket errors" in out and "read 0" not in out):
        print(out, file=sys.stderr)
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out)[1])
    total = int(re.search(r"(\d+) requests in", out)[1])
    return rate, total


def _python_client(url: str, seconds: float, results: multiprocessing.Queue) -> None:
    from support import http_request

    count = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, _ = http_request(url)
        if status != 200:
            raise RuntimeError(f"status {status}")
        count += 1
    results.put(count)


def run_python(url: str, seconds: int, connections: int, threads: int) -> tuple[float, int]:
    """A multi-process loader: ``connections`` processes, one request at a time each."""
    results: multiprocessing.Queue = multiprocessing.Queue()
    processes = [
        multiprocessing.Process(target=_python_client, args=(url, seconds, results))
        for _ in range(connections)
    ]
    started = time.monotonic()
    for process in processes:
        process.start()
    total = sum(results.get() for _ in processes)
    for process in processes:
        process.join()
    return total / (time.monotonic() - started), total


def cpu_seconds(server: object) -> float:
    """CPU time used so far by the server's master and workers (user + system)."""
    total = 0.0
    for pid in [server.pid, *server.worker_pids()]:  # type: ignore[attr-defined]
        with open(f"/proc/{pid}/stat", "rb") as handle:
            fields = handle.read().rsplit(b")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def counted(url: str) -> float:
    from support import http_request, parse_samples

    _, body = http_request(url + "/metrics")
    return sum(s.value for s in parse_samples(body.decode()) if s.name == "http_requests_total")


def main() -> None:
    from support import TEST_APP, GunicornServer

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=int, default=5, help="per round")
    parser.add_argument("--rounds", type=int, default=16, help="per variant (ABBA order)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="wrk threads")
    parser.add_argument("--python-loader", action="store_true", help="even if wrk is installed")
    args = parser.parse_args()

    if shutil.which("wrk") and not args.python_loader:
        load, loader = run_wrk, f"wrk -t{args.threads} -c{args.connections}"
    else:
        if not args.python_loader:
            print("wrk is not installed (apt-get install -y wrk): using the Python loader, "
                  "which saturates the server less and measures less precisely.")  # fmt: skip
        load, loader = run_python, f"python loader, {args.connections} processes"
        args.connections = min(args.connections, 8)

    app_name = TEST_APP
    with tempfile.TemporaryDirectory() as directory:
        bare_config = Path(directory, "bare.conf.py")
        bare_config.write_text(BARE_CONFIG)
        env = {"GUNICORN_MAX_REQUESTS": "0"}
        with (
            GunicornServer(app_name, config=bare_config, workers=args.workers, env=env,
                           ready_path="/") as bare,
            GunicornServer(app_name, workers=args.workers, env=env) as wrapped,
        ):  # fmt: skip
            servers = {"bare": bare, "wrapped": wrapped}
            for server in servers.values():  # warm up
                load(server.url + "/", 2, args.connections, args.threads)
            before = counted(wrapped.url)
            rates: dict[str, list[float]] = {"bare": [], "wrapped": []}
            cpu: dict[str, list[float]] = {"bare": [], "wrapped": []}  # us per request
            wrapped_total = 0
            for round_ in range(args.rounds):
                order = ("bare", "wrapped") if round_ % 2 == 0 else ("wrapped", "bare")
                for name in order:
                    used = cpu_seconds(servers[name])
                    rate, total = load(
                        servers[name].url + "/", args.seconds, args.connections, args.threads
                    )
                    cpu[name].append((cpu_seconds(servers[name]) - used) / total * 1e6)
                    rates[name].append(rate)
                    wrapped_total += total if name == "wrapped" else 0
                    print(f"round {round_ + 1} {name:8} {rate:9.0f} requests/s, "
                          f"server CPU {cpu[name][-1]:6.1f} us/request", flush=True)  # fmt: skip
            after = counted(wrapped.url)

    bare_rate, wrapped_rate = (statistics.median(rates[name]) for name in ("bare", "wrapped"))
    pairs = [w / b for b, w in zip(rates["bare"], rates["wrapped"], strict=True)]
    print(f"\ngunicorn, {args.workers} sync workers, Flask hello world, {loader}, "
          f"{args.rounds} x {args.seconds} s per variant")  # fmt: skip
    print(f"bare     {bare_rate:9.0f} requests/s (median)")
    print(f"wrapped  {wrapped_rate:9.0f} requests/s (median)")
    print(f"ratio wrapped/bare {wrapped_rate / bare_rate:.3f} (target >= 0.97); "
          f"median of the per-round ratios {statistics.median(pairs):.3f}: "
          + " ".join(f"{pair:.3f}" for pair in pairs))  # fmt: skip
    bare_cpu, wrapped_cpu = (statistics.median(cpu[name]) for name in ("bare", "wrapped"))
    print(f"server CPU per request (median): bare {bare_cpu:.1f} us, wrapped {wrapped_cpu:.1f} us"
          f", +{wrapped_cpu - bare_cpu:.1f} us; throughput ratio if CPU-bound "
          f"{bare_cpu / wrapped_cpu:.3f} (less disturbed by other load)")  # fmt: skip
    print(
        f"wrapped counted {after - before:.0f} requests; the loader saw {wrapped_total} "
        "(the loader stops with requests in flight, which the server may still finish)"
    )


if __name__ == "__main__":
    main()
