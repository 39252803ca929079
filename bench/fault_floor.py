"""The least a remote page fault can cost in Python on this host: the floor under livemig's
fault -> placement latency.

Two processes, no guest and no migration stream, each path reduced to its syscalls plus the
fewest Python lines that can carry it (the same hops as a livemig postcopy-preempt request):

  destination  "vcpu" thread reads page i of a userfaultfd-registered mapping (ctypes.memmove,
               outside the GIL) and blocks on the missing page;
               fault thread: poll + read the userfaultfd message, send an 8-byte request;
  source       request thread: recv the request, send an 8-byte header + the 4 KiB page;
  destination  page thread: recv the header and the page, UFFDIO_COPY it (the vcpu wakes).

Latency is counted as livemig counts it: fault message read -> page placed. With `--load`, a
bulk stream runs beside it as livemig's background push does (a source thread sending 256 KiB
chunks as fast as it can, a destination thread receiving them and copying them into memory),
in the same two processes, so it competes for the cores and for each process's GIL. The third
case sends the requests on the bulk socket (as a return path shares the main connection): each
then waits for the socket lock that the bulk sends and receives hold. The fourth adds a process
that only burns CPU, as the destination's running guest does between its faults (livemig's vCPU
thread runs KVM_RUN outside the GIL, so it competes for a core, not for the GIL).

`--placing own,spin` moves the placement into the fault thread, which then waits for its own
page (blocked in recv, or spinning on a non-blocking read that keeps the GIL): one thread fewer
on the destination's side of the round trip.

    python3 bench/fault_floor.py [--pages 20000] [--reps 3] [--placing thread,own,spin] [--cases 1,4]
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import select
import socket
import statistics
import struct
import threading
import time

import numpy as np

from livemig import gilcalls
from livemig.uffd import UserFault

TPS = 4096
MADV_NOHUGEPAGE = 14
REQ = struct.Struct("<Q")


def _pair() -> tuple[socket.socket, socket.socket]:
    lis = socket.create_server(("127.0.0.1", 0))
    a = socket.create_connection(lis.getsockname())
    b, _ = lis.accept()
    lis.close()
    for s in (a, b):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return a, b


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:])
        if not n:
            raise EOFError
        got += n


def source(req: socket.socket, pages: socket.socket, bulk: socket.socket | None) -> None:
    """Serve each request with its page; optionally push bulk data beside it."""
    if bulk is not None:
        def push() -> None:
            chunk = np.ones(256 << 10, np.uint8)
            try:
                while True:
                    bulk.sendall(chunk)
            except OSError:
                pass
        threading.Thread(target=push, daemon=True).start()
    out = bytearray(8 + TPS)
    buf = bytearray(8)
    while True:
        n = req.recv_into(buf)
        if n < 8:
            return
        (page,) = REQ.unpack_from(buf)
        REQ.pack_into(out, 0, page)
        out[8:16] = REQ.pack(page ^ 0x5A5A)  # the page says which page it is
        pages.sendall(out)


def destination(req: socket.socket, pages: socket.socket, bulk: socket.socket | None, npages: int,
                placing: str = "thread") -> list[float]:
    mem = mmap.mmap(-1, npages * TPS, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    ctypes.CDLL(None).madvise(ctypes.c_void_p(base), ctypes.c_size_t(npages * TPS), MADV_NOHUGEPAGE)
    uffd = UserFault()
    uffd.register(base, npages * TPS)
    fault_at = [0.0] * npages
    lat: list[float] = []
    stop = threading.Event()

    if bulk is not None:
        def drain() -> None:
            sink = np.empty(256 << 10, np.uint8)
            into = np.empty(256 << 10, np.uint8)
            try:
                while not stop.is_set():
                    _recv_exact(bulk, memoryview(sink))
                    into[:] = sink  # the placement copy of the bulk pages
            except (OSError, EOFError):
                pass
        threading.Thread(target=drain, daemon=True).start()

    def faults() -> None:
        poller = select.poll()
        poller.register(uffd.fd, select.POLLIN)
        while not stop.is_set():
            poller.poll(100)
            for addr, _, _ in uffd.read_faults():
                page = (addr - base) // TPS
                fault_at[page] = time.monotonic()
                req.sendall(REQ.pack(page))
                if placing != "thread":
                    take(placing == "spin")

    own = bytearray(8 + TPS)
    own_addr = gilcalls.buffer_address(own)
    own_arg = bytearray(40)

    def take(spin: bool) -> None:
        """The fault thread waits for its own page: blocked in recv, or spinning on it."""
        got = 0
        while got < len(own):
            if spin:
                n = gilcalls._read(pages.fileno(), own_addr + got, len(own) - got)
                if n < 0:
                    continue
            else:
                n = pages.recv_into(memoryview(own)[got:])
            if n == 0:
                raise EOFError
            got += n
        (page,) = REQ.unpack_from(own)
        uffd.copy(base + page * TPS, own_addr + 8, TPS, own_arg)
        lat.append(time.monotonic() - fault_at[page])

    def placer() -> None:
        buf = bytearray(8 + TPS)
        view = memoryview(buf)
        src = ctypes.addressof(ctypes.c_char.from_buffer(buf)) + 8
        arg = bytearray(40)
        try:
            while True:
                _recv_exact(pages, view)
                (page,) = REQ.unpack_from(buf)
                uffd.copy(base + page * TPS, src, TPS, arg)
                lat.append(time.monotonic() - fault_at[page])
        except (OSError, EOFError):
            pass

    if placing == "spin":
        pages.setblocking(False)
    threading.Thread(target=faults, daemon=True).start()
    if placing == "thread":
        threading.Thread(target=placer, daemon=True).start()
    word = ctypes.c_uint64()
    for i in range(npages):  # the "vCPU": each read faults and waits for its page
        ctypes.memmove(ctypes.addressof(word), base + i * TPS, 8)
        if word.value != i ^ 0x5A5A:
            raise SystemExit(f"page {i} holds {word.value:#x}: wrong page placed")
    stop.set()
    return lat


def _spinner() -> int:
    """A process that only burns CPU, as a running guest's vCPU does between its faults."""
    pid = os.fork()
    if pid == 0:
        while True:
            pass
    return pid


