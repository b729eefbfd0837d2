"""Prometheus metrics for ML models served by any WSGI app, exact across gunicorn workers.

    from ml_wsgi_metrics import MetricsMiddleware, signals

``signals`` (the model-signal context API) and ``profile`` import numpy and pandas, so they
load on first use: an app that only wraps itself in the middleware never pays for them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .middleware import MetricsMiddleware
from .routes import UNMATCHED, set_route

if TYPE_CHECKING:
    from . import profile, signals

__version__ = "0.1.0"

__all__ = ["UNMATCHED", "MetricsMiddleware", "__version__", "profile", "set_route", "signals"]

_LAZY_MODULES = ("profile", "signals")


def __getattr__(name: str) -> Any:
    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
