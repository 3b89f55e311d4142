"""The audit writer thread: batches queued records, seals on time, commits each batch whole.

One thread owns the ``Chain`` and the store's writing connection. It drains the queue (up
to ``batch_max`` items), turns the records into rows (adding seals as they fall due), and
writes them in ONE transaction: group commit, so concurrent appends share a commit and its
fsync. Committed: every waiting future gets its answer (one wake-up of the event loop per
batch, not one per record). Failed: the transaction is rolled back, the chain goes back to
the state before the batch, and every future in it gets ``AuditUnavailable``; once the fault
clears, the next batch carries on from the same head.

Timed seals need no asyncio task: the thread waits on the queue with a timeout that ends
when the next seal is due (``Chain.due_in``). ``stop()`` queues a final seal and the exit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from corral.audit.chain import SEAL, Chain, ChainState, Row
from corral.audit.keys import AuditKey, AuditSigner
from corral.audit.store import AuditStore
from corral.errors import AuditError, AuditKeyError, AuditUnavailable

__all__ = ["APPEND", "CALL", "ROTATE", "SEAL_NOW", "Writer"]

log = logging.getLogger("corral.audit")

#: Operations a caller can queue.
APPEND: Final = 0  # arg: a chain.Draft; answer: its seq
SEAL_NOW: Final = 1  # answer: the seq of the seal (or of the head if nothing was unsealed)
ROTATE: Final = 2  # answer: the new key id
CALL: Final = 3  # arg: None (a flush barrier) or fn(connection) run between batches
_STOP: Final = object()
#: After a failed write, timed seals wait this long before retrying, so a full disk is not
#: hammered in a loop; appends still try (and fail or succeed) at once.
_RETRY_HOLD: Final = 0.5

_Answer = tuple["_Item", Any, BaseException | None]


class _Item:
    __slots__ = ("arg", "future", "loop", "op")

    def __init__(self, op: int, arg: Any, loop: asyncio.AbstractEventLoop,
                 future: asyncio.Future[Any]) -> None:
        self.op, self.arg, self.loop, self.future = op, arg, loop, future


def _settle_all(results: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    # Runs on the loop. A caller may have been cancelled meanwhile; its record still stands.
    for future, result, error in results:
        if future.done():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


def _one_rotation(batch: list[object]) -> tuple[list[object], list[object]]:
    """Split a batch before its second rotation: the key file holds one pending key at a time."""
    seen = False
    for i, item in enumerate(batch):
        if isinstance(item, _Item) and item.op == ROTATE:
            if seen:
                return batch[:i], batch[i:]
            seen = True
    return batch, []


class Writer:
    """The thread that appends to one trail; callers queue work with ``submit``."""

    def __init__(self, store: AuditStore, chain: Chain, keys: AuditKey, *, batch_max: int,
                 max_pending: int, clock: Callable[[], float],
                 monotonic: Callable[[], float]) -> None:
        self.path: Path = store.path
        self._store, self._chain, self._keys = store, chain, keys
        self._batch_max, self._max_pending = batch_max, max_pending
        self._clock, self._mono = clock, monotonic
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _accepting together with queue puts
        self._accepting = False
        self._thread = threading.Thread(target=self._main, name="corral-audit-writer",
                                        daemon=True)  # a hung disk must not block exit
        #: The last committed record (seq, hash); read from the loop, written here.
        self.head: tuple[int, bytes] = (chain.state.seq, chain.state.head)
        #: Set when the writer crashed or the final seal failed: ``close`` raises it.
        self.close_error: AuditError | None = None
        self._hold_until = 0.0
        self._suspect = False  # a failed batch left us unsure of the stored head
        self.stats: dict[str, int | float] = {
            "records": 0, "seals": 0, "batches": 0, "largest_batch": 0, "failed_batches": 0,
            "peak_queue_depth": 0, "last_commit_ms": 0.0}

    @property
    def key_id(self) -> str:
        """Id of the key that signs new seals."""
        return self._chain.state.signer.key_id

    @property
    def queue_depth(self) -> int:
        """Items waiting for the writer."""
        return self._queue.qsize()

    def start(self) -> None:
        """Start the thread; ``submit`` works from now until ``stop``."""
        self._accepting = True
        self._thread.start()

    def stop(self) -> None:
        """Refuse new work; the thread writes what is queued, a final seal, then exits."""
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._queue.put(_STOP)

    async def join(self, timeout: float) -> bool:
        """Wait (off the loop) up to ``timeout`` s for the thread; True if it exited."""
        await asyncio.to_thread(self._thread.join, timeout)
        return not self._thread.is_alive()

    async def submit(self, op: int, arg: Any) -> Any:
        """Queue one operation and wait for its answer (after the commit that holds it)."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._lock:
            if not self._accepting:
                raise AuditUnavailable(f"audit log {self.path} is closed; the action was "
                                       "refused", hint="this is a bug in the caller: it acted "
                                       "after shutdown")
            depth = self._queue.qsize()
            if depth >= self._max_pending:
                raise AuditUnavailable(
                    f"the audit writer is {depth} records behind; the action was refused",
                    hint="the disk is too slow for the load: slow down or raise max_pending")
            self._queue.put(_Item(op, arg, loop, future))
        return await future

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # a bug in this module: fail closed rather than hang
            log.exception("the audit writer crashed")
            self.close_error = AuditUnavailable(
                f"the audit writer crashed: {exc!r}",
                hint="this is a bug in Corral: restart the runtime (the trail is intact up to "
                     "the last committed record) and report it")
        finally:
            with self._lock:
                self._accepting = False
            # Nothing can be queued any more: answer whatever is left so no caller waits forever.
            left: list[_Answer] = []
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if isinstance(item, _Item):
                    left.append((item, None, AuditUnavailable(
                        f"audit log {self.path} closed before the record was written")))
            self._answer(left)
            self._store.close()

    def _loop(self) -> None:
        chain = self._chain
        get, get_nowait = self._queue.get, self._queue.get_nowait
        carried: list[object] = []
        while True:
            batch, carried = carried, []
            if not batch:
                now = self._mono()
                due = chain.due_in(now)
                if due is not None:
                    due = max(due, self._hold_until - now)
                try:
                    batch.append(get() if due is None else get(timeout=due) if due > 0
                                 else get_nowait())
                except queue.Empty:
                    pass  # a timed seal is due
            while len(batch) < self._batch_max:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            batch, carried = _one_rotation(batch)
            if not self._process(batch):
                return

    def _process(self, batch: list[object]) -> bool:
        """Write one batch in one transaction and answer its callers; False after the stop item."""
        chain = self._chain
        depth = len(batch) + self._queue.qsize()
        if depth > self.stats["peak_queue_depth"]:
            self.stats["peak_queue_depth"] = depth
        started = time.perf_counter()
        mark = chain.state
        now, ts = self._mono(), int(self._clock() * 1_000_000)
        rows: list[Row] = []
        answers: list[_Answer] = []
        rotation: AuditSigner | None = None
        stop = False
        try:
            if self._suspect:
                self._resync()
            for item in batch:
                if not isinstance(item, _Item):
                    stop = True  # _STOP: the last item ever queued
                    continue
                op = item.op
                if op == APPEND:
                    new = chain.append(item.arg, now)
                    answers.append((item, new[0].seq, None))
                    rows += new
                elif op == SEAL_NOW:
                    rows += chain.seal(ts, now)
                    answers.append((item, chain.state.seq, None))
                elif op == ROTATE:
                    try:
                        rotation = self._keys.begin_rotation()
                    except AuditKeyError as exc:
                        answers.append((item, None, exc))  # nothing of it is in the chain
                        continue
                    rows += chain.rotate(rotation, ts, now)
                    answers.append((item, rotation.key_id, None))
                elif item.arg is None:  # CALL without a function: a flush barrier
                    answers.append((item, None, None))
                else:  # CALL: a hook's own error is its caller's, not the batch's
                    try:
                        answers.append((item, item.arg(self._store.writer), None))
                    except Exception as exc:
                        answers.append((item, None, exc))
            if stop:
                rows += chain.seal(ts, now)
            elif now >= self._hold_until:
                rows += chain.tick(ts, now)
            if rows:
                self._store.write(rows)
        except Exception as exc:
            return self._failed(mark, batch, rotation, stop, exc)
        if rotation is not None:
            self._finish_rotation(rotation)
        self.head = (chain.state.seq, chain.state.head)
        if rows:
            st = self.stats
            seals = sum(1 for r in rows if r.kind == SEAL)
            st["batches"] += 1
            st["seals"] += seals
            st["records"] += len(rows) - seals
            st["largest_batch"] = max(st["largest_batch"], len(rows))
            st["last_commit_ms"] = (time.perf_counter() - started) * 1000
        self._answer(answers)
        return not stop

    def _failed(self, mark: ChainState, batch: list[object], rotation: AuditSigner | None,
                stop: bool, exc: Exception) -> bool:
        """Undo a batch that did not commit and refuse every action in it."""
        self._chain.restore(mark)
        if rotation is not None:
            try:
                self._keys.abort_rotation(rotation.key_id)
            except AuditKeyError:
                log.warning("could not drop pending audit key %s; the next open drops it",
                            rotation.key_id)
        self.stats["failed_batches"] += 1
        self._hold_until = self._mono() + _RETRY_HOLD
        self._suspect = True
        try:
            self._resync()
        except Exception:
            log.warning("can't read the head of audit trail %s yet; will check again",
                        self.path, exc_info=True)
        if not isinstance(exc, sqlite3.Error | OSError | AuditError):
            log.error("audit batch failed", exc_info=exc)
        message = (f"audit record could not be written to {self.path} ({exc}); "
                   "the action was refused and nothing was recorded")
        answers: list[_Answer] = []
        for item in batch:
            if isinstance(item, _Item):
                err = AuditUnavailable(message)
                err.__cause__ = exc
                answers.append((item, None, err))
        if stop:
            self.close_error = AuditUnavailable(
                f"the final seal of {self.path} could not be written ({exc}); the last records "
                "stay unsealed until the trail is opened again")
        self._answer(answers)
        return not stop

    def _resync(self) -> None:
        """Make the chain match the stored head after a failed batch (it normally already does)."""
        tail = self._store.tail()
        s = self._chain.state
        if (tail.seq, tail.head) != (s.seq, s.head):
            # The commit reached the disk although SQLite reported an error: carry on from
            # what is stored (its callers were refused; the trail errs towards recording).
            signer = self._keys.activate(tail.key_id(self.path))
            self._chain.restore(ChainState(signer, seq=tail.seq, head=tail.head,
                                           unsealed=tail.seq - tail.last_seal,
                                           last_seal=s.last_seal))
            self.head = (tail.seq, tail.head)
            log.warning("audit trail %s head moved to %d after a failed commit", self.path,
                        tail.seq)
        self._suspect = False

    def _finish_rotation(self, rotation: AuditSigner) -> None:
        try:
            self._keys.finish_rotation(rotation.key_id)
        except AuditKeyError:
            # The trail has the rotation; the file still holds the new key as pending, and the
            # next open (activate) completes it. The chain already signs with the new key.
            log.warning("audit key rotation to %s is recorded but the key file was not "
                        "updated; the next open completes it", rotation.key_id, exc_info=True)

    @staticmethod
    def _answer(answers: list[_Answer]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[Any]] = {}
        for item, result, error in answers:
            by_loop.setdefault(item.loop, []).append((item.future, result, error))
        # One wake-up of each loop per batch, not one per record.
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_settle_all, results)
            except RuntimeError:
                pass  # the loop is closed: nobody is left to wait for these answers
