"""Migration URIs (tcp:, unix:, fd:, file:) and the connections they open.

A Channel is what the engine writes to and reads from: a socket (bidirectional, so it carries a
return path) or a file (one way). With a TLS endpoint (livemig.tls), every socket is wrapped in
a TlsChannel, same interface, once its handshake succeeded.
"""
from __future__ import annotations

import os
import socket
import stat
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import TransportError
from .gilcalls import send_some

if TYPE_CHECKING:
    from .tls import TlsEndpoint


@dataclass(frozen=True)
class URI:
    scheme: str  # tcp | unix | fd | file
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    offset: int = 0

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        if self.scheme == "fd":
            return f"fd:{self.fd}"
        if self.scheme == "file" and self.offset:
            return f"file:{self.path},offset={self.offset}"
        return f"{self.scheme}:{self.path}"


def _number(s: str) -> bool:
    """1..20 ASCII decimal digits (str.isdigit() also accepts '²', which int() refuses, and int()
    refuses strings of more than 4300 digits)."""
    return 0 < len(s) <= 20 and s.isascii() and s.isdigit()


def parse_uri(uri: str) -> URI:
    """Parse a QEMU migration URI; raises TransportError with a usable message."""
    if not isinstance(uri, str) or ":" not in uri:
        raise TransportError(f"Invalid migration URI '{uri}': expected tcp:HOST:PORT, unix:PATH, fd:N or file:PATH")
    scheme, rest = uri.split(":", 1)
    if scheme == "tcp":
        host, sep, port = rest.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not _number(port) or int(port) > 65535:
            raise TransportError(f"Invalid tcp address '{rest}': expected HOST:PORT")
        return URI("tcp", host=host, port=int(port))
    if scheme == "unix":
        if not rest:
            raise TransportError("unix: migration URI needs a path")
        return URI("unix", path=rest)
    if scheme == "fd":
        if not _number(rest):
            raise TransportError(f"fd: migration URI needs a file descriptor number, got '{rest}'")
        return URI("fd", fd=int(rest))
    if scheme == "file":
        path, _, opt = rest.partition(",")
        offset = 0
        if opt:
            key, _, val = opt.partition("=")
            if key != "offset" or not _number(val):
                raise TransportError(f"Invalid file: option '{opt}': only offset=N is accepted")
            offset = int(val)
        if not path:
            raise TransportError("file: migration URI needs a path")
        return URI("file", path=path, offset=offset)
    raise TransportError(f"Unsupported migration URI scheme '{scheme}' (livemig speaks tcp:, unix:, fd:, file:)")


