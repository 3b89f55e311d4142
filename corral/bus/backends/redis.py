"""RedisBackend: the bus contract on Redis Streams (``redis.asyncio``), one stream per subscription.

Redis Streams have no subject wildcards, so subjects are routed by Corral, not by Redis:

- **Registry.** The hash ``{prefix}:subs`` maps each subscription name to its filter and
  ``ack_wait``. Every change to it also sets ``{prefix}:subs:version`` to a fresh random token, in the
  same Lua script, so the registry and its version never disagree. Subscribing to an existing
  name resumes it; a different filter or ``ack_wait`` replaces the stored one.
- **Publish.** Each backend caches the registry with the version it read. A publish matches the
  subject against the cache (NATS rules: ``*`` one token, ``>`` one or more trailing tokens) and runs
  ONE Lua script that first checks the version and then XADDs one entry to each matching
  subscription's stream ``{prefix}:sub:{name}``. The script is atomic, so the fan-out is all or
  nothing; if the version moved (another instance subscribed or unsubscribed) nothing is written, the
  backend reloads the registry and sends again. So a subscription receives exactly the messages whose
  publish ran after its registration, whichever instance published them, and a publish never
  re-creates the stream of a deleted subscription.
- **Group commit.** Publishes issued while one is in flight are queued and sent together, in order,
  as one script call; acks, nacks and terms likewise (one script call per subscription, pipelined).
  There is one batch in flight per kind, led by a caller's own task (no background task). A caller
  that publishes one message at a time pays one round trip; concurrent callers share them. Settles
  wait one loop turn before sending, so ``gather(*(m.ack() for m in batch))`` is one round trip; a
  loop of ``await m.ack()`` is one round trip per message (each ack is confirmed by Redis).
- **Consuming.** Each subscription stream has one consumer group; every ``Subscription`` object is
  its own consumer (a random name; ``close()`` removes it when it holds nothing pending), so
  fetchers on one name compete. ``fetch`` runs one Lua script that hands out, in
  this order: nacked entries whose delay is over, entries left pending longer than ``ack_wait``
  (XPENDING IDLE + XCLAIM, which counts the delivery; XPENDING IDLE walks the pending list, so
  this costs O(messages in flight) inside Redis), and new entries (XREADGROUP ``>``). If that
  finds nothing it blocks in XREADGROUP for at most the time left, the time until the next delayed
  entry is due, and one second (so expired ``ack_wait`` entries are seen within about a second).
  ``delivered`` is Redis's own delivery counter for the entry (XPENDING ``times_delivered``).
- **Settling.** ``ack`` and ``term`` are XACK + XDEL (the entry is gone from Redis). ``nack(delay)``
  leaves the entry pending and adds its id to the sorted set ``{prefix}:delayed:{name}`` scored with
  its due time (Redis server clock); fetchers hand it out again once due, via XCLAIM. Until then a
  fetcher that sees it idle past ``ack_wait`` only resets its idle time (XCLAIM JUSTID, which does not
  count a delivery), so it is never delivered before its delay; XAUTOCLAIM cannot skip such entries
  without counting them, which is why it is not used. A nack from a consumer that no longer owns
  the entry (it was reclaimed after ``ack_wait``) does nothing.
- **Unsubscribe** deletes the registry entry, the stream (with its group and pending entries) and
  the delayed set, in one script.

Durability is Redis's: ``publish`` returns once Redis has applied the write, and whether that survives
a Redis crash depends on its AOF (``appendfsync``) and replication settings. The CI Redis runs with no
persistence at all (``--save "" --appendonly no``). ``durable=False`` takes the same path.

All keys of one backend start with ``{prefix}:``; ``purge()`` deletes them. Redis Cluster is not
supported (a publish script touches several subscriptions' keys).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar
from urllib.parse import urlsplit, urlunsplit

from corral.errors import BackendUnavailable, BusError

__all__ = ["RedisBackend", "RedisIncoming", "RedisSubscription"]

_GROUP: Final = "corral"
_MAX_BATCH: Final = 1024  # messages per publish script call
_MAX_BATCH_BYTES: Final = 8 << 20  # payload bytes per publish script call
_MAX_BLOCK: Final = 1.0  # longest single XREADGROUP BLOCK; bounds how late ack_wait expiry is seen
_START_TIMEOUT: Final = 3.0
_INSTALL_HINT: Final = "pip install 'corral[redis]'"
_HEADER: Final = struct.Struct(">5I")  # one delivery in the fetch script's reply

T = TypeVar("T")


# -- Lua scripts --------------------------------------------------------------------------------

_PUBLISH: Final = """
-- KEYS[1] registry version; KEYS[2..] subscription streams
-- ARGV[1] the version the caller routed with; then per message:
--   n, n indexes into KEYS, subject, data, headers ('' for none)
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then return 0 end
local i = 2
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  local s, d, h = ARGV[i + n + 1], ARGV[i + n + 2], ARGV[i + n + 3]
  for j = 1, n do
    local key = KEYS[tonumber(ARGV[i + j])]
    if h == '' then
      redis.call('XADD', key, '*', 's', s, 'd', d)
    else
      redis.call('XADD', key, '*', 's', s, 'd', d, 'h', h)
    end
  end
  i = i + n + 4
