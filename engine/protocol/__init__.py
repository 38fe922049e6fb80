"""Wire protocol, sans-IO: bytes in, messages out. No trio, no sockets.

``framing`` (length prefixes), ``messages`` (the typed messages and their
codec) and ``connection`` (the per-connection protocol state both shells
drive). See docs/protocol.md for the specification a client in another
language needs.
"""

from engine.protocol.connection import (
    NEED_DATA,
    ClientConnection,
    LocalProtocolError,
    RemoteProtocolError,
    ServerConnection,
)
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
    "NEED_DATA",
    "PROTOCOL_VERSION",
    "ClientConnection",
    "ClientMessage",
    "FrameDecoder",
    "FrameError",
    "LocalProtocolError",
    "RemoteProtocolError",
    "ServerConnection",
    "ServerMessage",
    "decode_client_message",
    "decode_server_message",
    "encode_frame",
]
