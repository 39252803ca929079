"""Bad input to StreamDecoder and RPDecoder: each must raise ProtocolError with a clear message.

Every main-stream case is decoded twice, fed whole and fed one byte at a time: the error must be
raised while feeding (a live decoder must not sit waiting for bytes that cannot help), with the
same message both ways.
"""
from __future__ import annotations

import struct
import tracemalloc

import numpy as np
import pytest

from livemig.errors import ProtocolError
from livemig.wire import decoder as D
from livemig.wire import ram as R
from livemig.wire import returnpath as RP
from livemig.wire import stream as S
from livemig.wire.vmstate import Field, VMStateDescription, encode

TPS = R.TARGET_PAGE_SIZE
BLOCKS = [R.BlockInfo("pc.ram", 16 * TPS), R.BlockInfo("vga.vram", 4 * TPS)]
LOCAL = [D.LocalBlock(b.name, b.length) for b in BLOCKS]
DEV = VMStateDescription("dev", 2, (Field("a", "uint32"), Field("b", "uint8", count=2)),
                         subsections=(VMStateDescription("dev/sub", 1, (Field("c", "uint16"),)),))
DEVICES = {("dev", 0): DEV}
HDR = S.file_header()
PAGE = b"\x5a" * TPS


def ram_start(sid: int = 1, blocks=BLOCKS) -> bytes:
    return S.section_header(S.Section.START, sid, "ram", 0, 4) + R.setup_payload(blocks) + S.section_footer(sid)


def part(body: bytes, sid: int = 1) -> bytes:
    return S.section_header(S.Section.PART, sid) + body + R.eos() + S.section_footer(sid)


def word(offset: int, flags: int) -> bytes:
    return struct.pack(">Q", offset | flags)


def decode(data: bytes, chunk: int | None = None, **kw) -> list:
    dec = D.StreamDecoder(LOCAL, DEVICES, **kw)
    chunk = chunk or max(1, len(data))
    ev = []
    for i in range(0, len(data), chunk):
        ev += dec.feed(data[i:i + chunk])
    return ev


def expect_error(data: bytes, match: str, **kw) -> str:
    """ProtocolError matching `match`, raised while feeding, the same fed whole or byte by byte."""
    msgs = []
    for chunk in (None, 1):
        with pytest.raises(ProtocolError, match=match) as ei:
            decode(data, chunk, **kw)
        msgs.append(str(ei.value))
    assert msgs[0] == msgs[1]
    return msgs[0]


# ------------------------------------------------------------------ header


def test_bad_magic():
    expect_error(b"QEMU\x00\x00\x00\x03", r"not a migration stream: magic 0x51454d55, expected 0x5145564d")
    expect_error(b"\x00" * 8, "not a migration stream")
    assert "TLS" not in expect_error(b"\x00" * 8, "not a migration stream")


def test_tls_client_hello_is_named():
    """A TLS source talking to a plaintext destination: its ClientHello is read as the header."""
    expect_error(b"\x16\x03\x01\x02\x00\x01\x00\x01", r"magic 0x16030102.*TLS handshake.*set tls-creds here")


def test_version_2_is_obsolete():
    expect_error(b"QEVM\x00\x00\x00\x02", "version 2 .*obsolete")


@pytest.mark.parametrize("version", [0, 1, 4, 0x300, 0xFFFFFFFF])
def test_other_versions(version):
    expect_error(b"QEVM" + struct.pack(">I", version), f"unsupported stream version {version}, expected 3")


def test_header_required_unless_disabled():
    expect_error(S.eof() * 8, "not a migration stream")
    assert decode(S.eof(), expect_header=False) == [D.Eof()]


# ------------------------------------------------------------------ sections


@pytest.mark.parametrize("t", [0x05, 0x06, 0x09, 0x10, 0x7E, 0x7F, 0xFF])
def test_unknown_section_type(t):
    expect_error(HDR + bytes((t,)) + bytes(16), f"unknown section type 0x{t:02x}")


def test_vmdescription_only_after_eof():
    expect_error(HDR + S.vmdescription(b"{}"), "unknown section type 0x06")


@pytest.mark.parametrize("kind", [S.Section.FULL, S.Section.START])
@pytest.mark.parametrize("idstr,inst", [("nosuch", 0), ("dev", 1), ("ram", 1), ("RAM", 0)])
def test_unknown_idstr_or_instance(kind, idstr, inst):
    data = HDR + S.section_header(kind, 4, idstr, inst, 1) + bytes(32)
    expect_error(data, f"Unknown section or instance '{idstr}' {inst}")


