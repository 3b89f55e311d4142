"""The control socket: JSON lines on a Unix socket, one op per request, the CLI's way in.

Each request is one line ``{"id": 1, "op": "apply", "args": {...}}``; each answer is one
line ``{"id": 1, "ok": true, "result": ...}`` or ``{"id": 1, "ok": false, "error": {...}}``
(``CorralError.to_dict()``). ``logs`` with ``follow`` also sends ``{"id": 1, "stream": {...}}``
lines before its answer. The socket lives in CORRAL_HOME (mode 0700) with mode 0600: only
the user who runs the runtime can talk to it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from pydantic import ValidationError

from corral.errors import AgentUnavailable, ControlError, CorralError, SpecError
from corral.spec.loader import KINDS
from corral.spec.models import AgentManifest
from corral.store.records import LogRecord

if TYPE_CHECKING:
    from corral.runtime.dlq import DeadLetters
    from corral.runtime.runtime import Runtime

__all__ = ["MAX_LINE", "ControlServer", "internal_error"]

log = logging.getLogger("corral.control")

#: Request lines longer than this are refused (and the connection closed).
MAX_LINE = 16 * 1024 * 1024
_SENT = object()  # a handler's result meaning "the answer has been sent already"
_FOLLOW_BUFFER = 1000  # log lines waiting to go out to one follower
_PROBE_TIMEOUT = 1.0  # how long to wait for an answer on an existing socket


def internal_error(exc: BaseException) -> dict[str, Any]:
    """The wire form of an unexpected (non-Corral) exception."""
    return {"type": "InternalError", "message": f"{type(exc).__name__}: {exc}",
            "hint": "this is a bug in Corral; the runtime's log has the traceback", "agent": None}


# -- requests --------------------------------------------------------------------------------


class _Envelope(msgspec.Struct):
    op: str
    id: int | str | None = None
    args: dict[str, Any] = {}


class _NoArgs(msgspec.Struct):
    pass


class _Name(msgspec.Struct):
    name: str


class _ManifestIn(msgspec.Struct):
    manifest: dict[str, Any]
    base_dir: str
    source: str = ""


class _Apply(msgspec.Struct):
    manifests: list[_ManifestIn]
    wait: bool = False
    timeout: float | None = None


class _RequestArgs(msgspec.Struct):
    name: str
    payload: Any = None
    handler: str = ""
    timeout: float | None = None
    priority: str | None = None


class _Send(msgspec.Struct):
    name: str
    payload: Any = None
    handler: str = ""
    priority: str | None = None


class _Publish(msgspec.Struct):
    subject: str
    payload: Any = None
    guarantee: str = "at-most-once"
    ttl: float | None = None
    idempotency_key: str | None = None


class _Broadcast(msgspec.Struct):
    payload: Any = None
    handler: str = ""
    namespace: str | None = None
    selector: str = ""


class _Nothing(msgspec.Struct):
    pass


class _Trust(msgspec.Struct):
    keys: Any


class _PolicyEval(msgspec.Struct):
    principal: str
    action: str
    resource: str
    context: dict[str, Any] = {}


class _AuditQuery(msgspec.Struct):
    agent: str | None = None
    action: str | None = None
    since: float | None = None
    until: float | None = None
    outcome: str | None = None
    limit: int = 100


class _AuditVerify(msgspec.Struct):
    anchor: str | None = None


class _Path(msgspec.Struct):
    path: str


class _Task(msgspec.Struct):
    id: str


class _Scale(msgspec.Struct):
    name: str
    replicas: int


class _Delete(msgspec.Struct):
    name: str
    purge: bool = False


class _Logs(msgspec.Struct):
    name: str
    after: int = 0
    limit: int = 1000
    tail: int | None = None
    follow: bool = False


class _DlqLs(msgspec.Struct):
    subscription: str | None = None
    limit: int = 100
    after: int = 0


class _DlqShow(msgspec.Struct):
    seq: int


class _DlqReplay(msgspec.Struct):
    seqs: list[int] = []
    subscription: str | None = None
    all: bool = False


class _DlqPurge(msgspec.Struct):
    subscription: str | None = None


_decode_request = msgspec.json.Decoder(_Envelope).decode


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    # msgspec's enc_hook contract: this exception type means "unsupported type".
    raise NotImplementedError(f"can't encode {type(obj).__name__}")


_encode = msgspec.json.Encoder(enc_hook=_enc_hook).encode


# -- one connection --------------------------------------------------------------------------


class _Conn:
    """One client: answers go out as lines; a dead client makes writes no-ops."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.gone = False

    async def send(self, msg: dict[str, Any]) -> None:
        """Write one line (encoding errors raise; a vanished client does not)."""
        data = _encode(msg) + b"\n"
        if self.gone:
            return
        try:
            self.writer.write(data)
            await self.writer.drain()
        except (ConnectionError, OSError):
            self.gone = True

    async def until_closed(self) -> None:
        """Return when the client hangs up (anything it sends meanwhile is ignored)."""
        while not self.gone:
            try:
                if not await self.reader.read(65536):
                    break
            except (ConnectionError, OSError):
                break
        self.gone = True


