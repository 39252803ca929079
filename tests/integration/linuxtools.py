"""Helpers for the Linux-guest tests: the guest files, kernel-log parsing, waits and page checks."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

from livemig.guest.linux import prepare
from livemig.integrity import compare_pages, page_digests

from vmtools import VM

GUEST_DIR = Path(os.environ.get("LIVEMIG_LINUX_GUEST_DIR", Path.home() / ".cache" / "livemig" / "linux-guest"))
MEMORY = "128M"
MEMORY_BYTES = 128 << 20
PRINTK_TIME = re.compile(rb"^\[\s*(\d+\.\d+)\]", re.M)
TROUBLE = (b"Oops", b"BUG:", b"Kernel panic", b"general protection fault", b"Call Trace", b"WARNING:")


def guest_files() -> tuple[str, str]:
    return prepare(GUEST_DIR)


def linux_boot_args() -> list[str]:
    vmlinux, initramfs = guest_files()
    return ["--kernel", vmlinux, "--initrd", initramfs]


def printk_times(out: bytes) -> list[float]:
    return [float(m) for m in PRINTK_TIME.findall(out)]


def wait_output(vm: VM, needle: bytes, timeout: float, start: int = 0) -> float:
    """Wait until the console holds `needle` (at or after byte `start`); returns the wall time it took."""
    t0 = time.monotonic()
    while needle not in vm.output()[start:]:
        assert vm.proc.poll() is None, f"{vm.name} exited: {vm.stderr()[-2000:]}"
        assert time.monotonic() - t0 < timeout, (
            f"{vm.name}: {needle!r} not on the console after {timeout:.0f} s; last lines:\n"
            + "\n".join(vm.output().decode(errors='replace').splitlines()[-8:]) + f"\nstderr: {vm.stderr()[-2000:]}")
        time.sleep(0.2)
    return time.monotonic() - t0


# khungtaskd's report of a task that waited 120 s: on this software hypervisor (~1.4 M guest
# instructions/s) an initcall that holds a lock can take longer than that (kernel 6.1: init waits in
# register_trace_event while a kworker updates the trace eval maps). It is slowness, not damage:
# the callers also wait for later console lines, which a task that never wakes would not print.
HUNG_TASK_REPORT = re.compile(rb"INFO: task \S+ blocked for more than \d+ seconds\..*?</TASK>", re.S)


def assert_healthy(out: bytes, who: str) -> None:
    out = HUNG_TASK_REPORT.sub(b"", out)
    for t in TROUBLE:
        assert t not in out, f"{who}: kernel log shows {t!r}:\n{out.decode(errors='replace')[-3000:]}"


def assert_log_continues(src_out: bytes, dst_out: bytes) -> None:
    """The destination's kernel log carries on from the source's: no reboot, printk time goes on."""
    assert b"Linux version" not in dst_out, "the kernel booted again on the destination"
    src_t, dst_t = printk_times(src_out), printk_times(dst_out)
    assert src_t and dst_t, (src_out[-500:], dst_out[-500:])
    assert dst_t[0] >= src_t[-1] - 1e-6, f"printk time went back: source ended at {src_t[-1]}, destination began at {dst_t[0]}"
    assert dst_t == sorted(dst_t), "printk time is not monotonic on the destination"


def _dump(vm: VM) -> Path:
    path = vm.tmp / f"{vm.name}.ram"
    vm.cmd("pmemsave", val=0, size=MEMORY_BYTES, filename=str(path))
    return path


def _differences(a: Path, b: Path, pages) -> str:
    """Which 8-byte words differ in the first few differing pages (for the failure message)."""
    import numpy as np
    x, y = np.memmap(a, dtype="<u8", mode="r"), np.memmap(b, dtype="<u8", mode="r")
    out = []
    for p in pages[:4]:
        w = slice(p * 512, p * 512 + 512)
        idx = np.flatnonzero(x[w] != y[w])
        out.append(f"page {p * 4096:#x}: words {[hex(int(i) * 8) for i in idx[:6]]} "
                   f"src {[hex(int(v)) for v in x[w][idx[:3]]]} dst {[hex(int(v)) for v in y[w][idx[:3]]]}")
    return "; ".join(out)


def assert_same_ram(src: VM, dst: VM) -> str:
    """Every byte of guest RAM is the same on both sides, except what KVM writes on its own for
    the guest's paravirtual features (kvmclock, steal time, ...) when the vCPU state is loaded."""
    import numpy as np
    areas = {(a["addr"], a["size"]) for vm in (src, dst) for a in vm.cmd("x-livemig-query-hypervisor-areas")}
    assert len(areas) <= 8, areas
    a, b = _dump(src), _dump(dst)
    for path in (a, b):
        ram = np.memmap(path, dtype=np.uint8, mode="r+")
        for addr, size in areas:
            ram[addr:addr + size] = 0
        ram.flush()
        del ram
    try:
        da, db = page_digests(str(a)), page_digests(str(b))
        ok, why = compare_pages(da, db)
        if not ok:
            why += "; " + _differences(a, b, np.flatnonzero(da != db))
        assert ok, why
        return f"{why} (left out: {sorted((hex(x), n) for x, n in areas)})"
    finally:
        a.unlink()
        b.unlink()

