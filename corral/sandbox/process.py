"""The ``process`` tier: each instance is its own OS process, forked by the zygote.

It gets its own session and process group, rlimits, and a cgroup where the machine
allows; ``enforcement`` says which limits really hold. Python agents speak msgpack
frames on a socket; ``command:`` agents speak JSON lines on their stdin/stdout.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import psutil

from corral.errors import RemoteProtocolError, SandboxError
from corral.sandbox.base import Channel, ChannelSink, ExitInfo
from corral.sandbox.cgroups import AgentCgroup, CgroupManager, CgroupSupport
from corral.sandbox.limits import Enforcement, Limits, plan
from corral.sandbox.zygote_client import Zygote
from corral.sandbox.zygote_protocol import Spawn
from corral.wire.connection import NEED_DATA, Codec, Connection, Role
from corral.wire.messages import ToWorker
from corral.worker.core import EXIT_INIT_FAILED, EXIT_MEMORY

__all__ = ["ProcessChannel", "ProcessLauncher"]

#: How long after the socket closes we wait for the zygote to report the exit status.
_EXIT_WAIT = 2.0
_MAX_LOG_LINE = 64 * 1024
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR", "SYSTEMROOT")


class _LogPipe(asyncio.Protocol):
    """Turns an agent's stdout/stderr bytes into log lines."""

    def __init__(self, sink: ChannelSink) -> None:
        self.sink = sink
        self.buf = bytearray()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            nl = self.buf.find(b"\n")
            if nl < 0:
                if len(self.buf) > _MAX_LOG_LINE:
                    self._emit(bytes(self.buf))
                    self.buf.clear()
                return
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            self._emit(line)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.buf:
            self._emit(bytes(self.buf))
            self.buf.clear()

    def _emit(self, line: bytes) -> None:
        self.sink.on_log(line.decode("utf-8", "replace").rstrip("\r"), "output")


