"""Bad input never gets a 5xx: a table of known cases, then property-based fuzzing.

Every case expects a 4xx whose JSON ``error`` names the problem (a column, a key, a limit...),
and a valid request must still succeed afterwards: the service keeps serving.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from support import ADMIN_TOKEN, FEEDBACK_TOKEN, BackOfficeClient

from ml_wsgi_metrics.testing import TEST_SECRET_KEY, reset_signals
from service.app import create_app
from service.data import TARGET, generate

MAX_ROWS = 20
MAX_BYTES = 64 * 1024
ROW: dict[str, Any] = json.loads(
    generate(1, seed=5).drop(columns=[TARGET]).to_json(orient="records")
)[0]
JSON = "application/json"


def row(**changes: Any) -> dict[str, Any]:
    return ROW | changes


def without(*columns: str) -> dict[str, Any]:
    return {k: v for k, v in ROW.items() if k not in columns}


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="module")
def service_registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture(scope="module")
def service(
    trained_models: Path,
    tmp_path_factory: pytest.TempPathFactory,
    service_registry: CollectorRegistry,
) -> Iterator[FlaskClient]:
    """One app for the module, with small limits so the limit cases stay cheap; its client
    presents the service's tokens (bad input from an authenticated back office)."""
    models = Path(shutil.copytree(trained_models, tmp_path_factory.mktemp("bad") / "models"))
    app: Flask = create_app(
        models,
        registry=service_registry,
        secret_key=TEST_SECRET_KEY,
        MAX_BATCH_ROWS=MAX_ROWS,
        MAX_CONTENT_LENGTH=MAX_BYTES,
        ADMIN_TOKEN=ADMIN_TOKEN,
        FEEDBACK_TOKEN=FEEDBACK_TOKEN,
    )
    app.testing = True
    app.test_client_class = BackOfficeClient
    yield app.test_client()
    reset_signals()


def assert_json_error(response: Any) -> dict[str, Any]:
    """A 4xx with a JSON object holding a non-empty ``error`` message."""
    assert 400 <= response.status_code < 500, (response.status_code, response.data[:300])
    assert response.mimetype == "application/json", response.data[:300]
    payload = json.loads(response.data)
    assert isinstance(payload, dict)
    assert isinstance(payload.get("error"), str)
    assert payload["error"]
    return payload


def assert_still_serving(client: FlaskClient) -> None:
    response = client.post("/predict", json=ROW)
    assert response.status_code == 200, response.json
    assert len(response.json["predictions"]) == 1


# -- the corpus ----------------------------------------------------------------------------

#: Shaped like a prediction id (payload, timestamp, 27-character signature) but not signed.
FORGED_ID = "WyJjaHVybl9sb2dyZWciLCIxIiwiTm8iLDMsMS4wLCIwMDAwMDAwMCJd.aaaaaa." + "b" * 27


def case(
    name: str,
    data: bytes,
    status: int,
    code: str,
    names: str,
    *,
    path: str = "/predict",
    method: str = "POST",
    content_type: str | None = JSON,
) -> Any:
    """One bad request: the status and ``code`` expected, and a word the message must say."""
    return pytest.param(method, path, data, content_type, status, code, names, id=name)