end
return 1
"""

_SUBSCRIBE: Final = """
-- KEYS: registry, version, stream, delayed.  ARGV: name, record, new version, group
-- Returns {0 unchanged | 1 created | 2 updated, previous version}
local old = redis.call('GET', KEYS[2]) or ''
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then
  redis.call('DEL', KEYS[3], KEYS[4])
  redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[4], '0', 'MKSTREAM')
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SET', KEYS[2], ARGV[3])
  return {1, old}
end
redis.pcall('XGROUP', 'CREATE', KEYS[3], ARGV[4], '0', 'MKSTREAM')  -- BUSYGROUP: already there
if cur ~= ARGV[2] then
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
  redis.call('SET', KEYS[2], ARGV[3])
  return {2, old}
end
return {0, old}
"""

_UNSUBSCRIBE: Final = """
-- KEYS: registry, version, stream, delayed.  ARGV: name, new version
local old = redis.call('GET', KEYS[2]) or ''
local removed = redis.call('HDEL', KEYS[1], ARGV[1])
if removed == 1 then redis.call('SET', KEYS[2], ARGV[2]) end
redis.call('DEL', KEYS[3], KEYS[4])
return {removed, old}
"""

_FETCH: Final = """
-- KEYS: stream, delayed.  ARGV: group, consumer, max messages, ack_wait ms
-- Returns {ms until the next delayed entry is due (-1: none), deliveries}. The deliveries are
-- one string (parsing one bulk reply is far cheaper in Python than five per message): per
-- delivery a big-endian header of five uint32 (id length, delivered, subject, data and headers
-- lengths) followed by the id, subject, data and headers ('' for none).
local stream, delayed = KEYS[1], KEYS[2]
local g, me, want, ackms = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4]
if redis.call('EXISTS', stream) == 0 then return redis.error_reply('NOGROUP subscription deleted') end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out, n = {}, 0
local function add(id, count, f)
  local s, d, h = '', '', ''
  for k = 1, #f, 2 do
    if f[k] == 's' then s = f[k + 1] elseif f[k] == 'd' then d = f[k + 1]
    elseif f[k] == 'h' then h = f[k + 1] end
  end
  out[#out + 1] = struct.pack('>I4I4I4I4I4', #id, count, #s, #d, #h)
  out[#out + 1] = id; out[#out + 1] = s; out[#out + 1] = d; out[#out + 1] = h
  n = n + 1
end
local function take(id, count)
  local e = redis.call('XCLAIM', stream, g, me, 0, id)[1]
  if e then add(e[1], count, e[2]) end
end
-- 1. nacked entries whose delay is over
for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, want)) do
  redis.call('ZREM', delayed, id)
  local p = redis.call('XPENDING', stream, g, id, id, 1)[1]
  if p then take(id, p[4] + 1) end
end
-- 2. entries not settled within ack_wait (delayed ones only get their idle time reset)
if n < want then
  for _, p in ipairs(redis.call('XPENDING', stream, g, 'IDLE', ackms, '-', '+', want - n)) do
    if redis.call('ZSCORE', delayed, p[1]) then
      redis.call('XCLAIM', stream, g, me, 0, p[1], 'JUSTID')
    else
      take(p[1], p[4] + 1)
    end
  end
