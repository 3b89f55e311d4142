"""The sans-IO connection: handshake, every (state, sender, message) pair, and decoding errors."""

from __future__ import annotations

import json
import runpy
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import FrameTooLarge, LocalProtocolError, RemoteProtocolError
from corral.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    TRANSITIONS,
    Broadcast,
    Cancel,
    Codec,
    ConnectionClosed,
    ConnState,
    Deliver,
    ErrorInfo,
    Heartbeat,
    Hello,
    Init,
    InitError,
    Log,
    MemorySave,
    Message,
    Publish,
    Ready,
    Reply,
    Request,
    Result,
    Role,
    Schedule,
    Send,
    Shutdown,
    Stats,
    Subscribe,
    Unsubscribe,
    encode_frame,
    encode_line,
)
from corral.wire.connection import Connection

ROOT = Path(__file__).resolve().parents[2]
CODECS = [Codec.MSGPACK, Codec.JSONL]
PEER = {Role.RUNTIME: Role.WORKER, Role.WORKER: Role.RUNTIME}

SAMPLES: dict[type[Any], Message] = {
    Hello: Hello(protocol_version=PROTOCOL_VERSION, pid=4242, sdk="test/1"),
    Ready: Ready(handlers=["echo"], schedules=[Schedule(handler="tick", interval=5.0)]),
    InitError: InitError(error=ErrorInfo(type="ImportError", message="no module x")),
    Result: Result(id=1, ok=True, payload={"x": 1}),
    Send: Send(to="other", payload=[1, 2], handler="h"),
    Request: Request(id=9, to="other", payload="q", timeout=2.5),
    Heartbeat: Heartbeat(seq=3),
    Log: Log(message="hi", level="warning"),
    Stats: Stats(tasks=2, errors=1),
    MemorySave: MemorySave(values={"k": [1, 2]}),
    Publish: Publish(subject="orders.eu.created", payload={"n": 1}, guarantee="effectively-once",
                     ttl=30.0, idempotency_key="order-1", headers={"trace": "t1"}),
    Broadcast: Broadcast(payload={"alert": 1}, handler="on_alert", namespace="ops",
                         selector="team=nlp,tier!=gpu"),
    Subscribe: Subscribe(subject="orders.>", handler="on_order", ack_wait=10.0),
    Unsubscribe: Unsubscribe(subject="orders.>"),
    Init: Init(agent="a", instance="a-0", entrypoint="m:A", config={"c": 1}, memory={"m": 2},
               heartbeat_interval=0.5),
    Deliver: Deliver(id=1, handler="echo", payload={"x": 1}, sender="cli", timeout=300.0,
                     kind="publish", subject="orders.eu.created"),
    Reply: Reply(id=9, ok=False, error=ErrorInfo(type="TaskTimeout", message="late")),
    Cancel: Cancel(id=1),
    Shutdown: Shutdown(grace=1.0),
}  # fmt: skip
SENT_BY: dict[Role, list[type[Any]]] = {
    Role.WORKER: [
        Hello,
        Ready,
        InitError,
        Result,
        Send,
        Request,
        Heartbeat,
        Log,
        Stats,
        MemorySave,
        Publish,
        Broadcast,
        Subscribe,
        Unsubscribe,
    ],
    Role.RUNTIME: [Init, Deliver, Reply, Cancel, Shutdown],
}

# How to reach each state from HELLO with legal moves: (sender, message).
W, R = Role.WORKER, Role.RUNTIME
PATHS: dict[ConnState, list[tuple[Role, Message]]] = {
    ConnState.HELLO: [],
    ConnState.INIT: [(W, SAMPLES[Hello])],
    ConnState.READYING: [(W, SAMPLES[Hello]), (R, SAMPLES[Init])],
    ConnState.READY: [(W, SAMPLES[Hello]), (R, SAMPLES[Init]), (W, SAMPLES[Ready])],
    ConnState.CLOSING: [(W, SAMPLES[Hello]), (R, SAMPLES[Init]), (W, SAMPLES[Ready]),
                        (R, SAMPLES[Shutdown])],
    ConnState.CLOSED: [(W, SAMPLES[Hello]), (R, SAMPLES[Init]), (W, SAMPLES[InitError])],
}  # fmt: skip
LIVE_STATES = list(PATHS)

