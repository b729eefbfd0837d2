"""The tiny Flask app of ``flask_app.py``, wrapped in ``MetricsMiddleware`` by its own module.

As an app served without this package's gunicorn config is (a config of one's own, uWSGI,
mod_wsgi): with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client's own files hold the metrics.

    PROMETHEUS_MULTIPROC_DIR=/tmp/m python -m gunicorn -c tests/apps/plain_gunicorn.conf.py \
        tests.apps.wrapped_app:app
"""

from __future__ import annotations

from ml_wsgi_metrics import MetricsMiddleware
from tests.apps.flask_app import create_app

app = create_app()
app.wsgi_app = MetricsMiddleware(app.wsgi_app)  # type: ignore[method-assign]
