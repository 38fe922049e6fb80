"""Customer records: what a registry entry may look like.

Pure domain layer: the standard library, msgspec, ``engine.schema``,
``engine.errors`` and the ingest rules. ``check_customer`` refuses a bad
customer with a message naming the field, and gives back the customer as the
log stores it (``extra`` round-tripped through msgpack, so the value a caller
reads back after a restart is the value it reads now).
"""

from __future__ import annotations

import msgspec

from engine.domain.meters import IngestRules
from engine.errors import InvalidRequest
from engine.schema import Customer

MAX_TRAITS = 64
MAX_EXTRA_BYTES = 16 << 10

_extra_encoder = msgspec.msgpack.Encoder()


def check_customer(customer: object, rules: IngestRules) -> Customer:
    if type(customer) is not Customer:
        raise InvalidRequest(f"expected a Customer, got {type(customer).__name__}")
    cid = customer.id
    if type(cid) is not str or not cid or len(cid) > rules.max_value_chars:
        raise InvalidRequest(
            f"customer id must be a non-empty string of at most {rules.max_value_chars} "
            f"characters, got {cid!r:.60}")
    where = f"customer {cid!r}"
    for field in ("name", "email"):
        value = getattr(customer, field)
        if value is not None and (type(value) is not str or len(value) > rules.max_value_chars):
            raise InvalidRequest(f"{where}: {field} must be a string of at most "
                                 f"{rules.max_value_chars} characters or None")
    if type(customer.enabled) is not bool:
        raise InvalidRequest(f"{where}: enabled must be true or false")
    traits = customer.traits
    if type(traits) is not dict or len(traits) > MAX_TRAITS:
        raise InvalidRequest(f"{where}: traits must be a mapping of at most {MAX_TRAITS} "
                             "strings to strings")
    for key, value in traits.items():
        if type(key) is not str or not key or len(key) > rules.max_key_chars:
            raise InvalidRequest(f"{where}: trait key {key!r:.60} must be a non-empty string "
                                 f"of at most {rules.max_key_chars} characters")
        if type(value) is not str or len(value) > rules.max_value_chars:
            raise InvalidRequest(f"{where}: trait {key!r} must have a string value of at most "
                                 f"{rules.max_value_chars} characters")
    if type(customer.extra) is not dict:
        raise InvalidRequest(f"{where}: extra must be a mapping")
    try:
        encoded = _extra_encoder.encode(customer.extra)
    except (TypeError, OverflowError) as exc:
        raise InvalidRequest(f"{where}: extra holds a value that cannot be stored: {exc}") from None
    if len(encoded) > MAX_EXTRA_BYTES:
        raise InvalidRequest(f"{where}: extra is {len(encoded)} bytes encoded, at most "
                             f"{MAX_EXTRA_BYTES} allowed")
    extra = msgspec.msgpack.decode(encoded)
    if any(type(key) is not str for key in extra):
        raise InvalidRequest(f"{where}: extra keys must be strings")
    return msgspec.structs.replace(customer, extra=extra)
