"""Page placement of the postcopy destination against a real userfaultfd (no guest needed)."""
import ctypes
import mmap

import numpy as np
import pytest

from livemig.postcopy import PostcopyDestination
from livemig.ramblock import RamBlock
from livemig.uffd import probe

pytestmark = pytest.mark.skipif(not probe()[0], reason=f"userfaultfd unavailable: {probe()[2]}")


@pytest.fixture
def dest():
    m = mmap.mmap(-1, 64 * 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    rec, nz = np.zeros(64, bool), np.zeros(64, bool)
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, rec, nz, lambda: [])
    pc.listen()
    yield pc, np.frombuffer(m, np.uint8).reshape(64, 4096), rec
    pc.finish()


def test_runs_gaps_and_pages_already_present(dest):
    pc, ram, rec = dest
    data = np.arange(10, dtype=np.uint8).repeat(4096).reshape(10, 4096)
    pc.place_pages(np.array([3]), data[:1] + 100)  # page 3 lands first (as from another channel)
    idx = np.array([1, 2, 3, 4, 5, 9, 10, 20, 21, 22])
    pc.place_pages(idx, data)
    assert ram[3, 0] == 100  # EEXIST: the first copy stays
    for k, p in enumerate(idx):
        if p != 3:
            assert ram[p, 0] == k and (ram[p] == k).all()
    assert rec[idx].all() and not rec[[0, 6, 7, 8, 11]].any()
    pc.place_zero_pages(np.array([6, 7, 8, 9]))  # 9 is present already
    assert rec[[6, 7, 8]].all() and ram[9, 0] == 5 and not ram[6:9].any()


def test_latency_is_accounted_for_requested_pages(dest):
    pc, ram, rec = dest
    pc.requested[5] = True
    pc.fault_time[5] = (0.0, -1)
    pc.place_pages(np.array([5]), np.ones((1, 4096), np.uint8))
    assert not pc.requested[5] and len(pc.latencies) == 1
    assert pc.stats()["postcopy-non-vcpu-latency"] > 0


def test_lone_page_from_a_receive_buffer(dest):
    """place_one_at (the preempt channel's lone page): placed from a raw address, marked received,
    its fault latency counted once; a second copy of the page leaves the first in place."""
    pc, ram, rec = dest
    buf = np.full(4096, 7, np.uint8)
    pc.requested[12] = True
    pc.fault_time[12] = (0.0, -1)
    placer = pc.main_placer
    placer.place_one_at(12, buf.ctypes.data)
    assert (ram[12] == 7).all() and rec[12] and pc.nonzero[12] and not pc.requested[12]
    assert len(pc.latencies) == 1
    other = np.full(4096, 9, np.uint8)
    placer.place_one_at(12, other.ctypes.data)
    assert (ram[12] == 7).all() and len(pc.latencies) == 1
