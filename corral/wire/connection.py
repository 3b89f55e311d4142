"""The sans-IO runtime<->agent connection: bytes in, typed messages out, and the state machine.

Shaped like h11's ``Connection``: the caller owns the I/O. It feeds received bytes to
``receive_data`` (``b""`` means EOF), pulls messages with ``next_message`` until it gets
``NEED_DATA``, and writes what ``send`` returns. Nothing here imports asyncio.

Rules, as in h11's ``_state.py``:

1. Every legal move is a row of ``TRANSITIONS``, keyed by who sends, then the current
   state, then the message type. Both roles share the table: the runtime checks the
   ``Role.WORKER`` rows when it receives and the ``Role.RUNTIME`` rows when it sends;
   the worker does the opposite. ``docs/wire-protocol.md`` shows the same table.
2. A received message the table does not allow raises ``RemoteProtocolError`` (naming
   state and message type) and moves the connection to ``ERROR``; so does any framing or
   decoding error, or EOF outside ``CLOSING``/``CLOSED``.
3. A sent message the table does not allow raises ``LocalProtocolError`` and changes
   nothing: a bug in the caller.
"""

from __future__ import annotations

import struct
from enum import Enum
from typing import Any, Final, Literal, TypeAlias

import msgspec

from corral.errors import LocalProtocolError, RemoteProtocolError
from corral.wire.framing import DEFAULT_MAX_FRAME_SIZE, FrameDecoder, LineDecoder
from corral.wire.messages import (
    PROTOCOL_VERSION,
    Broadcast,
    Cancel,
    Deliver,
    ErrorInfo,
    Heartbeat,
    Hello,
    Init,
    InitError,
    Log,
    MemorySave,
    Publish,
    Ready,
    Reply,
    Request,
    Result,
    Send,
    Shutdown,
    Stats,
    Subscribe,
    ToRuntime,
    ToWorker,
    Unsubscribe,
)

__all__ = [
    "NEED_DATA",
    "TRANSITIONS",
    "Codec",
    "ConnState",
    "Connection",
    "ConnectionClosed",
    "Message",
    "Role",
]

Message: TypeAlias = ToRuntime | ToWorker


class Role(Enum):
    """Which end of the connection we are."""

    RUNTIME = "runtime"
    WORKER = "worker"


class Codec(Enum):
    """How messages are encoded: msgpack in length-prefixed frames, or JSON lines."""

    MSGPACK = "msgpack"
    JSONL = "jsonl"


class ConnState(Enum):
    """Where the connection is in its lifecycle; one state shared by both directions."""

    HELLO = "HELLO"  # waiting for the agent's Hello
    INIT = "INIT"  # Hello seen; waiting for the runtime's Init
    READYING = "READYING"  # Init seen; the agent initialises, then sends Ready or InitError
    READY = "READY"  # tasks flow both ways
    CLOSING = "CLOSING"  # Shutdown seen; in-flight work finishes, then the agent closes
    CLOSED = "CLOSED"  # the agent closed after Shutdown, or failed with InitError
    ERROR = "ERROR"  # a protocol error; nothing more can be received or sent


class _Sentinel(Enum):
    NEED_DATA = "NEED_DATA"

    def __repr__(self) -> str:
        return self.value


#: Returned by ``next_message`` when a whole message is not buffered yet. If the state is
#: then ``CLOSED``, the peer has closed and no message will ever come. An enum member, so
#: ``if msg is NEED_DATA: ...`` narrows the type for mypy.
NEED_DATA: Final = _Sentinel.NEED_DATA


class ConnectionClosed:
    """Table key for the peer closing its side (EOF); never returned as a message."""

    __slots__ = ()


_S = ConnState

