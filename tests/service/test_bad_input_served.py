"""The bad-input corpus of ``test_bad_input.py`` against the service under real gunicorn.

The in-process tests prove the app's answers; here the same requests go over TCP to
``gunicorn -c gunicorn.conf.py`` with 4 workers and the corpus's limits, from 4 concurrent
clients: every case gets its 4xx and its JSON error, never a 5xx, and every worker's
``/metrics`` counts each request with the status its client got. Last, the default limits the
README states, in process.
"""

from __future__ import annotations

import http.client
import json
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from support import (
    ADMIN_TOKEN,
    FEEDBACK_TOKEN,
    SERVICE_TOKENS,
    GunicornServer,
    bearer,
    http_request,
    parallel,
    parse_samples,
    wait_until,
)
from test_bad_input import CASES, JSON, MAX_BYTES, MAX_ROWS, ROW, body

from ml_wsgi_metrics.testing import TEST_SECRET_KEY

#: The service with the corpus's limits, as gunicorn calls an app factory.
APP = f"service.app:create_app(MAX_BATCH_ROWS={MAX_ROWS}, MAX_CONTENT_LENGTH={MAX_BYTES})"
Case = tuple[str, str, bytes, "str | None", int, str, str]
#: The tokens a back office and an administrator present, as ``BackOfficeClient`` in process.
TOKENS = {"/feedback": FEEDBACK_TOKEN, "/pipeline": ADMIN_TOKEN}


@pytest.fixture(scope="module")
def served(
    trained_models: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GunicornServer]:
    models = shutil.copytree(trained_models, tmp_path_factory.mktemp("served") / "models")
    env = {
        "CHURN_MODELS_DIR": str(models),
        "ML_WSGI_METRICS_SECRET_KEY": TEST_SECRET_KEY,
        **SERVICE_TOKENS,
    }
    with GunicornServer(APP, env=env, workers=4) as server:
        yield server


def _send(server: GunicornServer, case: Case) -> tuple[int, bytes]:
    method, path, data, content_type, *_ = case
    headers = {"Content-Type": content_type} if content_type else {}
    if path in TOKENS:
        headers |= bearer(TOKENS[path])
    return http_request(server.url + path, method, data, headers)


def _chunked(server: GunicornServer, data: bytes) -> tuple[int, bytes]:
    """``POST /predict`` with a chunked body (no Content-Length)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        headers = {"Content-Type": JSON, "Connection": "close"}
        connection.request("POST", "/predict", iter([data]), headers, encode_chunked=True)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


STREAMED = "streamed-over-the-limit"  # a chunked body (no Content-Length) over the limit


@pytest.fixture(scope="module")
def answers(served: GunicornServer) -> dict[str, tuple[int, bytes]]:
    """Every case's answer (status, body) by case id, sent from 4 concurrent clients, and
    the :data:`STREAMED` one's."""
    cases = [tuple(case.values) for case in CASES]
    found = parallel(lambda case: _send(served, case), cases, threads=4)
    return {
        **{case.id: answer for case, answer in zip(CASES, found, strict=True)},
        STREAMED: _chunked(served, body([ROW] * 200)),
    }


def test_the_corpus_has_70_cases_or_more() -> None:
    assert len(CASES) >= 70  # README: "a bad-input corpus of 70+ cases"


@pytest.mark.parametrize(
    ("method", "path", "data", "content_type", "status", "code", "names"), CASES
)
def test_bad_input_gets_its_json_error_from_gunicorn(
    answers: dict[str, tuple[int, bytes]],
    request: pytest.FixtureRequest,
    method: str,
    path: str,
    data: bytes,
    content_type: str | None,
    status: int,
    code: str,
    names: str,
) -> None:
    got, payload = answers[request.node.callspec.id]
    assert got < 500, payload[:300]
    error: dict[str, Any] = json.loads(payload)
    assert (got, error["code"]) == (status, code), error
    assert names in error["error"], error


def test_a_streamed_body_over_the_limit_is_413_from_gunicorn(
    answers: dict[str, tuple[int, bytes]],
) -> None:
    status, payload = answers[STREAMED]
    assert status == 413, payload[:300]
    assert json.loads(payload)["code"] == "request_entity_too_large"


def _statuses(text: str) -> Counter[str]:
    found: Counter[str] = Counter()
    for sample in parse_samples(text):
        if sample.name == "http_requests_total":
            found[sample.labels["status"]] += int(sample.value)
    return found


def test_every_worker_counts_the_corpus_without_a_5xx(
    served: GunicornServer, answers: dict[str, tuple[int, bytes]]
) -> None:
    """The corpus and a valid request afterwards: each counted with the status its client
    got (but ``/healthz``, which the config leaves unmeasured), by every worker's
    ``/metrics``; the service keeps serving."""
    status, payload = http_request(
        served.url + "/predict", "POST", body(ROW), {"Content-Type": JSON}
    )
    assert status == 200, payload[:300]
    unmeasured = {case.id for case in CASES if case.values[1] == "/healthz"}
    expected = Counter(str(got) for name, (got, _) in answers.items() if name not in unmeasured)
    expected["200"] += 1
    assert sum(expected.values()) == len(CASES) + 2 - len(unmeasured)
    assert not [code for code in expected if code.startswith("5")]

    def counted() -> bool:
        scrapes = served.each_worker("/metrics").values()
        return all(_statuses(text.decode()) == expected for _, text in scrapes)

    wait_until(counted, 10, interval=0.2, message=f"the workers never all counted {expected}")


def test_the_default_limits_are_1000_rows_and_1_mib(client: FlaskClient) -> None:
    """The README's limits, as the service has them by default (in-process)."""
    assert client.post("/predict", json={"rows": [ROW] * 1000}).status_code == 200
    too_many = client.post("/predict", json={"rows": [ROW] * 1001})
    assert (too_many.status_code, too_many.json["code"]) == (413, "batch_too_large")
    padded = body({"rows": [ROW], "pad": "x" * (1 << 20)})
    too_big = client.post("/predict", data=padded, content_type=JSON)
    assert (too_big.status_code, too_big.json["code"]) == (413, "request_entity_too_large")
