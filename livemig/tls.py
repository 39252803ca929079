"""TLS on the migration channels, QEMU's model: `tls-creds-x509` objects (a directory of PEM files,
an endpoint, verify-peer), the `tls-creds` / `tls-hostname` parameters, and a Channel that
encrypts every migration connection (main, return path, postcopy-preempt, multifd, recovery).

Why not ssl.SSLSocket: the main channel is used from two threads at once (the source's migration
thread writes while its return-path thread reads; the destination's loader reads while other
threads write replies), and one OpenSSL SSL object must never be used by two threads at a time;
SSLSocket has no lock. TlsChannel drives an ssl.SSLObject over two memory BIOs: one lock guards
the SSLObject, the socket I/O happens outside it, and a send lock, taken before the SSLObject lock
is released, puts the TLS records on the socket in the order they were made.
"""
from __future__ import annotations

import os
import re
import select
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

from .errors import MigrationError, TransportError
from .transport import Channel

CREDS_TYPE = "tls-creds-x509"
HANDSHAKE_TIMEOUT_S = 10.0  # a silent or plaintext peer fails the handshake after this long
DRAIN_S = 1.0  # after a failed handshake the server reads this long so its alert is not lost to a reset
CHUNK = 256 << 10  # plaintext encrypted per step, ciphertext read per socket call
_ID = re.compile(r"[A-Za-z][A-Za-z0-9._-]*\Z")
_NOT_TLS = {"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "HTTPS_PROXY_REQUEST", "UNKNOWN_PROTOCOL",
            "RECORD_LAYER_FAILURE", "PACKET_LENGTH_TOO_LONG", "UNSUPPORTED_PROTOCOL", "WRONG_SSL_VERSION",
            "RECORD_LENGTH_MISMATCH", "UNEXPECTED_MESSAGE"}


class TlsError(TransportError):
    """A TLS handshake or record failed (a plaintext peer, an untrusted certificate, a bad record)."""


# ----------------------------------------------------------------------------- credentials
class TlsCredsX509:
    """A `tls-creds-x509` object: QEMU's directory layout, loaded (and checked) when created.

    `dir` holds ca-cert.pem and, for endpoint=server, server-cert.pem + server-key.pem; for
    endpoint=client, client-cert.pem + client-key.pem are optional (needed when the server has
    verify-peer=on). verify-peer=on (the default): a server requires and verifies a client
    certificate; a client verifies the server's certificate and its host name."""

    def __init__(self, id: str, dir: str, endpoint: str = "client", verify_peer: bool = True):
        if not isinstance(id, str) or not _ID.match(id):
            raise MigrationError(f"Parameter 'id' expects an identifier, got '{id}'")
        if endpoint not in ("server", "client"):
            raise MigrationError(f"Parameter 'endpoint' does not accept value '{endpoint}'")
        self.id, self.dir, self.endpoint, self.verify_peer = id, dir, endpoint, verify_peer
        self.context = self._load()

    def _load(self) -> ssl.SSLContext:
        d = Path(self.dir)
        server = self.endpoint == "server"
        if (d / "ca-crl.pem").exists():
            raise MigrationError(f"{d / 'ca-crl.pem'}: certificate revocation lists are not supported by livemig")
        ca, cert, key = d / "ca-cert.pem", d / f"{self.endpoint}-cert.pem", d / f"{self.endpoint}-key.pem"
        own = server or cert.exists() or key.exists()  # a client's own certificate is optional
        for path in [ca] + ([cert, key] if own else []):
            try:
                with open(path, "rb"):
                    pass
            except OSError as e:
                raise MigrationError(f"Unable to access credentials {path}: {e.strerror}") from None
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)  # the read side never has to write
        try:
            ctx.load_verify_locations(cafile=str(ca))
            if own:
                ctx.load_cert_chain(str(cert), str(key))
        except (ssl.SSLError, ValueError) as e:
            raise MigrationError(f"Unable to load TLS credentials from {d}: {getattr(e, 'reason', None) or e}") from None
        if server:
            ctx.verify_mode = ssl.CERT_REQUIRED if self.verify_peer else ssl.CERT_NONE
            ctx.num_tickets = 0  # no session resumption: nothing follows the handshake but data
        elif not self.verify_peer:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx

    def describe(self) -> dict:
        return {"id": self.id, "qom-type": CREDS_TYPE, "dir": self.dir, "endpoint": self.endpoint,
                "verify-peer": self.verify_peer}


