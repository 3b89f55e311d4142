"""Audit trail benchmark: sealed appends per second through ``AuditLog``, and verify time.

Run it with ``.venv/bin/python -m bench.audit_bench [--quick] [--out FILE]``.

What is measured, each on a fresh trail in a temporary folder, with the log's defaults
(seal every 1000 records or 1 s, ``synchronous=FULL``: every batch is fsynced):

- **append, concurrent**: ``APPENDERS`` tasks each awaiting ``append`` in a loop. A record
  counts once ``append`` returned its seq, i.e. once it was committed to SQLite; seals are
  written as they fall due and are included in the file, not in the count.
- **append, one at a time**: one task awaiting each append before the next (a commit each).
- **verify**: ``AuditLog.verify()`` over a trail of 1,000,000 records (100,000 with
  ``--quick``) written through the same ``AuditLog``: read every row from SQLite, recompute
  each link, decode each body, check every seal signature. Nothing is extrapolated: the
  figure is what was measured at that size, with its per-record rate beside it.

Every figure is the median of ``reps`` runs. Timings never fail the bench: a missed target
prints ``MISSED``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from corral.audit import AuditLog

APPENDERS = 64
#: Targets from the audit issue.
APPEND_TARGET = 20_000  # sealed records per second, committed
VERIFY_TARGET_S = 10.0  # for 1,000,000 records
VERIFY_TARGET_RECORDS = 1_000_000


def _counts(quick: bool) -> dict[str, int]:
    if quick:
        return {"reps": 3, "concurrent": 20_000, "sequential": 2_000, "verify": 100_000}
    return {"reps": 3, "concurrent": 200_000, "sequential": 10_000,
            "verify": VERIFY_TARGET_RECORDS}


def _payload(i: int) -> dict[str, Any]:
    # A message-metadata record, the commonest kind: subject, size and payload hash.
    return {"payload_sha256": f"{i:064x}", "size": 512 + i % 100, "subject": "agents.b.inbox"}


async def _append_concurrent(home: Path, total: int) -> float:
    """Records per second with APPENDERS tasks appending at once; returns the rate."""
    each = total // APPENDERS
    async with AuditLog(home / "audit.db", home / "keys") as log:
        async def appender(n: int) -> None:
            for i in range(each):
                await log.append("message.sent", actor=f"agent:a{n}", agent=f"a{n}",
                                 resource="agents.b", outcome="ok", data=_payload(i))
        t0 = time.perf_counter()
        await asyncio.gather(*(appender(n) for n in range(APPENDERS)))
        elapsed = time.perf_counter() - t0
    return each * APPENDERS / elapsed


async def _append_sequential(home: Path, total: int) -> float:
    async with AuditLog(home / "audit.db", home / "keys") as log:
        t0 = time.perf_counter()
        for i in range(total):
            await log.append("tool.call", actor="agent:a", agent="a", resource="search",
                             outcome="ok", data=_payload(i))
        elapsed = time.perf_counter() - t0
    return total / elapsed


async def _verify(home: Path, records: int, reps: int) -> dict[str, Any]:
    # The trail to verify is written by the real AuditLog, 64 appenders at a time.
    build = await _append_concurrent(home, records)
    async with AuditLog(home / "audit.db", home / "keys") as log:
        runs = []
        for _ in range(reps):
            t0 = time.perf_counter()
            report = await log.verify()
            runs.append(time.perf_counter() - t0)
            assert report.ok, report.reason
    size = await asyncio.to_thread(os.path.getsize, home / "audit.db")
    return {"records": report.records, "seals": report.seals, "runs_s": runs,
            "median_s": statistics.median(runs), "build_per_s": build, "db_bytes": size}


async def _run(quick: bool) -> dict[str, Any]:
    c = _counts(quick)
    with tempfile.TemporaryDirectory(prefix="corral-audit-bench-") as tmp:
        root = Path(tmp)
        await _append_concurrent(root / "warm", 2_000)  # imports, page cache, first key
        conc = [await _append_concurrent(root / f"c{i}", c["concurrent"])
                for i in range(c["reps"])]
        seq = [await _append_sequential(root / f"s{i}", c["sequential"])
               for i in range(c["reps"])]
        ver = await _verify(root / "v", c["verify"], c["reps"])
    per_record_us = ver["median_s"] / ver["records"] * 1e6
    append = statistics.median(conc)
    verify_met: str | bool = (ver["median_s"] <= VERIFY_TARGET_S
                              if ver["records"] >= VERIFY_TARGET_RECORDS
                              else "not measured at 1M (--quick)")
    return {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform()},
        "counts": c,
        "append_concurrent_per_s": append,
        "append_concurrent_runs": conc,
        "appenders": APPENDERS,
        "append_sequential_per_s": statistics.median(seq),
        "append_sequential_runs": seq,
        "verify_records": ver["records"],
        "verify_seals": ver["seals"],
        "verify_s": ver["median_s"],
        "verify_runs_s": ver["runs_s"],
        "verify_per_record_us": per_record_us,
        "verify_trail_build_per_s": ver["build_per_s"],
        "verify_db_bytes": ver["db_bytes"],
        "targets": {"append_per_s": APPEND_TARGET,
                    "verify_s": VERIFY_TARGET_S, "verify_records": VERIFY_TARGET_RECORDS},
        "met": {"append": append >= APPEND_TARGET, "verify": verify_met},
    }


def run(quick: bool) -> dict[str, Any]:
    """Run the benchmark and return its figures (medians, every run, targets, MET/MISSED)."""
    return asyncio.run(_run(quick))


def _status(met: str | bool) -> str:
    return met if isinstance(met, str) else "MET" if met else "MISSED"


def main(argv: list[str] | None = None) -> None:
    """Command line: print the figures as a table; ``--out`` also writes them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small counts (about 15 s)")
    parser.add_argument("--out", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    r = run(args.quick)
    c = r["counts"]
    rows = [
        (f"append, {APPENDERS} concurrent appenders ({c['concurrent']:,} records)",
         f"{r['append_concurrent_per_s']:,.0f} records/s",
         f">= {APPEND_TARGET:,}/s", _status(r["met"]["append"])),
        (f"append, one at a time ({c['sequential']:,} records)",
         f"{r['append_sequential_per_s']:,.0f} records/s", "-", "-"),
        (f"verify {r['verify_records']:,} records ({r['verify_seals']:,} seals)",
         f"{r['verify_s']:.2f} s ({r['verify_per_record_us']:.2f} us/record)",
         f"<= {VERIFY_TARGET_S:.0f} s for {VERIFY_TARGET_RECORDS:,}", _status(r["met"]["verify"])),
    ]
    widths = [max(len(str(row[i])) for row in rows) for i in range(4)]
    print(f"Audit trail, median of {c['reps']} runs; sealed, committed (synchronous=FULL); "
          f"{r['machine']['cpus']} CPUs, Python {r['machine']['python']}")
    for row in rows:
        print("  " + "  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"  (the verified trail: {r['verify_db_bytes'] / 1e6:,.0f} MB, written at "
          f"{r['verify_trail_build_per_s']:,.0f} records/s)")
    if args.out:
        args.out.write_text(json.dumps(r, indent=1) + "\n")


if __name__ == "__main__":
    main()
