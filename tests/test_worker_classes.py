"""gunicorn's ``gthread`` and ``gevent`` worker classes under the repository's config.

Each test starts ``python -m gunicorn -c gunicorn.conf.py tests.apps.flask_app:app`` with 4
workers of one class, restarting every 20-40 requests (``GUNICORN_MAX_REQUESTS``), and sends
concurrent traffic mixing the usual routes with requests that bind a model (``/models/<name>``,
pausing so other requests of the same worker run meanwhile) and requests that only report the
binding (``/model``). Threads and greenlets serve request after request: a binding must never
outlive its request, and every request must be counted exactly once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import GunicornServer, http_request, parallel, parse_samples
from test_gunicorn import (
    RequestKey,
    assert_exact,
    expected_counts,
    request_plan,
    scrape,
    value,
)

TOTAL = 1_200
BINDINGS = 200  # of them: 50 per model, as many /model requests
MODELS = [f"m{i}" for i in range(4)]
SCRAPES = 12

Plan = list[tuple[str, str, bytes | None, RequestKey]]


def binding_plan(seed: int) -> Plan:
    """``BINDINGS`` requests binding a model, as many reporting the binding, interleaved."""
    plan: Plan = []
    for i in range(BINDINGS):
        plan.append(
            ("GET", f"/models/{MODELS[i % 4]}?pause=0.002", None, ("GET", "/models/<name>", "200"))
        )
        plan.append(("GET", "/model", None, ("GET", "/model", "200")))
    random.Random(seed).shuffle(plan)
    return plan


def send(url: str, plan: Plan, clients: int) -> list[tuple[int, bytes]]:
    """Send every planned request once (never retried); ``(status, body)`` of each."""

    def one(request: tuple[str, str, bytes | None, RequestKey]) -> tuple[int, bytes]:
        method, path, body, _ = request
        return http_request(url + path, method, body)

    return parallel(one, plan, clients)


def bound_models(plan: Plan, answers: list[tuple[int, bytes]]) -> None:
    """Each answer has its planned status; each request saw its own binding, or none."""
    for (_, path, _, key), (status, body) in zip(plan, answers, strict=True):
        assert str(status) == key[2], (path, status, body[:300])
        if key[1] == "/models/<name>":
            assert json.loads(body)["model"] == [path.split("/")[2].split("?")[0], "1"], path
        elif key[1] == "/model":
            assert json.loads(body)["model"] is None, path


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"GUNICORN_WORKER_CLASS": "gthread", "GUNICORN_THREADS": "4"}, id="gthread"),
        pytest.param({"GUNICORN_WORKER_CLASS": "gevent"}, id="gevent"),
    ],
)
def test_exact_totals_and_no_model_leak_across_restarts(
    settings: dict[str, str], tmp_path: Path
) -> None:
    plan = request_plan(TOTAL - 2 * BINDINGS, seed=13) + binding_plan(seed=17)
    random.Random(19).shuffle(plan)
    env = {
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "multiproc"),
        "GUNICORN_MAX_REQUESTS": "20",
        "GUNICORN_MAX_REQUESTS_JITTER": "20",
        **settings,
    }
    with GunicornServer(env=env) as server:
        answers = send(server.url, plan, clients=16)
        scrapes = [scrape(server.url) for _ in range(SCRAPES)]

    bound_models(plan, answers)
    expected = expected_counts(plan)
    assert sum(expected.values()) == TOTAL
    for text in scrapes:
        assert_exact(text, expected)
        models = {
            (s.labels["route"], s.labels["model"]): s.value
            for s in parse_samples(text)
            if s.name == "http_model_requests_total"
        }
        assert models == {("/models/<name>", model): BINDINGS / 4 for model in MODELS}
    restarts = value(scrapes[-1], "gunicorn_worker_restarts_total")
    # 1,212 requests / 20-40 a worker: about 40 (gthread); a gevent worker that reached its
    # quota serves the requests it accepted meanwhile: about half as many restarts.
    assert restarts is not None and restarts >= 12
