"""The source's urgent postcopy path in a process of its own: it reads the page requests that
the destination sends on the postcopy-preempt connection (x-preempt-requests) and answers each at
once on it, with the page read from guest RAM (its own mapping of the guest's memfd).

Why a process: in the migration's process the return-path thread waits for a GIL that the
background push holds. Here the same code (RamSender.send_requested, PageChannel.send_one,
check_page_request) claims pages from the parent's bitmap, shared with RamSender.share().

Parent side: UrgentSource, started when the preempt connection opens (before the guest stops),
told when page requests become legal (postcopy) and when to end (the push is done). It ends too
when the connection does, and reports the bytes and pages it sent; requests it served are counted
in the shared counters as they come.
"""
from __future__ import annotations

import mmap
import select
import socket
import sys

from .helperproc import HelperProcess, child_main, recv_msg

SERVED = 2  # index in RamSender.counters: requests the urgent process served


class UrgentSource(HelperProcess):
    def __init__(self, chan_fd: int, ram_fd: int, name: str, size: int, page_size: int,
                 resend: bool, sender_fds: list[int]):
        super().__init__("livemig.urgent_src")
        self.send({"op": "start", "name": name, "size": size, "page_size": page_size, "resend": resend},
                  [chan_fd, ram_fd, *sender_fds])

    def postcopy(self) -> None:
        """Page requests are legal from now on."""
        self.send({"op": "postcopy"})

    def finish(self) -> None:
        """The push is done: end the preempt connection (the process then reports and exits)."""
        self.send({"op": "finish"})


def _serve(ctl: socket.socket) -> dict:
    from .errors import ProtocolError, TransportError
    from .outgoing import PageChannel, RamSender, Writer, check_page_request
    from .ramblock import TPS, RamBlock
    from .stats import RamStats
    from .transport import Channel
    from .wire import returnpath as RPW

    cfg, fds = recv_msg(ctl)
    if cfg is None:
        return {"op": "done"}
    sock = socket.socket(fileno=fds[0])
    ram = mmap.mmap(fds[1], cfg["size"], mmap.MAP_SHARED, mmap.PROT_READ)
    block = RamBlock(cfg["name"], ram, cfg["page_size"])
    stats = RamStats()
    chan = PageChannel(block, Writer(Channel(sock)), stats)
    sender = RamSender(block, chan.w, stats)
    sender.attach(fds[2:])
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
                    sender.send_requested(chan, req.start // TPS, req.length // TPS, resend)
    except ProtocolError as e:
        return report("error", str(e))
    except (OSError, TransportError):
        return report()  # a broken connection: the main channel's threads see it too and pause or fail


if __name__ == "__main__":
    child_main(sys.argv, "mig/src/urgent", _serve)
