"""Hypothesis fuzzing of the sans-IO decoders (StreamDecoder, RPDecoder).

Inputs are random bytes and mutations of a valid recorded stream: bit flips, byte overwrites,
truncations, inserted and deleted bytes, and changes to the length fields. Properties:
  * only ProtocolError escapes (no IndexError, struct.error, numpy errors, hangs ...);
  * every example finishes quickly (hypothesis deadline);
  * page events never carry offsets outside their block, and discards stay inside theirs;
  * decoding does not depend on how the input is chunked: the same events, then the same error.
"""
from __future__ import annotations

from datetime import timedelta

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import ProtocolError
from livemig.wire import decoder as D
from livemig.wire import ram as R
from livemig.wire import returnpath as RP
from livemig.wire import stream as S
from livemig.wire.vmstate import Field, VMStateDescription, encode

TPS = R.TARGET_PAGE_SIZE
BLOCKS = [R.BlockInfo("pc.ram", 8 * TPS), R.BlockInfo("vga.vram", 2 * TPS)]
LOCAL = [D.LocalBlock(b.name, b.length) for b in BLOCKS]
LENGTHS = {b.name: b.length for b in BLOCKS}
DEV = VMStateDescription("dev", 2, (Field("a", "uint32"), Field("b", "buffer", size=3), Field("on", "bool")),
                         subsections=(VMStateDescription("dev/sub", 1, (Field("c", "uint16", count=2),)),))
DEVICES = {("dev", 0): DEV}
DEV_STATE = {"a": 7, "b": b"xyz", "on": True, "dev/sub": {"c": [1, 2]}}
FUZZ = settings(deadline=timedelta(milliseconds=1500), suppress_health_check=[HealthCheck.too_slow])


class Recorder:
    """Builds a stream and remembers where its length fields and structural bytes are."""

    def __init__(self):
        self.buf = bytearray()
        self.lengths: list[tuple[int, int]] = []  # (position, width) of every length/count field
        self.structure: list[int] = []  # positions of bytes that are not page contents

    def add(self, b: bytes, *length_fields: tuple[int, int], data: bool = False) -> None:
        pos = len(self.buf)
        self.lengths += [(pos + off, width) for off, width in length_fields]
        if not data:
            self.structure += range(pos, pos + len(b))
        self.buf += b


def _valid_stream() -> Recorder:
    r = Recorder()
    r.add(S.file_header())
    r.add(S.configuration(), (1, 4))
    r.add(S.command(S.Cmd.OPEN_RETURN_PATH), (3, 2))
    r.add(S.ping(1), (3, 2))
    r.add(S.postcopy_advise(TPS, TPS), (3, 2))
    r.add(S.section_header(S.Section.START, 1, "ram", 0, 4), (5, 1))
    setup = R.setup_payload(BLOCKS)  # word, 6pc.ram, len, 8vga.vram, len, eos
    r.add(setup, (0, 8), (8, 1), (15, 8), (23, 1), (32, 8))
    r.add(S.section_footer(1))
    r.add(S.section_header(S.Section.PART, 1))
    r.add(R.page_header(0, R.FLAG_PAGE, "pc.ram"), (8, 1))
    r.add(bytes(range(256)) * 16, data=True)
    r.add(R.zero_records(np.array([1, 2, 3, 7], dtype=np.uint64) * np.uint64(TPS)))
    r.add(R.page_header(5 * TPS, R.FLAG_PAGE, None))
    r.add(b"\xa5" * TPS, data=True)
    r.add(R.page_header(TPS, R.FLAG_ZERO, "vga.vram") + b"\x00", (8, 1))
    r.add(R.zero_records(np.array([0, 1], dtype=np.uint64) * np.uint64(TPS)))
    r.add(R.eos() + S.section_footer(1))
    r.add(S.ram_discard("pc.ram", [(0, TPS), (4 * TPS, 2 * TPS)]), (3, 2), (6, 1))
    blob = (S.command(S.Cmd.POSTCOPY_LISTEN) + S.section_header(S.Section.FULL, 2, "dev", 0, 2)
            + encode(DEV, DEV_STATE) + S.section_footer(2) + S.ping(3) + S.command(S.Cmd.POSTCOPY_RUN))
    r.add(S.packaged(blob)[:9], (3, 2), (5, 4))
    r.add(blob, (3, 2), (10, 1))
    r.add(S.ping(4), (3, 2))
    r.add(S.section_header(S.Section.END, 1))
    r.add(R.page_header(6 * TPS, R.FLAG_PAGE, "pc.ram"), (8, 1))
    r.add(b"\x3c" * TPS, data=True)
    r.add(R.page_header(4 * TPS, R.FLAG_ZERO, None) + b"\x00")
    r.add(R.eos() + S.section_footer(1))
    r.add(S.section_header(S.Section.FULL, 3, "dev", 0, 2), (5, 1))
    r.add(encode(DEV, DEV_STATE) + S.section_footer(3), (9, 1))
    r.add(S.eof())
    r.add(S.vmdescription(b'{"page_size":4096,"devices":[]}'), (1, 4))
    return r


