"""livemig over emulated links: source and destination VMs in two network namespaces joined by a
veth pair, bandwidth shaped with tbf on both ends, round-trip delay added by a relay
(bench/delay_relay.py; this kernel has no netem). Everything is created and removed here; only
the two namespaces see the traffic. Needs root and iproute2.

    python3 bench/emulated_link.py [--links 10gbit:0.1,1gbit:0.5] [--mem 512M] [--reps 3] [--modes ...] [--switch now]

Per link: precopy of a prefilled guest (16 MiB working set, which converges on 1 Gbit/s), and
postcopy (one channel, with postcopy-preempt, and with postcopy-preempt but page requests on the
main connection's return path as QEMU sends them: `postcopy+preempt-rp`, or served by the urgent
processes, x-urgent-process: `postcopy+preempt+urgent`) of a guest dirtying all
RAM, switched after the first pass (or right after `migrate`, `--switch now`: after the first pass
the destination now takes the rest in before the guest catches up, and it faults a few times;
switched at once it faults on most pages, while the push runs); each run ends with the integrity check; prints medians of total
time, downtime, throughput and, for postcopy, remote-fault latency p50/p99 (fault -> placement,
livemig's `x-livemig-postcopy`: faults that sent a page request) against the link's RTT, both the
added one and the one measured through the relay before the runs (a 32-byte ping-pong: the relay,
being Python, adds its own), and p50 over every fault the guest waited on (with minor-fault
placement some find their page written but not mapped yet, and are mapped at once).
"""
from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from livemig.cli import run_migration, start_vms, stop_vms, verify_migrated, wait_workload
from livemig.guest.image import make_image

HERE = Path(__file__).resolve().parent
SRC_IP, DST_IP = "10.231.7.1", "10.231.7.2"
MIG_PORT, RELAY_PORT = 4444, 4445
ECHO_PORT, PROBE_PORT = 4446, 4447
ECHO = """
import socket
srv = socket.create_server(("{ip}", {port}))
print("ready", flush=True)
c, _ = srv.accept()
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while d := c.recv(65536):
    c.sendall(d)
"""
PING = """
import socket, statistics, time
c = socket.create_connection(("{ip}", {port}))
c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
ts = []
for _ in range(200):
    t = time.perf_counter()
    c.sendall(bytes(32))
    n = 0
    while n < 32:
        n += len(c.recv(32 - n))
    ts.append(time.perf_counter() - t)
print(statistics.median(ts) * 1e6)
"""


def measured_rtt(link: "Link", delay_ms: float) -> float:
    """Median round trip (us) of a 32-byte ping-pong across the emulated link, through the same
    delaying relay as the migration, with nothing else running: what the relay really adds."""
    procs = []
    try:
        echo = subprocess.Popen(["ip", "netns", "exec", link.dst, sys.executable, "-c",
                                 ECHO.format(ip=DST_IP, port=ECHO_PORT)], stdout=subprocess.PIPE, text=True)
        procs.append(echo)
        echo.stdout.readline()
        target = (DST_IP, ECHO_PORT)
        if delay_ms:
            relay = subprocess.Popen(["ip", "netns", "exec", link.src, sys.executable, str(HERE / "delay_relay.py"),
                                      SRC_IP, str(PROBE_PORT), DST_IP, str(ECHO_PORT), str(delay_ms)],
                                     stdout=subprocess.PIPE, text=True)
            procs.append(relay)
            relay.stdout.readline()
            target = (SRC_IP, PROBE_PORT)
        out = subprocess.run(["ip", "netns", "exec", link.src, sys.executable, "-c",
                              PING.format(ip=target[0], port=target[1])], capture_output=True, text=True, timeout=60)
        return float(out.stdout.strip())
    finally:
        for p in procs:
            p.kill()
            p.wait()


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


def _rate_bytes(rate: str) -> int:
    num, unit = rate.lower().rstrip("bit"), 1
    for suffix, mult in (("g", 10**9), ("m", 10**6), ("k", 10**3)):
        if num.endswith(suffix):
            num, unit = num[:-1], mult
    return int(float(num) * unit / 8)


class Link:
    """Two namespaces and a shaped veth pair between them."""

    def __init__(self, rate: str):
        tag = os.getpid() % 100000
        self.src, self.dst = f"lm-src-{tag}", f"lm-dst-{tag}"
        va, vb = f"lms{tag}", f"lmd{tag}"
        burst = max(_rate_bytes(rate) // 250, 64 << 10)  # 4 ms of traffic: tbf needs >= rate/HZ
        for ns in (self.src, self.dst):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "link", "add", va, "netns", self.src, "type", "veth", "peer", "name", vb, "netns", self.dst)
        for ns, dev, ip in ((self.src, va, SRC_IP), (self.dst, vb, DST_IP)):
            sh("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", dev)
            sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
               "burst", str(burst), "latency", "20ms")

    def close(self) -> None:
        for ns in (self.src, self.dst):
            subprocess.run(["ip", "netns", "del", ns], stderr=subprocess.DEVNULL)


MODES = ("precopy", "postcopy", "postcopy+preempt", "postcopy+preempt-rp", "postcopy+preempt+urgent")


