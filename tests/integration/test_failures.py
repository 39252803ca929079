"""Cancel, a destination that dies, and corrupt or hostile streams fed to a real destination."""
import os
import signal
import socket
import struct
import time

import pytest
from qemu.qmp import ExecuteError

from livemig.wire import ram as R
from livemig.wire import stream as S
from vmtools import MiB, assert_migrated, migrate


def _guest_keeps_running(vm, seconds=0.5):
    n = len(vm.output())
    time.sleep(seconds)
    assert len(vm.output()) > n, f"{vm.name}: guest is not running"
    assert vm.cmd("query-status")["status"] == "running"


def test_cancel_in_setup_then_migrate_again(vms):
    src = vms("src", memory="128M", ws_mib=8, prefill=True)
    dst = vms("dst", memory="128M", incoming="defer")
    src.wait_passes(2)
    migrate(src, dst, params={"max-bandwidth": 1_000_000}, wait=False)
    src.cmd("migrate_cancel")
    info = src.wait_status({"cancelled", "failed", "completed"})
    assert info["status"] == "cancelled", info
    statuses = [e["data"]["status"] for e in src.events("MIGRATION")]
    assert statuses[-2:] == ["cancelling", "cancelled"], statuses
    _guest_keeps_running(src)
    src.cmd("migrate_cancel")  # harmless after cancelled
    assert src.cmd("query-migrate")["status"] == "cancelled"
    _migrate_again(vms, src, "128M")


def _slow_migration_under_way(vms):
    """A 256 MiB prefilled guest migrating at 20 MB/s, in `active` for a while."""
    src = vms("src", memory="256M", ws_mib=8, prefill=True)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(2)
    migrate(src, dst, params={"max-bandwidth": 20_000_000}, wait=False)
    src.wait_status({"active"})
    time.sleep(0.5)
    return src, dst


def _migrate_again(vms, src, memory="256M"):
    """After a failed or cancelled migration, a fresh destination gets the guest intact."""
    dst2 = vms("dst2", memory=memory, incoming="defer")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000})
    assert migrate(src, dst2)["status"] == "completed"
    assert_migrated(src, dst2, int(memory[:-1]) * MiB, 8)


def test_cancel_active_keeps_guest_and_fails_destination(vms):
    src, dst = _slow_migration_under_way(vms)
    src.cmd("migrate_cancel")
    info = src.wait_status({"cancelled", "failed", "completed"})
    assert info["status"] == "cancelled", info
    _guest_keeps_running(src)
    dst.proc.wait(timeout=20)  # exit-on-error (the default): the destination exits non-zero
    assert dst.proc.returncode != 0
    assert "migration" in dst.stderr()
    _migrate_again(vms, src)


def test_destination_killed_mid_stream(vms):
    src, dst = _slow_migration_under_way(vms)
    os.killpg(dst.proc.pid, signal.SIGKILL)
    info = src.wait_status({"failed", "completed", "cancelled"}, timeout=30)
    assert info["status"] == "failed", info
    assert info.get("error-desc"), info
    _guest_keeps_running(src)
    _migrate_again(vms, src)


