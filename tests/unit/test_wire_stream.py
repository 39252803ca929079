"""Stream framing encoders (wire.stream) round-tripped through the sans-IO StreamDecoder.

A complete precopy stream (header, CONFIGURATION, commands, RAM START/PART/END with named,
CONTINUE and ZERO records, device FULL sections, EOF, VMDESCRIPTION) must decode to the expected
events with identical page data, whatever the input chunking.
"""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from livemig.errors import ProtocolError
from livemig.wire import decoder as D
from livemig.wire import ram as R
from livemig.wire import stream as S
from livemig.wire.cursor import Cursor, Incomplete, counted
from livemig.wire.vmstate import Field, VMStateDescription, describe, encode

TPS = R.TARGET_PAGE_SIZE
RAM_SID = 3

BLOCKS = [R.BlockInfo("pc.ram", 32 * TPS), R.BlockInfo("vga.vram", 8 * TPS)]
LOCAL = [D.LocalBlock(b.name, b.length) for b in BLOCKS]

SERIAL = VMStateDescription(
    "serial", 3,
    (Field("divider", "uint16"), Field("regs", "uint8", count=8), Field("fifo", "buffer", size=16),
     Field("thr_ipending", "bool"), Field("poll_msl", "int32"), Field("tsc", "int64")),
    subsections=(VMStateDescription("serial/timeout", 1, (Field("timeout", "uint64"),)),),
)
PIT = VMStateDescription("i8254", 2, (Field("channels", "uint32", count=3), Field("speaker", "int8")))
DEVICES = {("serial", 0): SERIAL, ("i8254", 1): PIT}
SERIAL_STATE = {"divider": 12, "regs": [1, 2, 3, 4, 5, 6, 7, 255], "fifo": bytes(range(16)),
                "thr_ipending": True, "poll_msl": -5, "tsc": -(1 << 40),
                "serial/timeout": {"timeout": 0xFFFF_FFFF_FFFF_FFFF}}
PIT_STATE = {"channels": [0, 65535, 1 << 31], "speaker": -128}
VMDESC = json.dumps({"page_size": TPS, "devices": [{"name": "serial", **describe(SERIAL)}]}).encode()


def page(seed: int) -> bytes:
    """A recognisable, non-zero page."""
    rng = np.random.default_rng(seed)
    return rng.integers(1, 256, TPS, dtype=np.uint8).tobytes()


def ram_part(records) -> bytes:
    """Page records for [(kind, block-or-None, offset)], where kind is 'page' or 'zero'."""
    out = bytearray()
    for kind, block, off in records:
        if kind == "page":
            out += R.page_header(off, R.FLAG_PAGE, block) + page(off + len(block or ""))
        else:
            out += R.page_header(off, R.FLAG_ZERO, block) + b"\x00"
    return bytes(out)