class Channel:
    """One migration connection: a socket (with return path) or a one-way file."""

    def __init__(self, sock: socket.socket | None = None, fd: int | None = None):
        self.sock = sock
        self.fd = sock.fileno() if sock is not None else fd
        self.bidirectional = sock is not None

    def sendall(self, data) -> None:
        try:
            if self.sock is not None:
                self.sock.sendall(data)
            else:
                mv = memoryview(data).cast("B")
                while mv:
                    n = os.write(self.fd, mv)
                    mv = mv[n:]
        except OSError as e:
            raise TransportError(f"migration connection failed while sending: {e.strerror or e}") from None

    def send_small(self, data: bytes) -> None:
        """A short message (a page request, one page record): on a plain socket with room, sent
        without giving up the GIL (gilcalls); else, or for the rest, as sendall."""
        if type(self) is Channel and self.sock is not None:
            try:
                n = send_some(self.sock, data)
            except OSError as e:
                raise TransportError(f"migration connection failed while sending: {e.strerror or e}") from None
            if n == len(data):
                return
            data = data[n:]
        self.sendall(data)

    def recv_into(self, buf) -> int:
        try:
            if self.sock is not None:
                return self.sock.recv_into(buf)
            return os.readv(self.fd, [buf])
        except OSError as e:
            raise TransportError(f"migration connection failed while receiving: {e.strerror or e}") from None

    def sendmsg_all(self, bufs: list) -> int:
        """Scatter-gather send of every buffer (sockets only); returns the bytes sent."""
        assert self.sock is not None
        views = [memoryview(b).cast("B") for b in bufs]
        total = sum(v.nbytes for v in views)
        try:
            while views:
                _consume(views, self.sock.sendmsg(views))
        except OSError as e:
            raise TransportError(f"migration connection failed while sending: {e.strerror or e}") from None
        return total

    def recv_exact_into(self, bufs: list) -> bool:
        """Fill every buffer from the socket, in order. False on EOF before the first byte;
        EOF later is an error (a record cut short)."""
        assert self.sock is not None
        views = [memoryview(b).cast("B") for b in bufs]
        got = 0
        try:
            while views:
                # the kernel waits for all of them (one call, not one per arriving segment); it
                # returns less only at EOF, on a shutdown or a signal
                n = self.sock.recvmsg_into(views, 0, socket.MSG_WAITALL)[0]
                if n == 0:
                    if got == 0:
                        return False
                    raise TransportError("migration connection closed in the middle of a packet")
                got += n
                _consume(views, n)
        except OSError as e:
            raise TransportError(f"migration connection failed while receiving: {e.strerror or e}") from None
        return True

    def peek(self, n: int, timeout: float) -> bytes:
        """The first `n` bytes the peer sent, left in the socket (how channels are told apart)."""
        assert self.sock is not None
        deadline = time.monotonic() + timeout
        try:
            while True:
                self.sock.settimeout(max(deadline - time.monotonic(), 0.001))
                data = self.sock.recv(n, socket.MSG_PEEK | socket.MSG_WAITALL)
                if len(data) >= n or not data:
                    break
                if time.monotonic() >= deadline:  # a unix socket's peek returns what is there
                    raise socket.timeout
                time.sleep(0.005)
        except socket.timeout:
            raise TransportError(f"a migration connection sent nothing for {timeout:.0f} s" if n <= 4 else
                                 f"a migration connection sent less than {n} bytes in {timeout:.0f} s") from None
        except OSError as e:
            raise TransportError(f"migration connection failed while receiving: {e.strerror or e}") from None
        finally:
            self.sock.settimeout(None)
        return data

    def shutdown(self) -> None:
        """Unblock any thread stuck in send/recv on this channel."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def shutdown_write(self, wait: bool = True) -> None:
        """No more data from us (the peer reads EOF once it has drained what was sent); a send
        blocked meanwhile fails. `wait`: see TlsChannel (plain sockets never wait)."""
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self) -> None:
        try:
            if self.sock is not None:
                self.sock.close()
            elif self.fd is not None:
                os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def _consume(views: list[memoryview], n: int) -> None:
    """Drop the first `n` bytes of a scatter-gather list (what one sendmsg/recvmsg_into moved)."""
    while views and n >= views[0].nbytes:
        n -= views[0].nbytes
        views.pop(0)
    if n:
        views[0] = views[0][n:]


def _tune(sock: socket.socket) -> socket.socket:
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for opt in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        except OSError:
            pass
    return sock


def connect(uri: URI, timeout: float = 30.0, tls: TlsEndpoint | None = None) -> Channel:
    """Open the outgoing side of a migration; with `tls`, a TLS client channel (handshake done)."""
    chan = _connect(uri, timeout)
    if tls is None:
        return chan
    if chan.sock is None:
        chan.close()
        raise TransportError(f"TLS needs a socket: '{uri}' is not one")
    return tls.wrap(chan.sock, uri.host if uri.scheme == "tcp" else "")


def _connect(uri: URI, timeout: float) -> Channel:
    try:
        if uri.scheme == "tcp":
            sock = socket.create_connection((uri.host, uri.port), timeout=timeout)
            sock.settimeout(None)
            return Channel(_tune(sock))
        if uri.scheme == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(uri.path)
            sock.settimeout(None)
            return Channel(_tune(sock))
        if uri.scheme == "fd":
            return _from_fd(uri.fd)
        if uri.scheme == "file":
            fd = os.open(uri.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            if uri.offset:
                os.lseek(fd, uri.offset, os.SEEK_SET)
            return Channel(fd=fd)
    except OSError as e:
        raise TransportError(f"Failed to connect to '{uri}': {e.strerror or e}") from None
    raise TransportError(f"cannot connect to {uri}")


def _from_fd(fd: int) -> Channel:
    try:
        st = os.fstat(fd)
    except OSError:
        raise TransportError(f"fd {fd} is not an open file descriptor") from None
    if stat.S_ISSOCK(st.st_mode):
        return Channel(_tune(socket.socket(fileno=fd)))
    return Channel(fd=fd)


class Listener:
    """The incoming side: bound at once (so the address is known), accepting one connection later."""

    def __init__(self, uri: URI, tls: TlsEndpoint | None = None):
        self.uri = uri
        self.tls = tls  # every accepted connection is a TLS server channel
        self.sock: socket.socket | None = None
        self.fd: int | None = None
        self._inode: tuple[int, int] | None = None  # a unix socket file's, while it is ours
        try:
            if uri.scheme == "tcp":
                self.sock = socket.create_server((uri.host, uri.port), reuse_port=False,
                                                 family=socket.AF_INET6 if ":" in uri.host else socket.AF_INET)
            elif uri.scheme == "unix":
                if os.path.exists(uri.path) and stat.S_ISSOCK(os.stat(uri.path).st_mode):
                    os.unlink(uri.path)
                self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self.sock.bind(uri.path)
                self.sock.listen(16)
                st = os.stat(uri.path)
                self._inode = (st.st_dev, st.st_ino)  # close() unlinks the path only while it is this
            elif uri.scheme == "fd":
                self.fd = uri.fd
                os.fstat(uri.fd)
            elif uri.scheme == "file":
                self.fd = os.open(uri.path, os.O_RDONLY | os.O_CLOEXEC)
                if uri.offset:
                    os.lseek(self.fd, uri.offset, os.SEEK_SET)
            else:
                raise TransportError(f"cannot listen on {uri}")
        except OSError as e:
            raise TransportError(f"Failed to listen on '{uri}': {e.strerror or e}") from None
        self.address: dict | None = None  # QEMU's socket-address shape for query-migrate
        if self.sock is not None and uri.scheme == "tcp":
            host, port = self.sock.getsockname()[:2]
            self.address = {"type": "inet", "host": host, "port": str(port)}
        elif self.sock is not None:
            self.address = {"type": "unix", "path": uri.path}

    def accept(self, keep_open: bool = False, timeout: float | None = None) -> Channel:
        """The next connection (with TLS: once its handshake succeeded); the listening socket
        closes unless `keep_open` (more channels will follow: multifd, postcopy-preempt)."""
        if self.fd is not None:
            chan = _from_fd(self.fd) if self.uri.scheme == "fd" else Channel(fd=self.fd)
            if self.tls is not None:
                if chan.sock is None:
                    chan.close()
                    raise TransportError(f"TLS needs a socket: '{self.uri}' is not one")
                return self.tls.wrap(chan.sock)
            return chan
        if self.sock is None:
            raise TransportError("the migration listener is closed")
        try:
            self.sock.settimeout(timeout)
            conn, _ = self.sock.accept()
            conn.settimeout(None)
        except socket.timeout:
            raise TransportError(f"no connection within {timeout:.0f} s") from None
        except OSError as e:
            raise TransportError(f"accepting the migration connection failed: {e.strerror or e}") from None
        finally:
            if not keep_open:
                self.close_socket()
        if self.tls is not None:
            return self.tls.wrap(_tune(conn))
        return Channel(_tune(conn))

    def close_socket(self) -> None:
        """Once: a later listener may own the same unix path by then."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            if self.uri.scheme == "unix":
                try:
                    st = os.stat(self.uri.path)
                    if (st.st_dev, st.st_ino) == self._inode:
                        os.unlink(self.uri.path)
                except OSError:
                    pass

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.close_socket()
