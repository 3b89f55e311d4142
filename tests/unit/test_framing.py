"""Framing: length-prefixed frames and JSON lines, fed in every split."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from corral.wire.framing import (
    DEFAULT_MAX_FRAME_SIZE,
    FrameDecoder,
    LineDecoder,
    encode_frame,
    encode_line,
)

Decoder = FrameDecoder | LineDecoder

BODIES = [b"", b"a", b"hello world", bytes(range(256)), b"\x00" * 3, b"x" * 1000]
LINES = [b"{}", b"a", b'{"type":"hello","protocol_version":1}', b"x" * 1000, b"\x00\xff", b"z"]


def drain(dec: Decoder) -> list[bytes]:
    """Every complete frame the decoder holds."""
    out = []
    while (frame := dec.next_frame()) is not None:
        out.append(frame)
    return out


def feed_pieces(dec: Decoder, stream: bytes, cuts: list[int]) -> list[bytes]:
    """Feed ``stream`` cut at ``cuts``, draining after each piece, then EOF."""
    out: list[bytes] = []
    start = 0
    for cut in [*sorted(cuts), len(stream)]:
        if cut > start:
            dec.feed(stream[start:cut])
            out += drain(dec)
            start = cut
    dec.feed(b"")
    out += drain(dec)
    assert dec.at_eof
    assert dec.buffered == 0
    return out


# ---------------------------------------------------------------- length-prefixed frames


def test_encode_frame_prefixes_big_endian_length() -> None:
    assert encode_frame(b"abc") == b"\x00\x00\x00\x03abc"
    assert encode_frame(b"") == b"\x00\x00\x00\x00"


def test_stream_split_at_every_offset_decodes_the_same_frames() -> None:
    stream = b"".join(encode_frame(b) for b in BODIES)
    for i in range(len(stream) + 1):
        assert feed_pieces(FrameDecoder(), stream, [i]) == BODIES, f"split at {i}"


def test_stream_fed_one_byte_at_a_time() -> None:
    stream = b"".join(encode_frame(b) for b in BODIES)
    assert feed_pieces(FrameDecoder(), stream, list(range(len(stream)))) == BODIES


@given(
    bodies=st.lists(st.binary(max_size=300), max_size=12),
    cuts=st.lists(st.integers(min_value=0, max_value=4000), max_size=30),
)
def test_frames_survive_arbitrary_splits(bodies: list[bytes], cuts: list[int]) -> None:
    stream = b"".join(encode_frame(b) for b in bodies)
    cuts = [c for c in cuts if c <= len(stream)]
    assert feed_pieces(FrameDecoder(), stream, cuts) == bodies


def test_need_more_data_returns_none() -> None:
    dec = FrameDecoder()
    assert dec.next_frame() is None
    dec.feed(b"\x00\x00")
    assert dec.next_frame() is None
    dec.feed(b"\x00\x02a")
    assert dec.next_frame() is None
    dec.feed(b"b")
    assert dec.next_frame() == b"ab"
    assert dec.next_frame() is None
    assert not dec.at_eof


def test_too_large_prefix_raises_before_the_body_arrives() -> None:
    dec = FrameDecoder(max_frame_size=10)
    with pytest.raises(FrameTooLarge) as info:
        dec.feed((11).to_bytes(4, "big"))
    assert "11" in str(info.value) and "10" in str(info.value)
    assert dec.buffered == 4  # the prefix only: no body was ever buffered


def test_too_large_prefix_split_across_feeds() -> None:
    dec = FrameDecoder(max_frame_size=100)
    dec.feed(b"\xff\xff")
    with pytest.raises(FrameTooLarge, match=r"4294967295 bytes .* 100 bytes"):
        dec.feed(b"\xff\xff")


def test_too_large_prefix_after_good_frames_raises_in_next_frame() -> None:
    dec = FrameDecoder(max_frame_size=10)
    dec.feed(encode_frame(b"ok") + (1000).to_bytes(4, "big"))
    assert dec.next_frame() == b"ok"
    with pytest.raises(FrameTooLarge, match="1000"):
        dec.next_frame()


def test_frame_of_exactly_max_size_is_accepted() -> None:
    dec = FrameDecoder(max_frame_size=5)
    dec.feed(encode_frame(b"12345"))
    assert dec.next_frame() == b"12345"


def test_default_max_frame_size_is_16_mib() -> None:
    assert FrameDecoder().max_frame_size == DEFAULT_MAX_FRAME_SIZE == 16 * 2**20
    with pytest.raises(FrameTooLarge):
        FrameDecoder().feed((16 * 2**20 + 1).to_bytes(4, "big"))


@pytest.mark.parametrize("partial", [b"\x00", b"\x00\x00\x00", b"\x00\x00\x00\x05ab"])
def test_eof_mid_frame_is_a_remote_error(partial: bytes) -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(b"whole") + partial)
    dec.feed(b"")
    assert dec.next_frame() == b"whole"
    with pytest.raises(RemoteProtocolError, match="connection closed mid-frame"):
        dec.next_frame()


def test_clean_eof() -> None:
    dec = FrameDecoder()
    dec.feed(encode_frame(b"a"))
    dec.feed(b"")
    assert dec.at_eof
    assert dec.next_frame() == b"a"
    assert dec.next_frame() is None


def test_data_after_eof_is_a_local_error() -> None:
    dec = FrameDecoder()
    dec.feed(b"")
    with pytest.raises(LocalProtocolError):
        dec.feed(b"more")


def test_buffer_is_compacted_as_frames_are_read() -> None:
    dec = FrameDecoder()
    frames = [bytes([i]) * 1000 for i in range(200)]
    stream = b"".join(encode_frame(f) for f in frames)
    dec.feed(stream + b"\x00\x00")  # 200 kB of frames plus a partial prefix
    assert drain(dec) == frames
    assert dec.buffered == 2
    assert len(dec._buf) < 64 * 1024 + 2000  # consumed bytes were dropped


# ---------------------------------------------------------------- JSON lines


def test_encode_line() -> None:
    assert encode_line(b"{}") == b"{}\n"
    with pytest.raises(LocalProtocolError):
        encode_line(b"a\nb")


def test_lines_split_at_every_offset() -> None:
    stream = b"".join(encode_line(b) for b in LINES)
    for i in range(len(stream) + 1):
        assert feed_pieces(LineDecoder(), stream, [i]) == LINES, f"split at {i}"


def test_crlf_lines_split_at_every_offset() -> None:
    stream = b"".join(line + b"\r\n" for line in LINES)
    for i in range(len(stream) + 1):
        assert feed_pieces(LineDecoder(), stream, [i]) == LINES, f"split at {i}"


_line_bodies = st.binary(min_size=1, max_size=200).map(
    lambda b: b.replace(b"\n", b"n").replace(b"\r", b"r")
)


@given(
    lines=st.lists(_line_bodies, max_size=12),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=30),
)
def test_lines_survive_arbitrary_splits(lines: list[bytes], crlf: bool, cuts: list[int]) -> None:
    end = b"\r\n" if crlf else b"\n"
    stream = b"".join(line + end for line in lines)
    cuts = [c for c in cuts if c <= len(stream)]
    assert feed_pieces(LineDecoder(), stream, cuts) == lines


def test_blank_lines_are_skipped() -> None:
    dec = LineDecoder()
    dec.feed(b"\n\r\na\n\n")
    assert drain(dec) == [b"a"]


def test_line_without_newline_over_max_raises_in_feed() -> None:
    dec = LineDecoder(max_line_size=10)
    dec.feed(b"x" * 10)
    assert dec.next_frame() is None
    with pytest.raises(FrameTooLarge, match="10"):
        dec.feed(b"yy")


def test_terminated_line_over_max_raises() -> None:
    dec = LineDecoder(max_line_size=3)
    dec.feed(b"abc\nabcd\n")
    assert dec.next_frame() == b"abc"
    with pytest.raises(FrameTooLarge):
        dec.next_frame()


def test_line_of_exactly_max_with_crlf_is_accepted() -> None:
    dec = LineDecoder(max_line_size=3)
    dec.feed(b"abc\r")
    dec.feed(b"\n")
    assert dec.next_frame() == b"abc"


def test_unterminated_final_line_at_eof_is_an_error() -> None:
    dec = LineDecoder()
    dec.feed(b'{"a":1}\n{"b":')
    dec.feed(b"")
    assert dec.next_frame() == b'{"a":1}'
    with pytest.raises(RemoteProtocolError, match="closed mid-line"):
        dec.next_frame()


def test_line_data_after_eof_is_a_local_error() -> None:
    dec = LineDecoder()
    dec.feed(b"")
    with pytest.raises(LocalProtocolError):
        dec.feed(b"x\n")


def test_line_buffer_is_compacted() -> None:
    dec = LineDecoder()
    lines = [bytes([65 + i % 26]) * 1000 for i in range(200)]
    dec.feed(b"".join(line + b"\n" for line in lines) + b"par")
    assert drain(dec) == lines
    assert dec.buffered == 3
    assert len(dec._buf) < 64 * 1024 + 2000