def test_empty_idstr():
    expect_error(HDR + b"\x04\x00\x00\x00\x01\x00" + bytes(16), "empty section idstr")


def test_non_ascii_idstr():
    expect_error(HDR + b"\x04\x00\x00\x00\x01\x02\xc3\xa9" + bytes(16), "section idstr is not ASCII")


@pytest.mark.parametrize("version", [0, 3, 5, 0xFFFFFFFF])
def test_ram_version(version):
    expect_error(HDR + S.section_header(S.Section.START, 1, "ram", 0, version) + R.setup_payload(BLOCKS),
                 f"ram section version {version}, expected 4")


def test_device_version_newer_than_ours():
    data = HDR + S.section_header(S.Section.FULL, 2, "dev", 0, 3) + encode(DEV, {"a": 1, "b": [1, 2]})
    expect_error(data + S.section_footer(2), "section 'dev' version 3 is newer than ours \\(2\\)")


@pytest.mark.parametrize("kind", [S.Section.PART, S.Section.END])
def test_unknown_section_id(kind):
    expect_error(HDR + ram_start(1) + S.section_header(kind, 2) + R.eos(), f"unknown section id 2 in {kind.name}")
    # device (FULL) section ids can't be continued either
    dev = S.section_header(S.Section.FULL, 5, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2]}) + S.section_footer(5)
    expect_error(HDR + dev + S.section_header(kind, 5) + R.eos(), "unknown section id 5")


def test_bad_footer_marker():
    # RAM chunk: EOS then something other than 0x7E
    expect_error(HDR + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(BLOCKS) + b"\x7d\x00\x00\x00\x01",
                 r"Missing section footer for section 1 \(got 0x7d\)")
    # footer left out entirely: the next section's type byte is where the marker should be
    expect_error(HDR + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(BLOCKS) + S.eof(),
                 r"Missing section footer for section 1 \(got 0x00\)")
    dev = S.section_header(S.Section.FULL, 9, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2]})
    expect_error(HDR + dev + b"\x00\x00\x00\x00\x09", r"Missing section footer for section 9 \(got 0x00\)")


def test_mismatched_footer_id():
    expect_error(HDR + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(BLOCKS) + S.section_footer(2),
                 "Mismatched section id in footer: 2, expected 1")
    expect_error(HDR + ram_start(1) + S.section_header(S.Section.PART, 1) + R.eos() + S.section_footer(0x01000001),
                 "Mismatched section id in footer: 16777217, expected 1")
    dev = S.section_header(S.Section.FULL, 9, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2]})
    expect_error(HDR + dev + S.section_footer(8), "Mismatched section id in footer: 8, expected 9")


def test_unknown_device_subsection():
    dev = S.section_header(S.Section.FULL, 9, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2]})
    sub = b"\x05\x07dev/bad" + struct.pack(">I", 1)
    expect_error(HDR + dev + sub + S.section_footer(9), "dev: unknown subsection 'dev/bad'")
    # a subsection of another device ends ours; the footer check then fails
    sub = b"\x05\x05other" + struct.pack(">I", 1)
    expect_error(HDR + dev + sub + S.section_footer(9), r"Missing section footer for section 9 \(got 0x05\)")


def test_device_bad_bool_and_subsection_version():
    vm = VMStateDescription("dev", 2, (Field("on", "bool"),))
    data = HDR + S.section_header(S.Section.FULL, 1, "dev", 0, 2) + b"\x07" + S.section_footer(1)
    with pytest.raises(ProtocolError, match="dev.on: bool value 7"):
        D.StreamDecoder([], {("dev", 0): vm}).feed(data)
    dev = S.section_header(S.Section.FULL, 9, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2]})
    sub = b"\x05\x07dev/sub" + struct.pack(">IH", 2, 0)
    expect_error(HDR + dev + sub + S.section_footer(9), "dev/sub: stream version 2 is newer than ours")


def test_configuration_errors():
    expect_error(HDR + b"\x07" + struct.pack(">I", 256) + b"x" * 300, "machine type name of 256 bytes")
    expect_error(HDR + b"\x07" + struct.pack(">I", 0xFFFFFFFF), "machine type name of 4294967295 bytes")
    # validated capabilities / page bits / uuid subsections: refused, whatever the chunking
    sub = b"\x05\x18configuration/capabilities" + struct.pack(">II", 1, 1) + b"\x0ex-ignore-shared"
    expect_error(HDR + S.configuration() + sub, "CONFIGURATION subsections .* are not supported")


