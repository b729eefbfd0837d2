"""The fleet demo (``make demo-fleet``): ``prometheus/agent.yml``, ``prometheus/central.yml``
and ``alertmanager.yml`` deployed on one machine, all on 127.0.0.1.

Three instances of the churn service (gunicorn, 2 workers each), each scraped by its own
agent-mode Prometheus (``host-1`` ... ``host-3``) that remote-writes to one central Prometheus;
the central server runs the rules generated from the model's profile with a 30-second window
and sends its alerts to Alertmanager, whose webhook is a small HTTP server of this demo that
prints every notification it receives. The load generator sends undrifted traffic to the
three instances, then drifted traffic (``ModelFeatureDrift`` is delivered), then undrifted
traffic again until Alertmanager reports the drift resolved. About two minutes; everything
it started is stopped at the end or on Ctrl-C.

    python -m service.fleet_demo

The config builders (the repository's files with other addresses and intervals) and the
webhook receiver are also the fleet tests' (``tests/fleet_support.py``).
"""

from __future__ import annotations

import argparse
import functools
import http.server
import json
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import yaml  # type: ignore[import-untyped]

from ml_wsgi_metrics.__main__ import main as rules_main
from service import loadgen
from service._servers import REPO, _Process, free_port, http_request, wait_until
from service.pipeline import PROFILE_FILE, latest_version, load_config, train

__all__ = [
    "AGENT_FILE",
    "ALERTMANAGER_FILE",
    "CENTRAL_FILE",
    "Webhook",
    "agent_config",
    "alertmanager_config",
    "central_config",
    "main",
]

AGENT_FILE = REPO / "prometheus" / "agent.yml"
CENTRAL_FILE = REPO / "prometheus" / "central.yml"
ALERTMANAGER_FILE = REPO / "alertmanager.yml"
HOSTS = 3
WINDOW, ALERT_FOR = "30s", "5s"  # the demo's rules: drift over 30 s, alerts after 5 s
RATE = 15.0  # requests per second to each instance


# -- the repository's files, with the demo's or a test's addresses and intervals ----------------