def build_stream():
    """A complete precopy stream and the normalised events it must decode to."""
    out = bytearray()
    exp: list = []
    out += S.file_header(); exp.append(D.Header(3))
    out += S.configuration(); exp.append(D.Configuration(S.MACHINE_TYPE))
    out += S.command(S.Cmd.OPEN_RETURN_PATH); exp.append(D.OpenReturnPath())
    out += S.ping(1); exp.append(D.Ping(1))
    # RAM START: MEM_SIZE block list, EOS, footer
    out += S.section_header(S.Section.START, RAM_SID, "ram", 0, 4) + R.setup_payload(BLOCKS)
    out += S.section_footer(RAM_SID)
    exp += [D.RamSetup(list(BLOCKS)), D.SectionEnd(RAM_SID, S.Section.START)]
    # PART 1: named page, CONTINUE pages (batch encoder), ZERO run (batch), another block
    out += S.section_header(S.Section.PART, RAM_SID)
    out += R.page_header(0, R.FLAG_PAGE, "pc.ram") + page(0)
    exp.append(("page", "pc.ram", 0, page(0)))
    offs = np.arange(1, 6, dtype=np.uint64) * TPS
    hdrs = R.page_headers(offs)
    assert hdrs.dtype == np.dtype(">u8")
    for i, o in enumerate(offs):
        out += hdrs[i:i + 1].tobytes() + page(int(o))
        exp.append(("page", "pc.ram", int(o), page(int(o))))
    zoffs = np.array([6, 7, 8, 9, 20, 31], dtype=np.uint64) * TPS
    out += R.zero_records(zoffs)
    exp += [("zero", "pc.ram", int(o)) for o in zoffs]
    out += R.page_header(TPS, R.FLAG_ZERO, "vga.vram") + b"\x00"
    exp.append(("zero", "vga.vram", TPS))
    out += R.page_header(7 * TPS, R.FLAG_PAGE, None) + page(7 * TPS + 1)
    exp.append(("page", "vga.vram", 7 * TPS, page(7 * TPS + 1)))
    out += R.page_header(0, R.FLAG_PAGE, None) + page(1)
    exp.append(("page", "vga.vram", 0, page(1)))
    out += R.eos() + S.section_footer(RAM_SID)
    exp.append(D.SectionEnd(RAM_SID, S.Section.PART))
    # PART 2: a multifd flush, pages back in pc.ram in descending order
    out += S.section_header(S.Section.PART, RAM_SID)
    out += struct.pack(">Q", R.FLAG_MULTIFD_FLUSH)
    exp.append(D.MultifdFlush())
    for i, o in enumerate((31, 30, 12)):
        name = "pc.ram" if i == 0 else None
        out += R.page_header(o * TPS, R.FLAG_PAGE, name) + page(o * TPS + 2)
        exp.append(("page", "pc.ram", o * TPS, page(o * TPS + 2)))
    out += R.eos() + S.section_footer(RAM_SID)
    exp.append(D.SectionEnd(RAM_SID, S.Section.PART))
    out += S.command(S.Cmd.SWITCHOVER_START); exp.append(D.SwitchoverStart())
    # END: last pages (CONTINUE still refers to pc.ram across sections)
    out += S.section_header(S.Section.END, RAM_SID)
    out += R.page_header(13 * TPS, R.FLAG_PAGE, None) + page(13 * TPS + 2)
    exp.append(("page", "pc.ram", 13 * TPS, page(13 * TPS + 2)))
    out += R.zero_records(np.array([14 * TPS, 15 * TPS], dtype=np.uint64))
    exp += [("zero", "pc.ram", 14 * TPS), ("zero", "pc.ram", 15 * TPS)]
    out += R.eos() + S.section_footer(RAM_SID)
    exp.append(D.SectionEnd(RAM_SID, S.Section.END))
    # devices
    for sid, (key, vmsd, values) in enumerate(((("serial", 0), SERIAL, SERIAL_STATE),
                                               (("i8254", 1), PIT, PIT_STATE)), start=10):
        out += S.section_header(S.Section.FULL, sid, key[0], key[1], vmsd.version_id)
        out += encode(vmsd, values) + S.section_footer(sid)
        exp.append(D.DeviceState(key[0], key[1], vmsd.version_id, values))
    out += S.eof(); exp.append(D.Eof())
    out += S.vmdescription(VMDESC); exp.append(D.VmDescription(VMDESC, False))
    return bytes(out), exp


def normalise(events) -> list:
    """Expand Pages/ZeroPages into one tuple per page (batching depends on chunking)."""
    out = []
    for ev in events:
        if isinstance(ev, D.Pages):
            assert ev.data.shape == (len(ev.offsets), TPS)
            for o, d in zip(ev.offsets.tolist(), ev.data):
                out.append(("page", ev.block, o, bytes(d)))
        elif isinstance(ev, D.ZeroPages):
            out += [("zero", ev.block, o) for o in ev.offsets.tolist()]
        else:
            out.append(ev)
    return out


def decode_chunks(data: bytes, chunk: int, **kw) -> list:
    dec = D.StreamDecoder(LOCAL, DEVICES, **kw)
    events = []
    for i in range(0, len(data), chunk):
        events += dec.feed(data[i:i + chunk])
    dec.finish()
    assert dec.done
    return events


