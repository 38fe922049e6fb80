"""API keys and scopes for the TCP server.

Pure: standard library only. Keys come from a JSON file or the
``METER_API_KEYS`` environment variable (the same JSON)::

    {"keys": [
        {"key": "s3cret-admin", "scopes": ["admin", "ingest", "query"]},
        {"key_sha256": "9f86d0...", "scopes": ["query"], "customer_id": "acme"}
    ]}

A key may be given in clear (``key``) or as the hex SHA-256 of the key
(``key_sha256``) so the file need not hold secrets. Presented keys are hashed
and compared with every configured digest in constant time, and a failure
never says which part was wrong.

Scopes: ``ingest`` (send events), ``query`` (query usage, list meters),
``admin`` (define meters, statistics). A key bound to a ``customer_id`` may
only ingest events of that customer and only query that customer's usage.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass
from pathlib import Path

SCOPES = frozenset({"ingest", "query", "admin", "correct"})
EMPTY_KEY_DIGEST = hashlib.sha256(b"").digest()
ENV_VAR = "METER_API_KEYS"


class AuthConfigError(ValueError):
    """The key configuration itself is malformed."""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a connection is: its scopes and, if bound, its one customer."""

    scopes: frozenset[str]
    customer_id: str | None = None
    name: str = ""


ANONYMOUS_ADMIN = Principal(scopes=SCOPES, name="no keys configured")


@dataclass(frozen=True, slots=True)
class KeyRing:
    entries: tuple[tuple[bytes, Principal], ...]

    @property
    def enabled(self) -> bool:
        return bool(self.entries)

    def authenticate(self, presented: str | None) -> Principal | None:
        """The principal for ``presented``; ``None`` if it matches no key.

        With no keys configured, every connection is an administrator.
        """
        if not self.entries:
            return ANONYMOUS_ADMIN
        if not isinstance(presented, str) or not presented:
            return None  # no key never matches, whatever the configuration holds
        digest = hashlib.sha256(presented.encode()).digest()
        found: Principal | None = None
        for expected, principal in self.entries:  # no early exit: constant time in the match
            if hmac.compare_digest(digest, expected):
                found = principal
        return found


def parse_keys(config: object) -> KeyRing:
    if not isinstance(config, dict) or not isinstance(config.get("keys"), list):
        raise AuthConfigError('API key config must be an object {"keys": [...]}')
    entries = []
    for number, entry in enumerate(config["keys"]):
        if not isinstance(entry, dict):
            raise AuthConfigError(f"key entry {number} must be an object")
        if "key" in entry and isinstance(entry["key"], str) and entry["key"]:
            digest = hashlib.sha256(entry["key"].encode()).digest()
        elif isinstance(entry.get("key_sha256"), str):
            try:
                digest = bytes.fromhex(entry["key_sha256"])
            except ValueError:
                raise AuthConfigError(f"key entry {number}: key_sha256 is not hex") from None
            if len(digest) != 32:
                raise AuthConfigError(f"key entry {number}: key_sha256 must be 64 hex digits")
            if digest == EMPTY_KEY_DIGEST:
                raise AuthConfigError(
                    f"key entry {number}: key_sha256 is the hash of an empty key"
                )
        else:
            raise AuthConfigError(f"key entry {number} needs 'key' or 'key_sha256'")
        scopes = entry.get("scopes", [])
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= SCOPES:
            raise AuthConfigError(
                f"key entry {number}: scopes must be a non-empty list from {sorted(SCOPES)}"
            )
        customer = entry.get("customer_id")
        if customer is not None and (not isinstance(customer, str) or not customer):
            raise AuthConfigError(f"key entry {number}: customer_id must be a non-empty string")
        if customer is not None and "admin" in scopes:
            raise AuthConfigError(f"key entry {number}: a customer-bound key cannot be admin")
        name = str(entry.get("name", f"key {number}"))
        entries.append((digest, Principal(frozenset(scopes), customer, name)))
    return KeyRing(tuple(entries))


def load_keys(path: str | os.PathLike[str] | None = None) -> KeyRing:
    """Keys from ``path`` if given, else from ``$METER_API_KEYS``, else none."""
    if path is not None:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise AuthConfigError(f"cannot read API key file {str(path)!r}: {exc}") from None
    else:
        text = os.environ.get(ENV_VAR, "")
        if not text.strip():
            return KeyRing(())
    try:
        return parse_keys(json.loads(text))
    except json.JSONDecodeError as exc:
        raise AuthConfigError(f"API key config is not valid JSON: {exc}") from None