async def _race(*coros: Coroutine[Any, Any, None]) -> None:
    """Run ``coros`` until the first one returns, then cancel the others."""
    async with asyncio.TaskGroup() as tg:
        tasks = [tg.create_task(c) for c in coros]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()


def _manifest(m: _ManifestIn) -> Any:
    if not os.path.isabs(m.base_dir):
        raise SpecError("base_dir must be absolute (the runtime has its own working folder)",
                        file=m.source or None, path="base_dir", got=m.base_dir,
                        expected="an absolute path")
    try:
        model = KINDS.get(str(m.manifest.get("kind")), AgentManifest)
        return model.from_dict(m.manifest).with_origin(m.source, m.base_dir)
    except ValidationError as exc:
        problems = [SpecError(e["msg"], file=m.source or None,
                              path=".".join(str(p) for p in e["loc"]) or None)
                    for e in exc.errors(include_url=False)]
        raise SpecError("invalid manifest", problems=problems) from None


# -- the server ------------------------------------------------------------------------------


Handler = Callable[["ControlServer", Any, _Conn, Any], Awaitable[Any]]


class ControlServer:
    """Serves the control socket of one runtime; ``serve()`` runs until cancelled."""

    def __init__(self, runtime: Runtime, path: str | Path | None = None) -> None:
        self.rt = runtime
        self.path = Path(path) if path is not None else runtime.config.socket_path
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._streams = 0  # live `logs --follow` streams
        self._no_streams = asyncio.Event()
        self._no_streams.set()

    # ------------------------------------------------------------ socket

    def bind(self) -> None:
        """Create the socket (0600, in a 0700 folder); refuse if another runtime answers."""
        if self._sock is not None:
            return
        home = self.path.parent
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(home, 0o700)
        self._clear_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise self._busy() from None
            raise ControlError(f"can't create the control socket {self.path}: {exc.strerror or exc}",
                               hint="use a shorter or writable CORRAL_HOME (--home)") from exc
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)
        sock.listen(128)
        sock.setblocking(False)
        self._sock, self._inode = sock, os.stat(self.path).st_ino

    def _busy(self) -> ControlError:
        return ControlError(f"another runtime is already serving CORRAL_HOME={self.path.parent}",
                            hint="stop it first (Ctrl-C in its terminal), or use another --home")

    def _clear_stale(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ControlError(f"{self.path} exists and is not a socket",
                               hint="move it away; Corral keeps its control socket there")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(_PROBE_TIMEOUT)
        try:
            probe.connect(str(self.path))
        except (ConnectionRefusedError, FileNotFoundError):
            log.info("removing stale control socket %s", self.path)
            self.path.unlink(missing_ok=True)
            return
        except OSError:
            pass  # it answered in some way: someone is there
        finally:
            probe.close()
        raise self._busy()

    def close(self) -> None:
        """Close the listening socket and remove its file (if it is still ours)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        try:
            if os.stat(self.path).st_ino == self._inode:
                self.path.unlink()
        except FileNotFoundError:
            pass

    async def drain(self, timeout: float) -> None:
        """Wait (at most ``timeout``) until follow streams have sent their last line."""
        try:
            async with asyncio.timeout(timeout):
                await self._no_streams.wait()
        except TimeoutError:
            log.warning("%d log follower(s) still streaming; closing them", self._streams)

    async def serve(self, *, ready: asyncio.Event | None = None) -> None:
        """Accept clients until cancelled; each connection is a task of this server's group."""
        self.bind()
        sock = self._sock
        assert sock is not None
        loop = asyncio.get_running_loop()
        log.info("control socket at %s", self.path)
        try:
            async with asyncio.TaskGroup() as tg:
                if ready is not None:
                    ready.set()
                while True:
                    conn, _ = await loop.sock_accept(sock)
                    tg.create_task(self._connection(conn))
        finally:
            self.close()

    # ------------------------------------------------------------ connections

    async def _connection(self, sock: socket.socket) -> None:
        reader, writer = await asyncio.open_connection(sock=sock, limit=MAX_LINE)
        conn = _Conn(reader, writer)
        try:
            while not conn.gone:
                try:
                    line = await reader.readline()
                except ValueError:  # the limit: no newline within MAX_LINE bytes
                    await conn.send({"id": None, "ok": False, "error": ControlError(
                        f"request line is over {MAX_LINE // (1024 * 1024)} MiB; refused",
                        hint="send smaller payloads (put big data in files and pass paths)",
                    ).to_dict()})
                    return
                except (ConnectionError, OSError):
                    return
                if not line:
                    return
                if line.strip():
                    await self._handle(conn, line)
        finally:
            writer.close()

    async def _handle(self, conn: _Conn, line: bytes) -> None:
        rid: Any = None
        try:
            try:
                req = _decode_request(line)
            except msgspec.DecodeError as exc:  # includes ValidationError
                raise ControlError(f"bad request: {exc}",
                                   hint='send one JSON object per line: {"id": 1, "op": "ping"}'
                                   ) from None
            rid = req.id
            entry = _OPS.get(req.op)
            if entry is None:
                raise ControlError(f"unknown op {req.op!r}", hint=f"one of: {', '.join(_OPS)}")
            kind, handler = entry
            try:
                args = msgspec.convert(req.args, kind)
            except msgspec.ValidationError as exc:
                raise ControlError(f"bad arguments for {req.op!r}: {exc}") from None
            result = await handler(self, args, conn, rid)
            if result is not _SENT:
                await conn.send({"id": rid, "ok": True, "result": result})
        except CorralError as exc:
            await conn.send({"id": rid, "ok": False, "error": exc.to_dict()})
        except Exception as exc:
            log.exception("control request failed: %.200r", line)
            await conn.send({"id": rid, "ok": False, "error": internal_error(exc)})

    # ------------------------------------------------------------ ops

    async def _ping(self, a: _NoArgs, conn: _Conn, rid: Any) -> Any:
        return {"pong": True, "pid": os.getpid(), "home": str(self.rt.config.home)}

    async def _apply(self, a: _Apply, conn: _Conn, rid: Any) -> Any:
        manifests = [_manifest(m) for m in a.manifests]
        try:
            return await self.rt.apply(manifests, wait=a.wait, timeout=a.timeout)
        except TimeoutError:
            raise AgentUnavailable(
                f"applied, but not every agent was ready within {a.timeout:g}s",
                hint="see `corral get agents` and `corral logs NAME`") from None

    async def _get(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        return self.rt.get(a.name)

    async def _list(self, a: _NoArgs, conn: _Conn, rid: Any) -> Any:
        return self.rt.list()

    async def _describe(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        return await self.rt.describe(a.name)

    async def _request(self, a: _RequestArgs, conn: _Conn, rid: Any) -> Any:
        return await self.rt.request(a.name, a.payload, handler=a.handler, timeout=a.timeout,
                                     priority=a.priority)

    async def _send(self, a: _Send, conn: _Conn, rid: Any) -> Any:
        return await self.rt.send(a.name, a.payload, handler=a.handler,
                                  priority=a.priority)

    async def _publish(self, a: _Publish, conn: _Conn, rid: Any) -> Any:
        if a.guarantee not in ("at-most-once", "at-least-once", "effectively-once"):
            raise SpecError("unknown guarantee", path="guarantee", got=a.guarantee,
                            expected="at-most-once, at-least-once or effectively-once")
        # The sender is stamped here, from the channel: a client of the control socket.
        mid = await self.rt.publish(a.subject, a.payload, sender="client",
                                    guarantee=a.guarantee,  # type: ignore[arg-type]
                                    ttl=a.ttl, idempotency_key=a.idempotency_key)
        return {"id": mid}

    async def _broadcast(self, a: _Broadcast, conn: _Conn, rid: Any) -> Any:
        return await self.rt.broadcast(a.payload, handler=a.handler, namespace=a.namespace,
                                       selector=a.selector, sender="client")

    async def _keys_rotate(self, a: _Nothing, conn: _Conn, rid: Any) -> Any:
        return {"key_id": self.rt.rotate_bus_key()}

    async def _keys_export(self, a: _Nothing, conn: _Conn, rid: Any) -> Any:
        return self.rt.export_keys()

    async def _keys_trust(self, a: _Trust, conn: _Conn, rid: Any) -> Any:
        return {"trusted": self.rt.trust_keys(a.keys)}

    async def _policy_ls(self, a: _Nothing, conn: _Conn, rid: Any) -> Any:
        return self.rt.policies()

    async def _policy_eval(self, a: _PolicyEval, conn: _Conn, rid: Any) -> Any:
        return self.rt.eval_policy(a.principal, a.action, a.resource, a.context)

    async def _policy_reload(self, a: _Nothing, conn: _Conn, rid: Any) -> Any:
        return await self.rt.reload_policies()

    async def _policy_delete(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        await self.rt.delete_policy(a.name)

    async def _audit_verify(self, a: _AuditVerify, conn: _Conn, rid: Any) -> Any:
        return await self.rt.verify_audit(a.anchor)

    async def _audit_query(self, a: _AuditQuery, conn: _Conn, rid: Any) -> Any:
        return await self.rt.query_audit(agent=a.agent, action=a.action, since=a.since,
                                         until=a.until, outcome=a.outcome, limit=a.limit)

    async def _audit_export(self, a: _Path, conn: _Conn, rid: Any) -> Any:
        return await self.rt.export_audit(a.path)

    async def _resume(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        return {"still_suspended": await self.rt.resume(a.name)}

    async def _override(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        await self.rt.override(a.name)

    async def _task(self, a: _Task, conn: _Conn, rid: Any) -> Any:
        rec = await self.rt.task(a.id)
        if rec is None:
            raise CorralError(f"no task with id {a.id!r}",
                              hint="task ids come from `corral send`; only sent tasks are kept")
        return dataclasses.asdict(rec)

    async def _scale(self, a: _Scale, conn: _Conn, rid: Any) -> Any:
        await self.rt.scale(a.name, a.replicas)

    async def _stop(self, a: _Name, conn: _Conn, rid: Any) -> Any:
        await self.rt.stop(a.name)

    async def _delete(self, a: _Delete, conn: _Conn, rid: Any) -> Any:
        await self.rt.delete(a.name, purge=a.purge)

    async def _stats(self, a: _NoArgs, conn: _Conn, rid: Any) -> Any:
        return self.rt.stats()

    async def _logs(self, a: _Logs, conn: _Conn, rid: Any) -> Any:
        if not a.follow:
            return [dataclasses.asdict(r) for r in await self._stored(a)]
        self._streams += 1
        self._no_streams.clear()
        try:
            await _race(self._follow(a, conn, rid), conn.until_closed())
            await conn.send({"id": rid, "ok": True, "result": None})
        finally:
            self._streams -= 1
            if not self._streams:
                self._no_streams.set()
        return _SENT

    async def _stored(self, a: _Logs) -> list[LogRecord]:
        if a.tail is None:
            return await self.rt.logs(a.name, after=a.after, limit=a.limit)
        last: collections.deque[LogRecord] = collections.deque(maxlen=max(a.tail, 0))
        after = a.after
        while True:
            page: list[LogRecord] = await self.rt.logs(a.name, after=after, limit=1000)
            if not page:
                break
            last.extend(page)
            after = page[-1].seq
        return list(last)

    async def _follow(self, a: _Logs, conn: _Conn, rid: Any) -> None:
        """Stored lines, then live ones until the runtime stops."""
        live: asyncio.Queue[LogRecord | None] = asyncio.Queue(maxsize=_FOLLOW_BUFFER)

        async def pump() -> None:
            async for rec in self.rt.follow(a.name):
                await live.put(rec)
            await live.put(None)

        async with asyncio.TaskGroup() as tg:
            tg.create_task(pump())
            await asyncio.sleep(0)  # let pump subscribe first, so no line falls in between
            stored = await self._stored(a)
            seen = {(r.ts, r.instance, r.message) for r in stored}
            for r in stored:
                await conn.send({"id": rid, "stream": dataclasses.asdict(r)})
            while (rec := await live.get()) is not None:
                if (rec.ts, rec.instance, rec.message) not in seen:
                    await conn.send({"id": rid, "stream": dataclasses.asdict(rec)})

    # ------------------------------------------------------------ dead letters

    def _dlq(self) -> DeadLetters:
        dlq = self.rt.dlq
        if dlq is None:  # the bus starts with the runtime; a request can come in before it
            raise ControlError("the dead-letter queue is not open yet",
                               hint="wait until the runtime has started, then try again")
        return dlq

    async def _dlq_ls(self, a: _DlqLs, conn: _Conn, rid: Any) -> Any:
        return await self._dlq().ls(a.subscription, limit=a.limit, after=a.after)

    async def _dlq_show(self, a: _DlqShow, conn: _Conn, rid: Any) -> Any:
        return await self._dlq().show(a.seq)

    async def _dlq_replay(self, a: _DlqReplay, conn: _Conn, rid: Any) -> Any:
        n = await self._dlq().replay(self.rt.republish, a.seqs or None,
                                     subscription=a.subscription, everything=a.all)
        return {"replayed": n}

    async def _dlq_purge(self, a: _DlqPurge, conn: _Conn, rid: Any) -> Any:
        return {"purged": await self._dlq().purge(a.subscription)}


_OPS: dict[str, tuple[type[msgspec.Struct], Handler]] = {
    "ping": (_NoArgs, ControlServer._ping),
    "apply": (_Apply, ControlServer._apply),
    "get": (_Name, ControlServer._get),
    "list": (_NoArgs, ControlServer._list),
    "describe": (_Name, ControlServer._describe),
    "request": (_RequestArgs, ControlServer._request),
    "send": (_Send, ControlServer._send),
    "publish": (_Publish, ControlServer._publish),
    "broadcast": (_Broadcast, ControlServer._broadcast),
    "keys.rotate": (_Nothing, ControlServer._keys_rotate),
    "keys.export": (_Nothing, ControlServer._keys_export),
    "policy.ls": (_Nothing, ControlServer._policy_ls),
    "policy.eval": (_PolicyEval, ControlServer._policy_eval),
    "policy.reload": (_Nothing, ControlServer._policy_reload),
    "policy.delete": (_Name, ControlServer._policy_delete),
    "audit.verify": (_AuditVerify, ControlServer._audit_verify),
    "audit.query": (_AuditQuery, ControlServer._audit_query),
    "audit.export": (_Path, ControlServer._audit_export),
    "resume": (_Name, ControlServer._resume),
    "override": (_Name, ControlServer._override),
    "keys.trust": (_Trust, ControlServer._keys_trust),
    "task": (_Task, ControlServer._task),
    "scale": (_Scale, ControlServer._scale),
    "stop": (_Name, ControlServer._stop),
    "delete": (_Delete, ControlServer._delete),
    "stats": (_NoArgs, ControlServer._stats),
    "logs": (_Logs, ControlServer._logs),
    "dlq.ls": (_DlqLs, ControlServer._dlq_ls),
    "dlq.show": (_DlqShow, ControlServer._dlq_show),
    "dlq.replay": (_DlqReplay, ControlServer._dlq_replay),
    "dlq.purge": (_DlqPurge, ControlServer._dlq_purge),
}
