"""Prediction ids: signed tokens carrying what feedback needs to be scored later, anywhere.

Owns the token formats, the secret key setting, signing a prediction's rows and decoding an id
back (shape, signature, age and clock skew checked), and :class:`InvalidPredictionId` with its
:data:`REJECT_REASONS`. What the decoded id may then count is :mod:`._feedback`'s job.

Ids are minted in the batch format: ``<head>.<row>``, both URL-safe base64 without padding.
The head is the same for every row of a call: format byte, time (ms), an 8-byte random nonce,
model, version and the table of the call's predicted classes. The row is the row's index,
its class (an index in the table) and score bin, then a 16-byte keyed BLAKE2b tag of head and
row. A 1,000-row call costs one tag per row and one base64 pass (see the README). Ids minted
before (an itsdangerous ``URLSafeTimedSerializer`` token of ``[model, version, class, bin,
time, nonce]``) still verify for their lifetime.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import struct
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
from itsdangerous import BadPayload, BadSignature, URLSafeTimedSerializer

from . import _settings

__all__ = [
    "REJECT_REASONS",
    "SECRET_KEY_ENV",
    "IdSigner",
    "InvalidPredictionId",
    "compact_json",
]

#: Environment variable supplying the default ``secret_key``.
SECRET_KEY_ENV = _settings.SECRET_KEY.name
#: The ``reason`` label values of ``model_feedback_rejected_total``.
REJECT_REASONS = ("malformed", "tampered", "expired", "unknown_model", "replayed", "retired")
#: A row's class index or score bin when it has none.
NONE = 0xFFFF

IntArray = npt.NDArray[np.intp]

_MAX_TOKEN_LENGTH = 4096
_FORMAT = 2
_PERSON = b"mlwm.prediction"  # BLAKE2b personalisation: these keys tag nothing else
_TAG_SIZE = 16
_HEAD = struct.Struct(">BQ8s")  # format, time in ms, nonce; then model, version, classes
_ROW = np.dtype([("index", ">u4"), ("class", ">u2"), ("bin", ">u2")])  # then the tag
_ROW_CHARS = 4 * (_ROW.itemsize + _TAG_SIZE) // 3  # 24 bytes: 32 characters, no padding
_TOKEN = re.compile(rf"(?:[A-Za-z0-9_-]{{4}})+\.[A-Za-z0-9_-]{{{_ROW_CHARS}}}")
# The format before: payload (a leading "." when compressed) . timestamp . HMAC-SHA1
_LEGACY_TOKEN = re.compile(r"\.?[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{1,12}\.[A-Za-z0-9_-]{27}")
_LEGACY_SALT = "ml_wsgi_metrics.prediction"
_JSON = json.JSONEncoder(separators=(",", ":"))


def compact_json(payload: Any) -> bytes:
    """``payload`` as JSON without spaces, UTF-8."""
    return _JSON.encode(payload).encode("utf-8")


class InvalidPredictionId(ValueError):
    """A prediction id that cannot be scored; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _key_list(secret_key: Any) -> list[bytes]:
    """The secret keys as bytes, oldest first (a list rotates keys: newest last)."""
    keys = list(secret_key) if isinstance(secret_key, list | tuple) else [secret_key]
    if not all(isinstance(k, str | bytes) for k in keys):
        raise ValueError("secret_key: a str or bytes, or a list of them (newest last)")
    return [k.encode("utf-8") if isinstance(k, str) else k for k in keys]


def _mac_key(secret: bytes) -> bytes:
    """The BLAKE2b key derived from one secret key (any length)."""
    return hashlib.blake2b(secret, digest_size=32, person=_PERSON).digest()


def _text(value: str) -> bytes:
    data = value.encode("utf-8")
    return struct.pack(">H", len(data)) + data


