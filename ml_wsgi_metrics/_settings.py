"""Every ``ML_WSGI_METRICS_*`` environment variable, once: name, default, type and meaning.

Keyword arguments come first; these variables only supply their defaults. Each is read when the
setting is needed (not when this module is imported), so a changed environment is seen. Types are
converted here and a value that does not convert raises ``ValueError`` naming the keyword argument
and the variable; ranges and formats are checked where the setting is used, as for the keyword
argument. The README's table of variables is :func:`markdown_table` (``python -m
ml_wsgi_metrics._settings`` prints it; ``tests/test_settings.py`` checks that the two agree).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = [
    "ADDRESS",
    "ALLOWED_NETWORKS",
    "LIVE_VERSIONS",
    "NAMESPACE",
    "PORT",
    "PRIVATE_DIRECTORY",
    "PURE_PYTHON",
    "SECRET_KEY",
    "SETTINGS",
    "TOKEN",
    "Setting",
    "markdown_table",
]

_T = TypeVar("_T")


@dataclass(frozen=True)
class Setting(Generic[_T]):
    """One environment variable.

    :param name: the variable, ``ML_WSGI_METRICS_...``.
    :param argument: the keyword argument it supplies a default for (``None``: none does).
    :param default: the value when the variable is unset (or empty, unless ``keep_empty``).
    :param parse: text to value; ``ValueError`` for a bad one.
    :param kind: what ``parse`` accepts, in words (``"integer"``).
    :param description: one line for the README's table.
    :param keep_empty: an empty value is a value (refused or meaningful where it is used), not
        "unset": a protection set to nothing by mistake must not serve the metrics openly.
    """

    name: str
    argument: str | None
    default: _T
    parse: Callable[[str], _T]
    kind: str
    description: str
    keep_empty: bool = False

    def get(self) -> _T:
        """The variable's value, converted; :attr:`default` when it is unset."""
        raw = os.environ.get(self.name)
        if raw is None or (raw == "" and not self.keep_empty):
            return self.default
        try:
            return self.parse(raw)
        except ValueError:
            setting = f"{self.argument}: " if self.argument else ""
            raise ValueError(f"{setting}${self.name} is not {self.kind}: {raw!r}") from None


def _text(raw: str) -> str:
    return raw


def _optional_text(raw: str) -> str | None:
    return raw


def _optional_integer(raw: str) -> int | None:
    return int(raw)


def _flag(raw: str) -> bool:
    return True  # any non-empty value


NAMESPACE = Setting(
    "ML_WSGI_METRICS_NAMESPACE",
    "namespace",
    "",
    _text,
    "a name",
    "prefix of every metric name (middleware, gunicorn hooks, signals)",
)
TOKEN = Setting(
    "ML_WSGI_METRICS_TOKEN",
    "metrics_token",
    None,
    _optional_text,
    "a token",
    "require `Authorization: Bearer <token>` for metrics; set but blank is refused",
    keep_empty=True,
)
ALLOWED_NETWORKS = Setting(
    "ML_WSGI_METRICS_ALLOWED_NETWORKS",
    "metrics_allowed_networks",
    None,
    _optional_text,
    "a list of networks",
    "serve metrics only to these CIDRs (comma or space separated); set but empty allows none",
    keep_empty=True,
)
PORT = Setting(
    "ML_WSGI_METRICS_PORT",
    "metrics_port",
    None,
    _optional_integer,
    "an integer",
    "gunicorn: also serve the merged metrics from the master on this port",
)
ADDRESS = Setting(
    "ML_WSGI_METRICS_ADDRESS",
    "metrics_address",
    "127.0.0.1",
    _text,
    "an address",
    "gunicorn: the address that port binds (`0.0.0.0` for a remote Prometheus: protect it)",
)
SECRET_KEY = Setting(
    "ML_WSGI_METRICS_SECRET_KEY",
    "secret_key",
    None,
    _optional_text,
    "a key",
    "signals: signs prediction ids; the same key on every host feedback may reach",
)
LIVE_VERSIONS = Setting(
    "ML_WSGI_METRICS_LIVE_VERSIONS",
    "live_versions",
    2,
    int,
    "an integer",
    "signals: model versions live at once; registering a newer one retires the oldest",
)
PURE_PYTHON = Setting(
    "ML_WSGI_METRICS_PURE_PYTHON",
    None,
    False,
    _flag,
    "a flag",
    "any non-empty value: the pure-Python request record and recorders, not the C extension "
    "(read at import)",
)
PRIVATE_DIRECTORY = Setting(
    "ML_WSGI_METRICS_PRIVATE_DIRECTORY",
    None,
    None,
    _optional_text,
    "a path",
    "set by `ml_wsgi_metrics.uwsgi`: the private multiprocess directory `uwsgi.ini` removes",
)

#: Every variable, in the README's order.
SETTINGS: tuple[Setting[Any], ...] = (
    NAMESPACE,
    TOKEN,
    ALLOWED_NETWORKS,
    PORT,
    ADDRESS,
    SECRET_KEY,
    LIVE_VERSIONS,
    PURE_PYTHON,
    PRIVATE_DIRECTORY,
)


def _shown(value: object) -> str:
    if value is None or value == "":
        return "none"
    if isinstance(value, bool):
        return "off" if not value else "on"
    return f"`{value}`"


def markdown_table() -> str:
    """The README's table of environment variables."""
    rows = [
        "| variable | keyword argument | default | meaning |",
        "|---|---|---|---|",
    ]
    for setting in SETTINGS:
        argument = f"`{setting.argument}`" if setting.argument else "-"
        rows.append(
            f"| `{setting.name}` | {argument} | {_shown(setting.default)} | {setting.description} |"
        )
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(markdown_table(), end="")
