"""The waiting destination's background allocation: every mapping it is given ends up populated
(page-table entries present, checked in /proc/self/pagemap), guest RAM before the second mapping."""
from __future__ import annotations

import mmap
import os
import struct

import pytest

from livemig.machine.kvm import buffer_address
from livemig.ramblock import TPS, Prefaulter, populate

SIZE = 8 << 20


def present(addr: int, npages: int) -> list[bool]:
    """Whether each page of [addr, addr + npages pages) is mapped in this process."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // TPS * 8)
        raw = f.read(npages * 8)
    return [bool(v >> 63) for v in struct.unpack(f"<{npages}Q", raw)]


@pytest.fixture
def two_mappings():
    fd = os.memfd_create("prefaulter-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, SIZE)
    maps = [mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE) for _ in range(2)]
    yield [buffer_address(m) for m in maps]
    for m in maps:
        m.close()
    os.close(fd)


def test_both_mappings_are_populated_one_after_the_other(two_mappings):
    if not populate(two_mappings[0], TPS):
        pytest.skip("MADV_POPULATE_WRITE needs Linux 5.14+")
    guest, alias = two_mappings
    assert not any(present(alias, SIZE // TPS))
    pf = Prefaulter([guest, alias], SIZE, chunk=1 << 20).start()
    pf.thread.join(timeout=30)
    assert not pf.thread.is_alive()
    assert pf.ready(guest) == pf.ready(alias) == SIZE
    assert pf.ready(guest + TPS) == 0  # not one of its mappings
    assert all(present(guest, SIZE // TPS)) and all(present(alias, SIZE // TPS))


def test_stopped_before_it_starts_populates_nothing(two_mappings):
    guest, alias = two_mappings
    pf = Prefaulter([guest, alias], SIZE, chunk=1 << 20)
    pf.stop()
    pf.start().thread.join(timeout=30)
    assert pf.ready(guest) == pf.ready(alias) == 0
    assert not any(present(alias, SIZE // TPS))


def test_stop_returns_once_nothing_more_is_populated(two_mappings):
    guest, alias = two_mappings
    pf = Prefaulter([guest, alias], SIZE, chunk=TPS).start()  # 4 096 small steps: still running
    pf.stop()
    assert not pf.thread.is_alive()
    done = list(pf.done)
    assert sum(present(guest, SIZE // TPS)) == done[0] // TPS or done[0] == SIZE
    assert all(not p for p in present(alias + done[1], (SIZE - done[1]) // TPS))
