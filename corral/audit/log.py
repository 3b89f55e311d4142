"""The audit log: ``append`` returns once a record is committed, or raises and the action is refused.

``AuditLog`` is the surface the runtime uses. ``open`` locks the SQLite file, loads the key
and carries the chain on from the stored head: it starts a new trail (genesis record and its
seal) when the file is empty, and otherwise checks the links of any tail a crash left
unsealed and seals it. ``append`` validates and encodes the record on the caller's side
(``chain.draft``), so a record that can't be encoded fails there, then hands it to the
writer thread (``writer.py``) and waits for the group commit that holds it. ``close`` writes
a final seal and joins the thread within a bound. Reads (``verify``, ``query``, ``export``)
use their own read-only connections on worker threads, off the event loop, and keep working
after ``close``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from corral.audit.chain import GENESIS_HASH, RESERVED_PREFIX, Chain, ChainState, Row, decode, draft
from corral.audit.export import write_export
from corral.audit.keys import AuditKey
from corral.audit.store import AuditStore, Tail
from corral.audit.verify import Report, check_links, verify
from corral.audit.writer import APPEND, CALL, ROTATE, SEAL_NOW, Writer
from corral.errors import AuditTampered, AuditUnavailable

__all__ = ["AuditLog", "verify_trail"]

log = logging.getLogger("corral.audit")


def _to_us(t: float | dt.datetime | None) -> int | None:
    if t is None:
        return None
    if isinstance(t, dt.datetime):
        if t.tzinfo is None:
            raise ValueError("pass an aware datetime (with tzinfo), or epoch seconds")
        t = t.timestamp()
    return int(t * 1_000_000)


class AuditLog:
    """A tamper-evident, signed, fail-closed audit trail in its own SQLite file."""

    def __init__(self, path: str | Path, keys_dir: str | Path, *, seal_every: int = 1000,
                 seal_interval: float = 1.0, batch_max: int = 1024, max_pending: int = 65536,
                 synchronous: str = "FULL", close_timeout: float = 10.0,
                 clock: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        if seal_every < 1 or seal_interval <= 0 or batch_max < 1 or max_pending < 1:
            raise ValueError("seal_every, batch_max and max_pending must be at least 1, "
                             "seal_interval positive")
        self.path = Path(path)
        self.keys_dir = Path(keys_dir)
        self._store = AuditStore(self.path, synchronous=synchronous)
        self._seal_every = seal_every
        self._seal_interval = seal_interval
        self._batch_max = batch_max
        self._max_pending = max_pending
        self._close_timeout = close_timeout
        self._clock = clock
        self._mono = monotonic
        self._state = "new"  # new -> open -> closing -> closed
        self._keys: AuditKey | None = None
        self._writer: Writer | None = None
        self._trail_id = ""

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Lock and load (or start) the trail, seal any unsealed tail, start the writer."""
        if self._state != "new":
            raise AuditUnavailable(f"audit log {self.path} was already opened",
                                   hint="open an AuditLog once; make a new one to reopen")
        opening = asyncio.get_running_loop().run_in_executor(None, self._open_sync)
        try:
            chain = await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The thread can't be stopped midway: let it finish, then let go of the file.
            opening.add_done_callback(self._close_if_opened)
            raise
        assert self._keys is not None
        self._writer = Writer(self._store, chain, self._keys, batch_max=self._batch_max,
                              max_pending=self._max_pending, clock=self._clock,
                              monotonic=self._mono)
        self._writer.start()
        self._state = "open"

    def _close_if_opened(self, opening: asyncio.Future[Chain]) -> None:
        if not opening.cancelled() and opening.exception() is None:
            self._store.close()

    def _open_sync(self) -> Chain:
        store = self._store
        store.open()
        try:
            tail = store.tail()
            now, ts = self._mono(), int(self._clock() * 1_000_000)
            if tail.seq == 0:
                keys = AuditKey.open(self.keys_dir, create=True)
                signer = keys.activate(keys.current.key_id)
                self._trail_id = os.urandom(16).hex()
                chain = self._new_chain(ChainState(signer, last_seal=now))
                rows = chain.start(self._trail_id, ts, now)
                self._write_or_refuse(rows, meta={"trail_id": self._trail_id})
                log.info("started audit trail %s in %s with key %s", self._trail_id,
                         self.path, signer.key_id)
            else:
                keys = AuditKey.open(self.keys_dir, create=False)
                signer = keys.activate(tail.key_id(self.path))
                self._trail_id = tail.trail_id
                self._check_tail(tail)
                chain = self._new_chain(ChainState(
                    signer, seq=tail.seq, head=tail.head, unsealed=tail.seq - tail.last_seal,
                    last_seal=now))
                # Records a crash left unsealed: their links were just checked; seal them now.
                self._write_or_refuse(chain.seal(ts, now))
        except BaseException:
            store.close()
            raise
        self._keys = keys
        return chain

    def _new_chain(self, state: ChainState) -> Chain:
        return Chain(state, seal_every=self._seal_every, seal_interval=self._seal_interval)

    def _check_tail(self, tail: Tail) -> None:
        if tail.last_seal == tail.seq:
            return
        prev = self._store.hash_of(tail.last_seal) if tail.last_seal else GENESIS_HASH
        bad = check_links(self._store.rows_from(tail.last_seal + 1), tail.last_seal,
                          prev or GENESIS_HASH)
        if bad is not None:
            raise AuditTampered(f"audit record {bad[0]} in the unsealed tail of {self.path} "
                                f"is bad: {bad[1]}; refusing to seal it",
                                hint="keep the file for forensics and move it aside (with "
                                     "audit.db-wal) to start a new trail")

    def _write_or_refuse(self, rows: list[Row], meta: dict[str, str] | None = None) -> None:
        if not rows:
            return
        try:
            self._store.write(rows, meta)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"can't write to audit trail {self.path}: {exc}") from exc

    async def close(self) -> None:
        """Write a final seal, stop the writer (within ``close_timeout``) and close the file."""
        if self._state != "open":
            return
        self._state = "closing"
        writer = self._writer
        assert writer is not None
        writer.stop()
        try:
            if not await writer.join(self._close_timeout):
                raise AuditUnavailable(
                    f"the audit writer did not stop within {self._close_timeout}s; "
                    "the last records may be unsealed", hint="the disk may be hung; check it")
        finally:
            self._state = "closed"
        if writer.close_error is not None:
            raise writer.close_error

    async def __aenter__(self) -> AuditLog:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------------ writes

    async def append(self, kind: str, *, actor: str, agent: str = "", resource: str = "",
                     outcome: str = "", data: dict[str, Any] | None = None) -> int:
        """Record one event; return its seq once committed, or raise AuditUnavailable (refuse the action)."""
        if isinstance(kind, str) and kind.startswith(RESERVED_PREFIX):
            raise ValueError(f"kind {kind!r}: the 'audit.' prefix is reserved for the "
                             "chain's own records; choose another kind")
        record = draft(kind, actor=actor, ts=int(self._clock() * 1_000_000), agent=agent,
                       resource=resource, outcome=outcome, data=data)
        seq: int = await self._submit(APPEND, record)
        return seq

    async def seal(self) -> int:
        """Seal everything written so far now; return the seq of the seal (or of the head)."""
        seq: int = await self._submit(SEAL_NOW, None)
        return seq

    async def flush(self) -> tuple[int, str]:
        """Wait until all queued records are committed (and a due seal written); return the anchor."""
        await self._submit(CALL, None)
        return self.anchor()

    async def rotate_key(self) -> str:
        """Start signing with a new key; the rotation is recorded and sealed by the old one."""
        key_id: str = await self._submit(ROTATE, None)
        return key_id

    async def _run_in_writer(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        """Run ``fn`` on the writer's connection between batches (a hook for fault tests)."""
        return await self._submit(CALL, fn)

    async def _submit(self, op: int, arg: Any) -> Any:
        if self._writer is None:
            raise AuditUnavailable(f"audit log {self.path} is not open; the action was refused",
                                   hint="await AuditLog.open() before recording")
        return await self._writer.submit(op, arg)

    # ------------------------------------------------------------------ reads (off the loop)

    def anchor(self) -> tuple[int, str]:
        """(seq, hash hex) of the last committed record: publish it to detect truncation later."""
        if self._writer is None:
            return 0, GENESIS_HASH.hex()
        seq, head = self._writer.head
        return seq, head.hex()

    @property
    def trail_id(self) -> str:
        """Random id of this trail, recorded in its genesis record."""
        return self._trail_id

    @property
    def key_id(self) -> str:
        """Id of the key that signs new seals."""
        return self._writer.key_id if self._writer is not None else ""

    @property
    def public_keys(self) -> dict[str, bytes]:
        """Every key that signed this trail: id -> raw Ed25519 public key."""
        return self._keys.public_keys if self._keys is not None else {}

    @property
    def stats(self) -> dict[str, int | float]:
        """Writer counters: records, seals, batches, largest batch, queue depth and its peak."""
        if self._writer is None:
            return {}
        return {**self._writer.stats, "queue_depth": self._writer.queue_depth}

    async def verify(self, anchor: tuple[int, str] | None = None) -> Report:
        """Check the whole stored trail (optionally against an anchor); never raises on tampering."""
        keys = self._readable()
        store = self._store

        def run() -> Report:
            with store.reader() as conn:
                return verify(store.verify_rows(conn), keys.public_keys, anchor=anchor)
        return await asyncio.to_thread(run)

    async def query(self, agent: str | None = None, action: str | None = None,
                    since: float | dt.datetime | None = None,
                    until: float | dt.datetime | None = None, outcome: str | None = None, *,
                    after: int = 0, limit: int = 1000) -> list[dict[str, Any]]:
        """Records matching every filter given, oldest first; ``action`` may end in ``.*``."""
        self._readable()
        store = self._store
        lo, hi = _to_us(since), _to_us(until)

        def run() -> list[dict[str, Any]]:
            with store.reader() as conn:
                rows = store.select(conn, agent=agent, action=action, since=lo, until=hi,
                                    outcome=outcome, after=after, limit=limit)
            out = []
            for seq, body, digest, ts, kind, ag, oc in rows:
                try:
                    rec = decode(bytes(body))
                except ValueError as exc:
                    raise AuditTampered(f"audit record {seq} does not decode ({exc}); run "
                                        "verify") from exc
                if (rec.seq, rec.ts, rec.kind, rec.agent, rec.outcome) != (seq, ts, kind, ag, oc):
                    raise AuditTampered(f"audit record {seq}'s index columns differ from its "
                                        "body; run verify")
                out.append({**rec.to_dict(), "hash": bytes(digest).hex()})
            return out
        return await asyncio.to_thread(run)

    async def export(self, path: str | Path) -> dict[str, Any]:
        """Write the trail as JSON Lines (header line with the public keys, then one line per record)."""
        keys = self._readable()
        store, trail_id, dest = self._store, self._trail_id, Path(path)

        def run() -> dict[str, Any]:
            with store.reader() as conn:
                return write_export(conn, dest, trail_id=trail_id, public_keys=keys.public_keys)
        return await asyncio.to_thread(run)

    def _readable(self) -> AuditKey:
        if self._keys is None:
            raise AuditUnavailable(f"audit log {self.path} is not open",
                                   hint="await AuditLog.open() first; reads work until and "
                                        "after close")
        return self._keys


async def verify_trail(path: str | Path, keys_dir: str | Path, *,
                       anchor: tuple[int, str] | None = None) -> Report:
    """Verify a trail on disk read-only, without opening it for writing (it may be in use)."""
    def run() -> Report:
        public_keys = AuditKey.read_public(keys_dir)
        store = AuditStore(path)
        with store.reader() as conn:
            return verify(store.verify_rows(conn), public_keys, anchor=anchor)
    return await asyncio.to_thread(run)

