"""uWSGI as a first-class server: the repository's ``uwsgi.ini`` under the real uWSGI.

Every test starts ``uwsgi --ini uwsgi.ini`` (from PyPI, built with the system compiler) serving
``tests.apps.flask_app:app`` with 4 workers on 127.0.0.1, and reads the metrics as Prometheus
would: ``/metrics`` of whichever worker answers. ``max-requests`` restarts workers during the
traffic; ``min-worker-lifetime`` and ``forkbomb-delay`` are set to 0 so that uWSGI restarts a
worker as soon as it reached its quota (by default it waits 10 s, and 2 s when many restart).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
from pathlib import Path

import pytest
from support import UWSGI, UwsgiServer, http_request, parallel, parse_samples, wait_until
from test_gunicorn import (
    DirectorySampler,
    RequestKey,
    _stale_files,
    assert_exact,
    expected_counts,
    request_plan,
    requests_by_key,
    scrape,
    slot_pids,
    worker_labels,
)

pytestmark = pytest.mark.requires_tool(UWSGI)

WORKERS = 4
SLOTS = {f"w{i}" for i in range(1, WORKERS + 1)}  # uWSGI numbers its workers from 1
#: Restart each worker as soon as it has served this many requests.
RESTARTS = {"UWSGI_MIN_WORKER_LIFETIME": "0", "UWSGI_FORKBOMB_DELAY": "0"}

# The files one process writes: one per kind of value it stores (counters, histograms, the
# in-progress gauge); a worker also keeps ``w<id>.pid`` (written aside as ``.pid.tmp``).
DB_KINDS = ("counter", "histogram", "gauge_livesum")
DB_FILE = re.compile(r"^(?P<kind>counter|histogram|gauge_[a-z]+)_(?P<owner>w\d+|\d+)\.db$")
PID_FILE = re.compile(r"^(?P<owner>w\d+)\.pid(\.tmp)?$")
#: The shared scrape's files: the one format the test scrapes, and the file waiting scrapes hold.
SCRAPE_FILE = re.compile(r"^scrape-(waiting|[0-9a-f]{16})\.cache$")
SCRAPE_FILES = 2
#: The bound on files in the directory, whatever the number of restarts: WORKERS ids (uWSGI
#: gives an id to a new worker only once its holder has exited) times (the db kinds + the pid
#: file + its transient .tmp), plus the master's db files.
FILE_BOUND = WORKERS * (len(DB_KINDS) + 2) + len(DB_KINDS) + SCRAPE_FILES


def send_plan(url: str, plan: list[tuple[str, str, bytes | None, RequestKey]]) -> None:
    """Send every planned request once; each must get its planned status.

    When the app raises (``/boom``), uWSGI closes the connection without an answer (gunicorn
    answers 500); the middleware counts the request as a 500 all the same.
    """

    def send(request: tuple[str, str, bytes | None, RequestKey]) -> str:
        method, path, body, _ = request
        try:
            status, _ = http_request(url + path, method, body)
        except http.client.RemoteDisconnected:
            return "no answer"
        return str(status)

    answers = parallel(send, plan, threads=8)
    expected = ["no answer" if path == "/boom" else key[2] for _, path, _, key in plan]
    assert answers == expected


def respawns(server: UwsgiServer) -> int:
    """How many workers the master has restarted so far (from its log)."""
    return server.log().count("Respawned uWSGI worker")


def wait_for_workers(server: UwsgiServer, directory: Path) -> dict[str, int]:
    """Wait until WORKERS live workers hold w1.. and have written their pid files."""

    def ready() -> dict[str, int] | None:
        slots = slot_pids(directory)
        live = set(server.worker_pids())
        return slots if set(slots) == SLOTS and set(slots.values()) == live else None

    return wait_until(ready, 30, message=f"workers never all up in {directory}")


# -- exact totals across many restarts ------------------------------------------------------------

TOTAL = 1_200
MAX_REQUESTS = 40
SCRAPES = 16


@pytest.mark.parametrize(
    "lazy_apps",
    [pytest.param(False, id="app-in-master"), pytest.param(True, id="lazy-apps")],
)
def test_every_worker_reports_exact_totals_across_restarts(lazy_apps: bool, tmp_path: Path) -> None:
    """1,200 requests over 4 workers restarting every 40 requests: exact totals, bounded files.

    The master reaps and replaces exited workers once a second (uWSGI's ``check-interval``),
    so restarts are kept to about 30 here.

    The directory starts with a crashed run's files: emptied once, when the master starts, and
    never again (a worker start that emptied it would lose the totals).
    """
    directory = tmp_path / "multiproc"
    _stale_files(directory)
    plan = request_plan(TOTAL)
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "UWSGI_MAX_REQUESTS": str(MAX_REQUESTS),
        "UWSGI_LAZY_APPS": "1" if lazy_apps else "0",
        **RESTARTS,
    }
    with UwsgiServer(env=env) as server:
        with DirectorySampler(directory) as files:
            send_plan(server.url, plan)
        # Each scrape is served by whichever worker accepts it (scrapes restart workers too).
        answers = [scrape(server.url) for _ in range(SCRAPES)]
        restarts = respawns(server)
        master = server.pid

    expected = expected_counts(plan)
    assert sum(expected.values()) == TOTAL
    for text in answers:
        assert_exact(text, expected)
    assert restarts >= 25  # (1,200 requests + 16 scrapes) / 40: about 30

    assert files.samples > 100
    assert files.most <= FILE_BOUND, sorted(files.names)
    owners = set()
    assert len([n for n in files.names if SCRAPE_FILE.match(n)]) <= SCRAPE_FILES
    for name in files.names:
        if SCRAPE_FILE.match(name):
            continue
        match = DB_FILE.match(name) or PID_FILE.match(name)
        assert match, f"unexpected file {name}"
        owners.add(match["owner"])
    assert owners <= SLOTS | {str(master)}
    assert len(files.names) <= FILE_BOUND, sorted(files.names)


# -- per-worker process metrics ------------------------------------------------------------------


def test_process_metrics_of_live_workers_only(tmp_path: Path) -> None:
    """Each live worker's /proc metrics, labelled w1..w4; a killed worker's replacement
    takes its label, and only the live pid is read."""
    directory = tmp_path / "multiproc"
    with UwsgiServer(env={"PROMETHEUS_MULTIPROC_DIR": str(directory), **RESTARTS}) as server:
        pids = wait_for_workers(server, directory)
        send_plan(server.url, request_plan(100, seed=5))
        victim = pids["w2"]
        os.kill(victim, signal.SIGKILL)

        def replaced() -> dict[str, int] | None:
            slots = wait_for_workers(server, directory)
            return slots if slots["w2"] != victim else None

        pids = wait_until(replaced, 30, message="the killed worker was not replaced")
        assert victim not in server.worker_pids()
        for _ in range(8):
            text = scrape(server.url)
            for name in (
                "gunicorn_worker_resident_memory_bytes",
                "gunicorn_worker_open_fds",
                "gunicorn_worker_start_time_seconds",
            ):
                samples = worker_labels(text, name)
                assert set(samples) == SLOTS, name
                assert all(sample > 0 for sample in samples.values()), name
            # The replacement may not have run for a clock tick yet.
            assert set(worker_labels(text, "gunicorn_worker_cpu_seconds_total")) == SLOTS
            assert sum(requests_by_key(text).values()) == 100  # the killed worker's count too
        assert slot_pids(directory) == pids


# -- the model bound in a request ----------------------------------------------------------------


def test_a_bound_model_never_leaks_into_another_request(tmp_path: Path) -> None:
    """uWSGI threads: requests that bind a model interleave with requests that bind none."""
    directory = tmp_path / "multiproc"
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
        "UWSGI_THREADS": "4",
        "UWSGI_MAX_REQUESTS": "50",
        **RESTARTS,
    }
    models = [f"m{i}" for i in range(4)]
    paths = [f"/models/{models[i // 2 % 4]}?pause=0.002" if i % 2 else "/model" for i in range(800)]
    with UwsgiServer(env=env, workers=2) as server:
        answers = parallel(lambda path: http_request(server.url + path), paths, threads=12)
        text = scrape(server.url)
    for path, (status, body) in zip(paths, answers, strict=True):
        assert status == 200, body
        name = path.split("/")[-1].split("?")[0]
        assert json.loads(body)["model"] == (None if path == "/model" else [name, "1"]), path
    counted = {
        (s.labels["route"], s.labels["model"]): s.value
        for s in parse_samples(text)
        if s.name == "http_model_requests_total"
    }
    assert counted == {("/models/<name>", model): 100 for model in models}


# -- directory handling ---------------------------------------------------------------------------


def test_private_directory_is_removed_at_exit(tmp_path: Path) -> None:
    """PROMETHEUS_MULTIPROC_DIR unset: the master makes a private directory; uwsgi.ini's exit
    command removes it (the master runs no Python at exit)."""
    temp = tmp_path / "tmp"
    temp.mkdir()
    plan = request_plan(40, seed=3)
    with UwsgiServer(env={"TMPDIR": str(temp)}) as server:
        (private,) = temp.glob("ml-wsgi-metrics-*")
        wait_for_workers(server, private)
        send_plan(server.url, plan)
        for _ in range(8):
            assert_exact(scrape(server.url), expected_counts(plan))
    assert not private.exists()
    assert list(temp.iterdir()) == []


def test_a_config_without_the_master_import_is_refused(tmp_path: Path) -> None:
    """lazy-apps without ``shared-import``: no worker can empty the directory safely, so the
    app is not loaded and uWSGI exits, naming the fix."""
    config = tmp_path / "uwsgi.ini"
    ini = (Path(__file__).parent.parent / "uwsgi.ini").read_text()
    config.write_text(ini.replace("shared-import = ml_wsgi_metrics.uwsgi\n", ""))
    env = {"PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"), "UWSGI_LAZY_APPS": "1"}
    server = UwsgiServer(env=env, config=config, startup_timeout=30)
    with pytest.raises(RuntimeError, match="exited") as error, server:
        pass
    assert "shared-import = ml_wsgi_metrics.uwsgi" in "".join(error.value.__notes__)
