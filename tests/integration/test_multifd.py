"""multifd: parallel page channels in precopy (and flushed before postcopy), real processes."""
import pytest

from vmtools import MiB, assert_migrated, migrate


def _multifd(src, dst, channels):
    for vm in (src, dst):
        vm.cmd("migrate-set-parameters", **{"multifd-channels": channels})


def test_prefilled_guest_two_channels_tcp(vms):
    src = vms("src", memory="256M", ws_mib=16, prefill=True)
    dst = vms("dst", memory="256M", incoming="defer")
    _multifd(src, dst, 2)
    src.wait_passes(2)
    info = migrate(src, dst, caps=["events", "multifd"])
    assert info["status"] == "completed", info
    ram = info["ram"]
    assert ram["normal"] > 60000
    # the data pages went over the multifd channels, the main channel carried little
    assert ram["multifd-bytes"] >= ram["normal"] * 4096, ram
    assert ram["transferred"] >= ram["multifd-bytes"]
    assert_migrated(src, dst, 256 * MiB, 16)


def test_dirtying_guest_many_passes_three_channels_unix(vms, tmp_path):
    """Every pass re-sends pages on other channels: the flush before each dirty-bitmap merge keeps
    the copies in order (the integrity check fails if an old copy lands last)."""
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    _multifd(src, dst, 3)
    src.wait_passes(1)
    info = migrate(src, dst, f"unix:{tmp_path}/mig.sock", caps=["events", "multifd"],
                   params={"downtime-limit": 2000})
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 3, info
    assert info["ram"]["multifd-bytes"] > 0
    assert_migrated(src, dst, 256 * MiB, 0)