# ------------------------------------------------------------------ RAM setup


def test_unknown_ram_block_in_setup():
    blocks = [R.BlockInfo("pc.ram", 16 * TPS), R.BlockInfo("pc.bios", TPS)]
    expect_error(HDR + ram_start(1, blocks), "unknown RAM block 'pc.bios'")


def test_block_length_mismatch():
    expect_error(HDR + ram_start(1, [R.BlockInfo("pc.ram", 32 * TPS)]),
                 r"RAM block 'pc.ram' length 0x20000 differs from ours \(0x10000\)")


def test_total_smaller_than_block_list():
    lst = b"\x06pc.ram" + struct.pack(">Q", 16 * TPS) + b"\x08vga.vram" + struct.pack(">Q", 4 * TPS) + R.eos()
    head = HDR + S.section_header(S.Section.START, 1, "ram", 0, 4)
    expect_error(head + word(17 * TPS, R.FLAG_MEM_SIZE) + lst + S.section_footer(1),
                 "RAM block lengths exceed the announced total")
    # the total ends exactly after the first block: the rest of the list is where EOS should be
    expect_error(head + word(16 * TPS, R.FLAG_MEM_SIZE) + lst + S.section_footer(1),
                 "RAM block list is longer than the announced total 0x10000 bytes")


def test_total_larger_than_block_list():
    payload = word(32 * TPS, R.FLAG_MEM_SIZE) + b"\x06pc.ram" + struct.pack(">Q", 16 * TPS) + R.eos()
    expect_error(HDR + S.section_header(S.Section.START, 1, "ram", 0, 4) + payload + S.section_footer(1),
                 "0x10000 of the announced total 0x20000 bytes unaccounted for .*total does not match the block list")


def test_mem_size_outside_start():
    expect_error(HDR + ram_start() + S.section_header(S.Section.PART, 1) + R.setup_payload(BLOCKS),
                 "MEM_SIZE record outside the RAM setup section")


def test_postcopy_page_size_mismatch():
    local = [D.LocalBlock("pc.ram", 1 << 21, page_size=1 << 21)]
    blocks = [R.BlockInfo("pc.ram", 1 << 21, page_size=1 << 20)]
    data = HDR + S.postcopy_advise(1 << 21, TPS) + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(blocks)
    with pytest.raises(ProtocolError, match="RAM block 'pc.ram' page size 1048576 differs from ours \\(2097152\\)"):
        D.StreamDecoder(local, {}, postcopy=True).feed(data)


# ------------------------------------------------------------------ RAM pages


def test_unknown_ram_block_in_page():
    expect_error(HDR + ram_start() + part(R.page_header(0, R.FLAG_PAGE, "pc.rom") + PAGE), "unknown RAM block 'pc.rom'")


@pytest.mark.parametrize("offset", [16 * TPS, 17 * TPS, 1 << 40, 0xFFFF_FFFF_FFFF_F000])
def test_page_offset_outside_block_single(offset):
    msg = rf"page offset 0x{offset:x} outside RAM block 'pc.ram' of 0x10000 bytes"
    expect_error(HDR + ram_start() + part(R.page_header(offset, R.FLAG_PAGE, "pc.ram") + PAGE), msg)
    expect_error(HDR + ram_start() + part(R.page_header(offset, R.FLAG_ZERO, "pc.ram") + b"\x00"), msg)
    # CONTINUE record on its own (single path)
    first = R.page_header(0, R.FLAG_ZERO, "pc.ram") + b"\x00"
    expect_error(HDR + ram_start() + part(first + R.page_header(offset, R.FLAG_PAGE, None) + PAGE), msg)


@pytest.mark.parametrize("bad_at", [0, 3, 7])
def test_page_offset_outside_block_vectorised(bad_at):
    """A run of CONTINUE|PAGE / CONTINUE|ZERO records with one offset past the block end."""
    offs = np.arange(8, dtype=np.uint64) % np.uint64(4) * np.uint64(TPS)
    offs[bad_at] = 4 * TPS  # vga.vram has 4 pages
    first = R.page_header(TPS, R.FLAG_PAGE, "vga.vram") + PAGE
    pages = b"".join(R.page_headers(offs[i:i + 1]).tobytes() + PAGE for i in range(8))
    # fed whole, this goes through the vectorised run; byte by byte through the single path
    expect_error(HDR + ram_start() + part(first + pages),
                 r"page offset 0x4000 outside RAM block 'vga.vram' of 0x4000 bytes")
    expect_error(HDR + ram_start() + part(first + R.zero_records(offs)),
                 r"page offset 0x4000 outside RAM block 'vga.vram' of 0x4000 bytes")


