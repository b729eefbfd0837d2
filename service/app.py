"""The churn-prediction service: a Flask app that publishes what its model does.

    gunicorn -c gunicorn.conf.py service.app:app      # metrics middleware added by the config
    flask --app service.app run                       # development server, no /metrics

Routes (JSON in and out; every error is JSON with an ``"error"`` message, see
:mod:`service.validation`):

- ``POST /predict``   one row, ``{"rows": [...]}`` or a list -> probabilities, classes, ids
- ``GET  /predict``   HTML results for the held-out set (not live traffic: records nothing)
- ``POST /feedback``  ``{"id": ..., "actual": "Yes"}`` or a batch -> the confusion counters
- ``POST /pipeline``  train a new model version; every worker serves it within a second
- ``GET  /healthz``   the model name and version served

``/feedback`` takes the back office's token, ``/pipeline`` the administrator's
(``Authorization: Bearer <token>``); a route whose token is not set is disabled (403). See
:data:`TOKEN_SETTINGS`.

The app never imports prometheus_client: it tells :mod:`ml_wsgi_metrics.signals` what the
model did, and the middleware (installed by ``gunicorn.conf.py``, not here, so requests are
counted once) exports it. The model is loaded on the first request, after training one if
none is published, so importing this module does no I/O.
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import logging
import math
import os
import secrets
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from flask import Blueprint, Flask, Response, current_app, jsonify, render_template, request
from prometheus_client import CollectorRegistry
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge, ServiceUnavailable

from ml_wsgi_metrics import signals
from ml_wsgi_metrics.profile import ReferenceProfile
from service.data import preprocess
from service.pipeline import (
    DEFAULT_CONFIG,
    NEGATIVE_CLASS,
    POSITIVE_CLASS,
    PROFILE_FILE,
    LoadedModel,
    TrainResult,
    held_out_split,
    latest_version,
    load_config,
    load_latest,
    train,
)
from service.validation import (
    InputError,
    parse_feedback,
    parse_json,
    parse_retrain,
    parse_rows,
    rows_to_frame,
)

__all__ = ["DEFAULTS", "TOKEN_SETTINGS", "ModelStore", "create_app"]

log = logging.getLogger("service")

#: Flask settings of the service; ``create_app(**settings)`` overrides them.
DEFAULTS: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # bytes of a request body (413 beyond)
    "MAX_BATCH_ROWS": 1000,  # rows of a /predict batch, items of a /feedback batch (413)
    "MODEL_RELOAD_INTERVAL": 1.0,  # seconds between two reads of the LATEST file
    "FEEDBACK_TOKEN": None,  # the back office's token for POST /feedback (None: disabled)
    "ADMIN_TOKEN": None,  # the administrator's token for POST /pipeline (None: disabled)
}
#: The tokens' settings and the environment variables that supply them by default: the value,
#: or ``<variable>_FILE`` naming a file that holds it (surrounding whitespace stripped).
TOKEN_SETTINGS = {"FEEDBACK_TOKEN": "CHURN_FEEDBACK_TOKEN", "ADMIN_TOKEN": "CHURN_ADMIN_TOKEN"}
MIN_TOKEN_LENGTH = 16
KEY_FILE = ".prediction-id-key"
_EXTENSION = "churn"


# -- the model ----------------------------------------------------------------------------


def _shared_key(models_dir: Path) -> str:
    """The prediction-id key every worker using ``models_dir`` shares, created once.

    Written to a private temporary file and linked into place, so concurrent first starts
    agree on one key and nobody reads half of it.
    """
    path = models_dir / KEY_FILE
    if not path.exists():
        models_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=models_dir, prefix=".key-")  # mode 0600
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(secrets.token_urlsafe(32))
                handle.flush()
                os.fsync(handle.fileno())
            os.link(tmp, path)
            log.warning(
                "prediction ids are signed with a key generated in %s; set %s to share one "
                "key between hosts",
                path,
                signals.SECRET_KEY_ENV,
            )
        except FileExistsError:
            pass  # another worker won the race: use its key
        finally:
            os.unlink(tmp)
    return path.read_text().strip()


@contextlib.contextmanager
def _file_lock(path: Path, *, wait: bool) -> Iterator[bool]:
    """An exclusive ``flock`` on ``path`` for the ``with`` block, shared by every process on the
    host; yields whether it was taken (always when ``wait``). The file is created 0600 and never
    opened through a symlink."""
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
        else:
            yield True
    finally:
        os.close(descriptor)  # releases the lock


class ModelStore:
    """The model an app serves: trained on first use if none is published, then reloaded
    (and registered with the model signals) whenever ``LATEST`` moves.

    ``current()`` reads ``LATEST`` at most once per ``reload_interval`` seconds, so a new
    version reaches every worker without a restart. The newest versions stay registered, so
    feedback for them still counts: as many as the model signals' ``live_versions`` (2 unless
    ``$ML_WSGI_METRICS_LIVE_VERSIONS`` says otherwise); registering a newer one retires the
    oldest, and retraining removes the directories of versions no longer live.
    """

    def __init__(
        self,
        models_dir: str | os.PathLike[str] | None = None,
        *,
        config_path: str | os.PathLike[str] | None = None,
        registry: CollectorRegistry | None = None,
        secret_key: str | None = None,
        reload_interval: float = 1.0,
    ) -> None:
        self.config_path = Path(config_path) if config_path is not None else DEFAULT_CONFIG
        self.config = load_config(self.config_path)
        self.name = self.config.name
        self.models_dir = Path(models_dir) if models_dir is not None else self.config.models_dir
        self.reload_interval = reload_interval
        self._registry, self._secret_key = registry, secret_key
        self._model: LoadedModel | None = None
        self._profiles: dict[str, ReferenceProfile] = {}
        self._checked = -math.inf
        self._lock = threading.Lock()
        #: Held while a version is trained by ``retrain``, by any process on the host.
        self.training_lock = self.models_dir / f".{self.name}.training.lock"
        self._evaluation: tuple[pd.DataFrame, np.ndarray] | None = None

    def current(self) -> LoadedModel:
        """The model to serve now (loading, or training, it on first use)."""
        model = self._model
        if model is not None and time.monotonic() - self._checked < self.reload_interval:
            return model
        with self._lock:
            if self._model is None:
                self._start()
            elif time.monotonic() - self._checked >= self.reload_interval:
                self._refresh()
            assert self._model is not None
            return self._model

    @property
    def live(self) -> list[str]:
        """The versions registered with the model signals (not retired), oldest first."""
        registered = set(signals.registered_models())
        return sorted((v for v, p in self._profiles.items() if p.key in registered), key=int)

    def _start(self) -> None:
        """Configure the model signals if there is something to set, then load (or train)."""
        secret_key = self._secret_key
        if secret_key is None and not os.environ.get(signals.SECRET_KEY_ENV):
            secret_key = _shared_key(self.models_dir)
        if secret_key is not None or self._registry is not None:
            signals.configure(registry=self._registry, secret_key=secret_key)
        self._train_if_none()
        self._load()
        self._register_previous()

    def _train_if_none(self) -> None:
        """Train the first version; of several workers starting together, one trains."""
        if latest_version(self.models_dir, self.name) is not None:
            return
        with _file_lock(self.models_dir / f".{self.name}.first-training.lock", wait=True):
            if latest_version(self.models_dir, self.name) is None:
                log.info("no %s model in %s: training one", self.name, self.models_dir)
                train(self.config_path, models_dir=self.models_dir)

    def _refresh(self, *, force: bool = False) -> None:
        """Load the version ``LATEST`` names if it changed (or, ``force``, if this one is no
        longer live)."""
        self._checked = time.monotonic()
        assert self._model is not None
        try:
            latest = latest_version(self.models_dir, self.name)
            if latest is None or (latest == self._model.version and not force):
                return
            self._load()
        except Exception:  # a bad version on disk must not stop a serving worker
            log.exception("could not load a new version; still serving %s", self._model.version)

    def _load(self) -> None:
        model = load_latest(self.models_dir, self.name)
        self._register(model.version, ReferenceProfile.load(model.profile_path))
        self._model = model
        self._checked = time.monotonic()
        log.info("serving %s version %s", model.name, model.version)

    def _register(self, version: str, profile: ReferenceProfile) -> None:
        """Register a version (which may retire the oldest) and forget the retired ones."""
        signals.register_model(profile)
        self._profiles[version] = profile
        registered = set(signals.registered_models())
        self._profiles = {v: p for v, p in self._profiles.items() if p.key in registered}

    def _register_previous(self) -> None:
        """Register the versions published just before the served one (feedback for them)."""
        assert self._model is not None
        root = self.models_dir / self.name
        older = sorted(
            (int(p.name) for p in root.iterdir() if p.name.isdigit()),
            reverse=True,
        )
        for number in [n for n in older if n < int(self._model.version)]:
            if len(self.live) >= signals.live_versions():
                break
            try:
                self._register(
                    str(number), ReferenceProfile.load(root / str(number) / PROFILE_FILE)
                )
            except (OSError, ValueError):
                continue  # unfinished, removed or retired: nothing to score feedback against

    def ensure_registered(self) -> None:
        """Register the live versions again if the signals were reconfigured meanwhile."""
        registered = set(signals.registered_models())
        for version, profile in list(self._profiles.items()):
            if profile.key not in registered:
                try:
                    signals.register_model(profile)
                except ValueError:  # retired meanwhile: another worker registered newer ones
                    del self._profiles[version]

    def catch_up(self) -> None:
        """Load the version ``LATEST`` names now if it moved, not at the next reload interval:
        feedback may be for a version another worker has just published and predicted with."""
        with self._lock:
            if self._model is not None:
                self._refresh()

    def _served(self) -> LoadedModel:
        """The model to serve, registered. Another worker may have retired this worker's
        version (two newer ones published within a reload interval): then ``LATEST`` now."""
        model = self.current()
        self.ensure_registered()
        if model.version in self.live:
            return model
        with self._lock:
            self._refresh(force=True)
            assert self._model is not None
            return self._model

    def predict(self, features: pd.DataFrame) -> tuple[LoadedModel, np.ndarray, signals.Prediction]:
        """Score preprocessed ``features`` and record the prediction with its latency."""
        model = self._served()
        try:
            return self._predict(model, features)
        except ValueError:
            if model.version in self.live:
                raise
            return self._predict(self._served(), features)  # retired just now: see _served

    def _predict(
        self, model: LoadedModel, features: pd.DataFrame
    ) -> tuple[LoadedModel, np.ndarray, signals.Prediction]:
        signals.bind_model(model.name, model.version)  # the middleware clears it per request
        positive = model.classes.index(model.positive_class)
        with signals.time_prediction() as timer:
            scores = model.model.predict_proba(features)[:, positive]
        classes = np.where(scores > 0.5, POSITIVE_CLASS, NEGATIVE_CLASS)
        prediction = timer.record(features, scores=scores, classes=classes)
        return model, scores, prediction

    def retrain(self, overrides: Mapping[str, Any]) -> TrainResult:
        """Train and publish a new version with ``overrides`` of the config (seed, n_rows).

        One training at a time on the host, whatever the worker or instance (a file lock in
        the models directory): another call meanwhile is a 409.
        """
        self.current()
        keep = signals.live_versions()  # older directories go: no worker registers them
        with _file_lock(self.training_lock, wait=False) as taken:
            if not taken:
                raise InputError(
                    "a training is already running (in this or another worker); retry when it ends",
                    code="training_in_progress",
                    status=409,
                )
            if not overrides:
                result = train(self.config_path, models_dir=self.models_dir, keep_versions=keep)
            else:
                raw = json.loads(self.config_path.read_text()) | dict(overrides)
                data_path = self.config.data_path
                raw["data_path"] = None if data_path is None else os.fspath(data_path)
                raw["models_dir"] = os.fspath(self.models_dir.absolute())
                with tempfile.NamedTemporaryFile("w", suffix=".json") as config:
                    json.dump(raw, config)
                    config.flush()
                    result = train(config.name, models_dir=self.models_dir, keep_versions=keep)
        with self._lock:
            self._refresh()  # this worker serves it now; the others within a second
        return result

    def evaluation_set(self) -> tuple[pd.DataFrame, np.ndarray]:
        """The held-out rows of the configured data (preprocessed features, actual labels).

        The held-out part of :func:`service.pipeline.held_out_split`, the split training uses,
        so the default model never saw them.
        """
        if self._evaluation is None:
            _, features, _, actual = held_out_split(self.config)
            self._evaluation = features, actual
        return self._evaluation


def _store() -> ModelStore:
    store: ModelStore = current_app.extensions[_EXTENSION]
    return store


def _serving(store: ModelStore) -> LoadedModel:
    """The current model, or a 503 when none can be loaded or trained."""
    try:
        return store.current()
    except (OSError, ValueError) as error:
        log.exception("no model to serve")
        raise ServiceUnavailable(f"no model to serve: {error}") from None


# -- the results page ---------------------------------------------------------------------


def score_histogram(
    scores: np.ndarray, actual: np.ndarray, *, bins: int = 20, width: int = 640, height: int = 240
) -> dict[str, Any]:
    """Stacked bars of the score distribution (non-churners below churners), in SVG units.

    A non-empty bin is at least one unit high, so every count is visible.
    """
    edges = np.linspace(0.0, 1.0, bins + 1)
    stay, _ = np.histogram(scores[actual == NEGATIVE_CLASS], bins=edges)
    churn, _ = np.histogram(scores[actual == POSITIVE_CLASS], bins=edges)
    top = max(int((stay + churn).max()), 1)
    bar = width / bins

    def units(count: int) -> float:
        return 0.0 if count == 0 else max(1.0, round(count / top * height, 1))

    bars = []
    for i, (low, high) in enumerate(zip(stay.tolist(), churn.tolist(), strict=True)):
        low_h, high_h = units(low), units(high)
        x = round(i * bar + 1, 1)
        bars.append(
            {
                "x": x,
                "width": round(bar - 2, 1),
                "label": f"{edges[i]:.2f}-{edges[i + 1]:.2f}",
                "stay": {"count": low, "y": round(height - low_h, 1), "height": low_h},
                "churn": {
                    "count": high,
                    "y": round(height - low_h - high_h, 1),
                    "height": high_h,
                },
            }
        )
    return {"bars": bars, "width": width, "height": height, "max_count": top}


# -- routes -------------------------------------------------------------------------------

api = Blueprint("api", __name__)


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
    for row, prediction_id, score in zip(rows, prediction.ids, scores.tolist(), strict=True):
        item = {"customerID": row["customerID"]} if "customerID" in row else {}
        item |= {
            "id": prediction_id,
            "churn_probability": round(score, 6),
            "churn": POSITIVE_CLASS if score > 0.5 else NEGATIVE_CLASS,
        }
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
    scores = model.model.predict_proba(features)[:, model.classes.index(model.positive_class)]
    predicted = np.where(scores > 0.5, POSITIVE_CLASS, NEGATIVE_CLASS)
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


#: The status of a rejected feedback item (400 otherwise).
_REJECTED_STATUS = {"expired": 410, "retired": 410, "replayed": 409}


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
    results: list[dict[str, Any]] = []
    for prediction_id, actual in items:
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
            results.append(rejected.to_dict())
            continue
        results.append(
            {
                "model": counted.model,
                "version": counted.version,
                "predicted": counted.predicted,
                "actual": counted.actual,
                "correct": counted.correct,
            }
        )
    if not is_batch:
        return jsonify(results[0])
    rejected_count = sum("error" in r for r in results)
    return jsonify(accepted=len(results) - rejected_count, rejected=rejected_count, results=results)


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


# -- errors -------------------------------------------------------------------------------


def _input_error(error: InputError) -> tuple[Response, int, dict[str, str]]:
    return jsonify(error.to_dict()), error.status, error.headers


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


def _internal_error(error: Exception) -> tuple[Response, int]:
    """Any other exception: a 500 with a JSON body that leaks nothing (the log has it)."""
    log.exception("unhandled error on %s %s", request.method, request.path)
    return jsonify(error="internal error: the service logged the details", code="internal"), 500


# -- the factory ----------------------------------------------------------------------------


def _token_from_environment(variable: str) -> str | None:
    """``$variable``, or the content of the file ``$<variable>_FILE`` (stripped), or None."""
    value, path = os.environ.get(variable), os.environ.get(f"{variable}_FILE")
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"{variable}_FILE: {variable} is set too; set one of them")
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{variable}_FILE: cannot read {path}: {error}") from None


def _checked_token(setting: str, token: Any) -> str | None:
    """A token stripped of surrounding whitespace, long enough to resist guessing."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise ValueError(f"{setting}: expected a string, got {type(token).__name__}")
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{setting}: at least {MIN_TOKEN_LENGTH} characters, got {len(token)} (make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'); unset it to disable "
            "its route"
        )
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(f"{setting}: printable ASCII characters without spaces only")
    return token


