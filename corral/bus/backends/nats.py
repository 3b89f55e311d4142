"""NATS JetStream backend: one stream per prefix, one durable pull consumer per subscription.

Layout on the server, for ``prefix="corral"``:

* stream ``corral`` (file storage, *interest* retention) captures ``corral.>``; Corral subject
  ``news.eu`` is NATS subject ``corral.news.eu``, so ``*`` and ``>`` filters work natively.
  Interest retention drops a message once every subscription that matched it has settled it
  (``ack`` or ``term``), and drops at once a message no subscription matches, so the stream
  does not grow without bound. A prefix with dots is kept in subjects and sanitized for the
  stream name (see :func:`consumer_name`).
* subscription ``name`` is the durable pull consumer :func:`consumer_name(name)
  <consumer_name>`: deliver policy ``new``, explicit ack, ``ack_wait``, unlimited
  ``max_deliver`` (the bus decides what goes to the dead-letter queue) and unlimited
  ``max_ack_pending``. Every :class:`Subscription` object on one name shares the consumer,
  so their fetches compete.

Opening an existing subscription with another filter or ``ack_wait`` updates the consumer
(a new filter replaces the old, as in the local backend).

``publish(durable=True)`` is a JetStream publish that waits for the stream's PubAck: once it
returns, the message is in the stream's file store and survives a crash of this process or a
restart of nats-server (the server syncs its files to the disk on its own schedule,
``sync_interval``). PubAcks come to one inbox of the backend, so many publishes can be in
flight from concurrent tasks. ``durable=False`` sends the same message into the same stream
as a core NATS publish without waiting for the PubAck: subscriptions still receive it, but
it is lost if this process or its connection dies before the server has read it, and a
refusal by the stream is not reported.

``ack``/``nack``/``term`` are fire-and-forget, like every NATS client's: they are sent in
order on the connection (``aclose`` flushes them); one lost to a crash means the message is
delivered again, which at-least-once delivery allows.

NATS limits a message (payload plus headers) to the server's ``max_payload``, 1 MiB by
default; larger ones raise :class:`~corral.errors.BusError` before anything is sent. Header
values are stripped of surrounding whitespace by nats-py; names starting ``Nats-`` mean
something to JetStream (e.g. ``Nats-Msg-Id`` deduplicates).

nats-py is imported lazily (``import corral.bus.backends.nats`` works without it; ``start``
then raises BackendUnavailable naming ``pip install 'corral[nats]'``), and ``_NatsErrors``
is the one place that knows its exceptions.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Any

from corral.bus.backend import Incoming
from corral.errors import BackendUnavailable, BusError

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription as _NatsSub

__all__ = ["NatsBackend", "NatsIncoming", "NatsSubscription", "consumer_name"]

_log = logging.getLogger("corral.bus.nats")

_INSTALL_HINT = "pip install 'corral[nats]'"
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-")
_MAX_NAME = 128  # JetStream allows more, but names become directory names on the server
_NOT_FOUND = 404  # the "code" of a JetStream API error for a missing stream or consumer
_HEADER_OVERHEAD = len(b"NATS/1.0\r\n\r\n")


def consumer_name(name: str) -> str:
    """The JetStream consumer (or stream) name for a Corral subscription name.

    Letters, digits and ``-`` are kept; every other character becomes ``_XX`` per UTF-8 byte
    (``orders.eu`` -> ``orders_2Eeu``, ``_`` -> ``_5F``), so the mapping is injective and
    reversible. Names that would exceed 128 characters keep a readable head and end in
    ``__`` and a SHA-256 digest; ``__`` never occurs in the short form, so the two cannot
    collide.
    """
    if not name:
        raise BusError("a subscription name must not be empty", hint="pass a name like 'billing'")
    out = "".join(
        c if c in _SAFE else "".join(f"_{b:02X}" for b in c.encode()) for c in name
    )
    if len(out) > _MAX_NAME:
        digest = hashlib.sha256(name.encode()).hexdigest()[:24]
        out = f"{out[:_MAX_NAME - 26]}__{digest}"
    return out


def _check_subject(subject: str, *, wildcards: bool) -> None:
    """Raise BusError unless ``subject`` is dot-separated non-empty tokens (NATS rules)."""
    tokens = subject.split(".")
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        bad = not token or any(c.isspace() or c in "\x00" for c in token)
        if not bad and ("*" in token or ">" in token):
            bad = not wildcards or not (token == "*" or (token == ">" and i == last))
        if bad:
            what = "filter" if wildcards else "subject"
            rule = ("'*' as a whole token or '>' as the last token" if wildcards
                    else "no wildcards")
            raise BusError(f"invalid {what} {subject!r}",
                           hint=f"use dot-separated tokens without spaces, {rule}")


def _num_delivered(reply: str) -> int:
    """The delivery count from a JetStream ack subject (v1 and v2 token layouts)."""
    tokens = reply.split(".")
    # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
    # $JS.ACK.<domain>.<account>.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>.<rnd>
    return int(tokens[4] if len(tokens) == 9 else tokens[6])


class NatsIncoming:
    """One delivery of one message to a subscription."""

    __slots__ = ("_backend", "_reply", "data", "delivered", "headers", "subject")

    def __init__(self, backend: NatsBackend, msg: Msg) -> None:
        self._backend = backend
        self._reply = msg.reply
        self.subject = msg.subject[backend._strip:]
        self.data = msg.data
        self.headers: dict[str, str] = msg.headers or {}
        self.delivered = _num_delivered(msg.reply)

    def __repr__(self) -> str:
        return f"<NatsIncoming {self.subject!r} delivered={self.delivered} {len(self.data)}B>"

    async def ack(self) -> None:
        """Settle the message: it is never delivered again."""
        await self._backend._settle(self._reply, b"+ACK")

    async def nack(self, delay: float = 0.0) -> None:
        """Give the message back: it is delivered again after ``delay`` seconds."""
        if delay > 0:
            await self._backend._settle(self._reply, b'-NAK {"delay": %d}' % int(delay * 1e9))
        else:
            await self._backend._settle(self._reply, b"-NAK")

    async def term(self) -> None:
        """Drop the message for good (JetStream ``+TERM``)."""
        await self._backend._settle(self._reply, b"+TERM")


class NatsSubscription:
    """A handle on the durable consumer of one subscription; its fetches are pull requests.

    One pull request is in flight per handle: ``{"batch": n, "no_wait": true, "expires": t}``
    returns at once with what is available, else waits up to ``t`` for the first message
    and then returns what is available. Each request has its own reply subject, so the
    status that ends an expired request is never taken for the end of a later one; a message
    that arrives after its request's ``fetch`` gave up is kept for the next ``fetch`` (and
    handed back with ``nack`` on ``close``).
    """

    def __init__(self, backend: NatsBackend, name: str, filter: str, consumer: str) -> None:
        self.name = name
        self.filter = filter
        self.consumer = consumer
        self._backend = backend
        self._next = f"$JS.API.CONSUMER.MSG.NEXT.{backend.stream}.{consumer}"
        self._inbox = ""
        self._sub: _NatsSub | None = None
        self._ready: deque[Msg] = deque()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._pulls = 0
        self._current = ""  # reply subject of the pull request in flight
        self._want = 0  # wake the fetcher once this many messages are ready
        self._status: tuple[str, str] | None = None  # (code, description) ending _current

    async def _open(self, nc: Client) -> None:
        self._inbox = nc.new_inbox()
        with self._backend._errors("opening subscription %r", self.name):
            self._sub = await nc.subscribe(f"{self._inbox}.*", cb=self._on_msg)

    async def _on_msg(self, msg: Msg) -> None:
        if msg.reply.startswith("$JS.ACK."):
            self._ready.append(msg)
            if len(self._ready) >= self._want:
                self._wake.set()
        elif msg.subject == self._current:  # the status that ends the pull in flight
            headers = msg.headers or {}
            self._status = (headers.get("Status", ""), headers.get("Description", ""))
            self._wake.set()
        # else: the end of a pull request fetch() already gave up on

    async def fetch(self, max_messages: int = 100, timeout: float = 1.0) -> list[Incoming]:
        """Up to ``max_messages`` deliveries; waits up to ``timeout`` for the first, else []."""
        if self._sub is None:
            raise BusError(f"subscription {self.name!r} is closed",
                           hint="open it again with backend.subscribe(name, filter)")
        if max_messages < 1:
            return []
        async with self._lock:
            if not self._ready:
                await self._pull(max_messages, timeout)
            ready, backend = self._ready, self._backend
            return [NatsIncoming(backend, ready.popleft())
                    for _ in range(min(max_messages, len(ready)))]

    async def _pull(self, batch: int, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(timeout, 0.0)
        nc = self._backend._nc_or_raise()
        while True:
            self._pulls += 1
            self._current = f"{self._inbox}.{self._pulls}"
            self._status, self._want = None, batch
            self._wake.clear()
            remaining = deadline - loop.time()
            request: dict[str, Any] = {"batch": batch, "no_wait": True}
            if remaining > 0.02:
                # The server ends the request just before fetch() stops waiting for it.
                request["expires"] = int((remaining - 0.01) * 1e9)
                wait_until = deadline
            else:  # a poll: the server answers at once
                wait_until = loop.time() + self._backend.request_timeout
            with self._backend._errors("fetching from subscription %r", self.name):
                await nc.publish(self._next, json.dumps(request).encode(), reply=self._current)
            while self._status is None and len(self._ready) < batch:
                left = wait_until - loop.time()
                if left <= 0:
                    break
                try:
                    async with asyncio.timeout(left):
                        await self._wake.wait()
                except TimeoutError:
                    break
                self._wake.clear()
            status, self._current, self._want = self._status, "", 0
            if self._ready or status is None:
                return
            code, description = status
            if code == "409" and "deleted" in description.lower():
                raise BusError(f"subscription {self.name!r} was deleted while fetching",
                               hint="open it again with backend.subscribe(name, filter)")
            if code == "503":
                raise BackendUnavailable(
                    f"JetStream at {self._backend.url} did not answer a fetch from "
                    f"subscription {self.name!r}",
                    hint="start NATS with JetStream enabled (nats-server -js) "
                         "(shared/services.sh)")
            if code == "400":
                raise BusError(f"JetStream refused a fetch from subscription {self.name!r}: "
                               f"{description}", hint="this is a bug in Corral; please report it")
            left = deadline - loop.time()
            if code in ("404", "408") or left <= 0.02:
                return
            # e.g. 409 "Exceeded MaxWaiting" or a leadership change: try again shortly
            _log.debug("pull on %s ended with %s %s; retrying", self.consumer, code, description)
            await asyncio.sleep(min(0.05, left))

    async def close(self) -> None:
        """Stop fetching; the subscription and its pending messages remain.

        Messages that arrived for this handle but were never fetched are handed back
        (``nack``) so that they are delivered again at once rather than after ``ack_wait``.
        """
        sub, self._sub = self._sub, None
        if sub is None:
            return
        self._backend._open_subs.discard(self)
        leftovers, self._ready = self._ready, deque()
        nc = self._backend._nc
        if nc is None or nc.is_closed:
            return
        with self._backend._errors("closing subscription %r", self.name):
            await sub.unsubscribe()
            for msg in leftovers:
                await nc.publish(msg.reply, b"-NAK")


class NatsBackend:
    """Corral's bus on NATS JetStream (see the module docstring for the layout)."""

    name = "nats"

    def __init__(self, url: str = "nats://127.0.0.1:4222", prefix: str = "corral", *,
                 connect_timeout: float = 2.0, request_timeout: float = 5.0) -> None:
        _check_subject(prefix, wildcards=False)
        self.url = url
        self.prefix = prefix
        self.stream = consumer_name(prefix)
        self.connect_timeout = connect_timeout
        self.request_timeout = request_timeout
        self._strip = len(prefix) + 1
        self._nc: Client | None = None
        self._subjects: dict[str, str] = {}
        self._open_subs: set[NatsSubscription] = set()
        self._max_payload = 1024 * 1024
        self._last_error: Exception | None = None
        self._ack_prefix = ""
        self._ack_seq = 0
        self._acks: dict[str, asyncio.Future[Msg]] = {}

    def __repr__(self) -> str:
        state = "connected" if self._nc is not None and self._nc.is_connected else "closed"
        return f"<NatsBackend {self.url} prefix={self.prefix!r} {state}>"

    # -- errors: the one place that knows nats-py's exceptions -----------------------------

    def _errors(self, doing: str, *args: object) -> _NatsErrors:
        """The context manager mapping nats-py's exceptions; ``doing % args`` names the step."""
        return _NatsErrors(self, doing, args)

    async def _api(self, op: str, body: dict[str, Any] | None = None, *, doing: str,
                   missing_ok: bool = False) -> dict[str, Any]:
        """One JetStream API request; a refusal raises BusError (or returns, if missing_ok
        and the thing was not found)."""
        nc = self._nc_or_raise()
        payload = json.dumps(body).encode() if body is not None else b""
        with self._errors(doing):
            msg = await nc.request(f"$JS.API.{op}", payload, timeout=self.request_timeout)
        resp: dict[str, Any] = json.loads(msg.data)
        error = resp.get("error")
        if error:
            if missing_ok and error.get("code") == _NOT_FOUND:
                return resp
            raise BusError(
                f"JetStream refused {doing}: {error.get('description')} "
                f"(err_code {error.get('err_code')})",
                hint="see the NATS server log; the stream is "
                     f"{self.stream!r} on subjects '{self.prefix}.>'",
            )
        return resp

    def _nc_or_raise(self) -> Client:
        if self._nc is None:
            raise BusError("the NATS backend is not started", hint="await backend.start() first")
        return self._nc

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect and make sure the prefix's stream exists."""
        if self._nc is not None:
            return
        try:
            from nats.aio.client import Client
        except ImportError as exc:
            raise BackendUnavailable("the NATS backend needs nats-py, which is not installed",
                                     hint=_INSTALL_HINT) from exc

        nc = Client()
        self._last_error = None
        with self._errors("connecting to %s", self.url):
            try:
                # nats-py retries a refused first connection for a long time: bound it.
                async with asyncio.timeout(self.connect_timeout):
                    await nc.connect(
                        servers=[self.url], name="corral",
                        connect_timeout=max(1, math.ceil(self.connect_timeout)),
                        error_cb=self._on_error, disconnected_cb=self._on_disconnected,
                        reconnected_cb=self._on_reconnected,
                    )
            except TimeoutError as exc:
                await _close_quietly(nc)
                last = self._last_error
                why = f" (last error: {type(last).__name__}: {last})" if last else ""
                raise BackendUnavailable(
                    f"NATS at {self.url} did not accept a connection within "
                    f"{self.connect_timeout}s{why}",
                    hint=f"start NATS with JetStream at {self.url} (shared/services.sh)",
                ) from (last or exc)
            except BaseException:
                await _close_quietly(nc)
                raise
        self._nc = nc
        self._max_payload = nc.max_payload
        try:
            self._ack_prefix = nc.new_inbox() + "."
            with self._errors("connecting to %s", self.url):
                await nc.subscribe(self._ack_prefix + "*", cb=self._on_puback)
            await self._ensure_stream()
        except BaseException:
            self._nc = None
            await _close_quietly(nc)
            raise

    async def _ensure_stream(self) -> None:
        subjects = f"{self.prefix}.>"
        config = {"name": self.stream, "subjects": [subjects], "storage": "file",
                  "retention": "interest", "discard": "old", "num_replicas": 1}
        doing = f"creating stream {self.stream!r}"
        with self._errors(doing):
            msg = await self._nc_or_raise().request(
                f"$JS.API.STREAM.CREATE.{self.stream}", json.dumps(config).encode(),
                timeout=self.request_timeout)
        resp: dict[str, Any] = json.loads(msg.data)
        if "error" not in resp:
            return
        # It exists already (perhaps created with other settings): fine if it has our subjects.
        info = await self._api(f"STREAM.INFO.{self.stream}", doing=doing, missing_ok=True)
        if subjects in info.get("config", {}).get("subjects", []):
            return
        error = resp["error"]
        raise BusError(
            f"JetStream refused {doing} on '{subjects}': {error.get('description')}",
            hint="another stream may already capture these subjects: use another prefix, "
                 "or delete that stream",
        )

    async def aclose(self) -> None:
        """Hand back unfetched messages, let publishes in flight get their PubAck, flush
        acks and close; durable state remains."""
        nc = self._nc
        if nc is None:
            return
        for sub in list(self._open_subs):
            try:
                await sub.close()
            except BusError as exc:
                _log.debug("closing %s: %s", sub.name, exc)
        if self._acks:
            await asyncio.wait(list(self._acks.values()), timeout=self.request_timeout)
        self._nc = None
        try:
            with self._errors("closing the connection"):
                await nc.drain()
        except BusError as exc:
            _log.debug("drain failed (%s); closing", exc)
            await _close_quietly(nc)

    async def purge(self) -> None:
        """Delete the prefix's stream with every message and subscription in it (tests)."""
        await self._api(f"STREAM.DELETE.{self.stream}", doing=f"deleting stream {self.stream!r}",
                        missing_ok=True)

    # -- messages ---------------------------------------------------------------------------

    def _subject(self, subject: str, *, wildcards: bool = False) -> str:
        mapped = self._subjects.get(subject) if not wildcards else None
        if mapped is None:
            _check_subject(subject, wildcards=wildcards)
            mapped = f"{self.prefix}.{subject}"
            if not wildcards:
                if len(self._subjects) > 4096:
                    self._subjects.clear()
                self._subjects[subject] = mapped
        return mapped

    async def publish(self, subject: str, data: bytes, headers: dict[str, str] | None = None,
                      *, durable: bool = True) -> None:
        """Append one message to ``subject``; durable ones are stored once this returns."""
        nc = self._nc_or_raise()
        nats_subject = self._subjects.get(subject) or self._subject(subject)
        if headers:
            size = len(data) + _HEADER_OVERHEAD + sum(
                len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())
        else:
            headers, size = None, len(data)
        if size > self._max_payload:
            raise BusError(
                f"message to {subject!r} is {size} bytes with headers; NATS takes at most "
                f"{self._max_payload}",
                hint="send large payloads by reference, or raise max_payload on the server",
            )
        if not durable:
            with self._errors("publishing to %r", subject):
                await nc.publish(nats_subject, data, headers=headers)
            return
        # A JetStream publish is a request whose reply is the PubAck. Ours come to one inbox
        # of this backend, keyed by a counter: cheaper than nats-py's request() (a random
        # token and an asyncio.wait_for per message), which doubles pipelined throughput.
        self._ack_seq += 1
        token = str(self._ack_seq)
        loop = asyncio.get_running_loop()
        ack: asyncio.Future[Msg] = loop.create_future()
        self._acks[token] = ack
        timer = loop.call_later(self.request_timeout, _expire, ack)
        try:
            with self._errors("publishing to %r", subject):
                await nc.publish(nats_subject, data, reply=self._ack_prefix + token,
                                 headers=headers)
            msg = await ack
        finally:
            timer.cancel()
            self._acks.pop(token, None)
        if msg is _TIMED_OUT:
            raise BusError(
                f"JetStream at {self.url} did not acknowledge the message to {subject!r} within "
                f"{self.request_timeout}s; it may or may not be stored",
                hint="the server may be overloaded or reconnecting; check its log",
            )
        if not msg.data:  # a status: 503 "no responders"
            raise BackendUnavailable(
                f"JetStream at {self.url} did not answer while publishing to {subject!r}",
                hint=f"start NATS with JetStream enabled (nats-server -js) at {self.url} "
                     f"(shared/services.sh); if it is, stream {self.stream!r} may have been "
                     "deleted: start the backend again",
            )
        if b'"error"' in msg.data and (error := json.loads(msg.data).get("error")):
            raise BusError(
                f"JetStream refused the message to {subject!r}: {error.get('description')}",
                hint=f"check the limits of stream {self.stream!r}",
            )

    async def _on_puback(self, msg: Msg) -> None:
        ack = self._acks.get(msg.subject[len(self._ack_prefix):])
        if ack is not None and not ack.done():
            ack.set_result(msg)

    async def _settle(self, reply: str, verb: bytes) -> None:
        nc = self._nc_or_raise()
        with self._errors("settling a message"):
            await nc.publish(reply, verb)

    # -- subscriptions ----------------------------------------------------------------------

    async def subscribe(self, name: str, filter: str, *,
                        ack_wait: float = 30.0) -> NatsSubscription:
        """Open (create or resume) the durable subscription ``name``; a new filter or
        ``ack_wait`` updates the consumer (as the local backend does)."""
        nc = self._nc_or_raise()
        if not name or not isinstance(name, str):
            raise BusError(f"invalid subscription name {name!r}", hint="use a non-empty string")
        if not ack_wait > 0:
            raise ValueError(f"ack_wait must be positive, got {ack_wait}")
        consumer = consumer_name(name)
        filter_subject = self._subject(filter, wildcards=True)
        doing = f"opening subscription {name!r}"
        config = {"durable_name": consumer, "filter_subject": filter_subject,
                  "deliver_policy": "new", "ack_policy": "explicit",
                  "ack_wait": int(ack_wait * 1e9), "max_deliver": -1, "max_ack_pending": -1,
                  "replay_policy": "instant"}
        info = await self._api(f"CONSUMER.INFO.{self.stream}.{consumer}", doing=doing,
                               missing_ok=True)
        existing: dict[str, Any] = {} if "error" in info else info.get("config", {})
        if (existing.get("filter_subject") != filter_subject
                or existing.get("ack_wait") != config["ack_wait"]):
            # Create, or update the editable fields of the existing consumer.
            await self._api(f"CONSUMER.DURABLE.CREATE.{self.stream}.{consumer}",
                            {"stream_name": self.stream, "config": config}, doing=doing)
        sub = NatsSubscription(self, name, filter, consumer)
        await sub._open(nc)
        self._open_subs.add(sub)
        return sub

    async def unsubscribe(self, name: str) -> None:
        """Delete the subscription ``name`` and its pending messages."""
        consumer = consumer_name(name)
        for sub in [s for s in self._open_subs if s.consumer == consumer]:
            await sub.close()
        await self._api(f"CONSUMER.DELETE.{self.stream}.{consumer}",
                        doing=f"deleting subscription {name!r}", missing_ok=True)

    # -- connection callbacks ---------------------------------------------------------------

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        level = logging.WARNING if self._nc is not None else logging.DEBUG
        _log.log(level, "NATS at %s: %s %s", self.url, type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        if self._nc is not None:
            _log.warning("disconnected from NATS at %s; reconnecting", self.url)

    async def _on_reconnected(self) -> None:
        _log.info("reconnected to NATS at %s", self.url)


class _NatsErrors:
    """The one place that knows nats-py's exceptions.

    Those raised inside the ``with`` block become BackendUnavailable (the server or JetStream
    cannot be reached) or BusError (anything else), raised ``from`` the original. A class,
    not a contextlib generator, because it wraps every publish and ack: entering costs one
    small object, and nats-py's exceptions are imported and ``doing`` formatted only on error.
    """

    __slots__ = ("_args", "_backend", "_doing")

    def __init__(self, backend: NatsBackend, doing: str, args: tuple[object, ...]) -> None:
        self._backend = backend
        self._doing = doing
        self._args = args

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if isinstance(exc, Exception) and not isinstance(exc, BusError):
            mapped = self._map(exc)
            if mapped is not None:
                raise mapped from exc

    def _map(self, exc: Exception) -> BusError | None:
        from nats import errors as ne

        b = self._backend
        doing = self._doing % self._args if self._args else self._doing
        if isinstance(exc, ne.NoRespondersError):
            return BackendUnavailable(
                f"JetStream at {b.url} did not answer while {doing}",
                hint=f"start NATS with JetStream enabled (nats-server -js) at {b.url} "
                     f"(shared/services.sh); if it is, stream {b.stream!r} may have been "
                     "deleted: start the backend again",
            )
        if isinstance(exc, ne.MaxPayloadError):
            return BusError(
                f"message too large while {doing}: NATS takes at most {b._max_payload} bytes",
                hint="send large payloads by reference, or raise max_payload on the server",
            )
        if isinstance(exc, ne.TimeoutError):
            return BusError(
                f"NATS at {b.url} did not answer within {b.request_timeout}s while {doing}",
                hint="the server may be overloaded; check its log",
            )
        if isinstance(exc, (ne.NoServersError, ne.ConnectionClosedError,
                            ne.StaleConnectionError, ne.ConnectionReconnectingError,
                            ne.ConnectionDrainingError, ne.OutboundBufferLimitError,
                            ne.AuthorizationError, OSError)):
            return BackendUnavailable(
                f"NATS at {b.url} is unreachable while {doing} ({type(exc).__name__})",
                hint=f"start NATS with JetStream at {b.url} (shared/services.sh)",
            )
        if isinstance(exc, (ne.BadSubjectError, ne.BadHeaderError)):
            return BusError(f"NATS refused the message while {doing}: {exc!r}",
                            hint="header names are letters, digits and '-'")
        if isinstance(exc, ne.Error):
            return BusError(f"NATS failed while {doing}: {type(exc).__name__} {exc}")
        return None


_TIMED_OUT: Any = object()


def _expire(ack: asyncio.Future[Any]) -> None:
    if not ack.done():
        ack.set_result(_TIMED_OUT)


async def _close_quietly(nc: Client) -> None:
    try:
        await nc.close()
    except Exception as exc:  # closing a half-open connection: nothing more to do
        _log.debug("closing NATS connection: %s", exc)