def _head(stamp_ms: int, nonce: bytes, model: str, version: str, labels: Sequence[str]) -> bytes:
    """A call's head, padded with zeros to a multiple of 3 bytes (one base64 text each)."""
    parts = [_HEAD.pack(_FORMAT, stamp_ms, nonce), _text(model), _text(version)]
    parts += [struct.pack(">H", len(labels)), *map(_text, labels)]
    head = b"".join(parts)
    return head + bytes(-len(head) % 3)


def _read_text(head: bytes, offset: int) -> tuple[str, int]:
    (size,) = struct.unpack_from(">H", head, offset)
    end = offset + 2 + size
    if end > len(head):
        raise ValueError("truncated")
    return head[offset + 2 : end].decode("utf-8"), end


def _read_head(head: bytes) -> tuple[int, str, str, list[str], str]:
    """Time (ms), model, version, class table and nonce (hex) of a head; ``ValueError`` if
    it is not one."""
    fmt, stamp_ms, nonce = _HEAD.unpack_from(head)
    if fmt != _FORMAT:
        raise ValueError(f"format {fmt}")
    model, offset = _read_text(head, _HEAD.size)
    version, offset = _read_text(head, offset)
    (count,) = struct.unpack_from(">H", head, offset)
    offset += 2
    labels = []
    for _ in range(count):
        label, offset = _read_text(head, offset)
        labels.append(label)
    if len(head) - offset > 2 or any(head[offset:]):
        raise ValueError("trailing bytes")
    return stamp_ms, model, version, labels, nonce.hex()


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text)


