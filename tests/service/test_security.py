"""The reference service against an attacker (issue 9, points 5 to 9): the tokens of
``/pipeline`` and ``/feedback``, one training at a time, feedback counted once, bodies that
cost seconds refused cheaply, the body limit of chunked bodies, ``LATEST`` read as a number.

The conftest's clients present the test tokens; a refused request here uses a client without
them (``anonymous``) or a header of its own. Real gunicorn (several workers, chunked bodies
on the wire) is in ``tests/test_e2e_service_security.py``.
"""

from __future__ import annotations

import difflib
import fcntl
import hmac
import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import joblib
import pytest
from flask import Flask
from flask.testing import FlaskClient
from prometheus_client import CollectorRegistry
from support import ADMIN_TOKEN, FEEDBACK_TOKEN, bearer

import service.app
import service.views
from service.pipeline import LATEST_FILE, latest_version, load_latest

NAME = "churn_logreg"
MIB = 1024 * 1024
AppFactory = Callable[..., Flask]

#: The protected routes: path, Flask setting, environment variable, token.
PROTECTED = [
    pytest.param(
        "/feedback", "FEEDBACK_TOKEN", "CHURN_FEEDBACK_TOKEN", FEEDBACK_TOKEN, id="feedback"
    ),
    pytest.param("/pipeline", "ADMIN_TOKEN", "CHURN_ADMIN_TOKEN", ADMIN_TOKEN, id="pipeline"),
]


def anonymous(app: Flask) -> FlaskClient:
    """A client that presents no token."""
    return FlaskClient(app, app.response_class)


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return sum(
        sample.value
        for metric in registry.collect()
        for sample in metric.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


def prediction_ids(client: FlaskClient, rows: list[dict[str, Any]]) -> list[str]:
    response = client.post("/predict", json={"rows": rows})
    assert response.status_code == 200, response.json
    return [p["id"] for p in response.json["predictions"]]


def protected_body(path: str, client: FlaskClient, row: dict[str, Any]) -> dict[str, Any]:
    """A valid body for ``path``."""
    if path == "/feedback":
        return {"id": prediction_ids(client, [row])[0], "actual": "No"}
    return {"seed": 3}


def nothing_happened(path: str, models_dir: Path, registry: CollectorRegistry) -> None:
    """No label counted, no version trained."""
    assert total(registry, "model_confusion_total") == 0
    assert latest_version(models_dir, NAME) == "1"


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("path", "setting", "variable", "token"), PROTECTED)
def test_a_route_without_its_token_set_is_disabled(
    make_app: AppFactory,
    raw_rows: list[dict[str, Any]],
    models_dir: Path,
    registry: CollectorRegistry,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    setting: str,
    variable: str,
    token: str,
) -> None:
    monkeypatch.delenv(variable)
    app = make_app()
    body = protected_body(path, app.test_client(), raw_rows[0])
    response = anonymous(app).post(path, json=body, headers=bearer(token))
    assert response.status_code == 403
    assert response.json["code"] == "disabled"
    assert variable in response.json["error"] and f"{variable}_FILE" in response.json["error"]
    nothing_happened(path, models_dir, registry)


@pytest.mark.parametrize(("path", "setting", "variable", "token"), PROTECTED)
def test_a_request_without_the_token_is_refused(
    app: Flask,
    raw_rows: list[dict[str, Any]],
    models_dir: Path,
    registry: CollectorRegistry,
    path: str,
    setting: str,
    variable: str,
    token: str,
) -> None:
    body = protected_body(path, app.test_client(), raw_rows[0])
    other = ADMIN_TOKEN if token == FEEDBACK_TOKEN else FEEDBACK_TOKEN
    attempts = {
        "missing_token": {},
        "invalid_token": bearer(token[:-1] + "x"),
        "invalid_token ": bearer(other),  # the other route's token opens nothing here
        "missing_token ": {"Authorization": f"Basic {token}"},
        "invalid_token  ": bearer(token + "x"),
    }
    client = anonymous(app)
    for code, headers in attempts.items():
        response = client.post(path, json=body, headers=headers)
        assert response.status_code == 401, (code, response.json)
        assert response.json["code"] == code.strip()
        assert response.headers["WWW-Authenticate"] == "Bearer"
    nothing_happened(path, models_dir, registry)
    assert client.post(path, json=body, headers=bearer(token)).status_code in (200, 201)


