"""TLS on every migration channel, QEMU's model (tls-creds-x509 objects, the tls-creds and
tls-hostname parameters), between real `livemig vm` processes with a throw-away CA made by the
openssl command: precopy, multifd, postcopy with preempt and postcopy recovery over TLS (each with
the integrity check), what a relay sees on the wire, and every refusal (plaintext peer on either
side, a certificate from another CA on either side, bad parameters)."""
from __future__ import annotations

import shutil
import socket
import subprocess
import struct
import sys
import time
from pathlib import Path

import pytest
from qemu.qmp import ExecuteError

from livemig.tls import make_test_pki
from livemig.wire import multifd as WM
from relay import Relay
from vmtools import MiB, assert_migrated, migrate, switch_after_first_pass


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """One directory per endpoint, QEMU's layout. 'client-other-cert' trusts the right CA but
    presents a certificate of another CA; 'client-other-ca' trusts only the other CA."""
    root = tmp_path_factory.mktemp("pki")
    good, other = make_test_pki(root / "good"), make_test_pki(root / "other", ca_name="other CA")

    def layout(name: str, ca: Path, own: Path, role: str) -> Path:
        d = root / name
        d.mkdir()
        shutil.copy(ca / "ca-cert.pem", d)
        for f in (f"{role}-cert.pem", f"{role}-key.pem"):
            shutil.copy(own / f, d)
        return d
    return {"server": layout("server", good, good, "server"), "client": layout("client", good, good, "client"),
            "client-other-cert": layout("client-other-cert", good, other, "client"),
            "client-other-ca": layout("client-other-ca", other, good, "client")}


def _obj(d: Path, endpoint: str) -> list[str]:
    return ["--object", f"tls-creds-x509,id=tls0,dir={d},endpoint={endpoint},verify-peer=on"]


def _pair(vms, pki, memory="128M", ws_mib=16, prefill=True, src_tls=True, dst_tls=True, src_dir="client"):
    src = vms("src", memory=memory, ws_mib=ws_mib, prefill=prefill, extra=_obj(pki[src_dir], "client"))
    dst = vms("dst", memory=memory, incoming="defer", extra=_obj(pki["server"], "server"))
    if src_tls:
        src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    if dst_tls:
        dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    return src, dst


def _refused(src, dst) -> tuple[str, str]:
    """Both sides failed (the destination stays up: exit-on-error off); the source guest runs on.
    Returns both error descriptions."""
    sinfo = src.wait_status({"failed", "completed"}, timeout=30)
    dinfo = dst.wait_status({"failed", "completed"}, timeout=30)
    assert sinfo["status"] == dinfo["status"] == "failed", (sinfo, dinfo)
    n = len(src.output())
    deadline = time.monotonic() + 10
    while len(src.output()) <= n:
        assert time.monotonic() < deadline, "the source guest does not run after the refusal"
        time.sleep(0.05)
    assert src.cmd("query-status")["status"] == "running"
    assert dst.cmd("query-status")["status"] == "inmigrate"
    return sinfo["error-desc"], dinfo["error-desc"]


def _start(src, dst, uri="tcp:127.0.0.1:0", caps=("events",), via: str | None = None):
    capabilities = [{"capability": c, "state": True} for c in caps]
    src.cmd("migrate-set-capabilities", capabilities=capabilities)
    dst.cmd("migrate-set-capabilities", capabilities=capabilities)
    dst.cmd("migrate-incoming", **{"uri": uri, "exit-on-error": False})
    if uri.endswith(":0"):
        uri = f"tcp:127.0.0.1:{dst.cmd('query-migrate')['socket-address'][0]['port']}"
    src.cmd("migrate", uri=via or uri)


def _in_clear(relay: Relay, guest_image: Path) -> list[set[bytes]]:
    """For each connection the relay forwarded (both directions joined), which of the
    migration's recognisable byte strings appear in it: the QEVM magic and version, the RAM block
    name with its length byte (page records, page requests, RECV_BITMAP), the multifd magic and
    version, the device descriptions, the guest's own boot sector (in guest RAM). Each is at least
    7 bytes long: a 4-byte pattern turns up by chance in hundreds of MiB of ciphertext (about
    once in 2**32 bytes), a 7-byte one does not."""
    secrets = (b"QEVM\x00\x00\x00\x03", b"\x06pc.ram", struct.pack(">II", WM.MAGIC, WM.VERSION),
               guest_image.read_bytes()[:64], b'"vmsd_name"')
    seen = [bytes(b) for b in relay.seen]
    return [{s for s in secrets if s in seen[i] or s in seen[i + 1]} for i in range(0, len(seen), 2)]


