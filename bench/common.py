"""Shared helpers of the benchmarks: counts, statistics, tables, timing."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root (the folder holding ``corral/`` and ``bench/``)."""

now_ns = time.perf_counter_ns


@dataclass(frozen=True)
class Counts:
    """How much each benchmark does; ``--quick`` shrinks everything for a CI smoke run."""

    quick: bool
    reps: int                  # repeated runs; every reported figure is the median over them
    # 1. process start
    cold_reps: int             # fresh runtimes, to time the zygote's own (cold) start
    single_starts: int         # one agent at a time (apply + wait), per method
    burst: int                 # agents started at once (one agent, replicas=N)
    burst_reps: int
    ray_single: int            # Ray actors created one at a time
    ray_burst: int             # Ray actors created at once
    ray_burst_reps: int
    # 2./3. request/response
    xproc_seq: int             # sequential requests per run
    xproc_pipe: int            # requests per pipelined run
    inproc_seq: int
    inproc_pipe: int
    pipe_widths: tuple[int, ...]
    ray_seq: int
    ray_pipe: int
    autogen_seq: int
    autogen_pipe: int
    warmup: int
    # 4. many in-process agents
    many_inproc: int
    many_inproc_reps: int
    # 5. many process agents
    many_process: int

    @staticmethod
    def make(quick: bool) -> Counts:
        if quick:
            return Counts(quick=True, reps=2, cold_reps=1, single_starts=15, burst=50,
                          burst_reps=1, ray_single=3, ray_burst=4, ray_burst_reps=1,
                          xproc_seq=500, xproc_pipe=2_000, inproc_seq=1_000, inproc_pipe=5_000,
                          pipe_widths=(64, 256), ray_seq=300, ray_pipe=1_000, autogen_seq=500,
                          autogen_pipe=2_000, warmup=200, many_inproc=1_000, many_inproc_reps=1,
                          many_process=100)
        return Counts(quick=False, reps=3, cold_reps=3, single_starts=60, burst=200,
                      burst_reps=3, ray_single=10, ray_burst=16, ray_burst_reps=2,
                      xproc_seq=3_000, xproc_pipe=20_000, inproc_seq=5_000, inproc_pipe=50_000,
                      pipe_widths=(64, 256), ray_seq=2_000, ray_pipe=5_000, autogen_seq=3_000,
                      autogen_pipe=10_000, warmup=1_000, many_inproc=10_000, many_inproc_reps=3,
                      many_process=1_000)


# ------------------------------------------------------------------ statistics


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of ``values``."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(q / 100 * len(s) + 0.5) - 1))
    return float(s[k])


def latency_us(samples_ns: Sequence[int]) -> dict[str, float]:
    """p50/p95/p99/mean in microseconds of one run's samples (nanoseconds)."""
    us = [s / 1_000 for s in samples_ns]
    return {"n": len(us), "p50_us": percentile(us, 50), "p95_us": percentile(us, 95),
            "p99_us": percentile(us, 99), "mean_us": statistics.fmean(us)}


def median_runs(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-key median over repeated runs (numeric keys); keeps the runs for the record."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        vals = [r[key] for r in runs if isinstance(r.get(key), int | float)]
        if len(vals) == len(runs):
            out[key] = statistics.median(vals)
    out["runs"] = list(runs)
    return out


def med(values: Iterable[float]) -> float:
    """Median, NaN for no values."""
    vals = list(values)
    return statistics.median(vals) if vals else float("nan")


# ------------------------------------------------------------------ pipelined load


async def pipelined(call: Callable[[int], Awaitable[Any]], *, total: int,
                    widths: Sequence[int], reps: int) -> dict[str, Any]:
    """Throughput with many requests in flight, two ways, each width, median over ``reps``.

    ``gather-W``: batches of W calls awaited together with asyncio.gather (W in flight, then
    the batch drains). ``callers-W``: W concurrent callers, each awaiting its own calls one
    after another (W in flight all the time).
    """

    async def gather(w: int) -> int:
        batches = max(1, total // w)
        for _ in range(batches):
            await asyncio.gather(*(call(i) for i in range(w)))
        return batches * w

    async def callers(w: int) -> int:
        each = max(1, total // w)

        async def caller() -> None:
            for i in range(each):
                await call(i)

        await asyncio.gather(*(caller() for _ in range(w)))
        return each * w

    out: dict[str, Any] = {}
    for style, fn in (("gather", gather), ("callers", callers)):
        for w in widths:
            await asyncio.gather(*(call(i) for i in range(w)))  # warm this width
            runs = []
            for _ in range(reps):
                t0 = now_ns()
                n = await fn(w)
                runs.append({"per_s": n / ((now_ns() - t0) / 1e9), "requests": n})
            out[f"{style}-{w}"] = median_runs(runs)
    return out


def pipe_label(key: str) -> str:
    """Table label of a :func:`pipelined` key."""
    style, _, w = key.partition("-")
    if style == "gather":
        return f"pipelined: batches of {w} via gather"
    if style == "callers":
        return f"pipelined: {w} concurrent callers"
    if style == "raylist":
        return f"pipelined: ray.get() of {w} refs"
    return f"pipelined: {key}"


# ------------------------------------------------------------------ output


def fmt(v: Any, unit: str = "") -> str:
    """A number for a table: 3 significant digits, with thousands separators when large."""
    if v is None:
        return "-"
    if isinstance(v, float) and v != v:
        return "nan"
    if isinstance(v, int | float):
        a = abs(v)
        if a >= 1000:
            s = f"{v:,.0f}"
        elif a >= 100:
            s = f"{v:.0f}"
        elif a >= 10:
            s = f"{v:.1f}"
        elif a >= 1:
            s = f"{v:.2f}"
        else:
            s = f"{v:.3f}"
        return f"{s} {unit}".rstrip()
    return str(v)


def table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table with a title, columns padded to fit."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = "+-" + "-+-".join("-" * w for w in widths) + "-+"
    out = [title, line]
    for n, r in enumerate(cells):
        out.append("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if n == 0:
            out.append(line)
    out.append(line)
    return "\n".join(out)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print :func:`table` with a blank line before it, flushed (workers are piped)."""
    print("\n" + table(title, headers, rows), flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, int]:
    """Run ``fn`` and return (its result, elapsed ns)."""
    t0 = now_ns()
    out = fn()
    return out, now_ns() - t0
