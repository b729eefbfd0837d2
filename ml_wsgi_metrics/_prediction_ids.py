"""Prediction ids: signed tokens carrying what feedback needs to be scored later, anywhere.

Owns the token format (an itsdangerous ``URLSafeTimedSerializer`` token, salted, of the JSON
list ``[model, version, class, bin, time, nonce]``), the secret key setting, signing a
prediction's rows and decoding an id back (shape, signature, age and clock skew checked), and
:class:`InvalidPredictionId` with its :data:`REJECT_REASONS`. What the decoded id may then
count is :mod:`._feedback`'s job.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

from itsdangerous import BadPayload, BadSignature, URLSafeTimedSerializer
from itsdangerous.encoding import base64_encode

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

_SALT = "ml_wsgi_metrics.prediction"
_MAX_TOKEN_LENGTH = 4096
# payload (a leading "." when compressed) . timestamp . HMAC-SHA1 signature, URL-safe base64
_TOKEN = re.compile(r"\.?[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{1,12}\.[A-Za-z0-9_-]{27}")
_JSON = json.JSONEncoder(separators=(",", ":"))


def compact_json(payload: Any) -> bytes:
    """``payload`` as JSON without spaces, UTF-8."""
    return _JSON.encode(payload).encode("utf-8")


class InvalidPredictionId(ValueError):
    """A prediction id that cannot be scored; ``reason`` is one of :data:`REJECT_REASONS`."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class IdSigner:
    """Signs and reads prediction ids with the secret key (asked for only when first used)."""

    def __init__(self, secret_key: Any) -> None:
        self.secret_key = secret_key
        self._serializer: URLSafeTimedSerializer | None = None
        self._signer: Any = None
        self._sign: Callable[[bytes], bytes] | None = None

    @property
    def serializer(self) -> URLSafeTimedSerializer:
        if self._serializer is None:
            key = self.secret_key or _settings.SECRET_KEY.get()
            if not key:
                raise ValueError(
                    f"secret_key: prediction ids need a secret key; pass "
                    f"configure(secret_key=...) or set {SECRET_KEY_ENV} (the same everywhere "
                    f"feedback may arrive)"
                )
            self._serializer = URLSafeTimedSerializer(key, salt=_SALT)
            self._signer = self._serializer.make_signer()
            self._sign = self._signer.sign
        return self._serializer

    def now(self) -> int:
        """The current time of the signer's clock (whole seconds, as ids are stamped)."""
        _ = self.serializer
        return int(self._signer.get_timestamp())

    def dumps(self, payload: list[Any]) -> str:
        """``serializer.dumps(payload)`` without its zlib attempt (3x faster; same format)."""
        if self._sign is None:
            _ = self.serializer
        assert self._sign is not None
        return self._sign(base64_encode(compact_json(payload))).decode("ascii")

    def sign_rows(
        self,
        model: str,
        version: str,
        classes: Sequence[str | None],
        bins: Sequence[int | None],
        stamp: float,
    ) -> list[str]:
        """One id per row: model, version, the row's class and score bin, time, a nonce."""
        nonces = os.urandom(4 * len(classes)).hex()
        head = (model, version)
        dumps = self.dumps
        return [
            dumps([*head, c, b, stamp, nonces[8 * i : 8 * i + 8]])
            for i, (c, b) in enumerate(zip(classes, bins, strict=True))
        ]

    def decode(
        self, prediction_id: Any, max_age: float, max_clock_skew: float
    ) -> tuple[list[Any], int]:
        """The payload of a valid id and the second it was signed."""
        if (
            not isinstance(prediction_id, str)
            or len(prediction_id) > _MAX_TOKEN_LENGTH
            or not _TOKEN.fullmatch(prediction_id)
        ):
            raise InvalidPredictionId("malformed", "prediction id: not a prediction id")
        try:
            payload, signed = self.serializer.loads(prediction_id, return_timestamp=True)
        except BadPayload:
            raise InvalidPredictionId("malformed", "prediction id: unreadable payload") from None
        except BadSignature:
            raise InvalidPredictionId("tampered", "prediction id: bad signature") from None
        signed_at = int(signed.timestamp())
        age = self.now() - signed_at
        if age > max_age:
            raise InvalidPredictionId("expired", "prediction id: expired")
        if age < -max_clock_skew:
            raise InvalidPredictionId(
                "expired",
                f"prediction id: signed {-age} s in the future by this host's clock, more than "
                f"max_clock_skew ({max_clock_skew:g} s): synchronise the hosts' clocks",
            )
        _check_payload(payload)
        return payload, signed_at


def _check_payload(payload: Any) -> None:
    """Refuse a signed payload of another shape than ids have."""
    if (
        not isinstance(payload, list)
        or len(payload) != 6
        or not all(isinstance(v, str) for v in payload[:2])
        or not isinstance(payload[2], str | None)
        or not (payload[3] is None or type(payload[3]) is int)
        or not isinstance(payload[4], int | float)
    ):
        raise InvalidPredictionId("malformed", "prediction id: unexpected payload")