def _assert_encrypted(relay: Relay, connections: int, guest_image: Path) -> None:
    """Every connection starts with a TLS handshake both ways and shows nothing in clear."""
    assert len(relay.seen) == 2 * connections, [len(b) for b in relay.seen]
    for i, data in enumerate(relay.seen):
        assert bytes(data[:2]) == b"\x16\x03", f"connection {i // 2} does not start with a TLS handshake"
    for i, found in enumerate(_in_clear(relay, guest_image)):
        assert not found, f"{found} in clear on connection {i}"


# --------------------------------------------------------------------- migrations over TLS
def test_precopy_over_tls(vms, pki):
    """tcp:127.0.0.1:PORT without tls-hostname: the server certificate is checked against
    127.0.0.1, the host of the URI (as QEMU does)."""
    src, dst = _pair(vms, pki)
    src.wait_passes(1)
    params = src.cmd("query-migrate-parameters")
    assert (params["tls-creds"], params["tls-hostname"], params["tls-authz"]) == ("tls0", "", "")
    info = migrate(src, dst)
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 128 * MiB, 16)


def test_fd_transport_over_tls(vms, pki):
    """fd: sockets (one socket pair, an end handed to each process): TLS with the host name from
    tls-hostname, since an fd carries none."""
    a, b = socket.socketpair()
    src = vms("src", memory="64M", ws_mib=8, extra=_obj(pki["client"], "client"), pass_fds=(a.fileno(),))
    dst = vms("dst", memory="64M", incoming="defer", extra=_obj(pki["server"], "server"), pass_fds=(b.fileno(),))
    fa, fb = a.fileno(), b.fileno()  # pass_fds keeps the numbers
    a.close(), b.close()
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    dst.cmd("migrate-incoming", uri=f"fd:{fb}")
    with pytest.raises(ExecuteError, match="No hostname for certificate validation"):
        src.cmd("migrate", uri=f"fd:{fa}")
    src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost"})
    src.wait_passes(1)
    src.cmd("migrate", uri=f"fd:{fa}")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 64 * MiB, 8)


def test_multifd_over_tls_and_the_wire_is_encrypted(vms, pki, tmp_path):
    """Main channel, return path and both multifd channels through a recording relay: every
    connection starts with a TLS handshake and nothing of the stream shows: not the QEVM magic,
    not the RAM block name, not the multifd magic, not the guest's own boot sector."""
    src, dst = _pair(vms, pki)
    for vm in (src, dst):
        vm.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost"})  # a unix: URI has no host name
    relay = Relay(tmp_path / "relay.sock", str(tmp_path / "dst.sock"), record=True)
    src.wait_passes(1)
    capabilities = [{"capability": c, "state": True} for c in ("events", "multifd")]
    src.cmd("migrate-set-capabilities", capabilities=capabilities)
    dst.cmd("migrate-set-capabilities", capabilities=capabilities)
    dst.cmd("migrate-incoming", uri=f"unix:{tmp_path}/dst.sock")
    src.cmd("migrate", uri=relay.uri)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert info["ram"]["multifd-bytes"] > 64 * MiB, info
    assert_migrated(src, dst, 128 * MiB, 16)
    relay.close()
    assert sum(len(b) for b in relay.seen) > info["ram"]["transferred"]  # all of it went through here
    _assert_encrypted(relay, 3, tmp_path / "src.img")  # main + 2 multifd


def test_the_wire_check_sees_a_plaintext_migration(vms, pki, tmp_path):
    """The control for the checks above: the same multifd migration without TLS through the
    same recording relay shows every one of the byte strings they look for."""
    src, dst = _pair(vms, pki, src_tls=False, dst_tls=False)
    for vm in (src, dst):
        vm.cmd("migrate-set-parameters", **{"multifd-channels": 2})
    relay = Relay(tmp_path / "relay.sock", str(tmp_path / "dst.sock"), record=True)
    src.wait_passes(1)
    _start(src, dst, uri=f"unix:{tmp_path}/dst.sock", caps=("events", "multifd"), via=relay.uri)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 128 * MiB, 16)
    relay.close()
    found = _in_clear(relay, tmp_path / "src.img")
    assert len(found) == 3, found
    assert len(set().union(*found)) == 5, found
    assert all(found), found


