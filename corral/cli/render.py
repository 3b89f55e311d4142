"""How the CLI shows things: kubectl-like tables, describe sections and log lines (rich)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

__all__ = [
    "age",
    "agents_table",
    "dead_letter_view",
    "dead_letters_table",
    "describe_agent",
    "kv_table",
    "log_line",
    "print_json",
    "quantity",
    "show",
    "stats_view",
    "table",
    "timestamp",
]


def age(seconds: float | None) -> str:
    """kubectl's AGE: 42s, 5m, 3h, 2d."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    if s < 172800:
        return f"{s // 3600}h"
    return f"{s // 86400}d"


def quantity(n: float | None) -> str:
    """Bytes in binary units: 19243008 -> 18.4Mi."""
    if n is None:
        return "-"
    for unit, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(int(n))


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    """A borderless table with upper-case headers, like kubectl's."""
    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold")
    for h in headers:
        t.add_column(h.upper(), overflow="fold")
    for row in rows:
        t.add_row(*(Text(_cell(v)) for v in row))
    return t


def kv_table(pairs: Iterable[tuple[str, Any]]) -> Table:
    """Two columns, "Key:" and value, for the summary of describe."""
    t = Table(box=None, pad_edge=False, show_header=False, show_edge=False)
    t.add_column(style="bold")
    t.add_column(overflow="fold")
    for k, v in pairs:
        t.add_row(f"{k}:", Text(_cell(v)))
    return t


def agents_table(rows: Sequence[dict[str, Any]]) -> Table:
    """`corral get agents`."""
    headers = ["name", "namespace", "mode", "isolation", "status", "ready", "restarts",
               "tasks", "failed", "age"]
    return table(headers, ([r["name"], r["namespace"], r["mode"], r["isolation"], r["status"],
                            r["ready"], r["restarts"], r["tasks"], r["failed"], age(r["age"])]
                           for r in rows))


def dead_letters_table(rows: Sequence[dict[str, Any]]) -> Table:
    """`corral dlq ls`."""
    headers = ["seq", "time", "subscription", "subject", "sender", "delivered", "reason"]
    return table(headers, ([r["seq"], timestamp(r.get("ts")), r["subscription"], r.get("subject"),
                            r.get("sender"), r.get("delivered"), r.get("reason")]
                           for r in rows))


def dead_letter_view(console: Console, d: dict[str, Any]) -> None:
    """`corral dlq show SEQ`: the record, then its envelope (or why it could not be decoded)."""
    show(console, kv_table([
        ("Seq", d["seq"]), ("Time", timestamp(d.get("ts"))),
        ("Subscription", d.get("subscription")), ("Reason", d.get("reason")),
        ("Delivered", d.get("delivered")), ("Size", f"{d.get('size', 0)} bytes"),
    ]))
    env = d.get("envelope")
    if env is None:
        _section(console, "Envelope", Text(
            f"undecodable: {d.get('decode_error') or '?'}\n{d.get('data_preview') or ''}".rstrip()))
        return
    ttl = env.get("ttl")
    headers = ", ".join(f"{k}={v}" for k, v in (env.get("headers") or {}).items())
    _section(console, "Envelope", kv_table([
        ("ID", env.get("id")), ("Subject", env.get("subject")), ("Sender", env.get("sender")),
        ("Kind", env.get("kind")), ("Guarantee", env.get("guarantee")),
        ("Created", timestamp(env.get("created"))),
        ("TTL", None if ttl is None else f"{ttl:g}s (expires "
                                         f"{timestamp(env.get('expires_at'))})"),
        ("Idempotency key", env.get("idempotency_key")), ("Reply to", env.get("reply_to")),
        ("Correlation ID", env.get("correlation_id")), ("Headers", headers),
        ("Encrypted", "yes" if env.get("encrypted") else "no"),
        ("Signed", f"yes ({env.get('signer_key_id')})" if env.get("signed") else "no"),
        ("Payload", env.get("payload")),
    ]))


def timestamp(ts: float | None) -> str:
    """Local time with milliseconds."""
    if ts is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) + f".{int(ts % 1 * 1000):03d}"


def _rate(v: float | None) -> str:
    return "-" if v is None else f"{v * 100:.1f}%"


def _stats_line(s: dict[str, Any]) -> str:
    avg = s.get("avg_task_ms")
    return (f"{s['tasks_executed']} task(s): {s['tasks_succeeded']} ok, {s['tasks_failed']} "
            f"failed; success {_rate(s.get('success_rate'))}; "
            f"avg {'-' if avg is None else f'{avg:g} ms'}")


