"""The model bound to the current context (request, thread or task): one ContextVar.

Kept free of numpy and pandas so the middleware can import it at no cost. The middleware calls
:func:`reset` as each request starts, so a binding never leaks into the next request served by
the same thread; :func:`current` tells it which model the request used.
"""

from __future__ import annotations

from contextvars import ContextVar, Token
from functools import partial

__all__ = ["bind", "current", "reset", "restore"]

_model: ContextVar[tuple[str, str] | None] = ContextVar("ml_wsgi_metrics.model", default=None)


def bind(name: str, version: str) -> Token[tuple[str, str] | None]:
    """Bind ``(name, version)``; the token restores the previous binding."""
    return _model.set((name, version))


#: The bound ``(name, version)``, or ``None`` (the variable's own ``get``: no Python frame).
current = _model.get


def restore(token: Token[tuple[str, str] | None]) -> None:
    """Undo the :func:`bind` that returned ``token``."""
    _model.reset(token)


#: Forget the binding: one ``ContextVar.set(None)``, with no Python frame.
reset = partial(_model.set, None)
