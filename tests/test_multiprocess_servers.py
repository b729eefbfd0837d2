"""Multiprocess storage under real gunicorn: values set before the start (``preload_app``), and
a server that is not wired with this package's hooks (prometheus_client's own files).
"""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
from e2e_support import ServiceServer, feature_rows, predict_body, train_versions
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from support import REPO, GunicornServer, http_request, parallel, parse_samples

from ml_wsgi_metrics import UNMATCHED
from ml_wsgi_metrics.multiprocess import SLOT_FILE

SHARES = ("model_feature_reference_share", "model_score_reference_share")


def scrape(server: GunicornServer) -> list[Sample]:
    """One ``/metrics`` of the server (whichever worker takes it; not measured)."""
    status, body = http_request(server.url + "/metrics")
    assert status == 200
    return parse_samples(body.decode())


@pytest.mark.parametrize(
    "preload", [pytest.param(True, id="preload"), pytest.param(False, id="no-preload")]
)
def test_every_reference_share_equals_the_profiles(tmp_path: Path, preload: bool) -> None:
    """With ``preload_app`` the master registers the models before ``on_starting`` empties the
    directory; the shares it set must still be scraped, from every worker, exactly."""
    profiles = train_versions(tmp_path / "models", 2)
    expected = {}
    for profile in profiles:
        for feature in profile.features:
            for bin_label, share in zip(feature.bins, feature.shares, strict=True):
                expected[(SHARES[0], profile.version, feature.name, bin_label)] = share
        assert profile.score is not None
        for bin_label, share in zip(profile.score.bins, profile.score.shares, strict=True):
            expected[(SHARES[1], profile.version, "", bin_label)] = share
    rows, _ = feature_rows(20, seed=3)
    with ServiceServer(
        tmp_path / "models", multiproc_dir=tmp_path / "multiproc", workers=3, preload=preload
    ) as server:
        parallel(
            lambda row: http_request(server.url + "/predict", "POST", predict_body([row])), rows
        )
        for _ in range(6):  # several scrapes: several workers
            shares = {
                (s.name, s.labels["version"], s.labels.get("feature", ""), s.labels["bin"]): s.value
                for s in scrape(server)
                if s.name in SHARES
            }
            assert shares == expected


Key = tuple[str, str, str]  # (method, route, status)


def _requests(samples: list[Sample]) -> dict[Key, float]:
    return {
        (s.labels["method"], s.labels["route"], s.labels["status"]): s.value
        for s in samples
        if s.name == "http_requests_total"
    }


def _durations(samples: list[Sample]) -> dict[tuple[str, str], float]:
    return {
        (s.labels["method"], s.labels["route"]): s.value
        for s in samples
        if s.name == "http_request_duration_seconds_count"
    }


def test_a_server_without_this_packages_hooks_writes_every_request_to_the_files(
    tmp_path: Path,
) -> None:
    """gunicorn with a config of its own (``PROMETHEUS_MULTIPROC_DIR`` only), the app wrapped in
    its module, workers restarted by ``max_requests``: prometheus_client's own collector over
    the directory and every worker's ``/metrics`` give the exact totals."""
    directory = tmp_path / "multiproc"
    directory.mkdir(mode=0o700)
    sent: list[tuple[str, str, Key]] = [
        *(("GET", "/", ("GET", "/", "200")) for _ in range(60)),
        *(("GET", f"/items/{n}", ("GET", "/items/<int:item_id>", "200")) for n in range(80)),
        *(("POST", "/items", ("POST", "/items", "201")) for _ in range(20)),
        *(("GET", "/boom", ("GET", "/boom", "500")) for _ in range(10)),
        *(("GET", f"/nowhere/{n}", ("GET", UNMATCHED, "404")) for n in range(15)),
    ]
    expected = dict(collections.Counter(key for _, _, key in sent))
    with GunicornServer(
        "tests.apps.wrapped_app:app",
        config=REPO / "tests" / "apps" / "plain_gunicorn.conf.py",
        env={"PROMETHEUS_MULTIPROC_DIR": str(directory), "GUNICORN_MAX_REQUESTS": "20"},
        workers=3,
    ) as server:

        def send(request: tuple[str, str, Key]) -> int:
            method, path, (_, _, status) = request
            answer, _ = http_request(server.url + path, method, b"x" if method == "POST" else None)
            assert answer == int(status)
            return answer

        parallel(send, sent, threads=6)
        collected = CollectorRegistry()
        MultiProcessCollector(collected, path=str(directory))
        merged = list(s for metric in collected.collect() for s in metric.samples)
        assert _requests(merged) == expected
        served = [scrape(server) for _ in range(8)]  # each may be another (restarted) worker

    assert all(_requests(samples) == expected for samples in served)
    durations = collections.Counter()
    for (method, route, _), count in expected.items():
        durations[(method, route)] += count
    assert _durations(merged) == dict(durations)
    assert all(_durations(samples) == dict(durations) for samples in served)
    in_progress = [s.value for s in merged if s.name == "http_requests_in_progress"]
    assert in_progress and set(in_progress) == {0.0}
    writers = {name.rsplit("_", 1)[1] for name in (p.name for p in directory.iterdir())}
    assert all(SLOT_FILE.fullmatch(p.name) for p in directory.iterdir())
    assert len(writers) > 3  # one file set per pid: restarted workers left theirs (unbounded)