end
-- 3. new entries
if n < want then
  local r = redis.call('XREADGROUP', 'GROUP', g, me, 'COUNT', want - n, 'STREAMS', stream, '>')
  if r then
    for _, e in ipairs(r[1][2]) do
      if e[2] then add(e[1], 1, e[2]) end
    end
  end
end
local due, nxt = -1, redis.call('ZRANGE', delayed, 0, 0, 'WITHSCORES')[2]
if nxt then due = math.max(0, tonumber(nxt) - now) end
return {due, table.concat(out)}
"""

_SETTLE: Final = """
-- KEYS: stream, delayed.  ARGV: group, consumer, then pairs: id, delay ms (-1: ack or term)
local stream, delayed, g, me = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
if redis.call('EXISTS', stream) == 0 then return 0 end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local done = {}
for i = 3, #ARGV, 2 do
  local id, delay = ARGV[i], tonumber(ARGV[i + 1])
  if delay < 0 then
    done[#done + 1] = id
  else
    local p = redis.call('XPENDING', stream, g, id, id, 1)[1]
    if p and p[2] == me then redis.call('ZADD', delayed, now + delay, id) end
  end
end
if #done > 0 then
  redis.call('XACK', stream, g, unpack(done))
  redis.call('XDEL', stream, unpack(done))
  redis.call('ZREM', delayed, unpack(done))
end
return 1
"""

_CLOSE: Final = """
-- KEYS: stream.  ARGV: group, consumer.  Forget the consumer if it holds no pending entries.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
  return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return 0
"""

_SCRIPTS: Final = {
    name: (body, hashlib.sha1(body.encode()).hexdigest())
    for name, body in [("publish", _PUBLISH), ("subscribe", _SUBSCRIBE),
                       ("unsubscribe", _UNSUBSCRIBE), ("fetch", _FETCH), ("settle", _SETTLE),
                       ("close", _CLOSE)]
}


# -- subjects ------------------------------------------------------------------------------------

def _check_subject(subject: str) -> list[str]:
    tokens = subject.split(".")
    if not subject or any(t in ("", "*", ">") for t in tokens):
        raise BusError(f"invalid subject {subject!r}",
                       hint="publish to dot-separated, non-empty tokens without '*' or '>'")
    return tokens


def _check_filter(filter: str) -> tuple[str, ...]:
    tokens = tuple(filter.split("."))
    if not filter or "" in tokens or ">" in tokens[:-1]:
        raise BusError(f"invalid filter {filter!r}",
                       hint="use dot-separated tokens; '*' matches one token, "
                            "'>' (last only) one or more trailing tokens")
    return tokens


def _matches(filter: tuple[str, ...], subject: Sequence[str]) -> bool:
    for i, want in enumerate(filter):
        if want == ">":
            return len(subject) > i
        if i >= len(subject) or (want != "*" and want != subject[i]):
            return False
    return len(subject) == len(filter)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# -- group commit -------------------------------------------------------------------------------

_LEAD: Final = object()


class _Entry(Generic[T]):
    """A queued item and the future its caller waits on (for the outcome, or for _LEAD)."""

    __slots__ = ("fut", "item")

    def __init__(self, item: T, fut: asyncio.Future[object]) -> None:
        self.item = item
        self.fut = fut


class _GroupCommit(Generic[T]):
    """Callers queue items; one of them at a time (the leader) sends the queue head as a batch.

    A caller that finds nothing in flight leads at once, so a lone caller pays no extra hop;
    with ``linger`` it first lets the loop run once, so callers started in the same tick (say
    ``gather(*(m.ack() for m in batch))``) share its round trip. When a leader's own item is done
    it hands leadership to the oldest waiter, so no background task is needed and batches go out
    strictly in queue order, one at a time.
    """

    def __init__(self, flush: Callable[[list[T]], Awaitable[None]], max_items: int,
                 size: Callable[[T], int] = lambda _: 0, max_size: int = 0,
                 *, linger: bool = False) -> None:
        self._flush = flush
        self._linger = linger
        self._max_items = max_items
        self._size = size
        self._max_size = max_size
        self._queue: deque[_Entry[T]] = deque()
        self._leading = False

    async def submit(self, item: T) -> None:
        loop = asyncio.get_running_loop()
        entry = _Entry(item, loop.create_future())
        self._queue.append(entry)
        if self._leading:
            try:
                if await entry.fut is not _LEAD:
                    return
            except asyncio.CancelledError:
                if not entry.fut.cancelled() and entry.fut.result() is _LEAD:
                    self._hand_off()  # made leader while being cancelled: pass it on
                raise
            entry.fut = loop.create_future()  # still at the queue head: lead with it
            await self._lead(entry.fut, linger=False)
        else:
            self._leading = True
            await self._lead(entry.fut, linger=self._linger)

    async def _lead(self, mine: asyncio.Future[object], *, linger: bool) -> None:
        batch: list[_Entry[T]] = []
        try:
            if linger:
                await asyncio.sleep(0)
            while not mine.done():
                batch = self._take()
                if not batch:  # fail_pending() took our item while leadership came to us
                    mine.set_exception(BusError("the backend was closed before this was sent",
                                                hint="start() it again"))
                    break
                try:
                    await self._flush([e.item for e in batch])
                except Exception as exc:
                    for e in batch:
                        if not e.fut.done():
                            e.fut.set_exception(exc)
                else:
                    for e in batch:
                        if not e.fut.done():
                            e.fut.set_result(None)
                batch = []
        finally:
            for e in batch:  # the leader was cancelled with a batch in flight
                if not e.fut.done():
                    e.fut.set_exception(BusError(
                        "the batch was interrupted; it may or may not have been applied",
                        hint="retry if the operation matters (redelivery is at least once)"))
            if not mine.done():
                # Cancelled before our own item went out: drop it, or _hand_off would make
                # this abandoned entry the next leader and nobody would ever send again.
                mine.cancel()
            self._hand_off()
        mine.result()  # raise this caller's own error, if any

    def _take(self) -> list[_Entry[T]]:
        batch: list[_Entry[T]] = []
        size = 0
        while self._queue and len(batch) < self._max_items:
            entry = self._queue[0]
            if entry.fut.done():  # its caller was cancelled before it was sent
                self._queue.popleft()
                continue
            size += self._size(entry.item)
            if batch and self._max_size and size > self._max_size:
                break
            batch.append(self._queue.popleft())
        return batch

    def _hand_off(self) -> None:
        """Make the oldest live waiter the leader; until it runs, nobody else may lead."""
        while self._queue:
            fut = self._queue[0].fut
            if not fut.done():
                fut.set_result(_LEAD)
                self._leading = True
                return
            self._queue.popleft()
        self._leading = False

    def fail_pending(self, exc: BaseException) -> None:
        """Fail every queued item (the backend is closing)."""
        while self._queue:
            fut = self._queue.popleft().fut
            if not fut.done():
                fut.set_exception(exc)


# -- deliveries and subscriptions ----------------------------------------------------------------

@dataclass(eq=False)
class RedisIncoming:
    """One delivery of one stream entry to a subscription."""

    subject: str
    data: bytes = field(repr=False)
    headers: dict[str, str]
    delivered: int
    id: bytes
    _sub: RedisSubscription = field(repr=False)

    async def ack(self) -> None:
        """Settle the entry: XACK + XDEL."""
        await self._sub._settle(self.id, -1)

    async def nack(self, delay: float = 0.0) -> None:
        """Hand the entry out again once ``delay`` seconds have passed."""
        await self._sub._settle(self.id, max(0, round(delay * 1000)))

    async def term(self) -> None:
        """Drop the entry for good: XACK + XDEL."""
        await self._sub._settle(self.id, -1)


class RedisSubscription:
    """A consumer of the subscription's group; each instance competes with the others."""

    def __init__(self, backend: RedisBackend, name: str, filter: str, ack_wait: float) -> None:
        self.name = name
        self.filter = filter
        self.ack_wait = ack_wait
        self._backend = backend
        self._stream = backend._stream_key(name)
        self._delayed = backend._delayed_key(name)
        self._consumer = uuid.uuid4().hex
        self._closed = False

    async def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[RedisIncoming]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` for the first, else []."""
        if self._closed:
            raise BusError(f"subscription {self.name!r} is closed",
                           hint="open it again with subscribe()")
        self._backend._require()
        if max_messages <= 0:
            return []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        b = self._backend
        with b._errors(f"fetching from subscription {self.name!r}"):
            while True:
                b._require()
                reply = await b._eval("fetch", [self._stream, self._delayed],
                                      [_GROUP, self._consumer, max_messages,
                                       max(1, round(self.ack_wait * 1000))])
                due_ms, blob = reply
                if blob:
                    return self._unpack(blob)
                left = deadline - loop.time()
                if left <= 0:
                    return []
                wait = min(left, _MAX_BLOCK, due_ms / 1000 if due_ms >= 0 else left)
                reply = await b._client.xreadgroup(
                    _GROUP, self._consumer, {self._stream: ">"}, count=max_messages,
                    block=max(1, round(wait * 1000)))
                got = [self._delivery(eid, 1, f[b"s"], f[b"d"], f.get(b"h", b""))
                       for _, entries in _stream_items(reply) for eid, f in entries if f]
                if got:
                    return got

    async def close(self) -> None:
        """Stop fetching; entries this consumer holds stay pending and come back after ack_wait."""
        if self._closed:
            return
        self._closed = True
        b = self._backend
        if b._client is not None:
            with b._errors(f"closing subscription {self.name!r}"):
                await b._eval("close", [self._stream], [_GROUP, self._consumer])

    def _unpack(self, blob: bytes) -> list[RedisIncoming]:
        out = []
        view, at, end = memoryview(blob), 0, len(blob)
        while at < end:
            n_id, delivered, n_s, n_d, n_h = _HEADER.unpack_from(blob, at)
            at += _HEADER.size
            eid = blob[at:at + n_id]
            at += n_id
            subject = str(view[at:at + n_s], "utf-8")
            at += n_s
            data = blob[at:at + n_d]
            at += n_d
            headers = json.loads(blob[at:at + n_h]) if n_h else {}
            at += n_h
            out.append(RedisIncoming(subject, data, headers, delivered, eid, self))
        return out

    def _delivery(self, eid: bytes, delivered: int, subject: bytes, data: bytes,
                  headers: bytes) -> RedisIncoming:
        return RedisIncoming(subject=subject.decode(), data=data,
                             headers=json.loads(headers) if headers else {},
                             delivered=delivered, id=eid, _sub=self)

    async def _settle(self, eid: bytes, delay_ms: int) -> None:
        self._backend._require()
        await self._backend._settles.submit((self._stream, self._delayed, self._consumer, eid,
                                             delay_ms))


def _stream_items(reply: Any) -> list[tuple[Any, Any]]:
    """XREADGROUP's reply as (stream, entries) pairs, for RESP2 (list) and RESP3 (dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        return list(reply.items())
    return [(s, entries) for s, entries in reply]


# -- the backend ---------------------------------------------------------------------------------

_Publish = tuple[str, bytes, bytes]  # subject, data, headers JSON
_Settle = tuple[str, str, str, bytes, int]  # stream, delayed key, consumer, entry id, delay ms


class RedisBackend:
    """The bus on Redis Streams: ``RedisBackend(url, prefix)``; ``start()`` before use."""

    name = "redis"

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", prefix: str = "corral") -> None:
        self.url = url
        self.prefix = prefix
        self._client: Any = None
        self._exc: Any = None  # redis.exceptions, once imported
        self._subs_key = f"{prefix}:subs"
        self._version_key = f"{prefix}:subs:version"
        # the routing cache: registry version -> {name: filter tokens}, and subject -> streams
        self._version: str | None = None
        self._filters: dict[str, tuple[str, ...]] = {}
        self._routes: dict[str, list[str]] = {}
        self._publishes: _GroupCommit[_Publish] = _GroupCommit(
            self._send_publishes, _MAX_BATCH, lambda p: len(p[2]), _MAX_BATCH_BYTES)
        self._settles: _GroupCommit[_Settle] = _GroupCommit(self._send_settles, _MAX_BATCH,
                                                            linger=True)

    # lifecycle

    async def start(self) -> None:
        """Connect and ping; raises BackendUnavailable if Redis or redis-py is missing."""
        if self._client is not None:
            return
        try:
            import redis.asyncio as aioredis
            import redis.exceptions
            from redis.asyncio.retry import Retry
            from redis.backoff import ExponentialBackoff
        except ImportError as exc:
            raise BackendUnavailable(f"the Redis backend needs redis-py: {_INSTALL_HINT}",
                                     hint=_INSTALL_HINT) from exc
        self._exc = redis.exceptions
        client = aioredis.Redis.from_url(
            self.url, socket_connect_timeout=2.0, socket_timeout=_MAX_BLOCK + 10.0,
            retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2))
        try:
            with self._errors("connecting"):
                async with asyncio.timeout(_START_TIMEOUT):
                    await client.ping()
                    for body, _ in _SCRIPTS.values():
                        await client.script_load(body)
        except BaseException:
            await client.aclose()
            raise
        self._client = client

    async def aclose(self) -> None:
        """Close the connections; subscriptions and their messages stay in Redis."""
        client, self._client = self._client, None
        if client is None:
            return
        closed = BusError("the Redis backend was closed", hint="start() it again")
        self._publishes.fail_pending(closed)
        self._settles.fail_pending(closed)
        await client.aclose()

    async def __aenter__(self) -> RedisBackend:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # publish

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      *, durable: bool = True) -> None:
        """Append ``data`` to every subscription matching ``subject``; returns once Redis applied it."""
        self._require()
        if subject not in self._routes:  # routed subjects were checked already
            _check_subject(subject)
        h = json.dumps(headers, separators=(",", ":")).encode() if headers else b""
        await self._publishes.submit((subject, data if type(data) is bytes else bytes(data), h))

    async def _send_publishes(self, batch: list[_Publish]) -> None:
        self._require()
        with self._errors(f"publishing {len(batch)} message(s)"):
            for attempt in range(100):
                if self._version is None:
                    await self._refresh()
                keys = [self._version_key]
                index: dict[str, int] = {}
                args: list[Any] = [self._version]
                for subject, data, headers in batch:
                    streams = self._route(subject)
                    if not streams:
                        continue
                    args.append(len(streams))
                    for s in streams:
                        if s not in index:
                            keys.append(s)
                            index[s] = len(keys)
                        args.append(index[s])
                    args += (subject, data, headers)
                if await self._eval("publish", keys, args):
                    return
                self._version = None  # the registry changed since we cached it
                if attempt:
                    await asyncio.sleep(min(0.001 * 2 ** attempt, 0.1))
        raise BusError("the subscription registry kept changing while publishing",
                       hint="something subscribes/unsubscribes in a tight loop")

    def _route(self, subject: str) -> list[str]:
        streams = self._routes.get(subject)
        if streams is None:
            if len(self._routes) >= 10_000:
                self._routes.clear()
            tokens = subject.split(".")
            streams = [self._stream_key(name) for name, f in self._filters.items()
                       if _matches(f, tokens)]
            self._routes[subject] = streams
        return streams

    async def _refresh(self) -> None:
        async with self._client.pipeline(transaction=True) as pipe:
            pipe.hgetall(self._subs_key)
            pipe.get(self._version_key)
            subs, version = await pipe.execute()
        filters = {}
        for name, record in subs.items():
            filters[name.decode()] = _check_filter(json.loads(record)["filter"])
        self._set_registry((version or b"").decode(), filters)

    def _set_registry(self, version: str, filters: dict[str, tuple[str, ...]]) -> None:
        self._version = version
        self._filters = filters
        self._routes = {}

    # subscriptions

    async def subscribe(self, name: str, filter: str, *, ack_wait: float = 30.0
                        ) -> RedisSubscription:
        """Open (create or resume) the subscription ``name``; a changed filter or ack_wait is kept."""
        self._require()
        tokens = _check_filter(filter)
        if ack_wait <= 0:
            raise BusError(f"ack_wait must be positive, got {ack_wait!r}")
        record = json.dumps({"filter": filter, "ack_wait": ack_wait}, separators=(",", ":"))
        token = uuid.uuid4().hex
        with self._errors(f"subscribing {name!r}"):
            changed, old = await self._eval(
                "subscribe", [self._subs_key, self._version_key, self._stream_key(name),
                              self._delayed_key(name)], [name, record, token, _GROUP])
        if changed and self._version is not None and old.decode() == self._version:
            self._set_registry(token, {**self._filters, name: tokens})
        return RedisSubscription(self, name, filter, ack_wait)

    async def unsubscribe(self, name: str) -> None:
        """Delete the subscription, its stream, pending and delayed entries."""
        self._require()
        token = uuid.uuid4().hex
        with self._errors(f"unsubscribing {name!r}"):
            removed, old = await self._eval(
                "unsubscribe", [self._subs_key, self._version_key, self._stream_key(name),
                                self._delayed_key(name)], [name, token])
        if removed and self._version is not None and old.decode() == self._version:
            self._set_registry(token, {k: v for k, v in self._filters.items() if k != name})

    async def _send_settles(self, batch: list[_Settle]) -> None:
        groups: dict[tuple[str, str, str], list[Any]] = {}
        for stream, delayed, consumer, eid, delay_ms in batch:
            groups.setdefault((stream, delayed, consumer), []).extend((eid, delay_ms))
        calls = [([s, d], [_GROUP, c, *ops]) for (s, d, c), ops in groups.items()]
        self._require()
        with self._errors(f"settling {len(batch)} message(s)"):
            try:
                await self._settle_calls(calls)
            except self._exc.NoScriptError:  # Redis restarted or SCRIPT FLUSH: load, resend
                await self._load_scripts()
                await self._settle_calls(calls)

    async def _settle_calls(self, calls: list[tuple[list[str], list[Any]]]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for keys, args in calls:
                pipe.evalsha(_SCRIPTS["settle"][1], len(keys), *keys, *args)
            await pipe.execute()

    # maintenance

    async def purge(self) -> int:
        """Delete every key under this backend's prefix (tests, resets); returns how many."""
        self._require()
        pattern = "".join("\\" + c if c in "*?[]\\" else c for c in self.prefix) + ":*"
        removed = 0
        with self._errors("purging"):
            keys: list[bytes] = []
            async for key in self._client.scan_iter(match=pattern, count=1000):
                keys.append(key)
                if len(keys) >= 1000:
                    removed += await self._client.unlink(*keys)
                    keys = []
            if keys:
                removed += await self._client.unlink(*keys)
        self._version = None
        return removed

    # plumbing

    def _stream_key(self, name: str) -> str:
        return f"{self.prefix}:sub:{name}"

    def _delayed_key(self, name: str) -> str:
        return f"{self.prefix}:delayed:{name}"

    def _require(self) -> None:
        if self._client is None:
            raise BusError("the Redis backend is not started", hint="await backend.start() first")

    async def _eval(self, script: str, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        sha = _SCRIPTS[script][1]
        try:
            return await self._client.evalsha(sha, len(keys), *keys, *args)
        except self._exc.NoScriptError:  # Redis restarted or SCRIPT FLUSH: nothing ran; resend
            await self._load_scripts()
            return await self._client.evalsha(sha, len(keys), *keys, *args)

    async def _load_scripts(self) -> None:
        for body, _ in _SCRIPTS.values():
            await self._client.script_load(body)

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """The one place redis-py's exceptions become Corral's, raised ``from`` the original."""
        try:
            yield
        except BusError:
            raise
        except Exception as exc:
            mapped = self._mapped(exc, doing)
            if mapped is None:
                raise
            raise mapped from exc

    def _mapped(self, exc: Exception, doing: str) -> BusError | None:
        """Corral's error for one of redis-py's (or a connect timeout); None for anything else."""
        where = _redacted(self.url)
        unavailable = f"start Redis at {where} (shared/services.sh)"
        if isinstance(exc, TimeoutError):  # asyncio.timeout around connecting
            return BackendUnavailable(f"Redis at {where} did not answer while {doing}",
                                      hint=unavailable)
        errors = self._exc
        if errors is None or not isinstance(exc, errors.RedisError | OSError):
            return None
        if isinstance(exc, errors.AuthenticationError):
            return BackendUnavailable(f"Redis at {where} refused our credentials while "
                                      f"{doing}: {exc}",
                                      hint="check the user and password in the URL")
        if isinstance(exc, errors.ConnectionError | errors.TimeoutError | OSError):
            return BackendUnavailable(f"Redis at {where} is unreachable while {doing}: {exc}",
                                      hint=unavailable)
        if isinstance(exc, errors.ResponseError) and (
                "NOGROUP" in str(exc) or "UNBLOCKED" in str(exc)):
            return BusError(f"the subscription was deleted while {doing}",
                            hint="subscribe again to recreate it")
        return BusError(f"Redis failed while {doing}: {exc}")
