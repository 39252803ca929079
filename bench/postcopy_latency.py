"""Remote-fault latency of livemig postcopy, with and without postcopy-preempt, on a guest that
dirties all its RAM, switched to postcopy after the first pass (or at once, `--switch now`).

    python3 bench/postcopy_latency.py [--mem 1G] [--reps 3] [--modes main,preempt,preempt-rp] [--backends auto,ram]
                                      [--urgent on,off] [--guest harness|demo] [--switch first-pass|now]
                                      [--push-bandwidth 20M]

Guests: `harness`, the shared harness's boot sector (it mostly keeps behind the background push,
so it faults 0 to a few hundred times a run); `demo`, livemig's demo workload, which outruns the
push when switched at once and faults steadily (hundreds to thousands of times a run; after the
first pass the destination now takes the rest in before the guest catches up, and it faults a few
times); its memory invariant is checked on the destination after each run.

Modes: `main` one connection; `preempt` postcopy-preempt with page requests on the preempt
connection (x-preempt-requests, the default between two livemigs); `preempt-rp` postcopy-preempt
with page requests on the main connection's return path (as QEMU). `--urgent on,off` alternates
the urgent processes (x-urgent-process on both sides, used in `preempt` mode) with threads.

`--push-bandwidth` sets max-postcopy-bandwidth, which bounds the background push and not the
requested pages: with a low value (20M) nearly every page is requested, one at a time, and the
request path is measured by itself, without the push and the loader beside it.

Prints per run and the medians: downtime, switchover -> complete, page requests, destination
blocktime, fault -> placement latency p50 / p99 (livemig's own `x-livemig-postcopy`), and the
CPU per fault of each thread on the request path (`/proc/.../schedstat`, sampled every 0.1 s
while the VMs run; thread mode only: the urgent processes are not sampled).
"""
from __future__ import annotations

import argparse
import statistics
import struct
import tempfile
import threading
import time
from pathlib import Path

from livemig.cli import parse_size, run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image

GUEST = Path(__file__).resolve().parents[2] / "shared" / "bench" / "guest" / "dirty.bin"


MODES = {"main": (False, False), "preempt": (True, True), "preempt-rp": (True, False)}  # (preempt, requests on it)


REQUEST_THREADS = ("mig/dst/fault", "mig/src/preempt", "mig/dst/preempt")  # comm: 15 characters