class ProcessChannel(Channel, asyncio.Protocol):
    """One worker process: its socket, its exit status, and its cgroup."""

    def __init__(self, sink: ChannelSink, codec: Codec, *, cgroup: AgentCgroup | None,
                 zygote: Zygote, spawn_task: Callable[[Coroutine[Any, Any, None]], None],
                 enforcement: list[Enforcement], limits: Limits) -> None:
        Channel.__init__(self, tier="process", enforcement=enforcement)
        self.sink = sink
        self.conn = Connection(Role.RUNTIME, codec)
        self.cgroup = cgroup
        self.limits = limits
        self._zygote = zygote
        self._spawn_task = spawn_task
        self._transport: asyncio.Transport | None = None
        self._lost = False
        self._code: int | None = None
        self._kill_reason: str | None = None
        self._kill_detail = ""
        self._closed = False
        self._exit_timer: asyncio.TimerHandle | None = None
        self._proc: psutil.Process | None = None

    # ------------------------------------------------------------ asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        conn, sink = self.conn, self.sink
        try:
            conn.receive_data(data)
            while True:
                msg = conn.next_message()
                if msg is NEED_DATA:
                    return
                sink.on_message(msg)  # type: ignore[arg-type]
        except RemoteProtocolError as exc:
            self.kill("protocol_error", str(exc))

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self._code is not None:
            self._finish()
        elif self._exit_timer is None:
            # The socket closed first; the zygote's exit report normally follows at once.
            loop = asyncio.get_running_loop()
            self._exit_timer = loop.call_later(_EXIT_WAIT, self._exit_overdue)

    # ------------------------------------------------------------ Channel

    def send(self, msg: ToWorker) -> None:
        """Encode and write one message to the worker."""
        t = self._transport
        if t is not None and not t.is_closing():
            t.write(self.conn.send(msg))

    def kill(self, reason: str, detail: str = "") -> None:
        """SIGKILL the worker's process group; the exit is reported with ``reason``."""
        if self._kill_reason is None:
            self._kill_reason = reason
            self._kill_detail = detail
        if self.pid is not None and self._code is None:
            self._zygote.kill(self.pid, signal.SIGKILL)
        if self._transport is not None:
            self._transport.close()

    def sample(self) -> dict[str, Any]:
        """RSS, USS, CPU seconds, open fds and I/O of the worker (blocking: call off-loop)."""
        if self.pid is None or self._closed:
            return {}
        try:
            if self._proc is None:
                self._proc = psutil.Process(self.pid)
            p = self._proc
            with p.oneshot():
                mem = p.memory_full_info()
                cpu = p.cpu_times()
                out: dict[str, Any] = {"rss": mem.rss, "uss": getattr(mem, "uss", None),
                                       "cpu_seconds": round(cpu.user + cpu.system, 3),
                                       "cpu_percent": p.cpu_percent(None),
                                       "fds": p.num_fds(), "threads": p.num_threads()}
                try:
                    io = p.io_counters()
                    out["read_bytes"], out["write_bytes"] = io.read_bytes, io.write_bytes
                except (psutil.AccessDenied, AttributeError):
                    pass
            return out
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            return {}

    # ------------------------------------------------------------ exit handling

    def on_exit(self, code: int) -> None:
        """The zygote reaped the worker."""
        self._code = code
        if self._lost:
            self._finish()
        elif self._transport is not None:
            self._transport.close()  # connection_lost follows and finishes

    def _exit_overdue(self) -> None:
        # Something still holds the socket, or the zygote is gone: kill and stop waiting.
        if self._code is None and self.pid is not None:
            self._zygote.kill(self.pid, signal.SIGKILL)
        self._finish()

    def _finish(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._exit_timer is not None:
            self._exit_timer.cancel()
        self._spawn_task(self._report())

    async def _report(self) -> None:
        exit = await asyncio.to_thread(self._classify_and_clean)
        self.sink.on_closed(exit)

    def _classify_and_clean(self) -> ExitInfo:
        code = self._code
        oom = False
        if self.cgroup is not None:
            oom = self.cgroup.oom_killed(killed_by_sigkill=code == -signal.SIGKILL)
            self.cgroup.remove()
        limit = self.limits.memory
        if oom or code == EXIT_MEMORY:
            how = "cgroup OOM kill" if oom else "MemoryError under RLIMIT_AS"
            return ExitInfo("memory_limit", code, f"memory limit {_fmt_mem(limit)} exceeded ({how})")
        if self._kill_reason is not None:
            return ExitInfo(self._kill_reason, code, self._kill_detail)
        if code == -signal.SIGXCPU:
            return ExitInfo("cpu_time_limit", code,
                            f"CPU time limit {self.limits.cpu_time}s exceeded (SIGXCPU)")
        if code == EXIT_INIT_FAILED:
            return ExitInfo("init_failed", code, "the agent failed to initialise")
        if code == 0:
            return ExitInfo("exited", 0)
        if code is None:
            return ExitInfo("crashed", None, "exit status unknown (zygote lost)")
        what = f"killed by signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
        return ExitInfo("crashed", code, what)


def _fmt_mem(n: int | None) -> str:
    if n is None:
        return "(none)"
    from corral.sandbox.limits import format_bytes

    return format_bytes(n)


class ProcessLauncher:
    """Starts process-tier instances through the zygote."""

    def __init__(self, zygote: Zygote, cgroups: CgroupManager | None, support: CgroupSupport,
                 spawn_task: Callable[[Coroutine[Any, Any, None]], None]) -> None:
        self.zygote = zygote
        self.cgroups = cgroups
        self.support = support
        self._spawn_task = spawn_task
        self._is_root = os.geteuid() == 0

    def enforcement(self, limits: Limits) -> list[Enforcement]:
        """How each limit would be enforced on this machine."""
        return plan(limits, self.support, is_root=self._is_root,
                    use_rlimit_as=self._use_rlimit_as(limits))

    def _use_rlimit_as(self, limits: Limits) -> bool:
        # With a memory cgroup the kernel counts real memory; RLIMIT_AS (virtual size) would
        # only add false failures. Without one it is the only hard cap available.
        return limits.memory is not None and not self.support.memory

    async def launch(self, *, instance: str, sink: ChannelSink, limits: Limits,
                     command: list[str] | None, env: dict[str, str], cwd: str | None) -> ProcessChannel:
        """Fork a worker for ``instance``; messages and the exit go to ``sink``."""
        loop = asyncio.get_running_loop()
        cgroup: AgentCgroup | None = None
        if self.cgroups is not None and (limits.memory or limits.cpu or limits.max_processes):
            try:
                cgroup = await asyncio.to_thread(self.cgroups.create, instance, limits)
            except SandboxError:
                raise
        codec = Codec.JSONL if command else Codec.MSGPACK
        chan = ProcessChannel(sink, codec, cgroup=cgroup, zygote=self.zygote,
                              spawn_task=self._spawn_task, enforcement=self.enforcement(limits),
                              limits=limits)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        log_r, log_w = os.pipe()
        full_env = {k: os.environ[k] for k in _BASE_ENV if k in os.environ}
        full_env.update(env)
        full_env.update(CORRAL_INSTANCE=instance,
                        CORRAL_PROTOCOL="jsonl" if command else "msgpack")
        procs = [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(cgroup.paths.values())] \
            if cgroup is not None else []
        req = Spawn(req=0, instance=instance, mode="exec" if command else "python",
                    argv=list(command or []), env=full_env, cwd=cwd, limits=limits.to_dict(),
                    rlimit_as=self._use_rlimit_as(limits), cgroup_procs=procs)
        try:
            chan.pid = await self.zygote.spawn(req, [theirs.fileno(), log_w], chan.on_exit)
        except BaseException:
            ours.close()
            os.close(log_r)
            if cgroup is not None:
                await asyncio.to_thread(cgroup.remove)
            raise
        finally:
            theirs.close()
            os.close(log_w)
        ours.setblocking(False)
        await loop.create_connection(lambda: chan, sock=ours)
        await loop.connect_read_pipe(lambda: _LogPipe(sink), open(log_r, "rb", buffering=0))  # noqa: SIM115, ASYNC230 - wraps an fd we own; no disk I/O
        return chan