_ENCODERS = {Codec.MSGPACK: msgspec.msgpack.encode, Codec.JSONL: msgspec.json.encode}


def wire(obj: object, codec: Codec) -> bytes:
    """Encode any object as the peer would put it on the wire, independently of Connection."""
    body = _ENCODERS[codec](obj)
    return encode_frame(body) if codec is Codec.MSGPACK else encode_line(body)


def receive_all(conn: Connection, data: bytes) -> list[Message]:
    """Feed ``data`` (``b""`` is EOF) and return every message it completed."""
    conn.receive_data(data)
    out: list[Message] = []
    while (msg := conn.next_message()) is not NEED_DATA:
        out.append(msg)
    return out


def drive(role: Role, state: ConnState, codec: Codec) -> Connection:
    """A connection of ``role`` brought to ``state`` by legal sends and receives."""
    conn = Connection(role, codec)
    for sender, msg in PATHS[state]:
        if sender is role:
            conn.send(msg)
        else:
            assert receive_all(conn, wire(msg, codec)) == [msg]
    assert conn.state is state
    return conn


def pair(codec: Codec) -> tuple[Connection, Connection]:
    return Connection(Role.RUNTIME, codec), Connection(Role.WORKER, codec)


def assert_states(a: Connection, b: Connection, state: ConnState) -> None:
    assert (a.state, b.state) == (state, state)


def transfer(src: Connection, dst: Connection, msg: Message) -> Message:
    """Send ``msg`` from ``src`` and receive it on ``dst``; returns what ``dst`` decoded."""
    (got,) = receive_all(dst, src.send(msg))
    return got


# ---------------------------------------------------------------- handshake and happy paths


@pytest.mark.parametrize("codec", CODECS)
def test_full_handshake_through_a_wired_pair(codec: Codec) -> None:
    rt, wk = pair(codec)
    assert_states(rt, wk, ConnState.HELLO)
    assert transfer(wk, rt, SAMPLES[Hello]) == SAMPLES[Hello]
    assert_states(rt, wk, ConnState.INIT)
    assert rt.peer_pid == 4242 and wk.peer_pid is None
    assert transfer(wk, rt, Log(message="loading")) == Log(message="loading")
    assert transfer(rt, wk, SAMPLES[Init]) == SAMPLES[Init]
    assert_states(rt, wk, ConnState.READYING)
    assert transfer(wk, rt, Heartbeat(seq=1)) == Heartbeat(seq=1)
    assert transfer(wk, rt, SAMPLES[Ready]) == SAMPLES[Ready]
    assert_states(rt, wk, ConnState.READY)

    assert transfer(rt, wk, SAMPLES[Deliver]) == SAMPLES[Deliver]
    assert transfer(wk, rt, Request(id=1, to="b")) == Request(id=1, to="b")
    assert transfer(rt, wk, Reply(id=1, ok=True, payload=2)) == Reply(id=1, ok=True, payload=2)
    assert transfer(wk, rt, SAMPLES[Result]) == SAMPLES[Result]
    for t in (Send, Heartbeat, Log, Stats, MemorySave, Publish):
        assert transfer(wk, rt, SAMPLES[t]) == SAMPLES[t]
    assert transfer(rt, wk, Cancel(id=5)) == Cancel(id=5)
    assert_states(rt, wk, ConnState.READY)

    assert transfer(rt, wk, Shutdown(grace=2.0)) == Shutdown(grace=2.0)
    assert_states(rt, wk, ConnState.CLOSING)
    assert transfer(wk, rt, Result(id=2, ok=True)) == Result(id=2, ok=True)
    assert transfer(wk, rt, MemorySave(values={"a": 1})) == MemorySave(values={"a": 1})
    assert transfer(wk, rt, Publish(subject="a.b")) == Publish(subject="a.b")
    rt.receive_data(b"")  # the agent exits
    assert rt.next_message() is NEED_DATA
    assert rt.state is ConnState.CLOSED
    assert rt.next_message() is NEED_DATA  # stays closed


