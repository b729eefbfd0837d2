"""A gunicorn config of a user's own, without this package's hooks (no multiprocess wiring).

Multiprocess mode comes from ``PROMETHEUS_MULTIPROC_DIR`` alone, set in the environment, as
prometheus_client documents it; the app wraps itself (``tests/apps/wrapped_app.py``).
"""

import os

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
control_socket_disable = True  # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default