def test_zero_page_with_nonzero_fill():
    expect_error(HDR + ram_start() + part(R.page_header(0, R.FLAG_ZERO, "pc.ram") + b"\x01"),
                 "ZERO page with fill byte 0x01")
    recs = bytearray(R.zero_records(np.arange(6, dtype=np.uint64) * np.uint64(TPS)))
    recs[3 * R.ZERO_RECORD + 8] = 0xFF
    first = R.page_header(0, R.FLAG_PAGE, "pc.ram") + PAGE
    expect_error(HDR + ram_start() + part(first + bytes(recs)), "ZERO page with fill byte 0xff")


def test_continue_without_previous_block():
    for flags in (R.FLAG_PAGE, R.FLAG_ZERO):
        rec = R.page_header(0, flags, None) + (PAGE if flags == R.FLAG_PAGE else b"\x00")
        expect_error(HDR + ram_start() + part(rec * 3), "CONTINUE page with no previous RAM block")


@pytest.mark.parametrize("flags", [
    0x000,  # nothing
    0x001,  # RAM_SAVE_FLAG_FULL (obsolete)
    0x001 | R.FLAG_CONTINUE,
    R.FLAG_PAGE | R.FLAG_ZERO,
    R.FLAG_PAGE | R.FLAG_EOS,
    R.FLAG_ZERO | R.FLAG_MEM_SIZE,
    R.FLAG_PAGE | R.FLAG_MULTIFD_FLUSH,
    0x100,  # COMPRESS_PAGE (removed)
    0x100 | R.FLAG_CONTINUE,
    0x3FF,
])
def test_unknown_flag_combinations(flags):
    expect_error(HDR + ram_start() + part(word(0, flags) + b"\x06pc.ram" + PAGE),
                 f"Unknown combination of migration flags: 0x{flags:x}")


@pytest.mark.parametrize("flags", [0x400, 0x800, 0xFFF, 0x400 | R.FLAG_PAGE])
def test_flags_out_of_range(flags):
    expect_error(HDR + ram_start() + part(word(0, flags) + b"\x06pc.ram" + PAGE), f"RAM flags 0x{flags:x} out of range")


def test_xbzrle_and_hook():
    body = R.page_header(0, R.FLAG_XBZRLE, "pc.ram") + b"\x01\x00\x04abcd"
    expect_error(HDR + ram_start() + part(body), "XBZRLE pages are not supported")
    expect_error(HDR + ram_start() + part(word(0, R.FLAG_XBZRLE | R.FLAG_CONTINUE) + b"\x01\x00\x00"),
                 "XBZRLE pages are not supported")
    expect_error(HDR + ram_start() + part(word(0, R.FLAG_HOOK)), "HOOK .*not supported")


# ------------------------------------------------------------------ commands


@pytest.mark.parametrize("cmd", [0, 12, 13, 0x100, 65535])
def test_unknown_command(cmd):
    expect_error(HDR + struct.pack(">BHH", 8, cmd, 0), f"unknown migration command {cmd}")
    expect_error(HDR + struct.pack(">BHH", 8, cmd, 4) + b"abcd", f"unknown migration command {cmd}")


FIXED = [(c, n) for c, n in S.CMD_LEN.items() if n is not None]


def test_fixed_length_table():
    assert dict(FIXED) == {S.Cmd.OPEN_RETURN_PATH: 0, S.Cmd.PING: 4, S.Cmd.POSTCOPY_LISTEN: 0, S.Cmd.POSTCOPY_RUN: 0,
                           S.Cmd.PACKAGED: 4, S.Cmd.ENABLE_COLO: 0, S.Cmd.POSTCOPY_RESUME: 0,
                           S.Cmd.SWITCHOVER_START: 0}


@pytest.mark.parametrize("cmd,fixed", FIXED, ids=[c.name for c, _ in FIXED])
def test_wrong_fixed_command_length(cmd, fixed):
    for n in {fixed + 1, fixed + 3, max(fixed - 1, 0) if fixed else 8, 65535} - {fixed}:
        expect_error(HDR + S.command(cmd, b"\x00" * n), f"command {cmd.name} has length {n}, expected {fixed}")


