"""Request validation for the churn service: raw bytes in, typed rows or a clear 4xx out.

Routes call these functions and never see malformed input. Every problem raises
:class:`InputError`, whose JSON names what is wrong and where (``row``, ``column``)::

    {"error": "rows[2]: column 'tenure': expected a whole number, got 'abc'",
     "code": "wrong_type", "row": 2, "column": "tenure"}

Rules (the Telco schema of :mod:`service.data`, in the raw form of its CSV):

- The body is JSON (``Content-Type: application/json``, UTF-8). ``NaN`` and ``Infinity``
  tokens, which Python's parser accepts, are refused where a number is expected; so are
  duplicate keys.
- ``/predict`` takes one row (an object), ``{"rows": [...]}`` or a list of rows; every feature
  column is required, ``customerID`` is optional, ``Churn`` (the label) and unknown columns are
  refused. A row of more than :data:`MAX_ROW_KEYS` keys is refused before any is looked at.
- Errors stay small whatever the body: they name at most three unknown keys (the first three,
  each shortened), with a did-you-mean suggestion for short ones.
- Numbers are JSON numbers within generous bounds (:data:`NUMERIC_BOUNDS`); ``TotalCharges``
  may also be a numeric string, and blank (``" "``, as in the real data) or ``null`` for a
  customer not billed yet: :func:`service.data.preprocess` fills it with tenure x charges.
- Categorical values must be strings. A value outside the training vocabulary is *accepted*
  (the one-hot encoder ignores it) and counted as unseen by the model metrics, because drift is
  what monitoring is for; refusing it would hide it.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, Final

import pandas as pd

from service.data import CATEGORIES, COLUMNS, SCHEMA, TARGET

__all__ = [
    "ID_COLUMN",
    "LABELS",
    "MAX_RETRAIN_ROWS",
    "MAX_ROW_KEYS",
    "NUMERIC_BOUNDS",
    "REQUIRED_COLUMNS",
    "InputError",
    "parse_feedback",
    "parse_json",
    "parse_retrain",
    "parse_rows",
    "rows_to_frame",
]

ID_COLUMN: Final = "customerID"
#: The feature columns every row must have, in the CSV's order.
REQUIRED_COLUMNS: Final = tuple(c for c in COLUMNS if c not in (ID_COLUMN, TARGET))
#: The ground-truth values ``/feedback`` accepts.
LABELS: Final = CATEGORIES[TARGET]
#: Accepted range of each numeric column: wide enough for any real customer, narrow enough
#: that a squared value stays finite in the metrics' sums of squares.
NUMERIC_BOUNDS: Final[dict[str, tuple[float, float]]] = {
    "SeniorCitizen": (0, 1),
    "tenure": (0, 1200),  # months: a century
    "MonthlyCharges": (0, 10_000),
    "TotalCharges": (0, 10_000_000),
}
_INTEGER_COLUMNS: Final = frozenset(c for c in REQUIRED_COLUMNS if SCHEMA[c] == "int64")
_CATEGORICAL_COLUMNS: Final = frozenset(c for c in REQUIRED_COLUMNS if c in CATEGORIES)
_MAX_TEXT: Final = 200  # characters of a categorical value or customerID
_NUMBER_TEXT: Final = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
#: Keys of a ``/predict`` row looked at: twice the columns a row may have (the features and
#: customerID); beyond, the row is refused before any key is checked or suggested.
MAX_ROW_KEYS: Final = 2 * (len(REQUIRED_COLUMNS) + 1)
#: Rows a ``/pipeline`` training may generate: 20,000 cost about 0.6 s of CPU with one BLAS
#: thread (generating, fitting, evaluating, profiling), the default 7,043 0.25 s, 100,000 4.3 s
#: (``bench/bench_service.py``).
MAX_RETRAIN_ROWS: Final = 20_000
_RETRAIN_KEYS: Final[dict[str, tuple[int, int]]] = {
    "seed": (0, 2**32 - 1),
    "n_rows": (500, MAX_RETRAIN_ROWS),
}
_NAMED_KEYS: Final = 3  # unknown keys an error names (and suggests a column for)
_MAX_SUGGESTED: Final = 40  # characters of a key worth a did-you-mean


class InputError(Exception):
    """A client error: an HTTP ``status``, a machine-readable ``code`` and a message.

    ``where`` holds the location (``row``, ``column``, ``columns``) and goes into the JSON.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str,
        status: int = 400,
        headers: Mapping[str, str] | None = None,
        **where: Any,
    ) -> None:
        super().__init__(message)
        self.message, self.code, self.status, self.where = message, code, status, where
        self.headers = dict(headers or {})  #: response headers (``WWW-Authenticate``)

    def to_dict(self) -> dict[str, Any]:
        return {"error": self.message, "code": self.code, **self.where}


