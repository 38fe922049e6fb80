"""Short-lived stream tokens: ``?token=`` for the event streams, because a browser's
``EventSource`` cannot send an ``X-API-KEY`` or ``Authorization`` header.

Shell layer: the standard library, msgspec and ``engine.auth``. A token is
``base64url(claims) "." base64url(HMAC-SHA256(secret, claims))``; the claims are
the key's scopes, its customer (if bound) and an expiry in epoch ms. The secret is
random per process (``HttpApp.token_secret``), so a restart invalidates every
token, and nothing about a token is stored. A token can do only what the key that
asked for it could, and only until it expires; it is accepted only by the stream
routes, never as an API key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import msgspec

from engine.auth import Principal


class Claims(msgspec.Struct, array_like=True, frozen=True):
    scopes: list[str]
    customer_id: str | None
    expires_ms: int


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def issue_token(secret: bytes, principal: Principal, expires_ms: int) -> str:
    claims = msgspec.json.encode(Claims(sorted(principal.scopes), principal.customer_id,
                                        expires_ms))
    signature = hmac.new(secret, claims, hashlib.sha256).digest()
    return f"{_b64(claims)}.{_b64(signature)}"


def verify_token(secret: bytes, token: str, now_ms: int) -> Principal | None:
    """The principal a token stands for; ``None`` if it is forged, malformed or expired."""
    encoded_claims, _, encoded_signature = token.partition(".")
    try:
        claims_bytes = _unb64(encoded_claims)
        signature = _unb64(encoded_signature)
    except (ValueError, TypeError):
        return None
    expected = hmac.new(secret, claims_bytes, hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        return None
    try:
        claims = msgspec.json.decode(claims_bytes, type=Claims)
    except msgspec.DecodeError:  # pragma: no cover - we signed it, so we wrote it
        return None
    if now_ms >= claims.expires_ms:
        return None
    return Principal(frozenset(claims.scopes), claims.customer_id, name="stream token")