def test_enable_colo_is_unsupported():
    expect_error(HDR + S.command(S.Cmd.ENABLE_COLO), "ENABLE_COLO is not supported")


def test_advise_errors():
    for n in (1, 8, 15, 17, 32):
        expect_error(HDR + S.command(S.Cmd.POSTCOPY_ADVISE, bytes(n)), f"POSTCOPY_ADVISE of {n} bytes", postcopy=True)
    expect_error(HDR + S.postcopy_advise(TPS, TPS), "postcopy is disabled on the destination")
    expect_error(HDR + S.command(S.Cmd.POSTCOPY_ADVISE), "postcopy-ram is enabled on the destination", postcopy=True)
    expect_error(HDR + S.postcopy_advise(TPS, TPS) * 2, "POSTCOPY_ADVISE received twice", postcopy=True)


def _discard(payload: bytes) -> bytes:
    return HDR + S.command(S.Cmd.POSTCOPY_RAM_DISCARD, payload)


def test_bad_discard_payloads():
    rng = struct.pack(">QQ", 0, TPS)
    expect_error(_discard(b"\x00\x01a\x00" + b"\x00" * 15), "POSTCOPY_RAM_DISCARD of 19 bytes is too short")
    expect_error(_discard(b""), "POSTCOPY_RAM_DISCARD of 0 bytes is too short")
    expect_error(_discard(b"\x01\x06pc.ram\x00" + rng), "POSTCOPY_RAM_DISCARD version is not 0")
    expect_error(_discard(b"\x00\x06pc.ram\x01" + rng), "missing NUL after the block name")
    expect_error(_discard(b"\x00\x06pc.ram\x00" + rng + b"\x00" * 5), "not a multiple of 16 bytes")
    expect_error(_discard(b"\x00\x06pc.ram\x00" + rng[:15]), "not a multiple of 16 bytes")
    expect_error(_discard(b"\x00\x00" + b"\x00" * 18), "empty RAM block name")
    expect_error(_discard(b"\x00\x06pc.rom\x00" + rng), "unknown RAM block 'pc.rom'")
    # the counted name runs past the command payload: malformed, not "wait for more bytes"
    expect_error(_discard(b"\x00\xc8" + b"a" * 18) + bytes(300), "POSTCOPY_RAM_DISCARD: 20-byte payload is too short")
    expect_error(_discard(b"\x00\x12" + b"a" * 18) + bytes(300), "POSTCOPY_RAM_DISCARD: 20-byte payload is too short")


@pytest.mark.parametrize("start,length", [(16 * TPS, TPS), (15 * TPS, 2 * TPS), (1, TPS), (0, TPS + 1),
                                          (0xFFFF_FFFF_FFFF_F000, 2 * TPS)])
def test_discard_range_outside_block(start, length):
    expect_error(HDR + S.ram_discard("pc.ram", [(0, TPS), (start, length)]),
                 f"discard range 0x{start:x}\\+0x{length:x} outside or misaligned in block 'pc.ram'")


def test_recv_bitmap_command_errors():
    expect_error(HDR + S.command(S.Cmd.RECV_BITMAP), "RECV_BITMAP without a block name")
    expect_error(HDR + S.command(S.Cmd.RECV_BITMAP, b"\x06"), "RECV_BITMAP without a block name")
    expect_error(HDR + S.command(S.Cmd.RECV_BITMAP, b"\x00\x00"), "empty RAM block name")
    expect_error(HDR + S.command(S.Cmd.RECV_BITMAP, b"\x02pc.ram"), "RECV_BITMAP length does not match its block name")
    expect_error(HDR + S.command(S.Cmd.RECV_BITMAP, b"\x09pc.ram") + bytes(20), "RECV_BITMAP: 7-byte payload is too short")
    expect_error(HDR + S.recv_bitmap("pc.rom"), "unknown RAM block 'pc.rom'")


# ------------------------------------------------------------------ PACKAGED


def _package(blob: bytes, length: int | None = None) -> bytes:
    n = len(blob) if length is None else length
    return S.command(S.Cmd.PACKAGED, struct.pack(">I", n)) + blob


NESTED = S.command(S.Cmd.POSTCOPY_LISTEN) + S.ping(3) + S.command(S.Cmd.POSTCOPY_RUN)


