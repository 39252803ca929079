"""Soak: one guest migrated N times in a chain, each time into a fresh `livemig vm` process,
precopy and postcopy (switched right after `migrate`) alternating, integrity checked after every
hop.

    python3 bench/soak.py [--hops 50] [--mem 256M] [--ws 16]

For every process it reports open fds, threads and resident memory when it starts running the
guest and right before it quits (after migrating the guest on), and any hop that failed.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from livemig.cli import parse_size, run_migration
from livemig.guest.image import make_image, passes_from_output
from livemig.integrity import check, first_bytes
from livemig.qmpclient import QMPClient


def usage(pid: int) -> tuple[int, int, int]:
    """(open fds, threads, resident MiB) of a process."""
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    status = Path(f"/proc/{pid}/status").read_text()
    field = {k: v for k, v in (line.split(":", 1) for line in status.splitlines() if ":" in line)}
    return fds, int(field["Threads"]), int(field["VmRSS"].split()[0]) // 1024


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hops", type=int, default=50)
    ap.add_argument("--mem", default="256M")
    ap.add_argument("--ws", type=int, default=16)
    args = ap.parse_args()
    mem = parse_size(args.mem)
    tmp = Path(tempfile.mkdtemp(prefix="livemig-soak-"))
    (tmp / "guest.img").write_bytes(make_image(args.ws, True))
    base = [sys.executable, "-m", "livemig", "vm", "--memory", args.mem, "--boot-sector", str(tmp / "guest.img")]

    def start(i: int, incoming: bool) -> subprocess.Popen:
        extra = ["--incoming", "defer"] if incoming else []
        p = subprocess.Popen(base + ["--qmp", f"unix:{tmp}/vm{i}.qmp", "--serial", f"file:{tmp}/vm{i}.log"] + extra,
                             stdout=subprocess.DEVNULL, stderr=open(tmp / f"vm{i}.err", "wb"))
        QMPClient(f"unix:{tmp}/vm{i}.qmp").close()
        return p

    procs: list[subprocess.Popen] = []
    try:
        return _chain(args, mem, tmp, start, procs)
    finally:
        for p in procs:  # whatever is left after a failure
            if p.poll() is None:
                p.kill()


def _chain(args, mem: int, tmp: Path, start, procs: list) -> int:
    cur = start(0, False)
    procs.append(cur)
    while passes_from_output((tmp / "vm0.log").read_bytes() if (tmp / "vm0.log").exists() else b"") < 2:
        time.sleep(0.05)
    rows, failed = [], []
    at_start = {0: usage(cur.pid)}
    t_all = time.monotonic()
    for hop in range(1, args.hops + 1):
        postcopy = hop % 2 == 0
        nxt = start(hop, True)
        procs.append(nxt)
        r = run_migration(f"unix:{tmp}/vm{hop - 1}.qmp", f"unix:{tmp}/vm{hop}.qmp", None, 100_000_000_000, None,
                          quiet=True, postcopy=postcopy, postcopy_now=True)
        s = r["source"]
        ok, why = False, s.get("error-desc", s.get("status"))
        if s.get("status") == "completed":
            src, dst = QMPClient(f"unix:{tmp}/vm{hop - 1}.qmp"), QMPClient(f"unix:{tmp}/vm{hop}.qmp")
            time.sleep(0.2)
            dst.cmd("stop")
            lo, end = 1 << 20, min(mem, (1 << 20) + (args.ws << 20))
            src.cmd("pmemsave", val=lo, size=end - lo, filename=str(tmp / "a.ram"))
            dst.cmd("pmemsave", val=lo, size=end - lo, filename=str(tmp / "b.ram"))
            ok, why = check(first_bytes(str(tmp / "a.ram")), first_bytes(str(tmp / "b.ram")))
            dst.cmd("cont")
            running = src.cmd("query-status")["status"] == "postmigrate" and dst.cmd("query-status")["running"]
            ok = ok and running
            src.close()
            dst.close()
        time.sleep(0.3)  # let the finished migration's threads exit
        at_end = usage(cur.pid)
        rows.append((hop - 1, at_start[hop - 1], at_end))
        at_start[hop] = usage(nxt.pid)
        print(f"hop {hop:3d} {'postcopy' if postcopy else 'precopy '} {s.get('status')} "
              f"total {s.get('total-time')} ms downtime {s.get('downtime')} ms integrity {'ok' if ok else why}; "
              f"vm{hop - 1} fds/threads/RSS MiB {rows[-1][1]} -> {at_end}", flush=True)
        if not ok:
            failed.append((hop, why))
        QMPClient(f"unix:{tmp}/vm{hop - 1}.qmp").cmd("quit")
        cur.wait(timeout=10)
        cur = nxt
        if s.get("status") != "completed":
            break
    QMPClient(f"unix:{tmp}/vm{args.hops}.qmp").cmd("quit")
    cur.wait(timeout=10)
    growth = [(e[0] - s0[0], e[1] - s0[1], e[2] - s0[2]) for _, s0, e in rows]
    print(f"\n## soak: {len(rows)} hops ({args.mem} guest, working set {args.ws} MiB, precopy/postcopy alternating) "
          f"in {time.monotonic() - t_all:.0f} s, {len(failed)} failed\n")
    print("| per process, start -> end | fds | threads | RSS MiB |")
    print("|---|---|---|---|")
    for name, k in (("median at start", 1), ("median at end", 2)):
        print(f"| {name} | " + " | ".join(str(statistics.median(r[k][j] for r in rows)) for j in range(3)) + " |")
    print("| max growth in one process | " + " | ".join(str(max(g[j] for g in growth)) for j in range(3)) + " |")
    print("| first process, start -> end | " + " | ".join(f"{rows[0][1][j]} -> {rows[0][2][j]}" for j in range(3)) + " |")
    print("| last process, start -> end | " + " | ".join(f"{rows[-1][1][j]} -> {rows[-1][2][j]}" for j in range(3)) + " |")
    for hop, why in failed:
        print(f"hop {hop} FAILED: {why}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