def test_postcopy_with_preempt_over_tls(vms, pki, tmp_path):
    """Through a recording relay: the main and the preempt connection are both TLS."""
    src, dst = _pair(vms, pki, ws_mib=0, prefill=False)
    src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost"})
    relay = Relay(tmp_path / "relay.sock", str(tmp_path / "dst.sock"), record=True)
    src.wait_passes(1)
    _start(src, dst, f"unix:{tmp_path}/dst.sock", ("events", "postcopy-ram", "postcopy-preempt"), via=relay.uri)
    src.wait_status({"active"})
    while src.cmd("query-migrate")["ram"]["dirty-sync-count"] < 2:
        time.sleep(0.02)
    src.cmd("migrate-start-postcopy")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert info["ram"]["postcopy-bytes"] > 0, info
    assert_migrated(src, dst, 128 * MiB, 0)
    relay.close()
    _assert_encrypted(relay, 2, tmp_path / "src.img")


def test_postcopy_recovery_over_tls(vms, pki, tmp_path):
    """The connections (main and preempt) are cut after the switch; the new ones of the
    recovery are TLS too (a recording relay in front of the recovery address), the host name for
    the unix: address coming from tls-hostname set while paused."""
    # prefilled: every page the guest dirties before the switch holds data (a page never touched
    # goes as a 9-byte ZERO record, and a postcopy phase of those alone can end before it is seen)
    src, dst = _pair(vms, pki, ws_mib=0, prefill=True)
    src.wait_passes(1)
    # a slow background push, and a downtime limit precopy cannot meet: it stays in postcopy
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 4 << 20, "downtime-limit": 0})
    dst.cmd("migrate-set-parameters", **{"x-preempt-requests": True})  # requests on the TLS preempt connection
    _start(src, dst, caps=("events", "postcopy-ram", "postcopy-preempt"))
    switch_after_first_pass(src, dst)
    src.cmd("migrate-pause")
    src.wait_status({"postcopy-paused"}, timeout=30)
    dst.wait_status({"postcopy-paused"}, timeout=30)
    dst.cmd("migrate-recover", uri=f"unix:{tmp_path}/recover.sock")
    relay = Relay(tmp_path / "relay.sock", str(tmp_path / "recover.sock"), record=True)
    with pytest.raises(ExecuteError, match="No hostname for certificate validation"):
        src.cmd("migrate", uri=relay.uri, resume=True)
    src.cmd("migrate-set-parameters", **{"tls-hostname": "localhost", "max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=relay.uri, resume=True)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    statuses = [e["data"]["status"] for e in src.events("MIGRATION")]
    assert "postcopy-recover" in statuses, statuses
    assert info["x-livemig-preempt-requests"] > 0, info
    assert_migrated(src, dst, 128 * MiB, 0)
    relay.close()
    _assert_encrypted(relay, 2, tmp_path / "src.img")  # the recovery's main and preempt connections


# --------------------------------------------------------------------- refusals
def test_plaintext_source_is_refused_by_a_tls_destination(vms, pki):
    src, dst = _pair(vms, pki, memory="64M", ws_mib=8, src_tls=False)
    src.wait_passes(1)
    _start(src, dst)
    serr, derr = _refused(src, dst)
    assert "TLS handshake failed" in derr and "is the peer using TLS?" in derr, derr
    assert "a destination with tls-creds set refuses a plaintext source" in serr, serr


def test_tls_source_is_refused_by_a_plaintext_destination(vms, pki):
    src, dst = _pair(vms, pki, memory="64M", ws_mib=8, dst_tls=False)
    src.wait_passes(1)
    _start(src, dst)
    serr, derr = _refused(src, dst)
    assert "TLS handshake failed" in serr and "is the peer using TLS?" in serr, serr
    assert "TLS handshake" in derr and "set tls-creds here too" in derr, derr


@pytest.mark.parametrize("case", ["source cert from another CA", "source trusts another CA"])
def test_certificate_from_another_ca_is_refused(vms, pki, case):
    src_dir = "client-other-cert" if case == "source cert from another CA" else "client-other-ca"
    src, dst = _pair(vms, pki, memory="64M", ws_mib=8, src_dir=src_dir)
    src.wait_passes(1)
    _start(src, dst)
    serr, derr = _refused(src, dst)
    if src_dir == "client-other-cert":  # the destination checks the source's certificate
        assert "TLS handshake failed: certificate verify failed" in derr, derr
        assert "the peer refused our certificate (TLS alert: unknown ca)" in serr, serr
    else:  # the source checks the destination's certificate
        assert "TLS handshake failed: certificate verify failed" in serr, serr
        assert "TLS handshake failed: the peer refused our certificate" in derr, derr


def test_parameters_objects_and_their_errors(vms, pki, tmp_path):
    src = vms("src", memory="64M", ws_mib=8)
    dst = vms("dst", memory="64M", incoming="defer", extra=_obj(pki["client"], "client"))
    params = src.cmd("query-migrate-parameters")
    assert (params["tls-creds"], params["tls-hostname"], params["tls-authz"]) == ("", "", "")
    with pytest.raises(ExecuteError, match="'tls-authz' is not supported"):
        src.cmd("migrate-set-parameters", **{"tls-authz": "authz0"})
    src.cmd("migrate-set-parameters", **{"tls-creds": "nope"})
    with pytest.raises(ExecuteError, match="No TLS credentials with id 'nope'"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    with pytest.raises(ExecuteError, match="Unable to access credentials .*/ca-cert.pem: No such file"):
        src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(tmp_path), "endpoint": "client"})
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "srv", "dir": str(pki["server"]), "endpoint": "server"})
    src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki["client"]),
                             "endpoint": "client", "verify-peer": True})
    with pytest.raises(ExecuteError, match="duplicate property 'tls0'"):
        src.cmd("object-add", **{"qom-type": "tls-creds-x509", "id": "tls0", "dir": str(pki["client"])})
    src.cmd("migrate-set-parameters", **{"tls-creds": "srv"})
    with pytest.raises(ExecuteError, match="Expected TLS credentials for a client endpoint"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    src.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    with pytest.raises(ExecuteError, match="TLS needs a socket: a file: migration cannot be encrypted"):
        src.cmd("migrate", uri=f"file:{tmp_path}/vm.img")
    with pytest.raises(ExecuteError, match="No hostname for certificate validation"):
        src.cmd("migrate", uri=f"unix:{tmp_path}/nobody.sock")
    src.cmd("object-del", id="srv")
    with pytest.raises(ExecuteError, match="object 'srv' not found"):
        src.cmd("object-del", id="srv")
    src.cmd("migrate-set-parameters", **{"tls-creds": None})  # null unsets, as in QEMU
    assert src.cmd("query-migrate-parameters")["tls-creds"] == ""
    dst.cmd("migrate-set-parameters", **{"tls-creds": "tls0"})
    with pytest.raises(ExecuteError, match="Expected TLS credentials for a server endpoint"):
        dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    assert src.cmd("query-status")["status"] == "running"
    bad = subprocess.run([sys.executable, "-m", "livemig", "vm", "--memory", "64M", "--qmp", f"unix:{tmp_path}/x.qmp",
                          "--object", f"tls-creds-x509,id=t,dir={tmp_path},endpoint=server"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "Unable to access credentials" in bad.stderr, bad.stderr


def test_migrate_command_with_tls(vms, pki):
    """`livemig migrate --tls-creds ID` sets tls-creds on both sides (and tls-hostname)."""
    src, dst = _pair(vms, pki, memory="64M", ws_mib=8, src_tls=False, dst_tls=False)
    src.wait_passes(1)
    out = subprocess.run([sys.executable, "-m", "livemig", "migrate", "--from", f"unix:{src.qmp_path}",
                          "--to", f"unix:{dst.qmp_path}", "--tls-creds", "tls0", "--tls-hostname", "127.0.0.1"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "completed" in out.stdout
    assert src.cmd("query-migrate-parameters")["tls-hostname"] == "127.0.0.1"
    assert dst.cmd("query-migrate-parameters")["tls-creds"] == "tls0"
    assert_migrated(src, dst, 64 * MiB, 8)
