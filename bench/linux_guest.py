"""The Linux guest on this machine: time to each boot milestone, state size, and the downtime and
total time of a precopy, a postcopy and a save/load, all of one guest while it boots.

    python3 bench/linux_guest.py [--mem 128M] [--runs 1] [--to-shell]

source boots -> precopy to A at PRECOPY_AT -> postcopy (switched at once) to B at POSTCOPY_AT ->
save to file and load into C at FILE_AT -> C finishes the kernel's boot ("Run /init as init
process"; on to the initramfs shell with --to-shell, which needs a host whose KVM runs guest user
space: not kvm_pvm, see livemig/machine/pvm_compat.py).
Milestone times are wall seconds since the source process started, migrations included.
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
from livemig.console_client import ConsoleClient
from livemig.guest.linux import COUNTER_PREFIX, INIT_MARKER, prepare
from livemig.machine.devices import CPU_FULL_VMSD
from livemig.machine.kvm_devices import CLOCK_VMSD, IOAPIC_VMSD, PIC_VMSD, PIT_VMSD
from livemig.machine.pvm_compat import host_is_pvm
from livemig.qmpclient import QMPClient

BOOT_DONE = "Run /init as init process"
MILESTONES = [
    "Linux version", "Memory:", "printk: console [ttyS0] enabled", "x86/fpu: x87 FPU will use FXSAVE",
    "Freeing SMP alternatives memory", "smp: Brought up 1 node", "devtmpfs: initialized",
    "NET: Registered PF_NETLINK", "Serial: 8250/16550 driver", "Freeing unused kernel image", BOOT_DONE,
    INIT_MARKER,
]
PRECOPY_AT = "x86/fpu: x87 FPU will use FXSAVE"
POSTCOPY_AT = "Freeing SMP alternatives memory"
FILE_AT = "devtmpfs: initialized"


def device_state_bytes() -> int:
    vmsds = [PIT_VMSD, CLOCK_VMSD, PIC_VMSD, PIC_VMSD, IOAPIC_VMSD, CPU_FULL_VMSD]
    return sum(v.fixed_size + sum(s.fixed_size for s in v.subsections) for v in vmsds)


class Guest:
    def __init__(self, tmp: Path, name: str, mem: str, boot: list[str], console: bool = False) -> None:
        self.log = tmp / f"{name}.log"
        self.qmp = f"unix:{tmp}/{name}.qmp"
        serial = f"unix:{tmp}/{name}.console,server=on,wait=off" if console else f"file:{self.log}"
        cmd = [sys.executable, "-m", "livemig", "vm", "--memory", mem, *boot, "--qmp", self.qmp,
               "--serial", serial]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(tmp / f"{name}.err", "wb"))
        deadline = time.monotonic() + 30
        while True:
            try:
                QMPClient(self.qmp).close()
                break
            except Exception:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise SystemExit(f"{name} did not start: {(tmp / f'{name}.err').read_text()}")
                time.sleep(0.05)
        self.console = ConsoleClient(tmp / f"{name}.console", self.log) if console else None

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def cmd(self, name: str, **args):
        c = QMPClient(self.qmp)
        try:
            return c.cmd(name, **args)
        finally:
            c.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def run_once(mem: str, to_shell: bool) -> dict:
    vmlinux, initramfs = prepare(Path.home() / ".cache" / "livemig" / "linux-guest")
    res: dict = {"milestones": {}}
    with tempfile.TemporaryDirectory(prefix="livemig-linux-") as d:
        tmp = Path(d)
        t0 = time.monotonic()
        guests = [Guest(tmp, "src", mem, ["--kernel", vmlinux, "--initrd", initramfs])]
        seen = ""

        def watch(until: str, timeout: float = 2400) -> None:
            end = time.monotonic() + timeout
            while True:
                g = guests[-1]
                seen_now = seen + g.text()
                for m in MILESTONES:
                    if m not in res["milestones"] and m in seen_now:
                        res["milestones"][m] = time.monotonic() - t0
                        print(f"  {res['milestones'][m]:7.1f} s  {m}", flush=True)
                if until in seen_now:
                    return
                if time.monotonic() > end or g.proc.poll() is not None:
                    raise SystemExit(f"no '{until}' in time; last: {seen_now[-800:]}")
                time.sleep(0.1)

        def hop(name: str, **kw) -> dict:
            nonlocal seen
            src = guests[-1]
            dst = Guest(tmp, name, mem, ["--machine", "linux", "--incoming", "defer"])
            info = run_migration(src.qmp, dst.qmp, None, None, kw.pop("downtime_limit", None), quiet=True, **kw)
            seen += src.text()
            guests.append(dst)
            return {**info["source"], "dst": info["destination"]}

        try:
            watch(PRECOPY_AT)
            res["precopy"] = hop("a")
            watch(POSTCOPY_AT)
            res["postcopy"] = hop("b", postcopy=True, postcopy_now=True, downtime_limit=1)
            watch(FILE_AT)
            src = guests[-1]
            path = tmp / "guest.state"
            ts = time.monotonic()
            src.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": False}])
            src.cmd("migrate", uri=f"file:{path}")
            while src.cmd("query-migrate").get("status") not in ("completed", "failed"):
                time.sleep(0.02)
            res["save_s"] = time.monotonic() - ts
            res["file_bytes"] = path.stat().st_size
            seen += src.text()
            ts = time.monotonic()
            c = Guest(tmp, "c", mem, ["--machine", "linux", "--incoming", f"file:{path}"], console=to_shell)
            while c.cmd("query-status")["status"] != "running":
                time.sleep(0.02)
            res["load_s"] = time.monotonic() - ts
            guests.append(c)
            if not to_shell:
                watch(BOOT_DONE)
            else:  # a command typed on the destination's console is answered by busybox's shell
                watch(INIT_MARKER)
                watch(f"{COUNTER_PREFIX} 2")
                ts = time.monotonic()
                c.console.type("\necho livemig-$((6*7))\n")
                watch("livemig-42", timeout=300)
                res["shell_answer_s"] = time.monotonic() - ts
        finally:
            for g in guests:
                g.stop()
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mem", default="128M")
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--to-shell", action="store_true", help="wait for the initramfs shell at the end")
    args = ap.parse_args()
    parse_size(args.mem)
    if args.to_shell and host_is_pvm():
        print("--to-shell: this host's /dev/kvm is kvm_pvm, which runs no user space of a normal guest "
              "kernel (see livemig/machine/pvm_compat.py)", file=sys.stderr)
        return 2
    runs = []
    for i in range(args.runs):
        print(f"run {i + 1}/{args.runs}", flush=True)
        runs.append(run_once(args.mem, args.to_shell))

    def med(f) -> float:
        vals = [f(r) for r in runs if f(r) is not None]
        return statistics.median(vals) if vals else float("nan")

    print(f"\nLinux guest, {args.mem}, medians of {len(runs)} run(s) on this host")
    print("| milestone | wall s since start |\n|---|---|")
    for m in MILESTONES:
        print(f"| {m} | {med(lambda r: r['milestones'].get(m)):.1f} |")
    print(f"\ndevice state: {device_state_bytes()} bytes of vmstate fields (vCPU incl. LAPIC/XSAVE/MSRs, PIT, PICs, IOAPIC, clock)")
    for kind in ("precopy", "postcopy"):
        print(f"{kind}: downtime {med(lambda r: r[kind].get('downtime')):.0f} ms, total {med(lambda r: r[kind].get('total-time')):.0f} ms, "
              f"transferred {med(lambda r: r[kind]['ram']['transferred']) / 2**20:.1f} MiB, "
              f"requests {med(lambda r: r[kind]['ram'].get('postcopy-requests', 0)):.0f}, "
              f"destination blocktime {med(lambda r: r[kind]['dst'].get('postcopy-blocktime', 0)):.0f} ms")
    if args.to_shell:
        print(f"shell answered a typed command on the destination's console in {med(lambda r: r['shell_answer_s']):.1f} s")
    print(f"save to file: {med(lambda r: r['save_s']):.2f} s, {med(lambda r: r['file_bytes']) / 2**20:.1f} MiB; "
          f"load in a fresh process until running: {med(lambda r: r['load_s']):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
