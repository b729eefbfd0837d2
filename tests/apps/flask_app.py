"""A tiny Flask app for tests that run real servers (gunicorn, Prometheus).

    python -m gunicorn -c gunicorn.conf.py tests.apps.flask_app:app

Routes: ``/`` (hello), ``/items/<int:item_id>`` (parametrised), ``POST /items`` (201, echoes the
body size), ``/boom`` (raises; the exception propagates to the WSGI server, which answers 500),
``/slow?seconds=S`` (sleeps, for in-flight requests), ``/pid`` (the serving worker's pid),
``/models/<name>?pause=S`` (binds model ``name``, version ``1``, pauses, answers the binding)
and ``/model`` (answers the binding without making one: ``null`` unless one leaked in).
Any other path is a 404. ``create_app()`` makes another such app (the benchmarks add routes).
"""

from __future__ import annotations

import os
import time
from typing import Any

from flask import Flask, request

from ml_wsgi_metrics import signals


class Boom(RuntimeError):
    """The exception ``/boom`` raises."""


def create_app() -> Flask:
    """A new app with the routes above."""
    app = Flask(__name__)
    # Let the exception reach the middleware (counted as 500 and re-raised) and then gunicorn.
    app.config["PROPAGATE_EXCEPTIONS"] = True

    @app.get("/")
    def hello() -> str:
        return "Hello, World!"

    @app.get("/items/<int:item_id>")
    def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.post("/items")
    def create_item() -> tuple[dict[str, int], int]:
        return {"size": len(request.get_data())}, 201

    @app.get("/boom")
    def boom() -> str:
        raise Boom("boom")

    @app.get("/slow")
    def slow() -> str:
        time.sleep(float(request.args.get("seconds", "1")))
        return "slow"

    @app.get("/pid")
    def pid() -> str:
        return str(os.getpid())

    @app.get("/models/<name>")
    def bind_model(name: str) -> dict[str, Any]:
        signals.bind_model(name, "1")
        time.sleep(float(request.args.get("pause", "0")))  # other requests run meanwhile
        return {"model": signals.current_model()}

    @app.get("/model")
    def bound_model() -> dict[str, Any]:
        return {"model": signals.current_model()}

    return app


app = create_app()