CASES = [
    # The body itself.
    case("malformed-json", b"{", 400, "malformed_json", "malformed JSON"),
    case("truncated-json", b'{"tenure": 1', 400, "malformed_json", "line 1"),
    case("trailing-garbage", b'{"tenure": 1} x', 400, "malformed_json", "Extra data"),
    case("single-quotes", b"{'tenure': 1}", 400, "malformed_json", "malformed"),
    case("empty-body", b"", 400, "empty_body", "empty"),
    case("whitespace-body", b"  \n ", 400, "empty_body", "empty"),
    case("not-utf8", b'{"gender": "\xff"}', 400, "bad_encoding", "UTF-8"),
    case("utf8-bom", b"\xef\xbb\xbf" + body(ROW), 400, "malformed_json", "BOM"),
    case("deep-nesting", b"[" * 30_000 + b"]" * 30_000, 400, "malformed_json", "deeply"),
    case("huge-integer", b'{"tenure": ' + b"9" * 5000 + b"}", 400, "malformed_json", "digits"),
    case("duplicate-key", b'{"tenure": 1, "tenure": 2}', 400, "duplicate_key", "'tenure'"),
    # Content types.
    case(
        "text-plain",
        body(ROW),
        415,
        "unsupported_media_type",
        "text/plain",
        content_type="text/plain",
    ),
    case("no-content-type", body(ROW), 415, "unsupported_media_type", "none", content_type=None),
    case(
        "form-encoded",
        b"tenure=1",
        415,
        "unsupported_media_type",
        "form-urlencoded",
        content_type="application/x-www-form-urlencoded",
    ),
    case("xml", b"<row/>", 415, "unsupported_media_type", "xml", content_type="application/xml"),
    # Wrong top-level types and batch shapes.
    case("top-level-string", body("hello"), 400, "wrong_type", "a string"),
    case("top-level-number", b"42", 400, "wrong_type", "a number"),
    case("top-level-null", b"null", 400, "wrong_type", "null"),
    case("top-level-bool", b"true", 400, "wrong_type", "a boolean"),
    case("empty-list", b"[]", 400, "empty_batch", "empty batch"),
    case("empty-rows", body({"rows": []}), 400, "empty_batch", "empty batch"),
    case("rows-not-a-list", body({"rows": ROW}), 400, "wrong_type", "'rows' must be a list"),
    case("rows-with-extra-key", body({"rows": [ROW], "x": 1}), 400, "unknown_key", "'x'"),
    case("list-of-numbers", body([1, 2]), 400, "wrong_type", "rows[0]"),
    case(
        "too-many-rows", body([ROW] * (MAX_ROWS + 1)), 413, "batch_too_large", f"at most {MAX_ROWS}"
    ),
    case(
        "oversized-body",
        body({"rows": [ROW], "pad": "x" * MAX_BYTES}),
        413,
        "request_entity_too_large",
        f"{MAX_BYTES} bytes",
    ),
    # Columns.
    case("missing-column", body(without("tenure")), 400, "missing_column", "'tenure'"),
    case(
        "missing-columns", body(without("tenure", "Contract")), 400, "missing_column", "'Contract'"
    ),
    case("empty-object", b"{}", 400, "missing_column", "'MonthlyCharges'"),
    case(
        "extra-column",
        body(row(favourite_colour="blue")),
        400,
        "unknown_column",
        "'favourite_colour'",
    ),
    case(
        "misspelled-column",
        body(without("tenure") | {"tenur": 3}),
        400,
        "missing_column",
        "'tenur'",
    ),
    case("label-sent", body(row(Churn="Yes")), 400, "label_column", "'Churn'"),
    case("bad-row-in-batch", body([ROW, ROW, ROW, row(tenure="x")]), 400, "wrong_type", "rows[3]"),
    # Types and values.
    case("tenure-text", body(row(tenure="abc")), 400, "wrong_type", "'tenure'"),
    case("tenure-fraction", body(row(tenure=1.5)), 400, "wrong_type", "whole number"),
    case("tenure-bool", body(row(tenure=True)), 400, "wrong_type", "'tenure'"),
    case("tenure-null", body(row(tenure=None)), 400, "wrong_type", "None"),
    case("tenure-list", body(row(tenure=[1])), 400, "wrong_type", "'tenure'"),
    case("tenure-negative", body(row(tenure=-1)), 400, "negative", "'tenure'"),
    case("tenure-huge", body(row(tenure=10**9)), 400, "out_of_range", "'tenure'"),
    case("tenure-nan", body(row(tenure=float("nan"))), 400, "not_finite", "nan"),
    case(
        "charges-infinity",
        body(row(MonthlyCharges=float("inf"))),
        400,
        "not_finite",
        "'MonthlyCharges'",
    ),
    case(
        "charges-minus-infinity",
        body(row(MonthlyCharges=float("-inf"))),
        400,
        "not_finite",
        "'MonthlyCharges'",
    ),
    case(
        "charges-overflow",
        body(row(MonthlyCharges=123.456)).replace(b"123.456", b"1e400"),
        400,
        "not_finite",
        "inf",
    ),
    case("charges-text", body(row(MonthlyCharges="70.5")), 400, "wrong_type", "'MonthlyCharges'"),
    case("charges-negative", body(row(MonthlyCharges=-5)), 400, "negative", "'MonthlyCharges'"),
    case("total-text", body(row(TotalCharges="abc")), 400, "wrong_type", "'TotalCharges'"),
    case("total-nan-text", body(row(TotalCharges="NaN")), 400, "wrong_type", "'TotalCharges'"),
    case(
        "total-nan-token", body(row(TotalCharges=float("nan"))), 400, "not_finite", "'TotalCharges'"
    ),
    case("total-negative-text", body(row(TotalCharges="-10")), 400, "negative", "'TotalCharges'"),
    case("total-object", body(row(TotalCharges={"v": 1})), 400, "wrong_type", "'TotalCharges'"),
    case("senior-two", body(row(SeniorCitizen=2)), 400, "out_of_range", "'SeniorCitizen'"),
    case("senior-text", body(row(SeniorCitizen="Yes")), 400, "wrong_type", "'SeniorCitizen'"),
    case("contract-number", body(row(Contract=5)), 400, "wrong_type", "'Contract'"),
    case("gender-null", body(row(gender=None)), 400, "wrong_type", "'gender'"),
    case("contract-object", body(row(Contract={"a": 1})), 400, "wrong_type", "'Contract'"),
    case(
        "category-too-long", body(row(PaymentMethod="x" * 500)), 400, "too_long", "'PaymentMethod'"
    ),
    case("lone-surrogate", body(row(gender="\ud800")), 400, "bad_encoding", "'gender'"),
    case("customer-id-number", body(row(customerID=123)), 400, "wrong_type", "'customerID'"),
    # Other routes.
    case("unknown-path", b"", 404, "not_found", "not found", path="/nope", method="GET"),
    case("put-predict", body(ROW), 405, "method_not_allowed", "PUT", method="PUT"),
    case("delete-healthz", b"", 405, "method_not_allowed", "GET", path="/healthz", method="DELETE"),
    case(
        "feedback-malformed-id",
        body({"id": "abc", "actual": "No"}),
        400,
        "invalid_prediction_id",
        "malformed",
        path="/feedback",
    ),
    case(
        "feedback-forged-id",
        body({"id": FORGED_ID, "actual": "No"}),
        400,
        "invalid_prediction_id",
        "tampered",
        path="/feedback",
    ),
    case(
        "feedback-bad-label",
        body({"id": FORGED_ID, "actual": "Maybe"}),
        400,
        "bad_label",
        "'Maybe'",
        path="/feedback",
    ),
    case(
        "feedback-missing-actual",
        body({"id": FORGED_ID}),
        400,
        "missing_key",
        "actual",
        path="/feedback",
    ),
    case(
        "feedback-id-number",
        body({"id": 7, "actual": "No"}),
        400,
        "wrong_type",
        "'id'",
        path="/feedback",
    ),
    case("feedback-empty-batch", b"[]", 400, "empty_batch", "empty", path="/feedback"),
    case(
        "feedback-text-plain",
        b"x",
        415,
        "unsupported_media_type",
        "text/plain",
        path="/feedback",
        content_type="text/plain",
    ),
    case("pipeline-bad-seed", body({"seed": "x"}), 400, "wrong_type", "'seed'", path="/pipeline"),
    case(
        "pipeline-unknown-setting",
        body({"epochs": 3}),
        400,
        "unknown_key",
        "epochs",
        path="/pipeline",
    ),
    case(
        "pipeline-tiny-data", body({"n_rows": 3}), 400, "wrong_type", "'n_rows'", path="/pipeline"
    ),
    case("pipeline-list", body([1]), 400, "wrong_type", "a list", path="/pipeline"),
    case(
        "pipeline-text-plain",
        b"seed=1",
        415,
        "unsupported_media_type",
        "text/plain",
        path="/pipeline",
        content_type="text/plain",
    ),
]