def _load(path: Path) -> dict[str, Any]:
    loaded = yaml.safe_load(path.read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not a YAML mapping")
    return loaded


def agent_config(
    target: str, central: str, scrape_interval: str = "1s", queue: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``prometheus/agent.yml`` scraping ``target`` (``host:port``) every ``scrape_interval``,
    remote-writing to the central server at ``central`` (its base URL) with ``queue`` as the
    queue's settings; its ``host`` label stays the file's ``${FLEET_HOST}``."""
    config = _load(AGENT_FILE)
    config["global"].update(scrape_interval=scrape_interval, scrape_timeout=scrape_interval)
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [target]}]
    (remote,) = config["remote_write"]
    remote["url"] = f"{central}/api/v1/write"
    if queue:
        remote["queue_config"] = dict(queue)
    return config


def central_config(
    rule_files: Sequence[str], alertmanager: str, evaluation_interval: str = "1s"
) -> dict[str, Any]:
    """``prometheus/central.yml`` with ``rule_files``, alerting ``alertmanager`` (``host:port``)."""
    config = _load(CENTRAL_FILE)
    config["global"]["evaluation_interval"] = evaluation_interval
    config["rule_files"] = list(rule_files)
    (manager,) = config["alerting"]["alertmanagers"]
    manager["static_configs"] = [{"targets": [alertmanager]}]
    return config


def alertmanager_config(
    webhook: str, group_wait: str = "1s", group_interval: str = "1s"
) -> dict[str, Any]:
    """``alertmanager.yml`` notifying ``webhook`` (a URL) after ``group_wait``."""
    config = _load(ALERTMANAGER_FILE)
    config["route"].update(group_wait=group_wait, group_interval=group_interval)
    (receiver,) = config["receivers"]
    (hook,) = receiver["webhook_configs"]
    hook["url"] = webhook
    return config


# -- the webhook --------------------------------------------------------------------------------


class Webhook:
    """An HTTP server on 127.0.0.1 that records the JSON of every POST to ``path``
    (Alertmanager's webhook notifications) from a thread, for a ``with``; each is also handed
    to ``on_notification``."""

    def __init__(
        self,
        path: str = "/alerts",
        on_notification: Callable[[dict[str, Any]], Any] | None = None,
    ) -> None:
        self.path = path
        self._received: list[dict[str, Any]] = []
        self._arrived = threading.Condition()
        webhook = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                known = self.path == webhook.path
                self.send_response(200 if known else 404)
                self.send_header("Content-Length", "0")
                self.end_headers()
                if known:
                    webhook._record(json.loads(body))

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._on_notification = on_notification

    def _record(self, notification: dict[str, Any]) -> None:
        with self._arrived:
            self._received.append(notification)
            self._arrived.notify_all()
        if self._on_notification is not None:
            self._on_notification(notification)

    def received(self) -> list[dict[str, Any]]:
        """Every notification so far, in arrival order."""
        with self._arrived:
            return list(self._received)

    def wait_for(
        self, condition: Callable[[dict[str, Any]], bool], timeout: float, message: str = ""
    ) -> dict[str, Any]:
        """The first notification that meets ``condition``; TimeoutError after ``timeout`` s."""

        def first() -> dict[str, Any] | None:
            return next((n for n in self._received if condition(n)), None)

        with self._arrived:
            found = self._arrived.wait_for(first, timeout)
            if found is None:
                raise TimeoutError(f"{message or 'no such notification'}: {self._received}")
            return found

    def __enter__(self) -> Webhook:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# -- the demo's servers ---------------------------------------------------------------------


class _Server(_Process):
    """A child of the demo (its own process group: Ctrl-C reaches only the demo, which stops
    it), logging to ``log``, ready once ``ready_url`` answers 200."""

    def __init__(
        self, name: str, command: list[str], log: Path, ready_url: str, env: dict[str, str]
    ) -> None:
        super().__init__(log, cwd=REPO, env=env, startup_timeout=60.0)
        self.name, self.command, self.ready_url = name, command, ready_url

    def _command(self) -> list[str]:
        return self.command

    def _ready(self) -> bool:
        try:
            return http_request(self.ready_url, timeout=5)[0] == 200
        except OSError:
            return False


class Fleet:
    """The demo's servers, in ``directory``; :meth:`start` starts them all at once."""

    def __init__(self, directory: Path, models_dir: Path, rules: Path, webhook: str) -> None:
        self.directory = directory
        self.central = f"http://127.0.0.1:{free_port()}"
        self.alertmanager = f"127.0.0.1:{free_port()}"
        self.instances = [f"127.0.0.1:{free_port()}" for _ in range(HOSTS)]
        env = dict(os.environ, CHURN_MODELS_DIR=str(models_dir))
        env["CHURN_FEEDBACK_TOKEN"] = self.token = secrets.token_urlsafe(32)
        self.servers = [
            self._server("alertmanager", alertmanager_config(webhook), env),
            self._server("central", central_config([str(rules)], self.alertmanager), env),
        ]
        for i, address in enumerate(self.instances, start=1):
            multiproc = directory / f"multiproc-{i}"
            multiproc.mkdir()
            settings = {"BIND": address, "WEB_CONCURRENCY": "2", "GUNICORN_PRELOAD": "1"}
            settings["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc)
            command = [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                "gunicorn.conf.py",
                "service.app:app",
            ]
            self.servers.append(
                _Server(
                    f"host-{i}",
                    command,
                    directory / f"host-{i}.log",
                    f"http://{address}/healthz",
                    env | settings,
                )
            )
            config = agent_config(address, self.central)
            self.servers.append(
                self._server(f"agent-{i}", config, env | {"FLEET_HOST": f"host-{i}"})
            )

    def _server(self, name: str, config: dict[str, Any], env: dict[str, str]) -> _Server:
        file = self.directory / f"{name}.yml"
        file.write_text(json.dumps(config, indent=2))
        data = self.directory / f"{name}-data"
        if name == "alertmanager":
            command = [
                "prometheus-alertmanager",
                f"--config.file={file}",
                f"--storage.path={data}",
                f"--web.listen-address={self.alertmanager}",
                "--cluster.listen-address=",
            ]
            return _Server(
                name,
                command,
                self.directory / f"{name}.log",
                f"http://{self.alertmanager}/-/ready",
                env,
            )
        port = urllib.parse.urlsplit(self.central).port if name == "central" else free_port()
        command = ["prometheus", f"--config.file={file}", f"--web.listen-address=127.0.0.1:{port}"]
        if name == "central":
            command += [
                f"--storage.tsdb.path={data}",
                "--web.enable-remote-write-receiver",
                "--rules.alert.resend-delay=1s",
            ]
        else:
            command += [
                f"--storage.agent.path={data}",
                "--enable-feature=agent,expand-external-labels",
            ]
        return _Server(
            name, command, self.directory / f"{name}.log", f"http://127.0.0.1:{port}/-/ready", env
        )

    def start(self, stack: ExitStack) -> None:
        """Start every server at once; ``stack`` stops them all at once."""
        stack.callback(self._each, lambda server: server.__exit__(None, None, None))
        self._each(lambda server: server.__enter__())

    def _each(self, action: Callable[[_Server], Any]) -> None:
        with ThreadPoolExecutor(len(self.servers)) as pool:
            list(pool.map(action, self.servers))

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query on the central server."""
        url = f"{self.central}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        status, body = http_request(url, timeout=10)
        if status != 200:
            raise RuntimeError(f"central Prometheus: {status} {body[:300]!r}")
        return list(json.loads(body)["data"]["result"])


# -- the run ------------------------------------------------------------------------------------


def _models(models_dir: Path, out: Callable[[str], Any]) -> Path:
    """The published model's profile, after training a version if there is none."""
    name = load_config().name
    version = latest_version(models_dir, name)
    if version is None:
        version = train(models_dir=models_dir).version
        out(f"trained {name} version {version} into {models_dir}")
    return models_dir / name / version / PROFILE_FILE


class _Traffic:
    """The load generator against every instance at once, from daemon threads, for a
    ``with``; on exit (Ctrl-C included) the threads are told to stop."""

    def __init__(self, fleet: Fleet, requests: int, drifted: bool) -> None:
        self.stop = threading.Event()
        self.summaries: list[loadgen.Summary] = []
        self._threads = [
            threading.Thread(target=self._run, args=(fleet, i, requests, drifted), daemon=True)
            for i in range(HOSTS)
        ]

    def _run(self, fleet: Fleet, index: int, requests: int, drifted: bool) -> None:
        summary = loadgen.run(
            f"http://{fleet.instances[index]}",
            requests,
            concurrency=4,
            drift_from=0 if drifted else None,
            rate=RATE,
            seed=index + (100 if drifted else 0),
            page_every=0,
            feedback_token=fleet.token,
            stop=self.stop,
            max_seconds=180,
        )
        self.summaries.append(summary)

    def wait(self) -> int:
        """Wait for every request to be sent (short joins: Ctrl-C reaches the main thread);
        the rows scored."""
        for thread in self._threads:
            while thread.is_alive():
                thread.join(0.2)
        return sum(summary.rows for summary in self.summaries)

    def __enter__(self) -> _Traffic:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.wait()


def _shown(notification: dict[str, Any]) -> str:
    """A notification's JSON less its bookkeeping (URLs, keys, fingerprints)."""
    alerts = [
        {key: alert[key] for key in ("status", "labels", "annotations", "startsAt", "endsAt")}
        for alert in notification["alerts"]
    ]
    shown = {key: notification[key] for key in ("receiver", "status", "groupLabels")}
    return json.dumps(shown | {"alerts": alerts}, indent=2)


def _drifted_features(notification: dict[str, Any], status: str) -> set[str]:
    """The features of the ``ModelFeatureDrift`` alerts of a notification of ``status``."""
    if notification["status"] != status:
        return set()
    return {
        alert["labels"]["feature"]
        for alert in notification["alerts"]
        if alert["labels"].get("alertname") == "ModelFeatureDrift"
    }


def _resolves(feature: str, notification: dict[str, Any]) -> bool:
    return feature in _drifted_features(notification, "resolved")


def run(models_dir: Path, out: Callable[[str], Any]) -> int:
    started = time.monotonic()

    def say(message: str) -> None:
        out(f"[{time.monotonic() - started:6.1f}s] {message}")

    stopping = threading.Event()

    def delivered(notification: dict[str, Any]) -> None:
        if not stopping.is_set():
            say(f"webhook: Alertmanager delivered\n{_shown(notification)}")

    with tempfile.TemporaryDirectory(prefix="fleet-demo-") as tmp, ExitStack() as stack:
        directory = Path(tmp)
        profile = _models(models_dir, say)
        rules = directory / "churn_rules.yml"
        options = ["--window", WINDOW, "--ops-window", WINDOW, "--alert-for", ALERT_FOR]
        if rules_main(["rules", "--profile", str(profile), "-o", str(rules), *options]) != 0:
            raise RuntimeError("could not generate the rules")
        webhook = stack.enter_context(Webhook(on_notification=delivered))
        fleet = Fleet(directory, models_dir, rules, webhook.url)
        say(f"starting {HOSTS} instances, their agents, the central Prometheus, Alertmanager")
        fleet.start(stack)
        hosts = 'count by (host) (up{job="flask_app"} == 1)'
        wait_until(
            lambda: len(fleet.query(hosts)) == HOSTS, 60, 0.2, "the agents' samples never arrived"
        )
        say(
            f"central Prometheus {fleet.central} receives all {HOSTS} hosts; Alertmanager "
            f"http://{fleet.alertmanager}; webhook {webhook.url}"
        )

        requests = int(RATE * 8)
        say(f"undrifted: {requests} requests to each instance ...")
        with _Traffic(fleet, requests, drifted=False) as traffic:
            say(f"undrifted done: {traffic.wait()} rows scored")
        requests = int(RATE * 20)
        say(f"drifted (MonthlyCharges +10-20 %, more month-to-month): {requests} each ...")
        with _Traffic(fleet, requests, drifted=True) as traffic:
            say(f"drifted done: {traffic.wait()} rows scored")
        webhook.wait_for(lambda n: bool(_drifted_features(n, "firing")), 60, "no drift alert")
        psi = fleet.query(f"topk(3, ml:feature_psi:{WINDOW})")
        say(
            "central PSI now: "
            + ", ".join(f"{r['metric']['feature']} {float(r['value'][1]):.3f}" for r in psi)
        )

        say(f"undrifted again until the drift leaves the {WINDOW} window and resolves ...")
        fired = set().union(*(_drifted_features(n, "firing") for n in webhook.received()))
        with _Traffic(fleet, int(RATE * 120), drifted=False) as traffic:
            for feature in sorted(fired):
                resolved = functools.partial(_resolves, feature)
                webhook.wait_for(resolved, 120, f"the drift of {feature} never resolved")
        say(f"resolved: {', '.join(sorted(fired))}; {traffic.wait()} more rows scored")
        (series,) = fleet.query('count({__name__=~".+"})')
        say(
            f"{len(webhook.received())} notifications delivered; the central server holds "
            f"{series['value'][1]} series for {HOSTS} hosts; stopping everything"
        )
        stopping.set()
    return 0


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.fleet_demo", description=__doc__)
    parser.add_argument("--models-dir", help="default: the config's (var/models)")
    args = parser.parse_args(argv)
    models_dir = Path(args.models_dir or load_config().models_dir)
    for name in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), _interrupt)
    try:
        return run(models_dir, lambda line: print(line, flush=True))
    except KeyboardInterrupt:
        print("\ninterrupted: every server is stopped", flush=True)
        return 130
    except (RuntimeError, TimeoutError, OSError, ValueError) as error:
        print(f"fleet demo failed: {error}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
