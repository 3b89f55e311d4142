"""Message-bus benchmarks: Corral's ``Bus`` on its three backends, against peers, in one run.

- ``bus-fanout``: 1 publisher -> 100 subscriptions, at-most-once, on the local backend:
  deliveries/s that reached a handler through ``Bus.consume`` (publish, route, fetch, decode,
  handler, ack), and the backend alone (publish + fetch + ack, no ``Bus``).
  Peer: AutoGen core ``publish_message`` to 100 subscribed agents.
- ``bus-latency``: time from the ``Bus.publish`` call to each of 100 handler invocations
  (``perf_counter_ns`` stamped in the payload), one message at a time with an idle gap (not
  saturated). Peer: AutoGen ``publish_message``, same driver.
- ``bus-durable``: at-least-once on the local backend (SQLite group commit inside publish):
  N = 1, 10, 100 concurrent publishers through ``Bus.publish``; msg/s and per-call latency.
- ``bus-nats`` / ``bus-redis``: Corral (``Bus.publish`` / ``Bus.consume``, at-least-once) against
  the raw client doing the same work, interleaved in one process: (a) publish awaiting
  durability one at a time, (b) 256 publishes in flight, (c) consume + ack in batches.

Like ``autogen_bench``, no ``from __future__ import annotations``: AutoGen's
``message_handler`` reads the handler's type hints when the class is created.
"""

import asyncio
import dataclasses
import gc
import os
import socket
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from bench.common import fmt, latency_us, median_runs, now_ns, print_table

__all__ = ["BUS_BENCHES", "BusCounts", "available", "run_autogen", "run_corral"]

