"""Corral's audit trail: hash-chained, Ed25519-sealed, fail-closed records in SQLite.

``AuditLog`` is the whole surface for the runtime; ``chain`` and ``verify`` are the pure
format (see docs/audit-format.md), usable without a database.
"""

from corral.audit.chain import (
    FORMAT_VERSION,
    GENESIS,
    GENESIS_HASH,
    KEY_ROTATED,
    SEAL,
    SEAL_CONTEXT,
    AuditRecord,
    Chain,
    ChainState,
    Draft,
    Row,
    Signer,
    canonical,
    decode,
    draft,
    link,
    seal_message,
)
from corral.audit.export import EXPORT_FORMAT, EXPORT_VERSION, write_export
from corral.audit.keys import KEY_FILE, AuditKey, AuditSigner
from corral.audit.log import AuditLog, verify_trail
from corral.audit.store import SCHEMA_VERSION, AuditStore, Tail
from corral.audit.verify import Report, check_links, verify

__all__ = [
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "FORMAT_VERSION",
    "GENESIS",
    "GENESIS_HASH",
    "KEY_FILE",
    "KEY_ROTATED",
    "SCHEMA_VERSION",
    "SEAL",
    "SEAL_CONTEXT",
    "AuditKey",
    "AuditLog",
    "AuditRecord",
    "AuditSigner",
    "AuditStore",
    "Chain",
    "ChainState",
    "Draft",
    "Report",
    "Row",
    "Signer",
    "Tail",
    "canonical",
    "check_links",
    "decode",
    "draft",
    "link",
    "seal_message",
    "verify",
    "verify_trail",
    "write_export",
]
