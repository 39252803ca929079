"""multifd sender and receiver threads over a real socket pair: pages land where their packet says,
whether a packet is one run of pages or scattered, and the destination's bitmaps follow."""
import socket

import numpy as np
import pytest

from livemig.multifd import MultifdReceiver, _SendChannel
from livemig.ramblock import TPS, RamBlock
from livemig.transport import Channel
from livemig.wire import multifd as WM

PAGES = 1024


class Bitmaps:
    """The destination's record of what arrived (the PageStore side of incoming.Incoming)."""

    def __init__(self):
        self.received = np.zeros(PAGES, dtype=bool)
        self.prepared = np.zeros(PAGES, dtype=bool)
        self.runs = 0

    def prepare(self, idx):
        self.prepared[idx] = True

    def prepare_run(self, first, n):
        self.prepared[first:first + n] = True
        self.runs += 1

    def stored(self, pages):
        self.received[pages] = True


@pytest.mark.parametrize("pages", [
    list(range(100, 228)),  # one run of a full packet
    [5],  # one page
    [1, 2, 3, 7, 8, 500, 1023],  # scattered
])
def test_pages_land_where_the_packet_says(pages):
    rng = np.random.default_rng(len(pages))
    src = RamBlock("pc.ram", bytearray(rng.integers(1, 255, PAGES * TPS, dtype=np.uint8).tobytes()))
    dst = RamBlock("pc.ram", bytearray(PAGES * TPS))
    a, b = socket.socketpair()
    sender = _SendChannel(0, Channel(a), src)
    store = Bitmaps()
    errors = []
    recv = MultifdReceiver({0: Channel(b)}, dst, store, errors.append)
    recv.ready.set()
    try:
        sender.thread.start()
        idx = np.array(pages, dtype=np.intp)
        sender.jobs.put((0, 1, idx))
        sender.jobs.put((WM.FLAG_SYNC, 2, idx[:0]))
        recv.sync(timeout=10)
    finally:
        sender.jobs.put(None)
        sender.thread.join(5)
        recv.close()
    assert not errors and sender.error is None
    assert np.array_equal(dst.u8[idx], src.u8[idx])
    others = np.setdiff1d(np.arange(PAGES), idx)
    assert not dst.u8[others].any()
    assert np.flatnonzero(store.received).tolist() == pages == np.flatnonzero(store.prepared).tolist()
    assert store.runs == (1 if pages == list(range(pages[0], pages[0] + len(pages))) else 0)
