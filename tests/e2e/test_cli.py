"""The CLI end to end: a real `corral up` process, and `corral ...` commands as subprocesses.

One `up` serves the whole module (tests run in file order; the last one stops it).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
HELLO = ROOT / "examples" / "hello"
CORRAL = [sys.executable, "-m", "corral.cli.main"]

pytestmark = [pytest.mark.timeout(90),
              pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets and signals")]


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    home: Path
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CORRAL_HOME"}
    env["COLUMNS"] = "200"
    return env


def corral(up: Up, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run one CLI command against ``up``'s home."""
    return subprocess.run([*CORRAL, *args, "--home", str(up.home)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT, env=_env())


def ok(up: Up, *args: str) -> str:
    r = corral(up, *args)
    assert r.returncode == 0, f"corral {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r.stdout


def _start(home: Path, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as f:
        return subprocess.Popen([*CORRAL, "up", "--home", str(home)], stdout=f,
                                stderr=subprocess.STDOUT, cwd=ROOT, env=_env())


@contextmanager
def serving(prefix: str, log: Path) -> Iterator[Up]:
    """A `corral up` in a fresh home, served and ready; stopped with SIGINT on the way out."""
    home = Path(tempfile.mkdtemp(prefix=prefix))  # short: AF_UNIX paths are limited
    proc = _start(home, log)
    u = Up(proc, home, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, f"`corral up` exited early:\n{u.output()}"
            if (home / "corral.sock").exists() and corral(u, "get", "agents").returncode == 0:
                break
            assert time.monotonic() < deadline, f"`corral up` never served:\n{u.output()}"
            time.sleep(0.1)
        yield u
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    with serving("corral-e2e-", tmp_path_factory.mktemp("up") / "up.log") as u:
        yield u


def wait_for(check: object, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# ------------------------------------------------------------------------------------------


def test_banner_and_private_socket(up: Up) -> None:
    sock = up.home / "corral.sock"
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(up.home.stat().st_mode) == 0o700
    wait_for(lambda: "Ctrl-C to stop" in up.output(), "the banner")
    assert "corral get agents" in up.output()


def test_apply_and_get(up: Up) -> None:
    assert "agent/hello created" in ok(up, "apply", "-f", "examples/hello")
    assert "agent/hello unchanged" in ok(up, "apply", "-f", str(HELLO))

    table = ok(up, "get", "agents").splitlines()
    assert table[0].split() == ["NAME", "NAMESPACE", "MODE", "ISOLATION", "STATUS", "READY",
                                "RESTARTS", "TASKS", "FAILED", "AGE"]
    assert table[1].split()[:6] == ["hello", "default", "persistent", "process", "Running", "1/1"]

    [row] = json.loads(ok(up, "get", "agents", "-o", "json"))
    assert (row["name"], row["status"], row["ready"]) == ("hello", "Running", "1/1")
    assert json.loads(ok(up, "get", "agent", "hello", "-o", "json"))["name"] == "hello"


def test_request(up: Up) -> None:
    result = json.loads(ok(up, "request", "hello", '{"name": "ada"}'))
    assert result["greeting"] == "hello, ada!"
    assert json.loads(ok(up, "request", "hello", "--handler", "greet", '{"name": "bo"}',
                         "--timeout", "10"))["greeting"] == "hello, bo!"
    # Not JSON: sent as a plain string, which this handler can't take; the error says so.
    r = corral(up, "request", "hello", "ada")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: agent 'hello': 'str' object has no attribute 'get'" in r.stderr


def test_send_and_task(up: Up) -> None:
    task_id = ok(up, "send", "hello", '{"name": "bob"}').strip()
    assert len(task_id) == 32

    def done() -> bool:
        return json.loads(ok(up, "task", task_id, "-o", "json"))["status"] == "done"
    wait_for(done, "the sent task")
    assert json.loads(ok(up, "task", task_id, "-o", "json"))["result"]["greeting"] == "hello, bob!"
    shown = ok(up, "task", task_id)
    assert "done" in shown and "hello, bob!" in shown


def test_describe(up: Up) -> None:
    text = ok(up, "describe", "agent", "hello")
    for section in ("Name:", "Limits:", "Instances:", "Schedules:", "Stats:", "Events:"):
        assert section in text
    assert "hello-0" in text and "Ready" in text and "memory" in text
    d = json.loads(ok(up, "describe", "agent", "hello", "-o", "json"))
    assert d["instances"][0]["pid"] > 0


def test_logs_and_follow(up: Up) -> None:
    follower = subprocess.Popen([*CORRAL, "logs", "hello", "-f", "--home", str(up.home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                env=_env())
    try:
        assert "scaled to 2" in ok(up, "scale", "hello", "2")
        wait_for(lambda: json.loads(ok(up, "get", "agent", "hello", "-o", "json"))["ready"]
                 == "2/2", "2 replicas")
        ok(up, "scale", "hello", "1")
        wait_for(lambda: "instance ended" in ok(up, "logs", "hello"), "the log line")
        time.sleep(0.5)  # let the follower print it
    finally:
        follower.send_signal(signal.SIGINT)
        out, errs = follower.communicate(timeout=10)
    assert "hello-1" in out.decode() and "instance ended" in out.decode(), errs.decode()
    assert b"Traceback" not in errs

    lines = ok(up, "logs", "hello", "--tail", "1").splitlines()
    assert len(lines) == 1 and "hello-1" in lines[0]
    recs = json.loads(ok(up, "logs", "hello", "-o", "json"))
    assert {"ts", "instance", "level", "message"} <= set(recs[0])


def test_stats(up: Up) -> None:
    s = json.loads(ok(up, "stats", "-o", "json"))
    assert s["agents"] == 1 and s["tasks_executed"] >= 3
    assert "Agents:" in ok(up, "stats")


def test_bad_manifest_shows_every_problem(up: Up, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: corral/v1\nkind: Agent\nmetadata: {name: broken}\n"
                   "spec:\n  entrypoint: hello:Hello\n  replcas: 2\n"
                   "  resources: {memory: 256Mb}\n")
    r = corral(up, "apply", "-f", str(bad))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("error: 2 problem(s)")
    assert f"{bad}: spec.replcas: unknown field 'replcas' (did you mean 'replicas'?)" in r.stderr
    assert f"{bad}: spec.resources.memory: invalid value" in r.stderr and "'256Mb'" in r.stderr
    assert "nothing was applied" in r.stderr

    j = corral(up, "apply", "-f", str(bad), "-o", "json")
    assert j.returncode == 1
    info = json.loads(j.stderr)["error"]
    assert info["type"] == "SpecError" and len(info["problems"]) == 2


def test_missing_agent_is_a_clear_error(up: Up) -> None:
    r = corral(up, "request", "nope", '{"x": 1}')
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "error: no agent named 'nope'" in r.stderr
    assert "corral get agents" in r.stderr


def test_no_runtime_is_a_clear_error(up: Up) -> None:
    empty = Path(tempfile.mkdtemp(prefix="corral-none-"))
    try:
        r = subprocess.run([*CORRAL, "get", "agents", "--home", str(empty)], capture_output=True,
                           text=True, timeout=30, env=_env())
    finally:
        shutil.rmtree(empty)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(empty / "corral.sock") in r.stderr and "corral up" in r.stderr


def test_second_up_on_the_same_home_is_refused(up: Up, tmp_path: Path) -> None:
    proc = _start(up.home, tmp_path / "second.log")
    assert proc.wait(30) == 1
    text = (tmp_path / "second.log").read_text()
    assert "another runtime is already serving" in text and "Traceback" not in text
    assert (up.home / "corral.sock").exists()  # the first one still serves
    ok(up, "get", "agents")


def test_publish_reaches_subscribed_agents(up: Up) -> None:
    assert corral(up, "apply", "-f", str(ROOT / "examples" / "newsroom")).returncode == 0
    r = corral(up, "publish", "news.science", '{"id": 1, "headline": "Water found"}',
               "--guarantee", "at-least-once")
    assert r.returncode == 0 and len(r.stdout.strip()) == 32, r.stderr
    deadline = time.monotonic() + 20
    while True:
        out = corral(up, "request", "archive", "--handler", "count", "-o", "json")
        if out.returncode == 0 and json.loads(out.stdout) == 1:
            break
        assert time.monotonic() < deadline, out.stdout + out.stderr
        time.sleep(0.1)
    bad = corral(up, "publish", "news..bad", "x")
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr
    bad = corral(up, "publish", "news.x", "x", "--guarantee", "maybe")
    assert bad.returncode == 1 and "guarantee" in bad.stderr
    for name in ("reporter", "editor", "archive"):
        assert corral(up, "delete", name).returncode == 0


def test_keys_export_and_trust(up: Up, tmp_path: Path) -> None:
    exported = json.loads(ok(up, "keys", "export"))
    assert isinstance(exported, dict)
    good = {"agent-on-b": {"5ae7b2a9ba9b0a42": "00" * 32}}  # a key id that does not match
    path = tmp_path / "keys.json"
    path.write_text(json.dumps(good))
    bad = corral(up, "keys", "trust", str(path))
    assert bad.returncode == 1 and "no key was trusted" in bad.stderr and "its key id is" in bad.stderr
    path.write_text("{not json")
    bad = corral(up, "keys", "trust", str(path))
    assert bad.returncode == 1 and "can't read keys" in bad.stderr and "Traceback" not in bad.stderr
    from corral.bus.crypto import AgentKeys

    remote = AgentKeys(tmp_path / "remote")
    remote.key_for("agent-on-b")
    path.write_text(json.dumps(remote.export_public()))
    assert "trusted 1 key(s)" in ok(up, "keys", "trust", str(path))


def test_policy_and_audit_commands(up: Up, tmp_path: Path) -> None:
    bad = tmp_path / "bad.cedar"
    bad.write_text('permit (principal, action == Action::"topic.publsh", resource);\n')
    r = corral(up, "policy", "check", str(bad))
    assert r.returncode == 1 and "bad.cedar" in r.stderr and "Traceback" not in r.stderr
    assert "1:" in r.stderr or "line 1" in r.stderr, r.stderr
    good = tmp_path / "policy.yaml"
    good.write_text("apiVersion: corral/v1\nkind: Policy\nmetadata: {name: quiet}\nspec:\n"
                    '  policy: forbid (principal, action == Action::"topic.publish", '
                    'resource == Topic::"secret.x");\n')
    assert "ok: 1 policy valid" in ok(up, "policy", "check", str(good))
    assert "policy/default/quiet created" in ok(up, "apply", "-f", str(good))
    d = corral(up, "policy", "eval", "-p", "user:client", "-a", "topic.publish",
               "-r", "topic:secret.x", "-c", '{"payloadSize": 3}', "-o", "json")
    assert d.returncode == 2 and json.loads(d.stdout)["policies"] == ["Policy/default/quiet:1"]
    denied = corral(up, "publish", "secret.x", "1")
    assert denied.returncode == 1 and "forbidden by policy" in denied.stderr
    assert json.loads(ok(up, "audit", "verify", "-o", "json"))["ok"] is True
    rows = json.loads(ok(up, "audit", "query", "--outcome", "deny", "-o", "json"))
    assert any(r["data"]["action"] == "topic.publish" for r in rows)
    export = tmp_path / "trail.jsonl"
    ok(up, "audit", "export", str(export))
    v = subprocess.run([sys.executable, str(ROOT / "examples" / "audit_verify.py"), str(export)],
                       capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr


def test_delete(up: Up) -> None:
    assert "agent/hello deleted" in ok(up, "delete", "hello")
    assert json.loads(ok(up, "get", "agents", "-o", "json")) == []
    r = corral(up, "get", "agent", "hello")
    assert r.returncode == 1 and "no agent named 'hello'" in r.stderr


def test_sigint_stops_up_cleanly(up: Up) -> None:
    ok(up, "apply", "-f", str(HELLO))  # something to stop
    parent = psutil.Process(up.proc.pid)
    children = parent.children(recursive=True)
    assert children, "expected the zygote and a worker"

    follower = subprocess.Popen([*CORRAL, "logs", "hello", "-f", "--home", str(up.home)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
                                env=_env())
    # It is connected once it printed a stored line (hello-1 ended in test_logs_and_follow).
    assert select.select([follower.stdout], [], [], 20)[0], "the follower printed nothing"
    first = follower.stdout.readline()  # type: ignore[union-attr]

    up.proc.send_signal(signal.SIGINT)
    assert up.proc.wait(10) == 0, up.output()
    # A follower sees the runtime stop as the end of its stream, not as an error.
    out, errs = follower.communicate(timeout=10)
    assert follower.returncode == 0, errs.decode()
    assert b"instance ended" in first + out
    _, alive = psutil.wait_procs(children, timeout=5)
    assert not alive, f"left behind: {alive}"
    assert not (up.home / "corral.sock").exists()
    home = str(up.home)
    leftovers = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if home in " ".join(p.info["cmdline"] or []):
                leftovers.append(p)
        except psutil.Error:
            pass
    assert not leftovers
    assert "Traceback" not in up.output()

