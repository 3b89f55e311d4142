"""The runtime's side of the zygote: start it, ask it to fork workers, learn their exits."""

from __future__ import annotations

import array
import asyncio
import os
import socket
import sys
from collections.abc import Callable

import msgspec

from corral.errors import SpawnError
from corral.sandbox.zygote_protocol import (
    Exited,
    Kill,
    Spawn,
    Spawned,
    SpawnFailed,
    ToRuntime,
)

__all__ = ["Zygote"]

_ENC = msgspec.msgpack.Encoder()
_DEC = msgspec.msgpack.Decoder(ToRuntime)


class Zygote:
    """A running fork server. Spawns are answered in order; exits arrive as they happen."""

    def __init__(self, *, python: str = sys.executable, start_timeout: float = 30.0) -> None:
        self._python = python
        self._start_timeout = start_timeout
        self._sock: socket.socket | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._spawns: dict[int, tuple[asyncio.Future[int], Callable[[int], None]]] = {}
        self._exit_cbs: dict[int, Callable[[int], None]] = {}
        self._req = 0
        self._outbox: list[tuple[bytes, list[int]]] = []
        self._lock = asyncio.Lock()
        self.pid: int | None = None

    @property
    def alive(self) -> bool:
        """Whether the zygote process is up and connected."""
        return self._sock is not None

    async def start(self) -> None:
        """Start the zygote process (it pre-imports the worker before serving)."""
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = dict(os.environ)
        env.setdefault("MALLOC_ARENA_MAX", "2")  # fewer malloc arenas: less virtual memory per worker
        try:
            self._proc = await asyncio.create_subprocess_exec(
                self._python, "-m", "corral.sandbox.zygote", "--fd", str(child.fileno()),
                pass_fds=[child.fileno()], stdin=asyncio.subprocess.DEVNULL, env=env)
        except OSError as exc:
            parent.close()
            raise SpawnError(f"cannot start the zygote with {self._python}: {exc}") from exc
        finally:
            child.close()
        self.pid = self._proc.pid
        parent.setblocking(False)
        self._sock = parent
        loop.add_reader(parent.fileno(), self._on_readable)

    async def spawn(self, req: Spawn, fds: list[int], on_exit: Callable[[int], None]) -> int:
        """Fork a worker with ``fds`` (protocol socket end, log pipe end); return its pid."""
        async with self._lock:
            if self._sock is None:
                await self.start()
        self._req += 1
        req = msgspec.structs.replace(req, req=self._req)
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._spawns[self._req] = (fut, on_exit)
        self._send(_ENC.encode(req), fds)
        return await fut

    def kill(self, pid: int, sig: int = 9) -> None:
        """Signal a worker's process group (ignored if it already exited)."""
        if self._sock is not None:
            self._send(_ENC.encode(Kill(pid, sig)), [])

    async def close(self, timeout: float = 5.0) -> None:
        """Close the control socket; the zygote kills any worker left and exits."""
        self._disconnect()
        if self._proc is not None and self._proc.returncode is None:
            try:
                async with asyncio.timeout(timeout):
                    await self._proc.wait()
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()

    # ---------------------------------------------------------------- internals

    def _send(self, data: bytes, fds: list[int]) -> None:
        if self._outbox:
            self._outbox.append((data, fds))
            return
        if not self._try_send(data, fds):
            self._outbox.append((data, fds))
            assert self._sock is not None
            asyncio.get_running_loop().add_writer(self._sock.fileno(), self._flush)

    def _try_send(self, data: bytes, fds: list[int]) -> bool:
        assert self._sock is not None
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        try:
            self._sock.sendmsg([data], anc)
        except BlockingIOError:
            return False
        return True

    def _flush(self) -> None:
        while self._outbox:
            data, fds = self._outbox[0]
            if not self._try_send(data, fds):
                return
            self._outbox.pop(0)
        if self._sock is not None:
            asyncio.get_running_loop().remove_writer(self._sock.fileno())

    def _on_readable(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            msg = _DEC.decode(data)
            if isinstance(msg, Spawned):
                fut, on_exit = self._spawns.pop(msg.req)
                self._exit_cbs[msg.pid] = on_exit
                if not fut.done():
                    fut.set_result(msg.pid)
            elif isinstance(msg, Exited):
                cb = self._exit_cbs.pop(msg.pid, None)
                if cb is not None:
                    cb(msg.code)
            elif isinstance(msg, SpawnFailed):
                fut, _ = self._spawns.pop(msg.req)
                if not fut.done():
                    fut.set_exception(SpawnError(f"zygote could not fork: {msg.error}"))

    def _disconnect(self) -> None:
        if self._sock is None:
            return
        loop = asyncio.get_running_loop()
        loop.remove_reader(self._sock.fileno())
        loop.remove_writer(self._sock.fileno())
        self._sock.close()
        self._sock = None
        self._outbox.clear()

    def _lost(self) -> None:
        # The zygote died: its workers die with it (PDEATHSIG); report them as crashed.
        self._disconnect()
        for fut, _ in self._spawns.values():
            if not fut.done():
                fut.set_exception(SpawnError("the zygote exited while forking"))
        self._spawns.clear()
        cbs, self._exit_cbs = self._exit_cbs, {}
        for cb in cbs.values():
            cb(-9)
