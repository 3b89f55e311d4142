"""Corral's side of the benchmarks, all through the ``Runtime`` facade.

Every benchmark runs in a fresh runtime (its own home folder, store and zygote) and leaves
by exiting the runtime, which stops every agent. The agents are ``bench.agents``.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import subprocess
import sys
import tempfile
from typing import Any

import psutil

from bench.common import (
    ROOT,
    Counts,
    fmt,
    latency_us,
    med,
    median_runs,
    now_ns,
    percentile,
    pipe_label,
    pipelined,
    print_table,
)
from corral.runtime.runtime import Runtime
from corral.spec.models import AgentManifest

__all__ = ["BENCHMARKS"]

ECHO = "bench.agents:Echo"
#: Benchmark 4 stops repeating once this much time is spent (it always completes one run).
MANY_INPROC_BUDGET_S = 75.0
WHOAMI = "bench.agents:WhoAmI"


def manifest(name: str, *, isolation: str = "process", replicas: int = 1, concurrency: int = 16,
             entrypoint: str = ECHO, mailbox: int = 10_000) -> AgentManifest:
    """A benchmark agent, built in code (no YAML), rooted at the repository."""
    return AgentManifest.model_validate({
        "apiVersion": "corral/v1", "kind": "Agent", "metadata": {"name": name},
        "spec": {"entrypoint": entrypoint, "isolation": isolation, "replicas": replicas,
                 "concurrency": concurrency, "mailbox": mailbox},
    }).with_origin("bench", str(ROOT))


class _Home:
    """A throwaway CORRAL home."""

    def __enter__(self) -> str:
        self._tmp = tempfile.TemporaryDirectory(prefix="corral-bench-")
        return self._tmp.name

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()


def _ms(ns: float) -> float:
    return ns / 1e6


def _lat_ms(samples_ns: list[int]) -> dict[str, float]:
    s = latency_us(samples_ns)
    return {"n": s["n"], "p50_ms": s["p50_us"] / 1e3, "p95_ms": s["p95_us"] / 1e3,
            "p99_ms": s["p99_us"] / 1e3, "mean_ms": s["mean_us"] / 1e3}


# ================================================================== 1. process agent start


def _zygote_import_ms(reps: int) -> float:
    """A fresh interpreter importing what the zygote pre-imports (its cold cost, no fork)."""
    out = []
    for _ in range(reps):
        t0 = now_ns()
        subprocess.run([sys.executable, "-c", "import corral.sandbox.zygote"], check=True,
                       cwd=ROOT, timeout=60)
        out.append(now_ns() - t0)
    return _ms(statistics.median(out))


async def bench_start(c: Counts) -> dict[str, Any]:
    """Process agents: zygote cold start, single starts (two ways) and a burst of N."""
    res: dict[str, Any] = {}

    # -- the cold part: a fresh runtime's first process agent also starts the zygote
    opens, firsts, seconds = [], [], []
    for _ in range(c.cold_reps):
        with _Home() as home:
            t0 = now_ns()
            async with Runtime(home=home) as rt:
                t1 = now_ns()
                await rt.apply([manifest("cold-first")], wait=True)
                t2 = now_ns()
                await rt.apply([manifest("cold-second")], wait=True)
                t3 = now_ns()
            opens.append(t1 - t0)
            firsts.append(t2 - t1)
            seconds.append(t3 - t2)
    res["runtime_open_ms"] = _ms(med(opens))
    res["first_agent_ms"] = _ms(med(firsts))
    res["second_agent_ms"] = _ms(med(seconds))
    res["zygote_start_ms"] = res["first_agent_ms"] - res["second_agent_ms"]
    res["zygote_import_ms"] = _zygote_import_ms(3 if not c.quick else 1)

    with _Home() as home:
        async with Runtime(home=home) as rt:
            await rt.apply([manifest("warm")], wait=True)  # zygote up, code paths warm
            for i in range(5):
                await rt.apply([manifest(f"w-{i}")], wait=True)
                await rt.delete(f"w-{i}")

            # -- (a) apply one new agent with wait=True; deleted again outside the timing
            samples: list[int] = []
            for i in range(c.single_starts):
                m = manifest(f"single-{i}")
                t0 = now_ns()
                await rt.apply([m], wait=True)
                samples.append(now_ns() - t0)
                await rt.delete(m.name)
            res["single_apply"] = _lat_ms(samples)

            # -- (b) scale one agent up by one replica and wait for it to be Ready
            await rt.apply([manifest("scaled")], wait=True)
            samples = []
            for k in range(2, c.single_starts + 2):
                t0 = now_ns()
                await rt.scale("scaled", k)
                await rt.wait_ready(["scaled"])
                samples.append(now_ns() - t0)
            res["single_scale"] = _lat_ms(samples)
            await rt.delete("scaled")

            # -- (c) N at once: one agent with replicas=N, apply to all Ready
            runs = []
            for r in range(c.burst_reps):
                m = manifest(f"burst-{r}", replicas=c.burst)
                t0 = now_ns()
                await rt.apply([m], wait=True)
                dt = now_ns() - t0
                t1 = now_ns()
                await rt.delete(m.name)
                runs.append({"seconds": dt / 1e9, "per_s": c.burst / (dt / 1e9),
                             "delete_s": (now_ns() - t1) / 1e9})
            res["burst"] = {"n": c.burst, **median_runs(runs)}

    sa, ss, b = res["single_apply"], res["single_scale"], res["burst"]
    print_table("1. Corral process agent start (isolation: process, forked by the zygote)",
                ["what", "p50", "p95", "p99", "n"], [
        ["apply 1 agent, wait=True (to Ready)", fmt(sa["p50_ms"], "ms"), fmt(sa["p95_ms"], "ms"),
         fmt(sa["p99_ms"], "ms"), sa["n"]],
        ["scale +1 replica, wait_ready", fmt(ss["p50_ms"], "ms"), fmt(ss["p95_ms"], "ms"),
         fmt(ss["p99_ms"], "ms"), ss["n"]],
    ])
    print_table("   burst and cold costs (medians)", ["what", "value"], [
        [f"{b['n']} agents at once (replicas={b['n']}) to all Ready", fmt(b["seconds"], "s")],
        ["  = agents/s", fmt(b["per_s"], "/s")],
        [f"  delete those {b['n']}", fmt(b["delete_s"], "s")],
        ["Runtime open (store, cgroup detect)", fmt(res["runtime_open_ms"], "ms")],
        ["first agent of a fresh runtime (zygote start + fork)", fmt(res["first_agent_ms"], "ms")],
        ["second agent (zygote warm)", fmt(res["second_agent_ms"], "ms")],
        ["=> zygote start (first - second)", fmt(res["zygote_start_ms"], "ms")],
        ["python -c 'import corral.sandbox.zygote'", fmt(res["zygote_import_ms"], "ms")],
    ])
    return res


# ================================================================== 2./3. request/response


async def _req_bench(rt: Runtime, name: str, *, seq_n: int, pipe_n: int,
                     widths: tuple[int, ...], reps: int, warmup: int) -> dict[str, Any]:
    """Sequential latency and pipelined throughput of ``rt.request`` to agent ``name``."""
    if await rt.request(name, {"check": 7}) != {"check": 7}:
        raise RuntimeError(f"agent {name} did not echo its payload")
    for i in range(warmup):
        await rt.request(name, i)
    seq_runs = []
    for _ in range(reps):
        samples = []
        start = now_ns()
        for i in range(seq_n):
            t0 = now_ns()
            await rt.request(name, i)
            samples.append(now_ns() - t0)
        total = now_ns() - start
        seq_runs.append({**latency_us(samples), "per_s": seq_n / (total / 1e9)})
    pipe = await pipelined(lambda i: rt.request(name, i), total=pipe_n, widths=widths,
                           reps=reps)
    best = max(p["per_s"] for p in pipe.values())
    return {"sequential": median_runs(seq_runs), "pipelined": pipe, "pipelined_best_per_s": best}


def _print_req(title: str, r: dict[str, Any]) -> None:
    s = r["sequential"]
    rows = [["sequential await rt.request()", fmt(s["p50_us"], "us"), fmt(s["p95_us"], "us"),
             fmt(s["p99_us"], "us"), fmt(s["per_s"], "/s")]]
    for key, p in r["pipelined"].items():
        rows.append([pipe_label(key), "", "", "", fmt(p["per_s"], "/s")])
    print_table(title, ["what", "p50", "p95", "p99", "throughput"], rows)


async def bench_xproc(c: Counts) -> dict[str, Any]:
    """Request/response to one process-tier agent (a forked worker, msgpack over a socket)."""
    with _Home() as home:
        async with Runtime(home=home) as rt:
            await rt.apply([manifest("echo", concurrency=1024)], wait=True)
            res = await _req_bench(rt, "echo", seq_n=c.xproc_seq, pipe_n=c.xproc_pipe,
                                   widths=c.pipe_widths, reps=c.reps, warmup=c.warmup)
    _print_req("2. Corral cross-process request/response (1 process agent, concurrency 1024)", res)
    return res


async def bench_inproc(c: Counts) -> dict[str, Any]:
    """Request/response to one inproc agent (an asyncio actor in the runtime)."""
    with _Home() as home:
        async with Runtime(home=home) as rt:
            await rt.apply([manifest("echo", isolation="inproc", concurrency=1024)], wait=True)
            res = await _req_bench(rt, "echo", seq_n=c.inproc_seq, pipe_n=c.inproc_pipe,
                                   widths=c.pipe_widths, reps=c.reps, warmup=c.warmup)
    _print_req("3. Corral in-process request/response (1 inproc agent, concurrency 1024)", res)
    return res


# ================================================================== 4. many inproc agents


async def bench_many_inproc(c: Counts) -> dict[str, Any]:
    """N inproc replicas of one agent, each answering one request: apply -> all answered."""
    n = c.many_inproc
    runs: list[dict[str, Any]] = []
    began = now_ns()
    for _ in range(c.many_inproc_reps):
        if runs and (now_ns() - began) / 1e9 > MANY_INPROC_BUDGET_S:
            break  # each rep is slow when N is large: fewer reps rather than a stalled run
        gc.collect()  # the previous rep's runtime is garbage now: don't make this rep scan it
        with _Home() as home:
            async with Runtime(home=home) as rt:
                m = manifest("many", isolation="inproc", replicas=n, concurrency=1,
                             entrypoint=WHOAMI, mailbox=max(10_000, n))
                t0 = now_ns()
                await rt.apply([m], wait=True)
                t1 = now_ns()
                # concurrency=1 and every replica idle: the dispatcher hands one request to
                # each replica; the answers (instance names) prove which ones answered.
                answers = await asyncio.gather(*(rt.request("many", i) for i in range(n)))
                t2 = now_ns()
                rss = psutil.Process().memory_info().rss
                t3 = now_ns()
            t4 = now_ns()
        runs.append({"total_s": (t2 - t0) / 1e9, "apply_to_ready_s": (t1 - t0) / 1e9,
                     "requests_s": (t2 - t1) / 1e9, "distinct_answered": len(set(answers)),
                     "runtime_rss_mb": rss / 2**20, "shutdown_s": (t4 - t3) / 1e9})
    res = {"n": n, "analogue": "one inproc agent with replicas=N, concurrency=1",
           **median_runs(runs)}
    print_table(f"4. Corral {n:,} in-process agents activated and answered (median of "
                f"{len(runs)})", ["what", "value"], [
        ["apply(replicas=N, wait=True) -> all Ready", fmt(res["apply_to_ready_s"], "s")],
        ["N requests (gather) -> all answered", fmt(res["requests_s"], "s")],
        ["total: apply -> every agent answered", fmt(res["total_s"], "s")],
        ["distinct replicas that answered", f"{res['distinct_answered']:,.0f} / {n:,}"],
        ["runtime RSS with N agents", fmt(res["runtime_rss_mb"], "MiB")],
        ["runtime exit (stop all N)", fmt(res["shutdown_s"], "s")],
    ])
    return res


# ================================================================== 5. many process agents


async def bench_many_process(c: Counts) -> dict[str, Any]:
    """N process agents alive at once: start time, memory per worker, runtime memory."""
    n = c.many_process
    me = psutil.Process()
    with _Home() as home:
        async with Runtime(home=home) as rt:
            base_rss = me.memory_info().rss
            m = manifest("fleet", replicas=n, concurrency=1, entrypoint=WHOAMI)
            t0 = now_ns()
            await rt.apply([m], wait=True)
            t1 = now_ns()
            answers = await asyncio.gather(*(rt.request("fleet", i) for i in range(n)))
            t2 = now_ns()
            desc = await rt.describe("fleet")  # samples every worker (psutil, off the loop)
            t3 = now_ns()
            res_per = [i["resources"] for i in desc["instances"]]
            uss = [r["uss"] for r in res_per if r.get("uss")]
            rss = [r["rss"] for r in res_per if r.get("rss")]
            pids = [i["pid"] for i in desc["instances"] if i["pid"]]
            zmem = psutil.Process(rt.zygote.pid).memory_full_info() if rt.zygote.pid else None
            mine = me.memory_full_info()
            t4 = now_ns()
        t5 = now_ns()
    res = {
        "n": n, "alive": len(uss), "distinct_pids": len(set(pids)),
        "start_s": (t1 - t0) / 1e9, "start_per_s": n / ((t1 - t0) / 1e9),
        "one_request_each_s": (t2 - t1) / 1e9, "distinct_answered": len(set(answers)),
        "describe_s": (t3 - t2) / 1e9,
        "uss_median_mb": med(uss) / 2**20, "uss_p99_mb": percentile(uss, 99) / 2**20,
        "uss_max_mb": max(uss) / 2**20, "rss_median_mb": med(rss) / 2**20,
        "uss_total_mb": sum(uss) / 2**20,
        "zygote_rss_mb": zmem.rss / 2**20 if zmem else None,
        "zygote_uss_mb": zmem.uss / 2**20 if zmem else None,
        "runtime_rss_mb": mine.rss / 2**20, "runtime_uss_mb": mine.uss / 2**20,
        "runtime_rss_growth_mb": (mine.rss - base_rss) / 2**20,
        "shutdown_s": (t5 - t4) / 1e9,
    }
    print_table(f"5. Corral {n:,} process agents alive at once", ["what", "value"], [
        [f"apply(replicas={n}, wait=True) -> all Ready", fmt(res["start_s"], "s")],
        ["  = agents/s", fmt(res["start_per_s"], "/s")],
        ["one request each -> all answered", fmt(res["one_request_each_s"], "s")],
        ["workers alive / distinct answered", f"{res['alive']} / {res['distinct_answered']}"],
        ["worker USS median / p99 / max", f"{fmt(res['uss_median_mb'], 'MiB')} / "
         f"{fmt(res['uss_p99_mb'], 'MiB')} / {fmt(res['uss_max_mb'], 'MiB')}"],
        ["worker RSS median (shares the zygote's pages)", fmt(res["rss_median_mb"], "MiB")],
        ["sum of worker USS", fmt(res["uss_total_mb"], "MiB")],
        ["zygote RSS / USS", f"{fmt(res['zygote_rss_mb'], 'MiB')} / "
         f"{fmt(res['zygote_uss_mb'], 'MiB')}"],
        ["runtime RSS / USS (grew by)", f"{fmt(res['runtime_rss_mb'], 'MiB')} / "
         f"{fmt(res['runtime_uss_mb'], 'MiB')} ({fmt(res['runtime_rss_growth_mb'], 'MiB')})"],
        ["describe() sampling all workers", fmt(res["describe_s"], "s")],
        ["runtime exit (stop all)", fmt(res["shutdown_s"], "s")],
    ])
    return res


BENCHMARKS = {
    "start": bench_start,
    "xproc": bench_xproc,
    "inproc": bench_inproc,
    "many-inproc": bench_many_inproc,
    "many-process": bench_many_process,
}


def run(name: str, c: Counts) -> dict[str, Any]:
    """Run one Corral benchmark in a fresh event loop."""
    return asyncio.run(BENCHMARKS[name](c))
