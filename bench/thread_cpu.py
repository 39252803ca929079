#!/usr/bin/env python3
"""Where the CPU of a migration goes, thread by thread, on QEMU and on livemig (same run, alternating).

Runs the shared harness (`../shared/bench/migrate_once.py`) and samples the on-CPU time of every
thread of the source and destination VMM processes (/proc/PID/task/TID/schedstat: time on a CPU,
and time runnable but waiting for one) while the
source's migration thread lives (QEMU `live_migration`, livemig `mig/src/main`). QEMU runs with
`-name debug-threads=on` so its threads carry names; livemig names its threads itself.
Prints, per side, the guest's vCPU time and the time of every other thread (the migration's own
work) in that window, medians over the runs:

    python3 bench/thread_cpu.py --scenario idle-prefill --mem 1G --reps 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HARNESS = Path(os.environ.get("HARNESS", Path(__file__).resolve().parent.parent.parent / "shared" / "bench"))
MIGRATION_THREADS = ("live_migration", "mig/src/main")


def is_vcpu(name: str) -> bool:
    return name.startswith("vcpu") or (name.startswith("CPU ") and name.endswith("/KVM"))


def vmm_processes() -> dict[int, str]:
    """pid -> 'src' / 'dst' for every running QEMU or `livemig vm` process."""
    out = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            argv = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        qemu = bool(argv) and b"qemu-system" in argv[0]
        livemig = b"vm" in argv and any(b"livemig" in a for a in argv)
        if qemu or livemig:
            incoming = any(a.startswith(b"--incoming") or a == b"-incoming" for a in argv)
            out[int(p)] = "dst" if incoming else "src"
    return out


def sample(pids: dict[int, str], series: dict, now: float) -> None:
    for pid, side in pids.items():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            try:
                name = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
                on_cpu, waiting = map(int, Path(f"/proc/{pid}/task/{tid}/schedstat").read_text().split()[:2])
            except (OSError, ValueError):
                continue
            series.setdefault((side, int(tid), name), []).append((now, on_cpu, waiting))


def value_at(points: list[tuple[float, int, int]], t: float, field: int = 1) -> int:
    v = points[0][field]
    for p in points:
        if p[0] > t:
            break
        v = p[field]
    return v


def _pass1(result: dict) -> float | None:
    sys.path.insert(0, str(HARNESS))
    from metrics import pass1_rate  # the harness's own definition
    return pass1_rate(result)


def one_run(vmm: str, scenario: str, mem: str, port: int, poll: float, livemig: str | None = None,
            qemu_prealloc: bool = False) -> dict:
    """One harness run; returns per side {'vcpu': s, 'other': s, 'threads': {name: s}} and the result.
    `qemu_prealloc`: QEMU allocates guest RAM at start (-mem-prealloc), as livemig's destination
    does while it waits (see host_memory.py)."""
    with tempfile.TemporaryDirectory(prefix="thread-cpu-") as tmp:
        js = Path(tmp) / "result.json"
        cmd = [sys.executable, str(HARNESS / "migrate_once.py"), "--vmm", vmm, "--scenario", scenario,
               "--mem", mem, "--port", str(port), "--json", str(js)]
        if vmm == "qemu":
            wrapper = Path(tmp) / "qemu-named-threads"
            extra = " -mem-prealloc" if qemu_prealloc else ""
            wrapper.write_text(f'#!/bin/sh\nexec qemu-system-x86_64 -name migrated,debug-threads=on{extra} "$@"\n')
            wrapper.chmod(0o755)
            cmd += ["--qemu", str(wrapper)]
        else:
            cmd += ["--livemig", livemig or f"{sys.executable} -m livemig"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=HARNESS)
        series: dict = {}
        pids: dict[int, str] = {}
        t0, rescan = time.monotonic(), 0.0
        while proc.poll() is None:
            now = time.monotonic() - t0
            if now >= rescan:
                pids, rescan = vmm_processes(), now + 0.25
            sample(pids, series, now)
            time.sleep(poll)
        result = json.loads(js.read_text()) if js.exists() else {}
    windows = [(pts[0][0], pts[-1][0]) for (side, _, name), pts in series.items()
               if side == "src" and name in MIGRATION_THREADS]
    if not windows:
        raise RuntimeError(f"{vmm}: no migration thread seen (outcome {result.get('outcome')})")
    start, end = windows[0]
    out: dict = {"window_s": end - start, "outcome": result.get("outcome"),
                 "integrity": (result.get("integrity") or {}).get("ok"),
                 "harness_cpu": result.get("cpu_s_migration"), "pass1_mbps": _pass1(result)}
    for side in ("src", "dst"):
        threads: dict[str, float] = {}
        waits: dict[str, float] = {}
        for (s, _, name), pts in series.items():
            if s == side:
                threads[name] = threads.get(name, 0.0) + (value_at(pts, end) - value_at(pts, start)) / 1e9
                waits[name] = waits.get(name, 0.0) + (value_at(pts, end, 2) - value_at(pts, start, 2)) / 1e9
        vcpu = sum(v for k, v in threads.items() if is_vcpu(k))
        out[side] = {"vcpu": vcpu, "other": sum(threads.values()) - vcpu,
                     "threads": {k: round(v, 3) for k, v in sorted(threads.items(), key=lambda kv: -kv[1]) if v >= 0.005},
                     "runnable_waiting": {k: round(waits[k], 3) for k in threads if threads[k] >= 0.005}}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", default="idle-prefill")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vmms", default="qemu,livemig")
    ap.add_argument("--port", type=int, default=5600)
    ap.add_argument("--poll", type=float, default=0.02, help="sampling interval, s")
    ap.add_argument("--json", help="write every run here")
    ap.add_argument("--qemu-prealloc", action="store_true",
                    help="QEMU allocates guest RAM at start (-mem-prealloc), as livemig's destination does")
    args = ap.parse_args()
    vmms = args.vmms.split(",")
    runs: dict[str, list[dict]] = {v: [] for v in vmms}
    port = args.port
    for rep in range(args.reps):
        for vmm in vmms:
            port += 1
            r = one_run(vmm, args.scenario, args.mem, port, args.poll, qemu_prealloc=args.qemu_prealloc)
            runs[vmm].append(r)
            print(f"[{rep + 1}/{args.reps}] {vmm:8s} {r['outcome']} integrity {r['integrity']} window {r['window_s']:.2f} s"
                  f"  src vCPU {r['src']['vcpu']:.2f} other {r['src']['other']:.2f}"
                  f"  dst vCPU {r['dst']['vcpu']:.2f} other {r['dst']['other']:.2f}  harness {r['harness_cpu']}",
                  flush=True)
            for side in ("src", "dst"):
                print(f"      {side}: " + ", ".join(f"{k} {v:.2f} (waited {r[side]['runnable_waiting'][k]:.2f})"
                                                  for k, v in r[side]["threads"].items()), flush=True)
    med = {v: {k: statistics.median(f(r) for r in runs[v]) for k, f in (
        ("window", lambda r: r["window_s"]),
        ("src vCPU", lambda r: r["src"]["vcpu"]), ("src other", lambda r: r["src"]["other"]),
        ("dst vCPU", lambda r: r["dst"]["vcpu"]), ("dst other", lambda r: r["dst"]["other"]),
        ("src+dst other", lambda r: r["src"]["other"] + r["dst"]["other"]))} for v in vmms}
    print(f"\n{args.scenario} {args.mem}, medians of {args.reps}, CPU s in the source migration thread's lifetime")
    print("| metric | " + " | ".join(vmms) + (" | ratio |" if len(vmms) == 2 else " |"))
    print("|---|" + "---|" * (len(vmms) + (len(vmms) == 2)))
    for k in med[vmms[0]]:
        vals = [med[v][k] for v in vmms]
        ratio = f" {vals[1] / vals[0]:.2f} |" if len(vmms) == 2 and vals[0] else ""
        print(f"| {k} | " + " | ".join(f"{x:.2f}" for x in vals) + " |" + ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
