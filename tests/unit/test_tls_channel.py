"""TlsChannel and tls-creds-x509 over real socket pairs and real certificates (a throw-away CA made
with the openssl command): handshakes, full-duplex use from several threads, zero-copy
scatter/gather, peek, clean and cut ends, and every refusal with its message."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from livemig.errors import MigrationError, TransportError
from livemig.tls import TlsChannel, TlsCredsX509, TlsEndpoint, TlsError, make_test_pki, parse_object


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """Two CAs: 'good' (the one both sides trust) and 'other' (a stranger's)."""
    root = tmp_path_factory.mktemp("pki")
    return {"good": make_test_pki(root / "good"), "other": make_test_pki(root / "other", ca_name="other CA")}


def endpoint(d: Path, role: str, hostname: str = "localhost", verify: bool = True) -> TlsEndpoint:
    return TlsEndpoint(TlsCredsX509(f"tls-{role}", str(d), role, verify), hostname if role == "client" else "")


def tls_pair(server: TlsEndpoint, client: TlsEndpoint) -> tuple[TlsChannel, TlsChannel]:
    """Handshake both ends of a socket pair (the server in a thread); raise what the client raised,
    else what the server raised."""
    a, b = socket.socketpair()
    out: dict = {}

    def serve() -> None:
        try:
            out["server"] = server.wrap(a)
        except Exception as e:
            out["server_error"] = e
    t = threading.Thread(target=serve)
    t.start()
    try:
        out["client"] = client.wrap(b)
    except Exception as e:
        out["client_error"] = e
    t.join(30)
    for side in ("client", "server"):
        if f"{side}_error" in out:
            for c in (out.get("server"), out.get("client")):
                if c is not None:
                    c.close()
            raise out[f"{side}_error"]
    return out["server"], out["client"]


BLOCK, REPLY = 4096, 40


def _blocks(n: int) -> bytes:
    """n 4 KiB blocks: 'BIG!', the block number, then pseudo-random bytes."""
    body = np.random.default_rng(1).integers(0, 256, (n, BLOCK), dtype=np.uint8)
    body[:, :4] = np.frombuffer(b"BIG!", np.uint8)
    body[:, 4:8] = np.arange(n, dtype=">u4").view(np.uint8).reshape(n, 4)
    return body.tobytes()


def _replies(n: int) -> bytes:
    return b"".join(b"RPL!" + i.to_bytes(4, "big") + bytes(REPLY - 8) for i in range(n))


def _split(data: bytes) -> tuple[bytes, bytes]:
    """Undo the interleaving of the two senders (each write arrives whole, at write boundaries)."""
    big, small = bytearray(), bytearray()
    i = 0
    while i < len(data):
        if data[i:i + 4] == b"BIG!":
            big += data[i:i + BLOCK]
            i += BLOCK
        else:
            assert data[i:i + 4] == b"RPL!", f"garbage at {i}"
            small += data[i:i + REPLY]
            i += REPLY
    return bytes(big), bytes(small)


def test_full_duplex_from_several_threads(pki):
    """On each side one thread streams 48 MiB while another sends 20000 small replies on the same
    channel and a third reads: every write arrives whole and in order, both ways."""
    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    big, small = _blocks(12288), _replies(20000)
    got = {"srv": bytearray(), "cli": bytearray()}
    errors: list[BaseException] = []

    def guard(fn, *args) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return threading.Thread(target=run)

    def stream(ch: TlsChannel) -> None:
        mv = memoryview(big)
        for off in range(0, len(mv), 1 << 20):
            ch.sendall(mv[off:off + (1 << 20)])

    def replies(ch: TlsChannel) -> None:
        for off in range(0, len(small), REPLY):
            ch.sendall(small[off:off + REPLY])

    def read(ch: TlsChannel, into: bytearray) -> None:
        buf = bytearray(1 << 20)
        while len(into) < len(big) + len(small):
            k = ch.recv_into(buf)
            assert k, "EOF too early"
            into += buf[:k]

    threads = [guard(f, ch) for ch in (srv, cli) for f in (stream, replies)]
    threads += [guard(read, srv, got["srv"]), guard(read, cli, got["cli"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    for side in ("srv", "cli"):
        b, r = _split(bytes(got[side]))
        assert hashlib.sha256(b).digest() == hashlib.sha256(big).digest()
        assert r == small
    srv.close()
    cli.close()


def test_scatter_gather_of_guest_pages_and_peek(pki):
    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    mem = np.random.default_rng(2).integers(0, 256, (300, 4096), dtype=np.uint8)
    dst = np.zeros_like(mem)
    hdr = b"MFD!" + bytes(60)
    runs = [mem[0:1], mem[5:205], mem[210:300]]
    sent: list[int] = []
    t = threading.Thread(target=lambda: sent.append(cli.sendmsg_all([hdr] + runs)))
    t.start()
    assert srv.peek(4, 5) == b"MFD!"
    assert srv.peek(4, 5) == b"MFD!"  # kept for the next reads
    h = bytearray(64)
    assert srv.recv_exact_into([h, dst[0:1], dst[5:205], dst[210:300]])
    assert bytes(h) == hdr
    assert np.array_equal(dst[:1], mem[:1]) and np.array_equal(dst[5:205], mem[5:205])
    assert np.array_equal(dst[210:], mem[210:]) and not dst[1:5].any()
    t.join()
    assert sent == [64 + 291 * 4096]
    cli.close()  # close_notify: a clean end
    assert srv.recv_exact_into([h]) is False
    assert srv.recv_into(h) == 0
    srv.close()


def test_shutdown_write_is_a_clean_end_and_a_cut_is_an_error(pki):
    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    cli.sendall(b"last words")
    cli.shutdown_write()
    buf = bytearray(100)
    assert srv.recv_into(buf) == 10 and buf[:10] == b"last words"
    assert srv.recv_into(buf) == 0
    srv.close()
    cli.close()

    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    cli.sendall(b"half a rec")
    cli.sock.shutdown(socket.SHUT_RDWR)  # no close_notify: someone cut the connection
    assert srv.recv_into(buf) == 10
    with pytest.raises(TransportError, match="cut"):
        srv.recv_into(buf)
    srv.close()
    cli.close()

    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    t = threading.Timer(0.2, srv.shutdown)  # our own abort wakes a blocked reader with EOF
    t.start()
    assert srv.recv_into(buf) == 0
    t.join()
    srv.close()
    cli.close()


def test_plaintext_client_is_refused_with_a_hint(pki):
    a, b = socket.socketpair()
    b.sendall(b"QEVM\x00\x00\x00\x03" + bytes(100))  # a migration stream without TLS
    with pytest.raises(TlsError, match=r"TLS handshake failed: .*is the peer using TLS\?"):
        endpoint(pki["good"], "server").wrap(a)
    assert b.recv(100) in (b"", b"\x15\x03\x03\x00\x02\x02\x46")  # closed, or a protocol_version alert
    b.close()


def test_plaintext_server_is_refused_with_a_hint(pki):
    a, b = socket.socketpair()

    def plaintext_destination() -> None:
        a.recv(4096)  # the ClientHello, read as a bad stream header
        a.close()
    t = threading.Thread(target=plaintext_destination)
    t.start()
    with pytest.raises(TlsError, match=r"TLS handshake failed: .*is the peer using TLS\?"):
        endpoint(pki["good"], "client").wrap(b)
    t.join()


def test_silent_peer_times_out(pki):
    a, b = socket.socketpair()
    creds = TlsCredsX509("s", str(pki["good"]), "server")
    with pytest.raises(TlsError, match="no TLS handshake from the peer within 1 s"):
        TlsChannel(a, creds.context, server_side=True, timeout=1.0)
    b.close()


def test_client_certificate_from_another_ca_is_refused_on_both_sides(pki, tmp_path):
    stranger = tmp_path / "stranger"
    stranger.mkdir()
    shutil.copy(pki["good"] / "ca-cert.pem", stranger)  # trusts the real server ...
    for f in ("client-cert.pem", "client-key.pem"):  # ... but presents a certificate of another CA
        shutil.copy(pki["other"] / f, stranger)
    a, b = socket.socketpair()
    out: dict = {}

    def serve() -> None:
        try:
            endpoint(pki["good"], "server").wrap(a)
        except TlsError as e:
            out["server"] = str(e)
    t = threading.Thread(target=serve)
    t.start()
    try:  # TLS 1.3: the client's handshake ends before the server has checked its certificate
        ch = endpoint(stranger, "client").wrap(b)
        with pytest.raises(TlsError, match="refused our certificate .*alert: unknown ca"):
            ch.recv_into(bytearray(10))
    except TlsError as e:
        assert "unknown ca" in str(e)
    t.join(10)
    assert "certificate verify failed" in out["server"], out


def test_server_certificate_from_another_ca_is_refused(pki, tmp_path):
    with pytest.raises(TlsError, match="certificate verify failed: .*(issuer|self-signed)"):
        tls_pair(endpoint(pki["other"], "server"), endpoint(pki["good"], "client"))


def test_host_name_is_checked(pki):
    with pytest.raises(TlsError, match="Hostname mismatch"):
        tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client", hostname="dst.example"))
    ip = TlsEndpoint(TlsCredsX509("c", str(pki["good"]), "client"))
    srv, cli = tls_pair(endpoint(pki["good"], "server"), _with_host(ip, "127.0.0.1"))  # IP SAN
    srv.close()
    cli.close()
    with pytest.raises(TlsError, match="No hostname for certificate validation"):
        tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client", hostname=""))


def _with_host(ep: TlsEndpoint, host: str) -> TlsEndpoint:
    """The endpoint as connect() uses it for tcp:HOST:PORT (no tls-hostname)."""
    class Tcp(TlsEndpoint):
        def wrap(self, sock, _host=""):
            return super().wrap(sock, host)
    return Tcp(ep.creds, ep.hostname)


def test_verify_peer_off_lets_a_client_without_certificate_in(pki, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(pki["good"] / "ca-cert.pem", bare)
    with pytest.raises(TlsError, match="certificate"):
        srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(bare, "client"))
        cli.recv_into(bytearray(1))
    srv, cli = tls_pair(endpoint(pki["good"], "server", verify=False), endpoint(bare, "client"))
    cli.sendall(b"hi")
    assert srv.peek(2, 5) == b"hi"
    srv.close()
    cli.close()


def test_credentials_objects(pki, tmp_path):
    c = parse_object(f"tls-creds-x509,id=tls0,dir={pki['good']},endpoint=server,verify-peer=off")
    assert (c.id, c.endpoint, c.verify_peer) == ("tls0", "server", False)
    assert parse_object(f"qom-type=tls-creds-x509,id=t1,dir={pki['good']}").endpoint == "client"  # QEMU's default
    comma = tmp_path / "a,b"
    shutil.copytree(pki["good"], comma)
    assert parse_object(f"tls-creds-x509,id=t2,dir={str(comma).replace(',', ',,')},endpoint=server").dir == str(comma)
    with pytest.raises(MigrationError, match="invalid object type: secret"):
        parse_object("secret,id=s0,data=x")
    with pytest.raises(MigrationError, match="Property 'tls-creds-x509.priority' not found"):
        parse_object(f"tls-creds-x509,id=t,dir={pki['good']},priority=NORMAL")
    with pytest.raises(MigrationError, match="Parameter 'endpoint' does not accept value 'both'"):
        parse_object(f"tls-creds-x509,id=t,dir={pki['good']},endpoint=both")
    with pytest.raises(MigrationError, match="expects an identifier"):
        parse_object(f"tls-creds-x509,id=0bad,dir={pki['good']}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MigrationError, match=f"Unable to access credentials {empty}/ca-cert.pem: No such file"):
        parse_object(f"tls-creds-x509,id=t,dir={empty},endpoint=client")
    shutil.copy(pki["good"] / "ca-cert.pem", empty)
    parse_object(f"tls-creds-x509,id=t,dir={empty},endpoint=client")  # a client certificate is optional
    with pytest.raises(MigrationError, match="server-cert.pem: No such file"):
        parse_object(f"tls-creds-x509,id=t,dir={empty},endpoint=server")
    (empty / "ca-crl.pem").write_text("")
    with pytest.raises(MigrationError, match="revocation lists are not supported"):
        parse_object(f"tls-creds-x509,id=t,dir={empty},endpoint=client")
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    for f in ("ca-cert.pem", "server-cert.pem", "server-key.pem"):
        (garbage / f).write_bytes(os.urandom(64))
    with pytest.raises(MigrationError, match="Unable to load TLS credentials"):
        parse_object(f"tls-creds-x509,id=t,dir={garbage},endpoint=server")


def test_a_cancel_closes_the_write_side_while_a_send_is_blocked(pki):
    """migrate_cancel shuts the write side while the migration thread is blocked sending to a peer
    that reads nothing: it must return at once (it runs under the QMP lock) and the send fail,
    as on a plain socket."""
    srv, cli = tls_pair(endpoint(pki["good"], "server"), endpoint(pki["good"], "client"))
    failed = threading.Event()

    def writer() -> None:
        try:
            cli.sendall(b"x" * (64 << 20))  # far more than the socket buffers hold
        except Exception:
            failed.set()
    threading.Thread(target=writer, daemon=True).start()
    threading.Event().wait(0.3)  # the writer is blocked now, holding the send lock
    done = threading.Event()
    threading.Thread(target=lambda: (cli.shutdown_write(wait=False), done.set()), daemon=True).start()
    try:
        assert done.wait(5), "shutdown_write(wait=False) blocked behind the stuck send"
        assert failed.wait(5), "the blocked send did not fail"
    finally:
        cli.shutdown()
        srv.shutdown()
        cli.close()
        srv.close()