BUS_BENCHES = ("bus-fanout", "bus-latency", "bus-durable", "bus-nats", "bus-redis")
NATS_URL = os.environ.get("CORRAL_BENCH_NATS_URL", "nats://127.0.0.1:4222")
REDIS_URL = os.environ.get("CORRAL_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
SENDER = "bench"
#: A benchmark stops repeating once it has spent this long (it always completes one run).
BUDGET_S = 60.0
#: A single driver wait longer than this means deliveries were lost: fail, don't hang.
STALL_S = 30.0


@dataclass(frozen=True)
class BusCounts:
    """How much each bus benchmark does (``--quick`` shrinks everything)."""

    quick: bool
    reps: int
    subs: int                  # subscriptions in fan-out and latency
    fan_msgs: int              # messages per fan-out run, Corral (x subs deliveries)
    fan_msgs_autogen: int      # the same for AutoGen (about 20x slower per delivery)
    fan_chunk: int             # published back to back before waiting for the previous chunk
    lat_msgs: int              # messages per latency run (x subs samples)
    lat_gap_s: float           # idle time between two latency messages
    durable_publishers: tuple[int, ...]
    durable_msgs: int          # messages per durable run (N=1 gets a fifth)
    remote_seq: int            # (a) one at a time
    remote_pipe: int           # (b) pipelined
    remote_width: int          # (b) in flight
    remote_batch: int          # (c) fetch batch

    @staticmethod
    def make(quick: bool) -> "BusCounts":
        if quick:
            return BusCounts(quick=True, reps=2, subs=100, fan_msgs=1_000, fan_msgs_autogen=100,
                             fan_chunk=64, lat_msgs=150, lat_gap_s=0.002,
                             durable_publishers=(1, 10, 100), durable_msgs=4_000,
                             remote_seq=300, remote_pipe=3_000, remote_width=256,
                             remote_batch=64)
        return BusCounts(quick=False, reps=3, subs=100, fan_msgs=5_000, fan_msgs_autogen=500,
                         fan_chunk=64, lat_msgs=600, lat_gap_s=0.002,
                         durable_publishers=(1, 10, 100), durable_msgs=20_000,
                         remote_seq=2_000, remote_pipe=20_000, remote_width=256,
                         remote_batch=64)


# ================================================================== helpers


class Tally:
    """Counts deliveries; a driver can wait until the count reaches a number."""

    __slots__ = ("fut", "n", "record", "samples", "target")

    def __init__(self, record: bool = False) -> None:
        self.n = 0
        self.target = -1
        self.fut: asyncio.Future[None] | None = None
        self.record = record  # on(): stamp (latency) rather than count
        self.samples: list[int] = []

    def hit(self) -> None:
        self.n += 1
        if self.n == self.target:
            self.fut.set_result(None)  # type: ignore[union-attr]

    def stamp(self, t0: int) -> None:
        """A delivery of a message stamped ``t0`` (perf_counter_ns at the publish call)."""
        self.samples.append(now_ns() - t0)
        self.hit()

    def on(self, t0: int) -> None:
        if self.record:
            self.stamp(t0)
        else:
            self.hit()

    async def reach(self, n: int) -> None:
        if self.n >= n:
            return
        self.fut = asyncio.get_running_loop().create_future()
        self.target = n
        try:
            async with asyncio.timeout(STALL_S):
                await self.fut
        except TimeoutError:
            raise RuntimeError(f"stalled: {self.n} of {n} deliveries after {STALL_S}s") from None
        finally:
            self.target, self.fut = -1, None


async def _fan_drive(publish: Callable[[int], Awaitable[Any]], tally: Tally, msgs: int, fan: int,
                     chunk: int) -> dict[str, Any]:
    """Publish ``msgs`` in chunks, at most two chunks undelivered; deliveries/s to the last one."""
    base = tally.n
    t0 = now_ns()
    sent = 0
    while sent < msgs:
        k = min(chunk, msgs - sent)
        for i in range(k):
            await publish(i)
        sent += k
        await tally.reach(base + max(0, sent - chunk) * fan)
    await tally.reach(base + msgs * fan)
    dt = now_ns() - t0
    return {"per_s": msgs * fan / (dt / 1e9), "msgs_per_s": msgs / (dt / 1e9),
            "deliveries": msgs * fan, "s": dt / 1e9}


async def _lat_drive(publish: Callable[[int], Awaitable[Any]], tally: Tally, msgs: int, fan: int,
                     gap: float) -> dict[str, Any]:
    """One message at a time, stamped at the publish call; wait for all ``fan``, idle ``gap``."""
    tally.samples = []
    base = tally.n
    t0 = now_ns()
    for i in range(msgs):
        await publish(now_ns())
        await tally.reach(base + (i + 1) * fan)
        await asyncio.sleep(gap)
    dt = now_ns() - t0
    s = tally.samples
    firsts = [s[i * fan] for i in range(msgs)]
    lasts = [s[i * fan + fan - 1] for i in range(msgs)]
    out = latency_us(s)
    out["first_p50_us"] = latency_us(firsts)["p50_us"]
    out["last_p50_us"] = latency_us(lasts)["p50_us"]
    out["last_p99_us"] = latency_us(lasts)["p99_us"]
    out["msgs_per_s"] = msgs / (dt / 1e9)
    return out


def _reps(reps: int, started: int) -> bool:
    """Whether to run another repetition (the first always runs)."""
    return reps == 0 or (now_ns() - started) / 1e9 < BUDGET_S


def _prefix() -> str:
    return f"bench{uuid.uuid4().hex[:10]}"


def _corral_gc() -> None:
    """The GC thresholds a Corral runtime sets while it runs (RuntimeConfig.gc_threshold)."""
    from corral.runtime.config import RuntimeConfig

    threshold = RuntimeConfig().gc_threshold
    if threshold is not None:
        gc.set_threshold(*threshold)


def _up(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 0),
                                      timeout=0.5):
            return True
    except OSError:
        return False


def available(name: str) -> str | None:
    """None if bus benchmark ``name`` can run here, else why not (a missing server or library)."""
    if name == "bus-nats":
        try:
            import nats  # noqa: F401
        except ImportError as exc:
            return f"nats-py is not importable: {exc}"
        return None if _up(NATS_URL) else f"NATS is not running at {NATS_URL} (shared/services.sh)"
    if name == "bus-redis":
        try:
            import redis  # noqa: F401
        except ImportError as exc:
            return f"redis-py is not importable: {exc}"
        return None if _up(REDIS_URL) else f"Redis is not running at {REDIS_URL} (shared/services.sh)"
    return None


