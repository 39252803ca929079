"""Postcopy recovery: a broken connection after the switch pauses both sides, the guest keeps
running on the destination, and `migrate-recover` + `migrate resume=true` finish the migration
with nothing lost (real processes, real userfaultfd)."""

import pytest
from qemu.qmp import ExecuteError

from vmtools import MiB, assert_migrated, migrate, switch_after_first_pass


def _postcopy_under_way(vms, tmp_path, preempt=False, bandwidth=40 << 20, urgent=False):
    """A 256 MiB all-RAM-dirtying guest switched to postcopy with a slow background push, so it
    stays in postcopy-active for seconds. `urgent`: preempt requests served by the urgent processes."""
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    caps = ["events", "postcopy-ram"] + (["postcopy-preempt"] if preempt else [])
    if preempt:  # page requests on the preempt connection too, across reconnections
        dst.cmd("migrate-set-parameters", **{"x-preempt-requests": True, "x-urgent-process": urgent})
        src.cmd("migrate-set-parameters", **{"x-urgent-process": urgent})
    migrate(src, dst, f"unix:{tmp_path}/mig.sock", caps=caps, wait=False,
            params={"max-bandwidth": 400 << 20, "max-postcopy-bandwidth": bandwidth,
                    "downtime-limit": 0})  # precopy must not finish before the switch, even if
    # the guest barely runs during a pass (a 1 ms limit let a starved guest's precopy converge once)
    switch_after_first_pass(src, dst)
    return src, dst


def _recover(src, dst, uri):
    dst.cmd("migrate-recover", uri=uri)
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    src.cmd("migrate", uri=uri, resume=True)


def _both_paused(src, dst):
    src.wait_status({"postcopy-paused"}, timeout=30)
    dst.wait_status({"postcopy-paused"}, timeout=30)


@pytest.mark.parametrize("side", ["source", "destination"])
def test_migrate_pause_then_recover(vms, tmp_path, side):
    src, dst = _postcopy_under_way(vms, tmp_path)
    (src if side == "source" else dst).cmd("migrate-pause")
    _both_paused(src, dst)
    assert "x-livemig-pause-reason" in src.cmd("query-migrate")
    with pytest.raises(ExecuteError, match="Postcopy migration in progress, cannot cancel"):
        src.cmd("migrate_cancel")
    assert dst.cmd("query-status")["status"] == "running"  # the guest stays on the destination
    _recover(src, dst, f"unix:{tmp_path}/recover.sock")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    statuses = [e["data"]["status"] for e in src.events("MIGRATION")]
    assert "postcopy-paused" in statuses and "postcopy-recover" in statuses, statuses
    assert_migrated(src, dst, 256 * MiB, 0)


def test_failed_resume_goes_back_to_paused_and_retries(vms, tmp_path):
    src, dst = _postcopy_under_way(vms, tmp_path)
    src.cmd("migrate-pause")
    _both_paused(src, dst)
    src.cmd("migrate", uri=f"unix:{tmp_path}/nobody.sock", resume=True)  # nothing listens there
    src.wait_status({"postcopy-paused"})
    with pytest.raises(ExecuteError, match="Migrate recover can only be run when postcopy is paused"):
        src.cmd("migrate-recover", uri=f"unix:{tmp_path}/x.sock")
    _recover(src, dst, f"unix:{tmp_path}/recover.sock")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 256 * MiB, 0)


@pytest.mark.parametrize("same_path", [False, True], ids=["new-address", "same-address"])
def test_migrate_recover_again_replaces_an_address_the_source_never_reached(vms, tmp_path, same_path):
    """migrate-recover on an address the source cannot reach, then again on one it can (or the same
    one): as in QEMU the second replaces the first, and recovery completes."""
    src, dst = _postcopy_under_way(vms, tmp_path)
    src.cmd("migrate-pause")
    _both_paused(src, dst)
    first = f"unix:{tmp_path}/{'recover' if same_path else 'unreachable'}.sock"
    dst.cmd("migrate-recover", uri=first)
    _recover(src, dst, f"unix:{tmp_path}/recover.sock")
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 256 * MiB, 0)


@pytest.mark.parametrize("same_path,urgent", [(False, False), (True, False), (False, True)],
                         ids=["new-address", "same-address", "urgent-processes"])
def test_recover_twice_with_preempt(vms, tmp_path, same_path, urgent):
    """Two pauses in one migration; with the same recovery address both times, the second
    listener's socket file must survive the first one's cleanup. With the urgent processes, the
    first connection's end ends them and threads serve the reconnections."""
    # a slow push: postcopy must outlast two pause-recover rounds however little the first pass left
    src, dst = _postcopy_under_way(vms, tmp_path, preempt=True, bandwidth=4 << 20, urgent=urgent)
    for i in range(2):
        (src, dst)[i].cmd("migrate-pause")
        _both_paused(src, dst)
        uri = f"unix:{tmp_path}/recover{0 if same_path else i}.sock"
        dst.cmd("migrate-recover", uri=uri)
        src.cmd("migrate", uri=uri, resume=True)
        src.wait_status({"postcopy-active", "completed"})
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})
    info = src.wait_status({"completed", "failed"})
    assert info["status"] == "completed", info
    assert info["x-livemig-preempt-requests"] > 0, info
    assert_migrated(src, dst, 256 * MiB, 0)


def test_pause_outside_postcopy_is_refused(vms):
    src = vms("src", memory="64M", ws_mib=8)
    with pytest.raises(ExecuteError, match="only supported during postcopy-active"):
        src.cmd("migrate-pause")
    with pytest.raises(ExecuteError, match="Cannot resume if there is no paused migration"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1", resume=True)
