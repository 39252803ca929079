"""The x86-64 Linux boot protocol: load a bzImage or an ELF vmlinux, an initrd and a command line,
and hand over in 64-bit mode (Documentation/arch/x86/boot.rst, "64-bit boot protocol").

Memory layout (guest-physical): GDT 0x500, boot_params ("zero page") 0x7000, page tables
0x9000 (PML4), 0xA000 (PDPT), 0xB000.. (page directories, 2 MiB pages identity-mapping the first
4 GiB), command line 0x20000, kernel at its load address (1 MiB for a bzImage's protected-mode part,
the ELF's physical addresses for a vmlinux), initrd at the top of low RAM.
"""
from __future__ import annotations

import lzma
import struct
import zlib
from dataclasses import dataclass

from ..errors import GuestError

GDT_ADDR = 0x500
BOOT_PARAMS_ADDR = 0x7000
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000  # four page directories: 0xB000..0xEFFF
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
BZIMAGE_LOAD = 0x100000
EBDA_START = 0x9FC00

BOOT_CS = 0x10  # the selectors the 64-bit boot protocol asks for
BOOT_DS = 0x18

# boot_params offsets
BP_E820_ENTRIES = 0x1E8
BP_SETUP_SECTS = 0x1F1
BP_VID_MODE = 0x1FA
BP_BOOT_FLAG = 0x1FE
BP_HEADER = 0x202
BP_VERSION = 0x206
BP_TYPE_OF_LOADER = 0x210
BP_LOADFLAGS = 0x211
BP_RAMDISK_IMAGE = 0x218
BP_RAMDISK_SIZE = 0x21C
BP_HEAP_END_PTR = 0x224
BP_CMD_LINE_PTR = 0x228
BP_INITRD_ADDR_MAX = 0x22C
BP_KERNEL_ALIGNMENT = 0x230
BP_CMDLINE_SIZE = 0x238
BP_PAYLOAD_OFFSET = 0x248
BP_PAYLOAD_LENGTH = 0x24C
BP_E820_TABLE = 0x2D0
E820_MAX = 128
E820_RAM = 1
E820_RESERVED = 2

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80

ELF_MAGIC = b"\x7fELF"
XZ_MAGIC = b"\xfd7zXZ\x00"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass
class Segment:
    paddr: int
    data: bytes
    memsz: int


@dataclass
class Kernel:
    """What the loader puts in memory: segments, the 64-bit entry point and the setup header."""

    segments: list[Segment]
    entry: int
    setup_header: bytes | None  # bytes 0x1f1.. of a bzImage, None for a bare vmlinux
    source: str  # "bzImage" or "vmlinux"


def _is_bzimage(data: bytes) -> bool:
    return len(data) >= 0x260 and data[BP_HEADER:BP_HEADER + 4] == b"HdrS"


def _setup_size(data: bytes) -> int:
    sects = data[BP_SETUP_SECTS] or 4
    return (sects + 1) * 512


