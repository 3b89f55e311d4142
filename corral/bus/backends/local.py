"""LocalBackend: the default bus backend, in-process routing over a SQLite outbox.

How a message travels:

- ``publish`` matches the subject against every subscription of this prefix (a list of
  pre-split filters, with a bounded cache from subject to matching subscriptions), gives the
  message the next sequence number and, when ``durable``, queues ONE outbox item holding one
  row per matching subscription. A single writer thread drains the queue and commits whatever
  has piled up in ONE transaction (group commit: concurrent publishers share commits), then
  hands the batch back to the event loop in one callback. That callback appends each message
  to the in-memory queues and resolves the publishers' futures, in commit order. Consumers
  therefore only ever see committed messages, and ``fetch`` never reads SQLite.
- ``durable=False`` skips SQLite: the message goes straight into the in-memory queues and is
  lost if the process dies (at-most-once).
- ``fetch`` takes available messages (fresh ones, and redeliveries, lowest sequence first),
  marks them in flight until ``now + ack_wait`` and queues (without waiting) an update of their
  persisted ``delivered`` count. Waiting fetchers sleep on futures; one timer per subscription,
  armed for the earliest in-flight deadline or ``nack(delay)`` expiry, moves messages back and
  wakes them. In-flight deadlines are not persisted: after a crash those messages are visible
  at once, with the delivered count they had.
- ``ack``/``term`` queue a delete and ``nack(delay)`` an update of ``visible_at``; they do not
  wait for the commit (a crash right after may redeliver: at-least-once). ``aclose`` flushes.

Subscriptions are rows too. ``start`` loads the subscriptions of the prefix (for routing),
not their messages: while a subscription is not opened in this process, durable messages for
it only go to SQLite. The first ``subscribe`` loads its rows inside the writer, in order with
the publishes around it, so nothing is missed or doubled. One process should own a
``(file, prefix)`` at a time: routing is in-process, and sequence numbers continue from the
largest stored one.

Durability (as in ``corral/store/sqlite.py``): with ``synchronous=NORMAL`` a durable publish
that returned survives ``kill -9``; ``FULL`` also survives power loss, at one fsync per batch.
The writer is fail-stop: a batch that fails is rolled back and every later call raises.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import queue
import sqlite3
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgspec

from corral.bus.backend import Incoming, Subscription
from corral.core.subjects import tokens_match, validate_filter, validate_subject
from corral.errors import BackendUnavailable, BusError

__all__ = ["LocalBackend", "split_filter", "split_subject", "tokens_match"]

# ---------------------------------------------------------------------------------- subjects
# The rules are corral/core/subjects.py's; here they raise BusError, as backends do.


def split_subject(subject: str) -> tuple[str, ...]:
    """The tokens of a publish subject; BusError if it is empty, malformed or has a wildcard."""
    try:
        validate_subject(subject)
    except (TypeError, ValueError) as exc:
        raise BusError(f"invalid subject {subject!r}: {exc}",
                       hint="no '*' or '>' when publishing") from exc
    return tuple(subject.split("."))


def split_filter(filter: str) -> tuple[str, ...]:
    """The tokens of a subscription filter; BusError unless ``*``/``>`` are whole tokens, ``>`` last."""
    try:
        validate_filter(filter)
    except (TypeError, ValueError) as exc:
        raise BusError(f"invalid filter {filter!r}: {exc}",
                       hint="'*' is one token; '>' (last) is one or more") from exc
    return tuple(filter.split("."))


# ---------------------------------------------------------------------------------- storage

_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE bus_subscriptions (
            prefix TEXT NOT NULL,
            name TEXT NOT NULL,
            filter TEXT NOT NULL,
            ack_wait REAL NOT NULL,
            created REAL NOT NULL,
            PRIMARY KEY (prefix, name)) WITHOUT ROWID""",
        # A rowid table (not WITHOUT ROWID): payloads are often far larger than 1/20 of a page.
        """CREATE TABLE bus_messages (
            prefix TEXT NOT NULL,
            sub TEXT NOT NULL,
            seq INTEGER NOT NULL,
            subject TEXT NOT NULL,
            data BLOB NOT NULL,
            headers BLOB,
            delivered INTEGER NOT NULL,
            visible_at REAL NOT NULL,
            PRIMARY KEY (prefix, sub, seq))""",
    ),
)
_SYNCHRONOUS: Final = frozenset({"OFF", "NORMAL", "FULL", "EXTRA"})
_BUSY_TIMEOUT_MS: Final = 5000
_CHECKPOINT_EVERY: Final = 0.25  # seconds between WAL checkpoints, off the writer thread
_INSERT: Final = ("INSERT INTO bus_messages (prefix, sub, seq, subject, data, headers, delivered,"
                  " visible_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)")
