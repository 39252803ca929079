"""The source's dirty bitmap: claims by page requests (take, take_one) against the background scan."""
import mmap

import numpy as np

from livemig.ram_send import RamSender
from livemig.ramblock import RamBlock
from livemig.stats import RamStats


def _sender(npages: int = 64) -> RamSender:
    s = RamSender(RamBlock("pc.ram", mmap.mmap(-1, npages * 4096)), None, RamStats())
    s.dirty[:] = False
    s.dirty[[3, 4, 10, 63]] = True
    s.ndirty = 4
    return s


def test_take_one_claims_a_dirty_page_once_and_moves_the_scan():
    s = _sender()
    assert s.take_one(4) and not s.dirty[4] and s.ndirty == 3 and s.scan == 5
    assert not s.take_one(4) and s.ndirty == 3  # already claimed (sent or in the queue)
    assert not s.take_one(5) and s.scan == 6  # clean page: nothing to claim, scan still moves
    assert s.take_one(63) and s.scan == 0  # the scan wraps after the last page
    assert s.next_batch().tolist() == [3, 10] and s.ndirty == 0


def test_take_one_agrees_with_take():
    a, b = _sender(), _sender()
    for page in (3, 3, 9, 10, 63, 0):
        assert a.take_one(page) == bool(b.take(page, 1).size)
        assert (a.dirty == b.dirty).all() and a.ndirty == b.ndirty and a.scan == b.scan
    assert np.flatnonzero(a.dirty).tolist() == [4]


class _Collect:
    """A Writer's channel that keeps what is sent (sendall / sendmsg_all)."""

    def __init__(self):
        self.data = bytearray()

    def sendall(self, data) -> None:
        self.data += bytes(data)

    def send_small(self, data) -> None:
        self.data += bytes(data)  # a copy now: the sender may reuse its buffer

    def sendmsg_all(self, bufs: list) -> int:
        n = 0
        for b in bufs:
            self.data += bytes(b)
            n += memoryview(b).nbytes
        return n


def test_a_batch_bigger_than_the_staging_buffer_goes_in_staging_sized_sends():
    from livemig.ram_send import BATCH_PAGES, Writer
    from livemig.wire import ram as WR
    npages = BATCH_PAGES * 4 + 8
    mem = mmap.mmap(-1, npages * 4096)
    pages = np.frombuffer(mem, np.uint8).reshape(npages, 4096)
    pages[:, 0] = np.arange(npages) % 251 + 1  # every page holds data
    pages[5] = 0  # one zero page among them
    chan = _Collect()
    s = RamSender(RamBlock("pc.ram", mem), Writer(chan), RamStats())
    assert s.send(np.arange(npages)) == npages - 1  # data pages
    s.w.flush()
    assert s.stats.normal == npages - 1 and s.stats.duplicate == 1
    # after the named first record, each data page is one CONTINUE|PAGE record, in page order
    first = len(WR.page_header(0, WR.FLAG_PAGE, "pc.ram")) + 4096
    zero = len(WR.page_header(5 * 4096, WR.FLAG_ZERO, None)) + 1
    body = bytes(chan.data)
    assert len(body) == zero + first + (npages - 2) * WR.PAGE_RECORD
    records = np.frombuffer(body[zero + first:], np.uint8).reshape(npages - 2, WR.PAGE_RECORD)
    sent = [p for p in range(npages) if p not in (0, 5)]
    assert (records[:, 8:] == pages[sent]).all()


def test_next_batch_wraps_to_dirty_pages_before_the_scan_position():
    """A block smaller than one scan window, the scan past its only dirty page: the batch still
    finds it (an empty batch with pages left failed small guests' stop-and-copy)."""
    s = _sender()
    s.dirty[:] = False
    s.dirty[3] = True
    s.ndirty = 1
    s.scan = 10
    assert s.next_batch().tolist() == [3] and s.ndirty == 0


def test_batches_shrink_under_a_low_bandwidth_limit():
    """Unlimited: ~4 MiB sends. A low max-bandwidth: at most an eighth of a 100 ms window's
    budget per send (a 1 MiB batch at 10 MB/s overshot its 1 MB window twice over)."""
    from livemig.ram_send import BATCH_PAGES, MIN_BATCH_PAGES, RATE_WINDOW_S, batch_pages
    from livemig.wire import ram as WR
    assert batch_pages(float("inf")) == BATCH_PAGES == 1024
    budget = 40_000_000 * RATE_WINDOW_S
    assert batch_pages(budget) * WR.PAGE_RECORD <= budget / 8 < (batch_pages(budget) + 1) * WR.PAGE_RECORD
    assert batch_pages(1000) == MIN_BATCH_PAGES


def test_lone_page_records_decode_on_the_preempt_channel_as_sent():
    """send_one (a requested page): the first record names the block, later ones reuse one
    record buffer; a zero page goes as a ZERO record. The preempt channel's decoder reads back
    every page as it was when sent, even after the buffer is refilled."""
    from livemig.ram_send import PageChannel, Writer
    from livemig.wire import decoder as D
    npages = 16
    mem = mmap.mmap(-1, npages * 4096)
    pages = np.frombuffer(mem, np.uint8).reshape(npages, 4096)
    pages[:] = (np.arange(npages * 4096) % 253 + 1).astype(np.uint8).reshape(npages, 4096)
    pages[5] = 0
    chan = _Collect()
    pc = PageChannel(RamBlock("pc.ram", mem), Writer(chan), RamStats())
    order = [3, 7, 5, 15, 7]
    for p in order:
        pc.send_one(p)
    assert pc.stats.normal == 4 and pc.stats.duplicate == 1
    dec = D.StreamDecoder([D.LocalBlock("pc.ram", npages * 4096, 4096)], {}, postcopy=True, bare_ram=True)
    dec.space()[:len(chan.data)] = chan.data
    dec.commit(len(chan.data))
    got = []
    while (ev := dec.next_event()) is not None:
        for k, off in enumerate((ev.offsets // 4096).tolist()):
            got.append((off, bytes(ev.data[k]) if isinstance(ev, D.Pages) else None))
    assert [p for p, _ in got] == order
    for p, data in got:
        assert data == (None if p == 5 else pages[p].tobytes())


def test_a_request_for_two_huge_pages_sends_each_whole():
    """A request covering two 2 MiB host pages, each with zero and data pages: all records of the
    first host page come before any of the second (the destination assembles one at a time)."""
    from livemig.ram_send import PageChannel, Writer
    from livemig.wire import decoder as D
    hp, npages = 512, 1024
    mem = mmap.mmap(-1, npages * 4096)
    pages = np.frombuffer(mem, np.uint8).reshape(npages, 4096)
    pages[::3] = 7  # every third page holds data, the rest are zero pages
    block = RamBlock("pc.ram", mem, hp * 4096)
    sender = RamSender(block, None, RamStats())
    sender.dirty[:] = True
    sender.ndirty = npages
    chan = _Collect()
    sender.send_requested(PageChannel(block, Writer(chan), RamStats()), 0, npages, resend=False)
    dec = D.StreamDecoder([D.LocalBlock("pc.ram", npages * 4096, hp * 4096)], {}, postcopy=True,
                          bare_ram=True, buffer_size=len(chan.data) + 4096)
    dec.space()[:len(chan.data)] = chan.data
    dec.commit(len(chan.data))
    seen = []
    while (ev := dec.next_event()) is not None:
        seen += (ev.offsets // 4096).tolist()
    assert sorted(seen) == list(range(npages)) and not sender.ndirty
    host = [p // hp for p in seen]
    assert host == sorted(host)  # never back to the first host page once the second has begun
