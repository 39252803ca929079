"""A failure-injecting relay between a migration source and destination (test helper).

The source connects to `relay.uri` (a unix socket); every connection is forwarded to the
destination's address. The relay counts the bytes of the first connection (the main channel) in
the source -> destination direction and can: cut every connection once that count reaches a
mark (or at once), flip one byte at a given position of the main stream, stall (hold all data,
both directions), or hold only what the destination sends (the return path) until a cut. With
`record`, it keeps every byte it forwarded, per connection and direction (`seen`).
"""
from __future__ import annotations

import socket
import threading
from pathlib import Path


class Relay:
    def __init__(self, path: Path, target: tuple[str, int] | str, record: bool = False):
        self.path = str(path)
        self.record = record
        self.seen: list[bytearray] = []  # with record: [conn0 src->dst, conn0 dst->src, conn1 ...]
        self.target = target
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(self.path)
        self.srv.listen(8)
        self.socks: list[socket.socket] = []
        self.main_bytes = 0  # source -> destination bytes on the first connection
        self.cut_at: int | None = None
        self.flip_at: int | None = None
        self.is_cut = threading.Event()
        self.go = threading.Event()  # cleared while stalled
        self.go.set()
        self.back = threading.Event()  # cleared: destination -> source data is held
        self.back.set()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def _connect(self) -> socket.socket:
        if isinstance(self.target, str):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.target)
            return s
        return socket.create_connection(self.target)

    def _accept(self) -> None:
        first = True
        while True:
            try:
                a, _ = self.srv.accept()
            except OSError:
                return
            if self.is_cut.is_set():
                a.close()
                continue
            b = self._connect()
            with self.lock:
                self.socks += [a, b]
                fwd, bwd = bytearray(), bytearray()
                self.seen += [fwd, bwd]
            threading.Thread(target=self._pipe, args=(a, b, first, False, fwd), daemon=True).start()
            threading.Thread(target=self._pipe, args=(b, a, False, True, bwd), daemon=True).start()
            first = False

    def _pipe(self, src: socket.socket, dst: socket.socket, main: bool, back: bool = False,
              seen: bytearray | None = None) -> None:
        try:
            self._forward(src, dst, main, back, seen)
            dst.shutdown(socket.SHUT_WR)  # pass the end of one direction on, like a real link
        except OSError:
            for s in (src, dst):  # one side broke: so does the connection
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _forward(self, src: socket.socket, dst: socket.socket, main: bool, back: bool,
                 seen: bytearray | None) -> None:
        if True:
            while data := src.recv(1 << 16):
                self.go.wait()
                if back:
                    self.back.wait()
                if self.is_cut.is_set():
                    raise OSError("cut")
                if main:
                    start = self.main_bytes
                    end = start + len(data)
                    if self.flip_at is not None and start <= self.flip_at < end:
                        buf = bytearray(data)
                        buf[self.flip_at - start] ^= 0xFF
                        data = bytes(buf)
                    if self.cut_at is not None and end >= self.cut_at:
                        dst.sendall(data[:max(self.cut_at - start, 0)])
                        self.cut()
                        return
                    self.main_bytes = end
                if self.record and seen is not None:
                    seen += data
                dst.sendall(data)

    def cut(self) -> None:
        """Break every connection (both ends see the connection end) and refuse new ones."""
        self.is_cut.set()
        self.go.set()
        self.back.set()
        with self.lock:
            for s in self.socks:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def stall(self) -> None:
        self.go.clear()

    def hold_replies(self) -> None:
        """Hold everything the destination sends (the return path) until a cut."""
        self.back.clear()

    def close(self) -> None:
        self.cut()
        self.srv.close()
