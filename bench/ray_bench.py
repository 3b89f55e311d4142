"""The Ray peer: actor start (1.) and cross-process actor calls (2.).

``ray.init(num_cpus=2)`` starts a local Ray node (GCS, raylet, prestarted workers); its
time is reported separately, like the zygote's. Every actor is a default (sync) actor.
"""

from __future__ import annotations

import logging
from typing import Any

from bench.common import Counts, fmt, latency_us, median_runs, now_ns, pipe_label, print_table

__all__ = ["available", "run"]


def available() -> str | None:
    """None if Ray can be imported, else why not."""
    try:
        import ray  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"ray is not importable: {type(exc).__name__}: {exc}"
    return None


def _version() -> str:
    import ray

    return str(ray.__version__)


def run(names: list[str], c: Counts) -> dict[str, Any]:
    """Run the Ray benchmarks in ``names`` ("start", "xproc") on one local Ray node."""
    import ray

    @ray.remote
    class Echo:
        def ping(self) -> int:
            return 1

        def echo(self, x: Any) -> Any:
            return x

    out: dict[str, Any] = {"version": _version()}
    t0 = now_ns()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    out["init_s"] = (now_ns() - t0) / 1e9
    print(f"\nRay {out['version']}: ray.init(num_cpus=2) took {fmt(out['init_s'], 's')} "
          "(paid once per node, like Corral's zygote start)", flush=True)
    try:
        if "start" in names:
            out["start"] = _start(ray, Echo, c)
        if "xproc" in names:
            out["xproc"] = _xproc(ray, Echo, c)
    finally:
        ray.shutdown()
    return out


def _start(ray: Any, Echo: Any, c: Counts) -> dict[str, Any]:
    warm = Echo.remote()
    ray.get(warm.ping.remote())
    ray.kill(warm)
    samples = []
    for _ in range(c.ray_single):
        t0 = now_ns()
        a = Echo.remote()
        ray.get(a.ping.remote())
        samples.append(now_ns() - t0)
        ray.kill(a)
    single = latency_us(samples)
    runs = []
    for _ in range(c.ray_burst_reps):
        t0 = now_ns()
        actors = [Echo.remote() for _ in range(c.ray_burst)]
        ray.get([a.ping.remote() for a in actors])
        dt = now_ns() - t0
        for a in actors:
            ray.kill(a)
        runs.append({"seconds": dt / 1e9, "per_s": c.ray_burst / (dt / 1e9)})
    res = {"single": {"n": single["n"], "p50_ms": single["p50_us"] / 1e3,
                      "p95_ms": single["p95_us"] / 1e3, "p99_ms": single["p99_us"] / 1e3},
           "burst": {"n": c.ray_burst, **median_runs(runs)}}
    print_table("1. Ray actor start (create actor + first call)", ["what", "value"], [
        ["single actor p50 / p95", f"{fmt(res['single']['p50_ms'], 'ms')} / "
         f"{fmt(res['single']['p95_ms'], 'ms')} (n={single['n']})"],
        [f"{c.ray_burst} actors at once -> all answered", fmt(res["burst"]["seconds"], "s")],
        ["  = actors/s", fmt(res["burst"]["per_s"], "/s")],
    ])
    return res


def _xproc(ray: Any, Echo: Any, c: Counts) -> dict[str, Any]:
    a = Echo.remote()
    if ray.get(a.echo.remote({"check": 7})) != {"check": 7}:
        raise RuntimeError("Ray actor did not echo its payload")
    for i in range(min(c.warmup, 500)):
        ray.get(a.echo.remote(i))
    seq_runs = []
    for _ in range(c.reps):
        samples = []
        start = now_ns()
        for i in range(c.ray_seq):
            t0 = now_ns()
            ray.get(a.echo.remote(i))
            samples.append(now_ns() - t0)
        total = now_ns() - start
        seq_runs.append({**latency_us(samples), "per_s": c.ray_seq / (total / 1e9)})
    pipe: dict[str, Any] = {}
    for w in c.pipe_widths:
        batches = max(1, c.ray_pipe // w)
        ray.get([a.echo.remote(i) for i in range(w)])
        runs = []
        for _ in range(c.reps):
            t0 = now_ns()
            for _b in range(batches):
                ray.get([a.echo.remote(i) for i in range(w)])
            dt = now_ns() - t0
            runs.append({"per_s": batches * w / (dt / 1e9), "requests": batches * w})
        pipe[f"raylist-{w}"] = median_runs(runs)
    ray.kill(a)
    res = {"sequential": median_runs(seq_runs), "pipelined": pipe,
           "pipelined_best_per_s": max(p["per_s"] for p in pipe.values())}
    s = res["sequential"]
    rows = [["sequential ray.get(a.echo.remote(x))", fmt(s["p50_us"], "us"),
             fmt(s["p99_us"], "us"), fmt(s["per_s"], "/s")]]
    for key, p in pipe.items():
        rows.append([pipe_label(key), "", "", fmt(p["per_s"], "/s")])
    print_table("2. Ray cross-process actor calls (1 actor)", ["what", "p50", "p99", "throughput"],
                rows)
    return res