@pytest.mark.parametrize("preempt", [False, True], ids=["one-channel", "preempt"])
def test_multifd_then_postcopy(vms, preempt):
    """The multifd channels are flushed before the package; pages that arrived on them before
    POSTCOPY_ADVISE's discard would be lost, so receivers wait for the RAM setup."""
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    _multifd(src, dst, 2)
    src.wait_passes(1)
    caps = ["events", "multifd", "postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    migrate(src, dst, caps=caps, wait=False)
    src.wait_status({"active"})
    while src.cmd("query-migrate")["ram"]["dirty-sync-count"] < 2:
        pass
    src.cmd("migrate-start-postcopy")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert info["ram"]["multifd-bytes"] > 0 and info["ram"]["postcopy-bytes"] > 0, info
    assert_migrated(src, dst, 256 * MiB, 0)


def test_multifd_on_the_source_only_fails_cleanly(vms):
    src = vms("src", memory="64M", ws_mib=8, prefill=True)
    dst = vms("dst", memory="64M", incoming="defer")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    src.wait_passes(1)
    info = migrate(src, dst)
    assert info["status"] == "failed", info
    # the destination takes the first connection as its main channel, fails on the multifd init
    # packet there, and exits: a multifd channel then fails to connect or, if it got in before
    # the listener closed, its first send fails
    err = info["error-desc"]
    assert "Failed to connect" in err or ("multifd channel" in err and "while sending" in err), info
    assert dst.proc.wait(timeout=30) == 1  # migrate-incoming's exit-on-error
    assert "load of migration failed" in dst.stderr()
    before = src.passes()
    src.wait_passes(before + 2)  # the source guest keeps running
    assert src.cmd("query-status")["status"] == "running"


# --------------------------------------------------------------------- hostile multifd input
import socket  # noqa: E402
import time  # noqa: E402
import struct  # noqa: E402

import numpy as np  # noqa: E402

from livemig.wire import multifd as WM  # noqa: E402
from livemig.wire import ram as R  # noqa: E402
from livemig.wire import stream as S  # noqa: E402

BLOCK = 64 * MiB
PREFIX = (S.file_header() + S.configuration() + S.section_header(S.Section.START, 0, "ram", 0, 4)
          + R.setup_payload([R.BlockInfo("pc.ram", BLOCK)]) + S.section_footer(0))
PAGE = b"\xab" * 4096


def _hdr(offsets, flags=0, block="pc.ram", **over):
    raw = bytearray(WM.packet_header(np.array(offsets, dtype=np.uint64), 7, block, flags))
    for field, value in over.items():  # patch one be32 field of the header
        pos = {"version": 4, "flags": 8, "pages_alloc": 12, "normal_pages": 16, "next_size": 20,
               "zero_pages": 32}[field]
        raw[pos:pos + 4] = struct.pack(">I", value)
    return bytes(raw)


BAD_CHANNELS = {
    "init version": (struct.pack(">II", WM.MAGIC, 2) + bytes(56), b"", "version"),
    "init channel id": (WM.init_packet(5), b"", "channel id 5"),
    "init uuid": (WM.init_packet(0)[:8] + b"\x01" * 16 + WM.init_packet(0)[24:], b"", "uuid"),
    "page outside block": (WM.init_packet(0), _hdr([BLOCK]) + PAGE, "outside"),
    "misaligned page": (WM.init_packet(0), _hdr([100]) + PAGE, "aligned"),
    "unknown block": (WM.init_packet(0), _hdr([0], block="pc.rom") + PAGE, "unknown RAM block"),
    "too many pages": (WM.init_packet(0), _hdr([0], pages_alloc=4096), "maximum pages"),
    "too few page slots": (WM.init_packet(0), _hdr([0], pages_alloc=2), "maximum pages"),
    "QEMU 9 zero pages": (WM.init_packet(0), _hdr([0], zero_pages=3) + PAGE, "zero pages"),
    "normal above alloc": (WM.init_packet(0), _hdr([0], normal_pages=129), "maximum pages"),
    "data size lie": (WM.init_packet(0), _hdr([0], next_size=1 << 30) + PAGE, "announces"),
    "compression": (WM.init_packet(0), _hdr([0], flags=2) + PAGE, "compression"),
    "bad packet magic": (WM.init_packet(0), b"\x00" * WM.HEADER_LEN, "magic"),
    "descending offsets": (WM.init_packet(0), _hdr([8192, 4096]) + PAGE * 2, "ascending"),
    "cut in a packet": (WM.init_packet(0), _hdr([0, 4096]) + PAGE, "middle of a packet"),
    "flush without sync": (WM.init_packet(0), b"", "closed before its sync"),
}


def _one_channel_destination(vms):
    """A destination waiting with multifd on (one channel); its listening address."""
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": "multifd", "state": True}])
    dst.cmd("migrate-set-parameters", **{"multifd-channels": 1})
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    return dst, (addr["host"], int(addr["port"]))


@pytest.mark.parametrize("case", sorted(BAD_CHANNELS))
def test_hostile_multifd_channel_fails_cleanly(vms, case):
    init, packets, expect = BAD_CHANNELS[case]
    dst, where = _one_channel_destination(vms)
    with socket.create_connection(where) as main, socket.create_connection(where) as chan:
        main.sendall(PREFIX)
        chan.sendall(init + packets)
        try:
            chan.shutdown(socket.SHUT_WR)
        except OSError:  # ENOTCONN: the destination has failed on the bad packet and closed already
            pass
        if case == "flush without sync":
            main.sendall(S.section_header(S.Section.PART, 0) + R.multifd_flush())
        info = dst.wait_status({"failed", "completed"}, timeout=20)
    assert info["status"] == "failed", info
    assert expect.lower() in info["error-desc"].lower(), info
    assert dst.proc.poll() is None
    assert dst.cmd("query-status")["status"] == "inmigrate"


def test_flush_without_multifd_is_refused(vms):
    """A MULTIFD_FLUSH reaching a destination without multifd means pages went elsewhere."""
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    with socket.create_connection((addr["host"], int(addr["port"]))) as main:
        main.sendall(PREFIX + S.section_header(S.Section.PART, 0) + R.multifd_flush())
        info = dst.wait_status({"failed", "completed"}, timeout=20)
    assert info["status"] == "failed", info
    assert "multifd is off" in info["error-desc"], info


def test_multifd_pages_after_the_last_flush_fail_before_the_guest_runs(vms):
    """Pages on a multifd channel that no MULTIFD_FLUSH ordered before the end of the stream could
    land after the guest started: the destination stops its receivers and fails instead."""
    dst, where = _one_channel_destination(vms)
    with socket.create_connection(where) as main, socket.create_connection(where) as chan:
        main.sendall(PREFIX)
        chan.sendall(WM.init_packet(0) + _hdr([0]) + PAGE)
        time.sleep(1.0)  # the receiver has written the page by now (it waited for the RAM setup only)
        main.sendall(S.eof())
        main.shutdown(socket.SHUT_WR)  # no VMDESCRIPTION: the stream ends at EOF
        info = dst.wait_status({"failed", "completed"}, timeout=20)
    assert info["status"] == "failed", info
    assert "after the last MULTIFD_FLUSH" in info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"  # the guest never started