def one(link: Link, delay_ms: float, mem: str, postcopy: bool, preempt: bool = False,
        preempt_requests: bool | None = None, urgent: bool = False, now: bool = False,
        resend: bool = True) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="livemig-link-"))
    ws = 0 if postcopy else 16
    procs = start_vms(tmp, make_image(ws, True), mem,
                      wrap={"src": ["ip", "netns", "exec", link.src], "dst": ["ip", "netns", "exec", link.dst]})
    relay = None
    try:
        via = None
        if delay_ms:
            relay = subprocess.Popen(["ip", "netns", "exec", link.src, sys.executable, str(HERE / "delay_relay.py"),
                                      SRC_IP, str(RELAY_PORT), DST_IP, str(MIG_PORT), str(delay_ms)],
                                     stdout=subprocess.PIPE, text=True)
            relay.stdout.readline()
            via = f"tcp:{SRC_IP}:{RELAY_PORT}"
        wait_workload(tmp, procs[0], 1)
        r = run_migration(f"unix:{tmp}/src.qmp", f"unix:{tmp}/dst.qmp", f"tcp:{DST_IP}:{MIG_PORT}",
                          100_000_000_000, None, quiet=True, timeout=300, postcopy=postcopy, preempt=preempt,
                          via=via, preempt_requests=preempt_requests, urgent_process=urgent,
                          postcopy_now=now and postcopy, params=None if resend else {"x-preempt-resend": False})
        s, d = r["source"], r["destination"]
        pc = d.get("x-livemig-postcopy", {})
        busy = max(s.get("total-time", 0) - s.get("setup-time", 0), 1)
        out = {"status": s["status"], "total_ms": s.get("total-time"), "downtime_ms": s.get("downtime"),
               "MBps": s.get("ram", {}).get("transferred", 0) / 1e3 / busy,
               "switch_to_complete_s": r["switch_to_complete_s"], "p50_us": pc.get("p50-us"),
               "p99_us": pc.get("p99-us"), "faults": pc.get("faults"),
               "mapped_at_fault": pc.get("mapped-at-fault"), "p50_all_us": pc.get("p50-all-us", pc.get("p50-us"))}
        if s["status"] == "completed":
            ok, why = verify_migrated(tmp, int(mem[:-1]) << {"M": 20, "G": 30}[mem[-1]], ws)
            out["integrity"] = "ok" if ok else f"FAILED: {why}"
        return out
    finally:
        if relay is not None:
            relay.kill()
            relay.wait()
        stop_vms(tmp, procs, remove=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--links", default="10gbit:0.1,1gbit:0.5", help="RATE:RTT_MS,... (tbf rate, added round trip)")
    ap.add_argument("--mem", default="512M")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--modes", default="precopy,postcopy,postcopy+preempt", help=f"some of {','.join(MODES)}")
    ap.add_argument("--switch", default="first-pass", choices=("first-pass", "now"),
                    help="postcopy modes: switch after the first pass, or right after `migrate`")
    ap.add_argument("--no-resend", action="store_true",
                    help="x-preempt-resend off: a requested page the push has queued is not sent again (QEMU's rule)")
    args = ap.parse_args()
    modes = args.modes.split(",")
    if any(m not in MODES for m in modes):
        ap.error(f"--modes takes some of {', '.join(MODES)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # still remove the namespaces
    if os.geteuid() != 0:
        print("emulated links need root (network namespaces)", file=sys.stderr)
        return 2
    rows, bad = [], 0
    for spec in args.links.split(","):
        rate, rtt = spec.split(":")
        link = Link(rate)
        try:
            rtt_us = measured_rtt(link, float(rtt))
            print(f"{rate} rtt+{rtt} ms: measured round trip through the relay {rtt_us:.0f} us", flush=True)
            for mode in modes:
                runs = [one(link, float(rtt), args.mem, mode != "precopy", "preempt" in mode,
                            False if mode.endswith("-rp") else None, mode.endswith("+urgent"),
                            args.switch == "now", not args.no_resend)
                        for _ in range(args.reps)]
                for r in runs:
                    print(f"{rate} rtt+{rtt} ms {mode}: {r}", flush=True)
                    bad += r.get("integrity") != "ok"
                ok = [r for r in runs if r["status"] == "completed"]
                med = (lambda k: statistics.median(r[k] for r in ok) if ok and ok[0].get(k) is not None else None)
                rows.append((rate, rtt, rtt_us, mode, len(ok), len(runs), med("total_ms"),
                             med("downtime_ms"), med("MBps"), med("switch_to_complete_s"), med("p50_us"), med("p99_us"),
                             med("p50_all_us"), med("faults")))
        finally:
            link.close()
    print(f"\n## livemig on emulated links ({args.mem} guest, {args.reps} runs each, medians; "
          f"postcopy switched {args.switch})\n")
    print("| link | added RTT | measured RTT us | mode | completed | total ms | downtime ms | MB/s | switch->complete s "
          "| faults | remote-fault p50 us | p99 us | p50 / added RTT | p50 / measured RTT | p50 of every fault us (/ measured RTT) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    f = (lambda v, fmt="{:.0f}": "-" if v is None else fmt.format(v))
    for rate, rtt, rtt_us, mode, nd, nr, tot, down, mbps, sw, p50, p99, p50all, faults in rows:
        ratio = f(p50 / (float(rtt) * 1000) if p50 else None, "{:.1f}x")
        mratio = f(p50 / rtt_us if p50 else None, "{:.1f}x")
        print(f"| {rate} | {rtt} ms | {rtt_us:.0f} | {mode} | {nd}/{nr} | {f(tot)} | {f(down)} | {f(mbps)} "
              f"| {f(sw, '{:.2f}')} | {f(faults)} | {f(p50)} | {f(p99)} | {ratio} | {mratio} "
              f"| {f(p50all)} ({f(p50all / rtt_us if p50all else None, '{:.1f}x')}) |")
    if bad:
        print(f"\n{bad} run(s) FAILED the integrity check or did not complete")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