def decode_space(data: bytes, chunk: int, buffer_size: int) -> list:
    """Drive the decoder through space()/commit(), consuming page views before refilling."""
    dec = D.StreamDecoder(LOCAL, DEVICES, buffer_size=buffer_size)
    out, pos = [], 0
    while not dec.done:
        sp = dec.space(min_free=chunk)
        n = min(len(sp), chunk, len(data) - pos)
        if n == 0:
            dec.finish()
            break
        sp[:n] = data[pos:pos + n]
        dec.commit(n)
        pos += n
        while (ev := dec.next_event()) is not None:
            out += normalise([ev])  # copies page bytes now: views die at the next space()
    assert pos == len(data)
    assert dec.bytes_consumed == len(data)
    return out


STREAM, EXPECTED = build_stream()


def test_stream_fed_whole():
    dec = D.StreamDecoder(LOCAL, DEVICES)
    events = dec.feed(STREAM)
    assert normalise(events) == EXPECTED
    dec.finish()
    assert dec.done and dec.pending == 0
    assert dec.bytes_consumed == len(STREAM)


@pytest.mark.parametrize("chunk", [2, 3, 7, 8, 9, 100, 4095, 4104, 4105, 10000])
def test_stream_fed_in_chunks(chunk):
    assert normalise(decode_chunks(STREAM, chunk)) == EXPECTED


def test_stream_fed_one_byte_at_a_time():
    assert normalise(decode_chunks(STREAM, 1)) == EXPECTED


@pytest.mark.parametrize("chunk,buffer_size", [(4104, 3 * 4104), (1000, 9000), (50000, 1 << 17), (64, 4200)])
def test_stream_space_commit(chunk, buffer_size):
    assert decode_space(STREAM, chunk, buffer_size) == EXPECTED


def test_vectorised_runs_are_batched():
    """Fed whole, runs of CONTINUE pages / zeros come out as multi-page events with correct data."""
    dec = D.StreamDecoder(LOCAL, DEVICES)
    events = dec.feed(STREAM)
    assert any(isinstance(e, D.Pages) and len(e.offsets) > 1 for e in events)
    assert any(isinstance(e, D.ZeroPages) and len(e.offsets) > 1 for e in events)
    for e in events:
        if isinstance(e, (D.Pages, D.ZeroPages)):
            assert e.offsets.dtype == np.uint64


def test_pages_are_views_until_next_space():
    """Pages.data returned by next_event() is a view into the decoder buffer (zero copy)."""
    data = (S.file_header() + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(BLOCKS)
            + S.section_footer(1) + S.section_header(S.Section.PART, 1)
            + R.page_header(0, R.FLAG_PAGE, "pc.ram") + page(0)
            + b"".join(R.page_headers(np.array([i * TPS], dtype=np.uint64)).tobytes() + page(i) for i in range(1, 4)))
    dec = D.StreamDecoder(LOCAL, DEVICES)
    sp = dec.space()
    sp[:len(data)] = data
    dec.commit(len(data))
    evs = []
    while (ev := dec.next_event()) is not None:
        evs.append(ev)
    pages = [e for e in evs if isinstance(e, D.Pages)]
    assert np.shares_memory(pages[-1].data, dec._arr)
    assert [bytes(r) for p in pages for r in p.data] == [page(i) for i in range(4)]


def test_small_stream_without_vmdesc_and_headerless():
    """EOF without VMDESCRIPTION (postcopy / suppressed) is fine; expect_header=False starts in MAIN."""
    data = S.file_header() + S.configuration("pc-q35-10.2") + S.eof()
    dec = D.StreamDecoder(LOCAL, DEVICES)
    assert dec.feed(data) == [D.Header(3), D.Configuration("pc-q35-10.2"), D.Eof()]
    assert not dec.done
    dec.finish()
    assert dec.done
    # a non-0x06 byte after EOF is only logged by QEMU: the decoder stops there
    dec = D.StreamDecoder(LOCAL, DEVICES)
    assert dec.feed(data + b"\x42junk") == [D.Header(3), D.Configuration("pc-q35-10.2"), D.Eof()]
    assert dec.done
    dec = D.StreamDecoder(LOCAL, DEVICES, expect_header=False)
    assert dec.feed(S.recv_bitmap("pc.ram") + S.ping(7)) == [D.RecvBitmapRequest("pc.ram"), D.Ping(7)]


