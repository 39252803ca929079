"""The source's urgent postcopy path in a process of its own: it reads the page requests that
the destination sends on the postcopy-preempt connection (x-preempt-requests) and answers each at
once on it.

Why a process: in the migration's process the return-path thread waits for a GIL that the
background push holds. Here the same code (RamSender.send_requested, PageChannel.send_one,
check_page_request) claims pages from the parent's bitmap, shared with RamSender.share(). Guest
RAM is read through this process's own mapping of the guest's memfd, or else copied page by page
from the parent (process_vm_readv) into a sparse local mirror at the same offsets, and dropped
once sent.

Parent side: UrgentSource, started with the migration (its imports are not on the switchover's
path), given the connection when it opens, told when page requests become legal (postcopy) and
when to end (the push is done). It ends too when the connection does, and reports the bytes and
pages it sent; requests it served are counted in the shared counters as they come. If it cannot
read guest RAM it says so before reading the connection ("unable"), and threads serve it.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import sys

from .helperproc import HelperProcess, child_main, recv_msg

SERVED = 2  # index in RamSender.counters: requests the urgent process served
MADV_DONTNEED = 4
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class UrgentSource(HelperProcess):
    def __init__(self) -> None:
        super().__init__("livemig.urgent_src")

    def start(self, chan_fd: int, name: str, size: int, page_size: int, resend: bool, sender_fds: list[int],
              ram_fd: int | None, ram_addr: int) -> None:
        """Serve the preempt connection `chan_fd`; guest RAM is memfd `ram_fd`, or else at
        `ram_addr` in this process."""
        cfg = {"op": "start", "name": name, "size": size, "page_size": page_size, "resend": resend,
               "ppid": os.getpid(), "ram_addr": ram_addr if ram_fd is None else None}
        self.send(cfg, [chan_fd, *sender_fds] + ([ram_fd] if ram_fd is not None else []))

    def postcopy(self) -> None:
        """Page requests are legal from now on."""
        self.send({"op": "postcopy"})

    def finish(self) -> None:
        """The push is done: end the preempt connection (the process then reports and exits)."""
        self.send({"op": "finish"})


class _IoVec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class RemoteRam:
    """Pages of another process's memory copied into a local mapping at the same offsets."""

    def __init__(self, pid: int, remote: int, local: int):
        self.pid, self.remote, self.local = pid, remote, local
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.process_vm_readv.restype = ctypes.c_ssize_t
        self.libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        self.liov, self.riov = _IoVec(), _IoVec()

    def read(self, off: int, length: int) -> None:
        self.liov.base, self.liov.len = self.local + off, length
        self.riov.base, self.riov.len = self.remote + off, length
        got = self.libc.process_vm_readv(self.pid, ctypes.byref(self.liov), 1, ctypes.byref(self.riov), 1, 0)
        if got != length:
            e = ctypes.get_errno()
            raise OSError(e, f"process_vm_readv of guest RAM: {os.strerror(e) if got < 0 else 'short read'}")

    def drop(self, off: int, length: int) -> None:
        self.libc.madvise(self.local + off, length, MADV_DONTNEED)


def _serve(ctl: socket.socket) -> dict:
    import numpy as np

    from .errors import ProtocolError, TransportError
    from .ram_send import PageChannel, RamSender, Writer, check_page_request
    from .ramblock import TPS, RamBlock
    from .stats import RamStats
    from .transport import Channel
    from .wire import returnpath as RPW

    cfg, fds = recv_msg(ctl)
    if cfg is None:
        return {"op": "done"}
    size = cfg["size"]
    remote = None
    if cfg["ram_addr"] is None:
        ram = mmap.mmap(fds[-1], size, mmap.MAP_SHARED, mmap.PROT_READ)
    else:
        ram = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
        remote = RemoteRam(cfg["ppid"], cfg["ram_addr"], np.frombuffer(ram, dtype=np.uint8).ctypes.data)
        try:
            remote.read(0, TPS)
            remote.drop(0, TPS)
        except OSError as e:
            return {"op": "done", "unable": str(e)}
    sock = socket.socket(fileno=fds[0])
    block = RamBlock(cfg["name"], ram, cfg["page_size"])
    stats = RamStats()
    chan = PageChannel(block, Writer(Channel(sock)), stats)
    sender = RamSender(block, chan.w, stats)
    sender.attach(fds[1:5])
    resend = cfg["resend"]
    dec = RPW.RPDecoder()
    buf = bytearray(1 << 12)
    postcopy, last = False, None
    poller = select.poll()
    poller.register(ctl.fileno(), select.POLLIN)
    poller.register(sock.fileno(), select.POLLIN)

    def report(op: str = "done", error: str | None = None) -> dict:
        return {"op": op, "error": error, "protocol": error is not None, "bytes": chan.w.sent,
                "normal": stats.normal, "duplicate": stats.duplicate}

    try:
        while True:
            for fd, _ in sorted(poller.poll(), key=lambda e: e[0] != ctl.fileno()):  # control first
                if fd == ctl.fileno():
                    msg, _ = recv_msg(ctl)
                    if msg is None:
                        return report()
                    if msg["op"] == "postcopy":
                        postcopy = True
                    elif msg["op"] == "finish":
                        chan.w.flush()
                        sock.shutdown(socket.SHUT_WR)
                        return report()
                    continue
                n = sock.recv_into(buf)
                if not n:
                    return report()
                dec.feed(memoryview(buf)[:n])
                while (req := dec.next_message()) is not None:
                    if not isinstance(req, RPW.ReqPages):
                        raise ProtocolError(f"postcopy-preempt channel: unexpected {type(req).__name__} message")
                    if not postcopy:
                        raise ProtocolError("return path: page request while not in postcopy")
                    last = check_page_request(req, block, last)
                    sender.counters[SERVED] += 1
                    if remote is not None:
                        try:
                            remote.read(req.start, req.length)
                        except OSError as e:  # not the link: the VM's threads take the channel over,
                            # from this request on (the bytes it and the rest came in, handed back)
                            left = RPW.req_pages(req.start, req.length, req.block) + dec.pending()
                            return {**report(), "unable": f"reading guest RAM failed: {e}",
                                    "leftover": left.hex()}
                    sender.send_requested(chan, req.start // TPS, req.length // TPS, resend)
                    if remote is not None:
                        remote.drop(req.start, req.length)
    except ProtocolError as e:
        return report("error", str(e))
    except (OSError, TransportError):
        return report()  # a broken connection: the main channel's threads see it too and pause or fail


if __name__ == "__main__":
    child_main(sys.argv, "mig/src/urgent", _serve)
