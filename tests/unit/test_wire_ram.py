"""RAM section records (wire.ram): byte layout, and round trips through StreamDecoder."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import ProtocolError
from livemig.wire import decoder as D
from livemig.wire import ram as R
from livemig.wire import stream as S

TPS = R.TARGET_PAGE_SIZE
BLOCKS = [R.BlockInfo("pc.ram", 64 * TPS), R.BlockInfo("/rom@etc/acpi/tables", 4 * TPS), R.BlockInfo("b", TPS)]
LOCAL = [D.LocalBlock(b.name, b.length) for b in BLOCKS]


def test_constants():
    assert (R.IDSTR, R.INSTANCE, R.VERSION, TPS) == ("ram", 0, 4, 4096)
    flags = [R.FLAG_ZERO, R.FLAG_MEM_SIZE, R.FLAG_PAGE, R.FLAG_EOS, R.FLAG_CONTINUE, R.FLAG_XBZRLE,
             R.FLAG_HOOK, R.FLAG_MULTIFD_FLUSH]
    assert flags == [0x2, 0x4, 0x8, 0x10, 0x20, 0x40, 0x80, 0x200]
    assert all(f < R.FLAGS_MAX <= TPS for f in flags)
    assert R.PAGE_RECORD == 8 + TPS and R.ZERO_RECORD == 9


def test_setup_payload_layout():
    blocks = [R.BlockInfo("pc.ram", 0x8000000), R.BlockInfo("vga.vram", 0x1000000, page_size=0x200000)]
    p = R.setup_payload(blocks)
    exp = (struct.pack(">Q", 0x9000000 | R.FLAG_MEM_SIZE) + b"\x06pc.ram" + struct.pack(">Q", 0x8000000)
           + b"\x08vga.vram" + struct.pack(">QQ", 0x1000000, 0x200000) + struct.pack(">Q", R.FLAG_EOS))
    assert p == exp
    assert R.setup_payload([]) == struct.pack(">QQ", R.FLAG_MEM_SIZE, R.FLAG_EOS)
    assert R.eos() == b"\x00" * 7 + b"\x10"


def test_page_header_layout():
    assert R.page_header(0x5000, R.FLAG_PAGE, "pc.ram") == struct.pack(">Q", 0x5008) + b"\x06pc.ram"
    assert R.page_header(0x5000, R.FLAG_PAGE, None) == struct.pack(">Q", 0x5028)
    assert R.page_header(0x7000, R.FLAG_ZERO, None) == struct.pack(">Q", 0x7022)
    assert R.page_header(1 << 40, R.FLAG_ZERO, "x") == struct.pack(">Q", (1 << 40) | 2) + b"\x01x"


def test_batch_encoders_layout():
    offs = np.array([0, 0x1000, 0xFFFF_F000, 1 << 45], dtype=np.uint64)
    h = R.page_headers(offs)
    assert h.dtype == np.dtype(">u8")
    assert h.tobytes() == b"".join(struct.pack(">Q", int(o) | 0x28) for o in offs)
    # other integer dtypes (indices * TPS as intp) work too
    assert R.page_headers(np.array([3 * TPS], dtype=np.intp)).tobytes() == struct.pack(">Q", 3 * TPS | 0x28)
    z = R.zero_records(offs)
    assert z == b"".join(struct.pack(">QB", int(o) | 0x22, 0) for o in offs)
    assert len(z) == R.ZERO_RECORD * len(offs)
    assert R.zero_records(np.array([], dtype=np.uint64)) == b""
    assert R.page_headers(np.array([], dtype=np.uint64)).tobytes() == b""


def _ram_stream(part: bytes, kind=S.Section.PART) -> bytes:
    return (S.file_header() + S.section_header(S.Section.START, 7, "ram", 0, 4) + R.setup_payload(BLOCKS)
            + S.section_footer(7) + S.section_header(kind, 7) + part + R.eos() + S.section_footer(7) + S.eof())


def _pages(events) -> list:
    out = []
    for ev in events:
        if isinstance(ev, D.Pages):
            out += [("page", ev.block, o, bytes(d)) for o, d in zip(ev.offsets.tolist(), ev.data)]
        elif isinstance(ev, D.ZeroPages):
            out += [("zero", ev.block, o, None) for o in ev.offsets.tolist()]
    return out


def test_setup_decodes_to_block_list():
    dec = D.StreamDecoder(LOCAL, {})
    evs = dec.feed(_ram_stream(b""))
    assert evs == [D.Header(3), D.RamSetup(BLOCKS), D.SectionEnd(7, S.Section.START),
                   D.SectionEnd(7, S.Section.PART), D.Eof()]


def test_block_edges():
    """The first and last page of each block are accepted (offset + TPS == length)."""
    part = b""
    exp = []
    for b in BLOCKS:
        last = b.length - TPS
        part += R.page_header(0, R.FLAG_ZERO, b.name) + b"\x00" + R.page_header(last, R.FLAG_PAGE, None) + b"\xab" * TPS
        exp += [("zero", b.name, 0, None), ("page", b.name, last, b"\xab" * TPS)]
    dec = D.StreamDecoder(LOCAL, {})
    assert _pages(dec.feed(_ram_stream(part, S.Section.END))) == exp


def test_large_vectorised_run_matches_record_by_record():
    rng = np.random.default_rng(1)
    idx = rng.permutation(64)[:40].astype(np.uint64)
    data = rng.integers(0, 256, (40, TPS), dtype=np.uint8)
    st_ = np.empty((40, R.PAGE_RECORD), dtype=np.uint8)
    st_[:, :8] = R.page_headers(idx * np.uint64(TPS)).view(np.uint8).reshape(40, 8)
    st_[:, 8:] = data
    part = R.page_header(0, R.FLAG_ZERO, "pc.ram") + b"\x00" + st_.tobytes() + R.zero_records(idx[:10] * np.uint64(TPS))
    exp = [("zero", "pc.ram", 0, None)] + [("page", "pc.ram", int(i) * TPS, data[k].tobytes()) for k, i in enumerate(idx)]
    exp += [("zero", "pc.ram", int(i) * TPS, None) for i in idx[:10]]
    stream = _ram_stream(part)
    whole = D.StreamDecoder(LOCAL, {}).feed(stream)
    assert _pages(whole) == exp
    assert max(len(e.offsets) for e in whole if isinstance(e, D.Pages)) == 40
    dec = D.StreamDecoder(LOCAL, {})
    ev = []
    for i in range(0, len(stream), 5000):
        ev += dec.feed(stream[i:i + 5000])
    dec.finish()
    assert _pages(ev) == exp


record = st.tuples(st.sampled_from(["page", "zero"]), st.integers(0, 2), st.integers(0, 63), st.booleans())


def _encode(records, seed: int) -> tuple[bytes, list]:
    """The RAM records drawn by `record` (random page contents from `seed`), and what they decode to."""
    rng = np.random.default_rng(seed)
    part = bytearray()
    exp = []
    last = None
    for kind, bi, pg, use_continue in records:
        b = BLOCKS[bi]
        off = (pg % (b.length // TPS)) * TPS
        name = None if (use_continue and last == b.name) else b.name
        if kind == "page":
            data = rng.integers(0, 256, TPS, dtype=np.uint8).tobytes()
            part += R.page_header(off, R.FLAG_PAGE, name) + data
            exp.append(("page", b.name, off, data))
        else:
            part += R.page_header(off, R.FLAG_ZERO, name) + b"\x00"
            exp.append(("zero", b.name, off, None))
        last = b.name
    return bytes(part), exp


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, max_size=25), st.integers(1, 9000), st.integers(0, 2**32 - 1))
def test_random_records_round_trip(records, chunk, seed):
    """Any sequence of named / CONTINUE / ZERO records decodes to exactly what was encoded."""
    part, exp = _encode(records, seed)
    stream = _ram_stream(part)
    dec = D.StreamDecoder(LOCAL, {})
    ev = []
    for i in range(0, len(stream), chunk):
        ev += dec.feed(stream[i:i + chunk])
    dec.finish()
    assert _pages(ev) == exp
    assert isinstance(ev[-1], D.Eof)


run = st.tuples(st.sampled_from(["page", "zero"]), st.integers(0, 2), st.integers(0, 70), st.integers(1, 40))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(run, min_size=1, max_size=8), st.integers(500, 20000), st.integers(0, 2**32 - 1))
def test_runs_of_pages_decode_whole_and_say_when_contiguous(runs, chunk, seed):
    """Runs of consecutive pages (the decoder's one-comparison path), cut anywhere by the chunking,
    by a change of kind or block, or by the end of the block (a page past it is refused): every
    record decodes as encoded, and a Pages event says `contiguous` exactly when it is."""
    records, past_end = [], False
    for kind, bi, first, n in runs:
        npages = BLOCKS[bi].length // TPS
        for pg in range(first, first + n):
            if pg >= npages:
                past_end = True
                break
            records.append((kind, bi, pg, True))
        if past_end:
            break
    part, exp = _encode(records, seed)
    if past_end:  # a CONTINUE record just past the block it continues
        b = BLOCKS[records[-1][1]] if records else BLOCKS[0]
        if not records:
            part += R.page_header(0, R.FLAG_PAGE, b.name) + bytes(TPS)
            exp.append(("page", b.name, 0, bytes(TPS)))
        part += R.page_header(b.length, R.FLAG_PAGE, None) + bytes(TPS)
    stream = _ram_stream(part)
    dec = D.StreamDecoder(LOCAL, {})
    ev = []
    try:
        for i in range(0, len(stream), chunk):
            piece = stream[i:i + chunk]
            dec.space()[:len(piece)] = piece
            dec.commit(len(piece))
            while (e := dec.next_event()) is not None:  # one by one: a refused record keeps the rest
                ev.append(D.Pages(e.block, e.offsets, e.data.copy(), e.contiguous) if isinstance(e, D.Pages) else e)
        dec.finish()
    except ProtocolError as e:
        assert past_end and "outside" in str(e), e
    else:
        assert not past_end
        assert isinstance(ev[-1], D.Eof)
    assert _pages(ev) == exp
    for e in ev:
        if isinstance(e, D.Pages):
            steps = e.offsets[0] + np.arange(e.offsets.size, dtype=np.uint64) * TPS
            assert e.contiguous == bool((e.offsets == steps).all()), e.offsets


def test_accepted_flag_variants():
    """QEMU strips CONTINUE before dispatching: EOS|CONTINUE ends the chunk, FLUSH|CONTINUE is a flush."""
    head = S.file_header() + S.section_header(S.Section.START, 7, "ram", 0, 4) + R.setup_payload(BLOCKS) + S.section_footer(7)
    stream = (head + S.section_header(S.Section.PART, 7) + struct.pack(">Q", R.FLAG_EOS | R.FLAG_CONTINUE)
              + S.section_footer(7) + S.eof())
    assert D.StreamDecoder(LOCAL, {}).feed(stream)[-2:] == [D.SectionEnd(7, S.Section.PART), D.Eof()]
    stream = _ram_stream(struct.pack(">Q", R.FLAG_MULTIFD_FLUSH | R.FLAG_CONTINUE))
    assert D.StreamDecoder(LOCAL, {}).feed(stream)[-3:] == [D.MultifdFlush(), D.SectionEnd(7, S.Section.PART), D.Eof()]


def _bare_decode(stream: bytes, chunk: int, fast: bool) -> list:
    """The postcopy-preempt channel as the destination reads it: lone CONTINUE|PAGE records
    through next_page_record (if `fast`), everything else through next_event."""
    dec = D.StreamDecoder(LOCAL, {}, postcopy=True, bare_ram=True, buffer_size=1 << 16)
    out = []
    for i in range(0, len(stream), chunk):
        part = stream[i:i + chunk]
        sp = dec.space()
        sp[:len(part)] = part
        dec.commit(len(part))
        while True:
            if fast and (rec := dec.next_page_record()) is not None:
                out.append(("page", dec.last_block, rec[0], bytes(dec.buf[rec[1]:rec[1] + TPS])))
                continue
            if (ev := dec.next_event()) is None:
                break
            out += _pages([ev])  # copied to bytes before the buffer moves
    dec.finish()
    return out


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(record, min_size=1, max_size=25), st.integers(1, 9000), st.integers(0, 2**32 - 1))
def test_preempt_fast_path_matches_the_decoder(records, chunk, seed):
    """next_page_record takes only whole CONTINUE|PAGE records, and together with next_event
    yields exactly what next_event alone yields, however the bytes arrive."""
    part, _ = _encode(records, seed)
    assert _bare_decode(part, chunk, True) == _bare_decode(part, chunk, False)


def test_preempt_fast_path_leaves_bad_records_to_the_decoder():
    """A CONTINUE|PAGE record past the end of its block is not taken by the fast path: the
    decoder then reports it."""
    good = R.page_header(0, R.FLAG_PAGE, "b") + bytes(TPS)
    bad = R.page_header(TPS, R.FLAG_PAGE, None) + bytes(TPS)  # block "b" is one page long
    dec = D.StreamDecoder(LOCAL, {}, postcopy=True, bare_ram=True)
    with pytest.raises(ProtocolError, match="outside RAM block 'b'"):
        dec.feed(good)
        assert dec.next_page_record() is None  # named record: not the fast path
        sp = dec.space()
        sp[:len(bad)] = bad
        dec.commit(len(bad))
        assert dec.next_page_record() is None
        dec.next_event()
