"""A TCP relay that adds a fixed one-way delay in each direction (the kernel here has no netem).

    python3 bench/delay_relay.py LISTEN_HOST LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS

Every accepted connection gets its own connection to the target, and each direction its own
process (no GIL shared between the bulk stream and the return path); bytes read on one side are held
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
import signal
import socket
import sys
import threading
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


def _pipe(src: socket.socket, dst: socket.socket, delay: float) -> None:
    queue: collections.deque = collections.deque()
    ready = threading.Condition()
    done = [False]
    held = [0]  # bytes read but not yet written: bounded, so the sender feels the link's pace

    def reader() -> None:
        try:
            while data := src.recv(CHUNK):
                with ready:
                    queue.append((time.monotonic() + delay, data))
                    held[0] += len(data)
                    ready.notify_all()
                    while held[0] > MAX_HELD:
                        ready.wait()
        except OSError:
            pass
        with ready:
            done[0] = True
            ready.notify_all()

    threading.Thread(target=reader, daemon=True).start()
    try:
        while True:
            with ready:
                while not queue and not done[0]:
                    ready.wait()
                if not queue:
                    break
                due, data = queue.popleft()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)
            dst.sendall(data)
            with ready:
                held[0] -= len(data)
                ready.notify_all()
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
                _pipe(src, dst, one_way)
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