def test_commands_round_trip():
    dec = D.StreamDecoder(LOCAL, DEVICES, postcopy=True, expect_header=False)
    data = (S.command(S.Cmd.OPEN_RETURN_PATH) + S.ping(0xFFFFFFFF) + S.ping(S.PING_PACKAGED_LOADED)
            + S.postcopy_advise(0x201000, TPS)
            + S.ram_discard("pc.ram", [(0, TPS), (4 * TPS, 12 * TPS)])
            + S.ram_discard("vga.vram", [(i * TPS, TPS) for i in range(8)])
            + S.command(S.Cmd.POSTCOPY_LISTEN) + S.command(S.Cmd.POSTCOPY_RUN)
            + S.command(S.Cmd.POSTCOPY_RESUME) + S.recv_bitmap("vga.vram")
            + S.command(S.Cmd.SWITCHOVER_START))
    assert dec.feed(data) == [
        D.OpenReturnPath(), D.Ping(0xFFFFFFFF), D.Ping(0x42), D.PostcopyAdvise(0x201000, TPS),
        D.Discard("pc.ram", [(0, TPS), (4 * TPS, 12 * TPS)]),
        D.Discard("vga.vram", [(i * TPS, TPS) for i in range(8)]),
        D.PostcopyListen(), D.PostcopyRun(), D.PostcopyResume(), D.RecvBitmapRequest("vga.vram"),
        D.SwitchoverStart(),
    ]


def test_advise_length_zero_without_postcopy():
    dec = D.StreamDecoder(LOCAL, DEVICES, expect_header=False)
    assert dec.feed(S.command(S.Cmd.POSTCOPY_ADVISE)) == [D.PostcopyAdvise(None, None)]


def test_packaged_round_trip():
    """PACKAGED: a be32 length in the command, then a headerless nested stream ending at RUN."""
    blob = (S.command(S.Cmd.POSTCOPY_LISTEN)
            + S.section_header(S.Section.FULL, 10, "i8254", 1, 2) + encode(PIT, PIT_STATE) + S.section_footer(10)
            + S.ping(3) + S.ping(S.PING_PACKAGED_LOADED) + S.command(S.Cmd.POSTCOPY_RUN))
    data = (S.file_header() + S.postcopy_advise(TPS, TPS) + S.packaged(blob) + S.ping(4)
            + S.section_header(S.Section.START, 1, "ram", 0, 4) + R.setup_payload(BLOCKS) + S.section_footer(1)
            + S.eof())
    assert data[len(S.file_header()) + 21:][:9] == struct.pack(">BHHI", 8, 7, 4, len(blob))
    for chunk in (len(data), 1):
        dec = D.StreamDecoder(LOCAL, DEVICES, postcopy=True)
        evs = []
        for i in range(0, len(data), chunk):
            evs += dec.feed(data[i:i + chunk])
        dec.finish()
        assert evs == [D.Header(3), D.PostcopyAdvise(TPS, TPS), D.Packaged(len(blob)), D.PostcopyListen(),
                       D.DeviceState("i8254", 1, 2, PIT_STATE), D.Ping(3), D.Ping(0x42), D.PostcopyRun(),
                       D.Ping(4), D.RamSetup(list(BLOCKS)), D.SectionEnd(1, S.Section.START), D.Eof()]


def test_postcopy_setup_page_size_field():
    """With postcopy advised, blocks whose page size differs from max(host page, TPS) carry page_size."""
    blocks = [R.BlockInfo("pc.ram", 1 << 21, page_size=1 << 21), R.BlockInfo("vga.vram", 8 * TPS)]
    local = [D.LocalBlock("pc.ram", 1 << 21, page_size=1 << 21), D.LocalBlock("vga.vram", 8 * TPS)]
    data = (S.file_header() + S.postcopy_advise((1 << 21) | TPS, TPS)
            + S.section_header(S.Section.START, 0, "ram", 0, 4) + R.setup_payload(blocks) + S.section_footer(0))
    dec = D.StreamDecoder(local, {}, postcopy=True)
    assert dec.feed(data)[-2:] == [D.RamSetup(blocks), D.SectionEnd(0, S.Section.START)]


