"""Where a runtime keeps its state, and the knobs that are not per-agent."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from corral.bus.bus import BusConfig

__all__ = ["RuntimeConfig", "default_home"]


def default_home() -> Path:
    """CORRAL_HOME, or ~/.corral."""
    env = os.environ.get("CORRAL_HOME")
    return Path(env).expanduser() if env else Path.home() / ".corral"


@dataclass
class RuntimeConfig:
    """Runtime-wide settings; every wait has a bound here."""

    home: Path = field(default_factory=default_home)
    #: SQLite synchronous mode: NORMAL survives a crash of the runtime; FULL also a power cut.
    synchronous: str = "NORMAL"
    #: How long agents get to finish in-flight work at shutdown before they are killed.
    shutdown_grace: float = 5.0
    #: How many times a durable `send` is delivered before it is marked failed.
    max_send_attempts: int = 3
    #: How long a cancelled task may take to stop before its instance is killed as hung.
    cancel_grace: float = 2.0
    #: How often resource usage of live instances is sampled (off the event loop).
    sample_interval: float = 5.0
    #: Use cgroups where the machine allows (False: rlimits only).
    use_cgroups: bool = True
    #: Raise the cyclic GC's generation-0 threshold while the runtime runs. Thousands of
    #: live agents make every default (700-object) collection rescan a large young heap;
    #: the old thresholds are restored on exit. None leaves the GC alone.
    gc_threshold: tuple[int, int, int] | None = (50_000, 20, 100)
    #: The message bus backend: "local" (SQLite in CORRAL_HOME), "nats" or "redis".
    bus: str = "local"
    #: Where the nats/redis server is (default: 127.0.0.1 on the standard port).
    bus_url: str | None = None
    #: Namespaces this runtime's subjects and subscriptions on a shared server.
    bus_prefix: str = "corral"
    #: Sign every message with its sender's Ed25519 key and refuse unsigned or forged ones
    #: on receipt. None: on for a networked backend (nats, redis), whose server other nodes
    #: and clients share (a trust boundary), off for local (senders are known by channel).
    bus_sign: bool | None = None
    #: Limits and security of the bus: message size, per-sender rate, encrypted subjects.
    bus_config: BusConfig = field(default_factory=BusConfig)

    #: Cedar policy files or folders of .cedar files, loaded at start and by `policy reload`
    #: (with the `kind: Policy` manifests applied). See docs/policy.md.
    policy_paths: list[Path] = field(default_factory=list)
    #: Strict: denied unless a policy permits. Otherwise allowed unless a policy forbids.
    policy_strict: bool = False
    #: The hash-chained, signed audit trail in CORRAL_HOME/audit.db. Off only for
    #: comparisons (the bench); a runtime without it records nothing it did.
    audit: bool = True
    #: Record allowed policy decisions too (denials are always recorded).
    audit_allows: bool = False
    #: Seal the trail every N records or T seconds, whichever comes first.
    audit_seal_every: int = 1000
    audit_seal_interval: float = 1.0

    @property
    def audit_path(self) -> Path:
        """The audit trail's SQLite database."""
        return self.home / "audit.db"

    @property
    def store_path(self) -> Path:
        """The SQLite database."""
        return self.home / "corral.db"

    @property
    def keys_dir(self) -> Path:
        """Agent signing keys and the bus keyring (0700)."""
        return self.home / "keys"

    @property
    def socket_path(self) -> Path:
        """The control socket the CLI talks to (mode 0600)."""
        return self.home / "corral.sock"