def _show(value: Any) -> str:
    """A short ``repr`` of a client's value for an error message."""
    text = repr(value)
    return text if len(text) <= 60 else f"{text[:57]}..."


def _is_unicode(text: str) -> bool:
    """Whether ``text`` has no lone surrogates (JSON's ``"\\ud800"`` escapes allow them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _first_keys(keys: Sequence[Any]) -> list[str]:
    """The first few of ``keys`` (sorted or in the body's order), each shortened."""
    return [name if len(name) <= 60 else f"{name[:57]}..." for name in keys[:_NAMED_KEYS]]


def _named(keys: Sequence[Any], show: Any = repr) -> str:
    """``'a', 'b', 'c' and 5 more``: the first few keys, shown by ``show``."""
    names = ", ".join(show(name) for name in _first_keys(keys))
    more = len(keys) - _NAMED_KEYS
    return f"{names} and {more} more" if more > 0 else names


def _type_name(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


# -- the body ------------------------------------------------------------------------------


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise InputError(f"duplicate key {key!r} in a JSON object", code="duplicate_key")
        result[key] = value
    return result


def parse_json(body: bytes, mimetype: str | None, *, required: bool = True) -> Any:
    """Decode a JSON request body; ``None`` when the body is empty and not ``required``."""
    if not body and not required:
        return None
    if mimetype != "application/json":
        raise InputError(
            f"expected Content-Type application/json, got {mimetype or 'none'}",
            code="unsupported_media_type",
            status=415,
        )
    if not body.strip():
        raise InputError("the request body is empty: send a JSON document", code="empty_body")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise InputError(
            f"the body is not UTF-8 (byte {error.start})", code="bad_encoding"
        ) from None
    try:
        return json.loads(text, object_pairs_hook=_object, parse_constant=float)
    except json.JSONDecodeError as error:
        raise InputError(
            f"malformed JSON: {error.msg} (line {error.lineno}, column {error.colno})",
            code="malformed_json",
        ) from None
    except RecursionError:
        raise InputError("malformed JSON: nested too deeply", code="malformed_json") from None
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        raise InputError(f"malformed JSON: {error}", code="malformed_json") from None


def _batch(payload: Any, key: str, *, max_items: int, what: str) -> tuple[list[Any], bool]:
    """``(items, is_batch)`` from one object, ``{key: [...]}`` or a list."""
    if isinstance(payload, dict) and key in payload:
        if len(payload) != 1:
            extra = [k for k in payload if k != key]
            raise InputError(
                f"a batch object holds only {key!r}; also got {_named(extra)}",
                code="unknown_key",
            )
        payload = payload[key]
        if not isinstance(payload, list):
            raise InputError(
                f"{key!r} must be a list, got {_type_name(payload)}", code="wrong_type"
            )
    if isinstance(payload, dict):
        return [payload], False
    if not isinstance(payload, list):
        raise InputError(
            f"expected {what} (an object), {{{key!r}: [...]}} or a list, got {_type_name(payload)}",
            code="wrong_type",
        )
    if not payload:
        raise InputError("empty batch: send at least one item", code="empty_batch")
    if len(payload) > max_items:
        raise InputError(
            f"batch too large: {len(payload)} items, at most {max_items} per request",
            code="batch_too_large",
            status=413,
        )
    return payload, True


# -- /predict ------------------------------------------------------------------------------


def _suggest(name: str) -> str:
    """``name`` with the column it may be a misspelling of (a short name only)."""
    close = [] if len(name) > _MAX_SUGGESTED else difflib.get_close_matches(name, COLUMNS, n=1)
    return f"{name!r} (did you mean {close[0]!r}?)" if close else repr(name)


def _check_columns(row: Mapping[str, Any], where: str, index: int | None) -> None:
    location = {} if index is None else {"row": index}
    if len(row) > MAX_ROW_KEYS:
        raise InputError(
            f"{where}too many columns ({len(row)}): a row holds the {len(REQUIRED_COLUMNS)} "
            f"feature columns and {ID_COLUMN}; at most {MAX_ROW_KEYS} are read",
            code="too_many_columns",
            **location,
        )
    given = set(row)
    missing = [c for c in REQUIRED_COLUMNS if c not in given]
    unknown = [c for c in row if c not in REQUIRED_COLUMNS and c != ID_COLUMN]
    if TARGET in unknown:
        raise InputError(
            f"{where}column {TARGET!r} is the label the model predicts: send it to /feedback",
            code="label_column",
            column=TARGET,
            **location,
        )
    if missing:
        also = f"; unknown column(s): {_named(unknown)}" if unknown else ""
        raise InputError(
            f"{where}missing column(s): {', '.join(map(repr, missing))}{also}",
            code="missing_column",
            columns=missing,
            **location,
        )
    if unknown:
        raise InputError(
            f"{where}unknown column(s): {_named(unknown, _suggest)}",
            code="unknown_column",
            columns=_first_keys(unknown),
            **location,
        )


def _number(name: str, value: Any, fail: Any) -> float | int | None:
    """The checked value of a numeric column (``None``: a blank ``TotalCharges``)."""
    if name == "TotalCharges" and (value is None or (isinstance(value, str) and not value.strip())):
        return None
    if name == "TotalCharges" and isinstance(value, str):
        text = value.strip()
        if not _NUMBER_TEXT.fullmatch(text):
            raise fail(f"expected a number or a numeric string, got {_show(value)}", "wrong_type")
        value = float(text)
    if isinstance(value, bool) or not isinstance(value, int | float):
        kind = "a whole number" if name in _INTEGER_COLUMNS else "a number"
        raise fail(f"expected {kind}, got {_show(value)}", "wrong_type")
    if isinstance(value, float) and not math.isfinite(value):
        raise fail(f"{value} is not allowed: send a finite number", "not_finite")
    if name in _INTEGER_COLUMNS and isinstance(value, float):
        if not value.is_integer():
            raise fail(f"expected a whole number, got {_show(value)}", "wrong_type")
        value = int(value)
    low, high = NUMERIC_BOUNDS[name]
    if value < 0:
        raise fail(f"must not be negative, got {_show(value)}", "negative")
    if not low <= value <= high:
        raise fail(f"must be between {low} and {high}, got {_show(value)}", "out_of_range")
    return value


def _item(item: Any, index: int | None, key: str, expected: str) -> tuple[str, dict[str, int]]:
    """The message prefix and location of a body's item (``index`` in a batch under ``key``,
    ``None`` when alone), once it is checked to be an object (``expected`` describes it)."""
    where = "" if index is None else f"{key}[{index}]: "
    location = {} if index is None else {"row": index}
    if not isinstance(item, dict):
        raise InputError(
            f"{where}expected {expected}, got {_type_name(item)}", code="wrong_type", **location
        )
    return where, location


def _check_row(row: Any, index: int | None) -> dict[str, Any]:
    where, location = _item(row, index, "rows", "an object of column: value")
    _check_columns(row, where, index)
    clean: dict[str, Any] = {}
    for name in (*REQUIRED_COLUMNS, ID_COLUMN):
        if name not in row:
            continue
        value = row[name]

        def fail(message: str, code: str, name: str = name) -> InputError:
            return InputError(
                f"{where}column {name!r}: {message}", code=code, column=name, **location
            )

        if name in NUMERIC_BOUNDS:
            clean[name] = _number(name, value, fail)
        elif name == ID_COLUMN and value is None:
            continue
        elif not isinstance(value, str):
            raise fail(f"expected a string, got {_show(value)}", "wrong_type")
        elif len(value) > _MAX_TEXT:
            raise fail(f"longer than {_MAX_TEXT} characters", "too_long")
        elif not _is_unicode(value):
            raise fail("not valid Unicode (a lone surrogate escape)", "bad_encoding")
        else:
            clean[name] = value
    return clean


def parse_rows(payload: Any, *, max_rows: int) -> tuple[list[dict[str, Any]], bool]:
    """Checked rows of a ``/predict`` body and whether it was a batch."""
    rows, is_batch = _batch(payload, "rows", max_items=max_rows, what="one row")
    return [_check_row(row, i if is_batch else None) for i, row in enumerate(rows)], is_batch


def rows_to_frame(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Checked rows as a raw frame with the schema's columns and dtypes (blank totals: NaN)."""
    columns: dict[str, Any] = {name: [row[name] for row in rows] for name in REQUIRED_COLUMNS}
    columns["TotalCharges"] = [
        math.nan if value is None else float(value) for value in columns["TotalCharges"]
    ]
    dtypes = {
        name: "float64" if name == "TotalCharges" else SCHEMA[name] for name in REQUIRED_COLUMNS
    }
    return pd.DataFrame(columns).astype(dtypes)


# -- /feedback -----------------------------------------------------------------------------


def _check_feedback(item: Any, index: int | None) -> tuple[str, str]:
    where, location = _item(item, index, "feedback", '{"id": ..., "actual": ...}')
    missing = [k for k in ("id", "actual") if k not in item]
    if missing:
        raise InputError(f"{where}missing key(s) {missing}", code="missing_key", **location)
    unknown = [k for k in item if k not in ("id", "actual")]
    if unknown:
        raise InputError(f"{where}unknown key(s) {_named(unknown)}", code="unknown_key", **location)
    prediction_id, actual = item["id"], item["actual"]
    if not isinstance(prediction_id, str):
        raise InputError(
            f"{where}'id' must be a string (a prediction id), got {_show(prediction_id)}",
            code="wrong_type",
            column="id",
            **location,
        )
    if not isinstance(actual, str) or actual not in LABELS:
        raise InputError(
            f"{where}'actual' must be one of {list(LABELS)}, got {_show(actual)}",
            code="bad_label",
            column="actual",
            **location,
        )
    return prediction_id, actual


def parse_feedback(payload: Any, *, max_items: int) -> tuple[list[tuple[str, str]], bool]:
    """``(id, actual)`` pairs of a ``/feedback`` body and whether it was a batch."""
    items, is_batch = _batch(payload, "feedback", max_items=max_items, what="one feedback item")
    return [_check_feedback(item, i if is_batch else None) for i, item in enumerate(items)], (
        is_batch
    )


# -- /pipeline -----------------------------------------------------------------------------


def parse_retrain(payload: Any) -> dict[str, int]:
    """Training overrides of a ``/pipeline`` body (``None``: none); ``seed`` and ``n_rows``."""
    if payload is None:
        return {}
    if not isinstance(payload, dict):
        raise InputError(
            f"expected an object of settings, got {_type_name(payload)}", code="wrong_type"
        )
    unknown = [k for k in payload if k not in _RETRAIN_KEYS]
    if unknown:
        raise InputError(
            f"unknown setting(s) {_named(unknown)}; allowed: {sorted(_RETRAIN_KEYS)}",
            code="unknown_key",
            columns=_first_keys(unknown),
        )
    for key, value in payload.items():
        low, high = _RETRAIN_KEYS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise InputError(
                f"{key!r} must be an integer between {low} and {high}, got {_show(value)}",
                code="wrong_type",
                column=key,
            )
    return dict(payload)
