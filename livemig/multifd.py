"""Multifd: parallel page channels beside the main channel, in precopy (PROTOCOL.md §2).

Source: the migration thread splits each batch into zero pages (ZERO records on the main channel)
and data pages, queued as packets of up to 128 pages to the sender threads (mig/src/send_N), which
send header + pages straight from guest memory with one scatter-gather call. Destination: one
receiver thread per channel (mig/dst/recv_N) reads a header, then the pages straight into guest
memory. Sync: before every dirty-bitmap merge (a page may be sent again after it), at the switch
to postcopy and at completion, each sender sends a SYNC packet and the main channel carries
MULTIFD_FLUSH; the destination's loader waits there until every channel has delivered its SYNC,
and each receiver waits after its SYNC until the loader has passed the FLUSH, so no page of one
round overtakes a page of the next on another channel.
"""
from __future__ import annotations

import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, Protocol

import numpy as np

from .errors import MigrationError, ProtocolError
from .ramblock import TPS, RamBlock
from .transport import URI, Channel, connect
from .wire import multifd as WM
from .threadname import NamedThread

if TYPE_CHECKING:
    from .tls import TlsEndpoint

QUEUE_DEPTH = 2  # jobs waiting per sender thread
PACKETS_PER_JOB = 4  # packets a sender thread takes at once and sends in one sendmsg
WAIT_SLICE_S = 0.1


def _page_runs(mem: np.ndarray, idx: np.ndarray) -> list[np.ndarray]:
    """Views of guest memory covering the ascending pages `idx`, one per contiguous run."""
    first, n = int(idx[0]), idx.size
    if int(idx[-1]) - first == n - 1:  # ascending and distinct: one run
        return [mem[first:first + n]]
    breaks = np.flatnonzero(np.diff(idx) != 1) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [idx.size]))
    first = idx[starts]
    return [mem[f:f + n] for f, n in zip(first.tolist(), (ends - starts).tolist())]


class _SendChannel:
    def __init__(self, cid: int, chan: Channel, block: RamBlock):
        self.cid = cid
        self.chan = chan
        self.block = block
        self.jobs: queue.Queue = queue.Queue(QUEUE_DEPTH)
        self.synced = threading.Semaphore(0)
        self.error: str | None = None
        self.thread = NamedThread(target=self._run, name=f"mig/src/send_{cid}", daemon=True)

    def _run(self) -> None:
        try:
            while (job := self.jobs.get()) is not None:
                flags, num, idx = job  # up to PACKETS_PER_JOB packets, numbered from num
                offsets = idx.astype(np.uint64) * np.uint64(TPS)
                bufs: list = []
                for k, i in enumerate(range(0, max(idx.size, 1), WM.PACKET_PAGES)):
                    part = idx[i:i + WM.PACKET_PAGES]
                    bufs.append(WM.packet_header(offsets[i:i + WM.PACKET_PAGES], num + k, self.block.name, flags))
                    if part.size:
                        bufs += _page_runs(self.block.u8, part)
                self.chan.sendmsg_all(bufs)  # the job's packets in one scatter-gather send
                if flags & WM.FLAG_SYNC:
                    self.synced.release()
        except Exception as e:
            self.error = f"multifd channel {self.cid}: {e}"
            self.synced.release()  # wake a sync waiting on us: it sees the error