class ThreadCpu:
    """On-CPU time and times scheduled in (schedstat) of named threads of some processes,
    sampled until stop() (a thread's last sample stands for it after it ends)."""

    def __init__(self, pids: list[int], every: float = 0.1):
        self.pids, self.every = pids, every
        # /proc path of the task -> (comm, ns on CPU, times scheduled in, times it gave up the CPU)
        self.last: dict[str, tuple[str, int, int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            for pid in self.pids:
                for task in Path(f"/proc/{pid}/task").glob("*"):
                    try:
                        comm = (task / "comm").read_text().strip()
                        ns, _wait, runs = map(int, (task / "schedstat").read_text().split()[:3])
                        st = (task / "status").read_text()
                        vol = int(st.split("voluntary_ctxt_switches:")[1].split()[0])
                    except (OSError, ValueError, IndexError):
                        continue
                    self.last[str(task)] = (comm, ns, runs, vol)

    def stop(self) -> dict[str, tuple[float, int, int]]:
        """comm -> (CPU seconds, times scheduled in, voluntary switches), threads of one name
        summed."""
        self._stop.set()
        self._thread.join()
        out: dict[str, tuple[float, int, int]] = {}
        for comm, ns, runs, vol in self.last.values():
            cpu, n, v = out.get(comm, (0.0, 0, 0))
            out[comm] = (cpu + ns / 1e9, n + runs, v + vol)
        return out


def one(mem: str, mode: str, resend: bool = True, backend: str = "auto", urgent: bool = True,
        guest: str = "harness", now: bool = False, push_bandwidth: int = 0) -> dict:
    preempt, preempt_requests = MODES[mode]
    tmp = Path(tempfile.mkdtemp(prefix="livemig-pclat-"))
    if guest == "demo":
        img = bytearray(make_image(0, False))
    else:
        img = bytearray(GUEST.read_bytes())
        struct.pack_into("<I", img, 0x1F6, 0)  # dirty all RAM
    procs = start_vms(tmp, bytes(img), mem, extra={"dst": ["--memory-backend", backend]})
    cpu = ThreadCpu([p.pid for p in procs])
    try:
        if guest == "demo":
            wait_workload(tmp, procs[0], 1)
        while not (tmp / "src.log").exists() or (tmp / "src.log").stat().st_size < 2:
            time.sleep(0.05)
        params = {} if resend else {"x-preempt-resend": False}
        if push_bandwidth:
            params["max-postcopy-bandwidth"] = push_bandwidth
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, 100_000_000_000, None,
                          quiet=True, postcopy=True, preempt=preempt, preempt_requests=preempt_requests,
                          urgent_process=urgent, postcopy_now=now, params=params or None)
        threads = cpu.stop()
        s, d = r["source"], r["destination"]
        pc = d.get("x-livemig-postcopy", {})
        mine = [t for t in REQUEST_THREADS if t in threads and pc.get("faults") and pc.get("fault-path") == "threads"]
        status = s["status"]
        if guest == "demo" and status == "completed":
            ok, why = verify_migrated(tmp, parse_size(mem), 0)
            if not ok:
                status = f"integrity FAILED: {why}"
        return {"status": status, "downtime": s.get("downtime"), "switch_to_complete_s": r["switch_to_complete_s"],
                "requests": s.get("ram", {}).get("postcopy-requests"), "blocktime": d.get("postcopy-blocktime"),
                "p50": pc.get("p50-us"), "p99": pc.get("p99-us"), "path": pc.get("fault-path"),
                "faults": pc.get("faults"), "mapped_at_fault": pc.get("mapped-at-fault"),
                "mapped_p50": pc.get("mapped-at-fault-p50-us"),
                "cpu_per_fault_us": {t: round(threads[t][0] * 1e6 / pc["faults"], 1) for t in mine},
                "runs_per_fault": {t: round(threads[t][1] / pc["faults"], 2) for t in mine},
                "sleeps_per_fault": {t: round(threads[t][2] / pc["faults"], 2) for t in mine}}
    finally:
        cpu.stop()
        stop_vms(tmp, procs, remove=True)


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
    ap.add_argument("--push-bandwidth", type=parse_size, default=0,
                    help="max-postcopy-bandwidth (e.g. 20M): a slow push leaves the request path by itself")
    a = ap.parse_args()
    modes = a.modes.split(",")
    if not modes or any(m not in MODES for m in modes):
        ap.error(f"--modes takes some of {', '.join(MODES)}")
    runs = [f"{m}/{b}/{u}" for m in modes for b in a.backends.split(",") for u in a.urgent.split(",")]
    results: dict[str, list[dict]] = {m: [] for m in runs}
    for _ in range(a.reps):
        for run in runs:
            mode, backend, urgent = run.split("/")
            r = one(a.mem, mode, not a.no_resend, backend, urgent == "on", a.guest, a.switch == "now",
                    a.push_bandwidth)
            results[run].append(r)
            print(f"{run:15s}", r, flush=True)
    print(f"\nmedians over {a.reps} runs, {a.mem} {a.guest} guest dirtying all RAM, switched {a.switch}:")
    for mode, rs in results.items():
        ok = [r for r in rs if r["status"] == "completed" and r["p50"] is not None]
        med = {k: statistics.median([r[k] for r in ok]) for k in ("downtime", "switch_to_complete_s", "requests",
                                                               "blocktime", "p50", "p99")} if ok else {}
        cpu = {t: statistics.median([r["cpu_per_fault_us"][t] for r in ok if t in r["cpu_per_fault_us"]])
               for t in REQUEST_THREADS if any(t in r["cpu_per_fault_us"] for r in ok)}
        per = {k: {t: statistics.median([r[k][t] for r in ok if t in r[k]]) for t in cpu}
               for k in ("runs_per_fault", "sleeps_per_fault")}
        print(f"  {mode:15s}: {len(ok)}/{len(rs)} ok  {med}" +
              (f"  CPU us per fault {cpu}, times scheduled in per fault {per['runs_per_fault']}, "
               f"of them after sleeping {per['sleeps_per_fault']}" if cpu else ""))


if __name__ == "__main__":
    main()
