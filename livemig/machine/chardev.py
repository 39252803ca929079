"""Serial backends parsed from QEMU-style chardev specs.

Supported specs:
    null                                   output dropped, no input
    stdio                                  output to fd 1, input from fd 0 (reader thread)
    file:PATH[,append=on]                  output to PATH, truncated at open unless append=on
    unix:PATH,server=on,wait=off           listening socket; output goes to the connected client
                                           (dropped when there is none); client input feeds the UART

Output is written as it happens with unbuffered ``os.write``/``send`` so that anything watching the
file or socket sees each character as soon as the guest writes it. Input is read only as fast as
the device takes it (its ``room`` callback, QEMU's can_receive): what the guest has not read yet
waits in the pipe or socket, and nothing typed is lost to a full receive FIFO.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import sys
import threading
from typing import Callable

from ..errors import GuestError
from ..threadname import NamedThread

InputCallback = Callable[[bytes], None]
RoomCallback = Callable[[float], int]  # room(timeout): bytes the device takes now, after waiting up to timeout s
ROOM_WAIT_S = 0.05  # a reader with a full device looks again this often (and for close)
READ_CHUNK = 4096  # input read at once from a backend whose device has no room callback


class CharBackend:
    """Base backend: output dropped, no input."""

    spec = "null"

    def __init__(self) -> None:
        self._on_input: InputCallback | None = None
        self._room: RoomCallback | None = None

    def set_input_handler(self, cb: InputCallback | None, room: RoomCallback | None = None) -> None:
        """``cb(data)`` is called (from a backend thread) with bytes received for the guest, never
        more than ``room(timeout)`` says the device takes (unlimited without it)."""
        self._on_input = cb
        self._room = room

    def _space(self, timeout: float) -> int:
        """How many input bytes to read now (0: the device is full, even after `timeout` s)."""
        room = self._room
        return min(READ_CHUNK, room(timeout)) if room is not None else READ_CHUNK

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class NullBackend(CharBackend):
    spec = "null"


class FileBackend(CharBackend):
    def __init__(self, path: str, append: bool = False) -> None:
        super().__init__()
        self.spec = f"file:{path}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_APPEND if append else os.O_TRUNC)
        try:
            self.fd = os.open(path, flags, 0o644)
        except OSError as e:
            raise GuestError(f"chardev {self.spec}: {e.strerror}") from None

    def write(self, data: bytes) -> None:
        fd = self.fd
        if fd < 0:
            return
        try:
            while data:
                n = os.write(fd, data)
                data = data[n:]
        except OSError as e:  # a full or failing disk loses console output, not the guest
            self.fd = -1
            os.close(fd)
            print(f"livemig: chardev {self.spec}: {e.strerror or e}; its output is dropped from here",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class StdioBackend(CharBackend):
    spec = "stdio"

    def __init__(self) -> None:
        super().__init__()
        self._stop = False
        self._thread: threading.Thread | None = None
        self._out = select.poll()
        self._out.register(1, select.POLLOUT)

    def set_input_handler(self, cb: InputCallback | None, room: RoomCallback | None = None) -> None:
        super().set_input_handler(cb, room)
        if cb is not None and self._thread is None:
            self._thread = NamedThread(target=self._reader, name="chardev-stdio", daemon=True)
            self._thread.start()

    def _reader(self) -> None:
        while not self._stop:
            n = self._space(ROOM_WAIT_S)
            if not n:
                continue
            try:
                data = os.read(0, min(n, 256))
            except OSError:
                return
            if not data:
                return
            cb = self._on_input
            if cb is not None and not self._stop:
                cb(data)

    def write(self, data: bytes) -> None:
        """Output that stdout cannot take now (a stalled pipe or a terminal paused with ^S) is
        dropped: a blocked write would hold the vCPU thread, and with it pause, migration and quit."""
        try:
            while data and self._out.poll(0):
                n = os.write(1, data)
                data = data[n:]
        except OSError:
            pass

    def close(self) -> None:
        self._stop = True


class UnixServerBackend(CharBackend):
    """A listening AF_UNIX socket (server=on,wait=off); one client at a time, newest wins."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.spec = f"unix:{path},server=on,wait=off"
        self.path = path
        try:
            if os.path.exists(path):
                os.unlink(path)
        except OSError:
            pass
        self._lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._lsock.bind(path)
            self._lsock.listen(1)
        except OSError as e:
            self._lsock.close()
            raise GuestError(f"chardev {self.spec}: {e.strerror}") from None
        self._client: socket.socket | None = None
        self._lock = threading.Lock()
        self._stop_r, self._stop_w = os.pipe()
        self._thread = NamedThread(target=self._serve, name="chardev-unix", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        lsock = self._lsock
        while True:
            fds = [lsock, self._stop_r]
            client = self._client
            space = 0
            if client is not None:  # a full device: its input waits in the socket until the guest reads
                space = self._space(ROOM_WAIT_S)  # at once if there is room
                if space:
                    fds.append(client)
            try:
                ready, _, _ = select.select(fds, [], [], None if space or client is None else 0)
            except (OSError, ValueError):
                return
            if self._stop_r in ready:
                return
            if lsock in ready:
                try:
                    c, _ = lsock.accept()
                except OSError:
                    continue
                c.setblocking(False)
                with self._lock:
                    old, self._client = self._client, c
                if old is not None:
                    old.close()
            if client is not None and client in ready:
                try:
                    data = client.recv(space)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    with self._lock:
                        if self._client is client:
                            self._client = None
                    client.close()
                    continue
                cb = self._on_input
                if cb is not None:
                    cb(data)

    def write(self, data: bytes) -> None:
        c = self._client
        if c is None:
            return
        try:
            c.send(data)
        except BlockingIOError:
            pass  # a client that does not read loses output rather than stalling the guest
        except OSError as e:
            if e.errno in (errno.EPIPE, errno.ECONNRESET, errno.EBADF, errno.ENOTCONN):
                with self._lock:
                    if self._client is c:
                        self._client = None

    def close(self) -> None:
        try:
            os.write(self._stop_w, b"x")
        except OSError:
            pass
        self._thread.join(timeout=2)
        with self._lock:
            c, self._client = self._client, None
        if c is not None:
            c.close()
        self._lsock.close()
        for fd in (self._stop_r, self._stop_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(self.path)
        except OSError:
            pass


def _opts(parts: list[str]) -> dict[str, str]:
    out = {}
    for p in parts:
        if "=" in p:
            k, v = p.split("=", 1)
            out[k.strip()] = v.strip()
        else:
            out[p.strip()] = "on"
    return out


def _onoff(v: str | None, default: bool) -> bool:
    if v is None:
        return default
    if v in ("on", "yes", "true", "1"):
        return True
    if v in ("off", "no", "false", "0"):
        return False
    raise GuestError(f"chardev option value {v!r} is not on/off")


def open_chardev(spec: str) -> CharBackend:
    """Parse a QEMU-style chardev spec and open the backend."""
    spec = spec.strip()
    if spec in ("null", "none", ""):
        return NullBackend()
    if spec == "stdio":
        return StdioBackend()
    kind, _, rest = spec.partition(":")
    if kind == "file":
        path, *more = rest.split(",")
        if not path:
            raise GuestError(f"chardev {spec!r}: missing path")
        o = _opts(more)
        return FileBackend(path, append=_onoff(o.get("append"), False))
    if kind == "unix":
        path, *more = rest.split(",")
        if not path:
            raise GuestError(f"chardev {spec!r}: missing path")
        o = _opts(more)
        if "nowait" in o:  # legacy spelling: server,nowait
            o["wait"] = "off"
        if not _onoff(o.get("server"), False):
            raise GuestError(f"chardev {spec!r}: only server=on is supported")
        if _onoff(o.get("wait"), True):
            raise GuestError(f"chardev {spec!r}: only wait=off is supported")
        return UnixServerBackend(path)
    raise GuestError(f"unsupported chardev spec {spec!r}")
