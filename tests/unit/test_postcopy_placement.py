"""Page placement of the postcopy destination against a real userfaultfd (no guest needed)."""
import ctypes
import mmap
import os
import threading
import time

import numpy as np
import pytest

from livemig.postcopy import WRITTEN, PostcopyDestination, minor_faults_supported
from livemig.ramblock import RamBlock
from livemig.uffd import probe

pytestmark = pytest.mark.skipif(not probe()[0], reason=f"userfaultfd unavailable: {probe()[2]}")


class GuestView:
    """Guest RAM as the tests index it; its repr reads nothing (pytest's failure report would
    otherwise read pages never placed, and block on them with the GIL held)."""

    def __init__(self, a: np.ndarray):
        self.a = a

    def __getitem__(self, k):
        return self.a[k]

    def __setitem__(self, k, v):
        self.a[k] = v

    def __repr__(self) -> str:
        return "<guest RAM>"


@pytest.fixture(params=["UFFDIO_COPY", "UFFDIO_CONTINUE"])
def dest(request):
    """Anonymous guest RAM (pages placed with UFFDIO_COPY), or guest RAM on a memfd (written into
    a second mapping, then mapped with UFFDIO_CONTINUE). Only placed pages may be read here."""
    fd = None
    if request.param == "UFFDIO_CONTINUE":
        if not minor_faults_supported():
            pytest.skip("userfaultfd here has no minor faults on shared memory")
        fd = os.memfd_create("test-ram")
        os.ftruncate(fd, 64 * 4096)
        m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
    else:
        m = mmap.mmap(-1, 64 * 4096)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    rec, nz = np.zeros(64, bool), np.zeros(64, bool)
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, rec, nz, lambda: [], ram_fd=fd)
    assert pc.minor == (fd is not None)
    pc.advise()
    pc.listen()
    yield pc, GuestView(np.frombuffer(m, np.uint8).reshape(64, 4096)), rec
    pc.finish()
    pc.release()
    if fd is not None:
        os.close(fd)


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


def test_a_placed_page_is_never_written_again(dest):
    """Once placed the guest owns a page: a later copy of it (the other channel, a re-send) must
    not overwrite what the guest wrote since, whichever way pages are placed."""
    pc, ram, rec = dest
    pc.place_pages(np.array([30, 31]), np.full((2, 4096), 1, np.uint8))
    ram[30, :8] = 42  # the guest writes the page
    pc.place_pages(np.array([29, 30, 31, 32]), np.full((4, 4096), 2, np.uint8))
    pc.main_placer.place_one_at(30, np.full(4096, 3, np.uint8).ctypes.data)
    pc.place_zero_pages(np.array([30, 31]))
    assert (ram[30, :8] == 42).all() and (ram[30, 8:] == 1).all() and (ram[31] == 1).all()
    assert (ram[29] == 2).all() and (ram[32] == 2).all() and rec[29:33].all()


def test_two_placers_race_for_the_same_pages(dest):
    """The main stream and the preempt channel place overlapping pages at once: every page ends
    whole, from one of them, and marked received."""
    pc, ram, rec = dest
    from livemig.postcopy import Placer
    other = Placer(pc)
    idx = np.arange(40, 64)

    def run(placer, value):
        for s in range(0, idx.size, 3):
            placer.place_pages(idx[s:s + 5], np.full((idx[s:s + 5].size, 4096), value, np.uint8))

    threads = [threading.Thread(target=run, args=(p, v)) for p, v in ((pc.main_placer, 5), (other, 6))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert rec[idx].all()
    for p in idx:
        assert ram[p, 0] in (5, 6) and (ram[p] == ram[p, 0]).all()


def test_fault_on_a_written_page_is_mapped_at_once():
    """Minor mode: a page whose data a placer has written but not mapped yet (WRITTEN) is mapped by
    the fault thread itself when the guest touches it, without a page request."""
    if not minor_faults_supported():
        pytest.skip("userfaultfd here has no minor faults on shared memory")
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, 64 * 4096)
    m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    sent = []
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, sent.append, np.zeros(64, bool), np.zeros(64, bool),
                             lambda: [], ram_fd=fd)
    pc.advise()
    pc.listen()
    pc.alias_u8[17] = 0x5A
    pc.claimed[17] = WRITTEN
    buf = ctypes.create_string_buffer(4)
    t = threading.Thread(target=ctypes.memmove, args=(buf, addr + 17 * 4096, 4))  # faults without the GIL
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and buf.raw == b"\x5a" * 4
    deadline = time.monotonic() + 5  # the fault thread counts it just after the wake-up
    while not pc.local_latencies and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not sent and len(pc.local_latencies) == 1 and not pc.latencies
    assert pc.latency_percentiles()["mapped-at-fault"] == 1
    pc.finish()
    pc.release()
    os.close(fd)


