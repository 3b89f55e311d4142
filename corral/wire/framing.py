"""Byte-stream framing for the wire protocol, with no I/O.

Two framings carry the same messages:

* length-prefixed frames (Python workers, over a socket): a 4-byte big-endian unsigned
  length, then that many bytes of body;
* JSON lines (``command:`` agents, over stdio): one body per line, terminated by ``\\n``
  (a trailing ``\\r`` is stripped; blank lines are skipped).

Both decoders share one interface: ``feed(data)`` buffers bytes (``b""`` means EOF) and
``next_frame()`` returns one body or ``None`` when more data is needed. Agents are
untrusted, so a frame's size is checked against the limit before its body is buffered,
and reading costs O(bytes read): the buffer is a ``bytearray`` read from an offset and
compacted now and then, never re-sliced per frame (as h11's receive buffer, "to avoid
DoS issues").
"""

from __future__ import annotations

import struct

from corral.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError

__all__ = [
    "DEFAULT_MAX_FRAME_SIZE",
    "PREFIX_SIZE",
    "FrameDecoder",
    "LineDecoder",
    "encode_frame",
    "encode_line",
]

#: Largest body either side accepts by default: 16 MiB.
DEFAULT_MAX_FRAME_SIZE = 16 * 2**20

#: Bytes in a frame's length prefix.
PREFIX_SIZE = 4

_PREFIX = struct.Struct(">I")
_unpack_from = _PREFIX.unpack_from
_MAX_PREFIXED = 2**32 - 1

#: Consumed bytes are dropped from the front of a buffer once there are at least this many
#: and they are at least half of it, so compaction is amortised O(1) per byte.
_COMPACT_AT = 64 * 1024


def encode_frame(body: bytes) -> bytes:
    """Prefix one body with its 4-byte big-endian length."""
    if len(body) > _MAX_PREFIXED:
        raise LocalProtocolError(f"frame body of {len(body)} bytes does not fit a 4-byte length")
    return _PREFIX.pack(len(body)) + body


def encode_line(body: bytes) -> bytes:
    """Terminate one JSON body with a newline; the body must not contain one."""
    if b"\n" in body:
        raise LocalProtocolError("a JSON-lines body must not contain a raw newline")
    return body + b"\n"


class FrameDecoder:
    """Splits a byte stream into length-prefixed frames (sans-IO)."""

    __slots__ = ("_buf", "_eof", "_pos", "max_frame_size")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_frame_size < 0:
            raise ValueError("max_frame_size must be >= 0")
        self.max_frame_size = max_frame_size
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    @property
    def at_eof(self) -> bool:
        """True once EOF (``b""``) has been fed."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as frames."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Buffer received bytes; ``b""`` means the peer closed its side (EOF).

        Raises FrameTooLarge as soon as a pending prefix is over ``max_frame_size``, and
        LocalProtocolError if data is fed after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data fed to a FrameDecoder after EOF")
        buf = self._buf
        pending = len(buf) - self._pos
        buf += data
        # Only a prefix that this data completed needs checking; next_frame checks the rest.
        if pending < PREFIX_SIZE <= pending + len(data):
            size = _unpack_from(buf, self._pos)[0]
            if size > self.max_frame_size:
                self._check_prefix(size)

    def next_frame(self) -> bytes | None:
        """Return the next complete body, or None if more data is needed.

        Raises FrameTooLarge for a prefix over ``max_frame_size`` (before its body is
        buffered) and RemoteProtocolError if EOF came with a partial frame buffered.
        """
        buf = self._buf
        pos = self._pos
        avail = len(buf) - pos
        if avail >= PREFIX_SIZE:
            size = _unpack_from(buf, pos)[0]
            if size > self.max_frame_size:
                self._check_prefix(size)
            end = pos + PREFIX_SIZE + size
            if end <= len(buf):
                frame = bytes(buf[pos + PREFIX_SIZE : end])
                if end == len(buf):
                    buf.clear()
                    self._pos = 0
                elif end >= _COMPACT_AT and end * 2 >= len(buf):
                    del buf[:end]
                    self._pos = 0
                else:
                    self._pos = end
                return frame
            if self._eof:
                raise RemoteProtocolError(
                    f"connection closed mid-frame: got {avail - PREFIX_SIZE} of {size} body bytes"
                )
        elif self._eof and avail:
            raise RemoteProtocolError(
                f"connection closed mid-frame: got {avail} of {PREFIX_SIZE} length-prefix bytes"
            )
        return None

    def _check_prefix(self, size: int) -> None:
        if size > self.max_frame_size:
            raise FrameTooLarge(
                f"frame of {size} bytes is larger than max_frame_size {self.max_frame_size} bytes"
            )


class LineDecoder:
    """Splits a byte stream into newline-terminated lines (sans-IO), for JSON lines."""

    __slots__ = ("_buf", "_eof", "_pos", "_scan", "max_line_size")

    def __init__(self, max_line_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        if max_line_size < 0:
            raise ValueError("max_line_size must be >= 0")
        self.max_line_size = max_line_size
        self._buf = bytearray()
        self._pos = 0
        self._scan = 0  # no newline in buf[_pos:_scan]; searches resume here
        self._eof = False

    @property
    def at_eof(self) -> bool:
        """True once EOF (``b""``) has been fed."""
        return self._eof

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as lines."""
        return len(self._buf) - self._pos

    def feed(self, data: bytes) -> None:
        """Buffer received bytes; ``b""`` means the peer closed its side (EOF).

        Raises FrameTooLarge as soon as more than ``max_line_size`` bytes are pending with
        no newline, and LocalProtocolError if data is fed after EOF.
        """
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("data fed to a LineDecoder after EOF")
        buf = self._buf
        buf += data
        if len(buf) - self._pos > self.max_line_size + 1:  # + 1: the "\r" we may strip
            idx = buf.find(b"\n", self._scan)
            if idx < 0:
                self._scan = len(buf)
                self._too_large(len(buf) - self._pos)
            self._scan = idx

    def next_frame(self) -> bytes | None:
        """Return the next non-blank line without its ``\\n``/``\\r\\n``, or None for more data.

        Raises FrameTooLarge for a line over ``max_line_size`` and RemoteProtocolError if
        EOF came after an unterminated line.
        """
        buf = self._buf
        while True:
            pos = self._pos
            idx = buf.find(b"\n", self._scan)
            if idx < 0:
                end = len(buf)
                self._scan = end
                if end - pos > self.max_line_size + 1:
                    self._too_large(end - pos)
                if self._eof and end > pos:
                    raise RemoteProtocolError(
                        f"connection closed mid-line: {end - pos} bytes with no final newline"
                    )
                return None
            stop = idx - 1 if idx > pos and buf[idx - 1] == 0x0D else idx
            if stop - pos > self.max_line_size:
                self._too_large(stop - pos)
            line = bytes(buf[pos:stop])
            nxt = idx + 1
            if nxt == len(buf):
                buf.clear()
                nxt = 0
            elif nxt >= _COMPACT_AT and nxt * 2 >= len(buf):
                del buf[:nxt]
                nxt = 0
            self._pos = self._scan = nxt
            if line:
                return line

    def _too_large(self, size: int) -> None:
        raise FrameTooLarge(
            f"line of at least {size} bytes is longer than max_line_size {self.max_line_size}"
            " bytes (or has no newline)"
        )