@pytest.mark.parametrize("codec", CODECS)
def test_init_error_closes_with_the_error(codec: Codec) -> None:
    rt, wk = pair(codec)
    transfer(wk, rt, SAMPLES[Hello])
    transfer(rt, wk, SAMPLES[Init])
    transfer(wk, rt, SAMPLES[InitError])
    assert_states(rt, wk, ConnState.CLOSED)
    assert rt.init_error == SAMPLES[InitError].error  # type: ignore[union-attr]
    rt.receive_data(b"")
    assert rt.next_message() is NEED_DATA
    assert rt.state is ConnState.CLOSED


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("state", [ConnState.CLOSING, ConnState.CLOSED])
def test_worker_sees_runtime_eof_after_shutdown_or_init_error(
    codec: Codec, state: ConnState
) -> None:
    wk = drive(Role.WORKER, state, codec)
    wk.receive_data(b"")
    assert wk.next_message() is NEED_DATA
    assert wk.state is ConnState.CLOSED


@pytest.mark.parametrize("codec", CODECS)
def test_whole_conversation_split_at_every_offset(codec: Codec) -> None:
    msgs: list[Message] = [SAMPLES[Hello], Log(message="é ü \n"), Heartbeat(seq=1)]
    stream = b"".join(wire(m, codec) for m in msgs)
    for i in range(len(stream) + 1):
        rt = Connection(Role.RUNTIME, codec)
        got = [m for piece in (stream[:i], stream[i:]) if piece for m in receive_all(rt, piece)]
        assert got == msgs, f"split at {i}"
        assert rt.state is ConnState.INIT


@given(cuts=st.lists(st.integers(min_value=0, max_value=600), max_size=20),
       codec=st.sampled_from(CODECS))  # fmt: skip
def test_ready_traffic_survives_arbitrary_splits(cuts: list[int], codec: Codec) -> None:
    rt = drive(Role.RUNTIME, ConnState.READY, codec)
    msgs: list[Message] = [SAMPLES[t] for t in SENT_BY[Role.WORKER][3:]] * 2
    stream = b"".join(wire(m, codec) for m in msgs)
    got: list[Message] = []
    start = 0
    for cut in [*sorted(c for c in cuts if c <= len(stream)), len(stream)]:
        if cut > start:
            got += receive_all(rt, stream[start:cut])
            start = cut
    assert got == msgs


# ---------------------------------------------------------------- the table, pair by pair


def legal_moves() -> list[tuple[Role, ConnState, type[Any], ConnState]]:
    return [(sender, state, t, new)
            for sender, rows in TRANSITIONS.items()
            for state, row in rows.items() if state in PATHS
            for t, new in row.items() if t is not ConnectionClosed]  # fmt: skip


def illegal_moves(*, both_directions: bool = False) -> list[tuple[Role, ConnState, type[Any]]]:
    kinds = {sender: list(SAMPLES) if both_directions else SENT_BY[sender] for sender in Role}
    return [(sender, state, t)
            for sender in Role for state in LIVE_STATES for t in kinds[sender]
            if t not in TRANSITIONS[sender][state]]  # fmt: skip


def test_table_has_a_row_for_every_sender_and_state() -> None:
    for sender in Role:
        assert set(TRANSITIONS[sender]) == set(ConnState)
        for row in TRANSITIONS[sender].values():
            assert all(t is ConnectionClosed or t in SENT_BY[sender] for t in row)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("sender", "state", "kind", "new"), legal_moves())
