"""A small YAML writer: block style, long strings as literal blocks (``|-``).

Enough for Prometheus rule files (plain maps, lists, strings and numbers); the output parses
back to the same data with any YAML reader.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["render_yaml"]

_PLAIN_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _scalar(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, list | dict):  # only empty ones are written inline
        return "[]" if isinstance(value, list) else "{}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


def _as_block(text: str) -> bool:
    """Long or quoted strings read better as literal blocks (``|-``)."""
    if not text or text[0] in " \t" or text != text.rstrip() or "\t" in text:
        return False
    return "\n" in text or ('"' in text and len(text) > 60)


def _emit(value: Any, indent: int, lines: list[str]) -> None:
    pad = " " * indent
    if isinstance(value, dict):
        for key, item in value.items():
            key_text = key if _PLAIN_KEY.match(key) else json.dumps(key)
            if isinstance(item, dict | list) and item:
                lines.append(f"{pad}{key_text}:")
                _emit(item, indent + 2, lines)
            elif isinstance(item, str) and _as_block(item):
                lines.append(f"{pad}{key_text}: |-")
                lines.extend(f"{pad}  {line}" for line in item.split("\n"))
            else:
                lines.append(f"{pad}{key_text}: {_scalar(item)}")
    elif isinstance(value, list):
        for item in value:
            sub: list[str] = []
            _emit(item, indent + 2, sub)
            first = sub[0][indent + 2 :] if sub else "[]"
            lines.append(f"{pad}- {first}")
            lines.extend(sub[1:])
    else:
        lines.append(f"{pad}{_scalar(value)}")


def render_yaml(rules: dict[str, Any], header: str = "") -> str:
    """The rule file as YAML text (block style; expressions as literal blocks)."""
    lines = [f"# {line}" for line in header.splitlines()]
    _emit(rules, 0, lines)
    return "\n".join(lines) + "\n"
