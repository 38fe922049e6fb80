"""Length-prefixed framing: a 4-byte big-endian payload length, then the payload.

Pure protocol layer: standard library only. ``FrameDecoder`` is fed whatever
bytes arrive and yields complete payloads; it never holds more than one
frame's worth of bytes beyond the current frame, and it refuses zero-length
and oversized frames the moment their header arrives, before buffering them.
"""

from __future__ import annotations

import struct

HEADER = struct.Struct(">I")
HEADER_BYTES = HEADER.size
MAX_FRAME_BYTES = 16 * 1024 * 1024


class FrameError(Exception):
    """The byte stream is out of sync or hostile: the connection must be closed."""


def encode_frame(payload: bytes) -> bytes:
    if not payload:
        raise ValueError("a frame payload cannot be empty")
    return HEADER.pack(len(payload)) + payload


class FrameDecoder:
    """Incremental frame decoder (sans-IO): ``feed`` bytes, then ``next_frame``."""

    def __init__(self, max_frame_bytes: int = MAX_FRAME_BYTES) -> None:
        self.max_frame_bytes = max_frame_bytes
        self._buffer = bytearray()
        self._need: int | None = None  # payload length of the frame being read

    @property
    def buffered_bytes(self) -> int:
        return len(self._buffer)

    @property
    def pending_frame_bytes(self) -> int:
        """Payload length of the frame whose header arrived but whose body has not (else 0)."""
        return self._need or 0

    @property
    def mid_frame(self) -> bool:
        """True when part of a frame has arrived (used for slow-sender timeouts)."""
        return bool(self._buffer)

    def feed(self, data: bytes | bytearray) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete payload, or ``None`` if more bytes are needed."""
        buffer = self._buffer
        if self._need is None:
            if len(buffer) < HEADER_BYTES:
                return None
            (length,) = HEADER.unpack_from(buffer)
            if length == 0:
                raise FrameError("zero-length frame")
            if length > self.max_frame_bytes:
                raise FrameError(
                    f"frame of {length} bytes exceeds the maximum of {self.max_frame_bytes}"
                )
            self._need = length
        end = HEADER_BYTES + self._need
        if len(buffer) < end:
            return None
        with memoryview(buffer) as view:  # one copy, not a slice copy and then another
            payload = bytes(view[HEADER_BYTES:end])
        del buffer[:end]
        self._need = None
        return payload
