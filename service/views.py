"""The service's routes (a Flask blueprint) and its JSON errors.

- ``POST /predict``   one row, ``{"rows": [...]}`` or a list -> probabilities, classes, ids
- ``GET  /predict``   HTML results for the held-out set (not live traffic: records nothing)
- ``POST /feedback``  ``{"id": ..., "actual": "Yes"}`` or a batch -> the confusion counters
- ``POST /pipeline``  train a new model version; every worker serves it within a second
- ``GET  /healthz``   the model name and version served

Views parse with :mod:`service.validation` and leave the model to :class:`ModelStore`, kept
in ``app.extensions[EXTENSION]``.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

import numpy as np
from flask import Blueprint, Response, current_app, jsonify, render_template, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, ServiceUnavailable

from ml_wsgi_metrics import signals
from service.chart import score_histogram
from service.data import preprocess
from service.published import NEGATIVE_CLASS, POSITIVE_CLASS, LoadedModel, classify
from service.settings import TOKEN_SETTINGS
from service.store import ModelStore
from service.validation import (
    InputError,
    parse_feedback,
    parse_json,
    parse_retrain,
    parse_rows,
    rows_to_frame,
)

__all__ = ["EXTENSION", "api"]

log = logging.getLogger("service")

#: The key of the app's :class:`ModelStore` in ``app.extensions``.
EXTENSION = "churn"
#: The status of a rejected feedback item (400 otherwise).
_REJECTED_STATUS = {"expired": 410, "retired": 410, "replayed": 409}

api = Blueprint("api", __name__)


# -- helpers ------------------------------------------------------------------------------


def _store() -> ModelStore:
    store: ModelStore = current_app.extensions[EXTENSION]
    return store


def _serving(store: ModelStore) -> LoadedModel:
    """The current model, or a 503 when none can be loaded or trained."""
    try:
        return store.current()
    except (OSError, ValueError) as error:
        log.exception("no model to serve")
        raise ServiceUnavailable(f"no model to serve: {error}") from None


def _max_items() -> int:
    return int(current_app.config["MAX_BATCH_ROWS"])


def _body() -> bytes:
    """The request body, at most ``MAX_CONTENT_LENGTH`` bytes (413 beyond).

    werkzeug refuses a declared length over the limit; a streamed (chunked) body, which has
    none, is read here up to one byte past the limit, so a body of exactly the limit is
    accepted, as it is with a ``Content-Length``.
    """
    limit = current_app.config["MAX_CONTENT_LENGTH"]
    environ = request.environ
    if (
        limit is None
        or request.content_length is not None
        or not environ.get("wsgi.input_terminated")
    ):
        return request.get_data(cache=False)
    stream, chunks, size = environ["wsgi.input"], [], 0
    while size <= limit:
        chunk = stream.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if size > limit:
        raise RequestEntityTooLarge()
    return b"".join(chunks)


def _authorize(setting: str) -> None:
    """Refuse the request (401, or 403 when the token is not set) unless it presents the
    token of ``setting`` as ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected: str | None = current_app.config[setting]
    variable = TOKEN_SETTINGS[setting]
    if expected is None:
        raise InputError(
            f"{request.method} {request.path} is disabled: set {variable} (or {variable}_FILE, "
            "a file holding it) to enable it",
            code="disabled",
            status=403,
        )
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not presented.strip():
        raise InputError(
            f"{request.path} needs a token: send 'Authorization: Bearer <token>'",
            code="missing_token",
            status=401,
            headers=challenge,
        )
    if not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise InputError(
            f"the token is not the one {request.path} takes",
            code="invalid_token",
            status=401,
            headers=challenge,
        )


# -- routes -------------------------------------------------------------------------------


@api.get("/")
def index() -> Response:
    """What this service offers."""
    return jsonify(
        service="churn prediction",
        routes={
            "POST /predict": "score one row, {'rows': [...]} or a list of rows",
            "GET /predict": "HTML results on the held-out set",
            "POST /feedback": "{'id': <prediction id>, 'actual': 'Yes' | 'No'} or a batch "
            "(Authorization: Bearer <the back office's token>)",
            "POST /pipeline": "train a new model version ({'seed': ..., 'n_rows': ...}) "
            "(Authorization: Bearer <the administrator's token>)",
            "GET /healthz": "the model served",
        },
    )


@api.post("/predict")
def predict() -> Response:
    """Churn probabilities, classes and signed prediction ids for raw Telco rows."""
    payload = parse_json(_body(), request.mimetype)
    rows, _ = parse_rows(payload, max_rows=_max_items())
    store = _store()
    model = _serving(store)
    features = preprocess(rows_to_frame(rows)[model.feature_columns])
    model, scores, prediction = store.predict(features)
    predictions = []
    answers = zip(rows, prediction.ids, scores.tolist(), classify(scores).tolist(), strict=True)
    for row, prediction_id, score, churn in answers:
        item = {"customerID": row["customerID"]} if "customerID" in row else {}
        item |= {"id": prediction_id, "churn_probability": round(score, 6), "churn": churn}
        predictions.append(item)
    return jsonify(model=model.name, version=model.version, predictions=predictions)


