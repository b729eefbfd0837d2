"""Issue 8, points 3 and 4, end to end: the churn service under gunicorn (4 workers, the repo's
``gunicorn.conf.py``), no mocks.

- Retraining 20 times with 2 live versions: the series on ``/metrics`` stay bounded (request
  series + 2 x the series of one version, the same after every retrain from the 3rd on), the
  retired versions' keys leave the files, their directories go, feedback for their ids is
  refused with reason ``retired`` (410, counted), feedback for a version just published counts
  at any worker at once, and no request gets a 5xx, with predictions sent all along.
- The results page (``GET /predict``) leaves every live model series as it was, and the
  held-out accuracy is a series of its own.
"""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from e2e_support import (
    MODEL,
    ServiceServer,
    feature_rows,
    pinned_request,
    predict_body,
    profile_path,
    train_versions,
)
from prometheus_client.mmap_dict import MmapedDict
from support import ADMIN_TOKEN, FEEDBACK_TOKEN, bearer, http_request, parse_samples, wait_until

from ml_wsgi_metrics.profile import ReferenceProfile
from ml_wsgi_metrics.signals import REJECT_REASONS

RETRAINS = 20
LIVE = 2  # the model signals' default live_versions
RETRAIN_BODY = json.dumps({"n_rows": 500}).encode()  # the smallest training: about 0.3 s
JSON = {"Content-Type": "application/json"}
TOKENS = {"/feedback": FEEDBACK_TOKEN, "/pipeline": ADMIN_TOKEN}  # the service's test tokens

Key = tuple[str, str, str]  # (method, route, status)


class Client:
    """Requests to the service, each counted by (method, route, status) as the middleware
    counts it (``/healthz`` is not measured)."""

    def __init__(self, server: ServiceServer) -> None:
        self.server = server
        self.sent: Counter[Key] = Counter()
        self._lock = threading.Lock()

    def send(self, method: str, path: str, body: bytes | None = None) -> tuple[int, Any]:
        headers = dict(JSON) if body is not None else {}
        if path in TOKENS:
            headers |= bearer(TOKENS[path])
        status, answer = http_request(self.server.url + path, method, body, headers or None)
        self._count(method, path, status)
        return status, json.loads(answer) if answer.startswith(b"{") else answer

    def pinned(
        self, method: str, path: str, body: bytes, accept: Callable[[int], bool] | None = None
    ) -> tuple[int, Any, int]:
        """``send`` on a connection an ``accept``-ed worker holds: status, JSON, the worker."""
        headers = bearer(TOKENS[path]) if path in TOKENS else None
        answer = pinned_request(self.server, method, path, body, accept=accept, headers=headers)
        self._count(method, path, answer.status)
        return answer.status, answer.json(), answer.pid

    def _count(self, method: str, path: str, status: int) -> None:
        with self._lock:
            self.sent[(method, path, str(status))] += 1

    def on_every_worker(self, path: str) -> list[dict[str, Any]]:
        """``GET path`` (not measured) answered by each worker in turn."""
        answers = []
        for pid in self.server.worker_pids():
            answer = pinned_request(self.server, "GET", path, accept=lambda p, pid=pid: p == pid)
            assert answer.status == 200, answer.body
            answers.append(answer.json())
        return answers

    def scrape(self) -> list[Any]:
        status, text = http_request(self.server.url + "/metrics")
        assert status == 200
        return parse_samples(text.decode())


