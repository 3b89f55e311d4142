"""The zygote: a pre-imported fork server with a warm pool of pre-forked workers.

It runs as ``python -m corral.sandbox.zygote --fd N``, single-threaded (fork and threads
don't mix), and is the parent of every worker, so it alone reaps them: a Kill is only
sent to a pid it has not reaped, which rules out hitting a recycled pid. When the runtime
goes away (EOF on the control socket) it kills every worker and exits.

Warm pool: a freshly forked child spends milliseconds in copy-on-write page faults the
first time it runs an event loop. So the zygote keeps ``CORRAL_ZYGOTE_POOL`` (default 4)
children that have already made and exercised a loop, parked on a socket of their own. A
Spawn goes to one of them with its file descriptors; a replacement is forked afterwards,
when no request is waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import selectors
import signal
import socket
import sys
from dataclasses import dataclass
from typing import NoReturn

import msgspec

# Pre-import what every worker needs, so the fork pays nothing for it.
import corral.worker.process as worker_process
from corral.sandbox.limits import Limits, apply_in_child
from corral.sandbox.zygote_protocol import Exited, Kill, Spawn, Spawned, SpawnFailed, ToZygote

__all__ = ["serve"]

_DEC = msgspec.msgpack.Decoder(ToZygote)
_ENC = msgspec.msgpack.Encoder()
_MAX_PACKET = 1 << 20
_PR_SET_PDEATHSIG = 1


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass


def _reset_signals() -> None:
    signal.set_wakeup_fd(-1)
    for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL)


def _child(req: Spawn, proto_fd: int, log_fd: int,
           loop: asyncio.AbstractEventLoop | None = None) -> NoReturn:
    """In the child that got an agent: isolate, limit, then become the worker. Never returns."""
    try:
        os.setsid()
        for path in req.cgroup_procs:
            fd = os.open(path, os.O_WRONLY)
            try:
                os.write(fd, str(os.getpid()).encode())
            finally:
                os.close(fd)
        apply_in_child(Limits.from_dict(req.limits), use_rlimit_as=req.rlimit_as)
        devnull = os.open(os.devnull, os.O_RDONLY)
        if req.mode == "exec":
            os.dup2(proto_fd, 0)
            os.dup2(proto_fd, 1)
        else:
            os.dup2(devnull, 0)
            os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        os.close(devnull)
        os.close(log_fd)
        if req.cwd:
            os.chdir(req.cwd)
        os.environ.clear()
        os.environ.update(req.env)
        random.seed()  # the fork copied the zygote's PRNG state
        if req.mode == "exec":
            os.close(proto_fd)
            os.execvpe(req.argv[0], req.argv, req.env)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        code = worker_process.main(proto_fd, loop)
    except BaseException as exc:  # report anything before dying
        try:
            os.write(2, f"corral: worker setup failed: {type(exc).__name__}: {exc}\n".encode())
        except OSError:
            pass
        os._exit(127)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _parked(sock: socket.socket) -> NoReturn:
    """A pre-forked child: warm an event loop, then wait for an agent (or for EOF)."""
    try:
        _set_pdeathsig()
        loop = asyncio.new_event_loop()
        loop.run_until_complete(worker_process.warm_up())
        data, fds, _flags, _addr = socket.recv_fds(sock, _MAX_PACKET, 4)
    except BaseException:
        os._exit(0)
    if not data or len(fds) != 2:
        os._exit(0)  # the zygote is going away
    sock.close()
    _child(_DEC.decode(data), fds[0], fds[1], loop)  # type: ignore[arg-type]


@dataclass
class _Idle:
    pid: int
    sock: socket.socket


class _Zygote:
    """The serving loop's state: live children, the warm pool, the control socket."""

    def __init__(self, ctl: socket.socket, pool_size: int) -> None:
        self.ctl = ctl
        self.pool_size = pool_size
        self.children: set[int] = set()
        self.pool: list[_Idle] = []
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel = selectors.DefaultSelector()

    def _inherited(self) -> list[int]:
        # What a forked child must close: our sockets, the wakeup pipe, the selector.
        return [self.ctl.fileno(), self.wake_r, self.wake_w, self.sel.fileno(),
                *(i.sock.fileno() for i in self.pool)]

    def fork_for(self, req: Spawn, proto_fd: int, log_fd: int) -> int:
        """Fork a child that becomes this request's worker at once."""
        inherited = self._inherited()
        pid = os.fork()
        if pid == 0:
            _close_all(inherited)
            _reset_signals()
            _child(req, proto_fd, log_fd)
        self.children.add(pid)
        return pid

    def prefork(self) -> None:
        """Add one warm child to the pool."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inherited = self._inherited()
        try:
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return
        if pid == 0:
            _close_all([*inherited, ours.fileno()])
            _reset_signals()
            _parked(theirs)
        theirs.close()
        self.children.add(pid)
        self.pool.append(_Idle(pid, ours))

    def spawn(self, req: Spawn, data: bytes, fds: list[int]) -> int:
        """Hand the request to a warm child if one is alive, else fork one now."""
        while self.pool:
            idle = self.pool.pop(0)
            try:
                if idle.pid in self.children:
                    socket.send_fds(idle.sock, [data], fds)
                    return idle.pid
            except OSError:
                pass  # it died while parked; try the next
            finally:
                idle.sock.close()
        return self.fork_for(req, fds[0], fds[1])

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            self.children.discard(pid)
            for idle in [i for i in self.pool if i.pid == pid]:
                self.pool.remove(idle)
                idle.sock.close()
            self.ctl.send(_ENC.encode(Exited(pid, os.waitstatus_to_exitcode(status))))

    def handle(self, data: bytes, fds: list[int]) -> None:
        msg = _DEC.decode(data)
        if isinstance(msg, Kill):
            if msg.pid in self.children:
                try:
                    os.killpg(msg.pid, msg.signal)
                except ProcessLookupError:
                    # Not yet its own group leader (setsid pending): it is still our
                    # unreaped child, so signal it directly.
                    os.kill(msg.pid, msg.signal)
            _close_all(fds)
            return
        if len(fds) != 2:
            _close_all(fds)
            self.ctl.send(_ENC.encode(SpawnFailed(msg.req, f"expected 2 fds, got {len(fds)}")))
            return
        try:
            pid = self.spawn(msg, data, fds)
        except OSError as exc:
            self.ctl.send(_ENC.encode(SpawnFailed(msg.req, f"fork failed: {exc}")))
            return
        finally:
            _close_all(fds)
        self.ctl.send(_ENC.encode(Spawned(msg.req, pid)))

    def run(self) -> None:
        signal.set_wakeup_fd(self.wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the runtime, which stops us
        self.sel.register(self.ctl, selectors.EVENT_READ)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.ctl.setblocking(True)
        gc.collect()
        gc.freeze()  # keep the pre-imported heap out of the collector, so forks share its pages
        try:
            while True:
                # Refill the pool only when nothing is waiting: requests come first.
                timeout = 0 if len(self.pool) < self.pool_size else None
                events = self.sel.select(timeout)
                if not events:
                    self.prefork()
                    continue
                for key, _ in events:
                    if key.fileobj is self.wake_r:
                        try:
                            while os.read(self.wake_r, 512):
                                pass
                        except BlockingIOError:
                            pass
                        self.reap()
                        continue
                    data, fds, _flags, _addr = socket.recv_fds(self.ctl, _MAX_PACKET, 4)
                    if not data:
                        return
                    self.handle(data, fds)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        """The runtime is gone or done: leave no worker behind."""
        for idle in self.pool:
            idle.sock.close()
        for pid in list(self.children):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for _ in list(self.children):
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break


def serve(ctl: socket.socket, pool_size: int = 4) -> None:
    """Serve spawn and kill requests on ``ctl`` until the runtime closes it."""
    _Zygote(ctl, pool_size).run()


def main() -> None:
    """Entry point: ``python -m corral.sandbox.zygote --fd N``."""
    parser = argparse.ArgumentParser(prog="python -m corral.sandbox.zygote")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    _set_pdeathsig()
    pool = int(os.environ.get("CORRAL_ZYGOTE_POOL", "4"))
    serve(socket.socket(fileno=args.fd), max(0, pool))


def _set_pdeathsig() -> None:
    # If our parent dies without closing us, the kernel kills us. The zygote's children get
    # the same on the zygote, so a kill -9 of the runtime leaves no orphan.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except OSError:
        pass


if __name__ == "__main__":
    main()
