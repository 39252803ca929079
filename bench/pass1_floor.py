"""The most a first pass can move on this host: the floor under livemig's pass-1 throughput.

Two processes and a loopback TCP connection, no migration code: a sender holding 1 GiB of
prefilled "guest RAM" (a memfd, as livemig's) and a receiver holding another, prefaulted as a
waiting livemig VM's is. A third process only burns CPU, as the prefilled guest's vCPU does for
the whole of pass 1 (the shared harness's guest dirties 16 MiB in a loop). Each case is the
least work its wire format allows, in 4 MiB sends:

  kernel   pages only: sendmsg straight from guest RAM, recv_into straight into guest RAM
           (MSG_WAITALL). Only the kernel's two socket copies; no format can cost less.
  packets  multifd's layout: a header then the pages, as `kernel` plus one small header
           send and receive per 128 pages, and a zero-page scan of each page sent.
  stream   the main channel's layout: an 8-byte header before every 4 KiB page. The
           receiver cannot land the pages in place, so it receives into a buffer and copies
           them out; the sender scans for zero pages and builds the records in a buffer.

Prints MB/s and each side's CPU per GiB (medians of --reps), and with --qemu-mbps what fraction
of the issue's 1.5x target the case could reach at most.

    python3 bench/pass1_floor.py [--mem 1G] [--reps 3] [--qemu-mbps 1388] [--no-spin]
"""
from __future__ import annotations

import argparse
import mmap
import os
import resource
import socket
import statistics
import time

import numpy as np

TPS = 4096
CHUNK = 1024  # pages per send: livemig's batch (4 MiB)
PACKET = 128  # pages per multifd packet


def _ram(size: int, fill: int | None) -> tuple[mmap.mmap, np.ndarray]:
    fd = os.memfd_create("floor-ram")
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size)
    os.close(fd)
    a = np.frombuffer(m, np.uint8).reshape(-1, TPS)
    if fill is None:
        a[:, 0] = 0  # prefaulted, as a waiting VM's RAM is
    else:
        a[:] = fill
        a[:, 0] = np.arange(a.shape[0]) % 251 + 1  # non-zero, and each page a little different
    return m, a


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got, socket.MSG_WAITALL)
        if not n:
            raise EOFError
        got += n


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _send(case: str, sock: socket.socket, ram: np.ndarray) -> float:
    npages = ram.shape[0]
    c0 = _cpu()
    if case == "kernel":
        for lo in range(0, npages, CHUNK):
            sock.sendall(memoryview(ram[lo:lo + CHUNK]).cast("B"))
    elif case == "packets":
        hdr = bytearray(64 + 8 * PACKET)
        for lo in range(0, npages, PACKET):
            part = ram[lo:lo + PACKET]
            if not part.view(np.uint64).any(axis=1).all():
                raise SystemExit("a zero page in prefilled RAM")
            sock.sendmsg([hdr, memoryview(part).cast("B")])
    else:
        stage = np.empty((CHUNK, 8 + TPS), np.uint8)
        heads = np.empty(CHUNK, np.uint64)
        for lo in range(0, npages, CHUNK):
            part = ram[lo:lo + CHUNK]
            m = part.shape[0]
            if not part.view(np.uint64).any(axis=1).all():
                raise SystemExit("a zero page in prefilled RAM")
            np.multiply(np.arange(lo, lo + m, dtype=np.uint64), TPS, out=heads[:m])
            stage[:m, :8] = heads[:m].view(np.uint8).reshape(m, 8)
            stage[:m, 8:] = part
            sock.sendall(memoryview(stage[:m]).cast("B"))
    return _cpu() - c0


