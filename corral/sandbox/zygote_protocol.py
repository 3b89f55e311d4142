"""Messages between the runtime and its zygote, one per SOCK_SEQPACKET packet.

A Spawn carries two file descriptors (SCM_RIGHTS): the worker's end of its protocol
socket, then the write end of its log pipe.
"""

from __future__ import annotations

from typing import Literal

import msgspec

__all__ = ["Exited", "Kill", "Spawn", "SpawnFailed", "Spawned", "ToRuntime", "ToZygote"]


class Spawn(msgspec.Struct, frozen=True, tag="spawn"):
    """Fork a worker. mode "python" runs the Corral worker; "exec" runs argv on JSON-lines stdio."""

    req: int
    instance: str
    mode: Literal["python", "exec"] = "python"
    argv: list[str] = []
    env: dict[str, str] = {}
    cwd: str | None = None
    limits: dict[str, float | int | None] = {}
    rlimit_as: bool = True
    cgroup_procs: list[str] = []


class Kill(msgspec.Struct, frozen=True, tag="kill"):
    """Signal a worker's whole process group, if the zygote has not reaped it yet."""

    pid: int
    signal: int = 9


class Spawned(msgspec.Struct, frozen=True, tag="spawned"):
    """The fork succeeded."""

    req: int
    pid: int


class SpawnFailed(msgspec.Struct, frozen=True, tag="spawn_failed"):
    """The fork itself failed (the child's own setup errors arrive as its exit and logs)."""

    req: int
    error: str


class Exited(msgspec.Struct, frozen=True, tag="exited"):
    """A worker was reaped: code >= 0 is an exit status, code < 0 is -signal."""

    pid: int
    code: int


ToZygote = Spawn | Kill
ToRuntime = Spawned | SpawnFailed | Exited