#: Every legal move: sender -> state -> message type -> next state. Absent means illegal.
#: ``ConnectionClosed`` is the sender closing its side (EOF).
TRANSITIONS: Final[dict[Role, dict[ConnState, dict[type[Any], ConnState]]]] = {
    Role.WORKER: {
        _S.HELLO: {Hello: _S.INIT},
        _S.INIT: {Heartbeat: _S.INIT, Log: _S.INIT},
        _S.READYING: {Ready: _S.READY, InitError: _S.CLOSED,
                      Heartbeat: _S.READYING, Log: _S.READYING},
        _S.READY: {Result: _S.READY, Send: _S.READY, Request: _S.READY, Heartbeat: _S.READY,
                   Log: _S.READY, Stats: _S.READY, MemorySave: _S.READY, Publish: _S.READY,
                   Broadcast: _S.READY, Subscribe: _S.READY, Unsubscribe: _S.READY},
        # In-flight handlers finish within the grace, so they may still Send, Request and Publish.
        _S.CLOSING: {Result: _S.CLOSING, Send: _S.CLOSING, Request: _S.CLOSING,
                     Heartbeat: _S.CLOSING, Log: _S.CLOSING, Stats: _S.CLOSING,
                     MemorySave: _S.CLOSING, Publish: _S.CLOSING, Broadcast: _S.CLOSING,
                     ConnectionClosed: _S.CLOSED},
        # After InitError the agent may still log (or beat) while it exits.
        _S.CLOSED: {Heartbeat: _S.CLOSED, Log: _S.CLOSED, ConnectionClosed: _S.CLOSED},
        _S.ERROR: {},
    },
    Role.RUNTIME: {
        _S.HELLO: {},
        _S.INIT: {Init: _S.READYING},
        _S.READYING: {},
        _S.READY: {Deliver: _S.READY, Reply: _S.READY, Cancel: _S.READY, Shutdown: _S.CLOSING},
        _S.CLOSING: {Reply: _S.CLOSING, Cancel: _S.CLOSING, ConnectionClosed: _S.CLOSED},
        _S.CLOSED: {ConnectionClosed: _S.CLOSED},
        _S.ERROR: {},
    },
}  # fmt: skip

_PEER: Final = {Role.RUNTIME: Role.WORKER, Role.WORKER: Role.RUNTIME}
_NAME: Final = {Role.RUNTIME: "runtime", Role.WORKER: "agent"}

# Built once per module, never per message (msgspec docs/perf-tips.rst).
_MSGPACK_ENCODER: Final = msgspec.msgpack.Encoder()
_JSON_ENCODER: Final = msgspec.json.Encoder()
_DECODERS: Final[
    dict[tuple[Role, Codec], msgspec.msgpack.Decoder[Any] | msgspec.json.Decoder[Any]]
] = {
    (Role.RUNTIME, Codec.MSGPACK): msgspec.msgpack.Decoder(ToRuntime),
    (Role.WORKER, Codec.MSGPACK): msgspec.msgpack.Decoder(ToWorker),
    (Role.RUNTIME, Codec.JSONL): msgspec.json.Decoder(ToRuntime),
    (Role.WORKER, Codec.JSONL): msgspec.json.Decoder(ToWorker),
}
_DECODE_ERRORS = (msgspec.ValidationError, msgspec.DecodeError)
_PACK_PREFIX: Final = struct.Struct(">I").pack
_MAX_BODY: Final = 2**32 - 1