_OBJECT_KEYS = {"qom-type", "id", "dir", "endpoint", "verify-peer"}
_BOOLS = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def create_object(props: dict) -> TlsCredsX509:
    """An object from QMP `object-add` arguments (qom-type, id, and the type's properties)."""
    qom_type = props.get("qom-type")
    if qom_type != CREDS_TYPE:
        raise MigrationError(f"invalid object type: {qom_type} (livemig knows {CREDS_TYPE})")
    for key in props:
        if key not in _OBJECT_KEYS:
            raise MigrationError(f"Property '{CREDS_TYPE}.{key}' not found")
    for key in ("id", "dir"):
        if key not in props:
            raise MigrationError(f"Parameter '{key}' is missing")
        if not isinstance(props[key], str):
            raise MigrationError(f"Invalid parameter type for '{key}', expected: string")
    verify = props.get("verify-peer", True)
    if isinstance(verify, str):
        if verify not in _BOOLS:
            raise MigrationError(f"Parameter 'verify-peer' expects 'on' or 'off', got '{verify}'")
        verify = _BOOLS[verify]
    if not isinstance(verify, bool):
        raise MigrationError("Invalid parameter type for 'verify-peer', expected: boolean")
    return TlsCredsX509(props["id"], props["dir"], props.get("endpoint", "client"), verify)


def parse_object(spec: str) -> TlsCredsX509:
    """An object from a `--object` option: 'tls-creds-x509,id=tls0,dir=DIR,endpoint=server'
    (',,' is a literal comma; 'qom-type=TYPE' may replace the leading type)."""
    parts, cur, i = [], [], 0
    while i < len(spec):
        if spec[i] == "," and spec[i + 1:i + 2] == ",":
            cur.append(",")
            i += 2
            continue
        if spec[i] == ",":
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(spec[i])
        i += 1
    parts.append("".join(cur))
    props: dict = {}
    if parts and "=" not in parts[0]:
        props["qom-type"] = parts.pop(0)
    for part in parts:
        key, sep, value = part.partition("=")
        if not sep:
            raise MigrationError(f"Invalid object option '{part}' in '{spec}': expected KEY=VALUE")
        props[key] = value
    return create_object(props)


# ----------------------------------------------------------------------------- endpoints
class TlsEndpoint:
    """This side's TLS for one migration: the credentials and, for a client, the name the
    server's certificate must carry (tls-hostname; else the host of the tcp: URI, as QEMU)."""

    def __init__(self, creds: TlsCredsX509, hostname: str = ""):
        self.creds = creds
        self.hostname = hostname

    @property
    def server(self) -> bool:
        return self.creds.endpoint == "server"

    def check_host(self, host: str) -> None:
        """A client needs a host name to check the server's certificate against."""
        if not self.server and self.creds.verify_peer and not (self.hostname or host):
            raise TlsError("No hostname for certificate validation: set the tls-hostname parameter "
                           "(a unix: or fd: URI carries no host name)")

    def wrap(self, sock: socket.socket, host: str = "") -> "TlsChannel":
        """Run the handshake on a connected socket (closed on failure); raises TlsError."""
        try:
            if self.server:
                return TlsChannel(sock, self.creds.context, server_side=True)
            self.check_host(host)
            return TlsChannel(sock, self.creds.context, server_side=False,
                              server_hostname=(self.hostname or host) or None)
        except BaseException:
            sock.close()
            raise


def describe_ssl_error(e: ssl.SSLError) -> str:
    """A message a user can act on, from an OpenSSL error."""
    reason = getattr(e, "reason", None) or ""
    if isinstance(e, ssl.SSLCertVerificationError):
        return (f"certificate verify failed: {e.verify_message} (is the peer's certificate signed by the CA "
                "in ca-cert.pem, and made for this host name?)")
    if isinstance(e, ssl.SSLEOFError) or reason == "UNEXPECTED_EOF_WHILE_READING":
        return "the peer closed the connection (is the peer using TLS?)"
    if "ALERT_" in reason:
        alert = reason.split("ALERT_", 1)[1].lower().replace("_", " ")
        what = "our certificate" if "certificate" in alert or alert == "unknown ca" else "the connection"
        return f"the peer refused {what} (TLS alert: {alert})"
    if reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
        return "the peer sent no certificate (verify-peer=on here: the client needs client-cert.pem)"
    if reason in _NOT_TLS:
        return f"{reason.lower().replace('_', ' ')} (is the peer using TLS?)"
    return reason.lower().replace("_", " ") if reason else str(e)


