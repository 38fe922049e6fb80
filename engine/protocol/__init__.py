"""Wire protocol, sans-IO: bytes in, messages out. No trio, no sockets.

See docs/protocol.md for the specification a client in another language needs.
"""

from engine.protocol.framing import (
    HEADER_BYTES,
    MAX_FRAME_BYTES,
    FrameDecoder,
    FrameError,
    encode_frame,
)
from engine.protocol.messages import (
    PROTOCOL_VERSION,
    ClientMessage,
    ServerMessage,
    decode_client_message,
    decode_server_message,
)

__all__ = [
    "HEADER_BYTES",
    "MAX_FRAME_BYTES",
    "PROTOCOL_VERSION",
    "ClientMessage",
    "FrameDecoder",
    "FrameError",
    "ServerMessage",
    "decode_client_message",
    "decode_server_message",
    "encode_frame",
]
