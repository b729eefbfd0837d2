"""The tests' Flask app protecting its own ``/metrics``, wrapped the README's way for Flask.

    PROTECTED_APP_TOKEN=... python -m gunicorn -c gunicorn.conf.py tests.apps.protected_app:app

The repository's config wraps the served app once more, without a token: the token set here
must still be required wherever metrics are served. The token comes from
``$PROTECTED_APP_TOKEN``, not ``$ML_WSGI_METRICS_TOKEN``, which the config's middleware would
read too; ``$PROTECTED_APP_NETWORKS`` optionally sets an allow-list the same way.
"""

from __future__ import annotations

import os

from werkzeug.middleware.proxy_fix import ProxyFix

from ml_wsgi_metrics import MetricsMiddleware
from tests.apps.flask_app import create_app

app = create_app()
app.wsgi_app = MetricsMiddleware(  # type: ignore[method-assign]
    ProxyFix(app.wsgi_app, x_for=1, x_prefix=1),
    metrics_token=os.environ["PROTECTED_APP_TOKEN"],
    metrics_allowed_networks=os.environ.get("PROTECTED_APP_NETWORKS"),
)
