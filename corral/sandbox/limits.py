"""Per-agent resource limits: what they are, how the child applies them, what is really enforced.

``apply_in_child`` runs in a freshly forked child (the zygote's, or a ``preexec_fn``) before
any agent code. It sets rlimits and prctl flags only; cgroups are ``cgroups.py``'s job.
``plan`` says honestly, for ``corral describe``, which limit is enforced by what on this
machine and with which caveats.
"""

from __future__ import annotations

import ctypes
import math
import os
import resource
import signal
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from corral.errors import SandboxError

if TYPE_CHECKING:  # cgroups.py imports this module at run time; avoid the cycle
    from corral.sandbox.cgroups import CgroupSupport

__all__ = ["Enforcement", "Limits", "apply_in_child", "format_bytes", "plan"]

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38


def _load_prctl() -> Any:
    # Resolved once at import: the forked child must not load libraries or import anything.
    try:
        # CDLL(None) is the running interpreter, linked against libc: no ldconfig subprocess.
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.prctl
    except (OSError, AttributeError):  # not Linux: prctl does not exist
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    fn.restype = ctypes.c_int
    return fn


_PRCTL: Any = _load_prctl()


@dataclass(frozen=True)
class Limits:
    """Resource limits for one agent process; None means no limit."""

    memory: int | None = None  # bytes
    cpu: float | None = None  # cores, a rate (cgroup cpu quota)
    cpu_time: float | None = None  # seconds of CPU in total (RLIMIT_CPU)
    max_open_files: int | None = None
    max_processes: int | None = None
    nice: int | None = None

    def __post_init__(self) -> None:
        for name in ("memory", "cpu", "cpu_time", "max_open_files", "max_processes"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Limits.{name} must be > 0 or None, got {value!r}")
        if self.nice is not None and not -20 <= self.nice <= 19:
            raise ValueError(f"Limits.nice must be in -20..19 or None, got {self.nice!r}")

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict (it crosses to the zygote)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Limits:
        """Rebuild from ``to_dict()``; missing keys are None, unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown Limits field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def is_empty(self) -> bool:
        """True when no limit is set."""
        return all(getattr(self, f.name) is None for f in fields(self))


def _setrlimit(res: int, value: int) -> None:
    # soft == hard, so agent code can't raise it back (without CAP_SYS_RESOURCE).
    try:
        resource.setrlimit(res, (value, value))
    except (ValueError, OSError):
        # Raising above the current hard limit needs privilege; the lower hard limit already
        # enforces at least as much, so fall back to it rather than refuse to start.
        _, hard = resource.getrlimit(res)
        if hard == resource.RLIM_INFINITY or hard >= value:
            raise
        resource.setrlimit(res, (hard, hard))


def apply_in_child(limits: Limits, *, use_rlimit_as: bool = True,
                   parent_pid: int | None = None) -> None:
    """Apply rlimits, nice, PDEATHSIG and NO_NEW_PRIVS to the calling (freshly forked) process."""
    # Keep this free of threads, logging and imports: it runs between fork and agent code.
    if _PRCTL is not None:
        if _PRCTL(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            raise SandboxError(f"prctl(PR_SET_PDEATHSIG) failed: errno {ctypes.get_errno()}")
        # The parent may have died before PDEATHSIG was armed; then nobody will signal us.
        if parent_pid is not None and os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGKILL)
        if _PRCTL(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
            raise SandboxError(f"prctl(PR_SET_NO_NEW_PRIVS) failed: errno {ctypes.get_errno()}")
    try:
        if limits.nice is not None:
            # os.nice is relative; bring the process to the requested absolute value.
            current = os.getpriority(os.PRIO_PROCESS, 0)
            if limits.nice != current:
                os.nice(limits.nice - current)
        if limits.memory is not None and use_rlimit_as:
            _setrlimit(resource.RLIMIT_AS, int(limits.memory))
        if limits.max_open_files is not None:
            _setrlimit(resource.RLIMIT_NOFILE, int(limits.max_open_files))
        if limits.max_processes is not None:
            _setrlimit(resource.RLIMIT_NPROC, int(limits.max_processes))
        if limits.cpu_time is not None:
            soft = max(1, math.ceil(limits.cpu_time))
            # hard = soft + 1: SIGXCPU (catchable, a chance to report) comes a second before SIGKILL.
            resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))
    except (ValueError, OSError) as exc:
        raise SandboxError(f"could not apply resource limits in the agent process: {exc}",
                           hint="check the limits in the manifest against `ulimit -a`") from exc


@dataclass(frozen=True)
class Enforcement:
    """How one limit is enforced on this machine, for ``describe``."""

    limit: str  # manifest name: memory, cpu, cpuTime, maxOpenFiles, maxProcesses
    value: str  # human form: "256Mi", "0.5 cores"
    enforced: bool
    by: str  # mechanism(s)
    note: str  # honest caveats

    def to_dict(self) -> dict[str, Any]:
        """A plain JSON-able dict."""
        return asdict(self)


def format_bytes(n: int) -> str:
    """Bytes in the manifest's binary units when exact: 268435456 -> "256Mi"."""
    for unit, size in (("Ti", 1 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


def _format_number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def plan(limits: Limits, support: CgroupSupport, *, is_root: bool,
         use_rlimit_as: bool = True) -> list[Enforcement]:
    """What will be enforced and how, one row per limit that is set (pure)."""
    out: list[Enforcement] = []
    v = support.version
    why = f" ({support.reason})" if support.reason else ""

    if limits.memory is not None:
        value = format_bytes(limits.memory)
        as_note = ("RLIMIT_AS caps virtual address space, not resident memory: allocations "
                   "fail with MemoryError/ENOMEM, and runtimes that reserve address space "
                   "(threads, arenas, mmap) hit it early")
        if support.memory and v != "none":
            by = "cgroup v1 memory.limit_in_bytes" if v == "v1" else "cgroup v2 memory.max"
            if use_rlimit_as:
                by += " + RLIMIT_AS"
            note = ("the cgroup caps resident memory incl. page cache; over it the kernel "
                    "OOM killer sends SIGKILL; swap is capped too where swap is accounted "
                    + ("(memory.memsw.limit_in_bytes)" if v == "v1" else "(memory.swap.max=0)"))
            if v == "v1":
                note += ("; pages the process had before joining the group (shared with the "
                         "zygote) stay charged to the runtime's group")
            if use_rlimit_as:
                note += "; " + as_note
            out.append(Enforcement("memory", value, True, by, note))
        elif use_rlimit_as:
            out.append(Enforcement("memory", value, True, "RLIMIT_AS",
                                   f"{as_note}; no memory cgroup{why}, so resident memory "
                                   "is not capped on its own"))
        else:
            out.append(Enforcement("memory", value, False, "none",
                                   f"no memory cgroup{why} and RLIMIT_AS is off"))

    if limits.cpu is not None:
        cores = _format_number(limits.cpu)
        value = f"{cores} core" if limits.cpu == 1 else f"{cores} cores"
        if support.cpu and v != "none":
            by = ("cgroup v1 cpu.cfs_quota_us/cpu.cfs_period_us" if v == "v1"
                  else "cgroup v2 cpu.max")
            out.append(Enforcement("cpu", value, True, by,
                                   "a rate: the group is throttled per 100 ms period; "
                                   "total CPU time is cpuTime's job"))
        else:
            out.append(Enforcement("cpu", value, False, "none",
                                   f"no cpu cgroup controller{why}; the rate is not capped "
                                   "(set cpuTime for a total cap via RLIMIT_CPU)"))

    if limits.cpu_time is not None:
        soft = max(1, math.ceil(limits.cpu_time))
        out.append(Enforcement("cpuTime", f"{soft}s", True, "RLIMIT_CPU",
                               f"per process: SIGXCPU at {soft}s of CPU, SIGKILL at "
                               f"{soft + 1}s; each child process gets its own budget"))

    if limits.max_open_files is not None:
        out.append(Enforcement("maxOpenFiles", str(limits.max_open_files), True,
                               "RLIMIT_NOFILE",
                               "per process (soft = hard); each child process inherits the "
                               "same limit rather than sharing it"))

    if limits.max_processes is not None:
        value = str(limits.max_processes)
        nproc_root = ("RLIMIT_NPROC is ignored for root (CAP_SYS_RESOURCE/CAP_SYS_ADMIN)")
        nproc_user = ("RLIMIT_NPROC counts every process and thread of this user on the "
                      "machine, not just this agent's")
        if support.pids and v != "none":
            by = f"cgroup {v} pids.max"
            note = "pids.max counts threads as well as processes, including the agent's own"
            if is_root:
                note += f"; {nproc_root}"
            else:
                by += " + RLIMIT_NPROC"
                note += f"; {nproc_user}"
            out.append(Enforcement("maxProcesses", value, True, by, note))
        elif is_root:
            out.append(Enforcement("maxProcesses", value, False, "none",
                                   f"{nproc_root}; no pids cgroup{why}"))
        else:
            out.append(Enforcement("maxProcesses", value, True, "RLIMIT_NPROC",
                                   f"{nproc_user}; no pids cgroup{why}"))
    return out
