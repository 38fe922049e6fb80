"""Frames for tests that talk to a server over a raw socket."""

from __future__ import annotations

import msgspec

from engine.protocol.framing import HEADER, encode_frame
from engine.protocol.messages import PROTOCOL_VERSION, Hello, encode_message


def frame(message: msgspec.Struct) -> bytes:
    """A protocol message as one length-prefixed frame."""
    return encode_frame(encode_message(message))


def framed(payload: bytes) -> bytes:
    """Any bytes behind a length prefix, an empty payload included (which ``frame``
    refuses): for tests that send what a client should not."""
    return HEADER.pack(len(payload)) + payload


def hello(client: str) -> bytes:
    """The ``hello`` frame of a client named ``client``."""
    return frame(Hello(version=PROTOCOL_VERSION, client=client))
