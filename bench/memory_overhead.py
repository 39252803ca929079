"""Extra memory of livemig's processes beyond guest RAM, before and during a migration.

    python3 bench/memory_overhead.py [--mem 4G] [--ws 64] [--postcopy [--preempt]] [--multifd N]

Starts a source (prefilled guest) and a waiting destination, samples /proc/PID/smaps of both
every 50 ms while it migrates, and prints per side: resident memory outside the guest RAM
mappings (those whose size is the guest's memory size: a memfd-backed destination has two) at
idle and at its peak during the migration, the peak total (guest RAM counted once), and the peak
of the page tables (VmPTE, which smaps does not count). With --preempt each side also has an
urgent process (x-urgent-process): its peak proportional set size (PSS: the pages it shares with
the VM process, such as the interpreter and numpy, count by half) and page tables are printed
too. The last column adds up what is beyond guest RAM: the VM process's extra resident memory,
its page tables beyond guest RAM's own (8 bytes a 4 KiB page, which any VMM has) and the urgent
process. Ends with the integrity check.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import threading
from pathlib import Path

from livemig.cli import parse_size, run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image


def extra_kib(pid: int, guest_kib: int) -> tuple[int, int, int]:
    """(resident KiB outside the guest RAM mappings, resident KiB in total, page tables KiB) of
    process `pid`. A memfd-backed guest has two mappings of its RAM (the second one is where a
    postcopy destination writes pages): they share their pages, so guest RAM counts once."""
    total = 0
    guest: list[int] = []
    size = 0
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if line.startswith("Size:"):
                size = int(line.split()[1])
            elif line.startswith("Rss:"):
                rss = int(line.split()[1])
                if size == guest_kib:
                    guest.append(rss)
                else:
                    total += rss
    pte = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmPTE:"):
                pte = int(line.split()[1])
    return total, total + max(guest, default=0), pte


def children_kib(pid: int) -> tuple[int, int]:
    """(PSS KiB, page tables KiB) of the child processes of `pid` (its urgent process)."""
    pss = pte = 0
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):  # each thread lists the children it started
        try:
            kids += [int(k) for k in (task / "children").read_text().split()]
        except OSError:
            continue
    for k in kids:
        try:
            with open(f"/proc/{k}/smaps_rollup") as f:
                pss += sum(int(line.split()[1]) for line in f if line.startswith("Pss:"))
            with open(f"/proc/{k}/status") as f:
                pte += sum(int(line.split()[1]) for line in f if line.startswith("VmPTE:"))
        except OSError:
            continue
    return pss, pte


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="4G")
    ap.add_argument("--ws", type=int, default=64)
    ap.add_argument("--postcopy", action="store_true")
    ap.add_argument("--multifd", type=int, default=0)
    ap.add_argument("--preempt", action="store_true", help="postcopy-preempt (with the urgent processes)")
    args = ap.parse_args()
    mem = parse_size(args.mem)
    ws = 0 if args.postcopy else args.ws
    tmp = Path(tempfile.mkdtemp(prefix="livemig-mem-"))
    procs = start_vms(tmp, make_image(ws, True), args.mem)
    peak = {"src": [0, 0, 0, 0, 0], "dst": [0, 0, 0, 0, 0]}
    stop = threading.Event()

    def sampler() -> None:
        while not stop.wait(0.05):
            for name, p in zip(("src", "dst"), procs):
                try:
                    sample = extra_kib(p.pid, mem >> 10) + children_kib(p.pid)
                except OSError:
                    continue
                peak[name] = [max(a, b) for a, b in zip(peak[name], sample)]

    try:
        wait_workload(tmp, procs[0], 2)
        idle = {n: extra_kib(p.pid, mem >> 10)[0] for n, p in zip(("src", "dst"), procs)}
        th = threading.Thread(target=sampler, daemon=True)
        th.start()
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, 100_000_000_000, None, quiet=True,
                          postcopy=args.postcopy, preempt=args.preempt, multifd=args.multifd)
        stop.set()
        th.join()
        s = r["source"]
        ok, why = verify_migrated(tmp, mem, ws) if s["status"] == "completed" else (False, s.get("error-desc", ""))
        print(f"{args.mem} guest, {'postcopy' if args.postcopy else 'precopy'}{'-preempt' if args.preempt else ''}"
              f"{f', multifd {args.multifd}' if args.multifd else ''}: {s['status']}, "
              f"total {s.get('total-time')} ms, integrity {'ok' if ok else 'FAILED: ' + why}")
        print("| side | extra at idle MiB | extra peak during migration MiB | total resident peak MiB | page tables peak MiB "
              "| urgent process PSS / page tables peak MiB | beyond guest RAM, peak MiB |")
        print("|---|---|---|---|---|---|---|")
        for n in ("src", "dst"):
            e, t, pte, kpss, kpte = (v / 1024 for v in peak[n])
            own = mem / 4096 * 8 / 2**20  # guest RAM's own page tables
            print(f"| {n} | {idle[n] / 1024:.1f} | {e:.1f} | {t:.0f} | {pte:.1f} | {kpss:.1f} / {kpte:.1f} "
                  f"| {e + max(pte - own, 0) + kpss + kpte:.1f} |")
        return 0 if ok else 1
    finally:
        stop.set()
        stop_vms(tmp, procs, remove=True)


if __name__ == "__main__":
    sys.exit(main())
