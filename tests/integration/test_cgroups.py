"""Cgroups: parsing anywhere; real groups, OOM kills, pids and cpu caps where the machine allows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from corral.errors import SandboxError, SandboxUnavailable
from corral.sandbox.cgroups import (
    AgentCgroup,
    CgroupManager,
    CgroupSupport,
    _group_dir,
    _Mount,
    _parse_mountinfo,
    _parse_proc_cgroup,
    detect,
    sanitize_name,
)
from corral.sandbox.limits import Limits

MI = 1 << 20
SUPPORT = detect()
needs_cgroups = pytest.mark.skipif(SUPPORT.version == "none",
                                   reason=f"no usable cgroups here: {SUPPORT.reason}")


def needs(ctrl: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not getattr(SUPPORT, ctrl),
                              reason=f"no usable {ctrl} cgroup here: {SUPPORT.reason}")


# --- parsing and detection, on any machine ----------------------------------------------

MOUNTINFO = textwrap.dedent("""\
    22 1 0:21 / /proc rw,nosuid - proc proc rw
    32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:9 - cgroup cgroup rw,cpu,cpuacct
    35 31 0:32 /docker/abc /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    41 31 0:38 / /sys/fs/cgroup/my\\040dir rw,relatime - cgroup2 cgroup2 rw,nsdelegate
    """)


def test_parse_mountinfo() -> None:
    mounts = _parse_mountinfo(MOUNTINFO)
    assert [m.fstype for m in mounts] == ["cgroup", "cgroup", "cgroup2"]
    assert mounts[0].options >= {"cpu", "cpuacct"}
    assert mounts[1].root == "/docker/abc"
    assert mounts[2].point == "/sys/fs/cgroup/my dir"


def test_parse_proc_cgroup() -> None:
    v1, v2 = _parse_proc_cgroup("4:memory:/a/b\n2:cpu,cpuacct:/\n1:name=systemd:/x\n0::/u\n")
    assert v1["memory"] == "/a/b" and v1["cpu"] == "/" and v1["cpuacct"] == "/"
    assert v2 == "/u"
    assert _parse_proc_cgroup("0::/\n") == ({}, "/")


def test_group_dir_maps_paths_through_the_mount_root(tmp_path: Path) -> None:
    (tmp_path / "a" / "b").mkdir(parents=True)
    whole = _Mount("/", str(tmp_path), "cgroup2", frozenset())
    sub = _Mount("/docker", str(tmp_path), "cgroup", frozenset({"memory"}))
    assert _group_dir(whole, "/a/b") == str(tmp_path / "a" / "b")
    assert _group_dir(whole, "/") == str(tmp_path)
    assert _group_dir(sub, "/docker/a") == str(tmp_path / "a")
    assert _group_dir(sub, "/elsewhere") is None
    assert _group_dir(whole, "/missing") is None


def test_detect_without_proc_says_none(tmp_path: Path) -> None:
    s = detect(proc=str(tmp_path))
    assert s.version == "none" and not (s.memory or s.cpu or s.pids)
    assert "not readable" in s.reason


def test_detect_v2_without_controllers_in_the_group(tmp_path: Path) -> None:
    # A fake cgroup2 "mount" on a plain directory: controllers listed, but the probe group
    # gets no memory.max etc., as on a real v2 machine where subtree_control can't be set.
    fs = tmp_path / "cg"
    (fs / "svc").mkdir(parents=True)
    (fs / "svc" / "cgroup.controllers").write_text("cpu memory\n")
    proc = tmp_path / "proc" / "self"
    proc.mkdir(parents=True)
    (proc / "cgroup").write_text("0::/svc\n")
    (proc / "mountinfo").write_text(f"41 31 0:38 / {fs} rw - cgroup2 cgroup2 rw\n")
    s = detect(proc=str(tmp_path / "proc"))
    assert s.version == "none"
    assert "can't enable it" in s.reason and "pids: not in" in s.reason
    assert os.listdir(fs / "svc") == ["cgroup.controllers"]  # probe removed, nothing created


def test_sanitize_name() -> None:
    assert sanitize_name("agent-1.v2_x") == "agent-1.v2_x"
    bad = sanitize_name("../etc/x y")
    assert "/" not in bad and " " not in bad and bad.startswith(".._etc_x_y-")
    assert sanitize_name("a/b") != sanitize_name("a_b")
    assert len(sanitize_name("x" * 400)) < 255
    with pytest.raises(SandboxError):
        sanitize_name("..")


def test_manager_without_cgroups_raises_unavailable() -> None:
    m = CgroupManager(CgroupSupport.none("read-only"))
    with pytest.raises(SandboxUnavailable, match="read-only"):
        m.create("a", Limits())
    assert m.cleanup_stale() == []


# --- real groups ------------------------------------------------------------------------


@pytest.fixture
def manager() -> Iterator[CgroupManager]:
    prefix = f"corral-test-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    m = CgroupManager(SUPPORT, prefix)
    try:
        yield m
    finally:
        # A fresh manager owns nothing, so it removes every group under the prefix.
        CgroupManager(SUPPORT, prefix).cleanup_stale()


def start_in(group: AgentCgroup, code: str, stdin: int | None = None) -> subprocess.Popen[str]:
    """Start python -c code already inside the group (it joins before exec)."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], text=True,
                            stdin=stdin, stdout=subprocess.PIPE,
                            preexec_fn=lambda: group.add_pid(os.getpid()))


