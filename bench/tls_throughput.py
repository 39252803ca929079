"""Precopy throughput with and without TLS, same guest, same host.

    python3 bench/tls_throughput.py [--mem 1G] [--ws 64] [--reps 3] [--multifd N]

Each repetition runs both modes (plaintext, then TLS) with fresh VMs: a source running the
prefilled workload guest (dirtying --ws MiB), a destination waiting on tcp:127.0.0.1, no bandwidth
limit, the integrity check after each migration. TLS uses a throw-away CA
(livemig.tls.make_test_pki) with verify-peer=on on both sides. Throughput = bytes the source
sent / (total-time - setup-time); setup-time includes the TLS handshakes. CPU = user+system
seconds of each process during the migration. Prints every run, then medians and the TLS /
plaintext ratio. Source, destination and both guests share the host's cores.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

from livemig.cli import parse_size, run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image
from livemig.tls import make_test_pki


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_run(mem: str, ws: int, tls: bool, multifd: int) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="livemig-tls-bench-"))
    extra = None
    if tls:
        pki = make_test_pki(tmp / "pki")
        extra = {side: ["--object", f"tls-creds-x509,id=tls0,dir={pki},endpoint={ep}"]
                 for side, ep in (("src", "client"), ("dst", "server"))}
    procs = start_vms(tmp, make_image(ws, True), mem, extra=extra)
    try:
        wait_workload(tmp, procs[0], 2)
        cpu0 = [cpu_s(p.pid) for p in procs]
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", None, 100_000_000_000, None, quiet=True,
                          multifd=multifd, tls_creds="tls0" if tls else None)
        cpu = [cpu_s(p.pid) - c for p, c in zip(procs, cpu0)]
        s = r["source"]
        if s["status"] != "completed":
            raise SystemExit(f"migration {s['status']}: {s.get('error-desc')}")
        ok, why = verify_migrated(tmp, parse_size(mem), ws)
        if not ok:
            raise SystemExit(f"integrity check failed: {why}")
        busy = (s["total-time"] - s["setup-time"]) / 1000
        return {"mbs": s["ram"]["transferred"] / busy / 1e6, "total": s["total-time"], "setup": s["setup-time"],
                "downtime": s["downtime"], "src_cpu": cpu[0], "dst_cpu": cpu[1]}
    finally:
        stop_vms(tmp, procs, remove=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--ws", type=int, default=64, help="MiB the guest keeps dirtying")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--multifd", type=int, default=0, metavar="N")
    args = ap.parse_args()
    runs: dict[str, list[dict]] = {"plaintext": [], "TLS": []}
    for rep in range(args.reps):
        for mode in runs:
            r = one_run(args.mem, args.ws, mode == "TLS", args.multifd)
            runs[mode].append(r)
            print(f"rep {rep + 1} {mode:9}: {r['mbs']:7.0f} MB/s, total {r['total']} ms, setup {r['setup']} ms, "
                  f"downtime {r['downtime']} ms, CPU src {r['src_cpu']:.2f} s dst {r['dst_cpu']:.2f} s", flush=True)
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in runs.items()}
    what = f"{args.mem} precopy{f', multifd {args.multifd}' if args.multifd else ''}, median of {args.reps}"
    print(f"\n{what}\n| mode | MB/s | total ms | setup ms | downtime ms | src CPU s | dst CPU s |")
    print("|---|---|---|---|---|---|---|")
    for m, v in med.items():
        print(f"| {m} | {v['mbs']:.0f} | {v['total']:.0f} | {v['setup']:.0f} | {v['downtime']:.0f} | "
              f"{v['src_cpu']:.2f} | {v['dst_cpu']:.2f} |")
    print(f"TLS / plaintext throughput: {med['TLS']['mbs'] / med['plaintext']['mbs']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
