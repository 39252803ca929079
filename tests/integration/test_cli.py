"""The `livemig migrate` command line (what `virsh migrate` is to QEMU) and `livemig demo`."""
import os
import signal
import subprocess
import sys
import time

from vmtools import MiB, assert_migrated


def _migrate_cmd(src, dst, *extra):
    return [sys.executable, "-m", "livemig", "migrate", "--from", f"unix:{src.qmp_path}",
            "--to", f"unix:{dst.qmp_path}", *extra]


def test_migrate_command(vms):
    src = vms("src", memory="128M", ws_mib=8)
    dst = vms("dst", memory="128M", incoming="defer")
    src.wait_passes(2)
    out = subprocess.run(_migrate_cmd(src, dst, "--downtime-limit", "500"), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "completed" in out.stdout and "downtime" in out.stdout and "throughput" in out.stdout
    assert_migrated(src, dst, 128 * MiB, 8)


def test_migrate_command_policy_multifd_and_report(vms, tmp_path):
    """`--multifd 2 --switchover-budget` on a guest that cannot converge: precopy over multifd,
    then postcopy chosen by the source (and why); `--report` writes the timeline and the plot."""
    import json
    src = vms("src", memory="256M", ws_mib=0)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(1)
    rep = tmp_path / "report"
    out = subprocess.run(_migrate_cmd(src, dst, "--multifd", "2", "--switchover-budget", "1000",
                                      "--max-bandwidth", "300M", "--report", str(rep)),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "switched to postcopy" in out.stdout and "budget" in out.stdout, out.stdout
    doc = json.loads((rep / "timeline.json").read_text())
    assert doc["source"]["status"] == "completed" and "budget" in doc["switchover-reason"]
    assert doc["source"]["ram"]["multifd-bytes"] > 0
    statuses = {s["status"] for s in doc["samples"]}
    assert "active" in statuses and doc["switchover-s"] is not None, statuses
    assert (rep / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert_migrated(src, dst, 256 * MiB, 0)


def test_migrate_command_ctrl_c_cancels(vms):
    src = vms("src", memory="256M", ws_mib=8, prefill=True)
    dst = vms("dst", memory="256M", incoming="defer")
    src.wait_passes(2)
    p = subprocess.Popen(_migrate_cmd(src, dst, "--max-bandwidth", "10M"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    src.wait_status({"active"}, timeout=30)
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert "cancel" in (out + err).lower()
    assert src.cmd("query-migrate")["status"] == "cancelled"
    n = len(src.output())
    time.sleep(0.3)
    assert len(src.output()) > n  # the guest kept running on the source


def test_demo_without_kvm_says_so(monkeypatch, capsys):
    from livemig import cli
    real = os.path.exists
    monkeypatch.setattr(cli.os.path, "exists", lambda p: False if p == "/dev/kvm" else real(p))
    try:
        cli.main(["demo"])
    except SystemExit as e:
        assert e.code == 1
    else:
        raise AssertionError("demo without /dev/kvm must exit non-zero")
    assert "/dev/kvm" in capsys.readouterr().err
