"""Postcopy between two real livemig processes: userfaultfd demand paging over the return path."""
import socket
import time

import pytest
from qemu.qmp import ExecuteError

from livemig.postcopy import minor_faults_supported
from livemig.wire import returnpath as RP
from livemig.wire import stream as S
from vmtools import MiB, assert_migrated, migrate

PC = ("events", "postcopy-ram")


def _postcopy(src, dst, *, immediately: bool, params=None, dst_params=None):
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True} for c in PC])
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}
                                                      for c in PC + ("postcopy-blocktime",)])
    if dst_params:
        dst.cmd("migrate-set-parameters", **dst_params)
    # as QEMU's postcopy tests: a downtime limit precopy cannot meet, so only postcopy completes.
    # Switched at once, the push is capped so the guest outruns it and faults (the tests check its
    # requests): unlimited, on a fast host it can place every page before the guest needs one
    cap = {"max-postcopy-bandwidth": 100_000_000} if immediately else {}
    src.cmd("migrate-set-parameters", **{"downtime-limit": 1, **cap, **(params or {})})
    dst.cmd("migrate-incoming", uri="tcp:127.0.0.1:0")
    addr = dst.cmd("query-migrate")["socket-address"][0]
    src.cmd("migrate", uri=f"tcp:{addr['host']}:{addr['port']}")
    if immediately:
        src.cmd("migrate-start-postcopy")
    else:
        deadline = time.monotonic() + 60
        while (src.cmd("query-migrate").get("ram") or {}).get("dirty-sync-count", 0) < 2:
            assert time.monotonic() < deadline, "the first pass did not finish"
            time.sleep(0.01)
        src.cmd("migrate-start-postcopy")
    info = src.wait_status({"completed", "failed", "cancelled"}, timeout=120)
    assert info["status"] == "completed", info
    return info


@pytest.mark.parametrize("backend", ["auto", "ram"])
@pytest.mark.parametrize("immediately", [False, True], ids=["after-first-pass", "immediately"])
def test_postcopy_dirtying_guest(vms, immediately, backend):
    """backend auto: a destination's RAM is a memfd and pages go in with UFFDIO_CONTINUE (where
    userfaultfd has minor faults on shared memory); ram: anonymous memory and UFFDIO_COPY."""
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer", extra=["--memory-backend", backend])
    src.wait_passes(1)
    info = _postcopy(src, dst, immediately=immediately)
    statuses = [e["data"]["status"] for e in src.events("MIGRATION")]
    assert "postcopy-active" in statuses and statuses[-1] == "completed", statuses
    ram = info["ram"]
    assert ram["postcopy-bytes"] > 0 and "downtime" in info
    if immediately:
        assert ram["postcopy-requests"] > 0  # the guest faulted pages in on demand
    assert_migrated(src, dst, 256 * MiB, 0)
    dinfo = dst.cmd("query-migrate")
    for key in ("postcopy-blocktime", "postcopy-vcpu-blocktime", "postcopy-latency", "postcopy-vcpu-latency",
                "postcopy-non-vcpu-latency", "postcopy-latency-dist"):
        assert key in dinfo, dinfo
    assert len(dinfo["postcopy-latency-dist"]) == 24
    if immediately:
        assert dinfo["x-livemig-postcopy"]["requests"] > 0
    continue_here = backend == "auto" and minor_faults_supported()
    assert dinfo["x-livemig-postcopy"]["placement"] == ("UFFDIO_CONTINUE" if continue_here else "UFFDIO_COPY")


def test_postcopy_cancel_refused(vms):
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    _postcopy(src, dst, immediately=True, params={"max-postcopy-bandwidth": 50_000_000})
    # after completion a cancel is harmless and the state stays completed
    src.cmd("migrate_cancel")
    assert src.cmd("query-migrate")["status"] == "completed"
    assert_migrated(src, dst, 256 * MiB, 0)


def test_postcopy_capability_mismatch(vms):
    src = vms("src", memory="64M", ws_mib=4)
    dst = vms("dst", memory="64M", incoming="defer")
    src.wait_passes(2)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    src.cmd("migrate", uri=f"tcp:{addr['host']}:{addr['port']}")
    info = src.wait_status({"completed", "failed"}, timeout=30)
    assert info["status"] == "failed", info
    dinfo = dst.wait_status({"failed"}, timeout=10)
    assert "postcopy-ram" in dinfo["error-desc"], dinfo
    n = len(src.output())
    time.sleep(0.3)
    assert len(src.output()) > n  # the source guest keeps running


def test_start_postcopy_errors(vms):
    src = vms("src", memory="64M", ws_mib=4)
    with pytest.raises(ExecuteError, match="Enable postcopy"):
        src.cmd("migrate-start-postcopy")
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": "postcopy-ram", "state": True}])
    with pytest.raises(ExecuteError, match="after migration has been started"):
        src.cmd("migrate-start-postcopy")


