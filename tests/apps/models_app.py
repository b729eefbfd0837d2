"""A tiny Flask app recording predictions and feedback for several models, for tests that run
it under gunicorn with a real Prometheus.

    TEST_PROFILES=a/profile.json:b/profile.json python -m gunicorn -c gunicorn.conf.py \
        tests.apps.models_app:app

Every profile of ``$TEST_PROFILES`` (``os.pathsep``-separated) is registered at start-up.
``POST /predict/<model>/<version>`` takes ``{"rows": [...], "scores": [...], "classes": [...]}``
and answers ``{"ids": [...]}``; ``POST /feedback`` takes ``{"id": ..., "actual": ...}``.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, request

from ml_wsgi_metrics import signals

signals.configure()  # the secret key from $ML_WSGI_METRICS_SECRET_KEY
for path in filter(None, os.environ.get("TEST_PROFILES", "").split(os.pathsep)):
    signals.register_model(path)

app = Flask(__name__)


@app.post("/predict/<model>/<version>")
def predict(model: str, version: str) -> dict[str, Any]:
    body = request.get_json()
    with signals.model_context(model, version):
        prediction = signals.record_prediction(
            body["rows"], scores=body["scores"], classes=body["classes"], latency=0.002
        )
    return {"ids": prediction.ids}


@app.post("/feedback")
def feedback() -> dict[str, bool]:
    body = request.get_json()
    signals.record_feedback(body["id"], body["actual"])
    return {"ok": True}