class MultifdSender:
    """The source's multifd channels. `check` raises when the migration must stop (cancel, error)."""

    def __init__(self, uri: URI, channels: int, block: RamBlock, check: Callable[[], None],
                 tls: TlsEndpoint | None = None):
        if uri.scheme not in ("tcp", "unix"):
            raise MigrationError("multifd opens several connections: use a tcp: or unix: URI")
        self.block = block
        self.check = check
        self.chans: list[_SendChannel] = []
        self.packet_num = 0
        self.bytes = 0  # queued for sending (headers + pages)
        self.unsynced = False  # pages were queued since the last sync
        self._next = 0
        try:
            for cid in range(channels):
                chan = connect(uri, tls=tls)
                self.chans.append(_SendChannel(cid, chan, block))
                chan.sendall(WM.init_packet(cid))
                self.bytes += WM.INIT_LEN
        except Exception:
            self.close()
            raise
        for c in self.chans:
            c.thread.start()

    def _failed(self) -> None:
        for c in self.chans:
            if c.error:
                raise MigrationError(c.error)
        self.check()

    def _put(self, job) -> None:
        """Queue a packet on the next channel with room (round robin), waiting if all are busy."""
        n = len(self.chans)
        for k in range(n):
            c = self.chans[(self._next + k) % n]
            try:
                c.jobs.put_nowait(job)
                self._next = (c.cid + 1) % n
                return
            except queue.Full:
                continue
        c = self.chans[self._next]
        while True:
            self._failed()
            try:
                c.jobs.put(job, timeout=WAIT_SLICE_S)
                self._next = (c.cid + 1) % n
                return
            except queue.Full:
                continue

    def send_pages(self, idx: np.ndarray) -> None:
        """Queue data pages `idx` (ascending page numbers) in packets of up to 128 pages, up to
        PACKETS_PER_JOB packets a job (one queue hand-over and one send for all of them)."""
        self._failed()
        step = WM.PACKET_PAGES * PACKETS_PER_JOB
        for i in range(0, idx.size, step):
            part = idx[i:i + step]
            packets = -(-part.size // WM.PACKET_PAGES)
            self._put((0, self.packet_num, part))
            self.packet_num += packets
            self.bytes += WM.HEADER_LEN * packets + part.size * TPS
        self.unsynced = True

    def sync(self) -> None:
        """Every channel sends a SYNC packet after its queued pages; returns once all are sent."""
        empty = np.empty(0, dtype=np.intp)
        for c in self.chans:
            while True:
                self._failed()
                try:
                    c.jobs.put((WM.FLAG_SYNC, self.packet_num, empty), timeout=WAIT_SLICE_S)
                    break
                except queue.Full:
                    continue
            self.packet_num += 1
            self.bytes += WM.HEADER_LEN
        for c in self.chans:
            while not c.synced.acquire(timeout=WAIT_SLICE_S):
                self._failed()
            self._failed()
        self.unsynced = False

    def close(self, graceful: bool = False) -> None:
        """Stop the sender threads and close the connections (the destination reads EOF).
        `graceful` (the migration completed, the senders are idle): the threads end first, so a
        TLS channel can say close_notify; otherwise the connections are cut at once (a sender
        may be stuck on a full socket)."""
        for c in self.chans:
            if not graceful:
                c.chan.shutdown()
            try:
                c.jobs.put_nowait(None)
            except queue.Full:
                c.chan.shutdown()
        for c in self.chans:
            if c.thread.is_alive():
                c.thread.join(timeout=1 if graceful else 5)
            if c.thread.is_alive():
                c.chan.shutdown()
                c.thread.join(timeout=5)
            c.chan.close()


class PageStore(Protocol):
    """What a receiver needs from the destination: check and prepare pages, record what arrived."""

    def prepare(self, idx: np.ndarray) -> None: ...

    def prepare_run(self, first: int, n: int) -> None: ...

    def stored(self, pages: np.ndarray | slice) -> None: ...


class _RecvChannel:
    def __init__(self, cid: int, chan: Channel, block: RamBlock, store: PageStore,
                 on_error: Callable[[str], None], ready: threading.Event):
        self.cid = cid
        self.ready = ready
        self.on_error = on_error
        self.chan = chan
        self.block = block
        self.store = store
        self.synced = threading.Semaphore(0)
        self.go = threading.Semaphore(0)
        self.closed = False
        self.stopping = False  # the loader ends the channel: its end is no error
        self.unsynced = 0  # packets with pages since this channel's last SYNC
        self.error: str | None = None
        self.bytes = 0
        self.pages = 0
        self.thread = NamedThread(target=self._run, name=f"mig/dst/recv_{cid}", daemon=True)

    def _run(self) -> None:
        hdr = bytearray(WM.HEADER_LEN)
        sizes = {self.block.name: self.block.size}
        try:
            while True:
                if not self.chan.recv_exact_into([hdr]):
                    return
                pkt = WM.parse_header(hdr, sizes)
                self.bytes += WM.HEADER_LEN + pkt.data_len
                if pkt.offsets.size:
                    self.unsynced += 1
                    self.ready.wait()  # not before the loader has set guest memory up (ADVISE, RAM setup)
                    if pkt.contiguous:  # the common case: one run, no per-page arrays
                        first, n = int(pkt.offsets[0]) // TPS, pkt.offsets.size
                        pages: np.ndarray | slice = slice(first, first + n)
                        self.store.prepare_run(first, n)
                        bufs = [self.block.u8[pages]]
                    else:
                        pages = (pkt.offsets >> np.uint64(12)).astype(np.intp)
                        if np.any(np.diff(pages) <= 0):
                            raise ProtocolError("multifd: packet page offsets are not ascending")
                        self.store.prepare(pages)
                        bufs = _page_runs(self.block.u8, pages)
                    if not self.chan.recv_exact_into(bufs):
                        raise ProtocolError("multifd: channel closed before the pages of a packet")
                    self.store.stored(pages)
                    self.pages += pkt.offsets.size
                if pkt.sync:
                    self.unsynced = 0
                    self.synced.release()
                    self.go.acquire()
        except Exception as e:
            if self.stopping:
                return
            self.error = f"multifd channel {self.cid}: {e}"
            self.on_error(self.error)
        finally:
            self.closed = True
            self.synced.release()  # wake the loader if it waits for us


class MultifdReceiver:
    """The destination's multifd channels, indexed by the id of their init packet."""

    def __init__(self, chans: dict[int, Channel], block: RamBlock, store: PageStore,
                 on_error: Callable[[str], None]):
        """`on_error` is called from a failing receiver: it must stop the loader (which may be
        reading the main channel, not waiting for us)."""
        self.ready = threading.Event()  # set by the loader once guest memory may take pages
        self.chans = [_RecvChannel(cid, ch, block, store, on_error, self.ready) for cid, ch in sorted(chans.items())]
        for c in self.chans:
            c.thread.start()

    @property
    def bytes(self) -> int:
        return sum(c.bytes for c in self.chans)

    @property
    def pages(self) -> int:
        return sum(c.pages for c in self.chans)

    def sync(self, timeout: float = 120.0) -> None:
        """MULTIFD_FLUSH on the main channel: wait for every channel's SYNC, then let them go on."""
        deadline = time.monotonic() + timeout
        for c in self.chans:
            while not c.synced.acquire(timeout=WAIT_SLICE_S):
                if time.monotonic() > deadline:
                    raise ProtocolError(f"multifd: no sync on channel {c.cid} within {timeout:.0f} s")
            if c.error:
                raise ProtocolError(c.error)
            if c.closed:
                raise ProtocolError(f"multifd: channel {c.cid} closed before its sync")
        for c in self.chans:
            c.go.release()

    def finish(self) -> None:
        """No multifd pages may come any more (LISTEN, or the end of a precopy stream): stop the
        receivers before the loader goes on, so none writes guest memory after this point. Pages
        that came after a channel's last SYNC had no MULTIFD_FLUSH to order them: an error."""
        for c in self.chans:
            c.stopping = True
        self.close()
        late = [c.cid for c in self.chans if c.unsynced]
        if late:
            raise ProtocolError(f"multifd: pages on channel(s) {late} after the last MULTIFD_FLUSH")

    def close(self) -> None:
        self.ready.set()
        for c in self.chans:
            c.chan.shutdown()
            c.go.release()
        for c in self.chans:
            c.thread.join(timeout=5)
            c.chan.close()