def _recv(case: str, sock: socket.socket, ram: np.ndarray) -> float:
    npages = ram.shape[0]
    c0 = _cpu()
    if case == "kernel":
        for lo in range(0, npages, CHUNK):
            _recv_exact(sock, memoryview(ram[lo:lo + CHUNK]).cast("B"))
    elif case == "packets":
        hdr = bytearray(64 + 8 * PACKET)
        for lo in range(0, npages, PACKET):
            _recv_exact(sock, memoryview(hdr))
            _recv_exact(sock, memoryview(ram[lo:lo + PACKET]).cast("B"))
    else:
        stage = np.empty((CHUNK, 8 + TPS), np.uint8)
        for lo in range(0, npages, CHUNK):
            m = min(CHUNK, npages - lo)
            _recv_exact(sock, memoryview(stage[:m]).cast("B"))
            ram[lo:lo + m] = stage[:m, 8:]
    return _cpu() - c0


def one(case: str, size: int, spin: bool) -> dict:
    """One 1-GiB-style transfer: MB/s and each side's CPU seconds per GiB."""
    lis = socket.create_server(("127.0.0.1", 0))
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the receiver
        try:
            _, dst = _ram(size, None)
            s = socket.create_connection(lis.getsockname())
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.sendall(b"r")  # ready: RAM prefaulted
            cpu = _recv(case, s, dst)
            ok = bool((dst[:, 0] == np.arange(dst.shape[0]) % 251 + 1).all())
            os.write(w, f"{cpu} {int(ok)}".encode())
        finally:
            os._exit(0)
    spinner = None
    if spin:
        spinner = os.fork()
        if spinner == 0:
            while True:
                pass
    try:
        _, src = _ram(size, 0x5A)
        sock, _ = lis.accept()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        sock.recv(1)
        t0 = time.monotonic()
        scpu = _send(case, sock, src)
        rcpu, ok = os.read(r, 64).decode().split()
        dt = time.monotonic() - t0
    finally:
        if spinner:
            os.kill(spinner, 9)
            os.waitpid(spinner, 0)
        os.waitpid(pid, 0)
        lis.close()
    if ok != "1":
        raise SystemExit(f"{case}: the receiver's RAM does not hold what was sent")
    gib = size / (1 << 30)
    return {"mbps": size / dt / 1e6, "src": scpu / gib, "dst": float(rcpu) / gib}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mem", default="1G", help="bytes of RAM moved (K/M/G suffix)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cases", default="kernel,packets,stream")
    ap.add_argument("--no-spin", action="store_true", help="no CPU-burning 'guest' process")
    ap.add_argument("--qemu-mbps", type=float, help="QEMU's pass-1 MB/s on this host, for the ratios")
    a = ap.parse_args()
    size = int(a.mem[:-1]) << {"K": 10, "M": 20, "G": 30}[a.mem[-1].upper()]
    cases = a.cases.split(",")
    runs: dict[str, list[dict]] = {c: [] for c in cases}
    for _ in range(a.reps):  # alternating, so a noisy moment hits every case
        for c in cases:
            runs[c].append(one(c, size, not a.no_spin))
    print(f"{a.mem} moved, {'no burner' if a.no_spin else 'a CPU-burning guest process beside it'}, "
          f"medians of {a.reps}")
    print(f"{'case':8} {'MB/s':>6} {'range':>11} {'src s/GiB':>10} {'dst s/GiB':>10} {'sum':>6}"
          + ("  x QEMU" if a.qemu_mbps else ""))
    for c in cases:
        med = {k: statistics.median(x[k] for x in runs[c]) for k in ("mbps", "src", "dst")}
        lo, hi = min(x["mbps"] for x in runs[c]), max(x["mbps"] for x in runs[c])
        line = (f"{c:8} {med['mbps']:6.0f} {lo:5.0f}-{hi:<5.0f} {med['src']:10.2f} {med['dst']:10.2f} "
                f"{med['src'] + med['dst']:6.2f}")
        if a.qemu_mbps:
            line += f"  {med['mbps'] / a.qemu_mbps:6.2f}"
        print(line)


if __name__ == "__main__":
    main()
