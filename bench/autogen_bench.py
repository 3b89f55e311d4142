"""The AutoGen core peer: in-process requests (3.) and 10k lazily activated agents (4.).

``SingleThreadedAgentRuntime`` with one registered ``RoutedAgent`` type whose message
handler returns the message; ``send_message`` is AutoGen's RPC. No ``from __future__
import annotations`` here: ``message_handler`` reads the handler's type hints at class
creation, so they must be real classes.
"""


import asyncio
from dataclasses import dataclass
from typing import Any

from bench.common import (
    Counts,
    fmt,
    latency_us,
    median_runs,
    now_ns,
    pipe_label,
    pipelined,
    print_table,
)

__all__ = ["available", "run"]


def available() -> str | None:
    """None if autogen-core can be imported, else why not."""
    try:
        import autogen_core  # noqa: F401
    except Exception as exc:
        return f"autogen-core is not importable: {type(exc).__name__}: {exc}"
    return None


def _version() -> str:
    from importlib.metadata import version

    return version("autogen-core")


@dataclass
class Ping:
    """The benchmark message."""

    i: Any


_CLS: Any = None


def _agent_class() -> Any:
    """The echo agent class (built on first use, so importing this module needs no autogen)."""
    global _CLS
    if _CLS is None:
        from autogen_core import MessageContext, RoutedAgent, message_handler

        class EchoAgent(RoutedAgent):
            def __init__(self) -> None:
                super().__init__("echo")

            @message_handler
            async def on_ping(self, message: Ping, ctx: MessageContext) -> Ping:
                return message

        _CLS = EchoAgent
    return _CLS


async def _runtime() -> Any:
    from autogen_core import SingleThreadedAgentRuntime

    rt = SingleThreadedAgentRuntime()
    cls = _agent_class()
    await cls.register(rt, "echo", cls)
    rt.start()
    return rt


async def _inproc(c: Counts) -> dict[str, Any]:
    from autogen_core import AgentId

    rt = await _runtime()
    try:
        target = AgentId("echo", "k")
        if (await rt.send_message(Ping(7), target)).i != 7:
            raise RuntimeError("AutoGen agent did not echo its message")
        for i in range(c.warmup):
            await rt.send_message(Ping(i), target)
        seq_runs = []
        for _ in range(c.reps):
            samples = []
            start = now_ns()
            for i in range(c.autogen_seq):
                t0 = now_ns()
                await rt.send_message(Ping(i), target)
                samples.append(now_ns() - t0)
            total = now_ns() - start
            seq_runs.append({**latency_us(samples), "per_s": c.autogen_seq / (total / 1e9)})
        pipe = await pipelined(lambda i: rt.send_message(Ping(i), target),
                               total=c.autogen_pipe, widths=c.pipe_widths, reps=c.reps)
    finally:
        await rt.stop()
    res = {"sequential": median_runs(seq_runs), "pipelined": pipe,
           "pipelined_best_per_s": max(p["per_s"] for p in pipe.values())}
    s = res["sequential"]
    rows = [["sequential await send_message()", fmt(s["p50_us"], "us"), fmt(s["p99_us"], "us"),
             fmt(s["per_s"], "/s")]]
    for key, p in pipe.items():
        rows.append([pipe_label(key), "", "", fmt(p["per_s"], "/s")])
    print_table("3. AutoGen core in-process send_message (SingleThreadedAgentRuntime)",
                ["what", "p50", "p99", "throughput"], rows)
    return res


async def _many(c: Counts) -> dict[str, Any]:
    from autogen_core import AgentId

    n = c.many_inproc
    runs = []
    for _ in range(c.many_inproc_reps):
        rt = await _runtime()
        try:
            t0 = now_ns()
            answers = await asyncio.gather(
                *(rt.send_message(Ping(i), AgentId("echo", f"k{i}")) for i in range(n)))
            dt = now_ns() - t0
            instantiated = len(getattr(rt, "_instantiated_agents", {}))
        finally:
            await rt.stop()
        runs.append({"total_s": dt / 1e9, "answered": len(answers),
                     "instantiated": instantiated})
    res = {"n": n, "analogue": "one registered type, N distinct AgentIds, one message each",
           **median_runs(runs)}
    print_table(f"4. AutoGen {n:,} agents activated and answered (median of {len(runs)})",
                ["what", "value"], [
        ["N send_message to N AgentIds (gather) -> all answered", fmt(res["total_s"], "s")],
        ["agents instantiated", f"{res['instantiated']:,.0f}"],
    ])
    return res


def run(names: list[str], c: Counts) -> dict[str, Any]:
    """Run the AutoGen benchmarks in ``names`` ("inproc", "many-inproc")."""
    out: dict[str, Any] = {"version": _version()}
    if "inproc" in names:
        out["inproc"] = asyncio.run(_inproc(c))
    if "many-inproc" in names:
        out["many-inproc"] = asyncio.run(_many(c))
    return out
