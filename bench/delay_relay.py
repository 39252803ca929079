"""A TCP relay that adds a fixed one-way delay in each direction (the kernel here has no netem).

    python3 bench/delay_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS

Every accepted connection gets its own connection to the target, and each direction its own
process with one thread (no GIL shared between the bulk stream and the return path); bytes read on one side are held
until `DELAY_MS / 2` after they were read, then written to the other side (so the round trip
gains DELAY_MS). At most 1 MiB is held per direction, so a slow link behind the relay slows the
sender down as the link itself would. Order and content are kept; EOF is passed on after the data
before it.
Used by bench/emulated_link.py inside a network namespace.
"""
from __future__ import annotations

import collections
import ctypes
import os
import select
import signal
import socket
import sys
import time

CHUNK = 256 << 10
MAX_HELD = 1 << 20  # in flight inside the relay (the kernel's socket buffers hold more)
PR_SET_PDEATHSIG = 1


def _tight_timers() -> None:
    """Sleep with ~1 us slack instead of 50 us (PR_SET_TIMERSLACK), so 50 us delays are 50 us."""
    try:
        ctypes.CDLL(None).prctl(29, 1000, 0, 0, 0)
    except Exception:
        pass


def timer_lateness(samples: int = 200) -> float:
    """Median time a short timed wait overshoots here (timer wake-ups on a virtualised host are
    late by tens of microseconds): the relay wakes that much early, so the delay it adds is the
    one asked for, not that plus the lateness."""
    late = []
    for _ in range(samples):
        t0 = time.monotonic()
        select.select([], [], [], 50e-6)
        late.append(time.monotonic() - t0 - 50e-6)
    late.sort()
    return max(late[len(late) // 2], 0.0)


def _pipe(src: socket.socket, dst: socket.socket, delay: float, early: float = 0.0) -> None:
    """One direction, one thread: read whatever arrives (stamped with its due time), write each
    chunk when it is due, and in between wait in select() for whichever comes first. No second
    thread, so no hand-off between threads per chunk (each costs wake-ups on a busy host)."""
    queue: collections.deque = collections.deque()  # (due, data)
    held = 0  # bytes read but not yet written: bounded, so the sender feels the link's pace
    eof = False
    try:
        while True:
            now = time.monotonic()
            while queue and queue[0][0] <= now + early:
                data = queue.popleft()[1]
                dst.sendall(data)
                held -= len(data)
                now = time.monotonic()
            if eof and not queue:
                break
            timeout = max(queue[0][0] - now - early, 0.0) if queue else None
            if eof or held >= MAX_HELD:
                time.sleep(timeout)
                continue
            if select.select([src], [], [], timeout)[0]:
                data = src.recv(CHUNK)
                if not data:
                    eof = True
                    continue
                queue.append((time.monotonic() + delay, data))
                held += len(data)
    except OSError:
        pass
    try:
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def main() -> int:
    lhost, lport, thost, tport, delay_ms = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), float(sys.argv[5])
    one_way = delay_ms / 2000.0
    _tight_timers()
    early = timer_lateness() if one_way else 0.0
    srv = socket.create_server((lhost, lport))
    print("ready", flush=True)
    while True:
        a, _ = srv.accept()
        b = socket.create_connection((thost, tport))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # each direction in its own process: a page request on the return path must not wait
        # for the GIL of a process that is busy relaying the bulk stream the other way
        for src, dst in ((a, b), (b, a)):
            if os.fork() == 0:
                ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)  # dies with the relay
                srv.close()
                _pipe(src, dst, one_way, early)
                os._exit(0)
        a.close()
        b.close()
        while True:  # reap the directions that ended
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


if __name__ == "__main__":
    sys.exit(main())