def test_every_legal_move(
    codec: Codec, sender: Role, state: ConnState, kind: type[Any], new: ConnState
) -> None:
    me = drive(sender, state, codec)
    data = me.send(SAMPLES[kind])
    assert me.state is new
    them = drive(PEER[sender], state, codec)
    assert receive_all(them, data) == [SAMPLES[kind]]
    assert them.state is new


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("sender", "state", "kind"), illegal_moves(both_directions=True))
def test_illegal_send_raises_local_error_and_changes_nothing(
    codec: Codec, sender: Role, state: ConnState, kind: type[Any]
) -> None:
    conn = drive(sender, state, codec)
    with pytest.raises(LocalProtocolError) as info:
        conn.send(SAMPLES[kind])
    assert state.value in str(info.value) and kind.__name__ in str(info.value)
    assert conn.state is state
    # Nothing changed: a legal move still works afterwards.
    legal = [t for t in SENT_BY[sender] if t in TRANSITIONS[sender][state]]
    if legal:
        conn.send(SAMPLES[legal[0]])


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("sender", "state", "kind"), illegal_moves())
def test_illegal_receive_raises_remote_error_and_moves_to_error(
    codec: Codec, sender: Role, state: ConnState, kind: type[Any]
) -> None:
    conn = drive(PEER[sender], state, codec)
    conn.receive_data(wire(SAMPLES[kind], codec))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_message()
    assert state.value in str(info.value) and kind.__name__ in str(info.value)
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("role", "kind"), [(role, t) for role in Role for t in SENT_BY[role]])
def test_receiving_a_message_of_our_own_direction_fails_to_decode(
    codec: Codec, role: Role, kind: type[Any]
) -> None:
    conn = drive(role, ConnState.READY, codec)
    conn.receive_data(wire(SAMPLES[kind], codec))
    with pytest.raises(RemoteProtocolError, match=r"\$\.type"):
        conn.next_message()
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("role", list(Role))
@pytest.mark.parametrize("state", [ConnState.HELLO, ConnState.INIT, ConnState.READYING,
                                   ConnState.READY])  # fmt: skip
def test_eof_outside_closing_is_a_remote_error(codec: Codec, role: Role, state: ConnState) -> None:
    conn = drive(role, state, codec)
    conn.receive_data(b"")
    with pytest.raises(RemoteProtocolError, match=f"closed the connection in state {state.value}"):
        conn.next_message()
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
def test_error_state_is_sticky(codec: Codec) -> None:
    conn = drive(Role.RUNTIME, ConnState.READY, codec)
    conn.receive_data(wire(SAMPLES[Hello], codec) + wire(SAMPLES[Result], codec))
    with pytest.raises(RemoteProtocolError):
        conn.next_message()
    with pytest.raises(RemoteProtocolError, match="ERROR"):
        conn.next_message()
    with pytest.raises(LocalProtocolError, match="ERROR"):
        conn.send(SAMPLES[Deliver])
    assert conn.state is ConnState.ERROR


# ---------------------------------------------------------------- decoding and evolution


@pytest.mark.parametrize("codec", CODECS)
def test_protocol_version_mismatch_names_both_versions(codec: Codec) -> None:
    conn = Connection(Role.RUNTIME, codec)
    conn.receive_data(wire(Hello(protocol_version=PROTOCOL_VERSION + 6), codec))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_message()
    text = str(info.value)
    assert f"version {PROTOCOL_VERSION + 6}" in text and f"version {PROTOCOL_VERSION}" in text
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_fields_are_ignored(codec: Codec) -> None:
    conn = Connection(Role.RUNTIME, codec)
    hello = {"type": "hello", "protocol_version": PROTOCOL_VERSION, "pid": 7, "future": [1, {}]}
    ready = {"type": "ready", "handlers": ["a"], "schedules": [{"handler": "a", "interval": 1,
                                                                 "jitter": 0.5}], "new": True}  # fmt: skip
    assert receive_all(conn, wire(hello, codec)) == [Hello(protocol_version=1, pid=7)]
    conn.send(SAMPLES[Init])
    got = receive_all(conn, wire(ready, codec))
    assert got == [Ready(handlers=["a"], schedules=[Schedule(handler="a", interval=1.0)])]
    worker = drive(Role.WORKER, ConnState.READY, codec)
    deliver = {"type": "deliver", "id": 7, "handler": "echo", "payload": {}, "priority": "high"}
    assert receive_all(worker, wire(deliver, codec)) == [Deliver(id=7, handler="echo", payload={})]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("state", [ConnState.READY, ConnState.CLOSING])