@pytest.mark.parametrize("dest", ["UFFDIO_CONTINUE"], indirect=True)
def test_minor_placement_maps_each_piece_before_claiming_the_next(dest):
    """Minor mode: a long run is claimed, written and mapped CONTINUE_PIECE pages at a time, so a
    fault on a page the placer has claimed waits for one piece; a page another placer holds is
    left to it."""
    pc, ram, rec = dest
    from livemig.postcopy import CLAIMED, CONTINUE_PIECE
    n = 3 * CONTINUE_PIECE
    pc.claimed[n - 2] = CLAIMED  # another placer is writing this one
    seen = []
    cont = pc.uffd.cont

    def spy(dst, length, buf=None, **kw):
        first = (dst - pc.addr) // 4096
        seen.append((first, length // 4096, int(np.count_nonzero(pc.claimed[:n]))))
        return cont(dst, length, buf, **kw)

    pc.uffd.cont = spy
    pc.place_pages(np.arange(n), np.arange(n, dtype=np.uint8).repeat(4096).reshape(n, 4096))
    assert [(f, k) for f, k, _ in seen] == [(0, CONTINUE_PIECE), (CONTINUE_PIECE, CONTINUE_PIECE),
                                            (2 * CONTINUE_PIECE, CONTINUE_PIECE - 2), (n - 1, 1)]
    assert seen[0][2] == CONTINUE_PIECE + 1  # at the first map only the first piece was claimed
    assert rec[:n - 2].all() and rec[n - 1] and not rec[n - 2]
    for p in range(n):
        if p != n - 2:
            assert (ram[p] == p).all()


def test_pages_out_of_order_in_one_event(dest):
    """A run of page records may hold pages in any order (the push jumps after a request): each
    page gets its own data even when the run covers a contiguous range."""
    pc, ram, rec = dest
    idx = np.array([40, 42, 41, 43])
    pc.place_pages(idx, (idx.astype(np.uint8)).repeat(4096).reshape(4, 4096))
    for p in idx:
        assert (ram[p] == p).all()
    assert rec[40:44].all()


def test_a_requested_page_goes_in_before_the_pages_ahead_of_it(dest):
    """A page a vCPU waits for, found anywhere in the pages still to place, is placed first;
    the others follow in order, each with its own data, the requested one not placed twice."""
    pc, ram, rec = dest
    placed = []
    for name in ("copy", "cont"):
        real = getattr(pc.uffd, name)

        def spy(dst, *args, real=real, **kw):
            placed.append((dst - pc.addr) // 4096)
            return real(dst, *args, **kw)
        setattr(pc.uffd, name, spy)
    pc.requested[50] = True
    pc.fault_time[50] = (0.0, 0)
    idx = np.arange(10, 60)
    pc.place_pages(idx, idx.astype(np.uint8).repeat(4096).reshape(idx.size, 4096))
    assert placed[0] == 50 and 50 not in placed[1:]
    assert not pc.requested[50] and len(pc.latencies) == 1 and rec[10:60].all()
    for p in idx:
        assert (ram[p] == p).all()


def test_a_page_twice_in_one_event_keeps_its_first_copy(dest):
    """A run of page records may name a page twice; as with two channels, the first copy stays
    (in minor mode the second must not be written after the first was mapped)."""
    pc, ram, rec = dest
    data = np.stack([np.full(4096, v, np.uint8) for v in (7, 1, 2)])
    pc.place_pages(np.array([9, 5, 5]), data)
    assert ram[9, 0] == 7 and ram[5, 0] == 1 and (ram[5] == 1).all() and rec[[5, 9]].all()


@pytest.mark.parametrize("dest", ["UFFDIO_CONTINUE"], indirect=True)
def test_a_placed_page_the_kernel_unmapped_is_mapped_again_at_its_fault(dest):
    """Minor mode: reclaim can take a placed page out of the guest's mapping while its data stays in
    the memfd; the guest's next touch is a minor fault on a received page, which must be mapped
    again (not ignored: the vCPU would wait until the migration ends)."""
    pc, ram, rec = dest
    pc.place_pages(np.array([3]), np.full((1, 4096), 0x33, np.uint8))
    assert rec[3]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    assert libc.madvise(pc.addr + 3 * 4096, 4096, 4) == 0  # MADV_DONTNEED: what reclaim does to the mapping
    buf = ctypes.create_string_buffer(4)
    t = threading.Thread(target=ctypes.memmove, args=(buf, pc.addr + 3 * 4096, 4))  # faults without the GIL
    t.start()
    t.join(timeout=10)
    assert not t.is_alive() and buf.raw == b"\x33" * 4


def test_memfd_guest_ram_without_minor_faults_drops_discarded_pages(monkeypatch):
    """A memfd-backed guest on a host without minor faults on shared memory: a discarded page must
    leave the file (else the guest reads its old data and the new copy finds it present)."""
    import livemig.postcopy as P
    monkeypatch.setattr(P, "minor_faults_supported", lambda: False)  # such a host (before Linux 5.13)
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, 64 * 4096)
    m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    rec = np.zeros(64, bool)
    pc = P.PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, rec, np.zeros(64, bool),
                               lambda: [], ram_fd=fd)
    assert not pc.minor
    pc.advise()
    ram = GuestView(np.frombuffer(m, np.uint8).reshape(64, 4096))
    ram[3] = 0x11  # precopy brought page 3
    rec[3] = True
    pc.discard([(3 * 4096, 4096)])  # dirtied since: discarded at the switch
    pc.listen()
    pc.place_pages(np.array([3]), np.full((1, 4096), 0x22, np.uint8))  # its new content, in postcopy
    assert rec[3] and ram[3, 0] == 0x22
    pc.finish()
    pc.release()
    os.close(fd)


def _mapped(addr: int, npages: int) -> np.ndarray:
    """Which pages from `addr` this process has mapped (the present bit of /proc/self/pagemap)."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(addr // 4096 * 8)
        entries = np.frombuffer(f.read(npages * 8), np.uint64)
    return (entries >> np.uint64(63)).astype(bool)


@pytest.mark.skipif(not minor_faults_supported(), reason="userfaultfd here has no minor faults on shared memory")
def test_prefaulted_fresh_ram_stays_mapped_until_listen_unmaps_what_did_not_arrive():
    """Minor mode, a fresh destination whose RAM is prefaulted: ADVISE keeps it mapped, so precopy
    writes into it without mapping it again; LISTEN unmaps every page that neither arrived nor
    was discarded (a source that forgot one must not leave the guest reading zeros), and the
    guest then faults on those and on the discarded ones."""
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, 64 * 4096)
    m = mmap.mmap(fd, 64 * 4096, mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    ram = GuestView(np.frombuffer(m, np.uint8).reshape(64, 4096))
    for i in range(48):  # the prefaulter's prefix
        ram[i, 0] = 0
    rec, nz = np.zeros(64, bool), np.zeros(64, bool)
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, rec, nz, lambda: [], ram_fd=fd)
    assert not pc.advise(zero_mapped=48) and pc.zero_mapped == 48
    assert _mapped(addr, 64)[:48].all()
    ram[0:20] = 0x33  # precopy brought pages 0-19 and 40-55
    ram[40:56] = 0x44
    rec[0:20] = rec[40:56] = nz[0:20] = nz[40:56] = True
    pc.discard([(5 * 4096, 2 * 4096)])  # 5 and 6 dirtied since; 20-39 never sent but not discarded
    pc.listen()
    expect = np.zeros(64, bool)
    expect[0:20] = expect[40:56] = True
    expect[5:7] = False
    assert (_mapped(addr, 64) == expect).all(), _mapped(addr, 64)
    pc.place_pages(np.array([5, 6, 25]), np.full((3, 4096), 0x55, np.uint8))
    assert ram[5, 0] == ram[6, 0] == ram[25, 4095] == 0x55 and ram[7, 0] == 0x33 and ram[41, 9] == 0x44
    pc.finish()
    pc.release()
    os.close(fd)


@pytest.mark.skipif(not minor_faults_supported(), reason="userfaultfd here has no minor faults on shared memory")
def test_advise_drops_ram_that_holds_data():
    """A destination whose RAM holds data (a page written before the stream) drops it all at ADVISE,
    prefaulted or not, as QEMU does."""
    fd = os.memfd_create("test-ram")
    os.ftruncate(fd, 16 * 4096)
    m = mmap.mmap(fd, 16 * 4096, mmap.MAP_SHARED)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    ram = GuestView(np.frombuffer(m, np.uint8).reshape(16, 4096))
    ram[:, 0] = 0
    ram[2, 0] = 7
    nz = np.zeros(16, bool)
    nz[2] = True
    pc = PostcopyDestination(RamBlock("pc.ram", m), addr, lambda b: None, np.zeros(16, bool), nz, lambda: [], ram_fd=fd)
    assert pc.advise(zero_mapped=16) and pc.zero_mapped == 0
    assert not _mapped(addr, 16).any()
    pc.release()
    os.close(fd)


@pytest.mark.parametrize("dest", ["UFFDIO_CONTINUE"], indirect=True)
def test_a_lone_page_that_fails_to_write_is_not_left_claimed(dest):
    """Minor mode: if writing a lone page into guest RAM fails, the error says so and the page is
    not left claimed, so the copy that comes next is placed (a claimed page is skipped forever)."""
    from livemig.errors import GuestError
    from livemig.postcopy import CLAIMED
    pc, ram, rec = dest
    page = np.full(4096, 9, np.uint8)
    pc.pwrite_lone, ram_fd = True, pc.ram_fd
    pc.ram_fd = os.open("/dev/null", os.O_RDONLY)  # pwrite fails: EBADF
    try:
        with pytest.raises(GuestError, match="writing page 12 into guest RAM failed"):
            pc.main_placer.place_one_at(12, page.ctypes.data)
    finally:
        os.close(pc.ram_fd)
        pc.ram_fd = ram_fd
    assert pc.claimed[12] == 0 and not rec[12]
    pc.main_placer.place_one_at(12, page.ctypes.data)
    assert rec[12] and (ram[12] == 9).all()
    pc.claimed[[20, 21]] = CLAIMED  # a placer that died: claimed, never written
    pc.place_pages(np.array([21]), np.full((1, 4096), 4, np.uint8))  # skipped: 21 looks taken
    assert not rec[21] and pc.release_claims() == 2
    pc.place_pages(np.array([20, 21]), np.full((2, 4096), 4, np.uint8))
    assert rec[20:22].all() and (ram[20] == 4).all() and (ram[21] == 4).all()
    assert pc.release_claims() == 0  # written pages stay as they are
