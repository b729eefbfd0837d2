"""The service's Flask settings: their defaults, and the tokens read from the environment."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["DEFAULTS", "MIN_TOKEN_LENGTH", "TOKEN_SETTINGS", "flask_config"]

#: Flask settings of the service; ``create_app(**settings)`` overrides them.
DEFAULTS: dict[str, Any] = {
    "MAX_CONTENT_LENGTH": 1024 * 1024,  # bytes of a request body (413 beyond)
    "MAX_BATCH_ROWS": 1000,  # rows of a /predict batch, items of a /feedback batch (413)
    "MODEL_RELOAD_INTERVAL": 1.0,  # seconds between two reads of the LATEST file
    "FEEDBACK_TOKEN": None,  # the back office's token for POST /feedback (None: disabled)
    "ADMIN_TOKEN": None,  # the administrator's token for POST /pipeline (None: disabled)
}
#: The tokens' settings and the environment variables that supply them by default: the value,
#: or ``<variable>_FILE`` naming a file that holds it (surrounding whitespace stripped).
TOKEN_SETTINGS = {"FEEDBACK_TOKEN": "CHURN_FEEDBACK_TOKEN", "ADMIN_TOKEN": "CHURN_ADMIN_TOKEN"}
MIN_TOKEN_LENGTH = 16


def flask_config(settings: Mapping[str, Any]) -> dict[str, Any]:
    """:data:`DEFAULTS`, the tokens from the environment unless ``settings`` has them, then
    ``settings``; a bad token is a ValueError naming its setting."""
    config = dict(DEFAULTS)
    for setting, variable in TOKEN_SETTINGS.items():
        if setting not in settings:
            config[setting] = _token_from_environment(variable)
    config.update(settings)
    for setting in TOKEN_SETTINGS:
        config[setting] = _checked_token(setting, config[setting])
    return config


def _token_from_environment(variable: str) -> str | None:
    """``$variable``, or the content of the file ``$<variable>_FILE`` (stripped), or None."""
    value, path = os.environ.get(variable), os.environ.get(f"{variable}_FILE")
    if path is None:
        return value
    if value is not None:
        raise ValueError(f"{variable}_FILE: {variable} is set too; set one of them")
    try:
        return Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as error:
        raise ValueError(f"{variable}_FILE: cannot read {path}: {error}") from None


def _checked_token(setting: str, token: Any) -> str | None:
    """A token stripped of surrounding whitespace, long enough to resist guessing."""
    if token is None:
        return None
    if not isinstance(token, str):
        raise ValueError(f"{setting}: expected a string, got {type(token).__name__}")
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(
            f"{setting}: at least {MIN_TOKEN_LENGTH} characters, got {len(token)} (make one with "
            "python -c 'import secrets; print(secrets.token_urlsafe(32))'); unset it to disable "
            "its route"
        )
    if not (token.isascii() and token.isprintable()) or " " in token:
        raise ValueError(f"{setting}: printable ASCII characters without spaces only")
    return token
