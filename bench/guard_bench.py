"""Runtime request throughput with policy and audit on, against the same run with both off.

    .venv/bin/python -m bench.guard_bench [--quick]

One in-process Echo agent; requests from the client, one at a time and 64 in flight. "On"
is the default runtime (audit trail in CORRAL_HOME/audit.db, group commit, synchronous=NORMAL)
plus the example policies (examples/policies/*.cedar) in force, so every request is a policy
decision (`agent.request`, with its payload size in the context) and an audit record (its
payload's SHA-256). "Off" is `audit=False` and no policies. The two alternate, run by run,
and the figures are medians. Target: on/off >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.conftest import manifest  # noqa: E402  (the same Echo agent the tests use)


async def _rate(on: bool, n: int, width: int) -> float:
    from corral.runtime.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="corral-guard-bench-") as tmp:
        policies = [ROOT / "examples" / "policies"] if on else []
        async with Runtime(home=Path(tmp), audit=on, policy_paths=policies,
                           use_cgroups=False) as rt:
            echo = manifest("echo", isolation="inproc", concurrency=width)
            echo.metadata.labels["tier"] = "trusted"  # examples/policies: inproc needs trust
            await rt.apply([echo], wait=True, timeout=30)
            for i in range(200):  # warm-up
                await rt.request("echo", i, handler="echo")
            each = n // width

            async def caller() -> None:
                for i in range(each):
                    await rt.request("echo", i, handler="echo")

            t0 = time.perf_counter()
            await asyncio.gather(*(caller() for _ in range(width)))
            return each * width / (time.perf_counter() - t0)


def run(quick: bool = False) -> dict[str, Any]:
    """Medians of alternating on/off runs, one at a time and 64 in flight."""
    n, reps = (2_000, 3) if quick else (10_000, 5)
    out: dict[str, Any] = {}
    for width in (1, 64):
        on: list[float] = []
        off: list[float] = []
        for r in range(reps):
            for mode in ((True, False) if r % 2 == 0 else (False, True)):
                (on if mode else off).append(asyncio.run(_rate(mode, n, width)))
        out[f"w{width}"] = {"on": statistics.median(on), "off": statistics.median(off),
                            "ratio": statistics.median(on) / statistics.median(off)}
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the table."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    res = run(args.quick)
    print("request throughput, policy + audit on vs off (inproc Echo, medians)")
    print(f"{'in flight':>10} {'on (req/s)':>12} {'off (req/s)':>12} {'on/off':>7}  target >= 0.8")
    for width in (1, 64):
        r = res[f"w{width}"]
        status = "met" if r["ratio"] >= 0.8 else "MISSED"
        print(f"{width:>10} {r['on']:>12,.0f} {r['off']:>12,.0f} {r['ratio']:>7.2f}  {status}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