def test_package_rest_after_run_is_skipped():
    """A blob length larger than its content: RUN ends the nested stream early and the rest of the
    claimed blob is skipped, as QEMU does; the main stream then resumes after it."""
    data = HDR + _package(NESTED + S.ping(99)) + S.ping(4) + S.eof()
    ev = decode(data)
    assert ev == [D.Header(3), D.Packaged(len(NESTED) + 9), D.PostcopyListen(), D.Ping(3), D.PostcopyRun(),
                  D.Ping(4), D.Eof()]
    assert decode(data, 1) == ev


def test_package_without_run():
    expect_error(HDR + _package(S.command(S.Cmd.POSTCOPY_LISTEN) + S.ping(3)) + S.command(S.Cmd.POSTCOPY_RUN),
                 "PACKAGED blob ended without POSTCOPY_RUN")
    expect_error(HDR + _package(b"") + NESTED, "PACKAGED blob ended without POSTCOPY_RUN")


def test_package_length_cuts_a_record():
    expect_error(HDR + _package(NESTED, len(NESTED) - 1) + S.eof() * 8, "runs past the end of its PACKAGED blob")
    expect_error(HDR + _package(NESTED, len(NESTED) - 3) + S.eof() * 8, "runs past the end of its PACKAGED blob")
    expect_error(HDR + _package(NESTED, len(NESTED) - 5) + S.eof() * 8, "PACKAGED blob ended without POSTCOPY_RUN")


def test_package_nesting_and_eof():
    expect_error(HDR + _package(_package(NESTED) + NESTED), "PACKAGED command inside a PACKAGED blob")
    expect_error(HDR + _package(S.eof() + NESTED), "EOF inside a PACKAGED blob")


def test_package_with_ram_inside():
    """RAM records inside the blob (vectorised path) are bounded by the blob as well."""
    recs = R.page_header(0, R.FLAG_PAGE, "pc.ram") + PAGE + b"".join(
        R.page_headers(np.array([i * TPS], dtype=np.uint64)).tobytes() + PAGE for i in range(1, 4))
    blob = S.section_header(S.Section.PART, 1) + recs + R.eos() + S.section_footer(1) + S.command(S.Cmd.POSTCOPY_RUN)
    good = HDR + ram_start() + _package(blob) + S.eof()
    assert [type(e) for e in decode(good)][-3:] == [D.SectionEnd, D.PostcopyRun, D.Eof]
    cut = HDR + ram_start() + _package(blob, len(S.section_header(S.Section.PART, 1)) + len(recs) - 100) + S.eof() * 200
    expect_error(cut, "runs past the end of its PACKAGED blob")


# ------------------------------------------------------------------ truncation and sizes


def _small_stream() -> tuple[bytes, int]:
    """A small valid stream with every record kind; returns (bytes, offset of EOF)."""
    dev = S.section_header(S.Section.FULL, 9, "dev", 0, 2) + encode(DEV, {"a": 1, "b": [1, 2], "dev/sub": {"c": 3}})
    body = (HDR + S.configuration() + S.command(S.Cmd.OPEN_RETURN_PATH) + S.ping(1) + ram_start(1)
            + part(R.page_header(0, R.FLAG_PAGE, "pc.ram") + b"\x01" * TPS + R.zero_records(
                np.array([TPS, 2 * TPS, 3 * TPS], dtype=np.uint64))
                   + R.page_header(TPS, R.FLAG_PAGE, None) + b"\x02" * TPS
                   + R.page_header(0, R.FLAG_ZERO, "vga.vram") + b"\x00")
            + S.command(S.Cmd.SWITCHOVER_START) + dev + S.section_footer(9))
    return body + S.eof() + S.vmdescription(b'{"devices":[]}'), len(body)


def test_truncation_at_every_offset():
    data, eof_at = _small_stream()
    full = decode(data)
    assert isinstance(full[-1], D.VmDescription)
    for cut in range(len(data) + 1):
        dec = D.StreamDecoder(LOCAL, DEVICES, buffer_size=1 << 15)
        dec.feed(data[:cut])
        if cut <= eof_at:
            with pytest.raises(ProtocolError, match="migration stream truncated"):
                dec.finish()
        else:
            dec.finish()  # after EOF a cut only loses (part of) the description
            assert dec.done


