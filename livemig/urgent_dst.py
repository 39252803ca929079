"""The destination's urgent postcopy path in a process of its own: it reads userfaultfd, sends
page requests on the postcopy-preempt connection and places the pages that come back on it.

Why a process: in the loader's process these steps wait for a GIL that the bulk threads (the
loader copying the main stream, the vCPU thread's exits) hold, on a host whose cores the bulk
work keeps busy. Here they have a GIL of their own, and the same code (PostcopyDestination,
PreemptReader) runs on the parent's userfaultfd and shared bitmaps (PostcopyDestination.attach).

Parent side: UrgentProcess, started at ADVISE (so interpreter start-up is not in the downtime),
given the userfaultfd and bitmaps at LISTEN and the preempt socket when it is accepted. The
process ends at the preempt channel's end (or its failure), hands back its figures and its
requests in flight, and the parent's own fault thread takes over.

Control messages (unix socket): a 4-byte little-endian length, then JSON; file descriptors ride
with the length.
"""
from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
from typing import Any

_LEN = struct.Struct("<I")
_ARRIVAL = struct.Struct("<qd")  # page, monotonic time placed
PR_SET_PDEATHSIG = 1
MAX_FDS = 8


def send_msg(sock: socket.socket, obj: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    head = _LEN.pack(len(data))
    if fds:
        socket.send_fds(sock, [head], fds)
        sock.sendall(data)
    else:
        sock.sendall(head + data)


def recv_msg(sock: socket.socket) -> tuple[dict | None, list[int]]:
    """One message and the descriptors sent with it; (None, []) when the peer has gone."""
    head, fds = b"", []
    while len(head) < 4:
        part, got, _, _ = socket.recv_fds(sock, 4 - len(head), MAX_FDS)
        if not part:
            return None, fds
        head += part
        fds += got
    (n,) = _LEN.unpack(head)
    data = bytearray()
    while len(data) < n:
        part = sock.recv(n - len(data))
        if not part:
            return None, fds
        data += part
    return json.loads(data), fds


class UrgentProcess:
    """Parent side: the process, its control socket and the pipe of requested pages that the
    parent's placers put in place (so the process can count their latency)."""

    def __init__(self) -> None:
        self.ctl, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.arr_r, self.arr_w = os.pipe()
        os.set_blocking(self.arr_w, False)
        try:
            self.proc = subprocess.Popen([sys.executable, "-m", "livemig.urgent_dst", str(child.fileno())],
                                         pass_fds=[child.fileno()], stdin=subprocess.DEVNULL)
        finally:
            child.close()
        self.send_lock = threading.Lock()
        self.given_preempt = False

    def listen(self, cfg: dict, fds: list[int]) -> None:
        with self.send_lock:
            send_msg(self.ctl, {"op": "listen", **cfg}, [*fds, self.arr_r])

    def give_preempt(self, sock: socket.socket) -> None:
        self.given_preempt = True
        with self.send_lock:
            send_msg(self.ctl, {"op": "preempt"}, [sock.fileno()])

    def arrived(self, page: int, when: float) -> None:
        try:
            os.write(self.arr_w, _ARRIVAL.pack(page, when))
        except (BlockingIOError, OSError):
            pass  # the process is gone or far behind: that latency goes uncounted

    def wait(self) -> dict:
        """Block until the process ends; its last message ({"op": "done", "stats", ...} or
        {"op": "error", "error": ...}), or an error if it died without one."""
        while True:
            try:
                msg, fds = recv_msg(self.ctl)
            except OSError as e:
                return {"op": "error", "error": f"urgent process: {e}"}
            for fd in fds:
                os.close(fd)
            if msg is None:
                code = self.proc.poll()
                return {"op": "error", "error": f"urgent process exited ({code}) without a report"}
            if msg.get("op") in ("done", "error"):
                return msg

    def drain_arrivals(self) -> list[tuple[int, float]]:
        """Arrival notes the process did not read before it ended."""
        out = []
        os.set_blocking(self.arr_r, False)
        while True:
            try:
                data = os.read(self.arr_r, 64 * _ARRIVAL.size)
            except (BlockingIOError, OSError):
                return out
            if not data:
                return out
            out += [(int(p), float(t)) for p, t in _ARRIVAL.iter_unpack(data[:len(data) // _ARRIVAL.size * _ARRIVAL.size])]

    def close(self) -> None:
        try:
            self.ctl.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.ctl.close()
        for fd in (self.arr_r, self.arr_w):
            try:
                os.close(fd)
            except OSError:
                pass


# -- the process itself
def _serve(ctl: socket.socket) -> dict:
    from .postcopy import PostcopyDestination, PreemptReader
    from .threadname import is_vcpu_thread

    cfg, fds = recv_msg(ctl)
    if cfg is None:
        return {"op": "done", "stats": None}
    arr_fd = fds.pop()
    os.set_blocking(arr_fd, False)
    pending: list[bytes] = []
    preempt: socket.socket | None = None

    def send(data: bytes) -> None:
        if preempt is None:
            pending.append(data)  # no preempt connection yet: it goes out as soon as there is one
        else:
            preempt.sendall(data)

    pc = PostcopyDestination.attach(cfg, fds, send)
    seen: dict[int, bool] = {}
    pc.vcpu_tids = lambda: [t for t, v in seen.items() if v]
    ppid = cfg["ppid"]
    reader = PreemptReader(pc)
    poller = select.poll()
    for fd in (ctl.fileno(), arr_fd, pc.uffd.fd):
        poller.register(fd, select.POLLIN)
    uffd_fd = pc.uffd.fd

    def report(op: str = "done", error: str | None = None) -> dict:
        for page, when in _read_arrivals(arr_fd):
            pc._requested_arrived(page, when)
        return {"op": op, "error": error, "stats": pc.export(), "normal": reader.normal,
                "duplicate": reader.duplicate}

    try:
        while True:
            for fd, ev in poller.poll():
                if fd == uffd_fd:
                    if ev & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                        return report()
                    faults = pc.uffd.read_faults()
                    for _, _, tid in faults:
                        if tid not in seen:
                            seen[tid] = is_vcpu_thread(ppid, tid)
                    if msgs := pc.handle_faults(faults):
                        send(msgs)
                elif preempt is not None and fd == preempt.fileno():
                    if not reader.feed(preempt.recv_into):
                        return report()
                elif fd == arr_fd:
                    for page, when in _read_arrivals(arr_fd):
                        pc._requested_arrived(page, when)
                elif fd == ctl.fileno():
                    msg, got = recv_msg(ctl)
                    if msg is None or msg.get("op") == "stop":
                        return report()
                    if msg.get("op") == "preempt":
                        preempt = socket.socket(fileno=got[0])
                        poller.register(preempt.fileno(), select.POLLIN)
                        if pending:
                            preempt.sendall(b"".join(pending))
                            pending.clear()
    except Exception as e:  # the parent decides: a broken connection pauses postcopy, the rest fails
        return report("error", f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e))


def _read_arrivals(fd: int) -> list[tuple[int, float]]:
    try:
        data = os.read(fd, 256 * _ARRIVAL.size)
    except BlockingIOError:
        return []
    return [(int(p), float(t)) for p, t in _ARRIVAL.iter_unpack(data[:len(data) // _ARRIVAL.size * _ARRIVAL.size])]


def main(argv: list[str]) -> None:
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    ctl = socket.socket(fileno=int(argv[1]))
    if os.getppid() == 1:
        return  # the parent died before the death signal was set
    from .threadname import set_thread_name
    set_thread_name("mig/dst/urgent")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # ^C in a terminal: the parent decides
    result = _serve(ctl)
    try:
        send_msg(ctl, result)
    except OSError:
        pass


if __name__ == "__main__":
    main(sys.argv)
