"""Per-agent cgroups: detect what this machine really supports, create groups, read OOM kills.

Groups live at ``<root>/<prefix>/<name>``, where ``<root>`` is the runtime's *own* cgroup for
each controller (from /proc/self/cgroup), so Corral never touches groups it does not own.
cgroup v1 (one hierarchy per controller) and v2 (one unified tree) are both handled; on a
machine with neither usable, ``detect()`` says "none" and why, and the caller falls back to
rlimits only (see ``limits.plan``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from corral.errors import SandboxError, SandboxUnavailable

if TYPE_CHECKING:
    from corral.sandbox.limits import Limits

__all__ = [
    "CONTROLLERS",
    "AgentCgroup",
    "CgroupManager",
    "CgroupSupport",
    "detect",
    "sanitize_name",
]

log = logging.getLogger(__name__)

#: The controllers Corral uses, in the order it reports them.
CONTROLLERS: tuple[str, ...] = ("memory", "cpu", "pids")

CFS_PERIOD_US = 100_000
_MIN_CFS_QUOTA_US = 1_000  # the kernel rejects quotas under 1 ms
_REMOVE_WAIT_S = 0.5

# The file whose write proves a controller is usable, and a harmless value to write to it.
_PROBE_V1 = {"memory": ("memory.limit_in_bytes", "1073741824"),
             "cpu": ("cpu.cfs_quota_us", "-1"),
             "pids": ("pids.max", "64")}
_PROBE_V2 = {"memory": ("memory.max", "1073741824"), "cpu": ("cpu.max", "max"),
             "pids": ("pids.max", "64")}


@dataclass(frozen=True)
class CgroupSupport:
    """Which cgroup controllers Corral can really use on this machine, and where."""

    version: Literal["v1", "v2", "none"]
    memory: bool
    cpu: bool
    pids: bool
    roots: dict[str, str] = field(default_factory=dict)  # controller -> our own group's dir
    reason: str = ""  # why something is unavailable; "" when all is usable

    @classmethod
    def none(cls, reason: str) -> CgroupSupport:
        """No usable cgroups, with the reason."""
        return cls("none", False, False, False, {}, reason)

    def to_dict(self) -> dict[str, object]:
        """A plain JSON-able dict, for ``describe``."""
        return {"version": self.version, "memory": self.memory, "cpu": self.cpu,
                "pids": self.pids, "roots": dict(self.roots), "reason": self.reason}


# --- detection --------------------------------------------------------------------------


@dataclass(frozen=True)
class _Mount:
    root: str  # the path inside the hierarchy that is mounted
    point: str  # where it is mounted
    fstype: str
    options: frozenset[str]  # super options: for cgroup v1 they name the controllers


def _unescape(s: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def _parse_mountinfo(text: str) -> list[_Mount]:
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if "-" not in parts:
            continue
        sep = parts.index("-")
        if sep < 5 or len(parts) < sep + 4:
            continue
        fstype = parts[sep + 1]
        if fstype not in ("cgroup", "cgroup2"):
            continue
        mounts.append(_Mount(_unescape(parts[3]), _unescape(parts[4]), fstype,
                             frozenset(parts[sep + 3].split(","))))
    return mounts


def _parse_proc_cgroup(text: str) -> tuple[dict[str, str], str | None]:
    """Return (v1 controller -> group path, v2 group path or None)."""
    v1: dict[str, str] = {}
    v2: str | None = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, ctrls, path = parts
        if hier == "0" and ctrls == "":
            v2 = path
        else:
            for c in ctrls.split(","):
                if c:
                    v1[c] = path
    return v1, v2


def _group_dir(mount: _Mount, path: str) -> str | None:
    # A group path is relative to the hierarchy root; the mount may show only a subtree.
    root = mount.root.rstrip("/")
    if root and path != root and not path.startswith(root + "/"):
        return None  # our group is outside what this mount shows (e.g. another namespace)
    rel = path[len(root):].lstrip("/")
    d = os.path.join(mount.point, rel) if rel else mount.point
    return d if os.path.isdir(d) else None


def _find_dir(mounts: list[_Mount], fstype: str, path: str, ctrl: str | None) -> str | None:
    for m in mounts:
        if m.fstype != fstype or (ctrl is not None and ctrl not in m.options):
            continue
        d = _group_dir(m, path)
        if d is not None:
            return d
    return None


def _write(path: str, value: str) -> None:
    # One write(2) per value: cgroup files take one value per write.
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_int(path: str) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _read_keyed(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (_read(path) or "").splitlines():
        key, _, value = line.partition(" ")
        with contextlib.suppress(ValueError):
            out[key] = int(value)
    return out


def _rmdir_quiet(path: str) -> None:
    with contextlib.suppress(OSError):
        os.rmdir(path)


def _probe_dir(root: str) -> tuple[str | None, str]:
    probe = os.path.join(root, f"corral-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
    except FileExistsError:
        pass  # a previous probe of a process with our pid that died mid-probe
    except OSError as exc:
        return None, f"can't create groups under {root}: {exc.strerror}"
    return probe, ""


def _probe_v1(root: str, ctrl: str) -> str:
    """Return "" when a group with a limit can be made under ``root``, else why not."""
    probe, why = _probe_dir(root)
    if probe is None:
        return f"cgroup v1 {ctrl}: {why}"
    fname, value = _PROBE_V1[ctrl]
    try:
        _write(os.path.join(probe, fname), value)
    except OSError as exc:
        return f"cgroup v1 {ctrl}: can't write {fname} under {root}: {exc.strerror}"
    finally:
        _rmdir_quiet(probe)
    return ""


def _enable_v2(d: str, ctrls: list[str]) -> dict[str, OSError]:
    """Enable controllers for d's children; return the ones that failed."""
    enabled = set((_read(os.path.join(d, "cgroup.subtree_control")) or "").split())
    failed: dict[str, OSError] = {}
    for c in ctrls:
        if c in enabled:
            continue
        try:
            # Fails with EBUSY, changing nothing, when d has processes of its own and is not
            # the root ("no internal processes" rule): safe to just try.
            _write(os.path.join(d, "cgroup.subtree_control"), f"+{c}")
        except OSError as exc:
            failed[c] = exc
    return failed


