"""The multifd init packet and packet header: QEMU's layout, round trips, every check."""
import struct

import numpy as np
import pytest
from hypothesis import given, strategies as st

from livemig.errors import ProtocolError
from livemig.wire import multifd as WM

SIZES = {"pc.ram": 64 << 20}


def test_layout_matches_qemu():
    init = WM.init_packet(3)
    assert len(init) == 64
    assert init[:8] == bytes.fromhex("1122334400000001") and init[24] == 3 and init[25:] == bytes(39)
    hdr = WM.packet_header(np.array([0x1000, 0x3000], dtype=np.uint64), 9, "pc.ram", WM.FLAG_SYNC)
    assert len(hdr) == WM.HEADER_LEN == 320 + 8 * 128
    magic, version, flags, alloc, normal, nsize, num = struct.unpack_from(">IIIIIIQ", hdr)
    assert (magic, version, flags, alloc, normal, nsize, num) == (0x11223344, 1, 1, 128, 2, 8192, 9)
    assert hdr[64:70] == b"pc.ram" and hdr[70:320] == bytes(250)
    assert struct.unpack_from(">QQQ", hdr, 320) == (0x1000, 0x3000, 0)


@given(st.lists(st.integers(0, (64 << 20) // 4096 - 1), max_size=128, unique=True).map(sorted),
       st.integers(0, 2**63), st.booleans())
def test_header_round_trip(pages, num, sync):
    offs = np.array(pages, dtype=np.uint64) * 4096
    pkt = WM.parse_header(WM.packet_header(offs, num, "pc.ram", WM.FLAG_SYNC if sync else 0), SIZES)
    assert pkt.offsets.tolist() == offs.tolist() and pkt.packet_num == num and pkt.sync == sync
    assert pkt.data_len == len(pages) * 4096 and pkt.block == ("pc.ram" if pages else "")


@given(st.lists(st.integers(0, (64 << 20) // 4096 - 1), min_size=1, max_size=128))
def test_a_packet_is_contiguous_exactly_when_its_pages_are_one_ascending_run(pages):
    offs = np.array(pages, dtype=np.uint64) * 4096
    pkt = WM.parse_header(WM.packet_header(offs, 0, "pc.ram"), SIZES)
    assert pkt.contiguous == (pages == list(range(pages[0], pages[0] + len(pages))))


def test_a_run_past_the_end_of_the_block_names_its_first_page_outside():
    end = 64 << 20
    offs = np.arange(end - 2 * 4096, end + 3 * 4096, 4096, dtype=np.uint64)
    with pytest.raises(ProtocolError, match=f"0x{end:x} outside"):
        WM.parse_header(WM.packet_header(offs, 0, "pc.ram"), SIZES)
    with pytest.raises(ProtocolError, match="0x1001 outside"):  # a misaligned run: the first
        WM.parse_header(WM.packet_header(np.arange(3, dtype=np.uint64) * 4096 + 0x1001, 0, "pc.ram"), SIZES)


def test_init_checks():
    assert WM.parse_init(WM.init_packet(1), channels=2) == 1
    with pytest.raises(ProtocolError, match="greater than number of channels"):
        WM.parse_init(WM.init_packet(2), channels=2)
    with pytest.raises(ProtocolError, match="magic"):
        WM.parse_init(b"\x00" * 64, channels=2)
    with pytest.raises(ProtocolError, match="64"):
        WM.parse_init(WM.init_packet(0)[:63], channels=2)


@given(st.binary(min_size=WM.HEADER_LEN, max_size=WM.HEADER_LEN))
def test_any_header_bytes_give_a_packet_or_a_protocol_error(raw):
    try:
        pkt = WM.parse_header(raw, SIZES)
    except ProtocolError:
        return
    assert pkt.offsets.size <= WM.PACKET_PAGES
    assert all(o % 4096 == 0 and o < (64 << 20) for o in pkt.offsets.tolist())


def test_sender_refuses_oversized_packets():
    with pytest.raises(ValueError):
        WM.packet_header(np.zeros(129, dtype=np.uint64), 0, "pc.ram")


def test_zero_records_on_the_main_channel_need_a_flush_too():
    """A pass of only zero pages still needs MULTIFD_FLUSH before the next merge: otherwise a later
    copy of such a page on a multifd channel can be stored before the loader reaches the ZERO
    record, which then wipes it."""
    from livemig.ram_send import PageChannel, Writer
    from livemig.ramblock import RamBlock
    from livemig.stats import RamStats

    class Sink:
        def sendall(self, data):
            pass

    class Multifd:
        unsynced = False
        queued: list = []

        def send_pages(self, idx):
            self.queued.append(idx)
            self.unsynced = True

    mem = bytearray(16 * 4096)
    mem[5 * 4096] = 1
    ch = PageChannel(RamBlock("pc.ram", mem), Writer(Sink()), RamStats())
    mf = Multifd()
    ch.send(np.array([1, 2, 3]), mf)  # zero pages only
    assert mf.unsynced and not mf.queued
    mf2 = Multifd()
    mf2.queued = []
    ch.send(np.array([4, 5]), mf2)
    assert mf2.unsynced and mf2.queued[0].tolist() == [5]


def test_pages_for_a_block_smaller_than_a_page_are_refused():
    hdr = WM.packet_header(np.array([0], dtype=np.uint64), 0, "rom")
    with pytest.raises(ProtocolError, match="less than a page"):
        WM.parse_header(hdr, {"rom": 100})
