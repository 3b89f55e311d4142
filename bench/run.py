"""Run Corral's benchmarks against its peers (Ray, AutoGen core) and report.

    .venv/bin/python -m bench.run            # full run (a few minutes on 2 cores)
    .venv/bin/python -m bench.run --quick    # small counts: a CI smoke run
    .venv/bin/python -m bench.run --only xproc --only ray
    .venv/bin/python -m bench.run --only bus           # the message-bus benchmarks only

Each (system, benchmark) runs in its own subprocess with a time limit, so one system's
leftovers (Ray's daemons, 10k agents' memory) never weigh on another's figures and a hang
can't stall the run. Results go to bench/results/latest.json. The bench only measures:
a missed target is printed as MISSED, never raised.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as `python bench/run.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bus_bench import BUS_BENCHES  # the message-bus benchmarks; `--only bus` = all
from bench.common import ROOT, Counts, fmt, print_table

BENCHES = ("start", "xproc", "inproc", "many-inproc", "many-process", *BUS_BENCHES)
SYSTEMS = ("corral", "autogen", "ray")
#: Names of several benchmarks at once.
GROUPS = {"bus": BUS_BENCHES}

#: (system, benchmarks it runs in one subprocess, time limit full / quick, in seconds)
UNITS: list[tuple[str, tuple[str, ...], int, int]] = [
    ("corral", ("start",), 150, 60),
    ("corral", ("xproc",), 120, 45),
    ("corral", ("inproc",), 120, 45),
    ("corral", ("many-inproc",), 240, 60),
    ("corral", ("many-process",), 180, 60),
    ("autogen", ("inproc", "many-inproc"), 150, 45),
    ("ray", ("start", "xproc"), 240, 120),
    # The bus: Corral's figures, and for NATS/Redis the raw client in the same process
    # (interleaved, so both see the same load); AutoGen's peer figures in their own process.
    ("corral", ("bus-fanout",), 120, 30),
    ("corral", ("bus-latency",), 120, 30),
    ("corral", ("bus-durable",), 120, 30),
    ("corral", ("bus-nats",), 150, 30),
    ("corral", ("bus-redis",), 150, 30),
    ("autogen", ("bus-fanout", "bus-latency"), 150, 40),
]

RESULTS = ROOT / "bench" / "results" / "latest.json"


# ================================================================== worker side


def _worker(unit: str, quick: bool, out: Path) -> int:
    system, _, names = unit.partition(":")
    benches = names.split(",")
    c = Counts.make(quick)
    bus = [n for n in benches if n in BUS_BENCHES]
    rest = [n for n in benches if n not in BUS_BENCHES]
    payload: dict[str, Any]
    try:
        if system == "corral":
            from bench import bus_bench, corral_bench

            why = next(filter(None, map(bus_bench.available, bus)), None)
            if why is not None:
                payload = {"ok": False, "skipped": why}
            else:
                result = {n: corral_bench.run(n, c) for n in rest}
                result.update({n: bus_bench.run_corral(n, quick) for n in bus})
                payload = {"ok": True, "result": result}
        elif system in ("ray", "autogen"):
            if system == "ray":
                from bench import ray_bench as mod
            else:
                from bench import autogen_bench as mod  # type: ignore[no-redef]
            why = mod.available()
            if why is not None:
                payload = {"ok": False, "skipped": why}
            else:
                result = mod.run(rest, c)
                if bus:
                    from bench import bus_bench

                    result.update({n: bus_bench.run_autogen(n, quick) for n in bus})
                payload = {"ok": True, "result": result}
        else:
            raise ValueError(f"unknown system {system!r}")
    except BaseException as exc:  # report, don't hide: the parent prints it
        payload = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc()}
    out.write_text(json.dumps(payload, default=str))
    return 0


# ================================================================== parent side


def _selected(only: list[str]) -> list[tuple[str, tuple[str, ...], int, int]]:
    picks = {p.strip() for o in only for p in o.split(",") if p.strip()}
    unknown = picks - set(BENCHES) - set(SYSTEMS) - set(GROUPS)
    if unknown:
        raise SystemExit(f"--only: unknown name(s) {sorted(unknown)}; use benchmarks "
                         f"{list(BENCHES)}, groups {list(GROUPS)} or systems {list(SYSTEMS)}")
    for group in picks & set(GROUPS):
        picks |= set(GROUPS[group])
    systems = picks & set(SYSTEMS) or set(SYSTEMS)
    benches = picks & set(BENCHES) or set(BENCHES)
    out = []
    for system, names, full, quick in UNITS:
        keep = tuple(n for n in names if n in benches)
        if system in systems and keep:
            out.append((system, keep, full, quick))
    return out


def _run_unit(system: str, names: tuple[str, ...], limit: int, quick: bool) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(prefix="corral-bench-", suffix=".json", delete=False) as f:
        out = Path(f.name)
    cmd = [sys.executable, "-m", "bench.run", "--worker", f"{system}:{','.join(names)}",
           "--worker-out", str(out)] + (["--quick"] if quick else [])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # our own child's process group only
        proc.wait()
        out.unlink(missing_ok=True)
        return {"ok": False, "error": f"timed out after {limit}s", "elapsed_s": limit}
    elapsed = time.monotonic() - t0
    try:
        res = json.loads(out.read_text())
    except (OSError, ValueError):
        res = {"ok": False, "error": f"worker exited with {proc.returncode} and no result"}
    finally:
        out.unlink(missing_ok=True)
    res["elapsed_s"] = round(elapsed, 1)
    return res


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("corral", "ray", "autogen-core", "msgspec", "psutil", "nats-py", "redis"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _machine() -> dict[str, Any]:
    import psutil

    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "cpu_model": model,
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
            "platform": platform.platform(), "python": sys.version.split()[0],
            "python_executable": sys.executable, "versions": _versions()}


# ------------------------------------------------------------------ the comparison table


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


@dataclasses.dataclass
class Row:
    bench: str
    what: str
    unit: str
    corral: Callable[[dict[str, Any]], Any]
    peer_name: str = ""
    peer: Callable[[dict[str, Any]], Any] = lambda r: None
    lower_is_better: bool = True
    target: float | None = None
    full_only: bool = False  # the target is stated for the full count only
    ratio_target: float | None = None  # the target is Corral / peer >= this (throughputs)


def _rows(c: Counts) -> list[Row]:
    n10k, n1k, nb = c.many_inproc, c.many_process, c.burst
    C, R, A = "corral", "ray", "autogen"
    return [
        Row("start", "process agent start p50 (apply 1, wait Ready)", "ms",
            lambda r: _get(r, C, "start", "single_apply", "p50_ms"), "Ray actor+1st call",
            lambda r: _get(r, R, "start", "single", "p50_ms"), target=5),
        Row("start", "process agent start p95 (apply 1, wait Ready)", "ms",
            lambda r: _get(r, C, "start", "single_apply", "p95_ms"), "Ray actor+1st call",
            lambda r: _get(r, R, "start", "single", "p95_ms")),
        Row("start", "process agent start p50 (scale +1, wait Ready)", "ms",
            lambda r: _get(r, C, "start", "single_scale", "p50_ms"), "Ray actor+1st call",
            lambda r: _get(r, R, "start", "single", "p50_ms"), target=5),
        Row("start", f"agents started at once ({nb}; Ray {c.ray_burst})", "/s",
            lambda r: _get(r, C, "start", "burst", "per_s"), "Ray actors at once",
            lambda r: _get(r, R, "start", "burst", "per_s"), lower_is_better=False, target=300),
        Row("start", "cold start once: zygote (Corral) / ray.init (Ray)", "ms",
            lambda r: _get(r, C, "start", "zygote_start_ms"), "ray.init(num_cpus=2)",
            lambda r: (_get(r, R, "init_s") or 0) * 1e3 or None),
        Row("xproc", "cross-process request p50 (sequential)", "us",
            lambda r: _get(r, C, "xproc", "sequential", "p50_us"), "Ray actor call",
            lambda r: _get(r, R, "xproc", "sequential", "p50_us"), target=100),
        Row("xproc", "cross-process request p99 (sequential)", "us",
            lambda r: _get(r, C, "xproc", "sequential", "p99_us"), "Ray actor call",
            lambda r: _get(r, R, "xproc", "sequential", "p99_us")),
        Row("xproc", "cross-process sequential throughput", "/s",
            lambda r: _get(r, C, "xproc", "sequential", "per_s"), "Ray actor call",
            lambda r: _get(r, R, "xproc", "sequential", "per_s"), lower_is_better=False),
        Row("xproc", "cross-process pipelined throughput (best width)", "/s",
            lambda r: _get(r, C, "xproc", "pipelined_best_per_s"), "Ray actor calls",
            lambda r: _get(r, R, "xproc", "pipelined_best_per_s"), lower_is_better=False,
            target=25_000),
        Row("inproc", "in-process request p50 (sequential)", "us",
            lambda r: _get(r, C, "inproc", "sequential", "p50_us"), "AutoGen send_message",
            lambda r: _get(r, A, "inproc", "sequential", "p50_us"), target=25),
        Row("inproc", "in-process request p99 (sequential)", "us",
            lambda r: _get(r, C, "inproc", "sequential", "p99_us"), "AutoGen send_message",
            lambda r: _get(r, A, "inproc", "sequential", "p99_us")),
        Row("inproc", "in-process sequential throughput", "/s",
            lambda r: _get(r, C, "inproc", "sequential", "per_s"), "AutoGen send_message",
            lambda r: _get(r, A, "inproc", "sequential", "per_s"), lower_is_better=False),
        Row("inproc", "in-process pipelined throughput (best width)", "/s",
            lambda r: _get(r, C, "inproc", "pipelined_best_per_s"), "AutoGen send_message",
            lambda r: _get(r, A, "inproc", "pipelined_best_per_s"), lower_is_better=False,
            target=50_000),
        Row("many-inproc", f"{n10k:,} inproc agents: apply -> all answered", "s",
            lambda r: _get(r, C, "many-inproc", "total_s"), f"AutoGen {n10k:,} AgentIds",
            lambda r: _get(r, A, "many-inproc", "total_s"), target=0.5, full_only=True),
        Row("many-process", f"{n1k:,} process agents: apply -> all Ready", "s",
            lambda r: _get(r, C, "many-process", "start_s")),
        Row("many-process", "per-agent USS, median", "MiB",
            lambda r: _get(r, C, "many-process", "uss_median_mb"), target=10),
        Row("many-process", f"runtime RSS with {n1k:,} process agents", "MiB",
            lambda r: _get(r, C, "many-process", "runtime_rss_mb")),
        *_bus_rows(),
    ]


def _bus_rows() -> list[Row]:
    C, A = "corral", "autogen"
    rows = [
        Row("bus-fanout", "bus fan-out 1->100, at-most-once, via Bus.consume", "/s",
            lambda r: _get(r, C, "bus-fanout", "bus", "per_s"), "AutoGen publish_message",
            lambda r: _get(r, A, "bus-fanout", "per_s"), lower_is_better=False, target=500_000),
        Row("bus-fanout", "bus fan-out 1->100, backend only (publish+fetch+ack)", "/s",
            lambda r: _get(r, C, "bus-fanout", "backend", "per_s"), lower_is_better=False),
        Row("bus-latency", "bus publish->handler p50, 100 subscribers", "us",
            lambda r: _get(r, C, "bus-latency", "subs100", "p50_us"), "AutoGen publish_message",
            lambda r: _get(r, A, "bus-latency", "subs100", "p50_us")),
        Row("bus-latency", "bus publish->handler p99, 100 subscribers", "us",
            lambda r: _get(r, C, "bus-latency", "subs100", "p99_us"), "AutoGen publish_message",
            lambda r: _get(r, A, "bus-latency", "subs100", "p99_us"), target=200),
        Row("bus-latency", "bus publish->handler p99, 1 subscriber", "us",
            lambda r: _get(r, C, "bus-latency", "subs1", "p99_us"), "AutoGen publish_message",
            lambda r: _get(r, A, "bus-latency", "subs1", "p99_us")),
    ]
    for n in (1, 10, 100):
        rows += [
            Row("bus-durable", f"bus at-least-once local, {n} publisher(s)", "/s",
                lambda r, n=n: _get(r, C, "bus-durable", f"pub{n}", "per_s"),
                lower_is_better=False, target=20_000 if n == 100 else None),
            Row("bus-durable", f"bus at-least-once local, {n} publisher(s): publish p99", "ms",
                lambda r, n=n: _get(r, C, "bus-durable", f"pub{n}", "p99_ms"), target=5),
        ]
    for kind, raw in (("nats", "raw nats-py"), ("redis", "raw redis-py")):
        for key, what in (("seq_per_s", "(a) publish one at a time"),
                          ("pipe_per_s", "(b) publish, 256 in flight"),
                          ("consume_per_s", "(c) consume + ack in batches")):
            rows.append(Row(
                f"bus-{kind}", f"bus {kind.upper()} {what}", "/s",
                lambda r, k=kind, key=key: _get(r, C, f"bus-{k}", "corral", key), raw,
                lambda r, k=kind, key=key: _get(r, C, f"bus-{k}", "raw", key),
                lower_is_better=False, ratio_target=0.7))
    return rows


def _ratio(row: Row, mine: Any, theirs: Any) -> str:
    if not isinstance(mine, int | float) or not isinstance(theirs, int | float) or \
            mine <= 0 or theirs <= 0:
        return ""
    if row.ratio_target is not None:
        return f"at {mine / theirs:.2f}x peer"
    x = theirs / mine if row.lower_is_better else mine / theirs
    return f"{x:.1f}x faster" if x >= 1 else f"{1 / x:.1f}x slower"


def _status(row: Row, mine: Any, quick: bool, theirs: Any = None) -> str:
    if row.ratio_target is not None:
        if not isinstance(mine, int | float) or not isinstance(theirs, int | float) or theirs <= 0:
            return "no data"
        return "met" if mine / theirs >= row.ratio_target else "MISSED"
    if row.target is None:
        return ""
    if not isinstance(mine, int | float):
        return "no data"
    if row.full_only and quick:
        return "n/a (--quick)"
    ok = mine <= row.target if row.lower_is_better else mine >= row.target
    return "met" if ok else "MISSED"


def _target(row: Row) -> str | None:
    if row.ratio_target is not None:
        return f">= {row.ratio_target:.2f}x peer"
    if row.target is None:
        return None
    return f"{'<=' if row.lower_is_better else '>='} {fmt(row.target, row.unit)}"


def summarize(results: dict[str, Any], c: Counts) -> list[dict[str, Any]]:
    """The comparison rows (also printed as a table)."""
    out, printed = [], []
    for row in _rows(c):
        mine, theirs = row.corral(results), row.peer(results)
        if mine is None and theirs is None:
            continue
        ratio, status = _ratio(row, mine, theirs), _status(row, mine, c.quick, theirs)
        target = _target(row)
        out.append({"bench": row.bench, "what": row.what, "unit": row.unit, "corral": mine,
                    "peer": row.peer_name or None, "peer_value": theirs,
                    "corral_vs_peer": ratio or None, "target": target, "status": status or None})
        printed.append([row.what, fmt(mine, row.unit), row.peer_name or "",
                        fmt(theirs, row.unit) if theirs is not None else "",
                        f"Corral {ratio}" if ratio else "", target or "", status])
    print_table("SUMMARY: Corral vs peers (medians over repeated runs)",
                ["benchmark", "Corral", "peer", "peer value", "ratio", "target", "status"],
                printed)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small counts (CI smoke run)")
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help=f"run only these benchmarks {list(BENCHES)} (`bus` = every bus-*) "
                         f"and/or systems {list(SYSTEMS)}; repeat or comma-separate")
    ap.add_argument("--out", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args.worker, args.quick, args.worker_out)

    c = Counts.make(args.quick)
    units = _selected(args.only)
    started = time.monotonic()
    machine = _machine()
    load_before = os.getloadavg()
    print(f"Corral benchmarks{' (--quick)' if args.quick else ''}: {machine['cpu_count']} CPUs "
          f"({machine['cpu_model']}), Python {machine['python']}, "
          f"corral {machine['versions']['corral']}, ray {machine['versions']['ray']}, "
          f"autogen-core {machine['versions']['autogen-core']}; load average "
          f"{load_before[0]:.2f}", flush=True)

    results: dict[str, Any] = {}
    problems: dict[str, Any] = {}
    for system, names, full, quick in units:
        label = f"{system}:{','.join(names)}"
        print(f"\n=== {label} ===", flush=True)
        res = _run_unit(system, names, quick if args.quick else full, args.quick)
        if res.get("ok"):
            r = res["result"]
            sysres = results.setdefault(system, {})
            sysres.update(r)
            sysres.setdefault("_elapsed_s", {})[",".join(names)] = res["elapsed_s"]
        else:
            why = res.get("skipped") or res.get("error")
            kind = "SKIPPED" if res.get("skipped") else "FAILED"
            print(f"{kind} {label}: {why}", flush=True)
            if res.get("traceback"):
                print(res["traceback"], file=sys.stderr, flush=True)
            problems[label] = {"status": kind.lower(), "reason": why}

    summary = summarize(results, c)
    missed = [s["what"] for s in summary if s["status"] == "MISSED"]
    elapsed = time.monotonic() - started
    doc = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "quick": args.quick, "only": args.only, "machine": machine,
        "load_average": {"before": load_before, "after": os.getloadavg()},
        "counts": dataclasses.asdict(c), "results": results, "summary": summary,
        "missed": missed, "problems": problems, "elapsed_s": round(elapsed, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for label, p in problems.items():
        print(f"{p['status'].upper()}: {label}: {p['reason']}")
    print(f"\n{len(missed)} target(s) missed; results in {args.out} ({elapsed:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