def test_truncation_at_every_offset_in_two_pieces():
    """The same, fed in two pieces split mid-way (the first piece often ends inside a record)."""
    data, eof_at = _small_stream()
    for cut in range(eof_at + 1):
        dec = D.StreamDecoder(LOCAL, DEVICES, buffer_size=1 << 15)
        dec.feed(data[:cut // 2])
        dec.feed(data[cut // 2:cut])
        with pytest.raises(ProtocolError, match="migration stream truncated"):
            dec.finish()


def test_record_larger_than_buffer():
    with pytest.raises(ProtocolError, match="stream record larger than the 4096-byte buffer"):
        D.StreamDecoder(LOCAL, DEVICES, buffer_size=4096).feed(
            HDR + ram_start() + part(R.page_header(0, R.FLAG_PAGE, "pc.ram") + PAGE))


def test_huge_vmdescription_is_not_allocated():
    """A stream claiming a 4 GiB description that ends early: bounded memory, no error at the end."""
    dec = D.StreamDecoder(LOCAL, DEVICES, buffer_size=1 << 20)
    tracemalloc.start()
    try:
        dec.feed(HDR + S.eof() + b"\x06" + struct.pack(">I", 0xFFFFFFFF))
        chunk = b"{" * (1 << 20)
        for _ in range(24):  # 24 MiB of description
            assert dec.feed(chunk) == []
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"peak {peak} bytes"
    assert len(dec.vmdesc) == D.VMDESC_KEEP and dec.vmdesc_truncated
    assert dec.vmdesc_left == 0xFFFFFFFF - (24 << 20)
    dec.finish()
    assert dec.done


def test_huge_package_is_not_allocated():
    dec = D.StreamDecoder(LOCAL, DEVICES, buffer_size=1 << 20)
    tracemalloc.start()
    try:
        ev = dec.feed(HDR + _package(b"", 0xFFFFFFFF) + S.command(S.Cmd.POSTCOPY_LISTEN) + S.ping(3))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 << 20
    assert ev == [D.Header(3), D.Packaged(0xFFFFFFFF), D.PostcopyListen(), D.Ping(3)]
    with pytest.raises(ProtocolError, match="truncated"):
        dec.finish()


# ------------------------------------------------------------------ return path


def rp_error(data: bytes, match: str, sizes=None, chunks=(None, 1)):
    msgs = []
    for chunk in chunks:
        dec = RP.RPDecoder(sizes or {"pc.ram": 8})
        chunk = chunk or len(data)
        with pytest.raises(ProtocolError, match=match) as ei:
            for i in range(0, len(data), chunk):
                dec.feed(data[i:i + chunk])
                while dec.next_message() is not None:
                    pass
        msgs.append(str(ei.value))
    assert len(set(msgs)) == 1
    return msgs[0]


@pytest.mark.parametrize("t", [0, 8, 9, 0x100, 65535])
def test_rp_unknown_type(t):
    rp_error(struct.pack(">HH", t, 4) + bytes(4), f"return path: unknown message type {t}")


@pytest.mark.parametrize("t,fixed", [(1, 4), (2, 4), (4, 12), (6, 4), (7, 0)])
def test_rp_wrong_length(t, fixed):
    name = RP.RP(t).name
    for n in {0, 3, 5, 11, 13, 512} - {fixed}:
        data = (RP.req_pages(0, 4096, "pc.ram") if t == 4 else b"") + struct.pack(">HH", t, n) + bytes(n)
        rp_error(data, f"return path: {name} has length {n}, expected {fixed}")


@pytest.mark.parametrize("t", [1, 3, 5, 7])
def test_rp_over_512_bytes(t):
    rp_error(struct.pack(">HH", t, 513) + bytes(513), f"return path: message {RP.RP(t).name} of 513 bytes exceeds 512")
    rp_error(struct.pack(">HH", t, 65535), "of 65535 bytes exceeds 512")


def test_rp_req_pages_before_req_pages_id():
    rp_error(RP.req_pages(0, 4096, None), "REQ_PAGES before any REQ_PAGES_ID")
    rp_error(RP.pong(1) + RP.req_pages(0, 4096, None), "REQ_PAGES before any REQ_PAGES_ID")


def test_rp_req_pages_id_errors():
    rp_error(struct.pack(">HHQIB", 3, 13, 0, 4096, 0), "REQ_PAGES_ID of 13 bytes is too short")
    rp_error(struct.pack(">HH", 3, 4) + bytes(4), "REQ_PAGES_ID of 4 bytes is too short")
    rp_error(struct.pack(">HHQIB", 3, 20, 0, 4096, 6) + b"pc.ram\x00", "REQ_PAGES_ID length 20 does not match name length 6")
    rp_error(struct.pack(">HHQIB", 3, 18, 0, 4096, 6) + b"pc.ra", "REQ_PAGES_ID length 18 does not match name length 6")
    rp_error(struct.pack(">HHQIB", 3, 15, 0, 4096, 2) + b"\xff\xfe", "block name is not ASCII")


def test_rp_resume_ack_value():
    rp_error(RP.resume_ack(0), "RESUME_ACK value 0, expected 1")
    rp_error(RP.resume_ack(2), "RESUME_ACK value 2, expected 1")


def test_rp_recv_bitmap_errors():
    good = RP.recv_bitmap("pc.ram", bytes(8))
    rp_error(struct.pack(">HH", 5, 0), "RECV_BITMAP without a block name")
    rp_error(struct.pack(">HHB", 5, 1, 0), "RECV_BITMAP without a block name")
    rp_error(struct.pack(">HH", 5, 8) + b"\x06pc.ram\x00", "RECV_BITMAP length 8 does not match name length 6")
    rp_error(struct.pack(">HH", 5, 3) + b"\x06pc", "RECV_BITMAP length 3 does not match name length 6")
    rp_error(RP.recv_bitmap("vga.vram", bytes(8)), "RECV_BITMAP for unknown block 'vga.vram'")
    # size field: not what the source computed for the block
    rp_error(RP.recv_bitmap("pc.ram", bytes(16)), "RECV_BITMAP of 16 bytes for 'pc.ram', expected 8")
    rp_error(good[:11] + struct.pack(">Q", 1 << 62), f"RECV_BITMAP of {1 << 62} bytes for 'pc.ram', expected 8")
    # end marker
    rp_error(good[:-1] + b"\xee", "RECV_BITMAP end marker missing")
    rp_error(good[:-8] + bytes(8), "RECV_BITMAP end marker missing")
    # a huge size must not be waited for (nor allocated)
    dec = RP.RPDecoder({"pc.ram": 8})
    dec.feed(good[:11] + struct.pack(">Q", 0xFFFF_FFFF_FFFF_FFFF))
    with pytest.raises(ProtocolError, match="expected 8"):
        dec.next_message()


def test_rp_truncation_is_only_incomplete():
    data = RP.pong(1) + RP.req_pages(0, 4096, "pc.ram") + RP.req_pages(4096, 4096, None) + RP.recv_bitmap("pc.ram", bytes(8)) + RP.shut(0)
    for cut in range(len(data)):
        dec = RP.RPDecoder({"pc.ram": 8})
        dec.feed(data[:cut])
        while dec.next_message() is not None:
            pass


@pytest.mark.parametrize("extra", [100, 3, 1])
def test_recovery_does_not_skip_the_old_package_rest_on_the_new_connection(extra):
    """The connection broke after POSTCOPY_RUN while the rest of the PACKAGED blob (QEMU drops what
    follows RUN) was still on its way: that rest went with the old connection, and the new one
    must decode from its first byte (once it swallowed everything, or ended in a bogus EOF)."""
    blob = S.command(S.Cmd.POSTCOPY_LISTEN) + S.command(S.Cmd.POSTCOPY_RUN)
    dec = D.StreamDecoder([D.LocalBlock("pc.ram", 16 * 4096)], {})
    old = S.file_header() + S.command(S.Cmd.PACKAGED, struct.pack(">I", len(blob) + extra)) + blob
    assert dec.feed(old)[-1] == D.PostcopyRun()
    dec.reconnect()
    new = S.recv_bitmap("pc.ram") + S.command(S.Cmd.POSTCOPY_RESUME) + S.ping(7) + S.eof()
    assert dec.feed(new) == [D.RecvBitmapRequest("pc.ram"), D.PostcopyResume(), D.Ping(7), D.Eof()]


@pytest.mark.parametrize("where", ["mid-stream", "in the package"])
def test_configuration_only_right_after_the_header(where):
    dec = D.StreamDecoder([], {})
    events = dec.feed(S.file_header() + S.configuration() + S.ping(1))
    assert [type(e) for e in events] == [D.Header, D.Configuration, D.Ping]
    if where == "mid-stream":
        data = S.configuration("evil") + S.ping(2)
    else:
        blob = S.command(S.Cmd.POSTCOPY_LISTEN) + S.configuration("other")
        data = S.command(S.Cmd.PACKAGED, struct.pack(">I", len(blob))) + blob
    with pytest.raises(ProtocolError, match="CONFIGURATION section in the middle"):
        dec.feed(data)
