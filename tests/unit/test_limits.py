"""Limits: plan() for describe, and apply_in_child in real forked children."""

from __future__ import annotations

import ctypes
import errno
import json
import os
import resource
import select
import signal
import sys
import time
from collections.abc import Callable

import pytest

from corral.errors import SandboxError
from corral.sandbox.cgroups import CgroupSupport
from corral.sandbox.limits import Enforcement, Limits, apply_in_child, format_bytes, plan

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")

MI = 1 << 20
PR_GET_PDEATHSIG = 2
PR_GET_NO_NEW_PRIVS = 39

V1 = CgroupSupport("v1", True, True, True,
                   {"memory": "/sys/fs/cgroup/memory/x", "cpu": "/sys/fs/cgroup/cpu",
                    "pids": "/sys/fs/cgroup/pids"}, "")
V2 = CgroupSupport("v2", True, True, True, dict.fromkeys(("memory", "cpu", "pids"), "/sys/fs/cgroup/x"), "")
V2_NO_PIDS = CgroupSupport("v2", True, True, False, dict.fromkeys(("memory", "cpu"), "/sys/fs/cgroup/x"),
                           "cgroup v2 pids: not in /sys/fs/cgroup/x/cgroup.controllers")
NONE = CgroupSupport.none("no writable cgroups (read-only /sys/fs/cgroup)")
ALL = Limits(memory=256 * MI, cpu=0.5, cpu_time=29.5, max_open_files=256, max_processes=32)


def rows(enf: list[Enforcement]) -> dict[str, Enforcement]:
    return {e.limit: e for e in enf}


# --- Limits ---------------------------------------------------------------------------


def test_limits_round_trip_is_json() -> None:
    lim = Limits(memory=64 * MI, cpu=1.5, cpu_time=3.0, max_open_files=10, max_processes=4, nice=5)
    wire = json.loads(json.dumps(lim.to_dict()))
    assert Limits.from_dict(wire) == lim
    assert Limits.from_dict({}) == Limits()
    assert Limits().is_empty() and not lim.is_empty()


def test_limits_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="memory"):
        Limits(memory=0)
    with pytest.raises(ValueError, match="cpu"):
        Limits(cpu=-1)
    with pytest.raises(ValueError, match="nice"):
        Limits(nice=40)
    with pytest.raises(ValueError, match="unknown"):
        Limits.from_dict({"memroy": 1})


def test_format_bytes() -> None:
    assert format_bytes(256 * MI) == "256Mi"
    assert format_bytes(2 << 30) == "2Gi"
    assert format_bytes(1000) == "1000"


# --- plan -------------------------------------------------------------------------------


def test_plan_v1_root() -> None:
    r = rows(plan(ALL, V1, is_root=True))
    assert list(r) == ["memory", "cpu", "cpuTime", "maxOpenFiles", "maxProcesses"]
    assert all(e.enforced for e in r.values())
    assert r["memory"].value == "256Mi"
    assert r["memory"].by == "cgroup v1 memory.limit_in_bytes + RLIMIT_AS"
    assert "virtual" in r["memory"].note
    assert r["cpu"].value == "0.5 cores" and "cfs_quota_us" in r["cpu"].by
    assert r["cpuTime"].value == "30s" and r["cpuTime"].by == "RLIMIT_CPU"
    assert r["maxOpenFiles"].by == "RLIMIT_NOFILE"
    assert r["maxProcesses"].by == "cgroup v1 pids.max"
    assert "ignored for root" in r["maxProcesses"].note
    assert "threads" in r["maxProcesses"].note


def test_plan_v2_non_root_without_rlimit_as() -> None:
    r = rows(plan(ALL, V2, is_root=False, use_rlimit_as=False))
    assert r["memory"].by == "cgroup v2 memory.max" and r["memory"].enforced
    assert "RLIMIT_AS" not in r["memory"].note
    assert r["cpu"].by == "cgroup v2 cpu.max"
    assert r["maxProcesses"].by == "cgroup v2 pids.max + RLIMIT_NPROC"
    assert "every process and thread of this user" in r["maxProcesses"].note


def test_plan_v2_missing_pids_root_is_honest() -> None:
    r = rows(plan(ALL, V2_NO_PIDS, is_root=True))
    assert not r["maxProcesses"].enforced
    assert "ignored for root" in r["maxProcesses"].note
    assert "pids: not in" in r["maxProcesses"].note  # the reason is passed on


def test_plan_none_root() -> None:
    r = rows(plan(ALL, NONE, is_root=True))
    assert r["memory"].enforced and r["memory"].by == "RLIMIT_AS"
    assert "not resident memory" in r["memory"].note and "read-only" in r["memory"].note
    assert not r["cpu"].enforced and r["cpu"].by == "none"
    assert r["cpuTime"].enforced and r["maxOpenFiles"].enforced
    assert not r["maxProcesses"].enforced and "ignored for root" in r["maxProcesses"].note


def test_plan_none_non_root() -> None:
    r = rows(plan(ALL, NONE, is_root=False, use_rlimit_as=False))
    assert not r["memory"].enforced
    assert r["maxProcesses"].enforced and r["maxProcesses"].by == "RLIMIT_NPROC"


def test_plan_lists_only_set_limits() -> None:
    assert plan(Limits(), V1, is_root=True) == []
    r = rows(plan(Limits(cpu=1), NONE, is_root=False))
    assert list(r) == ["cpu"] and r["cpu"].value == "1 core"
    assert all(isinstance(v, str | bool) for v in r["cpu"].to_dict().values())


# --- apply_in_child, in real forked children ------------------------------------------


