"""Exporting a trail as JSON Lines that a verifier without Corral can check.

Line 1 is a header; every later line is one record, in seq order::

    {"format": "corral-audit-export", "version": 1, "trail_id": "...",
     "public_keys": {"<key id>": "<raw public key, hex>", ...},
     "records": N, "head": {"seq": N, "hash": "<hex>"}}
    {"seq": 1, "hash": "<hex>", "body": "<the canonical body, as a JSON string>"}
    ...

``body`` is the record's stored bytes decoded as UTF-8; a verifier encodes it back to UTF-8
to get exactly the bytes that were hashed. A body that is not valid UTF-8 (it can only be
one that was tampered with) is written as ``body_b64`` instead, so the export still shows
it. The file is written whole (temp file, rename) with mode 0600: records name agents and
resources. The format is specified in docs/audit-format.md.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import tempfile
from collections.abc import Mapping
from contextlib import suppress
from pathlib import Path
from typing import Any

__all__ = ["EXPORT_FORMAT", "EXPORT_VERSION", "write_export"]

EXPORT_FORMAT = "corral-audit-export"
EXPORT_VERSION = 1


def _hex(digest: Any) -> str:
    return digest.hex() if isinstance(digest, bytes) else str(digest)


def _line(seq: Any, body: Any, digest: Any) -> str:
    # A hand-edited row may hold TEXT where a BLOB belongs: export what is there, don't crash.
    entry: dict[str, Any] = {"seq": seq, "hash": _hex(digest)}
    if isinstance(body, str):
        entry["body"] = body
        return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"
    body = bytes(body) if isinstance(body, bytes | bytearray | memoryview) else b""
    try:
        entry["body"] = body.decode("utf-8")
    except UnicodeDecodeError:
        entry["body_b64"] = base64.b64encode(body).decode("ascii")
    return json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n"


def write_export(conn: sqlite3.Connection, path: Path, *, trail_id: str,
                 public_keys: Mapping[str, bytes]) -> dict[str, Any]:
    """Write the trail read through ``conn`` to ``path``; return the header's figures."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            # One read transaction: the header and the lines describe the same snapshot.
            conn.execute("BEGIN")
            try:
                last = conn.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1"
                                    ).fetchone()
                count = conn.execute("SELECT count(*) FROM records").fetchone()[0]
                head_seq, head_hash = (last[0], _hex(last[1])) if last else (0, "")
                header = {"format": EXPORT_FORMAT, "version": EXPORT_VERSION,
                          "trail_id": trail_id,
                          "public_keys": {kid: bytes(pub).hex()
                                          for kid, pub in public_keys.items()},
                          "records": count, "head": {"seq": head_seq, "hash": head_hash}}
                f.write(json.dumps(header, separators=(",", ":")) + "\n")
                cur = conn.execute("SELECT seq, body, hash FROM records ORDER BY seq")
                while chunk := cur.fetchmany(4096):
                    f.writelines(_line(s, b, h) for s, b, h in chunk)
            finally:
                conn.execute("COMMIT")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"path": str(path), "trail_id": trail_id, "records": count, "head_seq": head_seq,
            "head_hash": head_hash, "public_keys": header["public_keys"]}