def one(npages: int, load: bool, shared: bool = False, spin: bool = False, placing: str = "thread") -> dict:
    spinner = _spinner() if spin else None
    req_d, req_s = _pair()
    pg_s, pg_d = _pair()
    bulk_s, bulk_d = _pair() if load else (None, None)
    if shared:  # requests on the bulk socket
        req_d.close()
        req_s.close()
        req_d, req_s = bulk_d, bulk_s
    pid = os.fork()
    if pid == 0:
        try:
            for s in {req_d, pg_d, bulk_d}:  # only the source's ends stay open here
                if s is not None:
                    s.close()
            source(req_s, pg_s, bulk_s)
        finally:
            os._exit(0)
    for s in {req_s, pg_s, bulk_s}:
        if s is not None:
            s.close()
    lat = destination(req_d, pg_d, bulk_d, npages, placing)
    for s in {req_d, pg_d, bulk_d}:
        if s is not None:
            s.shutdown(socket.SHUT_RDWR)
            s.close()
    os.waitpid(pid, 0)
    if spinner is not None:
        os.kill(spinner, 9)
        os.waitpid(spinner, 0)
    us = np.array(lat) * 1e6
    return {"faults": us.size, "p50": round(float(np.percentile(us, 50)), 1),
            "p99": round(float(np.percentile(us, 99)), 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pages", type=int, default=20000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--placing", default="thread",
                    help="comma list: thread (a page thread places, as livemig), own (the fault "
                         "thread waits in recv for its page and places it), spin (the same, spinning)")
    ap.add_argument("--cases", help="comma list of case numbers (1-4) to run; all by default")
    a = ap.parse_args()
    cases = {"nothing beside it": (False, False, False), "bulk stream beside it": (True, False, False),
             "bulk stream, requests on its socket": (True, True, False),
             "bulk stream and a busy vCPU beside it": (True, False, True)}
    pick = {int(c) for c in a.cases.split(",")} if a.cases else set(range(1, 5))
    for k, (name, (load, shared, spin)) in enumerate(cases.items(), 1):
        if k not in pick:
            continue
        for placing in a.placing.split(","):
            runs = [one(a.pages, load, shared, spin, placing) for _ in range(a.reps)]
            label = name if placing == "thread" else f"{name}, placed by the fault thread ({placing})"
            for r in runs:
                print(f"{label}: {r}", flush=True)
            print(f"  median p50 {statistics.median(r['p50'] for r in runs)} us, "
                  f"median p99 {statistics.median(r['p99'] for r in runs)} us\n", flush=True)


if __name__ == "__main__":
    main()