@pytest.mark.parametrize(("path", "setting", "variable", "token"), PROTECTED)
def test_a_token_is_read_from_a_secret_file(
    make_app: AppFactory,
    raw_rows: list[dict[str, Any]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    setting: str,
    variable: str,
    token: str,
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(f"  {token}\n")  # as an editor or `echo` leaves it
    monkeypatch.delenv(variable)
    monkeypatch.setenv(f"{variable}_FILE", str(secret))
    app = make_app()
    body = protected_body(path, app.test_client(), raw_rows[0])
    assert anonymous(app).post(path, json=body, headers=bearer(token)).status_code in (200, 201)


def test_tokens_are_compared_in_constant_time(
    client: FlaskClient, raw_rows: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    compared: list[tuple[bytes, bytes]] = []
    original = hmac.compare_digest

    def compare_digest(a: bytes, b: bytes) -> bool:
        compared.append((a, b))
        return original(a, b)

    monkeypatch.setattr(service.views.hmac, "compare_digest", compare_digest)
    body = protected_body("/feedback", client, raw_rows[0])
    assert client.post("/feedback", json=body).status_code == 200
    assert compared[0] == (FEEDBACK_TOKEN.encode(), FEEDBACK_TOKEN.encode())  # then the id's


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        pytest.param({"ADMIN_TOKEN": "short"}, "ADMIN_TOKEN: at least 16", id="short"),
        pytest.param({"FEEDBACK_TOKEN": "a token with spaces"}, "FEEDBACK_TOKEN", id="spaces"),
        pytest.param({"FEEDBACK_TOKEN": "   "}, "FEEDBACK_TOKEN", id="blank"),
        pytest.param({"ADMIN_TOKEN": "é" * 20}, "ADMIN_TOKEN", id="not-ascii"),
    ],
)
def test_bad_token_settings_are_refused_at_start(
    make_app: AppFactory, settings: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        make_app(**settings)


def test_a_token_set_twice_is_refused_at_start(
    make_app: AppFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(ADMIN_TOKEN)
    monkeypatch.setenv("CHURN_ADMIN_TOKEN_FILE", str(secret))
    with pytest.raises(ValueError, match="CHURN_ADMIN_TOKEN_FILE"):
        make_app()  # CHURN_ADMIN_TOKEN is set too
    monkeypatch.setenv("CHURN_ADMIN_TOKEN_FILE", str(tmp_path / "missing"))
    monkeypatch.delenv("CHURN_ADMIN_TOKEN")
    with pytest.raises(ValueError, match="CHURN_ADMIN_TOKEN_FILE"):
        make_app()


# -- POST /pipeline: one training at a time, bounded ----------------------------------------


@pytest.fixture
def training_elsewhere(app: Flask) -> Iterator[None]:
    """Another process (a worker, an instance sharing the models directory) is training."""
    store: service.app.ModelStore = app.extensions["churn"]
    with open(store.training_lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def test_a_second_training_is_refused_while_one_runs(
    app: Flask, client: FlaskClient, models_dir: Path, training_elsewhere: None
) -> None:
    response = client.post("/pipeline", json={"seed": 5})
    assert response.status_code == 409
    assert response.json["code"] == "training_in_progress"
    assert "retry" in response.json["error"]
    assert latest_version(models_dir, NAME) == "1"


def test_the_training_lock_is_released_after_a_training(
    client: FlaskClient, models_dir: Path
) -> None:
    for version in ("2", "3"):
        assert client.post("/pipeline").json["version"] == version
    with pytest.raises(ValueError, match="n_rows"):  # a failed training releases it too
        client.application.extensions["churn"].retrain({"n_rows": -1})
    assert client.post("/pipeline").json["version"] == "4"


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        pytest.param({"n_rows": 20_000}, 201, id="largest"),
        pytest.param({"n_rows": 20_001}, 400, id="too-many-rows"),
        pytest.param({"n_rows": 100_000}, 400, id="the-issue's"),
        pytest.param({"n_rows": 499}, 400, id="too-few-rows"),
        pytest.param({"seed": 2**32}, 400, id="seed-too-large"),
    ],
)
def test_training_sizes_are_bounded(
    client: FlaskClient, overrides: dict[str, int], code: int
) -> None:
    response = client.post("/pipeline", json=overrides)
    assert response.status_code == code, response.json
    if code == 400:
        assert response.json["code"] == "wrong_type"
        assert ("20000" if "n_rows" in overrides else "4294967295") in response.json["error"]


# -- POST /feedback: each prediction counted once --------------------------------------------


def test_an_id_sent_again_is_rejected_as_replayed(
    client: FlaskClient, raw_rows: list[dict[str, Any]], registry: CollectorRegistry
) -> None:
    [prediction_id] = prediction_ids(client, raw_rows[:1])
    batch = [{"id": prediction_id, "actual": "Yes"}] * 1000
    response = client.post("/feedback", json={"feedback": batch})
    assert response.status_code == 200
    assert (response.json["accepted"], response.json["rejected"]) == (1, 999)
    assert "error" not in response.json["results"][0]
    assert {r["reason"] for r in response.json["results"][1:]} == {"replayed"}
    again = client.post("/feedback", json={"id": prediction_id, "actual": "No"})
    assert again.status_code == 409
    assert (again.json["code"], again.json["reason"]) == ("invalid_prediction_id", "replayed")
    assert total(registry, "model_confusion_total") == 1
    assert total(registry, "model_confusion_total", actual="Yes") == 1
    assert total(registry, "model_label_delay_seconds_count") == 1
    assert total(registry, "model_feedback_rejected_total", reason="replayed") == 1000


def test_ids_replayed_to_another_app_of_the_process_are_rejected(
    client: FlaskClient,
    make_app: AppFactory,
    raw_rows: list[dict[str, Any]],
    registry: CollectorRegistry,
) -> None:
    ids = prediction_ids(client, raw_rows[:3])
    assert (
        client.post("/feedback", json=[{"id": i, "actual": "No"} for i in ids]).status_code == 200
    )
    other = make_app().test_client()  # configures the model signals again
    response = other.post("/feedback", json=[{"id": i, "actual": "No"} for i in ids])
    assert (response.json["accepted"], response.json["rejected"]) == (0, 3)
    assert total(registry, "model_confusion_total") == 3


# -- bodies that would cost seconds ---------------------------------------------------------

MANY = 20_000


def _row(raw_rows: list[dict[str, Any]]) -> dict[str, Any]:
    return dict(raw_rows[0])


def _unknown(count: int, prefix: str = "unknown_column_") -> dict[str, int]:
    return {f"{prefix}{i:05d}": i for i in range(count)}


COSTLY_BODIES = {
    "predict-row": ("/predict", lambda row: row | _unknown(MANY), "too_many_columns"),
    "predict-batch-object": (
        "/predict",
        lambda row: {"rows": [row]} | _unknown(MANY),
        "unknown_key",
    ),
    "feedback-item": (
        "/feedback",
        lambda row: {"id": "x", "actual": "No"} | _unknown(MANY),
        "unknown_key",
    ),
    "pipeline-settings": ("/pipeline", lambda row: _unknown(MANY), "unknown_key"),
    "row-with-a-few-unknown": (
        "/predict",
        lambda row: row | _unknown(15, "tenur_") | {"x" * 5000: 1},
        "unknown_column",
    ),
}


@pytest.fixture
def difflib_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names ``difflib.get_close_matches`` is asked about (it still answers)."""
    calls: list[str] = []
    original = difflib.get_close_matches

    def spy(word: str, *args: Any, **kwargs: Any) -> list[str]:
        calls.append(word)
        return original(word, *args, **kwargs)

    monkeypatch.setattr(difflib, "get_close_matches", spy)
    return calls


@pytest.mark.parametrize("case", list(COSTLY_BODIES))
def test_a_body_of_many_keys_gets_a_small_error_and_few_suggestions(
    client: FlaskClient, raw_rows: list[dict[str, Any]], difflib_calls: list[str], case: str
) -> None:
    path, make, code = COSTLY_BODIES[case]
    data = json.dumps(make(_row(raw_rows))).encode()
    response = client.post(path, data=data, content_type="application/json")
    assert response.status_code == 400
    assert response.json["code"] == code, response.json
    assert len(response.data) <= 1024, len(response.data)
    assert len(difflib_calls) <= 3
    assert all(len(name) <= 200 for name in difflib_calls)


def test_a_row_of_too_many_keys_is_refused_before_any_suggestion(
    client: FlaskClient, raw_rows: list[dict[str, Any]], difflib_calls: list[str]
) -> None:
    data = json.dumps(_row(raw_rows) | _unknown(MANY)).encode()
    assert len(data) > 370_000  # the body: 2.15 s of CPU and a 1.16 MB error before
    response = client.post("/predict", data=data, content_type="application/json")
    assert response.json["error"] == (
        f"too many columns ({len(_row(raw_rows)) + MANY}): a row holds the 19 feature columns "
        "and customerID; at most 40 are read"
    )
    assert difflib_calls == []


def test_a_few_unknown_columns_are_still_named_with_suggestions(
    client: FlaskClient, raw_rows: list[dict[str, Any]], difflib_calls: list[str]
) -> None:
    row = _row(raw_rows) | {"tenur": 1, "Contrakt": "x", "gendr": "y", "zzz": 0, "qqq": 1}
    response = client.post("/predict", json=row)
    assert response.json["code"] == "unknown_column"
    assert response.json["error"] == (
        "unknown column(s): 'tenur' (did you mean 'tenure'?), 'Contrakt' (did you mean "
        "'Contract'?), 'gendr' (did you mean 'gender'?) and 2 more"
    )
    assert response.json["columns"] == ["tenur", "Contrakt", "gendr"]
    assert difflib_calls == ["tenur", "Contrakt", "gendr"]


# -- the body limit ------------------------------------------------------------------------


def body_of_size(row: dict[str, Any], size: int) -> bytes:
    """A valid ``/predict`` body of exactly ``size`` bytes (JSON padded with spaces)."""
    data = json.dumps(row).encode()
    return data + b" " * (size - len(data))


def post_chunked(client: FlaskClient, data: bytes) -> Any:
    return client.post(
        "/predict",
        input_stream=io.BytesIO(data),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets for chunked
    )


@pytest.mark.parametrize(
    "chunked", [pytest.param(True, id="chunked"), pytest.param(False, id="length")]
)
def test_a_body_of_exactly_the_limit_is_accepted_one_byte_more_refused(
    client: FlaskClient, raw_rows: list[dict[str, Any]], chunked: bool
) -> None:
    for size, status in ((MIB, 200), (MIB + 1, 413)):
        data = body_of_size(raw_rows[0], size)
        if chunked:
            response = post_chunked(client, data)
        else:
            response = client.post("/predict", data=data, content_type="application/json")
        assert response.status_code == status, (size, response.json)
        if status == 413:
            assert response.json["error"] == "the request body is larger than 1048576 bytes"


# -- LATEST ---------------------------------------------------------------------------------


class Planted:
    """A "model" whose unpickling creates a directory: proof that a pickle ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return os.mkdir, (str(self.marker),)


def plant(directory: Path, marker: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    joblib.dump(Planted(marker), directory / "model.joblib")
    (directory / "metrics.json").write_text("{}")


BAD_LATEST = ["../evil", "1/../../evil", "{evil}", "01", "1.0", "+1", "\u0661", "9" * 20, "1 2"]


@pytest.mark.parametrize("latest", BAD_LATEST)
def test_latest_must_be_a_version_number(models_dir: Path, tmp_path: Path, latest: str) -> None:
    marker = tmp_path / "the-pickle-ran"
    evil = tmp_path / "evil"
    plant(evil, marker)
    plant(models_dir / "evil", marker)
    (models_dir / NAME / LATEST_FILE).write_text(latest.replace("{evil}", str(evil)) + "\n")
    with pytest.raises(ValueError, match="LATEST"):
        latest_version(models_dir, NAME)
    with pytest.raises(ValueError, match="LATEST"):
        load_latest(models_dir, NAME)
    assert not marker.exists()


def test_a_bad_latest_never_loads_and_a_serving_worker_keeps_its_model(
    make_app: AppFactory, models_dir: Path, tmp_path: Path
) -> None:
    serving = make_app(MODEL_RELOAD_INTERVAL=0.0).test_client()
    assert serving.get("/healthz").json["version"] == "1"
    marker = tmp_path / "the-pickle-ran"
    plant(models_dir / "evil", marker)
    (models_dir / NAME / LATEST_FILE).write_text("../evil\n")
    assert serving.get("/healthz").json["version"] == "1"
    starting = make_app(registry_=CollectorRegistry()).test_client()
    response = starting.get("/healthz")
    assert response.status_code == 503
    assert "LATEST" in response.json["error"]
    assert not marker.exists()