def test_the_corpus_is_large() -> None:
    assert len(CASES) >= 40


@pytest.mark.parametrize(
    ("method", "path", "data", "content_type", "status", "code", "names"), CASES
)
def test_bad_input_gets_a_json_error(
    service: FlaskClient,
    method: str,
    path: str,
    data: bytes,
    content_type: str | None,
    status: int,
    code: str,
    names: str,
) -> None:
    headers = {"Content-Type": content_type} if content_type else {}
    response = service.open(path, method=method, data=data, headers=headers)
    payload = assert_json_error(response)
    assert (response.status_code, payload["code"]) == (status, code), payload
    assert names in payload["error"], payload
    assert_still_serving(service)


def test_a_streamed_body_over_the_limit_is_413(service: FlaskClient) -> None:
    """Chunked bodies have no Content-Length; the limit holds for them too."""
    response = service.post(
        "/predict",
        input_stream=io.BytesIO(body([ROW] * 200)),
        headers={"Content-Type": JSON, "Transfer-Encoding": "chunked"},
        environ_overrides={"wsgi.input_terminated": True},  # as gunicorn sets for chunked
    )
    assert response.status_code == 413
    assert_json_error(response)
    assert_still_serving(service)


def test_unknown_categories_are_accepted_and_counted(
    service: FlaskClient, service_registry: CollectorRegistry
) -> None:
    """Monitoring wants to see new categories: they are scored (the encoder ignores them)
    and counted as unseen, not refused."""

    def unseen(feature: str) -> float:
        labels = {"model": "churn_logreg", "version": "1", "feature": feature}
        return service_registry.get_sample_value("model_feature_unseen_total", labels) or 0.0

    before = unseen("Contract"), unseen("gender")
    response = service.post("/predict", json=row(Contract="Lifetime", gender="n/a"))
    assert response.status_code == 200
    assert (unseen("Contract"), unseen("gender")) == (before[0] + 1, before[1] + 1)


