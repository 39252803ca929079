"""The Linux machine on real KVM, with a tiny 64-bit guest handed over by the Linux boot protocol:
long-mode entry, boot_params in RSI, in-kernel irqchip/PIT, and the whole-machine save/restore."""
from __future__ import annotations

import os
import struct
import time

import pytest

from livemig.errors import GuestError
from livemig.machine import linux_boot as lb
from livemig.machine.vm import KvmMachine
from livemig.wire.cursor import Cursor
from livemig.wire.vmstate import decode, encode

MiB = 1 << 20

if not os.path.exists("/dev/kvm"):  # pragma: no cover
    pytest.skip("no /dev/kvm", allow_module_level=True)

# At 0x1000000 in 64-bit mode: print 'Y' if [rsi+0x202] is "HdrS" (boot_params found), else 'N',
# then a '.' after every 100000 turns of a spin loop, forever.
PROGRAM = bytes.fromhex(
    "8b8602020000"  # mov eax, [rsi+0x202]
    "3d48647253"    # cmp eax, 'HdrS'
    "b059"          # mov al, 'Y'
    "7402"          # je +2
    "b04e"          # mov al, 'N'
    "66baf803"      # mov dx, 0x3f8
    "ee"            # out dx, al
    "b02e"          # loop: mov al, '.'
    "ee"            # out dx, al
    "b9a0860100"    # mov ecx, 100000
    "ffc9"          # spin: dec ecx
    "75fc"          # jnz spin
    "ebf2"          # jmp loop
)


def _elf(code: bytes, paddr: int = 0x1000000) -> bytes:
    hdr = bytearray(64)
    hdr[0:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 2, 62, 1, paddr, 64, 0, 0, 64, 56, 1, 64, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 120, paddr, paddr, len(code), len(code) + 4096, 0x1000)
    return bytes(hdr) + ph + code


def _wait(pred, timeout=60.0):
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture
def linux_machines():
    made: list[KvmMachine] = []
    fatal: list[str] = []

    def make(serial="null", linux=True):
        m = KvmMachine(64 * MiB, serial, on_fatal=fatal.append, linux=linux)
        made.append(m)
        return m

    yield make
    for m in made:
        m.close()
    assert not fatal, fatal


def _transfer(src: KvmMachine, dst: KvmMachine) -> None:
    """RAM and every device, through the vmstate encoding, as a migration carries them."""
    dst.ram[:] = src.ram[:]
    states = {(d.idstr, d.instance_id): encode(d.vmsd, d.save()) for d in src.devices()}
    for d in dst.devices():
        d.load(decode(d.vmsd, Cursor(states[(d.idstr, d.instance_id)])))


def test_long_mode_entry_finds_boot_params(linux_machines, tmp_path):
    out = tmp_path / "serial"
    m = linux_machines(f"file:{out}")
    m.load_linux(lb.load_kernel(_elf(PROGRAM)), b"", "console=ttyS0")
    m.start()
    _wait(lambda: out.exists() and out.read_bytes().count(b".") >= 2)
    assert out.read_bytes().startswith(b"Y.")
    cmd = m.read_guest(lb.CMDLINE_ADDR, 14)
    assert cmd == b"console=ttyS0\0"


def test_linux_machine_devices_in_restore_order(linux_machines):
    m = linux_machines()
    names = [d.idstr for d in m.devices()]
    assert names == ["kvm-pit", "kvmclock", "kvm-i8259", "kvm-i8259", "kvm-ioapic", "cpu", "serial",
                     "mc146818rtc", "port92", "globalstate"]
    cpu = m.devices()[5].save()
    assert {"cpu/lapic", "cpu/xsave", "cpu/xcrs", "cpu/debugregs", "cpu/msrs", "cpu/tsc"} <= set(cpu)
    assert cpu["cpu/msrs"]["count"] > 0 and cpu["cpu/tsc"]["tsc_khz"] > 0
    lapic = cpu["cpu/lapic"]["lapic"]
    assert len(lapic) == 1024


def test_whole_machine_moves_to_a_fresh_vm_and_runs_on(linux_machines, tmp_path):
    out1, out2 = tmp_path / "one", tmp_path / "two"
    a = linux_machines(f"file:{out1}")
    a.load_linux(lb.load_kernel(_elf(PROGRAM)), b"", "")
    a.start()
    _wait(lambda: out1.exists() and out1.read_bytes().count(b".") >= 2)
    a.pause()
    seen = out1.read_bytes()
    b = linux_machines(f"file:{out2}")
    _transfer(a, b)
    b.start()
    _wait(lambda: out2.exists() and out2.read_bytes().count(b".") >= 2)
    assert not out2.read_bytes().startswith(b"Y"), "the program started again instead of carrying on"
    time.sleep(0.3)
    assert out1.read_bytes() == seen, "the paused source ran on"


