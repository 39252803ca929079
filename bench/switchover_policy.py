"""Switchover policy vs always-precopy vs always-postcopy, on livemig's workload guest.

    python3 bench/switchover_policy.py [--mem 1G] [--ws 64,0] [--reps 3] [--budget 10000]

For each working set (MiB; 0 = all RAM) and mode, runs REPS migrations between two fresh
`livemig vm` processes, checks integrity (guest invariant page by page, guest running on the
destination only) and prints medians of total time, downtime, and guest progress during the
migration relative to before it (passes/s of the guest, source + destination, during the
migration window / before it). Modes:
  precopy   precopy only; a run that has not converged after --cap seconds is cancelled and
            counted as "did not converge"
  postcopy  postcopy-ram, switched after the first full pass (QEMU's tests' choice)
  policy    postcopy-ram with x-switchover-budget: the source decides
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from livemig.cli import run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image, passes_from_output


def _passes(tmp: Path) -> int:
    return sum(passes_from_output((tmp / f"{n}.log").read_bytes()) if (tmp / f"{n}.log").exists() else 0
               for n in ("src", "dst"))


def one(mem: str, ws_mib: int, mode: str, budget: int, cap: float) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="livemig-policy-"))
    procs = start_vms(tmp, make_image(ws_mib, True), mem)
    try:
        wait_workload(tmp, procs[0], 2)
        p0, t0 = _passes(tmp), time.monotonic()
        time.sleep(1.0)
        rate_before = (_passes(tmp) - p0) / (time.monotonic() - t0)
        p1, t1 = _passes(tmp), time.monotonic()
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, 100_000_000_000, None,
                          quiet=True, timeout=cap, postcopy=mode == "postcopy",
                          policy={"x-switchover-budget": budget} if mode == "policy" else None)
        rate_during = (_passes(tmp) - p1) / (time.monotonic() - t1)
        s = r["source"]
        out = {"status": s["status"], "total_ms": s.get("total-time"), "downtime_ms": s.get("downtime"),
               "progress": rate_during / rate_before if rate_before else None,
               "postcopy": bool(s.get("ram", {}).get("postcopy-bytes")),
               "reason": s.get("x-livemig-switchover-reason", "")}
        if s["status"] == "completed":
            ok, why = verify_migrated(tmp, _size(mem), ws_mib)
            out["integrity"] = "ok" if ok else f"FAILED: {why}"
        return out
    finally:
        stop_vms(tmp, procs, remove=True)


def _size(mem: str) -> int:
    return int(mem[:-1]) << {"M": 20, "G": 30}[mem[-1]]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--ws", default="64,0", help="working sets in MiB, comma separated (0 = all RAM)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--budget", type=int, default=10000, help="x-switchover-budget in ms for the policy mode")
    ap.add_argument("--cap", type=float, default=20.0, help="seconds before an unconverged precopy is cancelled")
    args = ap.parse_args()
    rows = []
    bad = 0
    for ws in (int(w) for w in args.ws.split(",")):
        for mode in ("precopy", "postcopy", "policy"):
            runs = [one(args.mem, ws, mode, args.budget, args.cap) for _ in range(args.reps)]
            for r in runs:
                print(f"ws {ws or 'all'} {mode}: {r}", flush=True)
                bad += r.get("integrity", "ok") != "ok"
            done = [r for r in runs if r["status"] == "completed"]
            med = (lambda k: statistics.median(r[k] for r in done) if done else None)
            rows.append((ws, mode, len(done), len(runs), med("total_ms"), med("downtime_ms"),
                         statistics.median(r["progress"] for r in runs if r["progress"] is not None),
                         sum(r["postcopy"] for r in done)))
    print(f"\n## switchover policy, {args.mem} guest, {args.reps} runs each, medians "
          f"(policy: x-switchover-budget {args.budget} ms; precopy cancelled after {args.cap:.0f} s)\n")
    print("| working set | mode | completed | total-time ms | downtime ms | guest progress during / before | runs in postcopy |")
    print("|---|---|---|---|---|---|---|")
    for ws, mode, nd, nr, tot, down, prog, npc in rows:
        f = (lambda v: "-" if v is None else f"{v:.0f}")
        print(f"| {f'{ws} MiB' if ws else 'all RAM'} | {mode} | {nd}/{nr} | {f(tot)} | {f(down)} | {prog:.2f} | {npc} |")
    if bad:
        print(f"\n{bad} run(s) FAILED the integrity check")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