VALID = _valid_stream()
VALID_BYTES = bytes(VALID.buf)


def check_event(ev) -> None:
    """Invariants every decoded event must satisfy, whatever the input."""
    if isinstance(ev, (D.Pages, D.ZeroPages)):
        assert ev.block in LENGTHS
        offs = ev.offsets
        assert offs.dtype == np.uint64 and offs.size >= 1
        assert not (offs % np.uint64(TPS)).any()
        assert int(offs.max()) + TPS <= LENGTHS[ev.block]
        if isinstance(ev, D.Pages):
            assert ev.data.shape == (offs.size, TPS)
    elif isinstance(ev, D.Discard):
        for s, n in ev.ranges:
            assert s % TPS == 0 and n % TPS == 0 and s + n <= LENGTHS[ev.block]
    elif isinstance(ev, D.VmDescription):
        assert len(ev.json) <= D.VMDESC_KEEP


def normalise(events) -> list:
    out = []
    for ev in events:
        check_event(ev)
        if isinstance(ev, D.Pages):
            out += [("page", ev.block, o, bytes(d)) for o, d in zip(ev.offsets.tolist(), ev.data)]
        elif isinstance(ev, D.ZeroPages):
            out += [("zero", ev.block, o) for o in ev.offsets.tolist()]
        else:
            out.append(ev)
    return out


def run_stream(data: bytes, chunk: int | None, postcopy: bool = True, expect_header: bool = True,
               buffer_size: int = 1 << 16):
    """Decode through space()/commit()/next_event() (the receive path), `chunk` bytes per commit.

    Returns (normalised events, error message or None). Only ProtocolError may escape.
    """
    dec = D.StreamDecoder(LOCAL, DEVICES, postcopy=postcopy, expect_header=expect_header, buffer_size=buffer_size)
    events: list = []
    chunk = chunk or max(1, len(data))
    pos = 0
    try:
        while True:
            while (ev := dec.next_event()) is not None:
                events += normalise([ev])  # copies page data before the next space()
            if pos == len(data) or dec.done:
                break
            sp = dec.space()
            assert len(sp) > 0, "decoder buffer full without an error"
            n = min(chunk, len(sp), len(data) - pos)
            sp[:n] = data[pos:pos + n]
            dec.commit(n)
            pos += n
        dec.finish()
    except ProtocolError as e:
        assert str(e)
        return events, str(e)
    assert dec.bytes_consumed <= pos
    return events, None


def check_stream(data: bytes, chunk: int, **kw) -> None:
    whole = run_stream(data, None, **kw)
    pieces = run_stream(data, chunk, **kw)
    assert whole == pieces
    if whole[1] and "truncated" in whole[1]:
        # An honest truncation: more input lets the decoder move on. A decoder stuck on a record
        # that no amount of input can complete (say, a field running past a command's payload)
        # would instead fill its buffer ("record larger than the buffer"); no record is 128 KiB.
        events, err = run_stream(data + bytes(150_000), 4096, buffer_size=1 << 17, **kw)
        assert err is None or "larger than" not in err, err


# ------------------------------------------------------------------ the recorded stream itself


def test_valid_stream_decodes():
    events, err = run_stream(VALID_BYTES, None)
    assert err is None
    assert isinstance(events[-1], D.VmDescription)
    assert D.DeviceState("dev", 0, 2, DEV_STATE) in events
    assert events.count(D.PostcopyRun()) == 1
    for chunk in (1, 7, 4100):
        assert run_stream(VALID_BYTES, chunk) == (events, None)


# ------------------------------------------------------------------ random input


@settings(FUZZ, max_examples=600)
@given(st.binary(max_size=600), st.integers(1, 64), st.sampled_from(["none", "header", "headerless"]))
def test_stream_random_bytes(data, chunk, mode):
    if mode == "header":
        data = S.file_header() + data
    check_stream(data, chunk, expect_header=(mode != "headerless"))


