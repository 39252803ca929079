"""Precopy between two real livemig processes over real sockets, with real KVM guests."""
import os
import socket
import time

from vmtools import MiB, assert_migrated, migrate


def test_idle_guest_tcp(vms):
    src = vms("src", memory="128M", ws_mib=16)
    dst = vms("dst", memory="128M", incoming="defer")
    src.wait_passes(3)
    info = migrate(src, dst)
    assert info["status"] == "completed", info
    for key in ("total-time", "downtime", "setup-time", "ram"):
        assert key in info
    ram = info["ram"]
    assert ram["remaining"] == 0 and ram["total"] == 128 * MiB
    assert ram["duplicate"] > 20000  # untouched RAM goes as zero pages
    # every page goes at least once. How many working-set pages go as data is not fixed: the guest
    # bumps one byte per page thousands of passes a second, so a page is all zero whenever that byte
    # wraps (CI once saw 522 data pages); assert_migrated checks every page's content
    assert ram["normal"] > 0 and ram["normal"] + ram["duplicate"] >= 128 * MiB // 4096, ram
    assert ram["dirty-sync-count"] >= 2
    sw = info["x-livemig-switchover"]  # where the downtime went; passes sent before the stop
    assert 0 <= sw["shrink-passes"] <= 8 and ram["dirty-sync-count"] >= 2 + sw["shrink-passes"], info
    assert sw["pages"] <= 16 * 256 + 16, info  # at most the working set (+ the code's own pages)
    assert_migrated(src, dst, 128 * MiB, 16)
    events = src.events()
    statuses = [e["data"]["status"] for e in events if e["event"] == "MIGRATION"]
    assert statuses[0] == "setup" and statuses[-1] == "completed" and "device" in statuses, statuses
    passes = [e["data"]["pass"] for e in events if e["event"] == "MIGRATION_PASS"]
    assert passes == list(range(1, len(passes) + 1)) and len(passes) >= 2, passes
    assert [e["data"]["status"] for e in dst.events("MIGRATION")][-1] == "completed"


def test_shrink_passes_off_stops_at_the_first_fit(vms):
    src = vms("src", memory="64M", ws_mib=8)
    dst = vms("dst", memory="64M", incoming="defer")
    src.wait_passes(2)
    info = migrate(src, dst, params={"x-shrink-passes": 0})
    assert info["status"] == "completed", info
    assert info["x-livemig-switchover"]["shrink-passes"] == 0, info
    assert_migrated(src, dst, 64 * MiB, 8)


def test_prefilled_guest_unix(vms, tmp_path):
    src = vms("src", memory="256M", ws_mib=16, prefill=True)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(2)
    info = migrate(src, dst, f"unix:{tmp_path}/mig.sock")
    assert info["status"] == "completed", info
    assert info["ram"]["normal"] > 60000  # prefilled RAM is really sent
    assert_migrated(src, dst, 256 * MiB, 16)


def test_guest_dirtying_all_ram(vms):
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    info = migrate(src, dst, params={"downtime-limit": 2000})
    assert info["status"] == "completed", info
    assert info["ram"]["dirty-sync-count"] >= 2
    assert_migrated(src, dst, 256 * MiB, 0)


def test_fd_transport(vms):
    a, b = socket.socketpair()
    src = vms("src", memory="64M", ws_mib=8, pass_fds=(a.fileno(),))
    dst = vms("dst", memory="64M", incoming=f"fd:{b.fileno()}", pass_fds=(b.fileno(),))
    a.close(), b.close()
    src.wait_passes(2)
    src.cmd("migrate", uri=f"fd:{src_fd(src)}")
    info = src.wait_status({"completed", "failed", "cancelled"})
    assert info["status"] == "completed", info
    assert_migrated(src, dst, 64 * MiB, 8)


def src_fd(vm):
    """The fd number the source inherited (pass_fds keeps numbers)."""
    return int(vm.proc.args[0] and _fd_of(vm))


def _fd_of(vm):
    for fd in os.listdir(f"/proc/{vm.proc.pid}/fd"):
        try:
            if os.readlink(f"/proc/{vm.proc.pid}/fd/{fd}").startswith("socket:") and int(fd) > 2:
                if _is_socketpair(vm.proc.pid, int(fd)):
                    return int(fd)
        except OSError:
            pass
    raise AssertionError("no inherited socket")


