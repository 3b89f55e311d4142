"""The JavaScript agent in examples/node-echo, driven through the Python Connection over stdio."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from corral.wire import (
    NEED_DATA,
    PROTOCOL_VERSION,
    Cancel,
    Codec,
    Connection,
    ConnState,
    Deliver,
    Heartbeat,
    Hello,
    Init,
    Log,
    Message,
    Ready,
    Result,
    Role,
    Shutdown,
    Stats,
)

AGENT_DIR = Path(__file__).resolve().parents[2] / "examples" / "node-echo"
NODE = shutil.which("node")
WAIT = 10.0  # seconds any single expected message may take

if NODE is None:
    if os.environ.get("CORRAL_REQUIRE_SERVICES") == "1":
        pytest.fail("node is not on PATH and CORRAL_REQUIRE_SERVICES=1", pytrace=False)
    pytest.skip(
        "node (Node.js) is not on PATH; install Node.js 18+ to run the JavaScript agent test",
        allow_module_level=True,
    )

pytestmark = pytest.mark.timeout(60)


class NodeAgent:
    """``node agent.js`` with a runtime-role Connection over its stdin/stdout."""

    def __init__(self) -> None:
        assert NODE is not None
        env = {**os.environ, "CORRAL_AGENT": "node-echo", "CORRAL_INSTANCE": "node-echo-0",
               "CORRAL_PROTOCOL": "jsonl"}  # fmt: skip
        self.proc = subprocess.Popen(
            [NODE, "agent.js"], cwd=AGENT_DIR, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        self.conn = Connection(Role.RUNTIME, Codec.JSONL)
        self.chunks: queue.Queue[bytes] = queue.Queue()
        self.stderr: list[bytes] = []
        self.seen: list[Message] = []  # heartbeats, logs and stats met while waiting
        self.pumps = [
            threading.Thread(target=self._pump_stdout, daemon=True),
            threading.Thread(target=self._pump_stderr, daemon=True),
        ]
        for t in self.pumps:
            t.start()

    def _pump_stdout(self) -> None:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while chunk := os.read(fd, 65536):
            self.chunks.put(chunk)
        self.chunks.put(b"")  # EOF

    def _pump_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)

    def send(self, msg: Message) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(self.conn.send(msg))
        self.proc.stdin.flush()

    def next(self, deadline: float) -> Message | None:
        """The next message, or None once the agent closed its stdout."""
        while True:
            msg = self.conn.next_message()
            if msg is not NEED_DATA:
                return msg
            if self.conn.state is ConnState.CLOSED:
                return None
            try:
                chunk = self.chunks.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no message from the agent within {WAIT}s") from None
            self.conn.receive_data(chunk)

    def expect(self, kind: type[Any]) -> Any:
        """Wait for a message of ``kind``, keeping heartbeats, logs and stats aside."""
        deadline = time.monotonic() + WAIT
        while True:
            msg = self.next(deadline)
            assert msg is not None, f"agent closed while we waited for {kind.__name__}"
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, Heartbeat | Log | Stats), f"unexpected {msg!r}"
            self.seen.append(msg)

    def handshake(self, heartbeat_interval: float = 0.1) -> Ready:
        hello = self.expect(Hello)
        assert hello.protocol_version == PROTOCOL_VERSION
        assert hello.pid == self.proc.pid == self.conn.peer_pid
        self.send(
            Init(agent="node-echo", instance="node-echo-0", heartbeat_interval=heartbeat_interval)
        )
        ready: Ready = self.expect(Ready)
        assert self.conn.state is ConnState.READY
        return ready

    def call(self, id: int, handler: str, payload: Any, **kw: Any) -> Result:
        self.send(Deliver(id=id, handler=handler, payload=payload, sender="test", **kw))
        result: Result = self.expect(Result)
        assert result.id == id
        return result

    def wait_closed(self) -> list[Message]:
        """Messages until the agent closes its stdout; the connection ends CLOSED."""
        deadline = time.monotonic() + WAIT
        out = []
        while (msg := self.next(deadline)) is not None:
            out.append(msg)
        assert self.conn.state is ConnState.CLOSED
        return out

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=WAIT)
        for t in self.pumps:  # both pipes reach EOF once the process is gone
            t.join(timeout=WAIT)
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if f is not None:
                f.close()


@pytest.fixture
def agent() -> Iterator[NodeAgent]:
    a = NodeAgent()
    try:
        yield a
    finally:
        a.close()


def test_handshake_handlers_heartbeat_and_shutdown(agent: NodeAgent) -> None:
    ready = agent.handshake(heartbeat_interval=0.05)
    assert set(ready.handlers) == {"echo", "upper", "fail"}

    echo = agent.call(1, "echo", {"text": "hi", "n": 2})
    assert echo.ok and echo.error is None
    assert echo.payload == {"text": "hi", "n": 2, "from": "node"}

    upper = agent.call(2, "upper", {"text": "Hello, wörld"})
    assert upper.ok and upper.payload == {"text": "HELLO, WÖRLD"}

    fail = agent.call(3, "fail", {"message": "nope"})
    assert not fail.ok and fail.error is not None
    assert fail.error.type == "ValueError" and fail.error.message == "nope"

    missing = agent.call(4, "nope", None)
    assert not missing.ok and missing.error is not None
    assert missing.error.type == "HandlerNotFound"

    agent.expect(Heartbeat)
    assert any(isinstance(m, Log) for m in agent.seen)

    agent.send(Shutdown(grace=5.0))
    assert agent.conn.state is ConnState.CLOSING
    agent.wait_closed()
    assert agent.proc.wait(timeout=WAIT) == 0
    log = b"".join(agent.stderr).decode()
    assert "node-echo" in log and "CORRAL_INSTANCE=node-echo-0" in log


def test_cancel_stops_the_task_with_task_timeout(agent: NodeAgent) -> None:
    agent.handshake()
    agent.send(Deliver(id=10, handler="echo", payload={"sleep": 30}, timeout=0.1))
    started = time.monotonic()
    agent.send(Cancel(id=10))
    result: Result = agent.expect(Result)
    assert result.id == 10 and not result.ok and result.error is not None
    assert result.error.type == "TaskTimeout"
    assert time.monotonic() - started < 5
    agent.send(Cancel(id=999))  # unknown or finished ids are ignored
    assert agent.call(11, "echo", "plain").payload == {"payload": "plain", "from": "node"}


def test_shutdown_waits_for_in_flight_work(agent: NodeAgent) -> None:
    agent.handshake()
    agent.send(Deliver(id=20, handler="echo", payload={"sleep": 0.3}))
    agent.send(Shutdown(grace=5.0))
    rest = agent.wait_closed()
    results = [m for m in rest if isinstance(m, Result)]
    assert [(r.id, r.ok) for r in results] == [(20, True)]
    assert agent.proc.wait(timeout=WAIT) == 0


def test_stdin_closed_without_shutdown_exits(agent: NodeAgent) -> None:
    agent.handshake()
    assert agent.proc.stdin is not None
    agent.proc.stdin.close()
    assert agent.proc.wait(timeout=WAIT) != 0
