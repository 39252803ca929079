"""Real-KVM tests of livemig.machine (KvmMachine, devices) with the workload guest."""
from __future__ import annotations

import os
import socket
import time

import numpy as np
import pytest

from livemig.errors import GuestError
from livemig.guest.image import (PREFILL_OFFSET, WS_MIB_OFFSET, WORKING_SET_START, check_invariant,
                                 make_image, passes_from_output)
from livemig.machine.vm import KvmMachine
from livemig.wire.cursor import Cursor
from livemig.wire.vmstate import decode, encode

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096

if not os.path.exists("/dev/kvm"):  # pragma: no cover
    pytest.skip("no /dev/kvm", allow_module_level=True)


def wait_for(pred, timeout=10.0, step=0.01):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        v = pred()
        if v:
            return v
        time.sleep(step)
    raise AssertionError("timed out")


def out_len(path) -> int:
    return os.path.getsize(path)


def ws_first_bytes(m: KvmMachine, ws_mib: int) -> np.ndarray:
    ram = np.frombuffer(m.ram, dtype=np.uint8)
    return ram[WORKING_SET_START:WORKING_SET_START + ws_mib * MiB:PAGE].copy()


@pytest.fixture
def machines():
    made: list[KvmMachine] = []
    fatal: list[str] = []

    def make(mem, serial="null"):
        m = KvmMachine(mem, serial, on_fatal=fatal.append)
        made.append(m)
        return m

    make.fatal = fatal
    yield make
    for m in made:
        m.close()
    assert not fatal, fatal


def boot(make, tmp_path, mem=64 * MiB, ws=16, name="serial.out", prefill=False):
    path = tmp_path / name
    m = make(mem, f"file:{path}")
    m.load_boot_sector(make_image(ws, prefill))
    m.start()
    wait_for(lambda: out_len(path) >= 3)  # '#' + at least two passes
    return m, path


# ---------------------------------------------------------------------------------------------
# image / invariant (no KVM needed, cheap)


def test_image_patch_offsets():
    img = make_image(37, True)
    assert len(img) == 512 and img[510:] == b"\x55\xaa"
    assert int.from_bytes(img[WS_MIB_OFFSET:WS_MIB_OFFSET + 4], "little") == 37
    assert int.from_bytes(img[PREFILL_OFFSET:PREFILL_OFFSET + 4], "little") == 1
    img0 = make_image()
    assert img0[WS_MIB_OFFSET:WS_MIB_OFFSET + 8] == bytes(8)


def test_check_invariant_cases():
    ok, _ = check_invariant(np.full(100, 7, np.uint8))
    assert ok
    a = np.full(100, 8, np.uint8)
    a[40:] = 7
    assert check_invariant(a)[0]
    a = np.full(100, 0, np.uint8)
    a[40:] = 255  # wrap-around
    assert check_invariant(a)[0]
    a[70:] = 254  # two steps
    assert not check_invariant(a)[0]
    b = np.full(100, 5, np.uint8)
    b[10] = 6  # one more than the previous one
    assert not check_invariant(b)[0]
    c = np.full(100, 5, np.uint8)
    c[50:] = 3
    assert not check_invariant(c)[0]


# ---------------------------------------------------------------------------------------------
# running guest


def test_boot_output_grows(machines, tmp_path):
    m, path = boot(machines, tmp_path)
    assert m.running
    n1 = out_len(path)
    wait_for(lambda: out_len(path) > n1 + 10)
    out = path.read_bytes()
    assert out.startswith(b"#")
    assert set(out[1:]) <= set(b".\n")


def test_pause_resume(machines, tmp_path):
    m, path = boot(machines, tmp_path)
    for _ in range(3):
        m.pause()
        m.pause()  # idempotent
        assert not m.running
        n = out_len(path)
        time.sleep(0.3)
        assert out_len(path) == n, "output while paused"
        m.resume()
        m.resume()
        assert m.running
        wait_for(lambda: out_len(path) > n + 5)


def test_invariant_while_paused(machines, tmp_path):
    ws = 16
    m, path = boot(machines, tmp_path, ws=ws)
    for _ in range(10):
        m.pause()
        fb = ws_first_bytes(m, ws)
        ok, msg = check_invariant(fb)
        assert ok, msg
        # nothing outside the working set is touched (RAM above it stays zero)
        ram = np.frombuffer(m.ram, dtype=np.uint8)
        assert not ram[WORKING_SET_START + ws * MiB::PAGE].any()
        m.resume()
        time.sleep(0.02)
    m.pause()
    # passes counted by the UART agree with the page values (mod 256)
    passes = passes_from_output(path.read_bytes())
    fb = ws_first_bytes(m, ws)
    assert int(fb[-1]) == passes % 256


