"""What fresh memory costs on this host, and why: run before comparing VMMs.

A VMM's guest RAM is anonymous memory that is touched for the first time while a migration
runs (QEMU's destination) or before it (livemig's destination allocates while it waits for the
stream). On a host that is itself a VM, a first touch can cost far more than zeroing a page:
with free page reporting (virtio-balloon), freed memory goes back to the outer hypervisor and
its next first touch faults there too. This prints the host's settings that decide it and times
a first touch of fresh memory, with transparent huge pages (as both VMMs map guest RAM) and
without, each after a pause (so memory freed by the run before has had time to be reported):

    python3 bench/host_memory.py [--mib 512] [--reps 3] [--pause 5]
"""
from __future__ import annotations

import argparse
import mmap
import statistics
import time
from pathlib import Path

import numpy as np

SETTINGS = {
    "thp": "/sys/kernel/mm/transparent_hugepage/enabled",
    "thp_defrag": "/sys/kernel/mm/transparent_hugepage/defrag",
    "page_reporting_order": "/sys/module/page_reporting/parameters/page_reporting_order",
    "page_reporting_min_free_ms": "/sys/module/page_reporting/parameters/min_free_ms",
    "page_reporting_reported_kib": "/sys/module/page_reporting/parameters/reported_kib",
}


def settings() -> dict[str, str]:
    """The host's memory settings that decide a first touch's cost ('-' where absent)."""
    out = {}
    for name, path in SETTINGS.items():
        try:
            out[name] = Path(path).read_text().strip()
        except OSError:
            out[name] = "-"
    return out


def first_touch(mib: int, huge: bool) -> float:
    """Seconds per GiB to write one byte into every 4 KiB page of fresh anonymous memory."""
    size = mib << 20
    m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    m.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
    a = np.frombuffer(m, dtype=np.uint8)
    t = time.perf_counter()
    a[::4096] = 1
    dt = time.perf_counter() - t
    del a
    m.close()
    return dt * (1 << 30) / size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, default=512, help="fresh memory per measurement")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--pause", type=float, default=5.0, help="seconds before each measurement")
    args = ap.parse_args()
    for name, value in settings().items():
        print(f"{name}: {value}")
    for huge in (True, False):
        runs = []
        for _ in range(args.reps):
            time.sleep(args.pause)
            runs.append(first_touch(args.mib, huge))
        kind = "huge pages" if huge else "4 KiB pages"
        print(f"first touch, {kind}: {statistics.median(runs):.2f} s/GiB "
              f"(runs {', '.join(f'{r:.2f}' for r in runs)})")


if __name__ == "__main__":
    main()
