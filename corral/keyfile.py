"""Private key files on disk: 0700 folders, atomic 0600 writes, refusal of readable files, flock.

Shared by every key Corral keeps (bus signing keys, the bus keyring, the audit signing key), so
the rules are written once: a key file is written atomically (temp file in the same folder,
fsync, rename, fsync of the folder) with mode 0600, key folders are 0700, and a key file that
group or others can access is refused, as ssh does, rather than trusted. Cross-process updates
are serialised with ``flock``.

Errors: the caller names the exception class to raise (``BusError`` for bus keys,
``AuditKeyError`` for the audit key), so each subsystem keeps its own branch of the tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from corral.errors import CorralError

__all__ = [
    "Stamp",
    "corrupt",
    "file_stamp",
    "flock",
    "key_id_of",
    "private_dir",
    "read_secret",
    "write_atomic",
]

#: Identity of one version of a file: (inode, mtime ns, size).
Stamp = tuple[int, int, int]


def key_id_of(public_key: bytes) -> str:
    """Key id of a raw Ed25519 public key: first 16 hex chars of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[:16]


def private_dir(path: Path) -> None:
    """Create ``path`` (and parents) and make it 0700: only the owner may list or enter it."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)  # mkdir's mode is masked by umask, and the folder may pre-exist


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` with mode 0600 so readers never see a partial file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the folder entry is on disk.
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def file_stamp(st: os.stat_result) -> Stamp:
    """The version stamp of a file from its stat result."""
    # Atomic replace gives a new inode, so this changes on every write by anyone.
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def corrupt(path: Path, what: str, error: type[CorralError]) -> CorralError:
    """The error for a key file that parses but does not hold sound keys."""
    return error(f"key file {path} is corrupt: {what}",
                 hint="restore it from a backup; keys can't be recovered from a broken file")


def read_secret(path: Path, error: type[CorralError]) -> tuple[dict[str, Any], Stamp] | None:
    """Parse a version-1 JSON key file; None if missing; ``error`` if others can read it or it is corrupt."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise error(f"can't open key file {path}: {exc}",
                    hint="key files must be regular files, not symlinks") from exc
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_mode & 0o077:
            raise error(f"key file {path} is accessible by other users "
                        f"(mode {oct(st.st_mode & 0o777)}); refusing to use it",
                        hint=f"chmod 600 {path}, and rotate its keys if others may have read them")
        raw = f.read()
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise error(f"key file {path} is not valid JSON: {exc}",
                    hint="restore it from a backup; keys can't be recovered from a broken file"
                    ) from exc
    if not isinstance(doc, dict) or doc.get("version") != 1:
        raise error(f"key file {path} has an unknown format",
                    hint="it was written by a newer Corral, or it is not a Corral key file")
    return doc, file_stamp(st)


@contextmanager
def flock(path: Path) -> Iterator[None]:
    """Exclusive cross-process lock on ``path`` (created 0600), released on close."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
