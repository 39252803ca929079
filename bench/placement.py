"""How fast a postcopy destination can place incoming pages, two ways (no network, no guest):

  copy      today's path: page records (8-byte header + 4 KiB) sit in a receive buffer; runs of
            256 pages are gathered into a staging buffer and placed with one UFFDIO_COPY each
            into anonymous guest RAM registered for MISSING faults (the kernel allocates each
            page and copies it again);
  continue  a design to try: guest RAM backed by a memfd, mapped twice; the second mapping is
            not registered and already populated (as the destination's prealloc does), so page
            data goes from the receive buffer straight into it (one strided copy, no staging),
            and UFFDIO_CONTINUE maps each run into the guest mapping registered for MINOR
            faults (no allocation, no second copy).

The 4 GiB postcopy profile (BENCHMARKS.md, session 6) has the destination loader spending 39% of
its time in UFFDIO_COPY and 2% in the staging copy; this measures what the other design would save.

    python3 bench/placement.py [--mib 512] [--reps 5]
"""
from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import statistics
import struct
import time

import numpy as np

from livemig.uffd import UFFDIO_REGISTER, UserFault

TPS = 4096
RUN = 256
RECORD = 8 + TPS
UFFDIO_CONTINUE = 0xC020AA07  # _IOWR(0xAA, 0x07, struct uffdio_continue)
UFFDIO_REGISTER_MODE_MINOR = 4
MADV_NOHUGEPAGE = 15
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def _addr(m: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def _records(npages: int) -> np.ndarray:
    """A receive buffer of one run: page records whose data says which page it is."""
    rec = np.zeros((npages, RECORD), dtype=np.uint8)
    rec[:, 8:16] = np.arange(npages, dtype=np.uint64).view(np.uint8).reshape(npages, 8)
    return rec


def _check(view: np.ndarray, first: int, npages: int) -> None:
    words = view[first:first + npages, :8].copy().view(np.uint64)[:, 0]
    if not np.array_equal(words, np.arange(npages, dtype=np.uint64)):
        raise SystemExit("placed pages hold the wrong data")


def copy_way(size: int) -> float:
    m = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = _addr(m)
    _libc.madvise(base, size, MADV_NOHUGEPAGE)
    uffd = UserFault()
    uffd.register(base, size)
    rec = _records(RUN)
    staging = np.empty((RUN, TPS), dtype=np.uint8)
    arg = bytearray(40)
    t0 = time.perf_counter()
    for off in range(0, size, RUN * TPS):
        staging[:] = rec[:, 8:]
        uffd.copy(base + off, staging.ctypes.data, RUN * TPS, arg)
    dt = time.perf_counter() - t0
    _check(np.frombuffer(m, dtype=np.uint8).reshape(-1, TPS), size // TPS - RUN, RUN)
    uffd.unregister(base, size)
    uffd.close()
    m.close()
    return size / dt


def continue_way(size: int) -> float:
    fd = os.memfd_create("guest-ram")
    os.ftruncate(fd, size)
    guest = mmap.mmap(fd, size, mmap.MAP_SHARED)
    alias = mmap.mmap(fd, size, mmap.MAP_SHARED)
    os.close(fd)
    gbase = _addr(guest)
    if _libc.madvise(_addr(alias), size, MADV_POPULATE_WRITE) != 0:
        raise SystemExit("MADV_POPULATE_WRITE is not supported here")
    uffd = UserFault()
    fcntl.ioctl(uffd.fd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", gbase, size, UFFDIO_REGISTER_MODE_MINOR, 0)),
                True)
    into = np.frombuffer(alias, dtype=np.uint8).reshape(-1, TPS)
    rec = _records(RUN)
    arg = bytearray(32)
    t0 = time.perf_counter()
    for off in range(0, size, RUN * TPS):
        p = off // TPS
        into[p:p + RUN] = rec[:, 8:]
        struct.pack_into("<QQQq", arg, 0, gbase + off, RUN * TPS, 0, 0)
        fcntl.ioctl(uffd.fd, UFFDIO_CONTINUE, arg, True)
    dt = time.perf_counter() - t0
    _check(np.frombuffer(guest, dtype=np.uint8).reshape(-1, TPS), size // TPS - RUN, RUN)
    del into
    uffd.close()
    guest.close()
    alias.close()
    return size / dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mib", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    size = a.mib << 20
    res: dict[str, list[float]] = {"copy": [], "continue": []}
    for _ in range(a.reps):  # alternate, so drifts of the machine hit both
        res["copy"].append(copy_way(size))
        res["continue"].append(continue_way(size))
    for k, v in res.items():
        print(f"{k:9s} MB/s per run: {' '.join(f'{x / 1e6:.0f}' for x in v)}  median {statistics.median(v) / 1e6:.0f}")
    print(f"continue / copy: {statistics.median(res['continue']) / statistics.median(res['copy']):.2f}x")


if __name__ == "__main__":
    main()