def assert_gone(group: AgentCgroup) -> None:
    assert group.paths
    for d in group.paths.values():
        assert not os.path.exists(d), d


@needs_cgroups
def test_create_and_remove(manager: CgroupManager) -> None:
    g = manager.create("agent/one", Limits(memory=64 * MI, cpu=0.5, max_processes=10))
    try:
        assert set(g.paths) == set(SUPPORT.roots)
        for ctrl, d in g.paths.items():
            assert os.path.isdir(d)
            assert d.startswith(SUPPORT.roots[ctrl] + "/")
            assert os.path.basename(d) == g.name and "/" not in g.name
        if SUPPORT.memory:
            assert g.memory_usage() is not None
            assert not g.oom_killed()
        assert g.pids() == []
        with pytest.raises(SandboxError):  # same name while live: refused, nothing broken
            p = start_in(g, "import time; time.sleep(30)")
            try:
                manager.create("agent/one", Limits())
            finally:
                p.kill()
                p.wait()
    finally:
        assert g.remove()
    assert_gone(g)
    assert g.remove()  # already gone: no error


@needs_cgroups
@needs("memory")
def test_oom_kill_is_detected(manager: CgroupManager) -> None:
    g = manager.create("oom", Limits(memory=64 * MI))
    try:
        p = start_in(g, """
            b = bytearray(300 * 1024 * 1024)
            for i in range(0, len(b), 4096):
                b[i] = 1
            print("survived", flush=True)
        """)
        out, _ = p.communicate(timeout=60)
        assert p.returncode == -signal.SIGKILL, out
        assert g.oom_killed(killed_by_sigkill=True)
        kills = g.oom_kills()
        if kills is not None:
            assert kills >= 1
        else:  # old v1 kernels: no counter, only failcnt
            assert (g.memory_failcnt() or 0) > 0
        peak = g.memory_peak()
        assert peak is None or peak <= 70 * MI
    finally:
        g.remove()
    assert_gone(g)


@needs_cgroups
@needs("pids")
def test_pids_max_stops_fork(manager: CgroupManager) -> None:
    g = manager.create("forker", Limits(max_processes=5))
    try:
        p = start_in(g, """
            import os, time
            kids = []
            try:
                for _ in range(20):
                    pid = os.fork()
                    if pid == 0:
                        os.closerange(0, 3)  # don't hold the test's stdout pipe open
                        time.sleep(30)
                        os._exit(0)
                    kids.append(pid)
                print("forked", len(kids), flush=True)
            except BlockingIOError:
                print("EAGAIN", len(kids), flush=True)
        """)
        out, _ = p.communicate(timeout=30)
        word, n = out.split()
        assert word == "EAGAIN" and int(n) < 5
        assert 0 < len(g.pids()) <= 5  # the sleepers are still in the group
    finally:
        assert g.remove()
    assert_gone(g)


@needs_cgroups
@needs("cpu")
def test_cpu_quota_throttles(manager: CgroupManager) -> None:
    g = manager.create("spinner", Limits(cpu=0.2))
    p = None
    try:
        p = start_in(g, """
            import sys, time
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                pass
            print("done", flush=True)
            sys.stdin.read()
        """, stdin=subprocess.PIPE)
        assert p.stdout is not None and p.stdin is not None
        assert p.stdout.readline().strip() == "done"
        assert p.pid in g.pids()
        times = psutil.Process(p.pid).cpu_times()
        used = times.user + times.system
        p.stdin.close()
        p.wait(timeout=10)
        assert used < 0.6, f"used {used:.2f}s of CPU in 1 s at 0.2 cores"
    finally:
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()
        g.remove()
    assert_gone(g)


@needs_cgroups
def test_cleanup_stale_kills_and_removes_leftovers(manager: CgroupManager) -> None:
    # A runtime that was killed with -9 left "leftover" behind, with a process in it.
    old = manager.create("leftover", Limits(memory=64 * MI))
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        old.add_pid(p.pid)  # joining after start works too
        assert p.pid in old.pids()
        fresh = CgroupManager(SUPPORT, manager.prefix)
        mine = fresh.create("mine", Limits())
        assert fresh.cleanup_stale() == ["leftover"]
        assert p.wait(timeout=5) == -signal.SIGKILL
        assert_gone(old)
        assert all(os.path.isdir(d) for d in mine.paths.values())  # its own group is kept
        assert mine.remove()
        fresh.forget("mine")
        assert fresh.cleanup_stale() == []
        assert not any(os.path.exists(b) for b in fresh.base_dirs().values())
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


@needs_cgroups
def test_add_pid_in_forked_child(manager: CgroupManager) -> None:
    g = manager.create("forked", Limits())
    try:
        pid = os.fork()
        if pid == 0:  # the zygote's path: join with our own pid, then "run the agent"
            try:
                g.add_pid(os.getpid())
                time.sleep(0.2)
            finally:
                os._exit(0)
        deadline = time.monotonic() + 5
        while pid not in g.pids() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pid in g.pids()
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    finally:
        assert g.remove()