class IdSigner:
    """Signs and reads prediction ids with the secret key (asked for only when first used)."""

    def __init__(self, secret_key: Any) -> None:
        self.secret_key = secret_key
        self._keys: list[bytes] | None = None  # MAC keys, newest first
        self._legacy: URLSafeTimedSerializer | None = None

    @property
    def keys(self) -> list[bytes]:
        """The MAC keys derived from the secret keys, newest first."""
        if self._keys is None:
            self._keys = [_mac_key(k) for k in reversed(_key_list(self._secret()))]
        return self._keys

    def _secret(self) -> Any:
        key = self.secret_key or _settings.SECRET_KEY.get()
        if not key:
            raise ValueError(
                f"secret_key: prediction ids need a secret key; pass "
                f"configure(secret_key=...) or set {SECRET_KEY_ENV} (the same everywhere "
                f"feedback may arrive)"
            )
        return key

    @property
    def legacy(self) -> URLSafeTimedSerializer:
        """The reader of ids minted in the format before (itsdangerous tokens)."""
        if self._legacy is None:
            self._legacy = URLSafeTimedSerializer(self._secret(), salt=_LEGACY_SALT)
        return self._legacy

    @staticmethod
    def now() -> int:
        """The current time of the signer's clock (whole seconds, as ids are checked)."""
        return int(time.time())

    def sign_rows(
        self,
        model: str,
        version: str,
        labels: Sequence[str],
        classes: IntArray,
        bins: IntArray,
        stamp: float,
    ) -> list[str]:
        """One id per row: ``classes`` index ``labels`` (:data:`NONE`: no class), ``bins``
        are score bins (:data:`NONE`: no score), ``stamp`` the prediction's time."""
        head = _head(round(stamp * 1000), os.urandom(8), model, version, labels)
        rows = np.empty(len(classes), dtype=_ROW)
        rows["index"] = np.arange(len(rows))
        rows["class"] = classes
        rows["bin"] = bins
        body = rows.tobytes()
        records = np.empty((len(rows), _ROW.itemsize + _TAG_SIZE), dtype=np.uint8)
        records[:, : _ROW.itemsize] = np.frombuffer(body, np.uint8).reshape(-1, _ROW.itemsize)
        tags = self._tags(head, body)
        records[:, _ROW.itemsize :] = np.frombuffer(tags, np.uint8).reshape(-1, _TAG_SIZE)
        text = base64.urlsafe_b64encode(records.tobytes()).decode("ascii")
        prefix = base64.urlsafe_b64encode(head).decode("ascii") + "."
        return [prefix + text[i : i + _ROW_CHARS] for i in range(0, len(text), _ROW_CHARS)]

    def _tags(self, head: bytes, body: bytes) -> bytes:
        """The tag of each row of ``body`` under ``head``, with the newest key: the keyed
        state after the head is computed once and copied per row."""
        base = hashlib.blake2b(key=self.keys[0], digest_size=_TAG_SIZE)
        base.update(head)
        copy, tags = base.copy, list[bytes]()
        append = tags.append
        for start in range(0, len(body), _ROW.itemsize):
            mac = copy()
            mac.update(body[start : start + _ROW.itemsize])
            append(mac.digest())
        return b"".join(tags)

    def decode(
        self, prediction_id: Any, max_age: float, max_clock_skew: float
    ) -> tuple[list[Any], int]:
        """The payload ``[model, version, class, bin, time, nonce]`` of a valid id and the
        second it was signed."""
        if not isinstance(prediction_id, str) or len(prediction_id) > _MAX_TOKEN_LENGTH:
            raise InvalidPredictionId("malformed", "prediction id: not a prediction id")
        legacy = _LEGACY_TOKEN.fullmatch(prediction_id) is not None
        if _TOKEN.fullmatch(prediction_id):
            payload, signed_at = self._decode(prediction_id)
        elif legacy:
            payload, signed_at = self._decode_legacy(prediction_id)
        else:
            raise InvalidPredictionId("malformed", "prediction id: not a prediction id")
        _check_age(self.now() - signed_at, max_age, max_clock_skew)
        if legacy:
            _check_legacy_payload(payload)
        return payload, signed_at

    def _decode(self, token: str) -> tuple[list[Any], int]:
        head_text, row_text = token.split(".")
        head, row = _b64(head_text), _b64(row_text)
        body, tag = row[: _ROW.itemsize], row[_ROW.itemsize :]
        signed = head + body
        if not any(
            hmac.compare_digest(
                hashlib.blake2b(signed, key=key, digest_size=_TAG_SIZE).digest(), tag
            )
            for key in self.keys
        ):
            raise InvalidPredictionId("tampered", "prediction id: bad signature")
        try:  # signed with the key, so written by this code: only another version's ids fail
            stamp_ms, model, version, labels, nonce = _read_head(head)
            index, class_index, score_bin = np.frombuffer(body, dtype=_ROW)[0].tolist()
            label = None if class_index == NONE else labels[class_index]
        except (ValueError, IndexError, struct.error):
            raise InvalidPredictionId("malformed", "prediction id: unreadable payload") from None
        score_bin = None if score_bin == NONE else score_bin
        payload = [model, version, label, score_bin, stamp_ms / 1000, f"{nonce}.{index}"]
        return payload, stamp_ms // 1000

    def _decode_legacy(self, token: str) -> tuple[list[Any], int]:
        try:
            payload, signed = self.legacy.loads(token, return_timestamp=True)
        except BadPayload:
            raise InvalidPredictionId("malformed", "prediction id: unreadable payload") from None
        except BadSignature:
            raise InvalidPredictionId("tampered", "prediction id: bad signature") from None
        return payload, int(signed.timestamp())


def _check_age(age: int, max_age: float, max_clock_skew: float) -> None:
    if age > max_age:
        raise InvalidPredictionId("expired", "prediction id: expired")
    if age < -max_clock_skew:
        raise InvalidPredictionId(
            "expired",
            f"prediction id: signed {-age} s in the future by this host's clock, more than "
            f"max_clock_skew ({max_clock_skew:g} s): synchronise the hosts' clocks",
        )


def _check_legacy_payload(payload: Any) -> None:
    """Refuse a signed payload of another shape than ids had."""
    if (
        not isinstance(payload, list)
        or len(payload) != 6
        or not all(isinstance(v, str) for v in payload[:2])
        or not isinstance(payload[2], str | None)
        or not (payload[3] is None or type(payload[3]) is int)
        or not isinstance(payload[4], int | float)
    ):
        raise InvalidPredictionId("malformed", "prediction id: unexpected payload")
