"""kill -9 a process mid-write: everything it was told was committed is still there, and the file is sound."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import pytest

from corral.store import SQLiteStore

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="needs SIGKILL")

# The child commits a known prefix, says so, then keeps writing (and committing) until it dies.
CHILD = """
import asyncio, sys
from corral.store import SQLiteStore, TaskRecord

async def main(path: str, round_: int) -> None:
    store = SQLiteStore(path)
    await store.open()
    n = 0
    for i in range(3000):
        store.append_event("child", "tick", {"round": round_, "i": i})
        n += 1
        if i % 100 == 0:
            store.put_task(TaskRecord(id=f"r{round_}-t{i}", agent="child", handler="h",
                                      payload={"i": i}, priority=0, kind="call", sender="test",
                                      status="queued", created=float(i)))
    await store.commit()
    print(f"committed {n}", flush=True)
    i = n
    while True:  # keep the writer busy so the kill lands mid-transaction
        store.append_event("child", "tick", {"round": round_, "i": i})
        store.append_log("child", "child-0", "info", "x" * 200)
        i += 1
        if i % 500 == 0:
            await store.commit()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def _run_and_kill(path: Path, round_: int) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, str(path), str(round_),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not line.startswith(b"committed "):
            err = await proc.stderr.read()
            pytest.fail(f"child did not report a commit: {line!r}\n{err.decode()}")
        await asyncio.sleep(0.3)  # let it write some more, unannounced
        assert proc.returncode is None, "the child died before it was killed"
        proc.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(proc.wait(), 30) == -signal.SIGKILL
        return int(line.split()[1])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_committed_data_survives_kill9(tmp_path: Path) -> None:
    path = tmp_path / "home" / "corral.db"
    for round_ in range(3):
        committed = await _run_and_kill(path, round_)

        conn = sqlite3.connect(path)
        try:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        finally:
            conn.close()

        async with SQLiteStore(path) as store:
            mine = [e for e in await store.events(agent="child") if e.data["round"] == round_]
            # Everything committed before the print is there, in order, with no holes.
            assert len(mine) >= committed
            assert [e.data["i"] for e in mine] == list(range(len(mine)))
            seqs = [e.seq for e in mine]
            assert seqs == sorted(seqs)
            pending = {t.id for t in await store.pending_tasks()}
            assert {f"r{round_}-t{i}" for i in range(0, 3000, 100)} <= pending
            task = await store.task(f"r{round_}-t200")
            assert task is not None and task.payload == {"i": 200}
            # The reopened store is writable after the crash.
            store.put_meta(f"checked-{round_}", len(mine))
            await store.commit()
            assert await store.get_meta(f"checked-{round_}") == len(mine)