def _setup_header(data: bytes) -> bytes:
    end = 0x202 + data[0x201]  # the jump at 0x200 skips the header: its end is 0x202 + byte 0x201
    return bytes(data[0x1F1:end])


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The uncompressed ELF vmlinux inside a bzImage (xz or gzip payload)."""
    if not _is_bzimage(bzimage):
        raise GuestError("not a bzImage (no 'HdrS' setup header)")
    (version,) = struct.unpack_from("<H", bzimage, BP_VERSION)
    if version < 0x208:
        raise GuestError(f"boot protocol {version >> 8}.{version & 0xff} has no payload fields (need >= 2.08)")
    off, length = struct.unpack_from("<II", bzimage, BP_PAYLOAD_OFFSET)
    start = _setup_size(bzimage) + off
    payload = bzimage[start:start + length]
    if len(payload) != length or not length:
        raise GuestError("bzImage payload lies outside the file")
    try:
        if payload.startswith(XZ_MAGIC):
            out = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(payload)
        elif payload.startswith(GZIP_MAGIC):  # the kernel appends the size: ignore what follows
            out = zlib.decompressobj(wbits=31).decompress(payload)
        else:
            raise GuestError(f"bzImage payload compression {payload[:6].hex()} is not supported (xz and gzip are)")
    except (lzma.LZMAError, zlib.error, EOFError) as e:
        raise GuestError(f"cannot decompress the bzImage payload: {e}") from None
    if not out.startswith(ELF_MAGIC):
        raise GuestError("the bzImage payload is not an ELF vmlinux")
    return out


def parse_elf(data: bytes) -> tuple[list[Segment], int]:
    """PT_LOAD segments (at their physical addresses) and the entry point of a 64-bit ELF."""
    if not data.startswith(ELF_MAGIC) or len(data) < 64:
        raise GuestError("not an ELF file")
    if data[4] != 2 or data[5] != 1:
        raise GuestError("vmlinux is not a 64-bit little-endian ELF")
    (machine,) = struct.unpack_from("<H", data, 18)
    if machine != 62:
        raise GuestError(f"vmlinux is for ELF machine {machine}, not x86-64 (62)")
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    segs: list[Segment] = []
    for i in range(phnum):
        p = phoff + i * phentsize
        if p + 56 > len(data):
            raise GuestError("ELF program headers run past the end of the file")
        p_type, _flags, p_offset, _vaddr, p_paddr, p_filesz, p_memsz, _align = struct.unpack_from("<IIQQQQQQ", data, p)
        if p_type != 1:  # PT_LOAD
            continue
        if p_offset + p_filesz > len(data) or p_filesz > p_memsz:
            raise GuestError(f"ELF segment {i} is malformed")
        segs.append(Segment(p_paddr, data[p_offset:p_offset + p_filesz], p_memsz))
    if not segs:
        raise GuestError("ELF file has no loadable segment")
    return segs, entry


def load_kernel(data: bytes, *, uncompressed: bool = False) -> Kernel:
    """A bzImage (run as is, or its vmlinux when `uncompressed`) or an ELF vmlinux."""
    if data.startswith(ELF_MAGIC):
        segs, entry = parse_elf(data)
        return Kernel(segs, entry, None, "vmlinux")
    if not _is_bzimage(data):
        raise GuestError("kernel is neither a bzImage nor an ELF vmlinux")
    (version,) = struct.unpack_from("<H", data, BP_VERSION)
    if version < 0x20C:
        raise GuestError(f"boot protocol {version >> 8}.{version & 0xff} < 2.12 has no 64-bit entry")
    header = _setup_header(data)
    if uncompressed:
        segs, entry = parse_elf(extract_vmlinux(data))
        return Kernel(segs, entry, header, "vmlinux")
    pm = data[_setup_size(data):]
    # the 64-bit entry of the protected-mode part is 0x200 past its start
    return Kernel([Segment(BZIMAGE_LOAD, pm, len(pm))], BZIMAGE_LOAD + 0x200, header, "bzImage")


def e820_map(low_ram: int, high_ram: int, high_base: int) -> list[tuple[int, int, int]]:
    out = [(0, EBDA_START, E820_RAM), (EBDA_START, 0x100000 - EBDA_START, E820_RESERVED),
           (0x100000, low_ram - 0x100000, E820_RAM)]
    if high_ram:
        out.append((high_base, high_ram, E820_RAM))
    return out


def boot_params(kernel: Kernel, cmdline: bytes, initrd_addr: int, initrd_size: int,
                e820: list[tuple[int, int, int]]) -> bytes:
    bp = bytearray(4096)
    if kernel.setup_header is not None:
        bp[0x1F1:0x1F1 + len(kernel.setup_header)] = kernel.setup_header
    else:  # a bare vmlinux: the fields a bzImage header would carry
        struct.pack_into("<H", bp, BP_BOOT_FLAG, 0xAA55)
        bp[BP_HEADER:BP_HEADER + 4] = b"HdrS"
        struct.pack_into("<H", bp, BP_VERSION, 0x020F)
        struct.pack_into("<I", bp, BP_KERNEL_ALIGNMENT, 0x1000000)
        struct.pack_into("<I", bp, BP_INITRD_ADDR_MAX, 0x7FFFFFFF)
    struct.pack_into("<H", bp, BP_VID_MODE, 0xFFFF)
    bp[BP_TYPE_OF_LOADER] = 0xFF
    bp[BP_LOADFLAGS] |= LOADED_HIGH | CAN_USE_HEAP
    struct.pack_into("<H", bp, BP_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, BP_CMD_LINE_PTR, CMDLINE_ADDR)
    struct.pack_into("<I", bp, BP_CMDLINE_SIZE, len(cmdline))
    struct.pack_into("<II", bp, BP_RAMDISK_IMAGE, initrd_addr, initrd_size)
    if len(e820) > E820_MAX:
        raise GuestError("too many e820 entries")
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (addr, size, typ) in enumerate(e820):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, addr, size, typ)
    return bytes(bp)


def initrd_address(kernel: Kernel, initrd_size: int, low_ram: int) -> int:
    """The highest page-aligned address below the end of low RAM and initrd_addr_max that fits."""
    addr_max = 0x37FFFFFF
    if kernel.setup_header is not None and len(kernel.setup_header) >= BP_INITRD_ADDR_MAX + 4 - 0x1F1:
        (addr_max,) = struct.unpack_from("<I", kernel.setup_header, BP_INITRD_ADDR_MAX - 0x1F1)
    top = min(low_ram, addr_max + 1)
    addr = (top - initrd_size) & ~0xFFF
    kernel_end = max(s.paddr + s.memsz for s in kernel.segments)
    if addr < kernel_end:
        raise GuestError(f"initrd of {initrd_size >> 10} KiB does not fit above the kernel "
                         f"(ends at {kernel_end:#x}) in {low_ram >> 20} MiB of low RAM")
    return addr


def page_tables() -> dict[int, bytes]:
    """Identity map of the first 4 GiB with 2 MiB pages: {guest-physical address: bytes}."""
    pml4 = struct.pack("<Q", PDPT_ADDR | 0x3).ljust(4096, b"\0")
    pdpt = b"".join(struct.pack("<Q", (PD_ADDR + 0x1000 * i) | 0x3) for i in range(4)).ljust(4096, b"\0")
    out = {PML4_ADDR: pml4, PDPT_ADDR: pdpt}
    for i in range(4):
        out[PD_ADDR + 0x1000 * i] = b"".join(
            struct.pack("<Q", ((i * 512 + j) << 21) | 0x83) for j in range(512))  # present, rw, 2 MiB
    return out


GDT = struct.pack("<4Q", 0, 0,
                  0x00AF9B000000FFFF,  # 0x10: 64-bit code
                  0x00CF93000000FFFF)  # 0x18: flat data
