"""The churn-prediction service: a Flask app that publishes what its model does.

    gunicorn -c gunicorn.conf.py service.app:app              # the model loaded at start
    gunicorn -c gunicorn.conf.py 'service.app:create_app()'   # factory: loaded when first used
    flask --app service.app run                               # development server, no /metrics

Run from the checkout (the service is not installed with the library); its ``config.json`` and
``templates/`` are read from beside this file. The routes are in :mod:`service.views` (JSON in
and out; every error is JSON with an ``"error"`` message, see :mod:`service.validation`), the
model in :mod:`service.store`, the settings in :mod:`service.settings`.

``/feedback`` takes the back office's token, ``/pipeline`` the administrator's
(``Authorization: Bearer <token>``); a route whose token is not set is disabled (403). See
:data:`TOKEN_SETTINGS`.

The app never imports prometheus_client's metrics: it tells :mod:`ml_wsgi_metrics.signals`
what the model did, and the middleware (installed by ``gunicorn.conf.py``, not here, so
requests are counted once) exports it. ``create_app()`` loads the model on the first request,
after training one if none is published, so importing this module does no I/O.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask
from prometheus_client import CollectorRegistry

from service.settings import DEFAULTS, TOKEN_SETTINGS, flask_config
from service.store import ModelStore
from service.views import EXTENSION, api

__all__ = ["DEFAULTS", "TOKEN_SETTINGS", "ModelStore", "create_app"]


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
    app.config.update(flask_config(settings))
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions[EXTENSION] = ModelStore(
        models_dir if models_dir is not None else os.environ.get("CHURN_MODELS_DIR"),
        config_path=config_path if config_path is not None else os.environ.get("CHURN_CONFIG"),
        registry=registry,
        secret_key=secret_key,
        reload_interval=float(app.config["MODEL_RELOAD_INTERVAL"]),
    )
    app.register_blueprint(api)
    return app


def __getattr__(name: str) -> Any:
    """``service.app:app``, the name servers load (uWSGI's ``WSGI_APP`` takes no factory
    call): ``create_app()`` with its model loaded and registered now.

    Loading when a worker starts (or in the master with ``preload_app``) creates every model
    series at zero before the first request, so ``increase()`` sees the first predictions.
    Importing the module alone loads nothing.
    """
    if name == "app":
        served = create_app()
        served.extensions[EXTENSION].current()
        globals()["app"] = served
        return served
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