@settings(FUZZ, max_examples=400)
@given(st.integers(0, len(VALID_BYTES)), st.binary(min_size=1, max_size=300), st.integers(1, 700))
def test_stream_valid_prefix_random_tail(cut, tail, chunk):
    check_stream(VALID_BYTES[:cut] + tail, chunk)


# ------------------------------------------------------------------ mutations of the valid stream


@st.composite
def mutated(draw, base: Recorder):
    data = bytearray(base.buf)
    structural = st.sampled_from(base.structure)
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        kind = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "length", "length"]))
        anywhere = st.integers(0, len(data) - 1)
        pos = draw(st.one_of(structural, anywhere) if kind != "truncate" else st.integers(0, len(data)))
        pos = min(pos, len(data) - (kind != "truncate"))
        if kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "byte":
            data[pos] = draw(st.sampled_from([0x00, 0x01, 0x02, 0x05, 0x06, 0x07, 0x08, 0x20, 0x22, 0x28, 0x7E, 0xFF]))
        elif kind == "truncate":
            del data[pos:]
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=12))
        elif kind == "delete":
            del data[pos:pos + draw(st.integers(1, 12))]
        else:
            fields = [(p, w) for p, w in base.lengths if p + w <= len(data)]
            if not fields:
                continue
            p, w = draw(st.sampled_from(fields))
            old = int.from_bytes(data[p:p + w], "big")
            top = (1 << (8 * w)) - 1
            new = draw(st.one_of(st.sampled_from([0, 1, top, top >> 1, max(old - 1, 0), min(old + 1, top)]),
                                 st.integers(0, top)))
            data[p:p + w] = new.to_bytes(w, "big")
    return bytes(data)


@settings(FUZZ, max_examples=1500)
@given(mutated(VALID), st.integers(1, 5000))
def test_stream_mutations(data, chunk):
    check_stream(data, chunk)


@settings(FUZZ, max_examples=60)
@given(mutated(VALID))
def test_stream_mutations_byte_by_byte(data):
    check_stream(data, 1)


@settings(FUZZ, max_examples=300)
@given(mutated(VALID), st.integers(1, 5000))
def test_stream_mutations_without_postcopy(data, chunk):
    check_stream(data, chunk, postcopy=False)


# ------------------------------------------------------------------ return path

RP_SIZES = {"pc.ram": 8, "vga.vram": 16}


def run_rp(data: bytes, chunk: int):
    dec = RP.RPDecoder(RP_SIZES)
    out = []
    named = False
    try:
        for i in range(0, len(data), chunk):
            dec.feed(data[i:i + chunk])
            while (m := dec.next_message()) is not None:
                if isinstance(m, RP.ReqPages):
                    named = named or m.block is not None
                    assert named, "REQ_PAGES decoded before any REQ_PAGES_ID"
                if isinstance(m, RP.RecvBitmap):
                    assert len(m.bitmap) == RP_SIZES[m.block]
                if isinstance(m, RP.ResumeAck):
                    assert m.value == 1
                out.append(m)
    except ProtocolError as e:
        return out, str(e)
    return out, None


def _valid_rp() -> Recorder:
    r = Recorder()
    r.add(RP.pong(1), (2, 2))
    r.add(RP.req_pages(0, TPS, "pc.ram"), (2, 2), (16, 1))
    r.add(RP.req_pages(TPS, TPS, None), (2, 2))
    r.add(RP.pong(2), (2, 2))
    r.add(RP.recv_bitmap("vga.vram", bytes(range(16))), (2, 2), (4, 1), (13, 8))
    r.add(RP.resume_ack(), (2, 2))
    r.add(RP.switchover_ack(), (2, 2))
    r.add(RP.shut(0), (2, 2))
    return r


VALID_RP = _valid_rp()


def test_valid_rp_decodes():
    msgs, err = run_rp(bytes(VALID_RP.buf), 1)
    assert err is None and len(msgs) == 8


@settings(FUZZ, max_examples=600)
@given(st.binary(max_size=400), st.integers(1, 40))
def test_rp_random_bytes(data, chunk):
    assert run_rp(data, len(data) or 1) == run_rp(data, chunk)


@settings(FUZZ, max_examples=600)
@given(mutated(VALID_RP), st.integers(1, 40))
def test_rp_mutations(data, chunk):
    assert run_rp(data, len(data) or 1) == run_rp(data, chunk)
