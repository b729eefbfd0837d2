"""Helpers of the fleet tests: an agent-mode Prometheus beside each instance, the central
Prometheus that receives their remote writes and evaluates the rules, and a real
Alertmanager; the webhook that records what Alertmanager delivers is the fleet demo's.

Each server runs the repository's own file (``prometheus/agent.yml``,
``prometheus/central.yml``, ``alertmanager.yml``) with the test's addresses and short
intervals put in by the fleet demo's builders (:mod:`service.fleet_demo`); the rest (job,
external labels, grouping, receivers) is the file's. They build on :mod:`support` (its
``PrometheusServer`` and process handling)::

    with Webhook() as webhook, AlertmanagerServer(webhook.url) as alertmanager, \\
         CentralServer(rule_files=[rules], alertmanager=alertmanager.address) as central, \\
         AgentServer(service.address, central=central.url, host="web-1", storage=tmp) as agent:
        central.query('sum by (host) (http_requests_total)')
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from support import PrometheusServer, _Process, free_port, http_request

from service.fleet_demo import (
    AGENT_FILE,
    ALERTMANAGER_FILE,
    CENTRAL_FILE,
    Webhook,
    agent_config,
    alertmanager_config,
    central_config,
)

__all__ = [
    "AGENT_FILE",
    "ALERTMANAGER",
    "ALERTMANAGER_FILE",
    "CENTRAL_FILE",
    "AgentServer",
    "AlertmanagerServer",
    "CentralServer",
    "Webhook",
]

#: Debian's ``prometheus-alertmanager`` (the Makefile installs it).
ALERTMANAGER = "prometheus-alertmanager"
#: The agents' remote-write queue in tests: one shard and batches larger than a scrape, so a
#: scrape mostly reaches the central server in one request, sent within a quarter second.
TEST_QUEUE = {"max_shards": 1, "max_samples_per_send": 10000, "batch_send_deadline": "250ms"}


class AgentServer(PrometheusServer):
    """``prometheus --enable-feature=agent,expand-external-labels`` running
    ``prometheus/agent.yml``: it scrapes ``target`` every ``scrape_interval`` and
    remote-writes to ``central`` (a URL), labelling every series ``host=<host>`` (the file's
    ``${FLEET_HOST}``). Its write-ahead log lives in ``storage``, which outlives the server:
    an agent started again on the same ``storage`` takes its log up again."""

    def __init__(
        self,
        target: str,
        *,
        central: str,
        host: str,
        storage: Path,
        scrape_interval: str = "1s",
    ) -> None:
        super().__init__(
            [target],
            scrape_interval=scrape_interval,
            extra_args=["--enable-feature=agent,expand-external-labels"],
        )
        self.central, self.host = central, host
        self.storage = storage  # not in the directory removed on exit
        self.env = {**os.environ, "FLEET_HOST": host}

    def _command(self) -> list[str]:
        # An agent refuses the server's storage flag and keeps its log under its own.
        return [
            argument.replace("--storage.tsdb.path=", "--storage.agent.path=")
            for argument in super()._command()
        ]

    def _config(self) -> dict[str, Any]:
        return agent_config(self.targets[0], self.central, self.scrape_interval, TEST_QUEUE)


class CentralServer(PrometheusServer):
    """``prometheus --web.enable-remote-write-receiver`` running ``prometheus/central.yml``
    with ``rule_files``, evaluated every ``evaluation_interval``, alerting the Alertmanager
    at ``alertmanager`` (``host:port``), which it notifies again every second while an alert
    holds (``--rules.alert.resend-delay``). It scrapes nothing: ready once it answers."""

    def __init__(
        self,
        *,
        rule_files: Sequence[str | os.PathLike[str]],
        alertmanager: str,
        evaluation_interval: str = "1s",
    ) -> None:
        super().__init__(
            ["-"],  # the base class wants a target; the config below has none
            evaluation_interval=evaluation_interval,
            rule_files=rule_files,
            extra_args=["--web.enable-remote-write-receiver", "--rules.alert.resend-delay=1s"],
        )
        self.targets = []
        self.alertmanager = alertmanager

    def _config(self) -> dict[str, Any]:
        return central_config(self.rule_files, self.alertmanager, self.evaluation_interval)


class AlertmanagerServer(_Process):
    """Debian's Alertmanager running ``alertmanager.yml`` for a ``with``, on 127.0.0.1 (no
    cluster port), its notifications to ``webhook`` (a URL) after ``group_wait``; its
    config, storage and log in a temporary directory removed on exit."""

    name = "alertmanager"
    poll_interval = 0.1

    def __init__(self, webhook: str, *, group_wait: str = "1s", group_interval: str = "1s") -> None:
        self.webhook, self.group_wait, self.group_interval = webhook, group_wait, group_interval
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        # Named now, made by _start (mkdtemp's way: a random name, mode 0700).
        self.directory = Path(tempfile.gettempdir(), f"alertmanager-{os.urandom(8).hex()}")
        self._made_directory = False
        super().__init__(self.directory / "alertmanager.log", startup_timeout=30.0)

    def _start(self) -> None:
        self.directory.mkdir(mode=0o700)
        self._made_directory = True
        config = alertmanager_config(self.webhook, self.group_wait, self.group_interval)
        (self.directory / "alertmanager.yml").write_text(json.dumps(config, indent=2))
        super()._start()

    def _command(self) -> list[str]:
        return [
            ALERTMANAGER,
            f"--config.file={self.directory / 'alertmanager.yml'}",
            f"--storage.path={self.directory / 'data'}",
            f"--web.listen-address={self.address}",
            "--cluster.listen-address=",  # no gossip port: a single instance
        ]

    def _ready(self) -> bool:
        try:
            return http_request(self.url + "/-/ready", timeout=5)[0] == 200
        except OSError:
            return False

    def alerts(self) -> list[dict[str, Any]]:
        """The alerts Alertmanager holds (API v2)."""
        status, body = http_request(self.url + "/api/v2/alerts", timeout=10)
        assert status == 200, body
        return list(json.loads(body))

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            if self._made_directory:
                shutil.rmtree(self.directory, ignore_errors=True)
