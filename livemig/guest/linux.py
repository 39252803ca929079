"""The Linux test guest: Debian's kernel (linux-image-amd64) and a busybox initramfs built here.

``prepare(dir)`` writes ``vmlinux`` (the ELF inside /boot/vmlinuz-*, extracted once) and
``initramfs.cpio`` (uncompressed newc: busybox-static, and an /init that prints ``INIT_MARKER``,
starts a once-a-second counter and runs a shell on the console). Both are cached by content.

The initramfs also holds ``SPIN_INIT``, a 122-byte static program that loops forever without a
system call. Booted with ``SPIN_APPEND`` it is init on hosts whose KVM cannot run a guest
kernel's system calls (kvm_pvm, see machine/pvm_compat.py): the kernel stays up with the
console tty open for init, so typed input is still echoed by the guest's tty.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shutil
import stat
import struct
from pathlib import Path

from ..errors import GuestError
from ..machine.linux_boot import extract_vmlinux

INIT_MARKER = "LIVEMIG-INIT-MARKER"
COUNTER_PREFIX = "LIVEMIG-COUNTER"
BUSYBOX_PATHS = ("/bin/busybox", "/usr/bin/busybox")

# console=ttyS0: log on the UART; pci=off, acpi=off: the machine has neither; no ACPI or MP table,
# so the kernel runs on the PIC through the LAPIC's virtual wire. panic=-1 stops instead of hanging.
DEFAULT_APPEND = "console=ttyS0 earlyprintk=serial,ttyS0 pci=off acpi=off nokaslr panic=-1 rdinit=/init"
SPIN_INIT = "/bin/spin"
SPIN_APPEND = DEFAULT_APPEND.replace("rdinit=/init", f"rdinit={SPIN_INIT}")

INIT_SCRIPT = f"""#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev 2>/dev/null
/bin/busybox --install -s /bin
echo {INIT_MARKER}
(n=0; while true; do echo {COUNTER_PREFIX} $n; n=$((n+1)); sleep 1; done) &
exec /bin/busybox setsid /bin/busybox cttyhack /bin/busybox sh
"""


def find_kernel() -> str:
    """Debian's newest installed kernel image."""
    images = sorted(glob.glob("/boot/vmlinuz-*"))
    if not images:
        raise GuestError("no kernel in /boot: install one (apt-get install -y linux-image-amd64)")
    return images[-1]


def find_busybox() -> str:
    for p in BUSYBOX_PATHS:
        if os.path.exists(p):
            return p
    found = shutil.which("busybox")
    if found:
        return found
    raise GuestError("busybox not found: apt-get install -y busybox-static")


def _cpio_entry(name: str, mode: int, data: bytes = b"", ino: int = 1, rdev: tuple[int, int] = (0, 0)) -> bytes:
    """One newc record: ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
    namesize check, as 8 hex digits each, then the name and the data, each padded to 4 bytes."""
    namez = name.encode() + b"\0"
    hdr = "070701" + "".join(f"{v:08X}" for v in (
        ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0))
    out = hdr.encode() + namez
    out += b"\0" * (-len(out) % 4)
    out += data + b"\0" * (-len(data) % 4)
    return out


def spin_program() -> bytes:
    """A static x86-64 ELF executable whose one instruction jumps to itself (no system call)."""
    base, ehsize, phsize = 0x400000, 64, 56
    code = b"\xeb\xfe"  # jmp .
    size = ehsize + phsize + len(code)
    ehdr = struct.pack("<4s5B7xHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0,  # 64-bit, little-endian, SysV
                       2, 0x3E, 1, base + ehsize + phsize, ehsize, 0,  # ET_EXEC, x86-64, entry, phoff
                       0, ehsize, phsize, 1, 0, 0, 0)  # one program header, no sections
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 0, base, base, size, size, 0x1000)  # PT_LOAD, R+X, the whole file
    return ehdr + phdr + code


def build_initramfs(busybox: bytes, init_script: str = INIT_SCRIPT) -> bytes:
    """An uncompressed newc cpio archive (the kernel unpacks it without running a decompressor)."""
    out = bytearray()
    ino = 1
    for d in ("bin", "dev", "proc", "sys", "tmp"):
        out += _cpio_entry(d, stat.S_IFDIR | 0o755, ino=ino)
        ino += 1
    out += _cpio_entry("dev/console", stat.S_IFCHR | 0o600, ino=ino, rdev=(5, 1))
    ino += 1
    out += _cpio_entry("bin/busybox", stat.S_IFREG | 0o755, busybox, ino=ino)
    ino += 1
    out += _cpio_entry(SPIN_INIT.lstrip("/"), stat.S_IFREG | 0o755, spin_program(), ino=ino)
    ino += 1
    out += _cpio_entry("init", stat.S_IFREG | 0o755, init_script.encode(), ino=ino)
    out += _cpio_entry("TRAILER!!!", 0, ino=0)
    out += b"\0" * (-len(out) % 512)
    return bytes(out)


def _write_if_changed(path: Path, data: bytes) -> None:
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def prepare(out_dir: str | os.PathLike, kernel: str | None = None) -> tuple[str, str]:
    """Write (or reuse) ``vmlinux`` and ``initramfs.cpio`` in `out_dir`; returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    kpath = kernel or find_kernel()
    kdata = Path(kpath).read_bytes()
    stamp = out / "vmlinux.source"
    key = f"{kpath} {hashlib.sha256(kdata).hexdigest()}"
    vmlinux = out / "vmlinux"
    if not (vmlinux.exists() and stamp.exists() and stamp.read_text() == key):
        tmp = out / "vmlinux.tmp"
        tmp.write_bytes(extract_vmlinux(kdata))
        os.replace(tmp, vmlinux)
        stamp.write_text(key)
    initramfs = out / "initramfs.cpio"
    _write_if_changed(initramfs, build_initramfs(Path(find_busybox()).read_bytes()))
    return str(vmlinux), str(initramfs)
