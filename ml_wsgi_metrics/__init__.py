"""Prometheus metrics for ML models served by any WSGI app, exact across gunicorn workers."""

from __future__ import annotations

from .middleware import MetricsMiddleware
from .routes import UNMATCHED, set_route

__version__ = "0.1.0"

__all__ = ["UNMATCHED", "MetricsMiddleware", "__version__", "set_route"]