def _probe_v2(root: str, ctrls: list[str]) -> tuple[list[str], dict[str, str]]:
    enable_failed = _enable_v2(root, ctrls)
    probe, why = _probe_dir(root)
    if probe is None:
        return [], {c: f"cgroup v2: {why}" for c in ctrls}
    ok: list[str] = []
    reasons: dict[str, str] = {}
    try:
        for c in ctrls:
            fname, value = _PROBE_V2[c]
            path = os.path.join(probe, fname)
            if not os.path.exists(path):
                exc = enable_failed.get(c)
                msg = f"cgroup v2 {c}: can't enable it in {root}/cgroup.subtree_control"
                if exc is not None and exc.errno == errno.EBUSY:
                    msg += (" (EBUSY: the runtime's own cgroup has processes; run the runtime "
                            "in a delegated cgroup of its own, e.g. systemd-run -p Delegate=yes)")
                elif exc is not None:
                    msg += f" ({exc.strerror})"
                reasons[c] = msg
                continue
            try:
                _write(path, value)
                ok.append(c)
            except OSError as exc2:
                reasons[c] = f"cgroup v2 {c}: can't write {fname} under {root}: {exc2.strerror}"
    finally:
        _rmdir_quiet(probe)
    return ok, reasons


def _detect(proc: str) -> CgroupSupport:
    cg_text = _read(os.path.join(proc, "self/cgroup"))
    if cg_text is None:
        return CgroupSupport.none(f"{proc}/self/cgroup is not readable (not Linux?)")
    mi_text = _read(os.path.join(proc, "self/mountinfo"))
    if mi_text is None:
        return CgroupSupport.none(f"{proc}/self/mountinfo is not readable")
    v1paths, v2path = _parse_proc_cgroup(cg_text)
    mounts = _parse_mountinfo(mi_text)

    v1_roots: dict[str, str] = {}
    reasons: dict[str, str] = {}
    for c in CONTROLLERS:
        if c not in v1paths:
            continue
        d = _find_dir(mounts, "cgroup", v1paths[c], c)
        if d is None:
            reasons[c] = f"cgroup v1 {c}: our group {v1paths[c]} is not visible in any mount"
            continue
        why = _probe_v1(d, c)
        if why:
            reasons[c] = why
        else:
            v1_roots[c] = d

    v2_roots: dict[str, str] = {}
    if v2path is not None:
        d = _find_dir(mounts, "cgroup2", v2path, None)
        if d is None:
            for c in CONTROLLERS:
                reasons.setdefault(c, f"cgroup v2: our group {v2path} is not visible in any mount")
        else:
            available = set((_read(os.path.join(d, "cgroup.controllers")) or "").split())
            wanted = [c for c in CONTROLLERS if c in available and c not in v1paths]
            for c in CONTROLLERS:
                if c not in available and c not in v1paths:
                    reasons[c] = f"cgroup v2 {c}: not in {d}/cgroup.controllers"
            if wanted:
                ok, why2 = _probe_v2(d, wanted)
                reasons.update(why2)
                v2_roots = dict.fromkeys(ok, d)

    # Hybrid machines can have some controllers on each; use one version, the richer one.
    if v1_roots and len(v1_roots) >= len(v2_roots):
        version: Literal["v1", "v2", "none"] = "v1"
        roots = v1_roots
    elif v2_roots:
        version, roots = "v2", v2_roots
    else:
        version, roots = "none", {}
    missing = [c for c in CONTROLLERS if c not in roots]
    reason = "; ".join(reasons.get(c, f"{c}: no cgroup hierarchy has this controller")
                       for c in missing)
    if version == "none" and not reason:
        reason = "no cgroup controllers available"
    return CgroupSupport(version, "memory" in roots, "cpu" in roots, "pids" in roots,
                         roots, reason)


