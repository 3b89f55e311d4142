"""The zygote alone: forks workers, reports exits, kills only unreaped pids, leaves no orphans."""

from __future__ import annotations

import asyncio
import os
import socket

import psutil

from corral.sandbox.zygote_client import Zygote
from corral.sandbox.zygote_protocol import Spawn


async def _spawn_sleeper(z: Zygote) -> int:
    a, b = socket.socketpair()
    r, w = os.pipe()
    req = Spawn(req=0, instance="t", mode="exec", argv=["sleep", "30"], env={"PATH": os.environ["PATH"]})
    pid = await z.spawn(req, [b.fileno(), w], lambda code: None)
    b.close()
    os.close(w)
    os.close(r)
    a.close()
    return pid


async def test_spawn_kill_and_exit_status() -> None:
    z = Zygote()
    await z.start()
    try:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        a, b = socket.socketpair()
        r, w = os.pipe()
        req = Spawn(req=0, instance="t", mode="exec", argv=["sh", "-c", "exit 7"],
                    env={"PATH": os.environ["PATH"]})
        pid = await z.spawn(req, [b.fileno(), w], done.set_result)
        b.close(), os.close(w)
        assert await asyncio.wait_for(done, 10) == 7
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        killed: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        req = Spawn(req=0, instance="t", mode="exec", argv=["sleep", "30"],
                    env={"PATH": os.environ["PATH"]})
        c, d = socket.socketpair()
        r2, w2 = os.pipe()
        pid2 = await z.spawn(req, [d.fileno(), w2], killed.set_result)
        d.close(), os.close(w2)
        async with asyncio.timeout(5):
            while os.getpgid(pid2) != pid2:  # the child calls setsid() right after fork
                await asyncio.sleep(0.01)
        z.kill(pid2, 9)
        assert await asyncio.wait_for(killed, 10) == -9
        for fd in (r, r2):
            os.close(fd)
        a.close(), c.close()
    finally:
        await z.close()


async def test_closing_the_zygote_kills_its_workers() -> None:
    z = Zygote()
    await z.start()
    pids = [await _spawn_sleeper(z) for _ in range(3)]
    zpid = z.pid
    await z.close()
    async with asyncio.timeout(10):
        while any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
                  for p in [*pids, zpid]):
            await asyncio.sleep(0.05)


async def test_setup_failure_is_reported_as_exit_127() -> None:
    z = Zygote()
    await z.start()
    try:
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        a, b = socket.socketpair()
        r, w = os.pipe()
        req = Spawn(req=0, instance="t", mode="exec", argv=["/no/such/program"],
                    env={"PATH": os.environ["PATH"]})
        await z.spawn(req, [b.fileno(), w], done.set_result)
        b.close(), os.close(w)
        assert await asyncio.wait_for(done, 10) == 127
        out = os.read(r, 4096).decode()
        assert "worker setup failed" in out and "/no/such/program" in out
        os.close(r), a.close()
    finally:
        await z.close()
