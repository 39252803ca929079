"""Remote-fault latency of livemig postcopy, with and without postcopy-preempt, on a guest that
dirties all its RAM, switched to postcopy after the first pass (or at once, `--switch now`).

    python3 bench/postcopy_latency.py [--mem 1G] [--reps 3] [--modes main,preempt,preempt-rp] [--backends auto,ram]
                                      [--urgent on,off] [--guest harness|demo] [--switch first-pass|now]

Guests: `harness`, the shared harness's boot sector (it mostly keeps behind the background push,
so it faults 0 to a few hundred times a run); `demo`, livemig's demo workload, which outruns the
push when switched at once and faults steadily (hundreds to thousands of times a run; after the
first pass the destination now takes the rest in before the guest catches up, and it faults a few
times); its memory invariant is checked on the destination after each run.

Modes: `main` one connection; `preempt` postcopy-preempt with page requests on the preempt
connection (x-preempt-requests, the default between two livemigs); `preempt-rp` postcopy-preempt
with page requests on the main connection's return path (as QEMU). `--urgent on,off` alternates
the urgent processes (x-urgent-process on both sides, used in `preempt` mode) with threads.

Prints per run and the medians: downtime, switchover -> complete, page requests, destination
blocktime, and fault -> placement latency p50 / p99 (livemig's own `x-livemig-postcopy`).
"""
from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import time
from pathlib import Path

from livemig.cli import parse_size, run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image

GUEST = Path(__file__).resolve().parents[2] / "shared" / "bench" / "guest" / "dirty.bin"


MODES = {"main": (False, False), "preempt": (True, True), "preempt-rp": (True, False)}  # (preempt, requests on it)


def one(mem: str, mode: str, resend: bool = True, backend: str = "auto", urgent: bool = True,
        guest: str = "harness", now: bool = False) -> dict:
    preempt, preempt_requests = MODES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="livemig-pclat-"))
    if guest == "demo":
        img = bytearray(make_image(0, False))
    else:
        img = bytearray(GUEST.read_bytes())
        struct.pack_into("<I", img, 0x1F6, 0)  # dirty all RAM
    procs = start_vms(tmp, bytes(img), mem, extra={"dst": ["--memory-backend", backend]})
    try:
        if guest == "demo":
            wait_workload(tmp, procs[0], 1)
        while not (tmp / "src.log").exists() or (tmp / "src.log").stat().st_size < 2:
            time.sleep(0.05)
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, 100_000_000_000, None,
                          quiet=True, postcopy=True, preempt=preempt, preempt_requests=preempt_requests,
                          urgent_process=urgent, postcopy_now=now,
                          params=None if resend else {"x-preempt-resend": False})
        s, d = r["source"], r["destination"]
        pc = d.get("x-livemig-postcopy", {})
        status = s["status"]
        if guest == "demo" and status == "completed":
            ok, why = verify_migrated(tmp, parse_size(mem), 0)
            if not ok:
                status = f"integrity FAILED: {why}"
        return {"status": status, "downtime": s.get("downtime"), "switch_to_complete_s": r["switch_to_complete_s"],
                "requests": s.get("ram", {}).get("postcopy-requests"), "blocktime": d.get("postcopy-blocktime"),
                "p50": pc.get("p50-us"), "p99": pc.get("p99-us"), "path": pc.get("fault-path"),
                "faults": pc.get("faults"), "mapped_at_fault": pc.get("mapped-at-fault"),
                "mapped_p50": pc.get("mapped-at-fault-p50-us")}
    finally:
        stop_vms(tmp, procs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-resend", action="store_true", help="preempt with x-preempt-resend off (QEMU's rule: a queued requested page is not sent again)")
    ap.add_argument("--backends", default="auto", help="destination --memory-backend values to alternate (auto,ram)")
    ap.add_argument("--modes", default="main,preempt", help=f"which of {','.join(MODES)} to run (comma-separated)")
    ap.add_argument("--urgent", default="off", help="urgent processes (x-urgent-process): off, on or on,off (alternated)")
    ap.add_argument("--guest", default="harness", choices=("harness", "demo"))
    ap.add_argument("--switch", default="first-pass", choices=("first-pass", "now"),
                    help="switch to postcopy after the first pass, or right after `migrate`")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes some of {', '.join(MODES)}")
    runs = [f"{m}/{b}/{u}" for m in modes for b in a.backends.split(",") for u in a.urgent.split(",")]
    results: dict[str, list[dict]] = {m: [] for m in runs}
    for _ in range(a.reps):
        for run in runs:
            mode, backend, urgent = run.split("/")
            r = one(a.mem, mode, not a.no_resend, backend, urgent == "on", a.guest, a.switch == "now")
            results[run].append(r)
            print(f"{run:15s}", r, flush=True)
    print(f"\nmedians over {a.reps} runs, {a.mem} {a.guest} guest dirtying all RAM, switched {a.switch}:")
    for mode, rs in results.items():
        ok = [r for r in rs if r["status"] == "completed" and r["p50"] is not None]
        med = {k: statistics.median([r[k] for r in ok]) for k in ("downtime", "switch_to_complete_s", "requests",
                                                               "blocktime", "p50", "p99")} if ok else {}
        print(f"  {mode:15s}: {len(ok)}/{len(rs)} ok  {med}")


if __name__ == "__main__":
    main()