def test_vmdescription_round_trip_and_truncation_flag():
    big = b"[" + b"0," * (D.VMDESC_KEEP // 2 + 10) + b"0]"
    dec = D.StreamDecoder(LOCAL, DEVICES)
    evs = dec.feed(S.file_header() + S.eof() + S.vmdescription(big))
    assert evs[-1] == D.VmDescription(big[:D.VMDESC_KEEP], True)
    assert dec.done
    dec = D.StreamDecoder(LOCAL, DEVICES)
    assert dec.feed(S.file_header() + S.eof() + S.vmdescription(b""))[-1] == D.VmDescription(b"", False)


# ------------------------------------------------------------------ encoders, byte-exact


def test_encoders_byte_exact():
    assert S.file_header() == b"QEVM\x00\x00\x00\x03"
    assert S.configuration("pc") == b"\x07\x00\x00\x00\x02pc"
    assert S.section_header(S.Section.START, 2, "ram", 0, 4) == b"\x01\x00\x00\x00\x02\x03ram" + bytes(4) + b"\x00\x00\x00\x04"
    assert S.section_header(S.Section.FULL, 0x01020304, "x", 5, 6) == b"\x04\x01\x02\x03\x04\x01x\x00\x00\x00\x05\x00\x00\x00\x06"
    assert S.section_header(S.Section.PART, 2) == b"\x02\x00\x00\x00\x02"
    assert S.section_header(S.Section.END, 2) == b"\x03\x00\x00\x00\x02"
    assert S.section_footer(0xABCD) == b"\x7e\x00\x00\xab\xcd"
    assert S.command(S.Cmd.POSTCOPY_RUN) == b"\x08\x00\x05\x00\x00"
    assert S.ping(0x42) == b"\x08\x00\x02\x00\x04\x00\x00\x00\x42"
    assert S.eof() == b"\x00"
    assert S.vmdescription(b"{}") == b"\x06\x00\x00\x00\x02{}"
    assert S.postcopy_advise(0x1000, 0x1000) == b"\x08\x00\x03\x00\x10" + struct.pack(">QQ", 0x1000, 0x1000)
    assert S.packaged(b"abc") == b"\x08\x00\x07\x00\x04\x00\x00\x00\x03abc"
    assert S.ram_discard("pc.ram", [(0x1000, 0x2000)]) == (
        b"\x08\x00\x06\x00\x19" + b"\x00\x06pc.ram\x00" + struct.pack(">QQ", 0x1000, 0x2000))
    assert S.recv_bitmap("pc.ram") == b"\x08\x00\x0a\x00\x07\x06pc.ram"
    with pytest.raises(ValueError):
        S.command(S.Cmd.PING, bytes(65536))
    assert len(S.command(S.Cmd.POSTCOPY_RAM_DISCARD, bytes(65535))) == 65540


def test_counted_and_cursor():
    assert counted("a") == b"\x01a"
    assert counted("x" * 255)[0] == 255
    for bad in ("", "x" * 256):
        with pytest.raises(ValueError):
            counted(bad)
    c = Cursor(b"\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a\x0b\x0c\x0d\x0e\x0f")
    assert c.u8() == 1 and c.be16() == 0x0203 and c.be32() == 0x04050607
    assert c.be64() == 0x08090A0B0C0D0E0F and c.remaining == 0
    with pytest.raises(Incomplete):
        c.u8()
    c = Cursor(b"\x00\x02\x03ab\x02\xffz", pos=1, end=3)
    assert c.remaining == 2 and c.peek_u8() == 2
    with pytest.raises(Incomplete):
        c.counted_string()  # the window ends before the string does
    c = Cursor(b"\x00")
    with pytest.raises(ProtocolError, match="empty block"):
        c.counted_string("block")
    c = Cursor(b"\x02\xffz")
    with pytest.raises(ProtocolError, match="not ASCII"):
        c.counted_string()
    c = Cursor(memoryview(b"abcdef"), 1, 4)
    assert c.read(3) == b"bcd"
    with pytest.raises(Incomplete):
        c.skip(1)