def model_samples(samples: list[Any]) -> dict[tuple[str, tuple[Any, ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in samples
        if s.labels.get("model") == MODEL
    }


def file_versions(directory: Path) -> set[str]:
    """The versions of which some slot file holds a key."""
    found = set()
    for path in directory.glob("*.db"):
        for key, *_ in MmapedDict.read_all_values_from_file(str(path)):
            labels = json.loads(key)[2]
            if labels.get("model") == MODEL:
                found.add(labels["version"])
    return found


def version_directories(models: Path) -> set[str]:
    return {p.name for p in (models / MODEL).iterdir() if p.name.isdigit()}


def test_twenty_retrains_keep_series_bounded_and_refuse_retired_feedback(tmp_path: Path) -> None:
    models, multiproc = tmp_path / "models", tmp_path / "multiproc"
    train_versions(models, 1)
    rows, _ = feature_rows(8, seed=31)
    body = predict_body(rows[:2])
    with ServiceServer(models, multiproc_dir=multiproc, workers=4) as server:
        client = Client(server)
        status, answer = client.send("POST", "/predict", body)
        assert (status, answer["version"]) == (200, "1")
        ids = {"1": [p["id"] for p in answer["predictions"]]}

        stop = threading.Event()
        background: Counter[tuple[int, str]] = Counter()  # (status, version) of each answer

        def predict_all_along() -> None:
            while not stop.is_set():
                status, answer = client.send("POST", "/predict", body)
                background[(status, answer.get("version", "") if status == 200 else "")] += 1

        traffic = threading.Thread(target=predict_all_along, daemon=True)
        traffic.start()
        totals, per_version, requests, retired_sent = [], [], [], 0
        try:
            for round_ in range(1, RETRAINS + 1):
                version = str(round_ + 1)
                status, answer, trainer = client.pinned("POST", "/pipeline", RETRAIN_BODY)
                assert (status, answer["version"]) == (201, version), answer
                status, answer, _ = client.pinned("POST", "/predict", body, trainer.__eq__)
                assert (status, answer["version"]) == (200, version)
                ids[version] = [p["id"] for p in answer["predictions"]]
                # Another worker counts feedback for it at once (not a reload interval later).
                feedback = json.dumps({"id": ids[version][0], "actual": "No"}).encode()
                status, answer, _ = client.pinned("POST", "/feedback", feedback, trainer.__ne__)
                assert status == 200, answer
                live = [str(round_), version]
                # Every worker serves it, and has retired the version before the live ones.
                wait_until(
                    lambda live=live: all(
                        a["live_versions"] == live for a in client.on_every_worker("/healthz")
                    ),
                    30,
                    interval=0.1,
                    message=f"the workers never all had versions {live} live",
                )
                if round_ >= LIVE:
                    retired = json.dumps({"id": ids[str(round_ - 1)][1], "actual": "No"})
                    status, answer = client.send("POST", "/feedback", retired.encode())
                    assert (status, answer["reason"]) == (410, "retired"), answer
                    retired_sent += 1

                samples = client.scrape()
                versions = Counter(
                    s.labels["version"] for s in samples if s.labels.get("model") == MODEL
                )
                assert set(versions) == set(live)
                totals.append(len(samples))
                per_version.append(versions[version])
                requests.append(len(samples) - sum(versions.values()))
                if round_ >= 2:  # every version live now was trained alike: same series
                    assert versions[str(round_)] == versions[version]
                assert file_versions(multiproc) == set(live)
                assert version_directories(models) == set(live)
        finally:
            stop.set()
            traffic.join(60)
        # Bounded: the request series plus LIVE x the series of one version, the same total
        # after every retrain from the 3rd on (the first two add the request series of
        # /pipeline and of feedback accepted and refused).
        assert totals[2:] == [requests[2] + LIVE * per_version[2]] * (RETRAINS - 2)
        assert len(set(requests[2:])) == len(set(per_version[2:])) == 1

        assert sum(background.values()) > 0
        assert {status for status, _ in background} == {200}
        assert all(int(status) < 500 for (_, _, status) in client.sent)
        samples = client.scrape()
        rejected = {
            s.labels["reason"]: s.value
            for s in samples
            if s.name == "model_feedback_rejected_total"
        }
        assert rejected == {reason: 0 for reason in REJECT_REASONS} | {"retired": retired_sent}
        counted = {
            (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
            for s in samples
            if s.name == "http_requests_total"
        }
        assert counted == dict(client.sent)  # compacting files lost no request
        assert counted[("POST", "/feedback", "410")] == retired_sent == RETRAINS - 1


def test_the_results_page_leaves_live_series_alone(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (profile,) = train_versions(models, 1)
    saved = ReferenceProfile.load(profile_path(models, "1"))
    assert saved.accuracy is not None
    with ServiceServer(models, multiproc_dir=tmp_path / "multiproc", workers=2) as server:
        client = Client(server)
        rows, _ = feature_rows(20, seed=32)
        assert client.send("POST", "/predict", predict_body(rows))[0] == 200  # live traffic
        before = model_samples(client.scrape())
        for _ in range(5):
            status, page = client.send("GET", "/predict")
            assert status == 200 and b"confusion" in page
        after = model_samples(client.scrape())
        assert after == before
        predictions = sum(v for (name, _), v in after.items() if name == "model_predictions_total")
        assert predictions == 20
        accuracy = after[("model_reference_accuracy", (("model", MODEL), ("version", "1")))]
        assert accuracy == saved.accuracy == profile.accuracy
        assert client.sent[("GET", "/predict", "200")] == 5
