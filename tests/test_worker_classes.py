"""gunicorn's ``gthread`` and ``gevent`` worker classes under the repository's config.

Each test starts ``python -m gunicorn -c gunicorn.conf.py tests.apps.flask_app:app`` with 4
workers of one class, restarting every 20-40 requests (``GUNICORN_MAX_REQUESTS``), and sends
concurrent traffic, in chunks each followed by a restart at least, mixing the usual routes
with requests that bind a model (``/models/<name>``, pausing so other requests of the same
worker run meanwhile) and requests that only report the binding (``/model``).
Threads and greenlets serve request after request: a binding must never outlive its request,
and every request must be counted exactly once.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from support import GunicornServer, http_request, parallel, parse_samples, wait_until
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
CHUNKS = 6  # the traffic is sent in chunks, each followed by at least one restart

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


def restarts(url: str, text: str | None = None) -> float:
    """``gunicorn_worker_restarts_total``, from ``text`` or a scrape (not counted)."""
    found = value(scrape(url) if text is None else text, "gunicorn_worker_restarts_total")
    assert found is not None
    return found


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
    answers: list[tuple[int, bytes]] = []
    with GunicornServer(env=env) as server:
        size = len(plan) // CHUNKS
        for chunk in (plan[i : i + size] for i in range(0, len(plan), size)):
            before = restarts(server.url)
            answers += send(server.url, chunk, clients=16)
            # A gevent worker that reached its quota stops within a second, however many
            # requests it served meanwhile: wait for a restart before the next chunk.
            wait_until(
                lambda before=before: restarts(server.url) > before,
                30,
                message="no worker restarted",
            )
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
    assert restarts(server.url, scrapes[-1]) >= CHUNKS
