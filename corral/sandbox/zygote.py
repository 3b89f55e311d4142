"""The zygote: a pre-imported fork server that starts process-tier workers in about a millisecond.

It runs as ``python -m corral.sandbox.zygote --fd N``, single-threaded (fork and threads
don't mix), and is the parent of every worker, so it alone reaps them: a Kill is only
sent to a pid it has not reaped, which rules out hitting a recycled pid. When the runtime
goes away (EOF on the control socket) it kills every worker and exits.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import selectors
import signal
import socket
import sys
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


def _child(req: Spawn, proto_fd: int, log_fd: int, close_fds: list[int]) -> NoReturn:
    """In the forked child: isolate, limit, then become the worker. Never returns."""
    try:
        os.setsid()
        for fd in close_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
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
        code = worker_process.main(proto_fd)
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


def serve(ctl: socket.socket) -> None:
    """Serve spawn and kill requests on ``ctl`` until the runtime closes it."""
    children: set[int] = set()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the runtime, which stops us
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    ctl.setblocking(True)
    gc.collect()
    gc.freeze()  # keep the pre-imported heap out of the collector, so forks share its pages

    def reap() -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            children.discard(pid)
            ctl.send(_ENC.encode(Exited(pid, os.waitstatus_to_exitcode(status))))

    running = True
    while running:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                try:
                    while os.read(wake_r, 512):
                        pass
                except BlockingIOError:
                    pass
                reap()
                continue
            data, fds, _flags, _addr = socket.recv_fds(ctl, _MAX_PACKET, 4)
            if not data:
                running = False
                break
            msg = _DEC.decode(data)
            if isinstance(msg, Kill):
                if msg.pid in children:
                    try:
                        os.killpg(msg.pid, msg.signal)
                    except ProcessLookupError:
                        # Not yet its own group leader (setsid pending): it is still our
                        # unreaped child, so signal it directly.
                        os.kill(msg.pid, msg.signal)
                continue
            if len(fds) != 2:
                for fd in fds:
                    os.close(fd)
                ctl.send(_ENC.encode(SpawnFailed(msg.req, f"expected 2 fds, got {len(fds)}")))
                continue
            proto_fd, log_fd = fds
            try:
                pid = os.fork()
            except OSError as exc:
                os.close(proto_fd)
                os.close(log_fd)
                ctl.send(_ENC.encode(SpawnFailed(msg.req, f"fork failed: {exc}")))
                continue
            if pid == 0:
                _child(msg, proto_fd, log_fd, [ctl.fileno(), wake_r, wake_w, sel.fileno()])
            os.close(proto_fd)
            os.close(log_fd)
            children.add(pid)
            ctl.send(_ENC.encode(Spawned(msg.req, pid)))
    # The runtime is gone or done: leave no worker behind.
    for pid in list(children):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for _ in list(children):
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            break


def main() -> None:
    """Entry point: ``python -m corral.sandbox.zygote --fd N``."""
    parser = argparse.ArgumentParser(prog="python -m corral.sandbox.zygote")
    parser.add_argument("--fd", type=int, required=True)
    args = parser.parse_args()
    _set_pdeathsig()
    serve(socket.socket(fileno=args.fd))


def _set_pdeathsig() -> None:
    # If the runtime dies without closing us, the kernel kills us, and our children's own
    # PDEATHSIG kills them in turn: no orphans.
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    except OSError:
        pass


if __name__ == "__main__":
    main()
