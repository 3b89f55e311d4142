"""`corral dlq` end to end: a poison message dead-lettered by a real runtime, then listed,
shown, replayed (and dead-lettered again) and purged through the CLI.

One `up` serves the whole module (tests run in file order and build on each other).
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_cli import Up, _env, corral, ok, serving, wait_for

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ROOT / "tests" / "agents"

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(sys.platform == "win32", reason="Unix sockets and signals")]

MANIFESTS = f"""\
apiVersion: corral/v1
kind: Agent
metadata: {{name: listener}}
spec:
  entrypoint: testagents:Listener
  pythonPath: [{AGENTS}]
  subscriptions: [{{subject: news.*, handler: on_news}}]
---
apiVersion: corral/v1
kind: Agent
metadata: {{name: caller}}
spec:
  entrypoint: testagents:Listener
  pythonPath: [{AGENTS}]
"""


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    tmp = tmp_path_factory.mktemp("dlq")
    with serving("corral-dlq-", tmp / "up.log") as u:
        (tmp / "agents.yaml").write_text(MANIFESTS)
        ok(u, "apply", "-f", str(tmp / "agents.yaml"))
        yield u


def letters(up: Up, *args: str) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = json.loads(ok(up, "dlq", "ls", "-o", "json", *args))
    return rows


def failing(up: Up, *args: str) -> subprocess.CompletedProcess[str]:
    r = corral(up, *args)
    assert r.returncode == 1, f"corral {' '.join(args)} should fail:\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr
    return r


def test_empty_queue(up: Up) -> None:
    r = corral(up, "dlq", "ls")
    assert r.returncode == 0 and "No dead letters." in r.stderr
    assert letters(up) == []


def test_poison_message_is_listed_and_shown(up: Up) -> None:
    assert json.loads(ok(up, "request", "caller", '"poison"', "--handler", "shout")) == "published"
    wait_for(lambda: letters(up), "the poison message to be dead-lettered", timeout=60)
    [row] = letters(up)
    assert (row["subject"], row["sender"], row["delivered"]) == ("news.shout", "caller", 5)
    assert "cannot digest poison" in row["reason"]

    table = ok(up, "dlq", "ls").splitlines()
    assert table[0].split() == ["SEQ", "TIME", "SUBSCRIPTION", "SUBJECT", "SENDER", "DELIVERED",
                                "REASON"]
    assert table[1].split()[0] == str(row["seq"]) and "news.shout" in table[1]
    assert letters(up, "--subscription", "nope") == []
    assert [r["seq"] for r in letters(up, "--subscription", row["subscription"])] == [row["seq"]]

    shown = ok(up, "dlq", "show", str(row["seq"]))
    for text in ("Subscription:", "cannot digest poison", "Envelope:", "news.shout", "caller",
                 "at-least-once", '"poison"', row["message_id"]):
        assert text in shown, text
    d = json.loads(ok(up, "dlq", "show", str(row["seq"]), "-o", "json"))
    assert d["envelope"]["id"] == row["message_id"] and d["envelope"]["payload"] == '"poison"'


def test_errors(up: Up) -> None:
    r = failing(up, "dlq", "show", "9999")
    assert "error: no dead letter with seq 9999" in r.stderr
    r = failing(up, "dlq", "show", "9999", "-o", "json")
    assert json.loads(r.stderr)["error"]["message"] == "no dead letter with seq 9999"
    assert "give exactly one of" in failing(up, "dlq", "replay").stderr
    assert "give exactly one of" in failing(up, "dlq", "replay", "1", "--all").stderr
    assert "no dead letter with seq 9999" in failing(up, "dlq", "replay", "9999").stderr


def test_replay_redelivers_the_original_message(up: Up) -> None:
    [row] = letters(up)
    out = ok(up, "dlq", "replay", str(row["seq"]))
    assert "replayed 1 dead letter(s)" in out
    # Still poison: the listener gets it again and it comes back under a new seq.
    wait_for(lambda: [r["seq"] for r in letters(up)] not in ([], [row["seq"]]),
             "the replayed message to be dead-lettered again", timeout=60)
    [again] = letters(up)
    assert again["seq"] > row["seq"] and again["message_id"] == row["message_id"]


def test_purge(up: Up) -> None:
    r = subprocess.run([sys.executable, "-m", "corral.cli.main", "dlq", "purge", "--home",
                        str(up.home)], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                       timeout=60, cwd=ROOT, env=_env())
    assert r.returncode == 1 and "without confirmation (pass --yes)" in r.stderr
    assert len(letters(up)) == 1
    assert "purged 0 dead letter(s)" in ok(up, "dlq", "purge", "-s", "nope", "--yes")
    assert json.loads(ok(up, "dlq", "purge", "-o", "json")) == {"purged": 1}
    assert letters(up) == []
