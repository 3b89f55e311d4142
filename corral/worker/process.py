"""The process that hosts one agent: a socket, the sans-IO Connection and a WorkerCore.

The zygote calls :func:`main` in a freshly forked child; ``python -m corral.worker --fd N``
does the same from a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import os
import socket

from corral.wire.connection import NEED_DATA, Codec, Connection, Role
from corral.wire.messages import PROTOCOL_VERSION, Heartbeat, Hello, Init, ToRuntime
from corral.worker.core import EXIT_OK, WorkerCore

__all__ = ["main", "serve"]


class _WorkerProtocol(asyncio.Protocol):
    """Feeds bytes from the runtime into the Connection and messages into the core."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.core: WorkerCore | None = None
        self.transport: asyncio.Transport | None = None
        self.heartbeat_interval = 1.0
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        conn, core = self.conn, self.core
        conn.receive_data(data)
        while True:
            msg = conn.next_message()
            if msg is NEED_DATA:
                return
            if isinstance(msg, Init):
                self.heartbeat_interval = msg.heartbeat_interval
            if core is not None:
                core.handle(msg)  # type: ignore[arg-type]

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if self.core is not None:
            self.core.connection_lost()
        if not self.lost.done():
            self.lost.set_result(None)

    def emit(self, msg: ToRuntime) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(self.conn.send(msg))


async def serve(sock: socket.socket) -> int:
    """Speak the worker side of the protocol on ``sock`` until shutdown; return the exit code."""
    loop = asyncio.get_running_loop()
    conn = Connection(Role.WORKER, Codec.MSGPACK)
    transport, proto = await loop.create_connection(lambda: _WorkerProtocol(conn), sock=sock)
    code = EXIT_OK
    async with asyncio.TaskGroup() as tg:
        core = WorkerCore(proto.emit, tg)
        proto.core = core
        proto.emit(Hello(PROTOCOL_VERSION, os.getpid(), "corral-python"))

        async def heartbeat() -> None:
            seq = 0
            while True:
                await asyncio.sleep(proto.heartbeat_interval)
                seq += 1
                proto.emit(Heartbeat(seq))

        beats = tg.create_task(heartbeat())
        code = await core.finished
        beats.cancel()
        core.cancel_all()
    transport.close()
    return code


def main(fd: int, loop: asyncio.AbstractEventLoop | None = None) -> int:
    """Run the worker on the connected socket ``fd``; return the process exit code.

    ``loop`` is an event loop made (and warmed) before this process got its agent, as the
    zygote's pre-forked children do; without one a fresh loop is made.
    """
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    if loop is None:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(serve(sock))
    except KeyboardInterrupt:
        return 130
    finally:
        loop.close()


async def warm_up() -> None:
    """Exercise the paths a worker takes, so a pre-forked child pays its page faults early."""
    a, b = socket.socketpair()
    try:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
        transport.write(b"x")
        await asyncio.sleep(0)
        transport.close()
    finally:
        b.close()
