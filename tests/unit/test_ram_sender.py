"""The source's dirty bitmap: claims by page requests (take, take_one) against the background scan."""
import mmap

import numpy as np

from livemig.outgoing import RamSender
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
