"""Real `livemig vm` processes driven with the official qemu.qmp client, and the integrity check."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from qemu.qmp.legacy import QEMUMonitorProtocol

from livemig.guest.image import make_image, passes_from_output
from livemig.integrity import check, first_bytes

MiB = 1 << 20


class VM:
    """One `livemig vm` process with a QMP connection."""

    def __init__(self, tmp: Path, name: str, memory: str = "128M", ws_mib: int = 16, prefill: bool = False,
                 incoming: str | None = None, extra: list[str] | None = None, pass_fds: tuple = (),
                 boot: list[str] | None = None, serial: str | None = None):
        """`boot` replaces the built-in boot sector (e.g. --kernel ...); `serial` the file backend."""
        self.tmp, self.name = tmp, name
        self.qmp_path = tmp / f"{name}.qmp"
        self.serial = tmp / f"{name}.serial"
        self.stderr_path = tmp / f"{name}.stderr"
        if boot is None:
            img = tmp / f"{name}.img"
            img.write_bytes(make_image(ws_mib, prefill))
            boot = ["--boot-sector", str(img)]
        cmd = [sys.executable, "-m", "livemig", "vm", "--memory", memory, *boot,
               "--qmp", f"unix:{self.qmp_path}", "--serial", serial or f"file:{self.serial}"]
        if incoming:
            cmd += ["--incoming", incoming]
        cmd += extra or []
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(self.stderr_path, "wb"),
                                     pass_fds=pass_fds, start_new_session=True)
        deadline = time.monotonic() + 30
        while not self.qmp_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: {self.stderr()}")
            time.sleep(0.02)
        self.qmp = QEMUMonitorProtocol(str(self.qmp_path))
        self.qmp.connect(negotiate=True)
        self.qmp.settimeout(30)

    def cmd(self, name: str, **args):
        return self.qmp.cmd(name, **args)

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def output(self) -> bytes:
        return self.serial.read_bytes() if self.serial.exists() else b""

    def passes(self) -> int:
        return passes_from_output(self.output())

    def wait_passes(self, n: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.passes() < n:
            assert time.monotonic() < deadline, f"{self.name}: guest did not reach {n} passes ({self.passes()})"
            assert self.proc.poll() is None, f"{self.name} exited: {self.stderr()}"
            time.sleep(0.05)

    def wait_status(self, statuses: set[str], timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            info = self.cmd("query-migrate")
            if info.get("status") in statuses:
                return info
            assert time.monotonic() < deadline, f"{self.name}: migration stuck in {info}"
            time.sleep(0.05)

    def events(self, name: str | None = None) -> list[dict]:
        evs = self.qmp.get_events(wait=False)
        return [e for e in evs if name is None or e["event"] == name]

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.cmd("quit")
            except Exception:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        try:
            self.qmp.close()
        except Exception:
            pass


def migrate(src: VM, dst: VM, uri: str = "tcp:127.0.0.1:0", *, caps: list[str] = ("events",),
            params: dict | None = None, wait: bool = True) -> dict:
    capabilities = [{"capability": c, "state": True} for c in caps]
    src.cmd("migrate-set-capabilities", capabilities=capabilities)
    dst.cmd("migrate-set-capabilities", capabilities=capabilities)
    if params:
        src.cmd("migrate-set-parameters", **params)
    dst.cmd("migrate-incoming", uri=uri)
    if uri.startswith("tcp:") and uri.endswith(":0"):
        addr = dst.cmd("query-migrate")["socket-address"][0]
        uri = f"tcp:{addr['host']}:{addr['port']}"
    src.cmd("migrate", uri=uri)
    if not wait:
        return {}
    return src.wait_status({"completed", "failed", "cancelled"})


def switch_after_first_pass(src: VM, dst: VM) -> None:
    """Once the first full pass is done (dirty-sync-count 2), switch to postcopy; returns when both
    sides are postcopy-active."""
    src.wait_status({"active"})
    while src.cmd("query-migrate")["ram"]["dirty-sync-count"] < 2:
        time.sleep(0.02)
    src.cmd("migrate-start-postcopy")
    src.wait_status({"postcopy-active"})
    dst.wait_status({"postcopy-active"})


def dump_first_bytes(vm: VM, start: int, size: int) -> np.ndarray:
    path = vm.tmp / f"{vm.name}-{start:x}.ram"
    vm.cmd("pmemsave", val=start, size=size, filename=str(path))
    fb = first_bytes(str(path))
    path.unlink()
    return fb


def assert_migrated(src: VM, dst: VM, memory: int, ws_mib: int) -> str:
    """The integrity check of every migration test: guest invariant and dst-vs-src pages, guest
    running on the destination only."""
    dinfo = dst.wait_status({"completed", "failed"}, timeout=30)
    assert dinfo["status"] == "completed", dinfo
    st = src.cmd("query-status")["status"]
    assert st == "postmigrate", st
    before = len(dst.output())
    deadline = time.monotonic() + 60
    while len(dst.output()) <= before:  # the guest makes progress on the destination
        assert time.monotonic() < deadline, "the guest makes no progress on the destination"
        time.sleep(0.05)
    src_out = len(src.output())
    dst.cmd("stop")
    end = min(memory, 3 << 30) if ws_mib == 0 else min(MiB + ws_mib * MiB, memory)
    ok, why = check(dump_first_bytes(src, MiB, end - MiB), dump_first_bytes(dst, MiB, end - MiB))
    assert ok, why
    dst.cmd("cont")
    time.sleep(0.2)
    assert len(src.output()) == src_out, "the source guest ran after migration"
    assert dst.cmd("query-status")["status"] == "running"
    return why
