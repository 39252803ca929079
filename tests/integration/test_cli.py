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
