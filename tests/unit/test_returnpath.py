"""Return-path messages (wire.returnpath): byte layout and round trips through RPDecoder."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import ProtocolError
from livemig.ramblock import pack_bitmap
from livemig.wire import returnpath as RP

BITMAPS = {"pc.ram": 16, "vga.vram": 8, "x" * 255: 8}


def decode_all(data: bytes, chunk: int | None = None, sizes=BITMAPS) -> list:
    dec = RP.RPDecoder(sizes)
    out = []
    chunk = chunk or max(len(data), 1)
    for i in range(0, len(data), chunk):
        dec.feed(data[i:i + chunk])
        while (m := dec.next_message()) is not None:
            out.append(m)
    assert dec.next_message() is None
    assert not dec._buf, "bytes left over after the last message"
    return out


def test_layouts():
    assert RP.shut(0) == b"\x00\x01\x00\x04\x00\x00\x00\x00"
    assert RP.shut(1) == b"\x00\x01\x00\x04\x00\x00\x00\x01"
    assert RP.pong(0x42) == b"\x00\x02\x00\x04\x00\x00\x00\x42"
    assert RP.req_pages(0x200000, 0x1000, "pc.ram") == (
        b"\x00\x03\x00\x13" + struct.pack(">QI", 0x200000, 0x1000) + b"\x06pc.ram")
    assert RP.req_pages(0x3000, 0x1000, None) == b"\x00\x04\x00\x0c" + struct.pack(">QI", 0x3000, 0x1000)
    bm = bytes(range(16))
    assert RP.recv_bitmap("pc.ram", bm) == (b"\x00\x05\x00\x07\x06pc.ram" + struct.pack(">Q", 16) + bm
                                            + struct.pack(">Q", 0x0123456789ABCDEF))
    assert RP.resume_ack() == b"\x00\x06\x00\x04\x00\x00\x00\x01"
    assert RP.switchover_ack() == b"\x00\x07\x00\x00"
    with pytest.raises(ValueError):
        RP.recv_bitmap("pc.ram", b"\x00" * 9)
    assert RP.preempt_requests() == b"\x4c\x4d\x00\x00"  # livemig's own, far from QEMU's numbers
    assert [int(t) for t in RP.RP] == list(range(1, 8)) + [0x4C4D]
    assert RP.RP.REQ_PAGES_ID == 3 and RP.RP.REQ_PAGES == 4  # the numbering trap


SEQUENCE = [
    (RP.pong(1), RP.Pong(1)),
    (RP.pong(2), RP.Pong(2)),
    (RP.req_pages(0, 4096, "pc.ram"), RP.ReqPages(0, 4096, "pc.ram")),
    (RP.req_pages(8192, 4096, None), RP.ReqPages(8192, 4096, None)),
    (RP.recv_bitmap("vga.vram", b"\xff" * 8), RP.RecvBitmap("vga.vram", b"\xff" * 8)),
    (RP.req_pages(1 << 40, 1 << 21, "x" * 255), RP.ReqPages(1 << 40, 1 << 21, "x" * 255)),
    (RP.req_pages(0xFFFF_FFFF_FFFF_F000, 0xFFFFFFFF, None), RP.ReqPages(0xFFFF_FFFF_FFFF_F000, 0xFFFFFFFF, None)),
    (RP.pong(0xFFFFFFFF), RP.Pong(0xFFFFFFFF)),
    (RP.resume_ack(), RP.ResumeAck(1)),
    (RP.switchover_ack(), RP.SwitchoverAck()),
    (RP.preempt_requests(), RP.PreemptRequests()),
    (RP.recv_bitmap("pc.ram", bytes(range(16))), RP.RecvBitmap("pc.ram", bytes(range(16)))),
    (RP.shut(0), RP.Shut(0)),
    (RP.shut(1), RP.Shut(1)),
]
DATA = b"".join(d for d, _ in SEQUENCE)
MSGS = [m for _, m in SEQUENCE]


@pytest.mark.parametrize("chunk", [None, 1, 2, 3, 5, 13, 64])
def test_round_trip(chunk):
    assert decode_all(DATA, chunk) == MSGS


def test_req_pages_tracks_last_block():
    dec = RP.RPDecoder()
    dec.feed(RP.req_pages(0, 4096, "a") + RP.req_pages(4096, 4096, None) + RP.req_pages(0, 4096, "b"))
    assert dec.next_message() == RP.ReqPages(0, 4096, "a")
    assert dec.last_block == "a"
    assert dec.next_message() == RP.ReqPages(4096, 4096, None)
    assert dec.next_message() == RP.ReqPages(0, 4096, "b")
    assert dec.last_block == "b"
    assert dec.next_message() is None


def test_partial_recv_bitmap_waits_for_its_trailer():
    data = RP.recv_bitmap("pc.ram", bytes(16))
    dec = RP.RPDecoder(BITMAPS)
    for i in range(len(data) - 1):
        dec.feed(data[i:i + 1])
        assert dec.next_message() is None
    dec.feed(data[-1:])
    assert dec.next_message() == RP.RecvBitmap("pc.ram", bytes(16))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.booleans(), min_size=1, max_size=300))
def test_recv_bitmap_with_packed_bits(bits):
    """pack_bitmap output (LE, padded to 8) is what RECV_BITMAP carries; it survives the trip."""
    arr = np.array(bits, dtype=bool)
    bm = pack_bitmap(arr)
    sizes = {"pc.ram": len(bm)}
    [msg] = decode_all(RP.recv_bitmap("pc.ram", bm), 3, sizes)
    got = np.unpackbits(np.frombuffer(msg.bitmap, dtype=np.uint8), bitorder="little")[:len(bits)]
    assert got.astype(bool).tolist() == bits


message = st.one_of(
    st.builds(RP.shut, st.integers(0, 2**32 - 1)).map(lambda b: (b, RP.Shut(struct.unpack(">I", b[4:])[0]))),
    st.builds(RP.pong, st.integers(0, 2**32 - 1)).map(lambda b: (b, RP.Pong(struct.unpack(">I", b[4:])[0]))),
    st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**32 - 1), st.sampled_from(["pc.ram", "vga.vram"])).map(
        lambda t: (RP.req_pages(*t), RP.ReqPages(*t))),
    st.just((RP.resume_ack(), RP.ResumeAck(1))),
    st.just((RP.switchover_ack(), RP.SwitchoverAck())),
    st.binary(min_size=8, max_size=8).map(lambda b: (RP.recv_bitmap("vga.vram", b), RP.RecvBitmap("vga.vram", b))),
)


@settings(max_examples=60, deadline=None)
@given(st.lists(message, max_size=20), st.integers(1, 40))
def test_random_sequences_round_trip(msgs, chunk):
    data = b"".join(b for b, _ in msgs)
    assert decode_all(data, chunk) == [m for _, m in msgs]


def test_tls_records_on_a_plaintext_return_path_are_named():
    """A plaintext source talking to a TLS destination reads its alert as a message."""
    for record in (b"\x15\x03\x03\x00\x02\x02\x46", b"\x17\x03\x03\x00\x13" + bytes(19)):
        with pytest.raises(ProtocolError, match="unknown message type .*the destination uses TLS"):
            decode_all(record)
    with pytest.raises(ProtocolError, match=r"unknown message type 4660$"):
        decode_all(b"\x12\x34\x00\x00")


def test_malformed_page_requests_are_refused():
    """The direct path for REQ_PAGES_ID takes only well-formed ones; the rest get the decoder's errors."""
    good = RP.req_pages(0x1000, 0x1000, "pc.ram")
    cases = [
        (struct.pack(">HHQIB", 3, 13, 0x1000, 0x1000, 0), "too short"),  # no name
        (good[:16] + b"\x05" + b"pc.ram", "does not match name length"),
        (good[:17] + "pc.räm".encode("latin-1"), "not ASCII"),
    ]
    for data, err in cases:
        with pytest.raises(ProtocolError, match=err):
            decode_all(data)
    assert decode_all(good) == [RP.ReqPages(0x1000, 0x1000, "pc.ram")]