def test_machine_kinds_do_not_mix(linux_machines):
    lin = linux_machines()
    sect = linux_machines(linux=False)
    lin_cpu = [d for d in lin.devices() if d.idstr == "cpu"][0]
    sect_cpu = [d for d in sect.devices() if d.idstr == "cpu"][0]
    with pytest.raises(GuestError, match="not started with --kernel"):
        sect_cpu.load(lin_cpu.save())
    with pytest.raises(GuestError, match="not a Linux machine"):
        lin_cpu.load(sect_cpu.save())


def test_load_linux_refuses_bad_input(linux_machines):
    m = linux_machines()
    with pytest.raises(GuestError, match="beyond"):
        m.load_linux(lb.load_kernel(_elf(PROGRAM, paddr=0x3FFF000)), b"", "")
    with pytest.raises(GuestError, match="NUL"):
        m.load_linux(lb.load_kernel(_elf(PROGRAM)), b"", "a\0b")
    with pytest.raises(GuestError, match="does not fit"):
        m.load_linux(lb.load_kernel(_elf(PROGRAM)), bytes(60 * MiB), "")
    sect = linux_machines(linux=False)
    with pytest.raises(GuestError, match="Linux machine"):
        sect.load_linux(lb.load_kernel(_elf(PROGRAM)), b"", "")


# after a cmp: print 'M' if equal, else 'X', on COM1, then spin
SAY_M_IF_EQUAL = bytes.fromhex(
    "b04d"                  # mov al, 'M'
    "7402"                  # je +2
    "b058"                  # mov al, 'X'
    "66baf803"              # mov dx, 0x3f8
    "ee"                    # out dx, al
    "ebfe"                  # jmp $
)

# LDMXCSR/STMXCSR at CPL0 (kvm_pvm's emulator stops on both; livemig's fixups finish them there)
MXCSR_PROGRAM = bytes.fromhex(
    "c78600010000809f0000"  # mov dword [rsi+0x100], 0x9f80 (default MXCSR with FZ)
    "0fae9600010000"        # ldmxcsr [rsi+0x100]
    "0fae9e04010000"        # stmxcsr [rsi+0x104]
    "8b8604010000"          # mov eax, [rsi+0x104]
    "3d809f0000"            # cmp eax, 0x9f80
) + SAY_M_IF_EQUAL


def _run_to_verdict(linux_machines, tmp_path, program: bytes, dirty_log: bool = False):
    """Run `program` until it prints its verdict ('M' expected), then pause; the machine."""
    out = tmp_path / "serial"
    m = linux_machines(f"file:{out}")
    m.load_linux(lb.load_kernel(_elf(program)), b"", "")
    if dirty_log:
        m.dirty_log_start()
        m.dirty_log_sync()  # start from a clean log
    m.start()
    _wait(lambda: out.exists() and out.stat().st_size >= 1)
    assert out.read_bytes() == b"M"
    m.pause()
    return m


def test_mxcsr_round_trip_at_cpl0(linux_machines, tmp_path):
    m = _run_to_verdict(linux_machines, tmp_path, MXCSR_PROGRAM)
    xsave = [d for d in m.devices() if d.idstr == "cpu"][0].save()["cpu/xsave"]["xsave"]
    assert struct.unpack_from("<I", xsave, 24)[0] == 0x9F80  # MXCSR in the legacy region


# STMXCSR into a page the guest writes no other way: on kvm_pvm livemig's fixup writes it, and
# KVM's dirty log never sees that write, so the machine must report the page itself
STMXCSR_ELSEWHERE = bytes.fromhex(
    "0fae9e04110000"        # stmxcsr [rsi+0x1104]
    "8b8604110000"          # mov eax, [rsi+0x1104]
    "3d801f0000"            # cmp eax, 0x1f80 (the reset MXCSR)
) + SAY_M_IF_EQUAL


def test_a_guest_page_written_for_the_guest_by_an_emulated_store_is_dirty(linux_machines, tmp_path):
    m = _run_to_verdict(linux_machines, tmp_path, STMXCSR_ELSEWHERE, dirty_log=True)
    rsi = [d for d in m.devices() if d.idstr == "cpu"][0].save()["rsi"]
    page = m.gpa_to_offset(rsi + 0x1104) // 4096
    bitmap = m.dirty_log_sync()
    assert int(bitmap[page // 64]) >> (page % 64) & 1, f"page {page} written by STMXCSR is not dirty"
    m.dirty_log_stop()