def test_prefill_touches_all_ram(machines, tmp_path):
    mem = 32 * MiB
    m, path = boot(machines, tmp_path, mem=mem, ws=4, prefill=True)
    m.pause()
    ram = np.frombuffer(m.ram, dtype=np.uint8)
    firsts = ram[WORKING_SET_START:mem:PAGE]
    assert firsts.all(), "prefill left a page zero"
    ok, msg = check_invariant(firsts[: 4 * MiB // PAGE])
    assert ok, msg
    assert (firsts[4 * MiB // PAGE:] == 1).all()


def test_dirty_log_reports_working_set_only(machines, tmp_path):
    mem, ws = 64 * MiB, 8
    m, path = boot(machines, tmp_path, mem=mem, ws=ws)
    m.dirty_log_start()
    try:
        m.dirty_log_sync()  # drop whatever was dirtied before
        n = out_len(path)
        wait_for(lambda: out_len(path) > n + 2)  # at least one full pass inside the window
        m.pause()
        bm = m.dirty_log_sync()
        assert bm.dtype == np.uint64 and bm.size == mem // PAGE // 64
        pages = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
        first = WORKING_SET_START // PAGE
        expected = np.arange(first, first + ws * MiB // PAGE)
        assert np.array_equal(pages, expected), (pages[:10], pages.size)
        # paused: nothing new
        assert not m.dirty_log_sync().any()
        m.resume()
        n = out_len(path)
        wait_for(lambda: out_len(path) > n + 2)
        m.pause()
        pages = np.flatnonzero(np.unpackbits(m.dirty_log_sync().view(np.uint8), bitorder="little"))
        assert np.array_equal(pages, expected)
        m.resume()
    finally:
        m.dirty_log_stop()
    with pytest.raises(GuestError):
        m.dirty_log_sync()
    n = out_len(path)
    wait_for(lambda: out_len(path) > n + 2)


def test_dirty_log_two_slots_high_memory(machines, tmp_path):
    """A 4.5 GiB guest: RAM above 4 GiB is a second slot; the block bitmap combines both."""
    mem = 4 * GiB + 512 * MiB
    m = machines(mem)
    m.load_boot_sector(make_image(1))
    m.start()
    st = wait_for(lambda: _loop_state(m, r12=2 * MiB))  # paused in the loop over [1 MiB, 2 MiB)
    assert st["r12"] == 2 * MiB and st["r13"] == 4 * GiB
    st["r13"] = 4 * GiB + 8 * MiB  # make the loop cover [4 GiB, 4 GiB + 8 MiB) as well
    m.devices()[0].load(st)
    m.dirty_log_start()
    try:
        m.dirty_log_sync()
        m.resume()
        wait_for(lambda: _passes_since(m, st["r14"]) >= 3)  # leaves it paused
        bm = m.dirty_log_sync()
        pages = np.flatnonzero(np.unpackbits(bm.view(np.uint8), bitorder="little"))
        low = np.arange(MiB // PAGE, 2 * MiB // PAGE)
        high = m.gpa_to_offset(4 * GiB) // PAGE + np.arange(8 * MiB // PAGE)
        assert np.array_equal(pages, np.concatenate([low, high]))
        ram = np.frombuffer(m.ram, dtype=np.uint8)
        off = m.gpa_to_offset(4 * GiB)
        # the high part joined later, so check each part on its own
        for firsts in (ram[MiB:2 * MiB:PAGE], ram[off:off + 8 * MiB:PAGE]):
            ok, msg = check_invariant(firsts)
            assert ok, msg
            assert firsts[-1] > 0
    finally:
        m.dirty_log_stop()


def _passes_since(m: KvmMachine, r14: int) -> int:
    m.pause()
    n = m.devices()[0].save()["r14"] - r14
    if n < 3:
        m.resume()
    return n


def _transfer(src: KvmMachine, dst: KvmMachine) -> None:
    """What a migration does, minus the wire: RAM, then each device's state through vmstate encoding."""
    dst.ram[:] = src.ram[:]
    sdevs, ddevs = src.devices(), dst.devices()
    assert [(d.idstr, d.instance_id) for d in sdevs] == [(d.idstr, d.instance_id) for d in ddevs]
    assert sdevs[0].idstr == "cpu" and sdevs[0].instance_id == 0
    for s, d in zip(sdevs, ddevs):
        blob = encode(s.vmsd, s.save())
        assert len(blob) == s.vmsd.fixed_size
        d.load(decode(d.vmsd, Cursor(blob)))


def test_save_load_into_fresh_machine(machines, tmp_path):
    ws = 16
    m1, path1 = boot(machines, tmp_path, mem=64 * MiB, ws=ws, name="src.out")
    time.sleep(0.1)
    m1.pause()
    before = ws_first_bytes(m1, ws)
    assert check_invariant(before)[0]
    regs1 = m1.devices()[0].save()

    path2 = tmp_path / "dst.out"
    m2 = machines(64 * MiB, f"file:{path2}")  # created paused, never booted
    assert not m2.running
    _transfer(m1, m2)
    m1.close()
    regs2 = m2.devices()[0].save()
    for k in ("rip", "rdi", "r12", "r13", "r14", "cr0", "cr3", "cr4", "efer", "cs_selector", "msr_value"):
        if k == "msr_value":
            # the TSC moves on while the machine sits paused
            assert regs2[k][1:] == regs1[k][1:]
            continue
        assert regs2[k] == regs1[k], k
    assert np.array_equal(ws_first_bytes(m2, ws), before)

    m2.start()
    wait_for(lambda: out_len(path2) > 20)
    assert b"#" not in path2.read_bytes()  # it continued the loop, did not reboot
    for _ in range(3):
        m2.pause()
        ok, msg = check_invariant(ws_first_bytes(m2, ws))
        assert ok, msg
        m2.resume()
        time.sleep(0.05)
    m2.pause()
    # the pass counter (r14) continued from the source's
    assert m2.devices()[0].save()["r14"] > regs1["r14"]


def test_save_load_device_state_roundtrip(machines):
    m = machines(4 * MiB)
    m.load_boot_sector(make_image(1))
    devs = m.devices()
    assert [d.idstr for d in devs] == ["cpu", "serial", "mc146818rtc", "port92", "globalstate"]
    for d in devs:
        st = d.save()
        assert set(st) == {f.name for f in d.vmsd.fields}
        d.load(st)
        assert encode(d.vmsd, d.save()) == encode(d.vmsd, st) or d.idstr == "cpu"


def test_serial_unix_socket(machines, tmp_path):
    sock_path = str(tmp_path / "ser.sock")
    m = machines(64 * MiB, f"unix:{sock_path},server=on,wait=off")
    m.load_boot_sector(make_image(16))
    m.start()  # runs with nobody connected: output dropped
    time.sleep(0.1)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(sock_path)
    c.settimeout(5)
    got = b""
    while len(got) < 50:
        got += c.recv(4096)
    assert set(got) <= set(b".\n")
    # input reaches the UART receive side
    c.sendall(b"x")
    wait_for(lambda: m.serial.lsr & 1)
    m.pause()
    assert m.serial.pio_read(0x3F8, 1) == ord("x")
    c.close()


# ---------------------------------------------------------------------------------------------
# memory layout and the CMOS memory-size bytes


def cmos(m: KvmMachine, idx: int) -> int:
    m.rtc.pio_write(0x70, 1, idx)
    return m.rtc.pio_read(0x71, 1)


@pytest.mark.parametrize("mem", [64 * MiB, 1 * GiB, 4 * GiB + 512 * MiB])
def test_cmos_memory_size(machines, mem):
    m = machines(mem)
    low = mem if mem < 0xE0000000 else 3 * GiB
    high = mem - low
    assert m.lowmem_size == low
    assert cmos(m, 0x15) | cmos(m, 0x16) << 8 == 640
    ext = min((low - MiB) // 1024, 65535)
    assert cmos(m, 0x17) | cmos(m, 0x18) << 8 == ext
    assert cmos(m, 0x30) | cmos(m, 0x31) << 8 == ext
    assert cmos(m, 0x34) | cmos(m, 0x35) << 8 == (low - 16 * MiB) // 65536
    assert cmos(m, 0x5B) | cmos(m, 0x5C) << 8 | cmos(m, 0x5D) << 16 == high // 65536
    # RTC status registers and a BCD time
    assert cmos(m, 0x0A) == 0x26 and cmos(m, 0x0B) == 0x02 and cmos(m, 0x0D) == 0x80
    sec = cmos(m, 0x00)
    assert sec >> 4 < 6 and sec & 15 < 10
    # memory map
    assert m.gpa_to_offset(0) == 0 and m.gpa_to_offset(low - 1) == low - 1
    with pytest.raises(GuestError):
        m.gpa_to_offset(low)
    if high:
        assert m.gpa_to_offset(4 * GiB) == low
        assert m.gpa_to_offset(4 * GiB + high - 1) == mem - 1
        with pytest.raises(GuestError):
            m.gpa_to_offset(4 * GiB + high)
        with pytest.raises(GuestError):
            m.gpa_to_offset(0xFEE00000)
    # the guest reads the layout from these bytes: with ws=0 its loop bounds are r12 / r13
    m.load_boot_sector(make_image(0))
    m.start()
    st = wait_for(lambda: _loop_state(m))
    assert st["r12"] == low
    assert st["r13"] == 4 * GiB + high


def _loop_state(m: KvmMachine, r12: int | None = None):
    """The saved vCPU state once the guest has reached its ring-3 loop (with `r12`: once that
    register holds the loop's bound, not what ring-3 entry left in it), else None (leaves it paused then)."""
    m.pause()
    st = m.devices()[0].save()
    if st["cs_selector"] == 0x2B and (r12 is None or st["r12"] == r12):
        return st
    m.resume()
    return None


def test_bad_memory_sizes():
    with pytest.raises(GuestError):
        KvmMachine(3 * MiB)
    with pytest.raises(GuestError):
        KvmMachine(0)


def test_hlt_keeps_vcpu_idle(machines):
    m = machines(4 * MiB)
    img = bytearray(512)
    img[0:4] = b"\xfa\xf4\xeb\xfd"  # cli; hlt; jmp back to the hlt
    img[510:] = b"\x55\xaa"
    m.load_boot_sector(bytes(img))
    m.start()
    wait_for(lambda: m.halted)
    assert m.running
    for _ in range(3):
        m.pause()
        st = m.devices()[0].save()
        assert st["halted"] == 1 and st["rip"] == 0x7C02
        m.resume()
        time.sleep(0.05)
        assert m.halted
    m.pause()
    st["halted"] = 0
    m.devices()[0].load(st)  # un-halt: it runs the jmp and halts again
    m.resume()
    wait_for(lambda: m.halted)


def test_fatal_exit_reported(tmp_path):
    fatal: list[str] = []
    m = KvmMachine(4 * MiB, on_fatal=fatal.append)
    try:
        # flat 32-bit protected mode with an empty IDT, then int3: a triple fault on real KVM,
        # an emulation failure (INTERNAL_ERROR) on kvm_pvm
        img = bytearray(512)
        img[0:3] = b"\xcc\xeb\xfe"
        img[510:] = b"\x55\xaa"
        m.load_boot_sector(bytes(img))
        cpu = m.devices()[0]
        st = cpu.save()
        st["cr0"] |= 1
        for seg in ("cs", "ds", "es", "ss", "fs", "gs"):
            st[f"{seg}_limit"] = 0xFFFFFFFF
            st[f"{seg}_attrs"] = [11 if seg == "cs" else 3, 1, 0, 1, 1, 0, 1, 0, 0]
        st["idt_limit"] = 0
        cpu.load(st)
        m.start()
        wait_for(lambda: fatal, timeout=10)
        assert "SHUTDOWN" in fatal[0] or "INTERNAL" in fatal[0], fatal
        m.pause()  # must not hang on a dead vCPU
        assert not m.running
    finally:
        m.close()


def test_closing_a_memfd_machine_releases_its_file_and_mappings():
    """Guest RAM on a memfd: close() closes the file and both mappings (else each machine made in a
    process would pin its whole RAM until the process ends)."""
    before = set(os.listdir("/proc/self/fd"))
    m = KvmMachine(4 * MiB, memfd=True)
    assert m.ram_fd is not None and m.ram_alias is not None
    m.close()
    assert m.ram_fd is None and m.ram_alias is None
    assert set(os.listdir("/proc/self/fd")) <= before
    maps = open("/proc/self/maps").read()
    assert "livemig-guest-ram" not in maps
