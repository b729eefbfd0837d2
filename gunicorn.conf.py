"""gunicorn settings: serve any WSGI app with multiprocess Prometheus metrics.

    gunicorn -c gunicorn.conf.py service.app:app
    gunicorn -c gunicorn.conf.py mypackage.wsgi:application

The app is wrapped in ``MetricsMiddleware`` here, so it needs no change; ``/metrics`` serves
every worker's merged metrics. Settings come from the environment, with defaults for a laptop.
"""

import os

from ml_wsgi_metrics import gunicorn as metrics
from ml_wsgi_metrics.gunicorn import *  # the multiprocess hooks: on_starting, post_fork, ...

bind = os.environ.get("BIND", "127.0.0.1:8000")
workers = int(os.environ.get("WEB_CONCURRENCY", "4"))
threads = int(os.environ.get("GUNICORN_THREADS", "1"))
worker_class = os.environ.get("GUNICORN_WORKER_CLASS", "gthread" if threads > 1 else "sync")
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
max_requests_jitter = int(os.environ.get("GUNICORN_MAX_REQUESTS_JITTER", "0"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "30"))
preload_app = os.environ.get("GUNICORN_PRELOAD", "") == "1"
control_socket_disable = True  # gunicorn 27 opens ~/.gunicorn/gunicorn.ctl by default

service = os.environ.get("SERVICE_NAME")
metrics.configure(
    const_labels={"service": service} if service else {},
    excluded_paths=["/healthz"],
)
