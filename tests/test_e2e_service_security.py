"""Issue 9 under real gunicorn: the churn service with 2 workers, its tokens set.

- ``POST /pipeline`` from several clients while a training runs: exactly one 201, the others
  409. The training reads its data from a named pipe the test writes only once the other calls
  were answered, so the calls overlap for certain (no timing involved).
- Feedback replayed within a batch and at the other worker: rejected, counted once in the
  merged ``/metrics``.
- Chunked bodies on the wire: exactly 1 MiB accepted, 1 MiB + 1 byte refused (as with a
  ``Content-Length``).
"""

from __future__ import annotations

import errno
import json
import os
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from e2e_support import MODEL, Answer, ServiceServer, pinned_request, train_versions
from support import (
    ADMIN_TOKEN,
    FEEDBACK_TOKEN,
    bearer,
    http_request,
    parse_samples,
    wait_until,
)

from service.data import generate
from service.pipeline import DEFAULT_CONFIG, latest_version

MIB = 1024 * 1024


@dataclass
class Stack:
    server: ServiceServer
    models: Path
    training_data: Path  # a named pipe: a training started reads it until the test writes it


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("e2e-security")
    models = root / "models"
    train_versions(models, 1)
    training_data = root / "training-data.csv"
    os.mkfifo(training_data)
    config = root / "config.json"
    config.write_text(
        json.dumps(json.loads(DEFAULT_CONFIG.read_text()) | {"data_path": str(training_data)})
    )
    server = ServiceServer(
        models, multiproc_dir=root / "multiproc", workers=2, env={"CHURN_CONFIG": str(config)}
    )
    with server:
        yield Stack(server, models, training_data)


def _post(url: str, body: Any, token: str) -> tuple[int, Any]:
    status, answer = http_request(
        url,
        "POST",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"} | bearer(token),
    )
    return status, json.loads(answer)


def _reading(fifo: Path) -> int | None:
    """A write end of ``fifo`` once a process has opened it for reading, else ``None``."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as error:
        if error.errno == errno.ENXIO:  # no reader yet
            return None
        raise


def test_concurrent_trainings_one_201_the_others_409(stack: Stack) -> None:
    url = stack.server.url + "/pipeline"
    first: list[tuple[int, Any]] = []
    training = threading.Thread(target=lambda: first.append(_post(url, {}, ADMIN_TOKEN)))
    training.start()
    writer = None
    try:
        writer = wait_until(lambda: _reading(stack.training_data), 60, 0.01, "no training began")
        # The training worker is busy: the other worker answers these, during the training.
        others = [_post(url, {"seed": seed}, ADMIN_TOKEN) for seed in range(3)]
        csv = generate(3000, seed=3).to_csv(index=False).encode()
        os.set_blocking(writer, True)
        with os.fdopen(writer, "wb") as pipe:
            writer = None
            pipe.write(csv)
    finally:
        if writer is not None:
            os.close(writer)
        training.join(60)
    assert [status for status, _ in first] == [201]
    assert first[0][1]["version"] == "2"
    for status, answer in others:
        assert status == 409, answer
        assert answer["code"] == "training_in_progress"
    assert latest_version(stack.models, MODEL) == "2"
    assert sorted(p.name for p in (stack.models / MODEL).iterdir() if p.name.isdigit()) == [
        "1",
        "2",
    ]


def _metric(url: str, name: str, **labels: str) -> float:
    status, text = http_request(url + "/metrics")
    assert status == 200
    return sum(
        sample.value
        for sample in parse_samples(text.decode())
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def test_feedback_replayed_in_a_batch_or_at_another_worker_counts_once(stack: Stack) -> None:
    server, url = stack.server, stack.server.url
    row = json.loads(generate(2, seed=9).drop(columns=["Churn"]).to_json(orient="records"))
    predicted = pinned_request(server, "POST", "/predict", json.dumps({"rows": row}).encode())
    assert predicted.status == 200, predicted.body
    ids = [p["id"] for p in predicted.json()["predictions"]]
    replayed_before = _metric(url, "model_feedback_rejected_total", reason="replayed")
    confusion_before = _metric(url, "model_confusion_total")

    def feedback(body: Any, accept: Any = None) -> Answer:
        return pinned_request(
            server,
            "POST",
            "/feedback",
            json.dumps(body).encode(),
            accept=accept,
            headers=bearer(FEEDBACK_TOKEN),
        )

    first = feedback({"id": ids[0], "actual": "Yes"})
    assert first.status == 200, first.body
    elsewhere = feedback({"id": ids[0], "actual": "No"}, accept=lambda pid: pid != first.pid)
    assert elsewhere.status == 409, elsewhere.body
    assert elsewhere.json()["reason"] == "replayed"
    batch = feedback({"feedback": [{"id": ids[1], "actual": "No"}] * 1000})
    assert (batch.json()["accepted"], batch.json()["rejected"]) == (1, 999)

    assert _metric(url, "model_feedback_rejected_total", reason="replayed") == (
        replayed_before + 1000
    )
    assert _metric(url, "model_confusion_total") == confusion_before + 2


def _chunked(url: str, body: bytes, chunk: int = 65536) -> tuple[int, Any]:
    """``POST /predict`` with ``Transfer-Encoding: chunked`` (no ``Content-Length``)."""
    host, port = url.removeprefix("http://").split(":")
    head = (
        f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    chunks = [
        f"{len(body[i : i + chunk]):x}\r\n".encode() + body[i : i + chunk] + b"\r\n"
        for i in range(0, len(body), chunk)
    ]
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + b"".join(chunks) + b"0\r\n\r\n")
        received = b""
        while data := sock.recv(65536):
            received += data
    status_line, _, rest = received.partition(b"\r\n")
    _, _, payload = rest.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


@pytest.mark.parametrize(
    "chunked", [pytest.param(True, id="chunked"), pytest.param(False, id="length")]
)
def test_a_body_of_exactly_1_mib_is_accepted_one_byte_more_refused(
    stack: Stack, chunked: bool
) -> None:
    row = json.loads(generate(1, seed=4).drop(columns=["Churn"]).to_json(orient="records"))[0]
    data = json.dumps(row).encode()
    for size, expected in ((MIB, 200), (MIB + 1, 413)):
        body = data + b" " * (size - len(data))
        if chunked:
            status, answer = _chunked(stack.server.url, body)
        else:
            status, raw = http_request(
                stack.server.url + "/predict", "POST", body, {"Content-Type": "application/json"}
            )
            answer = json.loads(raw)
        assert status == expected, (size, answer)
        if expected == 413:
            assert answer["error"] == "the request body is larger than 1048576 bytes"