class Connection:
    """One end of a runtime<->agent connection, with no I/O.

    ``role`` is the end we are; ``codec`` picks msgpack frames or JSON lines. Messages
    received are ``ToRuntime`` for ``Role.RUNTIME`` and ``ToWorker`` for ``Role.WORKER``.
    """

    __slots__ = (
        "_decode",
        "_encode",
        "_frames",
        "_jsonl",
        "_recv_rows",
        "_send_rows",
        "_state",
        "codec",
        "init_error",
        "max_frame_size",
        "peer_pid",
        "role",
    )

    def __init__(
        self,
        role: Role,
        codec: Codec = Codec.MSGPACK,
        *,
        max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
    ) -> None:
        self.role = role
        self.codec = codec
        self.max_frame_size = max_frame_size
        #: The agent's pid from its Hello (runtime role); None until then, and for workers.
        self.peer_pid: int | None = None
        #: The agent's InitError, once it failed to initialise (state CLOSED).
        self.init_error: ErrorInfo | None = None
        self._state = ConnState.HELLO
        self._send_rows = TRANSITIONS[role]
        self._recv_rows = TRANSITIONS[_PEER[role]]
        self._frames: FrameDecoder | LineDecoder
        if codec is Codec.MSGPACK:
            self._frames = FrameDecoder(max_frame_size)
            self._encode = _MSGPACK_ENCODER.encode
        else:
            self._frames = LineDecoder(max_frame_size)
            self._encode = _JSON_ENCODER.encode
        self._jsonl = codec is Codec.JSONL
        self._decode = _DECODERS[role, codec].decode

    @property
    def state(self) -> ConnState:
        """The connection's current state."""
        return self._state

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> None:
        """Buffer bytes from the peer; ``b""`` means it closed its side (EOF).

        Raises FrameTooLarge (moving to ERROR) as soon as a frame's announced size is over
        ``max_frame_size``, before its body is buffered.
        """
        try:
            self._frames.feed(data)
        except RemoteProtocolError:
            self._state = ConnState.ERROR
            raise

    def next_message(self) -> Message | Literal[_Sentinel.NEED_DATA]:
        """Return the next received message, or NEED_DATA.

        Raises RemoteProtocolError (and moves to ERROR) for a bad frame, a message that does
        not decode or is not allowed in this state, a protocol version mismatch, or EOF
        outside CLOSING/CLOSED.
        """
        state = self._state
        if state is ConnState.ERROR:
            raise RemoteProtocolError(
                "connection is in state ERROR after an earlier protocol error"
            )
        try:
            frame = self._frames.next_frame()
        except RemoteProtocolError:
            self._state = ConnState.ERROR
            raise
        if frame is None:
            if self._frames.at_eof:
                self._received(ConnectionClosed, None)
            return NEED_DATA
        try:
            msg = self._decode(frame)
        except _DECODE_ERRORS as exc:
            self._state = ConnState.ERROR
            raise RemoteProtocolError(
                f"{_NAME[_PEER[self.role]]} sent an invalid {self.codec.value} message in state "
                f"{state.value}: {exc}"
            ) from exc
        new = self._recv_rows[state].get(type(msg))
        if new is not state:  # a handshake step, the end, or an illegal message
            self._received(type(msg), msg)
        return msg  # type: ignore[no-any-return]

    def _received(self, kind: type[Any], msg: Message | None) -> None:
        state = self._state
        new = self._recv_rows[state].get(kind)
        peer = _NAME[_PEER[self.role]]
        if new is None:
            self._state = ConnState.ERROR
            what = "closed the connection" if kind is ConnectionClosed else f"sent {kind.__name__}"
            raise RemoteProtocolError(
                f"{peer} {what} in state {state.value}, which does not allow it"
            )
        if isinstance(msg, Hello):
            if msg.protocol_version != PROTOCOL_VERSION:
                self._state = ConnState.ERROR
                raise RemoteProtocolError(
                    f"agent speaks wire protocol version {msg.protocol_version}, but this runtime "
                    f"speaks version {PROTOCOL_VERSION}",
                    hint=f"use an agent SDK for protocol version {PROTOCOL_VERSION}",
                )
            self.peer_pid = msg.pid or None
        elif isinstance(msg, InitError):
            self.init_error = msg.error
        self._state = new

    # ------------------------------------------------------------------ sending

    def send(self, msg: Message) -> bytes:
        """Encode one message as a frame (msgpack) or line (JSONL) and advance the state.

        Raises LocalProtocolError, changing nothing, if the message is not allowed in this
        state, cannot be encoded, or is larger than ``max_frame_size``.
        """
        state = self._state
        new = self._send_rows[state].get(type(msg))
        if new is None:
            raise LocalProtocolError(
                f"can't send {type(msg).__name__} as {self.role.value} in state {state.value}"
            )
        try:
            body = self._encode(msg)
        except (TypeError, ValueError, msgspec.EncodeError) as exc:
            raise LocalProtocolError(f"can't encode {type(msg).__name__}: {exc}") from exc
        size = len(body)
        if size > self.max_frame_size or size > _MAX_BODY:
            raise LocalProtocolError(
                f"{type(msg).__name__} encodes to {size} bytes, over max_frame_size "
                f"{self.max_frame_size} bytes"
            )
        if new is not state:
            self._state = new
        if self._jsonl:
            return body + b"\n"
        return _PACK_PREFIX(size) + body

    def __repr__(self) -> str:
        return f"<Connection role={self.role.value} codec={self.codec.value} state={self._state.value}>"
