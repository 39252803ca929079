"""The Linux boot protocol pieces: bzImage/ELF parsing, vmlinux extraction, boot_params, initramfs."""
from __future__ import annotations

import gzip
import lzma
import struct

import pytest

from livemig.errors import GuestError
from livemig.guest.linux import INIT_MARKER, build_initramfs, find_kernel
from livemig.machine import linux_boot as lb


def _elf(segments: list[tuple[int, bytes, int]], entry: int = 0x1000000) -> bytes:
    """A minimal 64-bit x86-64 ELF with PT_LOAD segments (paddr, data, memsz)."""
    phoff = 64
    n = len(segments)
    data_off = phoff + 56 * n
    hdr = bytearray(64)
    hdr[0:4] = b"\x7fELF"
    hdr[4], hdr[5], hdr[6] = 2, 1, 1
    struct.pack_into("<HHIQQQIHHHHHH", hdr, 16, 2, 62, 1, entry, phoff, 0, 0, 64, 56, n, 64, 0, 0)
    ph = bytearray()
    body = bytearray()
    for paddr, data, memsz in segments:
        ph += struct.pack("<IIQQQQQQ", 1, 5, data_off + len(body), paddr | 0xFFFFFFFF80000000, paddr,
                          len(data), memsz, 0x1000)
        body += data
    return bytes(hdr + ph + body)


def _bzimage(payload: bytes, version: int = 0x20F, setup_sects: int = 4) -> bytes:
    setup = bytearray((setup_sects + 1) * 512)
    setup[lb.BP_SETUP_SECTS] = setup_sects
    setup[0x201] = 0x6A  # header ends at 0x26c
    setup[lb.BP_HEADER:lb.BP_HEADER + 4] = b"HdrS"
    struct.pack_into("<H", setup, lb.BP_VERSION, version)
    struct.pack_into("<I", setup, lb.BP_INITRD_ADDR_MAX, 0x7FFFFFFF)
    pm = bytearray(0x400) + payload
    struct.pack_into("<II", setup, lb.BP_PAYLOAD_OFFSET, 0x400, len(payload))
    return bytes(setup + pm)


ELF = _elf([(0x1000000, b"\x90" * 100, 0x3000), (0x1200000, b"data", 4)])


def test_parse_elf_segments_and_entry():
    segs, entry = lb.parse_elf(ELF)
    assert entry == 0x1000000
    assert [(s.paddr, len(s.data), s.memsz) for s in segs] == [(0x1000000, 100, 0x3000), (0x1200000, 4, 4)]


@pytest.mark.parametrize("compress", [lambda b: lzma.compress(b, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32),
                                      gzip.compress], ids=["xz", "gzip"])
def test_extract_vmlinux(compress):
    bz = _bzimage(compress(ELF) + struct.pack("<I", len(ELF)))  # the kernel appends the size
    assert lb.extract_vmlinux(bz) == ELF
    k = lb.load_kernel(bz, uncompressed=True)
    assert k.source == "vmlinux" and k.entry == 0x1000000 and k.setup_header is not None


def test_bzimage_runs_from_1mib_entry_plus_0x200():
    k = lb.load_kernel(_bzimage(b"x" * 64))
    assert k.source == "bzImage"
    assert k.entry == lb.BZIMAGE_LOAD + 0x200
    assert k.segments[0].paddr == lb.BZIMAGE_LOAD


@pytest.mark.parametrize("data,msg", [
    (b"MZ" + bytes(1000), "neither a bzImage nor an ELF"),
    (_bzimage(b"x", version=0x20A), "no 64-bit entry"),
    (ELF[:4] + b"\x01" + ELF[5:], "64-bit little-endian"),
    (ELF[:18] + b"\x03\x00" + ELF[20:], "not x86-64"),
    (ELF[:120], "malformed"),
], ids=["pe-exe", "old-protocol", "elf32", "not-x86-64", "truncated"])
def test_bad_kernels_get_clear_errors(data, msg):
    with pytest.raises(GuestError, match=msg):
        lb.load_kernel(data)