def test_preempt_requests_has_no_payload():
    with pytest.raises(ProtocolError, match="PREEMPT_REQUESTS has length 4, expected 0"):
        decode_all(struct.pack(">HH", 0x4C4D, 4) + b"\x00" * 4)


def test_a_second_decoder_takes_over_from_the_pending_bytes():
    """An urgent process that stops mid-stream hands back what it read but did not decode; a
    decoder fed those bytes first, then the rest of the stream, reads every message in order."""
    data = b"".join(RP.req_pages(p * 4096, 4096, "pc.ram") for p in range(5))
    first = RP.RPDecoder()
    first.feed(data[:len(data) // 2 + 3])  # two messages and part of a third
    assert [first.next_message(), first.next_message(), first.next_message()] == \
        [RP.ReqPages(0, 4096, "pc.ram"), RP.ReqPages(4096, 4096, "pc.ram"), None]
    second = RP.RPDecoder()
    second.feed(first.pending())
    second.feed(data[len(data) // 2 + 3:])
    assert decode_rest(second) == [RP.ReqPages(p * 4096, 4096, "pc.ram") for p in range(2, 5)]


def decode_rest(dec: RP.RPDecoder) -> list:
    out = []
    while (m := dec.next_message()) is not None:
        out.append(m)
    return out
