"""The source's page data path for one RAM block: Writer (buffers records, counts bytes),
RamSender (dirty bitmap, scan position, claims shared with an urgent process) and PageChannel
(PAGE / ZERO records on one connection, its CONTINUE context and staging buffer); and the check
of a page request against the block.
"""
from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ProtocolError
from .ramblock import TPS, RamBlock, nonzero_pages, unpack_bitmap
from .shm import PipeLock, shared_array
from .stats import RamStats
from .transport import Channel
from .wire import ram as WR
from .wire import returnpath as RPW

if TYPE_CHECKING:
    from .multifd import MultifdSender

BATCH_PAGES = 1024  # data pages per send (~4 MiB on the wire): 1 MiB batches made pass 1 ~25 % slower
MIN_BATCH_PAGES = 32  # under a low max-bandwidth, a batch is at most an eighth of a window's budget
SCAN_WINDOW = 1 << 14  # pages examined per bitmap scan step
ITERATE_MAX_S = 0.05  # one PART section at most (QEMU's MAX_WAIT)
RATE_WINDOW_S = 0.1  # max-bandwidth is enforced per 100 ms window
RAM_SECTION_ID = 0  # the RAM section's id in the stream


def batch_pages(window_budget: float) -> int:
    """Data pages per send when `window_budget` bytes may go per rate window (inf: no limit):
    BATCH_PAGES, or an eighth of the budget, so one batch overshoots a window by little."""
    return int(max(MIN_BATCH_PAGES, min(BATCH_PAGES, window_budget // (8 * WR.PAGE_RECORD))))

class Writer:
    """Buffers small records, passes big batches straight through; counts every byte sent."""

    def __init__(self, chan: Channel, limit: int = 256 << 10):
        self.chan = chan
        self.buf = bytearray()
        self.limit = limit
        self.sent = 0

    def write(self, data) -> None:
        self.buf += data
        if len(self.buf) >= self.limit:
            self.flush()

    def write_big(self, data) -> None:
        self.flush()
        self.chan.sendall(data)
        self.sent += memoryview(data).nbytes

    def send_small(self, data: bytes) -> None:
        """Send now, after anything buffered: a short message (one page record), keeping the
        GIL if the socket has room (Channel.send_small)."""
        self.flush()
        self.chan.send_small(data)
        self.sent += len(data)

    def flush(self) -> None:
        if self.buf:
            self.chan.sendall(self.buf)
            self.sent += len(self.buf)
            self.buf = bytearray()

    @property
    def position(self) -> int:
        return self.sent + len(self.buf)

class RamSender:
    """Dirty bitmap, scan position and page batches of one RAM block on one channel."""

    def __init__(self, block: RamBlock, writer: Writer, stats: RamStats):
        self.block = block
        self.w = writer
        self.stats = stats
        self.dirty = np.ones(block.npages, dtype=np.bool_)  # everything needs sending at first
        # ndirty, scan position, requests served by an urgent process (shared with it, see share())
        self.counters = np.array([block.npages, 0, 0], dtype=np.int64)
        self.lock: Any = threading.Lock()  # claims of dirty pages (migration thread vs urgent sends)
        self.main = PageChannel(block, writer, stats)
        self.shared_fds: list[int] = []

    @property
    def ndirty(self) -> int:
        return int(self.counters[0])

    @ndirty.setter
    def ndirty(self, n: int) -> None:
        self.counters[0] = n

    @property
    def scan(self) -> int:
        return int(self.counters[1])

    @scan.setter
    def scan(self, page: int) -> None:
        self.counters[1] = page

    def share(self) -> list[int]:
        """Move the bitmap and counters to shared memory, the lock to a pipe, so that an urgent
        process (urgent_src.py) can claim pages too; returns the fds to pass it (call while no
        other thread claims: before postcopy starts)."""
        if not self.shared_fds:
            fd_dirty, dirty = shared_array(self.block.npages)
            fd_ctr, counters = shared_array(self.counters.size, np.int64)
            dirty[:] = self.dirty
            counters[:] = self.counters
            self.dirty, self.counters, self.lock = dirty, counters, PipeLock()
            self.shared_fds = [fd_dirty, fd_ctr]
        return [*self.shared_fds, *self.lock.fds]

    def release(self) -> None:
        """The migration ended: close what share() opened (the mappings stay; claims from now on
        are this process's alone)."""
        if self.shared_fds:
            for fd in (*self.shared_fds, *self.lock.fds):
                os.close(fd)
            self.shared_fds = []
            self.lock = threading.Lock()

    def attach(self, fds: list[int]) -> None:
        """In the urgent process: claim from the parent's bitmap (fds as share() returned them)."""
        _, self.dirty = shared_array(self.block.npages, fd=fds[0])
        _, self.counters = shared_array(self.counters.size, np.int64, fd=fds[1])
        self.lock = PipeLock((fds[2], fds[3]))

    @property
    def named(self) -> bool:
        return self.main.named

    @named.setter
    def named(self, value: bool) -> None:
        self.main.named = value

    def merge(self, words: np.ndarray) -> int:
        """OR a KVM dirty log into the bitmap; returns how many pages were newly dirtied."""
        bits = unpack_bitmap(words, self.block.npages)
        before = self.ndirty
        np.logical_or(self.dirty, bits, out=self.dirty)
        self.ndirty = int(np.count_nonzero(self.dirty))
        return int(np.count_nonzero(bits)) if before else self.ndirty

    def next_batch(self, maxn: int = BATCH_PAGES) -> np.ndarray:
        with self.lock:
            return self._next_batch(maxn)

    def _next_batch(self, maxn: int) -> np.ndarray:
        npages = self.block.npages
        scanned = 0
        # the scan wraps once: up to two windows more than the block when it starts mid-window
        while self.ndirty and scanned < npages + 2 * SCAN_WINDOW:
            hits = np.flatnonzero(self.dirty[self.scan:self.scan + SCAN_WINDOW])
            if hits.size:
                idx = hits[:maxn] + self.scan
                self.dirty[idx] = False
                self.ndirty -= idx.size
                self.scan = int(idx[-1]) + 1
                if self.scan >= npages:
                    self.scan = 0
                return idx
            scanned += SCAN_WINDOW
            self.scan += SCAN_WINDOW
            if self.scan >= npages:
                self.scan = 0
        return np.empty(0, dtype=np.intp)

    @property
    def host_pages(self) -> int:
        """Target pages per host page of the block (512 for 2 MiB huge pages)."""
        return self.block.page_size // TPS

    def host_page_spans(self, first: int, count: int) -> list[tuple[int, int]]:
        """A request's pages as (first, count) spans to take and send one after the other: one
        span, or with huge pages one a host page, so that each one's ZERO and PAGE records go
        together (the destination assembles a host page at a time)."""
        hp = self.host_pages
        if hp == 1 or count <= hp:
            return [(first, count)]
        return [(h, hp) for h in range(first, first + count, hp)]

    def canonicalize(self) -> None:
        """Postcopy: a host page that is partly dirty is dirty as a whole (discards, sends and
        placement all work on whole host pages), and the scan restarts on a host-page boundary."""
        hp = self.host_pages
        self.scan = 0
        if hp == 1:
            return
        whole = self.dirty.reshape(-1, hp).any(axis=1)
        self.dirty[:] = np.repeat(whole, hp)
        self.ndirty = int(np.count_nonzero(self.dirty))

    def take(self, first: int, count: int) -> np.ndarray:
        """Claim the still-dirty pages of [first, first+count) (a page request) and move the scan
        position right after them, so the background pass continues from there."""
        with self.lock:
            hits = np.flatnonzero(self.dirty[first:first + count]) + first
            if hits.size:
                self.dirty[hits] = False
                self.ndirty -= hits.size
            self.scan = first + count if first + count < self.block.npages else 0
            return hits

    def take_one(self, page: int) -> bool:
        """take() of one page, without building arrays (the common page request): True if it was
        still dirty (now claimed by the caller)."""
        counters = self.counters
        with self.lock:
            counters[1] = page + 1 if page + 1 < self.block.npages else 0  # the scan goes on after it
            if not self.dirty[page]:
                return False
            self.dirty[page] = False
            counters[0] -= 1  # ndirty
            return True

    def send(self, idx: np.ndarray, multifd: MultifdSender | None = None) -> int:
        """Send pages on the main channel (data pages on the multifd channels, if given); returns
        how many were not zero pages."""
        return self.main.send(idx, multifd)

    def send_requested(self, chan: PageChannel, first: int, count: int, resend: bool) -> None:
        """Send a requested host page on `chan` at once (the background scan then continues after
        it): the pages of it still dirty, or with `resend` all of them (the destination keeps
        whichever copy lands first; QEMU sends a host page on one channel only)."""
        if count == 1:  # a 4 KiB host page: no arrays
            if self.take_one(first) or resend:
                chan.send_one(first)
            return
        spans = self.host_page_spans(first, count)
        if len(spans) > 1:
            for h, n in spans:
                self.send_requested(chan, h, n, resend)
            return
        idx = self.take(first, count)
        if not idx.size:
            if not resend:
                return  # already claimed by the background push: somewhere in the main channel's queue
            idx = np.arange(first, first + count)
        chan.send(idx)
        chan.w.flush()

def check_page_request(msg: RPW.ReqPages, block: RamBlock, last_block: str | None) -> str:
    """The block a page request is for (named, or the last one named); ProtocolError if it is not
    `block`, not whole host pages, or outside it."""
    name = msg.block or last_block
    if name != block.name:
        raise ProtocolError(f"return path: page request for unknown RAM block {name!r}")
    hps = block.page_size
    if msg.start % hps or msg.length % hps or msg.length == 0:
        raise ProtocolError(f"return path: page request 0x{msg.start:x}+0x{msg.length:x} "
                            f"not aligned to the {hps}-byte host page")
    if msg.start + msg.length > block.size:
        raise ProtocolError(f"return path: page request 0x{msg.start:x}+0x{msg.length:x} outside RAM block {name!r}")
    return name

class PageChannel:
    """Page records on one connection: its CONTINUE context ('named') and its staging buffer."""

    def __init__(self, block: RamBlock, writer: Writer, stats: RamStats):
        self.block = block
        self.w = writer
        self.stats = stats
        self.named = False  # CONTINUE context: the first record must carry the block name
        rows = max(BATCH_PAGES, block.page_size // TPS)  # a postcopy batch is at least one host page
        self.staging = np.empty((rows, WR.PAGE_RECORD), dtype=np.uint8)
        self.record = bytearray(WR.PAGE_RECORD)  # send_one's (pinned: never resized)
        self.record_page = np.frombuffer(self.record, dtype=np.uint8)[8:]

    def send_one(self, page: int) -> None:
        """One page as one record, sent at once (the common case of a requested 4 KiB page), in
        one send that keeps the GIL when the socket has room."""
        name = None if self.named else self.block.name
        u8 = self.block.u8
        if self.block.u64[page, 0] or u8[page].any():
            if name is None:  # header and page into one reused record buffer: no new objects
                rec = self.record
                WR.continue_page_header_into(rec, page * TPS)
                self.record_page[:] = u8[page]
                self.w.send_small(rec)
            else:
                self.w.send_small(WR.page_header(page * TPS, WR.FLAG_PAGE, name) + u8[page].tobytes())
            self.stats.normal += 1
        else:
            self.w.send_small(WR.page_header(page * TPS, WR.FLAG_ZERO, name) + b"\x00")
            self.stats.duplicate += 1
        self.named = True

    def send(self, idx: np.ndarray, multifd: MultifdSender | None = None) -> int:
        """Send the pages `idx` (ascending): zero pages as ZERO records, the rest as PAGE records
        (or, with `multifd`, as multifd packets; ZERO records stay on this channel). Returns how many
        were not zero pages."""
        n = idx.size
        if not n:
            return 0
        first = int(idx[0])
        contiguous = int(idx[-1]) - first + 1 == n
        nonzero = nonzero_pages(self.block.u64, idx)
        if nonzero.all():
            zero_idx, page_idx = idx[:0], idx
        else:
            zero_idx, page_idx = idx[~nonzero], idx[nonzero]
            contiguous = False
        if zero_idx.size:
            self._zeros(zero_idx)
            if multifd is not None:
                multifd.unsynced = True  # a later copy on a multifd channel must not overtake it
        data = page_idx.size
        if not data:
            return 0
        if multifd is not None:
            multifd.send_pages(page_idx)
            self.stats.normal += data
            return data
        if not self.named:
            self.w.write(WR.page_header(int(page_idx[0]) * TPS, WR.FLAG_PAGE, self.block.name)
                         + self.block.u8[int(page_idx[0])].tobytes())
            self.stats.normal += 1
            self.named = True
            page_idx = page_idx[1:]
            first += 1
            if not page_idx.size:
                return data
        rows = self.staging.shape[0]
        for lo in range(0, page_idx.size, rows):  # one staging buffer (~4 MiB) at a time
            part = page_idx[lo:lo + rows]
            m = part.size
            st = self.staging[:m]
            st[:, :8] = WR.page_headers(part.astype(np.uint64) * TPS).view(np.uint8).reshape(m, 8)
            if contiguous:
                st[:, 8:] = self.block.u8[first + lo:first + lo + m]
            else:
                np.take(self.block.u8, part, axis=0, out=st[:, 8:], mode="clip")
            self.w.write_big(memoryview(st).cast("B"))
            self.stats.normal += m
        return data

    def _zeros(self, idx: np.ndarray) -> None:
        if not self.named:
            self.w.write(WR.page_header(int(idx[0]) * TPS, WR.FLAG_ZERO, self.block.name) + b"\x00")
            self.named = True
            self.stats.duplicate += 1
            idx = idx[1:]
            if not idx.size:
                return
        self.w.write(WR.zero_records(idx.astype(np.uint64) * TPS))
        self.stats.duplicate += idx.size