@pytest.fixture
def hugepages():
    """Reserve 2 MiB huge pages for two 128 MiB guests (root only), restoring the old count after."""
    path = "/proc/sys/vm/nr_hugepages"
    old = int(open(path).read())
    need = 2 * 64 + 16
    try:
        if old < need:
            with open(path, "w") as f:
                f.write(str(need))
    except OSError as e:
        pytest.fail(f"cannot reserve huge pages for the hugetlb test ({e}); run as root")
    free = int([ln for ln in open("/proc/meminfo") if ln.startswith("HugePages_Free")][0].split()[1])
    assert free >= 128, f"only {free} free huge pages after asking for {need}"
    yield
    if old < need:
        with open(path, "w") as f:
            f.write(str(old))


@pytest.mark.parametrize("immediately", [False, True], ids=["after-first-pass", "immediately"])
def test_postcopy_hugetlb_guest(vms, hugepages, immediately):
    """RAM backed by 2 MiB hugetlb pages: discards, requests and placement in whole huge pages."""
    src = vms("src", memory="128M", ws_mib=0, extra=["--memory-backend", "hugetlb"])
    dst = vms("dst", memory="128M", incoming="defer", extra=["--memory-backend", "hugetlb"])
    src.wait_passes(1)
    info = _postcopy(src, dst, immediately=immediately)
    assert info["ram"]["postcopy-bytes"] > 0
    assert_migrated(src, dst, 128 * MiB, 0)
    if immediately:
        assert info["ram"]["postcopy-requests"] > 0
        assert dst.cmd("query-migrate")["x-livemig-postcopy"]["requests"] > 0


def test_hugetlb_page_size_mismatch(vms, hugepages):
    """A 4 KiB destination refuses a 2 MiB-page source in postcopy with a clear error."""
    src = vms("src", memory="128M", ws_mib=8, extra=["--memory-backend", "hugetlb"])
    dst = vms("dst", memory="128M", incoming="defer")
    src.wait_passes(2)
    caps = [{"capability": c, "state": True} for c in PC]
    src.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-set-capabilities", capabilities=caps)
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    src.cmd("migrate", uri=f"tcp:{addr['host']}:{addr['port']}")
    assert src.wait_status({"failed", "completed"}, timeout=30)["status"] == "failed"
    assert "page size" in dst.wait_status({"failed"}, timeout=10)["error-desc"]


def test_cancel_refused_during_postcopy(vms):
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    migrate(src, dst, caps=PC, params={"max-postcopy-bandwidth": 10_000_000}, wait=False)
    src.cmd("migrate-start-postcopy")
    src.wait_status({"postcopy-active"}, timeout=30)
    with pytest.raises(ExecuteError, match="Postcopy migration in progress, cannot cancel"):
        src.cmd("migrate_cancel")
    src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 0})  # takes effect at once
    assert src.wait_status({"completed", "failed"}, timeout=60)["status"] == "completed"
    assert_migrated(src, dst, 256 * MiB, 0)


def test_destination_dies_before_switchover(vms):
    """postcopy-ram on, but the destination dies while still in precopy: the source keeps its guest."""
    import os
    import signal
    src = vms("src", memory="256M", ws_mib=8, prefill=True)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(2)
    migrate(src, dst, caps=PC, params={"max-bandwidth": 20_000_000}, wait=False)
    src.wait_status({"active"})
    time.sleep(0.3)
    os.killpg(dst.proc.pid, signal.SIGKILL)
    info = src.wait_status({"failed", "completed"}, timeout=30)
    assert info["status"] == "failed" and info["error-desc"], info
    n = len(src.output())
    time.sleep(0.3)
    assert len(src.output()) > n and src.cmd("query-status")["status"] == "running"


@pytest.mark.parametrize("immediately", [False, True], ids=["after-first-pass", "immediately"])
def test_postcopy_preempt(vms, immediately):
    """postcopy-preempt: requested pages travel on a second connection; the requests themselves on
    the main return path (QEMU's way: x-preempt-requests off, so no re-send of queued pages)."""
    global PC
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    saved, PC = PC, PC + ("postcopy-preempt",)
    try:
        info = _postcopy(src, dst, immediately=immediately, dst_params={"x-preempt-requests": False})
    finally:
        PC = saved
    assert_migrated(src, dst, 256 * MiB, 0)
    if immediately:
        assert info["ram"]["postcopy-requests"] > 0