_SET_DELIVERED: Final = "UPDATE bus_messages SET delivered = ? WHERE prefix = ? AND sub = ? AND seq = ?"
_SET_VISIBLE: Final = "UPDATE bus_messages SET visible_at = ? WHERE prefix = ? AND sub = ? AND seq = ?"
_DELETE: Final = "DELETE FROM bus_messages WHERE prefix = ? AND sub = ? AND seq = ?"
_ENCODER: Final = msgspec.msgpack.Encoder()
_HEADERS: Final = msgspec.msgpack.Decoder(dict[str, str])
_ROUTE_CACHE_MAX: Final = 4096  # subjects remembered by the router; cleared when full
_SLACK: Final = 0.001  # a timer may fire this much early (the loop's clock resolution)

_READY, _INFLIGHT, _DELAYED, _DONE = 0, 1, 2, 3


class _Msg:
    """One message in one subscription's queue."""

    __slots__ = ("data", "deadline", "delivered", "durable", "headers", "seq", "state", "subject")

    def __init__(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None,
                 durable: bool, delivered: int = 0) -> None:
        self.seq = seq
        self.subject = subject
        self.data = data
        self.headers = headers
        self.durable = durable
        self.delivered = delivered
        self.state = _READY
        self.deadline = 0.0


class _Delivery:
    """An ``Incoming``: one delivery of a message; settling it goes back to its subscription."""

    __slots__ = ("_msg", "_sub", "data", "delivered", "headers", "subject")

    def __init__(self, sub: _Sub, msg: _Msg) -> None:
        self._sub = sub
        self._msg = msg
        self.subject = msg.subject
        self.data = msg.data
        self.headers = dict(msg.headers) if msg.headers else {}
        self.delivered = msg.delivered

    async def ack(self) -> None:
        self._sub.settle(self._msg)

    async def nack(self, delay: float = 0.0) -> None:
        self._sub.give_back(self._msg, self.delivered, delay)

    async def term(self) -> None:
        self._sub.settle(self._msg)

    def __repr__(self) -> str:
        return f"<delivery {self.subject!r} #{self._msg.seq} delivered={self.delivered}>"