def create_app(
    models_dir: str | os.PathLike[str] | None = None,
    *,
    config_path: str | os.PathLike[str] | None = None,
    registry: CollectorRegistry | None = None,
    secret_key: str | None = None,
    **settings: Any,
) -> Flask:
    """The churn service. Nothing is loaded until the first request (see ``app`` below).

    :param models_dir: where versioned models live (default ``$CHURN_MODELS_DIR``, else the
        config's ``models_dir``); all workers and instances sharing it serve the same model.
    :param config_path: the training config (default ``$CHURN_CONFIG``, else
        ``service/config.json``).
    :param registry: the Prometheus registry of the model signals (default: the global one).
    :param secret_key: signs prediction ids (default ``$ML_WSGI_METRICS_SECRET_KEY``, else a
        key generated once in the models directory, shared by the workers using it).

    On the first request the app calls :func:`ml_wsgi_metrics.signals.configure` with
    ``registry`` and the key, unless neither is needed (no registry given and the key in the
    environment): then the model signals keep whatever configuration the process set up.
    :param settings: Flask config overrides, e.g. ``MAX_BATCH_ROWS=100`` (see :data:`DEFAULTS`);
        ``FEEDBACK_TOKEN`` and ``ADMIN_TOKEN`` default to the environment (see
        :data:`TOKEN_SETTINGS`). A bad token is a ValueError naming its setting.
    """
    app = Flask(__name__)
    app.config.update(DEFAULTS)
    for setting, variable in TOKEN_SETTINGS.items():
        if setting not in settings:
            app.config[setting] = _token_from_environment(variable)
    app.config.update(settings)
    for setting in TOKEN_SETTINGS:
        app.config[setting] = _checked_token(setting, app.config[setting])
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[_EXTENSION] = ModelStore(
        models_dir if models_dir is not None else os.environ.get("CHURN_MODELS_DIR"),
        config_path=config_path if config_path is not None else os.environ.get("CHURN_CONFIG"),
        registry=registry,
        secret_key=secret_key,
        reload_interval=float(app.config["MODEL_RELOAD_INTERVAL"]),
    )
    app.register_blueprint(api)
    app.register_error_handler(InputError, _input_error)
    app.register_error_handler(HTTPException, _http_error)
    app.register_error_handler(Exception, _internal_error)
    return app


def __getattr__(name: str) -> Any:
    """``service.app:app`` for gunicorn: the app, with its model loaded and registered now.

    Loading when a worker starts (or in the master with ``preload_app``) creates every model
    series at zero before the first request, so ``increase()`` sees the first predictions.
    Importing ``create_app`` alone loads nothing.
    """
    if name == "app":
        served = create_app()
        served.extensions[_EXTENSION].current()
        globals()["app"] = served
        return served
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