def describe_agent(console: Console, d: dict[str, Any]) -> None:
    """`corral describe agent NAME`: summary, limits, instances, schedules, stats, events."""
    mb = d.get("mailbox") or {}
    restart = d.get("restart") or {}
    labels = ", ".join(f"{k}={v}" for k, v in (d.get("labels") or {}).items())
    show(console, kv_table([
        ("Name", d["name"]), ("Namespace", d["namespace"]), ("Labels", labels),
        ("Source", d.get("source")), ("Generation", d.get("generation")),
        ("Mode", d["mode"]), ("Isolation", d["isolation"]),
        ("Entrypoint", d.get("entrypoint") or " ".join(d.get("command") or [])),
        ("Status", d["status"]), ("Ready", d["ready"]), ("Replicas", d.get("replicas")),
        ("Restarts", d["restarts"]), ("Gave up", d.get("gave_up")),
        ("Priority", d.get("priority")), ("Concurrency", d.get("concurrency")),
        ("Mailbox", f"{mb.get('depth', 0)} queued (peak {mb.get('peak', 0)}, "
                    f"max {mb.get('max', '-')})"),
        ("Restart", f"{restart.get('policy')}, {restart.get('strategy')}, at most "
                    f"{restart.get('maxRestarts')} in {restart.get('window')}s"),
        ("Age", age(d.get("age"))),
    ]))
    _section(console, "Limits", table(
        ["limit", "value", "enforced", "by", "note"],
        ([x["limit"], x["value"], "yes" if x["enforced"] else "no", x["by"], x["note"]]
         for x in d.get("limits") or [])) if d.get("limits") else None)
    insts = d.get("instances") or []
    _section(console, "Instances", table(
        ["name", "state", "pid", "restarts", "uptime", "last exit", "rss", "uss", "cpu", "fds"],
        ([i["name"], i["state"], i.get("pid"), i.get("restarts"), age(i.get("uptime")),
          i.get("last_exit"), quantity((i.get("resources") or {}).get("rss")),
          quantity((i.get("resources") or {}).get("uss")),
          _cpu((i.get("resources") or {}).get("cpu_seconds")),
          (i.get("resources") or {}).get("fds")] for i in insts)) if insts else None)
    scheds = d.get("schedules") or []
    _section(console, "Schedules", table(
        ["handler", "next run"], ([s["handler"], timestamp(s.get("next_run"))] for s in scheds))
        if scheds else None)
    stats = d.get("stats")
    _section(console, "Stats", Text(_stats_line(stats)) if stats else None)
    events = d.get("events") or []
    _section(console, "Events", table(
        ["time", "kind", "detail"],
        ([timestamp(e.get("ts")), e.get("kind"), _event_detail(e)] for e in events))
        if events else None)


def _cpu(v: float | None) -> str:
    return "-" if v is None else f"{v:g}s"


def _event_detail(e: dict[str, Any]) -> str:
    rest = {k: v for k, v in e.items() if k not in ("seq", "ts", "kind")}
    if "from" in rest and "to" in rest:
        reason = f" ({rest['reason']})" if rest.get("reason") else ""
        return f"{rest.get('instance', '')}: {rest['from']} -> {rest['to']} on {rest.get('event')}{reason}"
    return " ".join(f"{k}={v}" for k, v in rest.items())


def _section(console: Console, title: str, body: Any) -> None:
    console.print()
    console.print(f"[bold]{title}:[/bold]")
    if body is None:
        console.print("  <none>")
    else:
        show(console, body)


def stats_view(console: Console, s: dict[str, Any]) -> None:
    """`corral stats`: runtime totals, then one row per agent."""
    show(console, kv_table([
        ("Agents", s["agents"]), ("Instances running", s["agents_active"]),
        ("Instances spawned", s["agents_spawned"]), ("Tasks", _stats_line(s)),
        ("Uptime", age(s.get("uptime_s"))),
    ]))
    per = s.get("per_agent") or {}
    _section(console, "Agents", table(
        ["name", "tasks", "ok", "failed", "success", "avg ms"],
        ([n, a["tasks_executed"], a["tasks_succeeded"], a["tasks_failed"],
          _rate(a.get("success_rate")), a.get("avg_task_ms")] for n, a in sorted(per.items())))
        if per else None)


def log_line(rec: dict[str, Any]) -> Text:
    """One log line: timestamp, instance, level, message."""
    level = str(rec.get("level", ""))
    style = {"error": "red", "warning": "yellow", "debug": "dim"}.get(level, "")
    t = Text(f"{timestamp(rec.get('ts'))} {rec.get('instance') or rec.get('agent', '-')} ")
    t.append(f"{level:<7}", style=style)
    t.append(f" {rec.get('message', '')}")
    return t


def show(console: Console, *renderables: Any) -> None:
    """Print like console.print, without the padding rich leaves at the end of table lines."""
    with console.capture() as cap:
        console.print(*renderables)
    console.file.write("\n".join(line.rstrip() for line in cap.get().splitlines()) + "\n")


def print_json(console: Console, value: Any) -> None:
    """Machine-readable output: plain JSON, no colour."""
    console.file.write(json.dumps(value, indent=2, default=str) + "\n")