def _is_socketpair(pid, fd):
    link = os.readlink(f"/proc/{pid}/fd/{fd}")
    inode = link[len("socket:["):-1]
    with open(f"/proc/{pid}/net/unix") as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[6] == inode:
                return len(parts) < 8  # unnamed: a socketpair end, not the QMP listener
    return False


def test_file_transport_save_and_load(vms, tmp_path):
    src = vms("src", memory="64M", ws_mib=8, prefill=True)
    src.wait_passes(2)
    src.cmd("migrate", uri=f"file:{tmp_path}/vm.save")
    info = src.wait_status({"completed", "failed", "cancelled"})
    assert info["status"] == "completed", info
    assert src.cmd("query-status")["status"] == "postmigrate"
    data = (tmp_path / "vm.save").read_bytes()
    assert data[:8] == bytes.fromhex("5145564d00000003")
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-incoming", uri=f"file:{tmp_path}/vm.save")
    assert_migrated(src, dst, 64 * MiB, 8)


def test_source_stays_paused_and_answers_after_completion(vms, tmp_path):
    src = vms("src", memory="64M", ws_mib=4)
    dst = vms("dst", memory="64M", incoming="defer")
    src.wait_passes(2)
    assert migrate(src, dst)["status"] == "completed"
    out = len(src.output())
    time.sleep(0.3)
    assert len(src.output()) == out
    assert src.cmd("query-status") == {"status": "postmigrate", "running": False, "singlestep": False}
    src.cmd("pmemsave", val=MiB, size=4 * MiB, filename=str(tmp_path / "after.ram"))
    assert (tmp_path / "after.ram").stat().st_size == 4 * MiB
    assert src.cmd("query-migrate")["status"] == "completed"
    assert_migrated(src, dst, 64 * MiB, 4)


def test_a_migrated_guest_migrates_on(vms):
    """A -> B by postcopy, then B -> C by precopy: the VM that arrived migrates again, and the
    capabilities of the first migration must be switched off on both ends of the second."""
    a = vms("a", memory="128M", ws_mib=8)
    b = vms("b", memory="128M", incoming="defer")
    a.wait_passes(2)
    migrate(a, b, caps=["events", "postcopy-ram"], wait=False)
    a.cmd("migrate-start-postcopy")
    assert a.wait_status({"completed", "failed"})["status"] == "completed"
    assert_migrated(a, b, 128 * MiB, 8)
    c = vms("c", memory="128M", incoming="defer")
    for vm in (b, c):
        vm.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": False}])
    info = migrate(b, c)
    assert info["status"] == "completed", info
    assert_migrated(b, c, 128 * MiB, 8)


def test_a_destination_stopped_before_the_migration_waits_for_cont(vms):
    """`stop` on a waiting destination (QEMU's -S): the migrated guest stays paused there, with no
    RESUME event, until `cont` starts it (RESUME then); nothing is lost meanwhile."""
    src = vms("src", memory="64M", ws_mib=8)
    dst = vms("dst", memory="64M", incoming="defer")
    assert dst.cmd("query-status")["status"] == "inmigrate"
    dst.cmd("stop")
    src.wait_passes(2)
    info = migrate(src, dst)
    assert info["status"] == "completed", info
    assert dst.wait_status({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.cmd("query-status")["status"] == "paused"
    before = len(dst.output())
    time.sleep(0.5)
    assert len(dst.output()) == before and not dst.events("RESUME"), "the paused guest ran"
    dst.cmd("cont")
    assert len(dst.events("RESUME")) == 1
    assert_migrated(src, dst, 64 * MiB, 8)


def test_a_guest_stopped_on_the_source_stays_stopped_on_the_destination(vms):
    """The stream carries the source guest's run state (QEMU's globalstate section): a guest the
    user had stopped arrives paused, with no RESUME, and runs after `cont`."""
    src = vms("src", memory="64M", ws_mib=8)
    dst = vms("dst", memory="64M", incoming="defer")
    src.wait_passes(2)
    src.cmd("stop")
    info = migrate(src, dst)
    assert info["status"] == "completed", info
    assert dst.wait_status({"completed", "failed"}, timeout=30)["status"] == "completed"
    assert dst.cmd("query-status")["status"] == "paused" and not dst.events("RESUME")
    before = len(dst.output())
    time.sleep(0.5)
    assert len(dst.output()) == before, "the guest ran on the destination before cont"
    dst.cmd("cont")
    assert_migrated(src, dst, 64 * MiB, 8)