def detect(*, proc: str = "/proc") -> CgroupSupport:
    """Find the cgroup controllers this process may use, by probing; never raises."""
    try:
        return _detect(proc)
    except Exception as exc:  # detection must never stop the runtime from starting
        return CgroupSupport.none(f"cgroup detection failed: {exc!r}")


# --- groups -----------------------------------------------------------------------------

_BAD_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_MAX_NAME = 200  # NAME_MAX is 255; leave room


def sanitize_name(name: str) -> str:
    """A safe cgroup directory name: only [A-Za-z0-9_.-], never '.' or '..'."""
    safe = _BAD_CHARS.sub("_", name)
    if safe != name or len(safe) > _MAX_NAME:
        # Keep distinct names distinct after substitution or truncation.
        digest = hashlib.sha1(name.encode("utf-8", "surrogatepass")).hexdigest()[:10]
        safe = f"{safe[:_MAX_NAME]}-{digest}"
    if safe in ("", ".", ".."):
        raise SandboxError(f"invalid cgroup name {name!r}",
                           hint="use letters, digits, '_', '.' or '-'")
    return safe


class AgentCgroup:
    """One agent's cgroup, in every controller Corral uses."""

    def __init__(self, name: str, paths: dict[str, str],
                 version: Literal["v1", "v2"]) -> None:
        self.name = name
        self.paths = dict(paths)  # controller -> group dir
        self.version = version
        self._dirs = tuple(dict.fromkeys(self.paths.values()))  # v2: one dir for all
        # Precomputed so add_pid does only os.open/os.write/os.close in a forked child.
        self._procs_files = tuple(os.path.join(d, "cgroup.procs") for d in self._dirs)

    def __repr__(self) -> str:
        return f"AgentCgroup({self.name!r}, {self.version}, {self.paths!r})"

    def add_pid(self, pid: int) -> None:
        """Move ``pid`` into the group in every controller (safe in a forked child)."""
        data = str(pid).encode()
        for path in self._procs_files:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise SandboxError(f"could not move pid {pid} into cgroup {path}: {exc}") from exc

    def _mem(self, v1: str, v2: str) -> str | None:
        d = self.paths.get("memory")
        if d is None:
            return None
        return os.path.join(d, v1 if self.version == "v1" else v2)

    def memory_failcnt(self) -> int | None:
        """How often usage hit the memory limit (v1 memory.failcnt; v2 memory.events max)."""
        # Best effort: recent kernels (seen on 6.18) leave v1 failcnt at 0 even after an OOM
        # kill, so oom_killed() prefers the oom_kill counter whenever the kernel has one.
        if self.version == "v1":
            path = self._mem("memory.failcnt", "")
            return None if path is None else _read_int(path)
        path = self._mem("", "memory.events")
        if path is None or not os.path.exists(path):
            return None
        return _read_keyed(path).get("max", 0)

    def oom_kills(self) -> int | None:
        """The kernel's count of OOM kills in this group, or None where it has none."""
        path = self._mem("memory.oom_control", "memory.events")
        if path is None:
            return None
        return _read_keyed(path).get("oom_kill")  # v1: kernels >= 4.13 only

    def oom_killed(self, *, killed_by_sigkill: bool | None = None) -> bool:
        """Whether the OOM killer killed a process of this group."""
        kills = self.oom_kills()
        if kills is not None:
            return kills > 0
        # Old v1 kernels: no counter. failcnt > 0 only says the limit was hit, so it needs
        # the process to have died by SIGKILL too (pass killed_by_sigkill when known).
        failcnt = self.memory_failcnt()
        if failcnt is None or failcnt == 0:
            return False
        return killed_by_sigkill is not False

    def memory_usage(self) -> int | None:
        """Current memory charged to the group, in bytes."""
        path = self._mem("memory.usage_in_bytes", "memory.current")
        return None if path is None else _read_int(path)

    def memory_peak(self) -> int | None:
        """Peak memory charged to the group (v2 needs kernel >= 5.19 for memory.peak)."""
        path = self._mem("memory.max_usage_in_bytes", "memory.peak")
        return None if path is None else _read_int(path)

    def pids(self) -> list[int]:
        """Pids of the processes in the group (any controller)."""
        found: set[int] = set()
        for path in self._procs_files:
            for line in (_read(path) or "").split():
                with contextlib.suppress(ValueError):
                    found.add(int(line))
        return sorted(found)

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to every process in the group."""
        if sig == signal.SIGKILL and self.version == "v2":
            kill_file = os.path.join(self._dirs[0], "cgroup.kill") if self._dirs else ""
            if kill_file and os.path.exists(kill_file):  # kernel >= 5.14: atomic, no fork race
                with contextlib.suppress(OSError):
                    _write(kill_file, "1")
                    return
        # Several passes: a process may fork between reading the list and the kill.
        for _ in range(3):
            pids = self.pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    def remove(self) -> bool:
        """Kill everything in the group and remove it; True when no directory is left."""
        self.kill_all()
        deadline = time.monotonic() + _REMOVE_WAIT_S
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
            self.kill_all()
        ok = True
        for d in self._dirs:
            try:
                os.rmdir(d)
            except FileNotFoundError:
                pass
            except OSError as exc:
                log.warning("could not remove cgroup %s: %s", d, exc)
                ok = False
        return ok


class CgroupManager:
    """Creates and cleans up per-agent cgroups under ``<root>/<prefix>``."""

    def __init__(self, support: CgroupSupport, prefix: str = "corral") -> None:
        self.support = support
        self.prefix = sanitize_name(prefix)
        self._live: set[str] = set()
        self._lock = threading.Lock()

    def base_dirs(self) -> dict[str, str]:
        """Controller -> ``<root>/<prefix>``."""
        return {c: os.path.join(r, self.prefix) for c, r in self.support.roots.items()}

    def _version(self) -> Literal["v1", "v2"]:
        if self.support.version == "none" or not self.support.roots:
            raise SandboxUnavailable(f"no usable cgroups on this machine: {self.support.reason}",
                                     hint="use rlimits only, or run where cgroups are writable")
        return self.support.version

    def group(self, name: str) -> AgentCgroup:
        """A handle on the group ``name`` (existing or not), without creating it."""
        safe = sanitize_name(name)
        return AgentCgroup(safe, {c: os.path.join(b, safe) for c, b in self.base_dirs().items()},
                           self._version())

    def create(self, name: str, limits: Limits) -> AgentCgroup:
        """Create the group ``<root>/<prefix>/<name>`` in each usable controller, with limits."""
        version = self._version()
        group = self.group(name)
        created: list[str] = []
        with self._lock:
            try:
                if version == "v2":
                    ctrls = list(self.support.roots)
                    for root in dict.fromkeys(self.support.roots.values()):
                        _enable_v2(root, ctrls)  # failures show up as missing files below
                        os.makedirs(os.path.join(root, self.prefix), exist_ok=True)
                        _enable_v2(os.path.join(root, self.prefix), ctrls)
                for d in group._dirs:
                    os.makedirs(os.path.dirname(d), exist_ok=True)
                    try:
                        os.mkdir(d)
                    except FileExistsError:
                        # A leftover: reuse only if empty, and fresh so old counters are gone.
                        if _read(os.path.join(d, "cgroup.procs")):
                            raise SandboxError(
                                f"cgroup {d} already exists and has processes",
                                hint="another runtime uses the same prefix, or call "
                                     "CgroupManager.cleanup_stale() at startup") from None
                        os.rmdir(d)
                        os.mkdir(d)
                    created.append(d)
                self._write_limits(group, limits)
            except (OSError, SandboxError) as exc:
                for d in reversed(created):
                    _rmdir_quiet(d)
                if isinstance(exc, SandboxError):
                    raise
                raise SandboxError(f"could not create cgroup for {name!r}: {exc}",
                                   hint="check `corral describe` for what cgroups this "
                                        "machine supports") from exc
            self._live.add(group.name)
        return group

    def _write_limits(self, group: AgentCgroup, limits: Limits) -> None:
        p = group.paths
        v1 = group.version == "v1"
        if limits.memory is not None and "memory" in p:
            mem = str(int(limits.memory))
            if v1:
                _write(os.path.join(p["memory"], "memory.limit_in_bytes"), mem)
                # Same cap on memory+swap so it can't swap around the limit; the file is
                # missing (or refuses) without swap accounting, which is fine.
                with contextlib.suppress(OSError):
                    _write(os.path.join(p["memory"], "memory.memsw.limit_in_bytes"), mem)
            else:
                _write(os.path.join(p["memory"], "memory.max"), mem)
                with contextlib.suppress(OSError):  # absent without swap accounting
                    _write(os.path.join(p["memory"], "memory.swap.max"), "0")
        if limits.cpu is not None and "cpu" in p:
            quota = max(_MIN_CFS_QUOTA_US, round(limits.cpu * CFS_PERIOD_US))
            if v1:
                _write(os.path.join(p["cpu"], "cpu.cfs_period_us"), str(CFS_PERIOD_US))
                _write(os.path.join(p["cpu"], "cpu.cfs_quota_us"), str(quota))
            else:
                _write(os.path.join(p["cpu"], "cpu.max"), f"{quota} {CFS_PERIOD_US}")
        if limits.max_processes is not None and "pids" in p:
            _write(os.path.join(p["pids"], "pids.max"), str(int(limits.max_processes)))

    def forget(self, name: str) -> None:
        """Stop treating ``name`` as live (after its group was removed)."""
        with self._lock:
            self._live.discard(sanitize_name(name))

    def cleanup_stale(self) -> list[str]:
        """Kill and remove leftover groups under our prefix that this manager did not create."""
        if self.support.version == "none":
            return []
        bases = self.base_dirs()
        names: set[str] = set()
        for base in dict.fromkeys(bases.values()):
            try:
                with os.scandir(base) as it:
                    names.update(e.name for e in it if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # no base dir: nothing left over
        with self._lock:
            stale = sorted(names - self._live)
            live = bool(self._live)
        removed = []
        for n in stale:
            group = AgentCgroup(n, {c: os.path.join(b, n) for c, b in bases.items()
                                    if os.path.isdir(os.path.join(b, n))},
                                self._version())
            if group.remove():
                removed.append(n)
        if not live:
            for base in dict.fromkeys(bases.values()):
                _rmdir_quiet(base)  # only succeeds when empty
        return removed
