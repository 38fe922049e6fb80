"""Property tests of engine.protocol.framing: any split of the bytes decodes alike,
encode/decode round-trips, and bad lengths fail the moment their header arrives."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.protocol.framing import HEADER, HEADER_BYTES, FrameDecoder, FrameError, encode_frame


def drain(decoder: FrameDecoder) -> tuple[list[bytes], str | None]:
    frames = []
    while True:
        try:
            payload = decoder.next_frame()
        except FrameError as exc:
            return frames, str(exc)
        if payload is None:
            return frames, None
        frames.append(payload)


def decode_in_pieces(data: bytes, cuts: list[int], max_frame: int) -> tuple[Any, ...]:
    """Feed ``data`` cut at ``cuts``, draining after each piece, as the server does."""
    decoder = FrameDecoder(max_frame)
    frames: list[bytes] = []
    bounds = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        decoder.feed(data[start:end])
        more, error = drain(decoder)
        frames += more
        if error is not None:
            return frames, error, None
        # Between pieces the decoder holds at most one incomplete, acceptable frame.
        assert decoder.buffered_bytes < HEADER_BYTES + max_frame
    return frames, None, decoder.buffered_bytes


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=600), cuts=st.lists(st.integers(0, 700), max_size=12),
       max_frame=st.integers(1, 80))
def test_any_bytes_decode_the_same_whole_or_in_pieces(data: bytes, cuts: list[int],
                                                      max_frame: int) -> None:
    assert decode_in_pieces(data, cuts, max_frame) == decode_in_pieces(data, [], max_frame)


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(st.binary(min_size=1, max_size=300), max_size=12),
       cuts=st.lists(st.integers(0, 5000), max_size=20))
def test_encode_then_decode_round_trips(payloads: list[bytes], cuts: list[int]) -> None:
    data = b"".join(encode_frame(p) for p in payloads)
    assert decode_in_pieces(data, cuts, 300) == (payloads, None, 0)
    decoder = FrameDecoder(300)
    decoder.feed(data)
    assert drain(decoder) == (payloads, None) and not decoder.mid_frame


@settings(max_examples=200, deadline=None)
@given(before=st.lists(st.binary(min_size=1, max_size=50), max_size=4),
       max_frame=st.integers(1, 1 << 20), data=st.data())
def test_zero_and_oversized_lengths_fail_as_soon_as_the_header_arrives(
    before: list[bytes], max_frame: int, data: st.DataObject
) -> None:
    length = data.draw(st.one_of(st.just(0), st.integers(max_frame + 1, 2**32 - 1)))
    decoder = FrameDecoder(max_frame)
    prefix = b"".join(encode_frame(p) for p in before if len(p) <= max_frame)
    decoder.feed(prefix + HEADER.pack(length)[:3])
    _, error = drain(decoder)
    assert error is None
    decoder.feed(HEADER.pack(length)[3:])  # the header is complete: no payload is awaited
    with pytest.raises(FrameError, match="zero-length" if length == 0 else "exceeds the maximum"):
        decoder.next_frame()


def test_an_empty_payload_cannot_be_encoded() -> None:
    with pytest.raises(ValueError, match="cannot be empty"):
        encode_frame(b"")