class _LocalBus:
    """A Bus over a fresh LocalBackend in a temporary home, with ``n`` subscriptions to ``filter``."""

    async def open(self, n: int, filter: str) -> "_LocalBus":
        from corral.bus.backends import open_backend
        from corral.bus.bus import Bus

        self._tmp = tempfile.TemporaryDirectory(prefix="corral-bus-bench-")
        self.backend: Any = open_backend("local", home=Path(self._tmp.name), prefix=_prefix())
        await self.backend.start()
        self.bus = Bus(self.backend)
        self.names = [f"s{i}" for i in range(n)]
        for name in self.names:  # created before anything is published; consume resumes them
            await (await self.backend.subscribe(name, filter)).close()
        self.tasks: list[asyncio.Task[Any]] = []
        return self

    def consume(self, handler: Callable[[Any], Awaitable[None]], filter: str) -> None:
        self.tasks += [asyncio.create_task(self.bus.consume(n, filter, handler))
                       for n in self.names]

    def raw_consume(self, tally: Tally) -> None:
        """Backend only (fan-out): fetch + ack on ``fan.x``, no Bus (no decode, no checks)."""

        async def loop(name: str) -> None:
            sub = await self.backend.subscribe(name, "fan.x")
            while True:
                for inc in await sub.fetch(64, timeout=1.0):
                    await inc.ack()
                    tally.hit()

        self.tasks += [asyncio.create_task(loop(n)) for n in self.names]

    async def stop_consumers(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tasks = []

    async def close(self) -> None:
        await self.stop_consumers()
        try:
            await self.backend.aclose()
        finally:
            self._tmp.cleanup()


# ================================================================== 1. fan-out


async def _corral_fanout(c: BusCounts) -> dict[str, Any]:
    from corral.bus.envelope import Envelope, encode

    lb = await _LocalBus().open(c.subs, "fan.x")
    bus, backend = lb.bus, lb.backend
    try:
        # -- through the Bus: publish -> route -> fetch -> decode -> checks -> handler -> ack
        tally = Tally()

        async def handler(env: Any) -> None:
            tally.hit()

        lb.consume(handler, "fan.x")

        def pub(i: int) -> Awaitable[Any]:
            return bus.publish(SENDER, "fan.x", i)

        await _fan_drive(pub, tally, max(50, c.fan_msgs // 10), c.subs, c.fan_chunk)  # warm-up
        runs, started = [], now_ns()
        for r in range(c.reps):
            if not _reps(r, started):
                break
            runs.append(await _fan_drive(pub, tally, c.fan_msgs, c.subs, c.fan_chunk))
        via_bus = median_runs(runs)
        await lb.stop_consumers()

        # -- the backend alone: publish pre-encoded bytes, fetch + ack
        data = encode(Envelope.new("fan.x", SENDER, 0))
        tally = Tally()
        lb.raw_consume(tally)

        def raw(i: int) -> Awaitable[Any]:
            return backend.publish("fan.x", data, durable=False)

        await _fan_drive(raw, tally, max(50, c.fan_msgs // 10), c.subs, c.fan_chunk)
        runs, started = [], now_ns()
        for r in range(c.reps):
            if not _reps(r, started):
                break
            runs.append(await _fan_drive(raw, tally, c.fan_msgs, c.subs, c.fan_chunk))
        backend_only = median_runs(runs)
    finally:
        await lb.close()
    res = {"subs": c.subs, "msgs": c.fan_msgs, "bus": via_bus, "backend": backend_only}
    print_table(f"1. Corral local bus fan-out: 1 publisher -> {c.subs} subscriptions, at-most-once "
                f"({c.fan_msgs:,} msgs/run, median of {len(runs)})",
                ["path", "deliveries/s", "publishes/s"], [
        ["Bus.publish -> Bus.consume handler (whole path)", fmt(via_bus["per_s"], "/s"),
         fmt(via_bus["msgs_per_s"], "/s")],
        ["backend only: publish + fetch + ack", fmt(backend_only["per_s"], "/s"),
         fmt(backend_only["msgs_per_s"], "/s")],
    ])
    return res


# ================================================================== 2. latency


async def _corral_latency(c: BusCounts) -> dict[str, Any]:
    out: dict[str, Any] = {"subs": c.subs, "msgs": c.lat_msgs, "gap_ms": c.lat_gap_s * 1e3}
    for fan in (c.subs, 1):
        lb = await _LocalBus().open(fan, "lat.x")
        bus = lb.bus
        try:
            tally = Tally()

            async def handler(env: Any, tally: Tally = tally) -> None:
                tally.stamp(env.payload)

            lb.consume(handler, "lat.x")

            def pub(t: int, bus: Any = bus) -> Awaitable[Any]:
                return bus.publish(SENDER, "lat.x", t)

            await _lat_drive(pub, tally, max(20, c.lat_msgs // 10), fan, c.lat_gap_s)  # warm-up
            runs, started = [], now_ns()
            for r in range(c.reps):
                if not _reps(r, started):
                    break
                runs.append(await _lat_drive(pub, tally, c.lat_msgs, fan, c.lat_gap_s))
        finally:
            await lb.close()
        out[f"subs{fan}"] = median_runs(runs)
    _print_latency("Corral local bus, at-most-once: Bus.publish call -> handler", out, c)
    return out


def _print_latency(title: str, out: dict[str, Any], c: BusCounts) -> None:
    rows = []
    for key in (f"subs{c.subs}", "subs1"):
        if key not in out:
            continue
        s = out[key]
        n = key[4:]
        rows.append([f"{n} subscriber(s): every delivery", fmt(s["p50_us"], "us"),
                     fmt(s["p99_us"], "us"), fmt(s["msgs_per_s"], "msg/s")])
        if n != "1":
            rows.append([f"{n} subscribers: first handler", fmt(s["first_p50_us"], "us"), "", ""])
            rows.append([f"{n} subscribers: last handler", fmt(s["last_p50_us"], "us"),
                         fmt(s["last_p99_us"], "us"), ""])
    print_table(f"2. {title} ({c.lat_msgs} msgs one at a time, {c.lat_gap_s * 1e3:g} ms apart)",
                ["what", "p50", "p99", "rate"], rows)


# ================================================================== 3. durable local


async def _corral_durable(c: BusCounts) -> dict[str, Any]:
    lb = await _LocalBus().open(0, "dur.x")
    bus, backend = lb.bus, lb.backend
    out: dict[str, Any] = {"synchronous": "NORMAL", "path": str(backend.path)}
    rows = []
    try:
        async def once(n_pub: int, total: int, sub: str) -> dict[str, Any]:
            await (await backend.subscribe(sub, "dur.x")).close()  # one subscription: rows to commit
            each = max(1, total // n_pub)
            lat: list[int] = []
            before = backend.stats

            async def publisher() -> None:
                for i in range(each):
                    t0 = now_ns()
                    await bus.publish(SENDER, "dur.x", i, guarantee="at-least-once")
                    lat.append(now_ns() - t0)

            t0 = now_ns()
            await asyncio.gather(*(publisher() for _ in range(n_pub)))
            dt = now_ns() - t0
            after = backend.stats
            await backend.unsubscribe(sub)  # drops its rows, outside the timing
            n = each * n_pub
            commits = after["batches"] - before["batches"]
            s = latency_us(lat)
            return {"per_s": n / (dt / 1e9), "n": n, "p50_ms": s["p50_us"] / 1e3,
                    "p99_ms": s["p99_us"] / 1e3, "commits": commits,
                    "msgs_per_commit": n / commits if commits else 0.0}

        await once(10, 1_000, "warm")
        started = now_ns()
        for n_pub in c.durable_publishers:
            total = c.durable_msgs // 5 if n_pub == 1 else c.durable_msgs
            runs = []
            for r in range(c.reps):
                if not _reps(r, started):
                    break
                runs.append(await once(n_pub, total, f"d{n_pub}-{r}"))
            res = out[f"pub{n_pub}"] = median_runs(runs)
            rows.append([f"{n_pub} concurrent publisher(s)", fmt(res["per_s"], "msg/s"),
                         fmt(res["p50_ms"], "ms"), fmt(res["p99_ms"], "ms"),
                         fmt(res["msgs_per_commit"])])
    finally:
        await lb.close()
    print_table("3. Corral local bus, at-least-once Bus.publish (SQLite group commit inside publish)",
                ["publishers", "throughput", "publish p50", "publish p99", "msgs/commit"], rows)
    return out


# ================================================================== 4. NATS and Redis vs raw


class _Side:
    """One side of a remote comparison: (a) sequential, (b) pipelined publishes, (c) consume."""

    label = ""

    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def new_sub(self, r: int) -> None: ...
    async def drop_sub(self) -> None: ...
    async def publish(self) -> None: ...
    async def pipelined(self, n: int, width: int) -> None:
        each = max(1, n // width)

        async def caller() -> None:
            for _ in range(each):
                await self.publish()

        await asyncio.gather(*(caller() for _ in range(width)))

    async def consume(self, n: int, batch: int) -> int:
        """Consume and ack ``n`` messages; returns perf_counter_ns when the last one was handled."""
        raise NotImplementedError

    async def rep(self, r: int, c: BusCounts) -> dict[str, Any]:
        await self.new_sub(r)
        try:
            t0 = now_ns()
            for _ in range(c.remote_seq):
                await self.publish()
            t1 = now_ns()
            each = max(1, c.remote_pipe // c.remote_width)
            await self.pipelined(c.remote_pipe, c.remote_width)
            t2 = now_ns()
            total = c.remote_seq + each * c.remote_width
            t3 = await self.consume(total, c.remote_batch)
            extra = await self.extra(c)
        finally:
            await self.drop_sub()
        return {"seq_per_s": c.remote_seq / ((t1 - t0) / 1e9),
                "seq_us": (t1 - t0) / 1e3 / c.remote_seq,
                "pipe_per_s": each * c.remote_width / ((t2 - t1) / 1e9),
                "consume_per_s": total / ((t3 - t2) / 1e9), **extra}

    async def extra(self, c: BusCounts) -> dict[str, Any]:
        """Figures of this side only (not compared), after (c)."""
        return {}

    async def server(self) -> str:
        return ""


class _CorralSide(_Side):
    """Corral: Bus.publish(guarantee="at-least-once") and Bus.consume, on one backend."""

    def __init__(self, kind: str, url: str, prefix: str, data_probe: list[bytes]) -> None:
        self.kind, self.url, self.prefix = kind, url, prefix
        self.label = f"Corral Bus ({kind})"
        self._probe = data_probe

    async def open(self) -> None:
        from corral.bus.backends import open_backend
        from corral.bus.bus import Bus

        self._tmp = tempfile.TemporaryDirectory(prefix="corral-bus-bench-")
        self.backend: Any = open_backend(self.kind, home=Path(self._tmp.name), url=self.url,
                                         prefix=self.prefix)
        await self.backend.start()
        self.bus = Bus(self.backend)
        env = await self.bus.publish(SENDER, "r.x", 0, guarantee="at-least-once")
        from corral.bus.envelope import encode

        self._probe.append(encode(env))  # the raw side sends bytes of the same size

    async def close(self) -> None:
        try:
            await self.backend.purge()
        finally:
            try:
                await self.backend.aclose()
            finally:
                self._tmp.cleanup()

    async def new_sub(self, r: int) -> None:
        self.sub = f"s{r}"
        await (await self.backend.subscribe(self.sub, "r.x")).close()

    async def drop_sub(self) -> None:
        await self.backend.unsubscribe(self.sub)

    def publish(self) -> Awaitable[Any]:  # type: ignore[override]
        return self.bus.publish(SENDER, "r.x", 1, guarantee="at-least-once", sign=self.sign)

    sign = False

    async def extra(self, c: BusCounts) -> dict[str, Any]:
        # As the runtime runs on nats/redis (bus_sign defaults on): every message signed with
        # its sender's Ed25519 key, every delivery verified. Not compared: raw has no such step.
        from corral.bus.crypto import AgentKeys

        if self.bus.signer is None:
            self.bus.signer = AgentKeys(Path(self._tmp.name) / "keys")
        self.sign = True
        try:
            await self.new_sub(1000)
            t0 = now_ns()
            for _ in range(c.remote_seq):
                await self.publish()
            t1 = now_ns()
            t2 = await self.consume(c.remote_seq, c.remote_batch)
            await self.drop_sub()
        finally:
            self.sign = False
        return {"signed_seq_per_s": c.remote_seq / ((t1 - t0) / 1e9),
                "signed_consume_per_s": c.remote_seq / ((t2 - t1) / 1e9)}

    async def consume(self, n: int, batch: int) -> int:
        tally = Tally()

        async def handler(env: Any) -> None:
            tally.hit()

        task = asyncio.create_task(self.bus.consume(self.sub, "r.x", handler, batch=batch,
                                                    require_signature=self.sign))
        try:
            await tally.reach(n)
            return now_ns()
        finally:
            # Let the last ack go out before cancelling, outside the timing: a RedisBackend whose
            # settle leader is cancelled while it lingers never settles again (see bench/README.md).
            await asyncio.sleep(0.1)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


class _RawNats(_Side):
    """nats-py JetStream: js.publish (awaits the PubAck), pull_subscribe fetch + msg.ack()."""

    label = "raw nats-py JetStream"

    def __init__(self, url: str, prefix: str, data: list[bytes]) -> None:
        self.url = url
        self.stream = f"{prefix}raw"
        self.subject = f"{prefix}raw.x"
        self._data = data

    async def open(self) -> None:
        import msgspec
        import nats
        from nats.js.api import RetentionPolicy, StorageType

        self._decode = msgspec.msgpack.Decoder().decode
        self.nc = await nats.connect(self.url, name="bench-raw")
        self.js = self.nc.jetstream()
        # The same stream settings as NatsBackend's: file storage, interest retention.
        await self.js.add_stream(name=self.stream, subjects=[f"{self.stream}.>"],
                                 storage=StorageType.FILE, retention=RetentionPolicy.INTEREST)
        self.data = self._data[0]

    async def close(self) -> None:
        try:
            await self.js.delete_stream(self.stream)
        finally:
            await self.nc.close()

    async def new_sub(self, r: int) -> None:
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        self.durable = f"s{r}"
        self.psub = await self.js.pull_subscribe(
            self.subject, durable=self.durable, stream=self.stream,
            config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                                  deliver_policy=DeliverPolicy.NEW, max_ack_pending=-1))

    async def drop_sub(self) -> None:
        await self.psub.unsubscribe()
        await self.js.delete_consumer(self.stream, self.durable)

    def publish(self) -> Awaitable[Any]:  # type: ignore[override]
        return self.js.publish(self.subject, self.data)

    async def extra(self, c: BusCounts) -> dict[str, Any]:
        # nats-py's own pipelined API, for reference: batches of `width` publish_async, then
        # wait for their PubAcks (not consumed; dropped with the consumer).
        js, subject, data, width = self.js, self.subject, self.data, c.remote_width
        batches = max(1, c.remote_pipe // width)
        t0 = now_ns()
        for _ in range(batches):
            acks = [await js.publish_async(subject, data) for _ in range(width)]
            await asyncio.gather(*acks)
        return {"publish_async_per_s": batches * width / ((now_ns() - t0) / 1e9)}

    async def server(self) -> str:
        v = self.nc.connected_server_version
        return f"nats-server {v.major}.{v.minor}.{v.patch}"

    async def consume(self, n: int, batch: int) -> int:
        from nats.errors import TimeoutError as NatsTimeout

        got, decode = 0, self._decode
        deadline = now_ns() + STALL_S * 1e9
        while got < n:
            if now_ns() > deadline:
                raise RuntimeError(f"raw NATS consume stalled at {got} of {n}")
            try:
                msgs = await self.psub.fetch(batch, timeout=1.0)
            except NatsTimeout:
                continue
            for m in msgs:
                decode(m.data)
                got += 1
                await m.ack()
        return now_ns()


class _RawRedis(_Side):
    """redis-py: XADD one at a time / pipelines of XADD; XREADGROUP COUNT batch + one XACK."""

    label = "raw redis-py Streams"

    def __init__(self, url: str, prefix: str, data: list[bytes]) -> None:
        self.url = url
        self.prefix = f"{prefix}:raw"  # under the Corral prefix: RedisBackend.purge() covers it
        self._data = data

    async def open(self) -> None:
        import msgspec
        import redis.asyncio as aioredis

        self._decode = msgspec.msgpack.Decoder().decode
        self.r = aioredis.Redis.from_url(self.url)
        await self.r.ping()
        self.data = self._data[0]

    async def close(self) -> None:
        await self.r.aclose()

    async def new_sub(self, r: int) -> None:
        self.stream = f"{self.prefix}:s{r}"
        await self.r.xgroup_create(self.stream, "g", id="0", mkstream=True)

    async def drop_sub(self) -> None:
        await self.r.delete(self.stream)

    async def server(self) -> str:
        return f"redis-server {(await self.r.info('server'))['redis_version']}"

    def publish(self) -> Awaitable[Any]:  # type: ignore[override]
        return self.r.xadd(self.stream, {"d": self.data})

    async def pipelined(self, n: int, width: int) -> None:
        # redis-py's way to keep many commands in flight: one pipeline of `width` per round trip
        for _ in range(max(1, n // width)):
            async with self.r.pipeline(transaction=False) as p:
                for _ in range(width):
                    p.xadd(self.stream, {"d": self.data})
                await p.execute()

    async def consume(self, n: int, batch: int) -> int:
        got, decode = 0, self._decode
        deadline = now_ns() + STALL_S * 1e9
        while got < n:
            if now_ns() > deadline:
                raise RuntimeError(f"raw Redis consume stalled at {got} of {n}")
            reply = await self.r.xreadgroup("g", "c", {self.stream: ">"}, count=batch, block=100)
            if not reply:
                continue
            ids = []
            for eid, fields in reply[0][1]:
                decode(fields[b"d"])
                ids.append(eid)
                got += 1
            await self.r.xack(self.stream, "g", *ids)
        return now_ns()


async def _remote(kind: str, c: BusCounts) -> dict[str, Any]:
    url = NATS_URL if kind == "nats" else REDIS_URL
    prefix = _prefix()
    probe: list[bytes] = []
    corral = _CorralSide(kind, url, prefix, probe)
    raw: _Side = (_RawNats if kind == "nats" else _RawRedis)(url, prefix, probe)
    sides = (corral, raw)
    runs: dict[str, list[dict[str, Any]]] = {"corral": [], "raw": []}
    await corral.open()
    try:
        await raw.open()
        try:
            small = dataclasses.replace(c, remote_seq=100, remote_pipe=1_024)
            for s in sides:  # warm-up: connections, scripts, code paths
                await s.rep(99, small)
            started = now_ns()
            for r in range(c.reps):
                if not _reps(r, started):
                    break
                order = sides if r % 2 == 0 else sides[::-1]  # alternate who goes first
                for s in order:
                    runs["corral" if s is corral else "raw"].append(await s.rep(r, c))
            server = await raw.server()
        finally:
            await raw.close()
    finally:
        await corral.close()
    res: dict[str, Any] = {"server": server, "payload_bytes": len(probe[0]), "width": c.remote_width,
                           "batch": c.remote_batch, "corral": median_runs(runs["corral"]),
                           "raw": median_runs(runs["raw"])}
    rows = []
    for key, what in (("seq_per_s", "(a) publish, awaiting durability, one at a time"),
                      ("pipe_per_s", f"(b) publish, {c.remote_width} in flight"),
                      ("consume_per_s", f"(c) consume + ack, batches of {c.remote_batch}")):
        mine, theirs = res["corral"][key], res["raw"][key]
        ratio = mine / theirs if theirs else float("nan")
        res[key.replace("_per_s", "_ratio")] = ratio
        rows.append([what, fmt(mine, "msg/s"), fmt(theirs, "msg/s"), f"{ratio:.2f}"])
    for key, what in (("signed_seq_per_s", "(a) signed and verified, as the runtime runs it"),
                      ("signed_consume_per_s", "(c) signed and verified, as the runtime runs it")):
        if key in res["corral"]:
            mine, theirs = res["corral"][key], res["raw"][key.replace("signed_", "")]
            rows.append([what, fmt(mine, "msg/s"), fmt(theirs, "msg/s"),
                         f"{mine / theirs:.2f}" if theirs else ""])
    if "publish_async_per_s" in res["raw"]:
        rows.append([f"(b') for reference: js.publish_async, batches of {c.remote_width}", "",
                     fmt(res["raw"]["publish_async_per_s"], "msg/s"), ""])
    raw_how = ("js.publish / pull fetch + msg.ack()" if kind == "nats"
               else "XADD / pipeline of XADD / XREADGROUP + XACK")
    print_table(f"4. {kind.upper()} ({server}): Corral Bus (at-least-once) vs raw client "
                f"({raw_how}); {res['payload_bytes']}-byte messages, median of {len(runs['raw'])}",
                ["what", "Corral", "raw client", "Corral/raw"], rows)
    return res


# ================================================================== AutoGen peer


@dataclass
class Stamp:
    """AutoGen's benchmark message: perf_counter_ns at the publish call (or a counter)."""

    t: int


_SINK: Tally = Tally()
_AG: Any = None


def _autogen_class() -> Any:
    global _AG
    if _AG is None:
        from autogen_core import MessageContext, RoutedAgent, message_handler

        class Subscriber(RoutedAgent):
            def __init__(self) -> None:
                super().__init__("bus bench subscriber")

            @message_handler
            async def on_stamp(self, message: Stamp, ctx: MessageContext) -> None:
                _SINK.on(message.t)

        _AG = Subscriber
    return _AG


async def _autogen_runtime(n: int) -> Any:
    """A started runtime with ``n`` agent types, each subscribed to the default topic."""
    from autogen_core import SingleThreadedAgentRuntime, TypeSubscription

    cls = _autogen_class()
    rt = SingleThreadedAgentRuntime()
    for i in range(n):
        await cls.register(rt, f"sub{i}", cls)
        await rt.add_subscription(TypeSubscription(topic_type="default", agent_type=f"sub{i}"))
    rt.start()
    return rt


async def _autogen_fanout(c: BusCounts) -> dict[str, Any]:
    global _SINK
    from autogen_core import DefaultTopicId

    rt = await _autogen_runtime(c.subs)
    topic = DefaultTopicId()
    try:
        _SINK = tally = Tally()

        def pub(i: int) -> Awaitable[Any]:
            return rt.publish_message(Stamp(i), topic)

        await _fan_drive(pub, tally, max(20, c.fan_msgs_autogen // 10), c.subs, c.fan_chunk)
        runs, started = [], now_ns()
        for r in range(c.reps):
            if not _reps(r, started):
                break
            runs.append(await _fan_drive(pub, tally, c.fan_msgs_autogen, c.subs, c.fan_chunk))
    finally:
        await rt.stop()
    res = {"subs": c.subs, "msgs": c.fan_msgs_autogen, **median_runs(runs)}
    print_table(f"1. AutoGen core publish_message fan-out: 1 publisher -> {c.subs} subscribed "
                f"agents ({c.fan_msgs_autogen:,} msgs/run, median of {len(runs)})",
                ["path", "deliveries/s", "publishes/s"],
                [["publish_message(DefaultTopicId()) -> handler", fmt(res["per_s"], "/s"),
                  fmt(res["msgs_per_s"], "/s")]])
    return res


async def _autogen_latency(c: BusCounts) -> dict[str, Any]:
    global _SINK
    from autogen_core import DefaultTopicId

    out: dict[str, Any] = {"subs": c.subs, "msgs": c.lat_msgs, "gap_ms": c.lat_gap_s * 1e3}
    topic = DefaultTopicId()
    for fan in (c.subs, 1):
        rt = await _autogen_runtime(fan)
        try:
            _SINK = tally = Tally(record=True)

            def pub(t: int, rt: Any = rt) -> Awaitable[Any]:
                return rt.publish_message(Stamp(t), topic)

            await _lat_drive(pub, tally, max(20, c.lat_msgs // 10), fan, c.lat_gap_s)
            runs, started = [], now_ns()
            for r in range(c.reps):
                if not _reps(r, started):
                    break
                runs.append(await _lat_drive(pub, tally, c.lat_msgs, fan, c.lat_gap_s))
        finally:
            await rt.stop()
        out[f"subs{fan}"] = median_runs(runs)
    _print_latency("AutoGen core publish_message -> handler", out, c)
    return out


# ================================================================== entry points

_CORRAL = {
    "bus-fanout": _corral_fanout,
    "bus-latency": _corral_latency,
    "bus-durable": _corral_durable,
    "bus-nats": lambda c: _remote("nats", c),
    "bus-redis": lambda c: _remote("redis", c),
}
_AUTOGEN = {"bus-fanout": _autogen_fanout, "bus-latency": _autogen_latency}


def run_corral(name: str, quick: bool) -> dict[str, Any]:
    """Run Corral's bus benchmark ``name`` (and, for NATS/Redis, the raw client) in a fresh loop."""
    _corral_gc()
    return asyncio.run(_CORRAL[name](BusCounts.make(quick)))


def run_autogen(name: str, quick: bool) -> dict[str, Any]:
    """Run AutoGen's side of bus benchmark ``name`` ("bus-fanout", "bus-latency")."""
    return asyncio.run(_AUTOGEN[name](BusCounts.make(quick)))