class _Sub:
    """The state of one subscription in this process: routing data and, once loaded, its queue."""

    def __init__(self, backend: LocalBackend, name: str, filter: str, ack_wait: float,
                 loaded: bool) -> None:
        self.backend = backend
        self.loop = backend._running_loop()
        self.name = name
        self.filter = filter
        self.tokens = split_filter(filter)
        self.ack_wait = ack_wait
        self.loaded = loaded  # False: durable messages are only in SQLite until subscribe()
        self.deleted = False
        self.stash: list[_Msg] = []  # durable=False messages that arrived before loading
        self.ready: deque[_Msg] = deque()  # fresh messages, in arrival order
        self.retry: list[tuple[int, _Msg]] = []  # heap by seq: visible again after a delivery
        self.delayed: list[tuple[float, int, _Msg]] = []  # heap by loop time: nack(delay)
        self.inflight: OrderedDict[int, _Msg] = OrderedDict()  # seq -> msg, in deadline order
        self.waiters: list[asyncio.Future[None]] = []
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0

    def load(self, rows: list[tuple[Any, ...]]) -> None:
        """Take this subscription's stored rows, merged with stashed messages, as its queue."""
        wall, now = time.time(), self.loop.time()
        visible: list[_Msg] = []
        for seq, subject, data, headers, delivered, visible_at in rows:
            msg = _Msg(seq, subject, data, None if headers is None else _HEADERS.decode(headers),
                       True, delivered)
            if visible_at > wall:  # nacked with a delay; in-flight ones are visible at once
                msg.state = _DELAYED
                heapq.heappush(self.delayed, (now + visible_at - wall, seq, msg))
            else:
                visible.append(msg)
        self.ready.extend(heapq.merge(visible, self.stash, key=lambda m: m.seq))
        self.stash = []
        self.loaded = True
        if self.delayed:
            self.arm(self.delayed[0][0])
        self.wake()

    def push(self, msg: _Msg) -> None:
        self.ready.append(msg)
        if self.waiters:
            self.wake()

    def take(self, limit: int) -> list[Incoming]:
        """Up to ``limit`` available messages, marked in flight; lowest sequence first."""
        out: list[Incoming] = []
        ready, retry, inflight = self.ready, self.retry, self.inflight
        if not ready and not retry:
            return out
        deadline = self.loop.time() + self.ack_wait
        updates: list[tuple[str, tuple[Any, ...]]] = []
        prefix, name = self.backend.prefix, self.name
        while len(out) < limit:
            if retry and (not ready or retry[0][0] < ready[0].seq):
                msg = heapq.heappop(retry)[1]
            elif ready:
                msg = ready.popleft()
            else:
                break
            if msg.state != _READY:
                continue  # settled by a late ack of an earlier delivery
            msg.delivered += 1
            msg.state = _INFLIGHT
            msg.deadline = deadline
            inflight[msg.seq] = msg
            if msg.durable:
                updates.append((_SET_DELIVERED, (msg.delivered, prefix, name, msg.seq)))
            out.append(_Delivery(self, msg))
        if out:
            self.arm(deadline)
        if updates:
            self.backend._put_many(updates)
        return out

    def settle(self, msg: _Msg) -> None:
        """ack/term: drop the message for good (a late ack of an earlier delivery counts too)."""
        self.backend._check()
        if self.deleted or msg.state == _DONE:
            return
        if msg.state == _INFLIGHT:
            del self.inflight[msg.seq]
        msg.state = _DONE  # entries left in retry/delayed are skipped when popped
        if msg.durable:
            self.backend._put((_DELETE, (self.backend.prefix, self.name, msg.seq)))

    def give_back(self, msg: _Msg, delivered: int, delay: float) -> None:
        """nack: visible again after ``delay``; ignored unless it is the current delivery."""
        self.backend._check()
        if self.deleted or msg.state != _INFLIGHT or msg.delivered != delivered:
            return
        del self.inflight[msg.seq]
        if delay <= 0:
            msg.state = _READY
            heapq.heappush(self.retry, (msg.seq, msg))
            self.wake()
            return
        msg.state = _DELAYED
        when = self.loop.time() + delay
        heapq.heappush(self.delayed, (when, msg.seq, msg))
        self.arm(when)
        if msg.durable:
            self.backend._put((_SET_VISIBLE, (time.time() + delay, self.backend.prefix, self.name,
                                              msg.seq)))

    def set_ack_wait(self, ack_wait: float) -> None:
        if ack_wait < self.ack_wait:
            # Keep in-flight deadlines in insertion order: none may outlast a new delivery's.
            limit = self.loop.time() + ack_wait
            for msg in self.inflight.values():
                msg.deadline = min(msg.deadline, limit)
            if self.inflight:
                self.arm(next(iter(self.inflight.values())).deadline)
        self.ack_wait = ack_wait

    def arm(self, when: float) -> None:
        """Make sure the timer fires by ``when``."""
        if self.timer is not None:
            if self.timer_at <= when:
                return
            self.timer.cancel()
        self.timer_at = when
        self.timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self.timer = None
        now = self.loop.time() + _SLACK
        moved = False
        inflight, retry, delayed = self.inflight, self.retry, self.delayed
        while inflight:
            seq, msg = next(iter(inflight.items()))
            if msg.deadline > now:
                break
            inflight.popitem(last=False)
            msg.state = _READY
            heapq.heappush(retry, (seq, msg))
            moved = True
        while delayed and delayed[0][0] <= now:
            _, seq, msg = heapq.heappop(delayed)
            if msg.state == _DELAYED:
                msg.state = _READY
                heapq.heappush(retry, (seq, msg))
                moved = True
        if inflight:
            self.arm(next(iter(inflight.values())).deadline)
        if delayed:
            self.arm(delayed[0][0])
        if moved:
            self.wake()

    def wake(self) -> None:
        """Wake every waiting fetcher; each takes what it can and waits again if it got nothing."""
        waiters, self.waiters = self.waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def stop(self, *, delete: bool) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if delete:
            self.deleted = True
            self.ready.clear()
            self.retry.clear()
            self.delayed.clear()
            self.inflight.clear()
            self.stash.clear()
        self.wake()

    def depth(self) -> int:
        return len(self.ready) + len(self.retry) + len(self.delayed) + len(self.inflight) + len(
            self.stash)