@api.get("/predict")
def results_page() -> str:
    """Score the held-out set with the served model and show the results.

    Records nothing: the held-out rows are not live traffic, so viewing the page (or a crawler,
    or a link preview) never moves live accuracy, drift or prediction counts. Held-out accuracy
    is exported on its own, per version, as ``model_reference_accuracy`` (from the profile).
    """
    store = _store()
    model = _serving(store)
    features, actual = store.evaluation_set()
    scores = model.scores(features)
    predicted = classify(scores)
    classes = (NEGATIVE_CLASS, POSITIVE_CLASS)
    confusion = [[int(np.sum((actual == a) & (predicted == p))) for p in classes] for a in classes]
    return render_template(
        "predict_results.html",
        model=model,
        rows=len(actual),
        accuracy=float(np.mean(predicted == actual)),
        confusion=confusion,
        classes=classes,
        histogram=score_histogram(scores, actual),
        mean_score=float(scores.mean()),
    )


@api.post("/feedback")
def feedback() -> Response | tuple[Response, int]:
    """Count the ground truth of earlier predictions, by their ids (any worker, any host);
    an id counts once per host."""
    _authorize("FEEDBACK_TOKEN")
    payload = parse_json(_body(), request.mimetype)
    items, is_batch = parse_feedback(payload, max_items=_max_items())
    store = _store()
    _serving(store)
    store.catch_up()
    store.ensure_registered()
    results = [_record_feedback(prediction_id, actual, is_batch) for prediction_id, actual in items]
    if not is_batch:
        return jsonify(results[0])
    rejected_count = sum("error" in r for r in results)
    return jsonify(accepted=len(results) - rejected_count, rejected=rejected_count, results=results)


def _record_feedback(prediction_id: str, actual: str, is_batch: bool) -> dict[str, Any]:
    """One label counted, or (in a batch) why its id was rejected; a single item's rejection
    is raised."""
    try:
        counted = signals.record_feedback(prediction_id, actual)
    except signals.InvalidPredictionId as error:
        rejected = InputError(
            f"prediction id rejected ({error.reason}): {error}",
            code="invalid_prediction_id",
            status=_REJECTED_STATUS.get(error.reason, 400),
            reason=error.reason,
        )
        if not is_batch:
            raise rejected from None
        return rejected.to_dict()
    return {
        "model": counted.model,
        "version": counted.version,
        "predicted": counted.predicted,
        "actual": counted.actual,
        "correct": counted.correct,
    }


@api.post("/pipeline")
def pipeline() -> tuple[Response, int]:
    """Train and publish a new model version; every worker picks it up without a restart."""
    _authorize("ADMIN_TOKEN")
    overrides = parse_retrain(parse_json(_body(), request.mimetype, required=False))
    store = _store()
    previous = _serving(store).version
    result = store.retrain(overrides)
    kept = ("accuracy", "roc_auc", "precision", "recall", "f1", "n_train", "n_test")
    return jsonify(
        model=result.name,
        version=result.version,
        previous_version=previous,
        overrides=overrides,
        metrics={key: result.metrics[key] for key in kept},
    ), 201


@api.get("/healthz")
def healthz() -> Response:
    """Liveness and the model served (503 when no model can be loaded)."""
    store = _store()
    model = _serving(store)
    return jsonify(status="ok", model=model.name, version=model.version, live_versions=store.live)


# -- errors, for the whole app ------------------------------------------------------------


@api.app_errorhandler(InputError)
def _input_error(error: InputError) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error.to_dict()), error.status, error.headers


@api.app_errorhandler(HTTPException)
def _http_error(error: HTTPException) -> Response:
    """Framework errors (404, 405, 413, ...) as JSON, keeping their headers (``Allow``)."""
    response = error.get_response()
    message = error.description or error.name
    if error.code == 413:
        limit = current_app.config["MAX_CONTENT_LENGTH"]
        message = f"the request body is larger than {limit} bytes"
    elif error.code == 405:
        message = f"{request.method} is not allowed here; allowed: {response.headers.get('Allow')}"
    code = (error.name or "error").lower().replace(" ", "_")
    response.set_data(json.dumps({"error": message, "code": code}))
    response.content_type = "application/json"
    return response


@api.app_errorhandler(Exception)
def _internal_error(error: Exception) -> tuple[Response, int]:
    """Any other exception: a 500 with a JSON body that leaks nothing (the log has it)."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(error="internal error: the service logged the details", code="internal"), 500
