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
"""
from __future__ import annotations

import os
import select
import socket
import struct
import sys
import traceback
from typing import TYPE_CHECKING

from .helperproc import HelperProcess, child_main, recv_msg
from .ramblock import TPS

if TYPE_CHECKING:
    from .postcopy import PostcopyDestination

_ARRIVAL = struct.Struct("<qd")  # page, monotonic time placed


class UrgentProcess(HelperProcess):
    """Parent side: the process, its control socket and the pipe of requested pages that the
    parent's placers put in place (so the process can count their latency)."""

    def __init__(self) -> None:
        self.arr_r, self.arr_w = os.pipe()
        os.set_blocking(self.arr_w, False)
        super().__init__("livemig.urgent_dst")
        self.given_preempt = False
        self.npages = 0  # guest pages, known at listen()

    def listen(self, cfg: dict, fds: list[int]) -> None:
        self.npages = cfg["size"] // TPS
        self.send({"op": "listen", **cfg}, [*fds, self.arr_r])

    def give_preempt(self, sock: socket.socket) -> None:
        self.given_preempt = True
        self.send({"op": "preempt"}, [sock.fileno()])

    def arrived(self, page: int, when: float) -> None:
        try:
            os.write(self.arr_w, _ARRIVAL.pack(page, when))
        except (BlockingIOError, OSError):
            pass  # the process is gone or far behind: that latency goes uncounted

    def drain_arrivals(self) -> list[tuple[int, float]]:
        """Arrival notes the process did not read before it ended."""
        os.set_blocking(self.arr_r, False)
        out: list[tuple[int, float]] = []
        while got := _read_arrivals(self.arr_r, self.npages):
            out += got
        return out

    def close(self) -> None:
        super().close()
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
        _note_arrivals(pc, arr_fd)
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
                    _note_arrivals(pc, arr_fd)
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
        if not isinstance(e, OSError):
            traceback.print_exc()  # a bug, not the link: where it happened goes to stderr
        return report("error", f"{type(e).__name__}: {e}" if not isinstance(e, OSError) else str(e))


def _note_arrivals(pc: PostcopyDestination, fd: int) -> None:
    """Count the latency of each requested page the VM process placed."""
    for page, when in _read_arrivals(fd, pc.requested.size):
        pc._requested_arrived(page, when)


def _read_arrivals(fd: int, npages: int) -> list[tuple[int, float]]:
    """Arrival notes waiting in the pipe. They feed statistics only, so one naming a page outside
    guest RAM (a bug: _placed once read garbage from numpy's nonzero on the live shared bitmap,
    see shm.nonzero_of_shared) is dropped with a warning, never fatal to the migration."""
    try:
        data = os.read(fd, 256 * _ARRIVAL.size)
    except OSError:  # nothing there (non-blocking), or closed
        return []
    whole = len(data) // _ARRIVAL.size * _ARRIVAL.size
    notes = [(int(p), float(t)) for p, t in _ARRIVAL.iter_unpack(data[:whole]) if 0 <= p < npages]
    if len(notes) * _ARRIVAL.size != len(data):
        print(f"livemig: dropped arrival notes ({len(data) // _ARRIVAL.size - len(notes)} outside the "
              f"{npages} pages of guest RAM, {len(data)} bytes read)", file=sys.stderr)
    return notes


if __name__ == "__main__":
    child_main(sys.argv, "mig/dst/urgent", _serve)
