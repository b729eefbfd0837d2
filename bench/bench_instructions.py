"""Instructions per request, counted by callgrind: steadier than timings on a busy machine.

    python bench/bench_instructions.py              # needs valgrind (apt-get install valgrind)

Two counts, each the difference between a run of 1,010 requests and one of 10, so start-up
cancels out: a gunicorn worker (1 sync worker, hello world, sequential requests from a client
outside valgrind) with a bare config vs the repo's ``gunicorn.conf.py``; and Flask's hello world
called in-process, bare vs wrapped in ``MetricsMiddleware``. Nothing is asserted.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]  # the tests' helpers import service
REQUESTS = (10, 1010)

BARE_CONFIG = """\
import os
bind = os.environ["BIND"]
workers = 1
control_socket_disable = True
"""

IN_PROCESS = """\
import io, sys
from flask import Flask
from prometheus_client import CollectorRegistry
app = Flask("bench")
app.add_url_rule("/", "hello", lambda: "Hello, World!")
if sys.argv[2] == "wrapped":
    from ml_wsgi_metrics import MetricsMiddleware
    app.wsgi_app = MetricsMiddleware(app.wsgi_app, registry=CollectorRegistry())
environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "SCRIPT_NAME": "", "QUERY_STRING": "",
           "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80", "SERVER_PROTOCOL": "HTTP/1.1",
           "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(), "wsgi.errors": sys.stderr,
           "wsgi.multithread": False, "wsgi.multiprocess": True, "wsgi.run_once": False}
for _ in range(200 + int(sys.argv[1])):
    result = app(dict(environ), lambda status, headers, exc_info=None: None)
    for _ in result:
        pass
    result.close()
"""


def instructions(log: str) -> dict[int, int]:
    """Instructions by pid, from valgrind's log."""
    return {
        int(pid): int(count.replace(",", ""))
        for pid, count in re.findall(r"==(\d+)== I\s+refs:\s+([\d,]+)", log)
    }


def valgrind(directory: str) -> list[str]:
    output = os.path.join(directory, "callgrind.%p")
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={output}",
        "--trace-children=yes",
    ]


def worker_count(variant: str, requests: int) -> int:
    """Instructions of the gunicorn worker that served ``requests`` requests (and start-up)."""
    from support import free_port

    with tempfile.TemporaryDirectory() as directory:
        config = str(REPO / "gunicorn.conf.py")
        if variant == "bare":
            config = os.path.join(directory, "bare.conf.py")
            Path(config).write_text(BARE_CONFIG)
        port = free_port()
        env = {**os.environ, "BIND": f"127.0.0.1:{port}", "WEB_CONCURRENCY": "1"}
        env["PROMETHEUS_MULTIPROC_DIR"] = os.path.join(directory, "metrics")
        command = [*valgrind(directory), sys.executable, "-m", "gunicorn", "-c", config]
        server = subprocess.Popen(
            [*command, "tests.apps.flask_app:app"],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    get(port)
                    break
                except OSError:
                    if time.monotonic() > deadline or server.poll() is not None:
                        raise RuntimeError("gunicorn did not start under valgrind") from None
                    time.sleep(0.5)
            for _ in range(requests - 1):
                get(port)
        finally:
            server.terminate()
            _, log = server.communicate(timeout=300)
        counts = instructions(log)
        return counts[max(counts)]  # the worker: forked after its master


def get(port: int) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"status {response.status}")
    finally:
        connection.close()


def in_process_count(variant: str, requests: int) -> int:
    with tempfile.TemporaryDirectory() as directory:
        done = subprocess.run(
            [*valgrind(directory), sys.executable, "-c", IN_PROCESS, str(requests), variant],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        )
    return next(iter(instructions(done.stderr).values()))


def main() -> None:
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (apt-get install -y valgrind)")
    low, high = REQUESTS
    jobs = [(variant, n) for variant in ("bare", "wrapped") for n in REQUESTS]
    for title, count in (("gunicorn worker", worker_count), ("in-process", in_process_count)):
        with ThreadPoolExecutor(max_workers=2) as pool:  # instruction counts ignore the load
            counts = pool.map(count, *zip(*jobs, strict=True))
            results = dict(zip(jobs, counts, strict=True))
        per_request = {
            variant: (results[(variant, high)] - results[(variant, low)]) / (high - low)
            for variant in ("bare", "wrapped")
        }
        bare, wrapped = per_request["bare"], per_request["wrapped"]
        print(
            f"{title:16} instructions per request: bare {bare / 1000:.1f} k, wrapped "
            f"{wrapped / 1000:.1f} k, +{(wrapped - bare) / 1000:.1f} k ({wrapped / bare - 1:+.1%})"
        )


if __name__ == "__main__":
    main()
