"""Precopy downtime with shrink passes (livemig's default) against QEMU's stop-at-the-first-fit
(x-shrink-passes 0), alternating in the same run on livemig's workload guest.

    python3 bench/shrink_passes.py [--mem 1G] [--ws 16] [--reps 5] [--max-bandwidth 100000000000]

Each run: two fresh `livemig vm` processes over loopback TCP, the guest rewriting a working set
of --ws MiB; after the migration the guest's memory invariant is checked page by page and the
guest must run on the destination. Prints per run and medians: downtime, total time, pages
copied while the guest was stopped, shrink passes; then the ratios shrink / first-fit.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from livemig.cli import run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image

MODES = {"first-fit": 0, "shrink": None}  # None: the default x-shrink-passes


def one(mem: str, ws_mib: int, passes: int | None, bandwidth: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="livemig-shrink-"))
    procs = start_vms(tmp, make_image(ws_mib), mem)
    try:
        wait_workload(tmp, procs[0], 3)
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, bandwidth, None, quiet=True,
                          timeout=120, params=None if passes is None else {"x-shrink-passes": passes})
        s = r["source"]
        sw = s.get("x-livemig-switchover", {})
        out = {"status": s["status"], "downtime_ms": s.get("downtime"), "total_ms": s.get("total-time"),
               "stopped_pages": sw.get("pages"), "shrink_passes": sw.get("shrink-passes")}
        if s["status"] == "completed":
            ok, why = verify_migrated(tmp, int(mem[:-1]) << {"M": 20, "G": 30}[mem[-1]], ws_mib)
            out["integrity"] = "ok" if ok else f"FAILED: {why}"
        return out
    finally:
        stop_vms(tmp, procs, remove=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--ws", type=int, default=16, help="working set, MiB")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--max-bandwidth", type=int, default=100_000_000_000,
                    help="bytes/s (default 100 GB/s: unlimited, as the shared harness)")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    for i in range(args.reps):
        for mode, passes in MODES.items():  # alternating: slow drifts of the host hit both
            r = one(args.mem, args.ws, passes, args.max_bandwidth)
            runs[mode].append(r)
            print(f"{i + 1} {mode}: {r}", flush=True)
    bad = sum(r.get("integrity") != "ok" for rs in runs.values() for r in rs)
    keys = ("downtime_ms", "total_ms", "stopped_pages", "shrink_passes")
    med = {m: {k: statistics.median(r[k] for r in rs) for k in keys} for m, rs in runs.items()}
    print(f"\n{args.mem} guest, {args.ws} MiB working set, max-bandwidth {args.max_bandwidth}, medians of {args.reps}")
    print("| metric | first-fit (QEMU's) | shrink (livemig) | ratio |\n|---|---|---|---|")
    for k in keys:
        a, b = med["first-fit"][k], med["shrink"][k]
        print(f"| {k} | {a:g} | {b:g} | {b / a:.2f} |" if a else f"| {k} | {a:g} | {b:g} | - |")
    print(f"integrity: {'all ok' if not bad else f'{bad} FAILED'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