@pytest.mark.parametrize("urgent", [True, False], ids=["urgent-processes", "threads"])
def test_postcopy_preempt_requests_on_preempt_channel(vms, urgent):
    """x-preempt-requests (on by default) on the destination: it announces it on the return path,
    then sends its page requests on the preempt connection, where the source answers them: in
    threads, or with x-urgent-process each side in a process of its own."""
    global PC
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    src.cmd("migrate-set-parameters", **{"x-urgent-process": urgent})
    saved, PC = PC, PC + ("postcopy-preempt",)
    try:
        info = _postcopy(src, dst, immediately=True,
                         dst_params={"x-urgent-process": urgent})
    finally:
        PC = saved
    assert_migrated(src, dst, 256 * MiB, 0)
    requests = info["ram"]["postcopy-requests"]
    assert requests > 0 and 0 < info["x-livemig-preempt-requests"] <= requests, info
    dpc = dst.cmd("query-migrate")["x-livemig-postcopy"]
    assert dpc["faults"] > 0, dpc
    assert dpc["fault-path"] == ("urgent process" if urgent else "threads"), dpc
    assert (info.get("x-livemig-urgent-requests", 0) > 0) == urgent, info


def test_postcopy_preempt_hugetlb(vms, hugepages):
    global PC
    src = vms("src", memory="128M", ws_mib=0, extra=["--memory-backend", "hugetlb"])
    dst = vms("dst", memory="128M", incoming="defer", extra=["--memory-backend", "hugetlb"])
    src.wait_passes(1)
    saved, PC = PC, PC + ("postcopy-preempt",)
    try:
        _postcopy(src, dst, immediately=True)
    finally:
        PC = saved
    assert_migrated(src, dst, 128 * MiB, 0)


# --------------------------------------------------------------------- switchover policy
def _policy_migration(vms, memory: str, ws_mib: int, passes: int, params: dict):
    """A postcopy-ram migration that only the source's switchover policy may switch."""
    src = vms("src", memory=memory, ws_mib=ws_mib)
    dst = vms("dst", memory=memory, incoming="defer")
    src.wait_passes(passes)
    return src, dst, migrate(src, dst, caps=["events", "postcopy-ram"], params=params)


def test_policy_after_passes_switches_by_itself(vms):
    src, dst, info = _policy_migration(vms, "256M", 0, 1, {"x-postcopy-after-passes": 1})
    assert info["status"] == "completed", info
    assert "1 precopy pass(es) done" in info["x-livemig-switchover-reason"], info
    assert info["ram"]["postcopy-bytes"] > 0 and info["ram"]["dirty-sync-count"] == 3, info
    assert_migrated(src, dst, 256 * MiB, 0)


def test_policy_budget_switches_a_guest_that_cannot_converge(vms):
    """All of RAM dirtied faster than 50 MB/s: precopy cannot finish in 2 s, so the source
    switches at the end of the first pass and says why."""
    src, dst, info = _policy_migration(vms, "256M", 0, 1, {"x-switchover-budget": 2000, "max-bandwidth": 200 << 20})
    assert info["status"] == "completed", info
    reason = info["x-livemig-switchover-reason"]
    assert "budget 2.0 s" in reason and ("never converge" in reason or "need" in reason), reason
    assert_migrated(src, dst, 256 * MiB, 0)


def test_policy_budget_keeps_a_converging_guest_in_precopy(vms):
    src, dst, info = _policy_migration(vms, "128M", 8, 2, {"x-switchover-budget": 60000})
    assert info["status"] == "completed", info
    assert "x-livemig-switchover-reason" not in info and info["ram"]["postcopy-bytes"] == 0, info
    assert_migrated(src, dst, 128 * MiB, 8)


def test_policy_needs_postcopy_ram(vms):
    src = vms("src", memory="64M", ws_mib=8)
    src.cmd("migrate-set-parameters", **{"x-switchover-budget": 1000})
    with pytest.raises(Exception, match="needs the postcopy-ram capability"):
        src.cmd("migrate", uri="tcp:127.0.0.1:1")
    assert src.cmd("query-migrate") == {} or src.cmd("query-migrate").get("status") != "failed"


@pytest.mark.parametrize("configuration", [True, False], ids=["livemig-machine", "no-configuration"])
def test_preempt_requests_announced_only_to_a_livemig_stream(vms, configuration):
    """With postcopy-preempt the destination announces x-preempt-requests (a message a QEMU source
    would fail on) only after the stream's CONFIGURATION named livemig's machine type."""
    dst = vms("dst", memory="64M", incoming="defer")
    dst.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}
                                                      for c in PC + ("postcopy-preempt",)])
    dst.cmd("migrate-incoming", **{"uri": "tcp:127.0.0.1:0", "exit-on-error": False})
    addr = dst.cmd("query-migrate")["socket-address"][0]
    with socket.create_connection((addr["host"], int(addr["port"]))) as s:
        s.settimeout(20)
        s.sendall(S.file_header() + (S.configuration() if configuration else b"")
                  + S.command(S.Cmd.OPEN_RETURN_PATH) + S.ping(7))
        got = b""
        while RP.pong(7) not in got:
            chunk = s.recv(4096)
            assert chunk, f"return path closed before the PONG: {got!r}"
            got += chunk
    expected = (RP.preempt_requests() if configuration else b"") + RP.pong(7)
    assert got == expected, got
    dst.wait_status({"failed"}, timeout=20)  # the stream was cut: a clean failure
