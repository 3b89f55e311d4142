"""The `corral` command: run a runtime (`up`) and talk to it over its control socket."""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import logging
import os
import shlex
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.logging import RichHandler

from corral.cli import render
from corral.cli.client import Client
from corral.errors import CorralError, SpecError
from corral.runtime.config import RuntimeConfig, default_home

if TYPE_CHECKING:
    pass

__all__ = ["app", "error_text", "main"]

app = typer.Typer(name="corral", help="Corral: a secure runtime for AI agents.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


def _console(stderr: bool = False) -> Console:
    con = Console(stderr=stderr)
    if not con.is_terminal:  # pipes and files get long lines instead of wrapped tables
        con = Console(stderr=stderr, width=200)
    return con


out = _console()
err = _console(stderr=True)


class Output(enum.StrEnum):
    """Output formats."""

    table = "table"
    json = "json"


HomeOpt = Annotated[Path | None, typer.Option(
    "--home", help="Runtime home (default: $CORRAL_HOME or ~/.corral).", show_default=False)]
OutputOpt = Annotated[Output, typer.Option("-o", "--output", help="table or json.")]
_state: dict[str, Path | None] = {"home": None}

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("corral")
_UP_APPLY_TIMEOUT = 60.0
_DRAIN_TIMEOUT = 2.0


@app.callback()
def _root(home: HomeOpt = None) -> None:
    """Corral: a secure runtime for AI agents."""
    _state["home"] = home


def _home(home: Path | None) -> Path:
    return (home or _state["home"] or default_home()).expanduser()


def _client(home: Path | None, timeout: float = 30.0) -> Client:
    return Client(RuntimeConfig(home=_home(home)).socket_path, timeout=timeout)


def error_text(exc: CorralError) -> str:
    """The message of an error with its hint; a multi-line message gets the hint on its own line."""
    where = f"agent {exc.agent!r}: " if exc.agent else ""
    text = f"{where}{exc.message if not isinstance(exc, SpecError) else exc}"
    if exc.hint:
        text += f"\n  ({exc.hint})" if "\n" in text else f" ({exc.hint})"
    return text


def _fail(exc: CorralError, output: Output | None) -> None:
    if output is Output.json:
        info = getattr(exc, "details", None) or exc.to_dict()
        sys.stderr.write(json.dumps({"error": info}, indent=2, default=str) + "\n")
    else:
        err.print(f"error: {error_text(exc)}", style="red", markup=False, highlight=False,
                  soft_wrap=True)
    raise typer.Exit(1)


def _command(fn: F) -> F:
    """Print CorralErrors as "error: ..." (no traceback) and exit 1."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except CorralError as exc:
            _fail(exc, kwargs.get("output"))
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
    return wrapper  # type: ignore[return-value]


def _payload(text: str | None) -> Any:
    """JSON if it parses, else the text itself."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return text


def _kind(kind: str) -> None:
    if kind.lower() not in ("agent", "agents", "ag"):
        raise CorralError(f"unknown resource type {kind!r}", hint="try `agents`")


def _show(output: Output, value: Any, table: Callable[[], None]) -> None:
    if output is Output.json:
        render.print_json(out, value)
    else:
        table()


# ====================================================================== up


@app.command()
@_command
def up(
    file: Annotated[list[Path] | None, typer.Option(
        "-f", "--file", help="Manifest file or folder to apply at start (repeatable).")] = None,
    policy: Annotated[list[Path] | None, typer.Option(
        "--policy", help=".cedar file or folder in force from the start (repeatable).")] = None,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Deny whatever no policy permits.")] = False,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Run the runtime in the foreground (Ctrl-C stops it)."""
    from corral.spec.loader import load_paths
    manifests = load_paths([str(p) for p in file]) if file else []
    handler: logging.Handler
    if err.is_terminal:
        handler = RichHandler(console=err, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s", datefmt="[%X]"))
    else:  # a file or a pipe: plain lines
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    settings = {"policy_paths": [p.resolve() for p in policy or []], "policy_strict": strict}
    raise typer.Exit(asyncio.run(_up(_home(home), manifests, output, settings)))


async def _up(home: Path, manifests: list[Any], output: Output,
              settings: dict[str, Any] | None = None) -> int:
    """Serve until SIGINT/SIGTERM, then shut down (bounded by shutdown_grace); the exit code."""
    from corral.runtime.control import ControlServer  # the runtime is heavy; only `up` needs it
    from corral.runtime.runtime import Runtime

    rt = Runtime(home=home, **(settings or {}))
    server = ControlServer(rt)
    server.bind()  # before the store opens: a second runtime on one home must not start agents
    stop, ready = asyncio.Event(), asyncio.Event()
    code = 0

    def on_signal() -> None:
        if stop.is_set():
            log.warning("already stopping (agents get %gs to finish)", rt.config.shutdown_grace)
        stop.set()

    async def apply_then_banner() -> None:
        nonlocal code
        try:
            for r in await rt.apply(manifests, wait=True, timeout=_UP_APPLY_TIMEOUT):
                log.info("%s %s", _applied(r), r["action"])
        except TimeoutError:
            log.error("not every agent was ready within %gs; see `corral get agents`",
                      _UP_APPLY_TIMEOUT)
        except SpecError as exc:
            log.error("%s", error_text(exc))
            code = 1
            stop.set()
            return
        except CorralError as exc:  # e.g. an agent failed to start: the runtime stays up
            log.error("%s", error_text(exc))
        _banner(home, server.path, [m.name for m in manifests], output)

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        async with rt, asyncio.TaskGroup() as tg:
            serving = tg.create_task(server.serve(ready=ready))
            await ready.wait()
            applying = tg.create_task(apply_then_banner())
            await stop.wait()
            log.info("stopping: draining agents (at most %gs)", rt.config.shutdown_grace)
            applying.cancel()
            await rt.shutdown()
            await server.drain(_DRAIN_TIMEOUT)  # followers get their last line before we close
            serving.cancel()
    finally:
        server.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    log.info("stopped")
    return code


def _banner(home: Path, sock: Path, names: list[str], output: Output) -> None:
    if output is Output.json:
        render.print_json(out, {"home": str(home), "socket": str(sock), "pid": os.getpid()})
        out.file.flush()
        return
    flag = "" if home == default_home() else f" --home {shlex.quote(str(home))}"
    lines = [f"Corral is up (pid {os.getpid()}); control socket {sock}", "Try:"]
    if not names:
        lines.append(f"  corral apply{flag} -f examples/hello")
    lines.append(f"  corral get agents{flag}")
    if not names or "hello" in names:
        lines.append(f"  corral request hello '{{\"name\": \"ada\"}}'{flag}")
    else:
        lines.append(f"  corral request {names[0]} '{{}}'{flag}")
    name = "hello" if not names or "hello" in names else names[0]
    lines += [f"  corral describe agent {name}{flag}",
              f"  corral logs -f {name}{flag}",
              "Ctrl-C to stop."]
    out.print("\n".join(lines), markup=False, highlight=False)
    out.file.flush()


# ====================================================================== apply and views


@app.command()
@_command
def apply(
    file: Annotated[list[Path], typer.Option("-f", "--file", help="Manifest file or folder.")],
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until agents are ready.")] = True,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for readiness.")] = 60.0,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Create or update agents from manifests (files or folders)."""
    from corral.spec.loader import load_paths
    manifests = load_paths([str(p) for p in file])
    items = [{"manifest": m.to_dict(), "source": m.source, "base_dir": m.base_dir}
             for m in manifests]
    result = _client(home).call("apply", manifests=items, wait=wait,
                                timeout=timeout if wait else None)

    def lines() -> None:
        for r in result:
            out.print(f"{_applied(r)} {r['action']}", markup=False, highlight=False)
    _show(output, result, lines)


@app.command()
@_command
def get(
    kind: Annotated[str, typer.Argument(help="agents")],
    name: Annotated[str | None, typer.Argument(help="One agent.")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List agents, or show one: `corral get agents`, `corral get agent NAME`."""
    _kind(kind)
    c = _client(home)
    rows = [c.call("get", name=name)] if name else c.call("list")
    if output is Output.json:
        render.print_json(out, rows[0] if name else rows)
    elif not rows:
        err.print("No agents. Apply some with `corral apply -f PATH`.", markup=False)
    else:
        render.show(out, render.agents_table(rows))


@app.command()
@_command
def describe(
    kind: Annotated[str, typer.Argument(help="agent")],
    name: Annotated[str, typer.Argument(help="The agent.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Everything about one agent: limits, instances, schedules, stats, events."""
    _kind(kind)
    d = _client(home).call("describe", name=name)
    _show(output, d, lambda: render.describe_agent(out, d))


@app.command()
@_command
def stats(home: HomeOpt = None, output: OutputOpt = Output.table) -> None:
    """Runtime statistics: agents, instances, tasks, success rate."""
    s = _client(home).call("stats")
    _show(output, s, lambda: render.stats_view(out, s))


# ====================================================================== work


@app.command()
@_command
def request(
    name: Annotated[str, typer.Argument(help="The agent.")],
    payload: Annotated[str | None, typer.Argument(help="JSON (else sent as a string).")] = None,
    handler: Annotated[str, typer.Option(help="Handler (default: the agent's default).")] = "",
    timeout: Annotated[float | None, typer.Option(
        help="Seconds (default: the agent's taskTimeout).")] = None,
    priority: Annotated[str | None, typer.Option(help="background, low, normal, high or critical.")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Send a task and print its result (JSON)."""
    # Without --timeout the runtime applies the agent's taskTimeout; wait a while for it.
    c = _client(home, timeout=30.0 if timeout is not None else 600.0)
    result = c.call("request", name=name, payload=_payload(payload), handler=handler,
                    timeout=timeout, priority=priority)
    render.print_json(out, result)


@app.command()
@_command
def send(
    name: Annotated[str, typer.Argument(help="The agent.")],
    payload: Annotated[str | None, typer.Argument(help="JSON (else sent as a string).")] = None,
    handler: Annotated[str, typer.Option(help="Handler (default: the agent's default).")] = "",
    priority: Annotated[str | None, typer.Option(help="background, low, normal, high or critical.")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Queue a task durably and print its id (see `corral task ID`)."""
    task_id = _client(home).call("send", name=name, payload=_payload(payload), handler=handler,
                                 priority=priority)
    _show(output, {"id": task_id}, lambda: out.print(task_id, markup=False, highlight=False))


@app.command()
@_command
def publish(
    subject: Annotated[str, typer.Argument(help="Topic, like news.eu.")],
    payload: Annotated[str | None, typer.Argument(help="JSON (else sent as a string).")] = None,
    guarantee: Annotated[str, typer.Option(
        help="at-most-once, at-least-once or effectively-once.")] = "at-most-once",
    ttl: Annotated[float | None, typer.Option(help="Seconds the message may live.")] = None,
    key: Annotated[str | None, typer.Option(
        "--key", help="Idempotency key (effectively-once).")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Publish a message on a topic; subscribed agents get it (see docs/messaging.md)."""
    res = _client(home).call("publish", subject=subject, payload=_payload(payload),
                             guarantee=guarantee, ttl=ttl, idempotency_key=key)
    _show(output, res, lambda: out.print(res["id"], markup=False, highlight=False))


@app.command()
@_command
def broadcast(
    payload: Annotated[str | None, typer.Argument(help="JSON (else sent as a string).")] = None,
    handler: Annotated[str, typer.Option(help="Handler (default: each agent's default).")] = "",
    namespace: Annotated[str | None, typer.Option("-n", "--namespace",
                                                  help="Only this namespace.")] = None,
    selector: Annotated[str, typer.Option("-l", "--selector",
                                          help="Labels, like team=nlp,tier!=gpu.")] = "",
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Send one message durably to every agent, a namespace, or those matching a selector."""
    sent = _client(home).call("broadcast", payload=_payload(payload), handler=handler,
                              namespace=namespace, selector=selector)

    def show() -> None:
        for name, task_id in sorted(sent.items()):
            out.print(f"agent/{name} {task_id}", markup=False, highlight=False)
        if not sent:
            out.print("no agent matched", markup=False, highlight=False)

    _show(output, sent, show)


keys_app = typer.Typer(help="The bus's encryption and signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("rotate")
@_command
def keys_rotate(home: HomeOpt = None, output: OutputOpt = Output.table) -> None:
    """Encrypt from now on with a new key; older keys still decrypt messages in flight."""
    res = _client(home).call("keys.rotate")
    _show(output, res, lambda: out.print(f"new key {res['key_id']}", markup=False,
                                         highlight=False))


@keys_app.command("export")
@_command
def keys_export(home: HomeOpt = None) -> None:
    """Print this node's agents' public signing keys as JSON, for other nodes to trust."""
    out.print(json.dumps(_client(home).call("keys.export"), indent=2, sort_keys=True),
              markup=False, highlight=False, soft_wrap=True)


@keys_app.command("trust")
@_command
def keys_trust(
    file: Annotated[Path, typer.Argument(help="JSON from `corral keys export` on another node.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Accept another node's agents' public keys: their signed messages verify here."""
    try:
        keys = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"can't read keys from {file}: {exc}", file=str(file),
                        expected="the JSON printed by `corral keys export`") from None
    res = _client(home).call("keys.trust", keys=keys)
    _show(output, res, lambda: out.print(f"trusted {res['trusted']} key(s)", markup=False,
                                         highlight=False))


@app.command()
@_command
def task(
    task_id: Annotated[str, typer.Argument(metavar="ID", help="From `corral send`.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Show a sent task: status, result or error."""
    t = _client(home).call("task", id=task_id)

    def show() -> None:
        render.show(out, render.kv_table([
            ("ID", t["id"]), ("Agent", t["agent"]), ("Handler", t["handler"]),
            ("Status", t["status"]), ("Attempts", t["attempts"]),
            ("Created", render.timestamp(t.get("created"))),
            ("Finished", render.timestamp(t.get("finished"))),
            ("Error", t.get("error")),
            ("Result", None if t.get("result") is None else json.dumps(t["result"])),
        ]))
    _show(output, t, show)


@app.command()
@_command
def logs(
    name: Annotated[str, typer.Argument(help="The agent.")],
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines.")] = False,
    tail: Annotated[int | None, typer.Option(help="Only the last N stored lines.")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """An agent's log lines: timestamp, instance, level, message."""
    c = _client(home)

    def emit(rec: dict[str, Any]) -> None:
        if output is Output.json:
            out.file.write(json.dumps(rec) + "\n")
            out.file.flush()
        else:
            out.print(render.log_line(rec), highlight=False, soft_wrap=True)
    if follow:
        for rec in c.stream("logs", name=name, tail=tail, follow=True):
            emit(rec)
        return
    recs = c.call("logs", name=name, tail=tail)
    if output is Output.json:
        render.print_json(out, recs)
    else:
        for rec in recs:
            emit(rec)


# ====================================================================== control


@app.command()
@_command
def scale(
    name: Annotated[str, typer.Argument(help="The agent.")],
    replicas: Annotated[int, typer.Argument(help="Number of replicas (0 stops it).")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Set an agent's number of replicas."""
    _client(home).call("scale", name=name, replicas=replicas)
    _done(output, name, f"scaled to {replicas}")


@app.command()
@_command
def stop(
    name: Annotated[str, typer.Argument(help="The agent.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Stop an agent's instances; it stays applied (`corral scale NAME N` starts it)."""
    _client(home).call("stop", name=name)
    _done(output, name, "stopped")


@app.command()
@_command
def delete(
    name: Annotated[str, typer.Argument(help="The agent.")],
    purge: Annotated[bool, typer.Option(help="Also drop its persistent memory.")] = False,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Stop and remove an agent."""
    _client(home).call("delete", name=name, purge=purge)
    _done(output, name, "deleted" + (" (memory purged)" if purge else ""))


def _done(output: Output, name: str, what: str) -> None:
    _show(output, {"agent": name, "action": what},
          lambda: out.print(f"agent/{name} {what}", markup=False, highlight=False))


def _applied(r: dict[str, str]) -> str:
    return f"agent/{r['agent']}" if "agent" in r else f"policy/{r['policy']}"


# ====================================================================== policy

policy_app = typer.Typer(name="policy", no_args_is_help=True,
                         help="Cedar policies: check files, evaluate a request, list, reload.")
app.add_typer(policy_app)


@policy_app.command("check")
@_command
def policy_check(
    files: Annotated[list[Path], typer.Argument(help=".cedar files, folders or Policy manifests.")],
    strict: Annotated[bool, typer.Option(help="Check as strict mode loads them.")] = False,
    home: HomeOpt = None,  # accepted like everywhere; checking needs no runtime
    output: OutputOpt = Output.table,
) -> None:
    """Validate policies against Corral's schema; errors name file, line and column."""
    from corral.runtime.runtime import Runtime

    infos = Runtime.check_policy_files([str(f) for f in files], strict=strict)
    mine = [i for i in infos if not str(i["source"]).startswith("<built-in")]
    _show(output, mine, lambda: out.print(f"ok: {len(mine)} polic{'y' if len(mine) == 1 else 'ies'} "
                                          "valid", markup=False, highlight=False))


@policy_app.command("eval")
@_command
def policy_eval(
    principal: Annotated[str, typer.Option("--principal", "-p", help="e.g. agent:summarizer, user:client.")],
    action: Annotated[str, typer.Option("--action", "-a", help="e.g. topic.publish.")],
    resource: Annotated[str, typer.Option("--resource", "-r", help="e.g. topic:news.eu.")],
    context: Annotated[str, typer.Option("--context", "-c", help="JSON object.")] = "{}",
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Decide one request with the policies in force; print the decision and who decided."""
    try:
        ctx = json.loads(context)
    except ValueError as exc:
        raise SpecError(f"--context is not JSON: {exc}", path="context", got=context,
                        expected='a JSON object like {"payloadSize": 10}') from None
    d = _client(home).call("policy.eval", principal=principal, action=action,
                           resource=resource, context=ctx)

    def show() -> None:
        render.show(out, render.kv_table([
            ("Decision", d["decision"].upper()), ("Principal", d["principal"]),
            ("Action", d["action"]), ("Resource", d["resource"]),
            ("Decided by", ", ".join(d["policies"]) or "no policy (strict: denied by default)"),
            ("Errors", "; ".join(d["errors"]) or None)]))
    _show(output, d, show)
    if d["decision"] != "allow":
        raise typer.Exit(2)


@policy_app.command("ls")
@_command
def policy_ls(home: HomeOpt = None, output: OutputOpt = Output.table) -> None:
    """The policies in force."""
    rows = _client(home).call("policy.ls")
    _show(output, rows, lambda: render.show(out, render.table(
        ["ID", "EFFECT", "SOURCE", "LINE"],
        [[r["id"], r.get("effect", ""), r["source"], r.get("line", "")] for r in rows])))


@policy_app.command("reload")
@_command
def policy_reload(home: HomeOpt = None, output: OutputOpt = Output.table) -> None:
    """Re-read policy files and applied Policy manifests, without a restart (all or nothing)."""
    res = _client(home).call("policy.reload")
    _show(output, res, lambda: out.print(
        f"reloaded: {res['policies']} policies from {res['sources']} source(s), "
        f"generation {res['generation']}", markup=False, highlight=False))


@app.command()
@_command
def resume(name: Annotated[str, typer.Argument(help="Agent name.")], home: HomeOpt = None) -> None:
    """Re-check a Suspended agent against the policies now; it resumes if they allow."""
    left = _client(home).call("resume", name=name)["still_suspended"]
    out.print("resumed" if left == 0 else f"{left} instance(s) still suspended by policy",
              markup=False, highlight=False)


@app.command()
@_command
def override(name: Annotated[str, typer.Argument(help="Agent name.")], home: HomeOpt = None) -> None:
    """End a Suspended agent's suspension by terminating it (recorded as an override)."""
    _client(home).call("override", name=name)
    out.print(f"agent/{name} terminated (override)", markup=False, highlight=False)


# ====================================================================== audit

audit_app = typer.Typer(name="audit", no_args_is_help=True,
                        help="The audit trail: verify, query, export (docs/audit-format.md).")
app.add_typer(audit_app)


@audit_app.command("verify")
@_command
def audit_verify(
    anchor: Annotated[str | None, typer.Option(help="SEQ:HASH published earlier: detects truncation.")] = None,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Check every record's hash chain and every seal's signature; exit 1 if tampered."""
    r = _client(home, timeout=600).call("audit.verify", anchor=anchor)

    def show() -> None:
        if r["ok"]:
            out.print(f"ok: {r['records']} records, {r['seals']} seals verified; "
                      f"{r['unsealed_tail']} not yet sealed", markup=False, highlight=False)
            out.print(f"anchor: {r['head_seq']}:{r['head_hash']}", markup=False, highlight=False)
        else:
            out.print(f"TAMPERED: record {r['first_bad_seq']}: {r['reason']}", markup=False,
                      highlight=False)
    _show(output, r, show)
    if not r["ok"]:
        raise typer.Exit(1)


@audit_app.command("query")
@_command
def audit_query(
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    action: Annotated[str | None, typer.Option(help="Record kind, e.g. policy.decision or message.*.")] = None,
    since: Annotated[float | None, typer.Option(help="Unix time.")] = None,
    until: Annotated[float | None, typer.Option(help="Unix time.")] = None,
    outcome: Annotated[str | None, typer.Option(help="e.g. deny, allow, ok.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many.")] = 100,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Audit records filtered by agent, action, time and outcome."""
    rows = _client(home).call("audit.query", agent=agent, action=action, since=since,
                              until=until, outcome=outcome, limit=limit)
    _show(output, rows, lambda: render.show(out, render.table(
        ["SEQ", "TIME", "KIND", "ACTOR", "AGENT", "RESOURCE", "OUTCOME"],
        [[r["seq"], render.timestamp(r["ts"] / 1e6 if r.get("ts") else None), r["kind"], r.get("actor", ""),
          r.get("agent", ""), r.get("resource", ""), r.get("outcome", "")] for r in rows])))


@audit_app.command("export")
@_command
def audit_export(
    path: Annotated[Path, typer.Argument(help="Where to write the JSON Lines export.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Write the trail and its public keys as JSON Lines (verify with examples/audit_verify.py)."""
    res = _client(home, timeout=600).call("audit.export", path=str(path.resolve()))
    _show(output, res, lambda: out.print(f"wrote {path}: {res}", markup=False, highlight=False))


# ====================================================================== dead letters

dlq_app = typer.Typer(name="dlq", no_args_is_help=True,
                      help="Dead letters: messages the bus gave up on (ls, show, replay, purge).")
app.add_typer(dlq_app)

SubscriptionOpt = Annotated[str | None, typer.Option(
    "--subscription", "-s", help="Only this subscription.", show_default=False)]


@dlq_app.command("ls")
@_command
def dlq_ls(
    subscription: SubscriptionOpt = None,
    limit: Annotated[int, typer.Option(help="At most N dead letters.")] = 100,
    after: Annotated[int, typer.Option(help="Only those with a seq above this (paging).")] = 0,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """List dead letters, oldest first: SEQ TIME SUBSCRIPTION SUBJECT SENDER DELIVERED REASON."""
    rows = _client(home).call("dlq.ls", subscription=subscription, limit=limit, after=after)
    if output is Output.json:
        render.print_json(out, rows)
        return
    if not rows:
        err.print("No dead letters.", markup=False)
        return
    render.show(out, render.dead_letters_table(rows))
    if len(rows) >= limit:
        err.print(f"(first {limit}; see more with --after {rows[-1]['seq']})", markup=False,
                  highlight=False)


@dlq_app.command("show")
@_command
def dlq_show(
    seq: Annotated[int, typer.Argument(metavar="SEQ", help="From `corral dlq ls`.")],
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """One dead letter: why, how often it was delivered, and its decoded envelope."""
    d = _client(home).call("dlq.show", seq=seq)
    _show(output, d, lambda: render.dead_letter_view(out, d))


@dlq_app.command("replay")
@_command
def dlq_replay(
    seqs: Annotated[list[int] | None, typer.Argument(metavar="SEQ",
                                                     help="Dead letters to replay.")] = None,
    subscription: Annotated[str | None, typer.Option(
        "--subscription", "-s", help="Replay every dead letter of this subscription.",
        show_default=False)] = None,
    all_: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Republish dead letters, unchanged, to their original subject; each replayed one is removed."""
    if sum((bool(seqs), subscription is not None, all_)) != 1:
        raise CorralError("give exactly one of: SEQ..., --subscription S, --all",
                          hint="see the seqs with `corral dlq ls`")
    r = _client(home, timeout=300.0).call("dlq.replay", seqs=seqs or [],
                                          subscription=subscription, all=all_)
    _show(output, r, lambda: out.print(f"replayed {r['replayed']} dead letter(s)",
                                       markup=False, highlight=False))


@dlq_app.command("purge")
@_command
def dlq_purge(
    subscription: Annotated[str | None, typer.Option(
        "--subscription", "-s", help="Only this subscription's dead letters.",
        show_default=False)] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    home: HomeOpt = None,
    output: OutputOpt = Output.table,
) -> None:
    """Delete dead letters for good (asks first, unless --yes or -o json)."""
    if not yes and output is not Output.json:
        what = f"of subscription {subscription!r}" if subscription else "of every subscription"
        if not sys.stdin.isatty():
            raise CorralError(f"refusing to delete the dead letters {what} without confirmation",
                              hint="pass --yes")
        if not typer.confirm(f"Delete the dead letters {what} for good?", default=False):
            err.print("Nothing was purged.", markup=False)
            raise typer.Exit(1)
    r = _client(home).call("dlq.purge", subscription=subscription)
    _show(output, r, lambda: out.print(f"purged {r['purged']} dead letter(s)",
                                       markup=False, highlight=False))


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `corral` script."""
    logging.getLogger("corral").setLevel(logging.INFO)
    app(args=list(argv) if argv is not None else None, prog_name="corral")


if __name__ == "__main__":
    main()
