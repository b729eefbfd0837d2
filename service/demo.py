"""The demo, README command one (``make demo`` runs ``python -m service.demo``).

Trains the churn model if none is published, writes the rules with a short window into a
temporary copy of ``prometheus/``, starts gunicorn (4 workers) and a real Prometheus on
127.0.0.1, sends undrifted traffic and then drifted traffic with wrong labels (see
:mod:`service.loadgen`), and prints what Prometheus computed: requests and p95 latency per
route, predictions by model and version, PSI per feature before and during the drift, accuracy
and the alerts that fire. Everything it started is stopped at the end, on Ctrl-C or SIGTERM.
The labels go to ``POST /feedback`` with the back office's token: ``$CHURN_FEEDBACK_TOKEN``,
or one generated for the run, given to gunicorn and the load generator.

    python -m service.demo                 # about 2 minutes
    python -m service.demo --keep-running  # then leave the servers up until Ctrl-C
    python -m service.demo --quick         # a 30-second smoke run (no wait for alerts)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.rules import RuleSettings, generate_rules, render_yaml
from service import loadgen
from service._servers import (
    REPO,
    Gunicorn,
    Prometheus,
    free_port,
    port_is_free,
    prometheus_config,
    wait_until,
    write_config,
)
from service.demo_report import EXPECTED_ALERTS, Report, Snapshot, number
from service.pipeline import load_config, train
from service.published import PROFILE_FILE, latest_version

__all__ = ["FULL", "QUICK", "Plan", "main"]

DASHBOARD = "grafana/dashboards/ml-wsgi-metrics.json"


@dataclass(frozen=True)
class Plan:
    """Sizes and windows of a demo run.

    The rules' window is short so that the drift phase dominates it; the drift alert fires
    when PSI exceeds a critical value that shrinks as rows accumulate (see
    :mod:`ml_wsgi_metrics.rules`), so undrifted traffic of the same size stays silent.
    """

    window: str  # drift, accuracy and rate windows of the demo's rules
    alert_for: str  # how long a drift or accuracy condition holds before it fires
    rate: float  # requests per second sent by the load generator
    clean_requests: int  # phase 1: undrifted, true labels
    drift_requests: int  # phase 2: drifted rows, labels flipped with probability ``flip``
    flip: float
    feedback_delay: float  # seconds from a prediction to its label
    alert_wait: float  # seconds to wait for the expected alerts after phase 2
    pages: bool  # a GET /predict (it scores the 1,409 held-out rows) first in phase 1


FULL = Plan("1m", "10s", 40.0, 1200, 1800, 0.3, 2.0, 45.0, True)
QUICK = Plan("1m", "2s", 40.0, 240, 320, 0.3, 0.5, 3.0, False)


class Progress:
    """One line per step, stamped with the seconds since the start."""

    def __init__(self, out: Callable[[str], Any] = print) -> None:
        self.started = time.monotonic()
        self.out = out

    def __call__(self, message: str) -> None:
        self.out(f"[{time.monotonic() - self.started:6.1f}s] {message}")


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _port(wanted: int, what: str, progress: Progress) -> int:
    if wanted == 0:
        return free_port()
    if port_is_free(wanted):
        return wanted
    port = free_port()
    progress(f"port {wanted} is busy: {what} uses {port}")
    return port


class Demo:
    def __init__(self, args: argparse.Namespace, out: Callable[[str], Any] = print) -> None:
        self.args = args
        self.plan = QUICK if args.quick else FULL
        self.out = out
        self.progress = Progress(out)
        self.w = self.plan.window
        token = os.environ.get(loadgen.FEEDBACK_TOKEN_ENV)
        self.feedback_token = token or secrets.token_urlsafe(32)  # the back office's, for /feedback

    # -- steps ----------------------------------------------------------------------------

    def model(self) -> tuple[Path, ReferenceProfile]:
        """The published model's profile, after training version 1 if there is none."""
        config = load_config()
        models_dir = Path(self.args.models_dir or config.models_dir)
        version = latest_version(models_dir, config.name)
        if version is None:
            started = time.monotonic()
            result = train(models_dir=models_dir)
            version = result.version
            self.progress(
                f"trained {config.name} version {version} in {time.monotonic() - started:.1f} s "
                f"(held-out accuracy {result.metrics['accuracy']:.3f}) into {models_dir}"
            )
        else:
            self.progress(f"model {config.name} version {version} found in {models_dir}")
        profile = models_dir / config.name / version / PROFILE_FILE
        return models_dir, ReferenceProfile.load(profile)

    def rules(self, directory: Path, profile: ReferenceProfile) -> Path:
        """A copy of ``prometheus/`` whose churn rules use the demo's short window."""
        rules_dir = directory / "prometheus"
        if (REPO / "prometheus").is_dir():
            shutil.copytree(REPO / "prometheus", rules_dir)
        rules_dir.mkdir(exist_ok=True)
        output = rules_dir / "churn_rules.yml"
        settings = RuleSettings(window=self.w, ops_window=self.w, alert_for=self.plan.alert_for)
        rules, warnings = generate_rules([profile], settings)
        for warning in warnings:
            self.progress(f"warning: {warning}")
        header = f"Generated by python -m service.demo for {profile.model} {profile.version}"
        output.write_text(render_yaml(rules, header=header))
        self.progress(
            f"rules for {profile.model} {profile.version}: window {self.w}, alerts after "
            f"{self.plan.alert_for}, in {output}"
        )
        return output

    def phase(
        self, name: str, url: str, requests: int, drifted: bool, seed: int
    ) -> loadgen.Summary:
        plan = self.plan
        what = f"drifted rows, labels flipped at {plan.flip:.0%}" if drifted else "undrifted"
        self.progress(
            f"{name}: {requests} requests ({what}) at {plan.rate:.0f}/s, "
            f"~{requests / plan.rate:.0f} s ..."
        )
        summary = loadgen.run(
            url,
            requests,
            concurrency=8,
            drift_from=0 if drifted else None,
            flip=plan.flip if drifted else 0.0,
            feedback_delay=plan.feedback_delay,
            page_every=requests if plan.pages and not drifted else 0,
            rate=plan.rate,
            seed=seed,
            data=self.data,
            feedback_token=self.feedback_token,
        )
        self.progress(
            f"{name} done in {summary.seconds:.1f} s: {summary.rows} rows scored, "
            f"{summary.feedback_accepted} labels, {summary.count(status='4')} 4xx, "
            f"{summary.errors} network errors"
        )
        return summary

    def settle(self, prometheus: Prometheus, sent: int) -> None:
        """Wait for a scrape that saw every request sent, then for a rule evaluation."""
        started = time.monotonic()

        def counted() -> bool:
            return prometheus.values("sum(http_requests_total)").get((), 0.0) >= sent

        wait_until(counted, 30, 0.2, f"Prometheus did not count {sent} requests within 30 s")
        seen = time.time()

        def evaluated() -> bool:
            stamps = [
                prometheus.values(f"min(timestamp({name}))").get((), 0.0)
                for name in (f"ml:feature_psi:{self.w}", f"ml:http_requests:rate{self.w}")
            ]
            return min(stamps) > seen

        wait_until(evaluated, 30, 0.2, "the rules were not evaluated within 30 s")
        self.progress(f"Prometheus scraped and evaluated it ({time.monotonic() - started:.1f} s)")

    def snapshot(self, prometheus: Prometheus, seconds: float) -> Snapshot:
        """The model's statistics now, and the alerts that fired in the last ``seconds``."""
        w = self.w
        psi = {k[0]: v for k, v in prometheus.values(f"ml:feature_psi:{w}", "feature").items()}
        critical = {
            k[0]: v for k, v in prometheus.values(f"ml:feature_psi_critical:{w}", "feature").items()
        }
        for series, key in ((f"ml:score_psi:{w}", psi), (f"ml:score_psi_critical:{w}", critical)):
            for value in prometheus.values(series).values():
                key["(score)"] = value
        rows = max(prometheus.values(f"ml:feature_rows:increase{w}").values(), default=0.0)
        accuracy = next(iter(prometheus.values(f"ml:accuracy:{w}").values()), None)
        labels = sum(prometheus.values(f"ml:labels:increase{w}").values())
        fired = prometheus.values(
            f'max by (alertname) (max_over_time(ALERTS{{alertstate="firing"}}[{seconds:.0f}s]))',
            "alertname",
        )
        return Snapshot(psi, critical, rows, accuracy, labels, {name for (name,) in fired})

    def wait_for_alerts(self, prometheus: Prometheus) -> list[dict[str, Any]]:
        """The active alerts, once the expected ones fire (or after ``alert_wait`` s)."""
        started = time.monotonic()
        deadline = started + self.plan.alert_wait
        while True:
            alerts = prometheus.alerts()
            firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
            if set(EXPECTED_ALERTS) <= firing or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        self.progress(
            f"alerts firing: {', '.join(sorted(firing)) or 'none'} "
            f"({time.monotonic() - started:.1f} s after the drift phase)"
        )
        return alerts

    # -- the report -----------------------------------------------------------------------

    def report(
        self,
        prometheus: Prometheus,
        sent: loadgen.Summary,
        profile: ReferenceProfile,
        before: Snapshot,
        during: Snapshot,
        alerts: list[dict[str, Any]],
    ) -> None:
        report = Report(self.out, self.w, verdict=not self.args.quick)
        report(prometheus, sent, profile, before, during, alerts)

    def where_to_look(self, service: Gunicorn, prometheus: Prometheus) -> None:
        out = self.out
        out(f"  Prometheus UI   {prometheus.url}/classic/graph  (try ml:feature_psi:{self.w})")
        out(f"  alerts          {prometheus.url}/classic/alerts")
        out(f"  results page    {service.url}/predict  (HTML: scores and accuracy)")
        out(f"  metrics         {service.url}/metrics")
        out(
            f"  retrain         POST {service.url}/pipeline with 'Authorization: Bearer "
            "$CHURN_ADMIN_TOKEN' (disabled unless CHURN_ADMIN_TOKEN was set for the demo)"
        )
        out(f"  dashboard       {DASHBOARD}  (Grafana; provisioning in grafana/provisioning/)")

    # -- the run --------------------------------------------------------------------------

    def run(self) -> int:
        binary = shutil.which(self.args.prometheus)
        if binary is None:
            self.out(
                f"error: {self.args.prometheus!r} not found: `make setup` installs Debian's "
                "prometheus package (apt-get install --no-install-recommends prometheus)"
            )
            return 2
        stack = contextlib.ExitStack()
        try:
            directory = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="demo-")))
            models_dir, profile = self.model()
            self.rules(directory, profile)
            self.data = loadgen.load_rows()
            service = stack.enter_context(self.gunicorn(directory, models_dir))
            prometheus = stack.enter_context(self.prometheus(directory, service, binary))
            self.out("  While it runs, look at:")
            self.where_to_look(service, prometheus)
            self.drift(service, prometheus, profile)
            self.out("")
            if self.args.keep_running:
                self.out("Servers keep running (--keep-running); Ctrl-C stops them:")
                self.where_to_look(service, prometheus)
                while True:
                    time.sleep(3600)
            self.progress("done; stopping gunicorn and Prometheus (--keep-running leaves them up)")
            return 0
        finally:
            for name in ("SIGINT", "SIGTERM", "SIGHUP"):  # let the clean-up finish
                signal.signal(getattr(signal, name), signal.SIG_IGN)
            stack.close()

    @contextlib.contextmanager
    def gunicorn(self, directory: Path, models_dir: Path) -> Iterator[Gunicorn]:
        """The service under gunicorn, serving the models of ``models_dir``."""
        started = time.monotonic()
        with Gunicorn(
            port=_port(self.args.port, "gunicorn", self.progress),
            workers=self.args.workers,
            env={
                "CHURN_MODELS_DIR": str(models_dir.absolute()),
                loadgen.FEEDBACK_TOKEN_ENV: self.feedback_token,
            },
            log_path=directory / "gunicorn.log",
        ) as service:
            self.progress(
                f"gunicorn: {self.args.workers} workers on {service.url} (pid {service.pid}), "
                f"ready in {time.monotonic() - started:.1f} s"
            )
            yield service

    @contextlib.contextmanager
    def prometheus(self, directory: Path, service: Gunicorn, binary: str) -> Iterator[Prometheus]:
        """A Prometheus scraping ``service`` every second, with the rules in ``directory``."""
        config = directory / "prometheus.yml"
        write_config(
            config,
            prometheus_config(
                [service.address],
                job="flask_app",
                scrape_interval="1s",
                scrape_timeout="1s",
                rule_files=["prometheus/*_rules.yml"],
            ),
        )
        started = time.monotonic()
        with Prometheus(
            config,
            port=_port(self.args.prometheus_port, "Prometheus", self.progress),
            storage=directory / "data",
            log_path=directory / "prometheus.log",
            binary=binary,
        ) as prometheus:
            prometheus.wait_for_targets([service.address])
            self.progress(
                f"Prometheus on {prometheus.url} (pid {prometheus.pid}): scraping every 1 s, "
                f"target up after {time.monotonic() - started:.1f} s"
            )
            yield prometheus

    def drift(self, service: Gunicorn, prometheus: Prometheus, profile: ReferenceProfile) -> None:
        """Undrifted traffic, then drifted traffic with wrong labels; report what Prometheus saw."""
        plan = self.plan
        phase_started = time.monotonic()
        clean = self.phase("phase 1", service.url, plan.clean_requests, False, self.args.seed)
        self.settle(prometheus, sum(clean.requests.values()))
        before = self.snapshot(prometheus, time.monotonic() - phase_started)
        worst = max(before.psi, key=lambda f: before.psi[f] / before.critical.get(f, 1e9))
        self.progress(
            f"before drift: highest PSI/critical is {worst} "
            f"{before.psi[worst]:.4f}/{before.critical.get(worst, float('nan')):.4f}, "
            f"accuracy {number(before.accuracy, 3)}"
        )
        drift = self.phase("phase 2", service.url, plan.drift_requests, True, self.args.seed + 1)
        sent = clean.add(drift)
        self.settle(prometheus, sum(sent.requests.values()))
        during = self.snapshot(prometheus, 1)
        alerts = self.wait_for_alerts(prometheus)
        self.report(prometheus, sent, profile, before, during, alerts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m service.demo",
        description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run (~30 s)")
    parser.add_argument("--keep-running", action="store_true", help="leave servers up")
    parser.add_argument("--port", type=int, default=8000, help="gunicorn (0: any free port)")
    parser.add_argument("--prometheus-port", type=int, default=9090, help="0: any free port")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--models-dir", help="default: the config's (var/models)")
    parser.add_argument("--prometheus", default="prometheus", help="the Prometheus binary")
    parser.add_argument("--seed", type=int, default=0, help="seed of the load generator")
    args = parser.parse_args(argv)
    for name in ("SIGTERM", "SIGHUP"):
        signal.signal(getattr(signal, name), _interrupt)
    demo = Demo(args, out=lambda line: print(line, flush=True))
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\ninterrupted: gunicorn and Prometheus are stopped", flush=True)
        return 130
    except (RuntimeError, TimeoutError, OSError, ValueError) as error:
        notes = getattr(error, "__notes__", ())  # a server's log tail
        print(f"demo failed: {error}", *notes, sep="\n", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