def test_publish_is_legal_wherever_send_is(codec: Codec, state: ConnState) -> None:
    for sender in Role:
        assert (Publish in TRANSITIONS[sender][state]) is (Send in TRANSITIONS[sender][state])
    rt = drive(Role.RUNTIME, state, codec)
    wk = drive(Role.WORKER, state, codec)
    assert transfer(wk, rt, SAMPLES[Publish]) == SAMPLES[Publish]
    assert_states(rt, wk, state)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("state", [ConnState.HELLO, ConnState.INIT, ConnState.READYING,
                                   ConnState.CLOSED])  # fmt: skip
def test_publish_before_ready_or_after_close_is_illegal(codec: Codec, state: ConnState) -> None:
    wk = drive(Role.WORKER, state, codec)
    with pytest.raises(LocalProtocolError, match=f"Publish .*{state.value}"):
        wk.send(SAMPLES[Publish])
    assert wk.state is state
    rt = drive(Role.RUNTIME, state, codec)
    rt.receive_data(wire(SAMPLES[Publish], codec))
    with pytest.raises(RemoteProtocolError, match=f"Publish in state {state.value}"):
        rt.next_message()
    assert rt.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
def test_publish_defaults_and_wire_form(codec: Codec) -> None:
    rt = drive(Role.RUNTIME, ConnState.READY, codec)
    got = receive_all(rt, wire({"type": "publish", "subject": "a.b"}, codec))
    assert got == [Publish(subject="a.b")]
    (msg,) = got
    assert isinstance(msg, Publish)
    assert (msg.payload, msg.guarantee, msg.ttl, msg.idempotency_key, msg.headers) == (
        None, "at-most-once", None, None, {})
    bad = {"type": "publish", "subject": "a.b", "guarantee": "exactly-once"}
    rt.receive_data(wire(bad, codec))
    with pytest.raises(RemoteProtocolError, match=r"\$\.guarantee"):
        rt.next_message()


@pytest.mark.parametrize("codec", CODECS)
def test_a_deliver_from_an_older_runtime_without_subject_decodes(codec: Codec) -> None:
    wk = drive(Role.WORKER, ConnState.READY, codec)
    old = {"type": "deliver", "id": 3, "handler": "h", "payload": 1, "sender": "x",
           "kind": "send", "timeout": None}  # fmt: skip
    (got,) = receive_all(wk, wire(old, codec))
    assert got == Deliver(id=3, handler="h", payload=1, sender="x", kind="send")
    assert isinstance(got, Deliver) and got.subject == ""
    new = {"type": "deliver", "id": 4, "handler": "h", "kind": "publish", "subject": "a.b"}
    assert receive_all(wk, wire(new, codec)) == [
        Deliver(id=4, handler="h", kind="publish", subject="a.b")]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("state", "obj", "path"),
    [
        (ConnState.HELLO, {"type": "hello", "protocol_version": "one"}, "$.protocol_version"),
        (ConnState.READYING, {"type": "ready", "schedules": [{"handler": 3}]},
         "$.schedules[0].handler"),
        (ConnState.READY, {"type": "result", "id": "7", "ok": True}, "$.id"),
        (ConnState.READY, {"type": "result", "id": 7}, "ok"),
        (ConnState.READY, {"type": "teleport"}, "$.type"),
        (ConnState.READY, {"id": 7}, "type"),
        (ConnState.READY, [1, 2], "Expected `object`"),
    ],
)  # fmt: skip
def test_invalid_message_is_a_remote_error_naming_the_path(
    codec: Codec, state: ConnState, obj: object, path: str
) -> None:
    conn = drive(Role.RUNTIME, state, codec)
    conn.receive_data(wire(obj, codec))
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_message()
    assert path in str(info.value)
    assert "agent sent an invalid" in str(info.value)
    assert isinstance(info.value.__cause__, msgspec.ValidationError)
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize(("codec", "data"), [(Codec.MSGPACK, encode_frame(b"\xc1")),
                                             (Codec.JSONL, b"{not json}\n")])  # fmt: skip
