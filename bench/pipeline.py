"""Receive pipeline on loopback without a guest: a sender process streams 1 GiB of PAGE records
(livemig's batch encoder), the receiver decodes them with StreamDecoder and copies them into a
guest-sized mapping, once into fresh memory and once into memory allocated beforehand
(MADV_POPULATE_WRITE), so the cost of page allocation on the destination is seen on its own.

    python3 bench/pipeline.py [--size-mib 1024] [--reps 3]
"""
from __future__ import annotations

import argparse
import mmap
import os
import socket
import statistics
import time

import numpy as np

from livemig.ramblock import populate
from livemig.wire import ram as R
from livemig.wire import stream as S
from livemig.wire.decoder import LocalBlock, Pages, StreamDecoder

BATCH = 256


def sender(sock: socket.socket, size: int) -> None:
    mem = np.frombuffer(mmap.mmap(-1, size), np.uint8).reshape(-1, 4096)
    mem[:, 0] = 1
    st = np.empty((BATCH, R.PAGE_RECORD), np.uint8)
    sock.sendall(S.file_header() + S.configuration() + S.section_header(S.Section.START, 0, "ram", 0, 4)
                 + R.setup_payload([R.BlockInfo("pc.ram", size)]) + S.section_footer(0)
                 + S.section_header(S.Section.PART, 0) + R.page_header(0, R.FLAG_PAGE, "pc.ram") + mem[0].tobytes())
    for i in range(1, size // 4096, BATCH):
        idx = np.arange(i, min(i + BATCH, size // 4096))
        m = idx.size
        st[:m, :8] = R.page_headers(idx.astype(np.uint64) * 4096).view(np.uint8).reshape(m, 8)
        st[:m, 8:] = mem[idx[0]:idx[0] + m]
        sock.sendall(memoryview(st[:m]).cast("B"))
    sock.sendall(R.eos() + S.section_footer(0) + S.eof())
    sock.close()


def receive(size: int, prealloc: bool) -> float:
    srv = socket.create_server(("127.0.0.1", 0))
    port = srv.getsockname()[1]
    pid = os.fork()
    if pid == 0:
        srv.close()
        sender(socket.create_connection(("127.0.0.1", port)), size)
        os._exit(0)
    conn, _ = srv.accept()
    srv.close()
    gm = mmap.mmap(-1, size)
    gm.madvise(mmap.MADV_HUGEPAGE)
    g = np.frombuffer(gm, np.uint8).reshape(-1, 4096)
    if prealloc:
        import ctypes
        populate(ctypes.addressof(ctypes.c_char.from_buffer(gm)), size)
    dec = StreamDecoder([LocalBlock("pc.ram", size)], {})
    t = time.perf_counter()
    while True:
        n = conn.recv_into(dec.space())
        if not n:
            break
        dec.commit(n)
        while (ev := dec.next_event()) is not None:
            if isinstance(ev, Pages):
                i0 = int(ev.offsets[0]) >> 12
                g[i0:i0 + len(ev.offsets)] = ev.data
    el = time.perf_counter() - t
    os.waitpid(pid, 0)
    conn.close()
    del g
    gm.close()
    return el


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    size = a.size_mib << 20
    res = {False: [], True: []}
    for _ in range(a.reps):
        for pre in (False, True):
            res[pre].append(size / receive(size, pre) / 1e6)
    fresh, pre = statistics.median(res[False]), statistics.median(res[True])
    print(f"receive {a.size_mib} MiB over loopback, median of {a.reps}:")
    print(f"  into fresh memory:          {fresh:7.0f} MB/s  (runs {', '.join(f'{x:.0f}' for x in res[False])})")
    print(f"  into preallocated memory:   {pre:7.0f} MB/s  (runs {', '.join(f'{x:.0f}' for x in res[True])})")
    print(f"  ratio preallocated / fresh: {pre / fresh:.2f}")


if __name__ == "__main__":
    main()