# -- fuzzing -------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and infinities included: json.dumps writes them as bare tokens
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def check(response: Any) -> None:
    """Never a 5xx; a 4xx is a JSON error; a 200 is a prediction."""
    assert response.status_code < 500, response.data[:300]
    if response.status_code >= 400:
        assert_json_error(response)
    else:
        assert response.status_code == 200
        assert response.json["predictions"]


@FUZZ
@given(value=json_values)
def test_fuzz_any_json_value(service: FlaskClient, value: Any) -> None:
    check(service.post("/predict", data=json.dumps(value), content_type=JSON))


@st.composite
def mutated_rows(draw: st.DrawFn) -> Any:
    """One to three copies of a valid row, each with one to three columns set or deleted."""
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        mutated = dict(ROW)
        for _ in range(draw(st.integers(1, 3))):
            column = draw(st.sampled_from([*ROW, "Churn", "extra"]) | st.text(max_size=8))
            if draw(st.booleans()):
                mutated.pop(column, None)
            else:
                mutated[column] = draw(json_values)
        rows.append(mutated)
    return rows[0] if len(rows) == 1 else draw(st.sampled_from([rows, {"rows": rows}]))


@FUZZ
@given(payload=mutated_rows())
def test_fuzz_mutated_rows(service: FlaskClient, payload: Any) -> None:
    check(service.post("/predict", data=json.dumps(payload), content_type=JSON))


@settings(FUZZ, max_examples=80)
@given(
    data=st.binary(min_size=1, max_size=200) | st.text(min_size=1, max_size=100).map(str.encode),
    content_type=st.sampled_from(
        [JSON, "application/json; charset=latin-1", "text/plain", "", "application/xml"]
    )
    | st.text(max_size=30),
    path=st.sampled_from(["/predict", "/feedback", "/pipeline"]),
)
def test_fuzz_random_bytes_and_content_types(
    service: FlaskClient, data: bytes, content_type: str, path: str
) -> None:
    try:
        response = service.post(path, data=data, headers={"Content-Type": content_type})
    except ValueError:  # a header value werkzeug's client itself refuses (a newline)
        return
    assert response.status_code < 500, response.data[:300]
    if response.status_code >= 400:
        assert_json_error(response)


@settings(FUZZ, max_examples=60)
@given(prediction_id=st.text(max_size=80) | json_values, actual=json_values)
def test_fuzz_feedback(service: FlaskClient, prediction_id: Any, actual: Any) -> None:
    response = service.post("/feedback", json={"id": prediction_id, "actual": actual})
    assert_json_error(response)


@settings(FUZZ, max_examples=60)
@given(
    authorization=st.text(max_size=60) | st.text(max_size=40).map("Bearer {}".format),
    path=st.sampled_from(["/feedback", "/pipeline"]),
)
def test_fuzz_authorization(service: FlaskClient, authorization: str, path: str) -> None:
    try:
        response = service.post(path, json={"seed": 1}, headers={"Authorization": authorization})
    except ValueError:  # a header value werkzeug's client itself refuses (a newline)
        return
    assert response.status_code == 401, response.data[:300]
    assert assert_json_error(response)["code"] in ("missing_token", "invalid_token")


def test_still_serving_after_the_fuzz(service: FlaskClient) -> None:
    assert_still_serving(service)
    assert service.get("/healthz").status_code == 200