def test_undecodable_bytes_are_a_remote_error(codec: Codec, data: bytes) -> None:
    conn = Connection(Role.RUNTIME, codec)
    conn.receive_data(data)
    with pytest.raises(RemoteProtocolError, match="invalid"):
        conn.next_message()
    assert conn.state is ConnState.ERROR


def test_jsonl_accepts_ints_for_floats_and_crlf() -> None:
    conn = drive(Role.WORKER, ConnState.READY, Codec.JSONL)
    line = b'{"type":"deliver","id":1,"handler":"h","timeout":300}\r\n'
    assert receive_all(conn, line) == [Deliver(id=1, handler="h", timeout=300.0)]


def test_json_wire_form_matches_the_documented_example() -> None:
    conn = drive(Role.RUNTIME, ConnState.READY, Codec.JSONL)
    line = conn.send(Deliver(id=7, handler="echo", payload={"text": "hi"}, sender="cli",
                             timeout=300.0))  # fmt: skip
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"type": "deliver", "id": 7, "handler": "echo",
                                "payload": {"text": "hi"}, "sender": "cli", "kind": "request",
                                "timeout": 300.0, "subject": ""}  # fmt: skip


# ---------------------------------------------------------------- limits


@pytest.mark.parametrize("codec", CODECS)
def test_oversized_incoming_frame_is_rejected_before_its_body(codec: Codec) -> None:
    conn = Connection(Role.RUNTIME, codec, max_frame_size=64)
    conn.receive_data(wire(SAMPLES[Hello], codec))
    assert conn.next_message() == SAMPLES[Hello]
    with pytest.raises(FrameTooLarge):
        if codec is Codec.MSGPACK:
            conn.receive_data((65).to_bytes(4, "big"))
        else:
            conn.receive_data(b"x" * 100)
    assert conn.state is ConnState.ERROR


@pytest.mark.parametrize("codec", CODECS)
def test_oversized_or_unencodable_send_is_a_local_error_and_changes_nothing(codec: Codec) -> None:
    conn = Connection(Role.RUNTIME, codec, max_frame_size=256)
    conn.receive_data(wire(SAMPLES[Hello], codec))
    conn.next_message()
    with pytest.raises(LocalProtocolError, match="max_frame_size 256"):
        conn.send(Init(agent="a", instance="b", config={"big": "x" * 300}))
    assert conn.state is ConnState.INIT
    with pytest.raises(LocalProtocolError, match="can't encode"):
        conn.send(Init(agent="a", instance="b", config={"bad": object()}))
    assert conn.state is ConnState.INIT
    conn.send(Init(agent="a", instance="b"))
    assert conn.state.value == "READYING"


def test_msgpack_frame_layout() -> None:
    conn = Connection(Role.WORKER)
    data = conn.send(SAMPLES[Hello])
    body = msgspec.msgpack.encode(SAMPLES[Hello])
    assert data == len(body).to_bytes(4, "big") + body


# ---------------------------------------------------------------- docs


def test_wire_protocol_doc_embeds_the_current_schema_and_state_table() -> None:
    gen = runpy.run_path(str(ROOT / "scripts" / "gen_wire_schema.py"))
    doc = (ROOT / "docs" / "wire-protocol.md").read_text()
    assert gen["render"]() in doc, "regenerate with: python scripts/gen_wire_schema.py"
    assert gen["render_states"]() in doc, (
        "regenerate with: python scripts/gen_wire_schema.py --states"
    )