class _Handle:
    """A ``Subscription``: one fetcher's view of a shared subscription queue."""

    __slots__ = ("_backend", "_closed", "_sub", "filter", "name")

    def __init__(self, backend: LocalBackend, sub: _Sub) -> None:
        self._backend = backend
        self._sub = sub
        self._closed = False
        self.name = sub.name
        self.filter = sub.filter

    async def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[Incoming]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` for the first, else [].

        Raises BusError when this handle or the backend is closed, or the subscription was
        deleted; a fetch already waiting when the handle or backend closes returns [].
        """
        if max_messages < 1:
            raise ValueError(f"max_messages must be at least 1, got {max_messages}")
        sub = self._sub
        self._usable()
        out = sub.take(max_messages)
        if out or timeout <= 0:
            return out
        loop = sub.loop
        deadline = loop.time() + timeout
        while True:
            fut: asyncio.Future[None] = loop.create_future()
            sub.waiters.append(fut)
            try:
                async with asyncio.timeout_at(deadline):
                    await fut
            except TimeoutError:
                return [] if self._stopped() else sub.take(max_messages)
            finally:
                if not fut.done() or fut.cancelled():
                    try:
                        sub.waiters.remove(fut)
                    except ValueError:
                        pass
            if self._stopped():
                return []
            out = sub.take(max_messages)
            if out:
                return out

    async def close(self) -> None:
        """Stop fetching; the subscription and its pending messages remain."""
        if not self._closed:
            self._closed = True
            self._sub.wake()  # a fetch waiting on this handle returns []

    def _stopped(self) -> bool:
        if self._sub.deleted:
            self._usable()  # raises
        return self._closed or self._backend._state != "open"

    def _usable(self) -> None:
        if self._closed:
            raise BusError(f"subscription {self.name!r} was closed",
                           hint="open it again with backend.subscribe()")
        self._backend._check()
        if self._sub.deleted:
            raise BusError(f"subscription {self.name!r} was deleted (unsubscribe)",
                           hint="subscribe again to create it anew")


# ---------------------------------------------------------------------------------- writer items

class _Publish:
    """A durable publish: its rows go into the next commit; then the loop delivers it."""

    __slots__ = ("data", "future", "headers", "rows", "seq", "subject", "subs")

    def __init__(self, seq: int, subject: str, data: bytes, headers: dict[str, str] | None,
                 subs: list[_Sub], rows: list[tuple[Any, ...]],
                 future: asyncio.Future[None]) -> None:
        self.seq = seq
        self.subject = subject
        self.data = data
        self.headers = headers
        self.subs = subs
        self.rows = rows
        self.future = future


class _Call:
    """Run ``fn`` on the writer connection in the batch; after the commit, ``apply`` its result
    on the loop, in order with the publishes around it."""

    __slots__ = ("apply", "fn", "future", "result")

    def __init__(self, fn: Callable[[sqlite3.Connection], Any], apply: Callable[[Any], Any],
                 future: asyncio.Future[Any]) -> None:
        self.fn = fn
        self.apply = apply
        self.future = future
        self.result: Any = None


_STOP: Final = object()


class LocalBackend:
    """The default ``BusBackend``: in-process routing with a SQLite outbox in its own file."""

    name = "local"

    def __init__(self, path: str | Path, prefix: str = "corral", *, synchronous: str = "NORMAL",
                 batch_max: int = 4096, close_timeout: float = 10.0) -> None:
        sync = synchronous.upper()
        if sync not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {sorted(_SYNCHRONOUS)}, got {synchronous!r}")
        if not prefix:
            raise ValueError("prefix must be a non-empty string")
        if batch_max < 1:
            raise ValueError("batch_max must be at least 1")
        # abspath, not resolve(): no file-system access on the loop's thread.
        self.path = Path(os.path.abspath(os.path.expanduser(path)))
        self.prefix = prefix
        self._synchronous = sync
        self._batch_max = batch_max
        self._close_timeout = close_timeout

        self._state = "new"  # new -> starting -> open -> closing -> closed
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs: dict[str, _Sub] = {}
        self._routes: dict[str, list[_Sub]] = {}
        self._admin = asyncio.Lock()  # serialises subscribe/unsubscribe
        self._next_seq = 1

        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._lock = threading.Lock()  # guards _accepting with queue.put (see _put)
        self._accepting = False
        self._failure: str | None = None
        self._failure_reported = False
        self._writer: threading.Thread | None = None
        self._exited: asyncio.Future[None] | None = None

        self._batches = 0
        self._publishes = 0
        self._rows = 0
        self._writes = 0
        self._largest_batch = 0
        self._last_commit_ms = 0.0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Open (or create) the database and load this prefix's subscriptions."""
        if self._state != "new":
            raise BusError(f"local bus {self.path} was already started", hint="start it once")
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        ready: asyncio.Future[tuple[list[tuple[str, str, float]], int]] = loop.create_future()
        self._exited = loop.create_future()
        self._writer = threading.Thread(target=self._writer_main, args=(loop, ready),
                                        name=f"corral-bus-{self.prefix}", daemon=True)
        with self._lock:
            self._accepting = True
        self._writer.start()
        try:
            subs, max_seq = await ready
        except BaseException:
            self._stop_writer()
            self._state = "closed"
            raise
        for name, filter, ack_wait in subs:
            self._subs[name] = _Sub(self, name, filter, ack_wait, loaded=False)
        self._next_seq = max_seq + 1
        self._state = "open"

    async def aclose(self) -> None:
        """Flush queued writes and stop the writer, within ``close_timeout``; state remains."""
        if self._state in ("new", "starting"):
            self._state = "closed"
            return
        if self._state != "open":
            return
        self._state = "closing"
        for sub in self._subs.values():
            sub.stop(delete=False)  # waiting fetchers return []
        self._stop_writer()
        assert self._exited is not None
        try:
            async with asyncio.timeout(self._close_timeout):
                await asyncio.shield(self._exited)
        except TimeoutError:
            raise BusError(f"the local bus writer did not stop within {self._close_timeout}s "
                           f"with {self._queue.qsize()} items queued; they may be lost",
                           hint="the disk may be hung; check it") from None
        finally:
            self._state = "closed"
        if self._failure is not None and not self._failure_reported:
            raise self._failure_error()

    # ------------------------------------------------------------------ the BusBackend calls

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      *, durable: bool = True) -> None:
        """Route ``data`` to every matching subscription; durable ones return after the commit."""
        if self._state != "open" or self._failure is not None:
            self._check()
        subs = self._routes.get(subject)
        if subs is None:
            subs = self._route(subject)
        if type(data) is not bytes:
            data = bytes(data)
        seq = self._next_seq
        self._next_seq = seq + 1
        hdrs = dict(headers) if headers else None
        if not durable:
            for sub in subs:
                msg = _Msg(seq, subject, data, hdrs, False)
                if sub.loaded:
                    sub.push(msg)
                else:
                    sub.stash.append(msg)
            return
        if not subs:
            return
        blob = None if hdrs is None else _ENCODER.encode(hdrs)
        now, prefix = time.time(), self.prefix
        rows = [(prefix, sub.name, seq, subject, data, blob, 0, now) for sub in subs]
        future: asyncio.Future[None] = self._running_loop().create_future()
        self._put(_Publish(seq, subject, data, hdrs, subs, rows, future))
        await future

    async def subscribe(self, name: str, filter: str, *, ack_wait: float = 30.0) -> Subscription:
        """Open (create or resume) the durable subscription ``name``; a new filter replaces the old."""
        self._check()
        if not name or not isinstance(name, str):
            raise BusError(f"invalid subscription name {name!r}", hint="use a non-empty string")
        split_filter(filter)
        if not ack_wait > 0:
            raise ValueError(f"ack_wait must be positive, got {ack_wait}")
        async with self._admin:
            sub = self._subs.get(name)
            if sub is not None and sub.loaded and sub.filter == filter and sub.ack_wait == ack_wait:
                return _Handle(self, sub)
            load = sub is None or not sub.loaded
            prefix = self.prefix

            def save(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
                conn.execute(
                    "INSERT INTO bus_subscriptions (prefix, name, filter, ack_wait, created)"
                    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (prefix, name) DO UPDATE SET"
                    " filter = excluded.filter, ack_wait = excluded.ack_wait",
                    (prefix, name, filter, ack_wait, time.time()))
                if not load:
                    return []
                return conn.execute(
                    "SELECT seq, subject, data, headers, delivered, visible_at FROM bus_messages"
                    " WHERE prefix = ? AND sub = ? ORDER BY seq", (prefix, name)).fetchall()

            def install(rows: list[tuple[Any, ...]]) -> _Sub:
                # On the loop, in commit order: publishes committed before this point are in
                # ``rows``; those after it are pushed to the loaded queue.
                current = self._subs.get(name)
                if current is None:
                    current = self._subs[name] = _Sub(self, name, filter, ack_wait, loaded=True)
                    self._routes.clear()
                else:
                    if current.filter != filter:
                        current.filter, current.tokens = filter, split_filter(filter)
                        self._routes.clear()
                    current.set_ack_wait(ack_wait)
                if not current.loaded:
                    current.load(rows)
                return current

            sub = await self._call(save, install)
            return _Handle(self, sub)

    async def unsubscribe(self, name: str) -> None:
        """Delete the subscription ``name`` and its pending messages (a no-op if unknown)."""
        self._check()
        async with self._admin:
            sub = self._subs.pop(name, None)
            if sub is not None:
                sub.stop(delete=True)
                self._routes.clear()
            prefix = self.prefix

            def delete(conn: sqlite3.Connection) -> None:
                conn.execute("DELETE FROM bus_messages WHERE prefix = ? AND sub = ?", (prefix, name))
                conn.execute("DELETE FROM bus_subscriptions WHERE prefix = ? AND name = ?",
                             (prefix, name))

            await self._call(delete, lambda _: None)

    async def flush(self) -> None:
        """Wait until every write queued so far (acks, nacks, delivered counts) is committed."""
        self._check()
        await self._call(lambda conn: None, lambda _: None)

    @property
    def stats(self) -> dict[str, int | float]:
        """Counters: commits (batches), durable publishes and rows, other writes, queue depths."""
        return {
            "batches": self._batches,
            "publishes": self._publishes,
            "rows": self._rows,
            "writes": self._writes,
            "largest_batch": self._largest_batch,
            "last_commit_ms": self._last_commit_ms,
            "queue_depth": self._queue.qsize(),
            "subscriptions": len(self._subs),
            "pending": sum(sub.depth() for sub in self._subs.values()),
            "failed": int(self._failure is not None),
        }

    # ------------------------------------------------------------------ loop-side helpers

    def _route(self, subject: str) -> list[_Sub]:
        tokens = split_subject(subject)
        subs = [sub for sub in self._subs.values() if tokens_match(sub.tokens, tokens)]
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        self._routes[subject] = subs
        return subs

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None, "LocalBackend used before start()"
        return self._loop

    def _check(self) -> None:
        if self._failure is not None:
            raise self._failure_error()
        if self._state != "open":
            state = "not started" if self._state in ("new", "starting") else "closed"
            raise BusError(f"local bus {self.path} is {state}",
                           hint="use it between `await backend.start()` and `await backend.aclose()`")

    def _failure_error(self) -> BusError:
        assert self._failure is not None
        self._failure_reported = True
        return BusError(self._failure, hint="check the disk; restart the runtime to resume from "
                                            "what was committed")

    def _put(self, item: object) -> None:
        with self._lock:
            if self._accepting:
                self._queue.put(item)
                return
        self._check()
        raise BusError("local bus writer is stopped", hint="this is a bug in Corral; please report it")

    def _put_many(self, items: list[tuple[str, tuple[Any, ...]]]) -> None:
        with self._lock:
            if self._accepting:
                for item in items:
                    self._queue.put(item)
                return
        self._check()

    async def _call(self, fn: Callable[[sqlite3.Connection], Any], apply: Callable[[Any], Any]) -> Any:
        future: asyncio.Future[Any] = self._running_loop().create_future()
        self._put(_Call(fn, apply, future))
        return await future

    def _stop_writer(self) -> None:
        with self._lock:
            if self._accepting:
                self._accepting = False
                self._queue.put(_STOP)

    def _committed(self, done: list[_Publish | _Call]) -> None:
        """On the loop, after a commit: deliver publishes and apply calls in commit order."""
        for item in done:
            if type(item) is _Publish:
                seq, subject, data, headers = item.seq, item.subject, item.data, item.headers
                for sub in item.subs:
                    if sub.loaded and not sub.deleted:
                        sub.push(_Msg(seq, subject, data, headers, True))
                if not item.future.done():
                    item.future.set_result(None)
            else:
                assert isinstance(item, _Call)
                try:
                    result = item.apply(item.result)
                except Exception as exc:
                    if not item.future.done():
                        item.future.set_exception(exc)
                    continue
                if not item.future.done():
                    item.future.set_result(result)

    def _fail(self, items: list[object]) -> None:
        """On the loop: answer every waiter of a lost batch (or of a stopped writer) with BusError."""
        for item in items:
            if isinstance(item, _Publish | _Call) and not item.future.done():
                item.future.set_exception(self._failure_error() if self._failure else BusError(
                    "local bus is closed", hint="this is a bug in the caller: it used the bus "
                                                "after aclose()"))

    # ------------------------------------------------------------------ the writer thread

    def _post(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the loop is closed: nobody is left to wait for this answer

    def _writer_main(self, loop: asyncio.AbstractEventLoop,
                     ready: asyncio.Future[tuple[list[tuple[str, str, float]], int]]) -> None:
        conn: sqlite3.Connection | None = None
        try:
            try:
                conn = self._connect()
                subs = conn.execute("SELECT name, filter, ack_wait FROM bus_subscriptions"
                                    " WHERE prefix = ? ORDER BY created, name",
                                    (self.prefix,)).fetchall()
                max_seq = conn.execute("SELECT MAX(seq) FROM bus_messages WHERE prefix = ?",
                                       (self.prefix,)).fetchone()[0] or 0
            except Exception as exc:
                err = BackendUnavailable(
                    f"can't open the local bus database {self.path}: {exc}",
                    hint="check that its folder is writable and on a local disk")
                err.__cause__ = exc
                self._post(loop, _settle, ready, None, err)
                return
            self._post(loop, _settle, ready, (subs, max_seq), None)
            stop_checkpoints = threading.Event()
            checkpointer = threading.Thread(target=self._checkpoint_main, args=(stop_checkpoints,),
                                            name="corral-bus-checkpoint", daemon=True)
            checkpointer.start()
            try:
                self._write_loop(loop, conn)
            except BaseException as exc:  # a bug in this module: fail loudly rather than hang
                self._record_failure(f"the local bus writer crashed: {exc!r}")
            finally:
                stop_checkpoints.set()
                checkpointer.join(timeout=self._close_timeout)
        finally:
            with self._lock:
                self._accepting = False
            left: list[object] = []
            while True:
                try:
                    left.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if left:
                self._post(loop, self._fail, left)
            if conn is not None:
                try:
                    conn.close()
                except sqlite3.Error:
                    pass  # closing can't lose committed data
            if self._exited is not None:
                self._post(loop, _settle, self._exited, None, None)

    def _checkpoint_main(self, stop: threading.Event) -> None:
        # WAL checkpoints copy pages into the database file and fsync it: milliseconds. Run
        # inside a commit (SQLite's autocheckpoint) they land on one unlucky publisher's
        # latency; here, on a connection of their own, PASSIVE ones never block the writer.
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                                   timeout=_BUSY_TIMEOUT_MS / 1000)
        except sqlite3.Error:
            return  # the writer reports a broken database; autocheckpoint is off, WAL grows
        try:
            while not stop.wait(_CHECKPOINT_EVERY):
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
                except sqlite3.Error:
                    pass  # busy or transient: the next round retries
        finally:
            conn.close()

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))  # private from the start
        conn = sqlite3.connect(self.path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000,
                               check_same_thread=False)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise BusError(f"can't put {self.path} in WAL mode (got {mode!r})")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")  # validated in __init__
            conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # see _checkpoint_main
            conn.execute("CREATE TABLE IF NOT EXISTS bus_meta (key TEXT PRIMARY KEY, value INTEGER)")
            while True:
                conn.execute("BEGIN IMMEDIATE")  # two processes must not both migrate
                try:
                    row = conn.execute("SELECT value FROM bus_meta WHERE key = 'schema'").fetchone()
                    version = 0 if row is None else int(row[0])
                    if version > len(_MIGRATIONS):
                        raise BusError(f"{self.path} has bus schema {version}, newer than this "
                                       f"Corral's {len(_MIGRATIONS)}", hint="upgrade Corral")
                    if version == len(_MIGRATIONS):
                        conn.execute("COMMIT")
                        return conn
                    for statement in _MIGRATIONS[version]:
                        conn.execute(statement)
                    conn.execute("INSERT OR REPLACE INTO bus_meta VALUES ('schema', ?)",
                                 (version + 1,))
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
        except BaseException:
            conn.close()
            raise

    def _write_loop(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection) -> None:
        get, get_nowait, batch_max = self._queue.get, self._queue.get_nowait, self._batch_max
        while True:
            batch = [get()]  # sleep until there is work; then take all that piled up
            while len(batch) < batch_max:
                try:
                    batch.append(get_nowait())
                except queue.Empty:
                    break
            if not self._apply(loop, conn, batch):
                return

    def _apply(self, loop: asyncio.AbstractEventLoop, conn: sqlite3.Connection,
               batch: list[object]) -> bool:
        """Run one batch in one transaction; False when the writer should exit."""
        started = time.perf_counter()
        done: list[_Publish | _Call] = []
        publishes = rows = writes = 0
        stop = in_tx = False
        try:
            i, n = 0, len(batch)
            while i < n:
                item = batch[i]
                kind = type(item)
                if item is _STOP:
                    stop = True
                    i += 1
                    continue
                if not in_tx:
                    conn.execute("BEGIN IMMEDIATE")
                    in_tx = True
                if kind is _Publish:  # a run of publishes: one executemany for all their rows
                    run: list[tuple[Any, ...]] = []
                    while i < n and type(batch[i]) is _Publish:
                        pub = batch[i]
                        assert isinstance(pub, _Publish)
                        run.extend(pub.rows)
                        done.append(pub)
                        publishes += 1
                        i += 1
                    conn.executemany(_INSERT, run)
                    rows += len(run)
                elif kind is tuple:  # a run of one fire-and-forget statement
                    assert isinstance(item, tuple)
                    sql = item[0]
                    params: list[tuple[Any, ...]] = []
                    while i < n:
                        nxt = batch[i]
                        if type(nxt) is not tuple or nxt[0] != sql:
                            break
                        params.append(nxt[1])
                        i += 1
                    conn.executemany(sql, params)
                    writes += len(params)
                else:
                    assert isinstance(item, _Call)
                    item.result = item.fn(conn)
                    done.append(item)
                    i += 1
            if in_tx:
                conn.execute("COMMIT")
        except Exception as exc:
            if in_tx:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    pass  # the transaction is gone either way
            self._record_failure(
                f"local bus write failed: {exc}; the batch of {len(batch)} items was rolled back "
                "and the bus takes no more messages")
            self._post(loop, self._fail, batch)
            return False
        if in_tx:
            self._batches += 1
            self._publishes += publishes
            self._rows += rows
            self._writes += writes
            self._largest_batch = max(self._largest_batch, publishes)
            self._last_commit_ms = (time.perf_counter() - started) * 1000
        if done:
            self._post(loop, self._committed, done)
        return not stop

    def _record_failure(self, message: str) -> None:
        with self._lock:
            self._accepting = False
            if self._failure is None:
                self._failure = message


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.done():
        return  # the waiter was cancelled meanwhile
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