# ----------------------------------------------------------------------------- the channel
class TlsChannel(Channel):
    """A migration connection over TLS, usable from one reader and any writers at once.

    Locks: `_lock` guards the SSLObject and its BIOs (never held during socket I/O); `_send_lock`
    is held by a writer from encryption until its records are on the socket, so records leave in
    the order they were made (a writer takes it before `_lock`, never while holding `_lock`);
    `_recv_lock` admits one reader at a time.
    Ciphertext the read side makes (post-handshake messages, the answer to close_notify) is sent
    without blocking if the send lock is free, else left for the next send: a reader never waits
    for a writer, nor for the peer to read.
    A connection the peer cuts without close_notify is an error, except after our own shutdown()."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext, server_side: bool,
                 server_hostname: str | None = None, timeout: float = HANDSHAKE_TIMEOUT_S):
        super().__init__(sock)
        sock.setblocking(True)
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._ssl = ctx.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._recv_lock = threading.Lock()
        self._pending = bytearray()  # decrypted by peek(), not consumed yet
        self._rbuf = bytearray(CHUNK)
        self._aborted = False
        self._deferred: TransportError | None = None  # a read error that follows bytes already returned
        self._unsent = b""  # ciphertext of the read side that did not fit the socket yet (under _send_lock)
        self._handshake(server_side, timeout)

    # -- handshake (one thread, before the channel is shared)
    def _handshake(self, server_side: bool, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    self._ssl.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    self.sock.sendall(self._out.read())
                    data = self._recv_raw(deadline, f"no TLS handshake from the peer within {timeout:.0f} s")
                    if data:
                        self._in.write(data)
                    else:
                        self._in.write_eof()
            self.sock.sendall(self._out.read())
        except ssl.SSLError as e:
            try:  # the alert tells the peer why
                self.sock.sendall(self._out.read())
            except OSError:
                pass
            if server_side:
                self._drain()
            raise TlsError(f"TLS handshake failed: {describe_ssl_error(e)}") from None
        except TransportError as e:  # a timeout or a broken socket
            raise TlsError(f"TLS handshake failed: {e} (is the peer using TLS?)") from None
        except OSError as e:
            raise TlsError(f"TLS handshake failed: {e.strerror or e} (is the peer using TLS?)") from None

    def _drain(self) -> None:
        """Read and drop what the peer still sends for a moment: closing with unread data would
        reset the connection, and the peer could lose the alert that says why it was refused."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            deadline = time.monotonic() + DRAIN_S
            while (left := deadline - time.monotonic()) > 0:
                if not self._readable(left) or not self.sock.recv(CHUNK):
                    return
        except OSError:
            return

    # -- raw socket I/O (outside _lock)
    def _readable(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the socket to be readable (poll: no FD_SETSIZE limit)."""
        poller = select.poll()
        poller.register(self.sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(max(int(timeout * 1000), 1)))

    def _recv_raw(self, deadline: float | None, timeout_msg: str = "") -> memoryview | None:
        """Ciphertext from the socket: b'' at EOF; with a deadline, TransportError when it passes;
        with deadline -1, None at once if nothing is waiting."""
        flags = 0
        if deadline == -1:
            flags = socket.MSG_DONTWAIT
        elif deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not self._readable(left):
                raise TransportError(timeout_msg)
        try:
            n = self.sock.recv_into(self._rbuf, CHUNK, flags)
        except BlockingIOError:
            return None
        except OSError as e:
            if self._aborted:
                return memoryview(b"")
            raise TransportError(f"migration connection failed while receiving: {e.strerror or e}") from None
        return memoryview(self._rbuf)[:n]

    def _take_output(self) -> bytes | None:
        """Under _lock: ciphertext the read side made (or left unsent before), with the send lock
        taken to send it; None if there is none or a writer has the send lock (the writer, or the
        next one, sends it ahead of its own records)."""
        if (self._out.pending or self._unsent) and self._send_lock.acquire(blocking=False):
            return self._out.read()
        return None

    def _send_output_nowait(self, data: bytes) -> None:
        """Send what _take_output returned without blocking (a reader must never wait for the
        peer to read); what does not fit now goes first with the next send. Releases the send lock."""
        try:
            data = self._unsent + data
            try:
                n = self.sock.send(data, socket.MSG_DONTWAIT) if data else 0
            except BlockingIOError:
                n = 0
            except OSError:
                n = len(data)  # the write side is broken: the next send says so
            self._unsent = data[n:]
        finally:
            self._send_lock.release()

    def _send_taken(self, data: bytes) -> None:
        """A writer's ciphertext (after any left by the read side), then let the next sender go."""
        try:
            if self._unsent:
                self.sock.sendall(self._unsent)
                self._unsent = b""
            self.sock.sendall(data)
        except OSError as e:
            raise TransportError(f"migration connection failed while sending: {e.strerror or e}") from None
        finally:
            self._send_lock.release()

    # -- writing
    def _encrypt_and_send(self, pieces: list[memoryview]) -> None:
        # the send lock first, the SSLObject lock only while encrypting: a writer waiting for a
        # writer stuck on a full socket never holds the lock the reader needs
        self._send_lock.acquire()
        try:
            with self._lock:
                for p in pieces:
                    while p.nbytes:
                        p = p[self._ssl.write(p):]
                data = self._out.read()
        except ssl.SSLError as e:
            self._send_lock.release()
            raise TlsError(f"TLS: {describe_ssl_error(e)}") from None
        except BaseException:
            self._send_lock.release()
            raise
        self._send_taken(data)

    def _send_views(self, views: list[memoryview]) -> None:
        batch: list[memoryview] = []
        size = 0
        for v in views:
            for off in range(0, v.nbytes, CHUNK):
                piece = v[off:off + CHUNK]
                batch.append(piece)
                size += piece.nbytes
                if size >= CHUNK:
                    self._encrypt_and_send(batch)
                    batch, size = [], 0
        if batch:
            self._encrypt_and_send(batch)

    def sendall(self, data) -> None:
        self._send_views([memoryview(data).cast("B")])

    def sendmsg_all(self, bufs: list) -> int:
        """Encrypt every buffer in order (each one straight from its memory, no joining copy)."""
        views = [memoryview(b).cast("B") for b in bufs]
        self._send_views(views)
        return sum(v.nbytes for v in views)

    # -- reading
    def _decrypt(self, view: memoryview, deadline: float | None = None, timeout_msg: str = "") -> int:
        """Plaintext into `view`: blocks until some is there, then takes whatever more is already
        readable without blocking (as a socket recv does); 0 at the end of the stream. An error
        after some bytes is raised by the next call, so those bytes are not lost."""
        if self._deferred is not None:
            raise self._deferred
        total = 0
        while total < view.nbytes:
            error: TransportError | None = None
            with self._lock:
                try:
                    n = self._ssl.read(view.nbytes - total, view[total:])
                except ssl.SSLWantReadError:
                    n = -1
                except ssl.SSLZeroReturnError:
                    n = 0  # close_notify: a clean end
                except ssl.SSLEOFError:
                    n = 0
                    if not self._aborted:
                        error = TransportError("the migration connection was cut (closed without TLS close_notify)")
                except ssl.SSLError as e:
                    n = 0
                    error = TlsError(f"TLS: {describe_ssl_error(e)}")
                out = self._take_output()
            if out is not None:
                self._send_output_nowait(out)
            if error is not None:
                if not total:
                    raise error
                self._deferred = error
                break
            if n > 0:
                total += n
                continue
            if n == 0:
                break
            data = self._recv_raw(-1 if total else deadline, timeout_msg)
            if data is None:
                break
            with self._lock:
                if data.nbytes:
                    self._in.write(data)
                else:
                    self._in.write_eof()
        return total

    def _read(self, view: memoryview) -> int:
        if self._pending:
            n = min(len(self._pending), view.nbytes)
            view[:n] = self._pending[:n]
            del self._pending[:n]
            return n
        return self._decrypt(view)

    def recv_into(self, buf) -> int:
        view = memoryview(buf).cast("B")
        if not view.nbytes:
            return 0
        with self._recv_lock:
            return self._read(view)

    def recv_exact_into(self, bufs: list) -> bool:
        """Decrypt straight into every buffer, in order. False on EOF before the first byte; EOF
        later is an error (a record cut short)."""
        got = 0
        with self._recv_lock:
            for b in bufs:
                v = memoryview(b).cast("B")
                off = 0
                while off < v.nbytes:
                    n = self._read(v[off:])
                    if n == 0:
                        if got == 0:
                            return False
                        raise TransportError("migration connection closed in the middle of a packet")
                    off += n
                    got += n
        return True

    def peek(self, n: int, timeout: float) -> bytes:
        """The first `n` plaintext bytes, kept for the next reads (how channels are told apart)."""
        deadline = time.monotonic() + timeout
        with self._recv_lock:
            while len(self._pending) < n:
                tmp = bytearray(n - len(self._pending))
                k = self._decrypt(memoryview(tmp), deadline, f"a migration connection sent nothing for {timeout:.0f} s")
                if k == 0:
                    break
                self._pending += tmp[:k]
            return bytes(self._pending[:n])

    # -- ending
    def shutdown(self) -> None:
        """Abort: unblock any thread stuck in send/recv (the peer sees the connection cut)."""
        self._aborted = True
        super().shutdown()

    def shutdown_write(self, wait: bool = True) -> None:
        """No more data from us: close_notify, then the socket's write side. `wait=False` (a
        cancel): never block; if a send is under way, or close_notify does not fit the socket,
        the write side just closes, and the blocked send fails as on a plain socket."""
        if not self._send_lock.acquire(blocking=wait):
            super().shutdown_write()
            return
        try:
            with self._lock:
                try:
                    self._ssl.unwrap()
                except ssl.SSLError:
                    pass  # close_notify is written; the peer's own is not awaited
                data = self._unsent + self._out.read()
                self._unsent = b""
            try:
                if wait:
                    self.sock.sendall(data)
                elif data:
                    self.sock.send(data, socket.MSG_DONTWAIT)
            except OSError:
                pass
        finally:
            self._send_lock.release()
        super().shutdown_write()

    def close(self) -> None:
        """Close; unless aborted, tell the peer with close_notify first (best effort, never blocks)."""
        if not self._aborted and self.sock is not None and self.fd is not None \
                and self._lock.acquire(blocking=False):
            try:
                if self._send_lock.acquire(blocking=False):
                    try:
                        try:
                            self._ssl.unwrap()
                        except (ssl.SSLError, ValueError):
                            pass
                        data = self._unsent + self._out.read()
                        if data:
                            self.sock.send(data, socket.MSG_DONTWAIT)
                    except OSError:
                        pass
                    finally:
                        self._send_lock.release()
            finally:
                self._lock.release()
        super().close()


# ----------------------------------------------------------------------------- throw-away certificates
def make_test_pki(root: str | os.PathLike, names: tuple[str, ...] = ("localhost", "127.0.0.1"),
                  ca_name: str = "livemig test CA") -> Path:
    """A throw-away CA and a server and a client certificate signed by it, made with the openssl
    command (for tests, benchmarks and the demo). Returns `root`, which then holds QEMU's layout
    for both endpoints: ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem,
    client-key.pem (and ca-key.pem). The server certificate is valid for `names`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    def run(*args: str) -> None:
        try:
            subprocess.run(["openssl", *args], cwd=root, check=True, capture_output=True)
        except FileNotFoundError:
            raise MigrationError("the openssl command is needed to make certificates (apt-get install openssl)") from None
        except subprocess.CalledProcessError as e:
            raise MigrationError(f"openssl {args[0]} failed: {e.stderr.decode(errors='replace').strip()}") from None

    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    run("req", "-x509", *key, "-keyout", "ca-key.pem", "-out", "ca-cert.pem", "-days", "30",
        "-subj", f"/CN={ca_name}", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    alt = ",".join(("IP:" if re.fullmatch(r"[0-9.]+|.*:.*", n) else "DNS:") + n for n in names)
    for role, usage in (("server", "serverAuth"), ("client", "clientAuth")):
        ext = root / f"{role}.ext"
        ext.write_text(f"basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n"
                       f"extendedKeyUsage={usage}\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
                       + (f"subjectAltName={alt}\n" if role == "server" else ""))
        run("req", *key, "-keyout", f"{role}-key.pem", "-out", f"{role}.csr", "-subj", f"/CN={names[0]}")
        run("x509", "-req", "-in", f"{role}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-out", f"{role}-cert.pem", "-days", "30", "-extfile", ext.name)
        (root / f"{role}.csr").unlink()
        ext.unlink()
    for f in root.glob("*-key.pem"):
        f.chmod(0o600)
    return root