def in_child(fn: Callable[[], bytes], timeout: float = 20.0) -> tuple[bytes, int]:
    """Run fn in a forked child; return (what it reported through a pipe, wait status)."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 0
        try:
            os.close(r)
            # No core files from the SIGXCPU test.
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            out = fn()
            os.write(w, out)
        except BaseException as exc:
            code = 1
            try:
                os.write(w, f"EXC {type(exc).__name__}: {exc}".encode())
            except BaseException:
                pass
        finally:
            os._exit(code)
    os.close(w)
    chunks = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                pytest.fail("child timed out")
            data = os.read(r, 65536)
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(r)
        _, status = os.waitpid(pid, 0)
    return b"".join(chunks), status


def test_rlimits_read_back_in_child() -> None:
    nice = min(19, os.getpriority(os.PRIO_PROCESS, 0) + 3)
    lim = Limits(memory=1 << 30, cpu_time=9.2, max_open_files=100, max_processes=500, nice=nice)

    def child() -> bytes:
        apply_in_child(lim)
        return json.dumps({
            "as": resource.getrlimit(resource.RLIMIT_AS),
            "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
            "nproc": resource.getrlimit(resource.RLIMIT_NPROC),
            "cpu": resource.getrlimit(resource.RLIMIT_CPU),
            "nice": os.getpriority(os.PRIO_PROCESS, 0),
        }).encode()

    out, status = in_child(child)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, out
    got = json.loads(out)
    assert got["as"] == [1 << 30, 1 << 30]
    assert got["nofile"] == [100, 100]
    assert got["nproc"] == [500, 500]
    assert got["cpu"] == [10, 11]  # rounded up; hard = soft + 1
    assert got["nice"] == nice


def test_no_rlimit_as_when_disabled() -> None:
    def child() -> bytes:
        before = resource.getrlimit(resource.RLIMIT_AS)
        apply_in_child(Limits(memory=64 * MI), use_rlimit_as=False)
        return b"same" if resource.getrlimit(resource.RLIMIT_AS) == before else b"changed"

    assert in_child(child)[0] == b"same"


def test_rlimit_as_gives_memory_error() -> None:
    def child() -> bytes:
        apply_in_child(Limits(memory=64 * MI))
        try:
            buf = bytearray(200 * MI)
        except MemoryError:
            return b"MemoryError"
        return b"allocated %d" % len(buf)

    out, status = in_child(child)
    assert out == b"MemoryError"
    assert os.WIFEXITED(status)


def test_rlimit_nofile_gives_emfile() -> None:
    def child() -> bytes:
        apply_in_child(Limits(max_open_files=32))
        fds = []
        try:
            for _ in range(64):
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as exc:
            return b"errno %d after %d" % (exc.errno or 0, len(fds))
        return b"opened all"

    out, _ = in_child(child)
    assert out.startswith(b"errno %d " % errno.EMFILE), out
    assert int(out.split()[-1]) < 32


def test_rlimit_cpu_gives_sigxcpu() -> None:
    def child() -> bytes:
        apply_in_child(Limits(cpu_time=1))
        end = time.monotonic() + 15
        while time.monotonic() < end:
            pass
        return b"survived"

    out, status = in_child(child)
    assert out == b""
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGXCPU


def test_pdeathsig_and_no_new_privs_set() -> None:
    def child() -> bytes:
        apply_in_child(Limits())
        libc = ctypes.CDLL(None, use_errno=True)
        sig = ctypes.c_int(0)
        assert libc.prctl(PR_GET_PDEATHSIG, ctypes.byref(sig), 0, 0, 0) == 0
        nnp = libc.prctl(PR_GET_NO_NEW_PRIVS, 0, 0, 0, 0)
        return b"%d %d" % (sig.value, nnp)

    out, _ = in_child(child)
    assert out == b"%d 1" % signal.SIGKILL


def test_pdeathsig_kills_child_when_parent_dies() -> None:
    r, w = os.pipe()

    def middle() -> bytes:
        ready_r, ready_w = os.pipe()
        if os.fork() == 0:  # grandchild: arm PDEATHSIG, say so, then wait to be killed
            try:
                apply_in_child(Limits())
                os.write(ready_w, b"x")
                time.sleep(30)
            finally:
                os._exit(0)
        os.read(ready_r, 1)
        return b""  # middle exits: the grandchild should get SIGKILL

    # The grandchild inherits w; when it dies, the read end sees EOF.
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            middle()
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    start = time.monotonic()
    ready = select.select([r], [], [], 10)[0]
    data = os.read(r, 1) if ready else b"timeout"
    os.close(r)
    assert data == b""
    assert time.monotonic() - start < 10


def test_parent_already_gone_kills_child() -> None:
    def child() -> bytes:
        apply_in_child(Limits(), parent_pid=os.getppid() + 1_000_000)
        return b"survived"

    out, status = in_child(child)
    assert out == b""
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def _drop_root() -> None:
    # Privilege matters here: root (CAP_SYS_RESOURCE) may raise any hard limit.
    if os.geteuid() == 0:
        os.setgroups([])
        os.setresgid(65534, 65534, 65534)
        os.setresuid(65534, 65534, 65534)


def test_nofile_above_hard_limit_falls_back_to_hard() -> None:
    def child() -> bytes:
        _drop_root()
        resource.setrlimit(resource.RLIMIT_NOFILE, (50, 50))
        apply_in_child(Limits(max_open_files=1000))
        return b"%d %d" % resource.getrlimit(resource.RLIMIT_NOFILE)

    assert in_child(child)[0] == b"50 50"


def test_impossible_limit_raises_sandbox_error() -> None:
    def child() -> bytes:
        _drop_root()
        resource.setrlimit(resource.RLIMIT_CPU, (100, 100))
        try:
            apply_in_child(Limits(cpu_time=1000))
        except SandboxError:
            return b"SandboxError"
        return b"applied"

    assert in_child(child)[0] == b"SandboxError"