def test_unknown_payload_compression_is_refused():
    with pytest.raises(GuestError, match="not supported"):
        lb.extract_vmlinux(_bzimage(b"\x28\xb5\x2f\xfd" + bytes(32)))  # zstd


def test_corrupt_payload_is_refused():
    xz = bytearray(lzma.compress(ELF, format=lzma.FORMAT_XZ))
    xz[40] ^= 0xFF
    with pytest.raises(GuestError, match="decompress"):
        lb.extract_vmlinux(_bzimage(bytes(xz)))


def test_boot_params_layout():
    k = lb.load_kernel(ELF)
    e820 = lb.e820_map(128 << 20, 0, 4 << 30)
    bp = lb.boot_params(k, b"console=ttyS0", 0x7000000, 0x1234, e820)
    assert len(bp) == 4096
    assert bp[lb.BP_HEADER:lb.BP_HEADER + 4] == b"HdrS"
    assert struct.unpack_from("<H", bp, lb.BP_BOOT_FLAG)[0] == 0xAA55
    assert bp[lb.BP_TYPE_OF_LOADER] == 0xFF
    assert bp[lb.BP_LOADFLAGS] & lb.LOADED_HIGH
    assert struct.unpack_from("<III", bp, lb.BP_CMD_LINE_PTR) == (lb.CMDLINE_ADDR, 0x7FFFFFFF, 0x1000000)
    assert struct.unpack_from("<II", bp, lb.BP_RAMDISK_IMAGE) == (0x7000000, 0x1234)
    assert bp[lb.BP_E820_ENTRIES] == 3
    entries = [struct.unpack_from("<QQI", bp, lb.BP_E820_TABLE + 20 * i) for i in range(3)]
    assert entries[2] == (0x100000, (128 << 20) - 0x100000, lb.E820_RAM)
    assert sum(size for _, size, t in entries if t == lb.E820_RAM) == (128 << 20) - (0x100000 - lb.EBDA_START)


def test_initrd_goes_high_and_must_fit_above_the_kernel():
    k = lb.load_kernel(ELF)
    assert lb.initrd_address(k, 5000, 128 << 20) == ((128 << 20) - 5000) & ~0xFFF
    with pytest.raises(GuestError, match="does not fit"):
        lb.initrd_address(k, 127 << 20, 128 << 20)


def test_page_tables_identity_map_4gib():
    t = lb.page_tables()
    pml4 = struct.unpack_from("<Q", t[lb.PML4_ADDR])[0]
    assert pml4 & ~0xFFF == lb.PDPT_ADDR
    pd3 = t[lb.PD_ADDR + 0x3000]
    last = struct.unpack_from("<Q", pd3, 511 * 8)[0]
    assert last == ((4 << 30) - (2 << 20)) | 0x83


def test_initramfs_is_a_newc_archive_with_init_and_console():
    img = build_initramfs(b"\x7fELF-busybox")
    assert img.startswith(b"070701") and len(img) % 512 == 0
    assert b"TRAILER!!!" in img and INIT_MARKER.encode() in img
    names = []
    pos = 0
    while True:
        hdr = img[pos:pos + 110]
        fields = [int(hdr[6 + 8 * i:14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = fields[11], fields[6]
        name = img[pos + 110:pos + 110 + namesize - 1].decode()
        if name == "dev/console":
            assert fields[1] & 0o170000 == 0o020000 and (fields[9], fields[10]) == (5, 1)
        names.append(name)
        if name == "TRAILER!!!":
            break
        pos += 110 + namesize
        pos += -pos % 4
        pos += filesize + (-filesize % 4)
    assert {"init", "bin/busybox", "dev/console"} <= set(names)


def test_debian_kernel_extracts_if_installed():
    try:
        path = find_kernel()
    except GuestError:
        pytest.skip("no kernel in /boot (the Linux-guest tests need linux-image-amd64)")
    with open(path, "rb") as f:
        k = lb.load_kernel(f.read(), uncompressed=True)
    assert k.entry == 0x1000000 and k.segments
