"""The churn service wrapped in ``MetricsMiddleware`` by its own module, for a server without
this package's hooks (``plain_gunicorn.conf.py``): prometheus_client's own files, one set per pid.

    PROMETHEUS_MULTIPROC_DIR=/tmp/m python -m gunicorn -c tests/apps/plain_gunicorn.conf.py \
        tests.apps.wrapped_service:app
"""

from __future__ import annotations

from ml_wsgi_metrics import MetricsMiddleware
from service.app import app as service

app = MetricsMiddleware(service, excluded_paths=["/healthz"])