def test_migrate_to_nowhere_fails_cleanly(vms):
    src = vms("src", memory="64M", ws_mib=4)
    src.wait_passes(2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{port}")
    info = src.wait_status({"failed", "completed"})
    assert info["status"] == "failed" and "refused" in info["error-desc"].lower(), info
    _guest_keeps_running(src)
    src.cmd("migrate_cancel")  # after failed: harmless, stays failed (as QEMU)
    assert src.cmd("query-migrate")["status"] == "failed"


def test_cancel_before_migrate_and_twice_in_a_row(vms):
    """QEMU's cancel matrix: before any migration a cancel does nothing; two cancels in a row
    end in one `cancelled`; after a cancel a fresh migration succeeds."""
    src, dst = None, None
    src = vms("src", memory="256M", ws_mib=8, prefill=True)
    src.wait_passes(1)  # prefilled: 'prelaunch' until the guest has started
    src.cmd("migrate_cancel")
    assert src.cmd("query-migrate") == {} and src.cmd("query-status")["status"] == "running"
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(2)
    migrate(src, dst, params={"max-bandwidth": 20_000_000}, wait=False)
    src.wait_status({"active"})
    src.cmd("migrate_cancel")
    src.cmd("migrate_cancel")
    info = src.wait_status({"cancelled", "failed", "completed"})
    assert info["status"] == "cancelled", info
    statuses = [e["data"]["status"] for e in src.events("MIGRATION")]
    assert statuses.count("cancelled") == 1 and statuses.count("cancelling") == 1, statuses
    _guest_keeps_running(src)
    _migrate_again(vms, src)


def test_qmp_errors(vms):
    src = vms("src", memory="64M", ws_mib=4)
    with pytest.raises(ExecuteError) as e:
        src.cmd("no-such-command")
    assert e.value.error_class == "CommandNotFound"
    for bad in ({"uri": "gopher:x"}, {"uri": "tcp:nohost"}, {}):
        with pytest.raises(ExecuteError) as e:
            src.cmd("migrate", **bad)
        assert e.value.error_class == "GenericError"
    with pytest.raises(ExecuteError):
        src.cmd("migrate-set-parameters", **{"downtime-limit": -1})
    with pytest.raises(ExecuteError):
        src.cmd("migrate-set-capabilities", capabilities=[{"capability": "bogus", "state": True}])
    with pytest.raises(ExecuteError):
        src.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")  # not started with -incoming
    src.cmd("migrate_cancel")  # harmless with nothing running
    assert src.cmd("query-migrate") == {}
    src.cmd("stop")
    assert src.cmd("query-status")["status"] == "paused"
    src.cmd("cont")
    assert src.cmd("query-status")["status"] == "running"


# --------------------------------------------------------------------- hostile streams
BLOCK = 64 * MiB


def _good_prefix(block_len=BLOCK) -> bytes:
    return (S.file_header() + S.configuration()
            + S.section_header(S.Section.START, 0, "ram", 0, 4)
            + R.setup_payload([R.BlockInfo("pc.ram", block_len)]) + S.section_footer(0))


def _pages(offsets, name="pc.ram") -> bytes:
    out = S.section_header(S.Section.PART, 0)
    first = True
    for off in offsets:
        out += R.page_header(off, R.FLAG_PAGE, name if first else None) + b"\xab" * 4096
        first = False
    return out + R.eos() + S.section_footer(0)


BAD_STREAMS = {
    "bad magic": (b"QEVN" + _good_prefix()[4:], "magic"),
    "version 2": (struct.pack(">II", S.MAGIC, 2) + _good_prefix()[8:], "obsolete"),
    "version 4": (struct.pack(">II", S.MAGIC, 4) + _good_prefix()[8:], "version"),
    "wrong machine": (S.file_header() + b"\x07\x00\x00\x00\x03abc" + S.eof(), "Machine type"),
    "unknown section type": (_good_prefix() + b"\x55", "section type"),
    "unknown section": (_good_prefix() + S.section_header(S.Section.FULL, 7, "bogus", 0, 1), "Unknown section"),
    "unknown block": (_good_prefix()[:-25] + S.section_header(S.Section.START, 0, "ram", 0, 4)
                      + R.setup_payload([R.BlockInfo("pc.rom", BLOCK)]), "unknown RAM block"),
    "block length mismatch": (_good_prefix(BLOCK * 2), "length"),
    "bad footer": (_good_prefix()[:-5] + S.section_footer(9), "footer"),
    "page outside block": (_good_prefix() + _pages([BLOCK]), "outside"),
    "page run outside block": (_good_prefix() + _pages([0, 4096, 8192, BLOCK + 4096]), "outside"),
    "unknown command": (_good_prefix() + S.command(S.Cmd.OPEN_RETURN_PATH)[:1] + b"\x00\x63\x00\x00", "command"),
    "wrong command length": (_good_prefix() + b"\x08\x00\x02\x00\x09" + b"\x00" * 9, "length"),
    "huge packaged": (_good_prefix() + S.command(S.Cmd.PACKAGED, b"\xff\xff\xff\xff"), "PACKAGED"),
    "truncated in a page": (_good_prefix() + _pages([0, 4096])[:3000], "truncated"),
    "truncated in the header": (_good_prefix()[:6], "truncated"),
    "huge vmdesc then cut": (_good_prefix() + _pages([0]) + S.eof() + b"\x06\xff\xff\xff\xf0" + b"{" * 100, "device"),
}


@pytest.fixture(scope="module")
def hostile_dst(tmp_path_factory):
    """One destination per case would be slow; each case gets a fresh process from this factory."""
    return tmp_path_factory


@pytest.mark.parametrize("case", sorted(BAD_STREAMS))
def test_hostile_stream_fails_cleanly(vms, case):
    data, expect = BAD_STREAMS[case]
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    with socket.create_connection((addr["host"], int(addr["port"]))) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        info = dst.wait_status({"failed", "completed"}, timeout=20)
    assert info["status"] == "failed", info
    assert expect.lower() in info["error-desc"].lower(), info
    assert dst.proc.poll() is None  # exit-on-error false: still up and answering
    assert dst.cmd("query-status")["status"] == "inmigrate"


def test_hostile_stream_exits_by_default(vms):
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    addr = dst.cmd("query-migrate")["socket-address"][0]
    with socket.create_connection((addr["host"], int(addr["port"]))) as s:
        s.sendall(b"NOT A MIGRATION STREAM")
        dst.proc.wait(timeout=20)
    assert dst.proc.returncode == 1
    err = dst.stderr()
    assert "magic" in err and "Traceback" not in err
