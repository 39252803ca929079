"""Failure injection: a relay between source and destination cuts, stalls or corrupts the
connection in each phase. Precopy: the migration fails and the source guest keeps running (a
fresh migration then succeeds with the integrity check). After the switch to postcopy: both sides
pause and recover to completion. Every case ends with the guest running exactly once, intact."""
import time

import pytest

from relay import Relay
from vmtools import MiB, assert_migrated, migrate

MEM = "256M"


def _pair(vms, tmp_path, ws_mib=8, prefill=True, caps=("events",)):
    src = vms("src", memory=MEM, ws_mib=ws_mib, prefill=prefill)
    dst = vms("dst", memory=MEM, incoming="defer")
    src.wait_passes(1)
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
    dst.cmd("migrate-incoming", **{"uri": f"unix:{tmp_path}/dst.sock", "exit-on-error": False})
    return src, dst, Relay(tmp_path / "relay.sock", str(tmp_path / "dst.sock"))


def _start(src, relay, caps=("events",), **params):
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in caps])
    if params:
        src.cmd("migrate-set-parameters", **params)
    src.cmd("migrate", uri=relay.uri)


def _source_kept_guest(vms, src, dst, relay):
    info = src.wait_status({"failed", "completed", "cancelled"}, timeout=60)
    assert info["status"] in ("failed", "cancelled"), info
    relay.close()
    n = len(src.output())
    deadline = time.monotonic() + 10
    while len(src.output()) <= n:  # the source guest runs on
        assert time.monotonic() < deadline, "the source guest does not run after the failure"
        time.sleep(0.05)
    assert src.cmd("query-status")["status"] == "running"
    assert dst.cmd("query-status")["status"] == "inmigrate"  # never started there
    dst2 = vms("dst2", memory=MEM, incoming="defer")
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 100_000_000_000})
    assert migrate(src, dst2)["status"] == "completed"
    assert_migrated(src, dst2, 256 * MiB, 8)
    return info


@pytest.mark.parametrize("where", ["setup", "first pass", "later pass"])
def test_precopy_cut(vms, tmp_path, where):
    src, dst, relay = _pair(vms, tmp_path, ws_mib=8 if where != "later pass" else 64)
    relay.cut_at = {"setup": 300, "first pass": 40 * MiB, "later pass": None}[where]
    _start(src, relay, **{"max-bandwidth": 200 << 20, "downtime-limit": 0})  # never converges before the cut
    if where == "later pass":
        while src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 3:
            time.sleep(0.02)
        relay.cut()
    info = _source_kept_guest(vms, src, dst, relay)
    assert info["status"] == "failed" and info["error-desc"], info
    assert dst.cmd("query-migrate")["status"] == "failed"


@pytest.mark.parametrize("where,expect", [("stream header", "magic"), ("RAM setup", "RAM block")])
def test_precopy_corrupted(vms, tmp_path, where, expect):
    src, dst, relay = _pair(vms, tmp_path)
    relay.flip_at = {"stream header": 1, "RAM setup": 72}[where]  # a byte of 'QEVM'; of "pc.ram"
    _start(src, relay)
    dinfo = dst.wait_status({"failed"}, timeout=30)
    assert expect.lower() in dinfo["error-desc"].lower(), dinfo
    _source_kept_guest(vms, src, dst, relay)


def test_precopy_stall_then_cancel(vms, tmp_path):
    src, dst, relay = _pair(vms, tmp_path)
    _start(src, relay, **{"max-bandwidth": 100 << 20})
    src.wait_status({"active"})
    relay.stall()
    time.sleep(1.0)
    assert src.cmd("query-migrate")["status"] == "active"  # stuck on the link, not failed
    src.cmd("migrate_cancel")
    info = _source_kept_guest(vms, src, dst, relay)
    assert info["status"] == "cancelled", info


def test_completion_return_path_lost(vms, tmp_path):
    """The whole stream arrives but SHUT(0) never reaches the source: the destination runs the
    guest, so the source must not resume it (it fails and stays paused)."""
    src, dst, relay = _pair(vms, tmp_path, ws_mib=8, prefill=False)
    relay.hold_replies()
    _start(src, relay)
    dst.wait_status({"completed"}, timeout=60)
    relay.cut()
    info = src.wait_status({"failed", "completed"}, timeout=60)
    assert "may be running the guest" in info["error-desc"], info
    n = len(src.output())
    time.sleep(0.5)
    assert len(src.output()) == n and src.cmd("query-status")["status"] == "paused"
    assert dst.cmd("query-status")["status"] == "running"


def _postcopy_via_relay(vms, tmp_path, preempt=False):
    caps = ["events", "postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    src, dst, relay = _pair(vms, tmp_path, ws_mib=0, prefill=False, caps=caps)
    _start(src, relay, caps, **{"max-postcopy-bandwidth": 30 << 20})
    while src.cmd("query-migrate").get("ram", {}).get("dirty-sync-count", 0) < 2:
        time.sleep(0.02)
    src.cmd("migrate-start-postcopy")
    return src, dst, relay


def _recover_directly(src, dst, tmp_path):
    src.wait_status({"postcopy-paused"}, timeout=30)
    dst.wait_status({"postcopy-paused"}, timeout=30)
    assert dst.cmd("query-status")["status"] == "running"
    uri = f"unix:{tmp_path}/recover.sock"
    dst.cmd("migrate-recover", uri=uri)
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=uri, resume=True)
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 256 * MiB, 0)


@pytest.mark.parametrize("preempt", [False, True], ids=["one-channel", "preempt"])
def test_postcopy_cut_recovers(vms, tmp_path, preempt):
    src, dst, relay = _postcopy_via_relay(vms, tmp_path, preempt)
    src.wait_status({"postcopy-active"})
    time.sleep(0.3)
    relay.cut()
    _recover_directly(src, dst, tmp_path)


def test_postcopy_cut_right_after_the_package(vms, tmp_path):
    src, dst, relay = _postcopy_via_relay(vms, tmp_path)
    dst.wait_status({"postcopy-active"}, timeout=30)  # RUN done: the guest runs on the destination
    relay.cut()
    _recover_directly(src, dst, tmp_path)


def test_postcopy_stall_then_pause_and_recover(vms, tmp_path):
    src, dst, relay = _postcopy_via_relay(vms, tmp_path)
    src.wait_status({"postcopy-active"})
    relay.stall()
    time.sleep(0.5)
    src.cmd("migrate-pause")
    dst.cmd("migrate-pause")
    _recover_directly(src, dst, tmp_path)
