"""Destination side of postcopy: discards, userfaultfd registration, the fault thread that turns
guest faults into page requests, atomic page placement, and fault-latency accounting.

The loader thread keeps reading the main stream after POSTCOPY_RUN (it is QEMU's listen thread
from then on) and calls place_pages / place_zero_pages; the fault thread (mig/dst/fault) reads
userfaultfd and sends REQ_PAGES on the return path. Neither touches guest memory from Python:
pages go in through UFFDIO_COPY / UFFDIO_ZEROPAGE from a staging buffer (or UFFDIO_CONTINUE).
With an urgent process (urgent_dst.py), that process reads userfaultfd and the preempt channel
instead, through the same code, on its own GIL; the bitmaps and the claim lock are shared.
"""
from __future__ import annotations

import ctypes
import mmap
import os
import select
import sys
import threading
import time
import traceback
from typing import Any, Callable, NamedTuple

import numpy as np

from . import gilcalls
from .errors import GuestError, ProtocolError, TransportError
from .ramblock import TPS, RamBlock, run_bounds
from .shm import PipeLock, nonzero_of_shared, shared_array
from .wire import decoder as D
from .uffd import UFFD_FEATURE_MINOR_SHMEM, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UserFault, probe
from .wire import returnpath as RPW
from .threadname import NamedThread

MADV_DONTNEED = 4
MADV_REMOVE = 9
MADV_NOHUGEPAGE = 15
MADV_POPULATE_READ = 22
MADV_POPULATE_WRITE = 23
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
LATENCY_BUCKETS = 24
# minor mode, PostcopyDestination.claimed: a placer has taken the page on (CLAIMED), its data is in
# guest RAM's page cache and anyone may map it (WRITTEN; also every page received before LISTEN)
CLAIMED, WRITTEN = 1, 2


class _BlockShape(NamedTuple):
    """What placement needs of a RAM block, without its memory (the urgent process has none)."""
    name: str
    size: int
    page_size: int
    npages: int


def minor_faults_supported() -> bool:
    ok, features, _ = probe()
    return ok and bool(features & UFFD_FEATURE_MINOR_SHMEM)


def check_host() -> None:
    ok, _, why = probe()
    if not ok:
        raise ProtocolError(f"postcopy is not possible on this destination: {why}")


class PostcopyDestination:
    def __init__(self, block: RamBlock, host_addr: int, send_rp: Callable[[bytes], None],
                 received: np.ndarray, nonzero: np.ndarray, vcpu_tids: Callable[[], list[int]],
                 ram_fd: int | None = None, alias: mmap.mmap | None = None,
                 alias_ready: Callable[[], int] | None = None, urgent: Any = None,
                 received_fd: int | None = None):
        """`ram_fd`: guest RAM is this memfd (minor-fault placement, where the host has it);
        `alias`: a second mapping of it (else one is made at ADVISE); `alias_ready`: how many bytes
        from the start of `alias` are populated already (a waiting destination's prealloc);
        `urgent`: an UrgentProcess to hand the fault and preempt work to at LISTEN, with
        `received` shared on memfd `received_fd`."""
        self.block = block
        self.addr = host_addr
        self.send_rp = send_rp
        self.received = received
        self.nonzero = nonzero
        self.vcpu_tids = vcpu_tids
        self.uffd: UserFault | None = None
        self.listening = False
        self.urgent = urgent if received_fd is not None else None  # while it serves faults
        self._urgent_proc = self.urgent
        self.urgent_used = False
        self.received_fd = received_fd
        self.shared_fds: list[int] = []
        if self.urgent is not None:  # the bitmaps the urgent process reads and writes too
            fd_req, self.requested = shared_array(block.npages)
            fd_claim, self.claimed = shared_array(block.npages, np.uint8)
            self.shared_fds = [fd_req, fd_claim]
        else:
            self.requested = np.zeros(block.npages, dtype=np.bool_)
            self.claimed = np.zeros(0, dtype=np.uint8)
        self.fault_time: dict[int, tuple[float, int]] = {}  # page -> (monotonic, vcpu index or -1)
        self.lock = threading.Lock()
        self.hp = block.page_size // TPS  # target pages per host page
        # guest RAM on a memfd: place pages by writing them into a second mapping of it, which the
        # guest does not use, then mapping them into the guest with UFFDIO_CONTINUE (minor faults);
        # no page allocated and no second copy, as UFFDIO_COPY does
        self.minor = ram_fd is not None and self.hp == 1 and minor_faults_supported()
        self.ram_fd = ram_fd
        self.alias: mmap.mmap | None = alias
        self.alias_ready = alias_ready or (lambda: 0)
        self.alias_u8: np.ndarray | None = None
        self.alias_addr = 0
        # minor mode: a lone page goes into the memfd with pwrite, not through the second mapping
        # (the urgent process's own second mapping is not populated: a page fault per page)
        self.pwrite_lone = False
        # minor mode: pages a placer has taken on (a write into the second mapping is not refused
        # like a UFFDIO_COPY onto a present page: two placers must never both write one page), and
        # pages written (which a fault may map at once); with an urgent process the lock is a pipe
        # both processes take
        self.claim_lock: Any = PipeLock() if self.urgent is not None else threading.Lock()
        self.main_placer = Placer(self)
        self.zero_mapped = 0  # ADVISE kept this many prefaulted zero pages mapped (minor mode)
        self.discarded = np.zeros(0, dtype=np.bool_)  # ... and of those, the ones discarded since
        self.requests = 0
        self.faults = 0
        self.latencies: list[float] = []  # seconds, every remote fault (vCPU or not): it sent a request
        # minor mode: faults on pages written but not mapped yet, mapped at once (no request)
        self.local_latencies: list[float] = []
        self.vcpu_latency_total = 0.0
        self.vcpu_faults = 0
        self.blocktime = 0.0  # time during which all vCPUs were blocked
        self._blocked: dict[int, int] = {}  # vcpu index -> pages it waits for
        self._all_down_since: float | None = None
        self._stop_r, self._stop_w = os.pipe()
        self.fault_thread: threading.Thread | None = None
        self.fault_cont_buf = bytearray(32)
        self._tids: list[int] = []  # vcpu_tids() as last read (asked again for a thread not in it)

    # -- before LISTEN (memory is not registered yet)
    def advise(self, zero_mapped: int = 0) -> bool:
        """ADVISE: only what the stream brings counts. Every page of guest RAM is dropped, except in
        minor mode when guest RAM holds zeros only (a fresh destination) and `zero_mapped` pages
        from its start are mapped (prefaulted): those stay mapped, precopy writes into them without
        mapping them again, and LISTEN unmaps the ones that did not arrive and were not discarded.
        Returns whether guest RAM was dropped."""
        if self.hp == 1:
            self._madvise(0, self.block.size, MADV_NOHUGEPAGE)  # 4 KiB placement needs 4 KiB pages
        self.zero_mapped = zero_mapped if self.minor and zero_mapped and not self.nonzero.any() else 0
        if self.zero_mapped:
            self.discarded = np.zeros(self.zero_mapped, dtype=np.bool_)
        else:
            self._drop(0, self.block.size)
        self.received[:] = False
        self.nonzero[:] = False
        if self.minor:  # the second mapping, now: precopy populates it along with the guest's
            assert self.ram_fd is not None
            if self.alias is None:
                self.alias = mmap.mmap(self.ram_fd, self.block.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.alias_u8 = np.frombuffer(self.alias, dtype=np.uint8).reshape(self.block.npages, TPS)
            self.alias_addr = self.alias_u8.ctypes.data
        return not self.zero_mapped

    def populate_alias(self, first: int, n: int) -> None:
        """Minor mode: map pages [first, first+n) in the second mapping, in one call, so that
        writing them there takes no page fault each (faults are slow on a virtualised host).
        Nothing to do where the waiting destination's prealloc has been already."""
        if self.alias_addr and (first + n) * TPS > self.alias_ready():
            _libc.madvise(self.alias_addr + first * TPS, n * TPS, MADV_POPULATE_WRITE)

    def discard(self, ranges: list[tuple[int, int]]) -> None:
        for start, length in ranges:
            self._drop(start, length)
            a, b = start // TPS, (start + length) // TPS
            self.received[a:b] = False
            self.nonzero[a:b] = False
            if self.zero_mapped:
                self.discarded[a:b] = True

    def _unmap_stale(self) -> None:
        """LISTEN, when ADVISE kept prefaulted RAM mapped: unmap each page of it that neither
        arrived nor was discarded (none, from a source that discards every page it did not send),
        so that the guest faults on it."""
        n = self.zero_mapped
        stale = ~(self.received[:n].astype(np.bool_) | self.discarded)
        for a, b in zip(*run_bounds(stale)):
            self._drop(int(a) * TPS, int(b - a) * TPS)

    def map_zero(self, idx: np.ndarray) -> None:
        """Before LISTEN: map the zero page under pages that arrived as ZERO records, so that
        userfaultfd will not report them missing (the source will never send them again)."""
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        for a, b in zip(np.concatenate(([0], breaks)).tolist(), np.concatenate((breaks, [idx.size])).tolist()):
            self._madvise(int(idx[a]) * TPS, (b - a) * TPS, MADV_POPULATE_READ)

    def _drop(self, off: int, length: int) -> None:
        """Drop guest pages so that the guest faults on them. Minor mode keeps the memfd's pages
        (a minor fault then asks for the page); without it, memfd pages must leave the file, or
        the guest would read the old data and a new copy would find the page present."""
        self._madvise(off, length, MADV_REMOVE if self.ram_fd is not None and not self.minor else MADV_DONTNEED)

    def _madvise(self, off: int, length: int, advice: int) -> None:
        if _libc.madvise(self.addr + off, length, advice) != 0:
            raise GuestError(f"madvise({advice}) on guest RAM failed: {os.strerror(ctypes.get_errno())}")

    # -- LISTEN
    def listen(self) -> None:
        if self.zero_mapped:
            self._unmap_stale()
        self.uffd = UserFault()
        if self.minor:
            assert self.alias is not None, "ADVISE maps the second mapping"
            if self.urgent is None:
                self.claimed = np.zeros(self.block.npages, dtype=np.uint8)
            np.multiply(self.received, WRITTEN, out=self.claimed, casting="unsafe")
            # MISSING too: a page never populated has no page-cache page to map (writing it in the
            # second mapping creates one; UFFDIO_CONTINUE then wakes the fault either way)
            self.uffd.register(self.addr, self.block.size, UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR)
        else:
            self.uffd.register(self.addr, self.block.size)
        self.listening = True
        self.urgent_used = self.urgent is not None
        if self.urgent is not None:
            cfg = {"name": self.block.name, "size": self.block.size, "page_size": self.block.page_size,
                   "addr": self.addr, "minor": self.minor, "ppid": os.getpid()}
            fds = [self.uffd.fd, self.received_fd, *self.shared_fds, *self.claim_lock.fds]
            if self.minor:
                fds.append(self.ram_fd)
            self.urgent.listen(cfg, fds)
            return
        self.start_fault_thread()

    def start_fault_thread(self) -> None:
        self.fault_thread = NamedThread(target=self._fault_loop, name="mig/dst/fault", daemon=True)
        self.fault_thread.start()

    @classmethod
    def attach(cls, cfg: dict, fds: list[int], send: Callable[[bytes], None]) -> PostcopyDestination:
        """In the urgent process: the same destination state, on the parent's userfaultfd, bitmaps
        and claim lock (PostcopyDestination.listen sent them). Addresses for UFFDIO_* are the
        parent's; the second mapping (minor mode) is this process's own mapping of the memfd."""
        npages = cfg["size"] // TPS
        block = _BlockShape(cfg["name"], cfg["size"], cfg["page_size"], npages)
        _, received = shared_array(npages, fd=fds[1])
        nonzero = np.zeros(npages, dtype=np.bool_)  # the parent's counts; nothing reads this one
        self = cls(block, cfg["addr"], send, received, nonzero, lambda: [])
        _, self.requested = shared_array(npages, fd=fds[2])
        _, self.claimed = shared_array(npages, np.uint8, fd=fds[3])
        self.claim_lock = PipeLock((fds[4], fds[5]))
        self.uffd = UserFault.attach(fds[0])
        self.minor = cfg["minor"]
        if self.minor:
            self.ram_fd = fds[6]
            self.alias = mmap.mmap(self.ram_fd, block.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self.alias_u8 = np.frombuffer(self.alias, dtype=np.uint8).reshape(npages, TPS)
            self.alias_addr = self.alias_u8.ctypes.data
            self.pwrite_lone = True
        self.listening = True
        return self

    # -- the urgent process's results, back in this process
    def export(self) -> dict[str, Any]:
        """What the urgent process hands back when it ends (JSON-able)."""
        return {"latencies": self.latencies, "vcpu_latency_total": self.vcpu_latency_total,
                "vcpu_faults": self.vcpu_faults, "blocktime": self.blocktime, "faults": self.faults,
                "requests": self.requests, "local_latencies": self.local_latencies,
                "fault_time": [[p, t, v] for p, (t, v) in self.fault_time.items()],
                "blocked": list(self._blocked.items()), "all_down_since": self._all_down_since}

    def merge(self, d: dict[str, Any]) -> None:
        """The urgent process ended: take over its figures and its requests still in flight."""
        with self.lock:
            self.urgent = None  # from here on this process accounts for requested pages
            self.latencies += d["latencies"]
            self.vcpu_latency_total += d["vcpu_latency_total"]
            self.vcpu_faults += d["vcpu_faults"]
            self.blocktime += d["blocktime"]
            self.faults += d["faults"]
            self.requests += d["requests"]
            self.local_latencies += d["local_latencies"]
            self.fault_time.update({int(p): (t, int(v)) for p, t, v in d["fault_time"]})
            self._blocked.update({int(k): int(v) for k, v in d["blocked"]})
            self._all_down_since = d["all_down_since"]

    # -- placement: one Placer per channel (main stream, preempt channel)
    def place_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        self.main_placer.place_pages(idx, data)

    def place_zero_pages(self, idx: np.ndarray) -> None:
        self.main_placer.place_zero_pages(idx)

    def _placed(self, a: int, b: int, nonzero: bool) -> None:
        self.received[a:b] = True
        self.nonzero[a:b] = nonzero
        if self.requested[a:b].any():  # the urgent process sets and clears these meanwhile
            for p in (nonzero_of_shared(self.requested[a:b]) + a).tolist():
                self._requested_arrived(p)

    def _requested_arrived(self, page: int, now: float | None = None) -> None:
        """A requested page is placed: its fault latency counts (where the fault was read)."""
        now = time.monotonic() if now is None else now
        with self.lock:  # as merge() takes it: a note is either drained after it or not written
            urgent = self.urgent
            if urgent is not None:
                urgent.arrived(page, now)
                return
            if self.requested[page]:
                self.requested[page] = False
                t0, vcpu = self.fault_time.pop(page, (now, -1))
                self._account(now, now - t0, vcpu)

    def _account(self, now: float, lat: float, vcpu: int, local: bool = False) -> None:
        (self.local_latencies if local else self.latencies).append(lat)
        if vcpu < 0:
            return
        self.vcpu_latency_total += lat
        self.vcpu_faults += 1
        left = self._blocked.get(vcpu, 0) - 1
        self._blocked[vcpu] = max(left, 0)
        if left <= 0 and self._all_down_since is not None:
            self.blocktime += now - self._all_down_since
            self._all_down_since = None

    # -- the fault thread
    def _fault_loop(self) -> None:
        assert self.uffd is not None
        poller = select.poll()
        poller.register(self.uffd.fd, select.POLLIN)
        poller.register(self._stop_r, select.POLLIN)
        while True:
            events = dict(poller.poll())
            if self._stop_r in events or events.get(self.uffd.fd, 0) & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
                return
            try:
                faults = self.uffd.read_faults()
            except OSError:
                return
            try:
                msgs = self.handle_faults(faults)
            except Exception:  # a bug: say where, and keep serving faults (these pages still come
                traceback.print_exc()  # with the background push); a dead thread would go unseen
                print("livemig: postcopy fault thread: the error above left some faults unrequested",
                      file=sys.stderr, flush=True)
                continue
            if msgs:
                try:
                    self.send_rp(msgs)
                except (OSError, TransportError):
                    pass  # the return path broke: the pages stay requested, asked again on recovery

    def handle_faults(self, faults: list[tuple[int, int, int]]) -> bytes:
        """Fault messages -> the page requests to send (one per host page not yet asked for)."""
        now = time.monotonic()
        tids = self._tids
        page_of = self.addr
        msgs = []
        written: list[tuple[int, int]] = []  # minor mode: (page, vcpu) whose data is there already
        stale: list[int] = []  # minor mode: faults on pages placed already
        with self.lock:
            for addr, _flags, tid in faults:
                page = (addr - page_of) // TPS
                page -= page % self.hp  # requests always cover one whole host page
                if not 0 <= page < self.block.npages:
                    continue
                if self.received[page]:
                    if self.minor:  # its placer woke the vCPU, unless the kernel let the page go
                        stale.append(page)  # since (reclaim): then only a CONTINUE maps it again
                    continue
                self.faults += 1
                if tid not in tids:
                    tids = self._tids = self.vcpu_tids()
                vcpu = tids.index(tid) if tid in tids else -1
                if self.minor and self.claimed[page] == WRITTEN:
                    written.append((page, vcpu))
                    if vcpu >= 0:
                        self._block(vcpu, now, len(tids))
                    continue
                if not self.requested[page]:
                    self.requested[page] = True
                    if self.received[page]:  # placed since the check above: the placer saw
                        self.requested[page] = False  # no request, so there is none
                        continue
                    self.fault_time[page] = (now, vcpu)
                    if vcpu >= 0:
                        self._block(vcpu, now, len(tids))
                    # always REQ_PAGES_ID: a request built just before a reconnection may go
                    # out first on the new connection, where an unnamed one would be an error
                    msgs.append(RPW.req_pages(page * TPS, self.hp * TPS, self.block.name))
                    self.requests += 1
        for page in stale:
            try:
                self.uffd.cont(page_of + page * TPS, self.hp * TPS, self.fault_cont_buf, hold_gil=True)  # EEXIST if mapped
            except GuestError:
                pass  # nothing to map there: the fault was not the kernel's to repeat
        for page, vcpu in written:  # its placer has not mapped it yet: no need to wait for that
            self.uffd.cont(page_of + page * TPS, TPS, self.fault_cont_buf, hold_gil=True)
            done = time.monotonic()
            with self.lock:
                self._account(done, done - now, vcpu, local=True)
        return b"".join(msgs)

    def resend_requests(self) -> int:
        """Recovery: ask again for every faulted page that has not arrived. Returns how many."""
        with self.lock:
            pages = np.flatnonzero(self.requested & ~self.received).tolist()
            msgs = [RPW.req_pages(p * TPS, self.hp * TPS, self.block.name) for p in pages]
        if msgs:
            self.send_rp(b"".join(msgs))
        return len(msgs)

    def _block(self, vcpu: int, now: float, nvcpus: int) -> None:
        n = self._blocked.get(vcpu, 0) + 1
        self._blocked[vcpu] = n
        if n == 1 and (nvcpus == 1 or sum(1 for v in self._blocked.values() if v) == nvcpus):
            self._all_down_since = now

    # -- completion
    def release_claims(self) -> int:
        """Minor mode, after a placer died (the urgent process killed): pages it claimed but never
        wrote may be claimed again. Returns how many. (A page another placer is writing right
        now may be released too; then two placers write the same bytes: postcopy pages are final.)"""
        if not self.claimed.size:
            return 0
        with self.claim_lock:
            stuck = np.flatnonzero((self.claimed == CLAIMED) & ~self.received)  # private arrays
            self.claimed[stuck] = 0
        return int(stuck.size)

    def stop_urgent_notes(self) -> None:
        """From here on this process counts requested pages itself (no more arrival notes)."""
        with self.lock:
            self.urgent = None

    def close_urgent(self) -> None:
        """Stop the urgent process, if one still runs (completion, failure)."""
        if self._urgent_proc is not None:
            self.stop_urgent_notes()
            self._urgent_proc.close()
            self._urgent_proc = None
        for fd in self.shared_fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.shared_fds = []

    def finish(self) -> None:
        self.close_urgent()
        os.write(self._stop_w, b"x")
        if self.fault_thread is not None:
            self.fault_thread.join(timeout=5)
        if self.uffd is not None:
            self.uffd.unregister(self.addr, self.block.size)
            self.uffd.close()
        os.close(self._stop_r)
        os.close(self._stop_w)

    def release(self) -> None:
        """After finish, once the source has been told: unmap the second mapping (tens of ms a GiB)."""
        if isinstance(self.claim_lock, PipeLock):
            self.claim_lock.close()
            self.claim_lock = threading.Lock()
        if self.alias is not None:
            self.alias_u8 = None
            self.alias_addr = 0
            self.alias.close()
            self.alias = None

    def stats(self, vcpus: int = 1) -> dict[str, Any]:
        """QEMU's destination postcopy fields (blocktime in ms, latencies in ns), over every fault
        the guest waited on (remote ones and those mapped at once)."""
        both = self.latencies + self.local_latencies
        lat = np.array(both) if both else np.zeros(0)
        dist = [0] * LATENCY_BUCKETS
        if lat.size:
            us = np.maximum(lat * 1e6, 1.0)
            b = np.minimum(np.floor(np.log2(us)).astype(int), LATENCY_BUCKETS - 1)
            for k, c in zip(*np.unique(b, return_counts=True)):
                dist[int(k)] = int(c)
        vcpu_lat = int(self.vcpu_latency_total / self.vcpu_faults * 1e9) if self.vcpu_faults else 0
        nonv = lat.size - self.vcpu_faults
        nonv_lat = int((lat.sum() - self.vcpu_latency_total) / nonv * 1e9) if nonv > 0 else 0
        return {
            "postcopy-blocktime": int(self.blocktime * 1000),
            "postcopy-vcpu-blocktime": [int(self.vcpu_latency_total * 1000)] + [0] * (vcpus - 1),
            "postcopy-latency": int(lat.mean() * 1e9) if lat.size else 0,
            "postcopy-vcpu-latency": [vcpu_lat] + [0] * (vcpus - 1),
            "postcopy-non-vcpu-latency": nonv_lat,
            "postcopy-latency-dist": dist,
        }

    def latency_percentiles(self) -> dict[str, Any]:
        """livemig's own figures: fault -> placement of remote faults (those that sent a request),
        and how many faults found their page written and were mapped at once (minor mode)."""
        placement = {"placement": "UFFDIO_CONTINUE" if self.minor else "UFFDIO_COPY",
                     "fault-path": "urgent process" if self.urgent_used else "threads"}
        if self.minor:
            placement["mapped-at-fault"] = len(self.local_latencies)
            if self.local_latencies:
                placement["mapped-at-fault-p50-us"] = round(float(np.percentile(self.local_latencies, 50)) * 1e6, 1)
        if not self.latencies:
            return placement
        lat = np.array(self.latencies) * 1e6
        if self.local_latencies:  # every fault the guest waited on, as the QEMU fields count them
            placement["p50-all-us"] = round(float(np.percentile(self.latencies + self.local_latencies, 50)) * 1e6, 1)
        return {**placement, "faults": int(lat.size), "p50-us": round(float(np.percentile(lat, 50)), 1),
                "p99-us": round(float(np.percentile(lat, 99)), 1), "max-us": round(float(lat.max()), 1)}


class PreemptReader:
    """The postcopy-preempt channel's bare page records, placed as they come (in the loader's
    process on mig/dst/preempt, or in the urgent process). A lone CONTINUE|PAGE record goes in
    straight from the receive buffer."""

    def __init__(self, pc: PostcopyDestination):
        b = pc.block
        self.dec = D.StreamDecoder([D.LocalBlock(b.name, b.size, b.page_size)], {},
                                   postcopy=True, bare_ram=True, buffer_size=1 << 20)
        self.placer = Placer(pc)
        self.lone = self.placer.hp == 1  # 4 KiB host pages: a lone page record is placed as it stands
        self.normal = 0  # pages placed
        self.duplicate = 0  # zero pages placed

    def feed(self, recv_into: Callable[[Any], int]) -> bool:
        """One receive, and every record it completes placed; False at the end of the channel."""
        dec, placer = self.dec, self.placer
        n = recv_into(dec.space())
        if n == 0:
            dec.finish()
            return False
        dec.commit(n)
        base = dec.buffer_address
        while True:
            if self.lone and (rec := dec.next_page_record()) is not None:
                placer.place_one_at(rec[0] // TPS, base + rec[1])
                self.normal += 1
                if dec.start == dec.end:  # the receive held just that (the common case)
                    return True
                continue
            if (ev := dec.next_event()) is None:
                return True
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            if isinstance(ev, D.Pages):
                placer.place_pages(idx, ev.data)
                self.normal += idx.size
            elif isinstance(ev, D.ZeroPages):
                placer.place_zero_pages(idx)
                self.duplicate += idx.size


# minor mode: pages claimed, written and mapped into the guest per UFFDIO_CONTINUE. A guest that
# outruns the push faults on the pages the main placer has claimed; it waits for their piece only
# (demo guest switched at once, 4 + 4 runs: remote-fault p50 202 -> 54 µs against claiming and
# writing 256 pages before mapping them 32 at a time; 32-page pieces were slower than 16)
CONTINUE_PIECE = 16


class Placer:
    """Places the pages of one channel: its own staging buffer, huge-page assembly and ioctl
    buffers, so the main stream and the preempt channel can place pages at the same time."""

    def __init__(self, pc: PostcopyDestination):
        self.pc = pc
        self.hp = pc.hp
        self.staging = np.empty((max(256, self.hp), TPS), dtype=np.uint8)
        self.staging_addr = self.staging.ctypes.data
        self.assembling: int | None = None  # huge pages: the host page being collected
        self.assembled = np.zeros(self.hp, dtype=np.bool_)
        self.copy_buf = bytearray(40)
        self.zero_buf = bytearray(32)
        self.cont_buf = bytearray(32)

    def drop_partial(self) -> None:
        """Recovery: a host page half assembled when the connection broke is thrown away (it was
        never marked received, so the source sends it again)."""
        self.assembling = None
    def place_pages(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Place whole pages atomically; runs of consecutive pages go in one UFFDIO_COPY."""
        if self.hp > 1:
            self._assemble(idx, data)
            return
        if self.pc.minor:
            self._write_and_map(idx, data)
            return
        if idx.size == 1 and data.flags.c_contiguous:
            self._place_one(int(idx[0]), data)
            return
        for s in range(0, idx.size, 256):
            if self.pc.fault_time:
                self._requested_first(idx[s:], data[s:])
            part = idx[s:s + 256]
            self.staging[:part.size] = data[s:s + part.size]
            self._place_runs(part, copy=True)

    def _requested_first(self, idx: np.ndarray, data: np.ndarray) -> None:
        """Pages a vCPU waits for among those still to place (`idx`, data row k for idx[k]) go in
        first, one by one; placing the rest later skips them (4 KiB host pages)."""
        hits = np.flatnonzero(self.pc.requested[idx])
        if hits.size:
            base, stride = data.ctypes.data, data.strides[0]
            for k in hits.tolist():
                self.place_one_at(int(idx[k]), base + k * stride)

    def _place_one(self, page: int, data: np.ndarray) -> None:
        self.place_one_at(page, data.ctypes.data)

    def place_one_at(self, page: int, src: int) -> None:
        """A lone page (a requested page, typically) straight from the receive buffer at address
        `src`: one UFFDIO_COPY, or in minor mode a claim, a 4 KiB write into the second mapping and
        one UFFDIO_CONTINUE; scalar bookkeeping (4 KiB host pages only)."""
        pc = self.pc
        if pc.minor:
            with pc.claim_lock:
                state = pc.claimed[page]
                if not state:
                    pc.claimed[page] = CLAIMED
            if state == CLAIMED:
                return  # another placer is writing it; it maps it next
            if not state:
                # the request path keeps the GIL for these few-µs calls (gilcalls)
                if pc.pwrite_lone:
                    if (err := gilcalls.pwrite(pc.ram_fd, src, TPS, page * TPS)) != TPS:
                        pc.claimed[page] = 0  # not written: another placer may take it on
                        why = os.strerror(-err) if err < 0 else f"{err} bytes written"
                        raise GuestError(f"writing page {page} into guest RAM failed: {why}")
                else:
                    gilcalls.memmove(pc.alias_addr + page * TPS, src, TPS)
                pc.claimed[page] = WRITTEN
            pc.uffd.cont(pc.addr + page * TPS, TPS, self.cont_buf, hold_gil=True)  # EEXIST if mapped already
        elif not pc.received[page]:
            pc.uffd.copy(pc.addr + page * TPS, src, TPS, self.copy_buf, hold_gil=True)
        pc.received[page] = True
        pc.nonzero[page] = True
        if pc.requested[page]:
            pc._requested_arrived(page)

    def place_zero_pages(self, idx: np.ndarray) -> None:
        if self.hp > 1:
            self._assemble(idx, None)
            return
        if self.pc.minor:
            self._write_and_map(idx, None)
            return
        for s in range(0, idx.size, 256):
            self._place_runs(idx[s:s + 256], copy=False)

    def _write_and_map(self, idx: np.ndarray, data: np.ndarray | None) -> None:
        """Minor mode: claim the pages no other placer has, write them (or zeros) into the second
        mapping of guest RAM, then map them into the guest with UFFDIO_CONTINUE, CONTINUE_PIECE
        pages at a time from claim to map, so that a fault on a page this placer has claimed
        waits for one piece, not for the whole batch."""
        pc = self.pc
        claimed = pc.claimed
        base, total = int(idx[0]), idx.size
        # consecutive pages: slices, no gathers (an event is any run of page records, in any order)
        steps = np.diff(idx)
        in_order = total == 1 or bool((steps == 1).all())
        if in_order:
            pc.populate_alias(base, total)  # one call, not a page fault a page
        elif not (steps > 0).all():
            # not ascending, so a page may be named twice: keep its first copy (the second, in
            # the same piece, would be written after the first was mapped)
            keep = np.sort(np.unique(idx, return_index=True)[1])
            idx = idx[keep]
            data = None if data is None else data[keep]
            total = idx.size
        for s in range(0, total, CONTINUE_PIECE):
            if pc.fault_time and data is not None:
                self._requested_first(idx[s:], data[s:])
            n = min(CONTINUE_PIECE, total - s)
            rows = None if data is None else data[s:s + n]
            if in_order:
                first = base + s
                with pc.claim_lock:
                    mine = claimed[first:first + n]
                    free = not mine.any()
                    if free:
                        mine[:] = CLAIMED
                if free:
                    self._write_run(first, n, rows)
                    continue
            self._write_scattered(idx[s:s + n], rows)

    def _write_run(self, first: int, n: int, data: np.ndarray | None) -> None:
        """Pages [first, first+n), claimed by this placer: written, marked WRITTEN, mapped."""
        pc = self.pc
        alias = pc.alias_u8
        assert alias is not None and pc.uffd is not None
        alias[first:first + n] = 0 if data is None else data
        pc.claimed[first:first + n] = WRITTEN  # a fault on one of them may map it from now on
        i, j = first, first + n
        while i < j:
            done = pc.uffd.cont(pc.addr + i * TPS, (j - i) * TPS, self.cont_buf)
            placed = max(min(done // TPS, j - i), 1)  # EEXIST: the page is mapped already
            pc._placed(i, i + placed, data is not None)
            i += placed

    def _write_scattered(self, part: np.ndarray, data: np.ndarray | None) -> None:
        """The pages of `part` (data row k for part[k]) that no other placer has claimed."""
        pc = self.pc
        with pc.claim_lock:
            todo = pc.claimed[part] == 0
            mine = part[todo]
            pc.claimed[mine] = CLAIMED
        if not mine.size:
            return
        rows = None if data is None else data[todo]
        cuts = np.flatnonzero(np.diff(mine) != 1) + 1
        for a, b in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [mine.size])).tolist()):
            self._write_run(int(mine[a]), b - a, None if rows is None else rows[a:b])

    def _place_runs(self, part: np.ndarray, copy: bool) -> None:
        """UFFDIO_COPY (or ZEROPAGE) each maximal run of consecutive, not yet received pages of
        `part` (staging row i holds page part[i]); the runs are found with numpy."""
        pc = self.pc
        uffd = pc.uffd
        assert uffd is not None
        todo = ~pc.received[part]
        joined = np.diff(part) == 1  # page i+1 directly follows page i
        cont_prev = np.concatenate(([False], todo[:-1] & joined))
        cont_next = np.concatenate((todo[1:] & joined, [False]))
        starts = np.flatnonzero(todo & ~cont_prev)
        ends = np.flatnonzero(todo & ~cont_next) + 1
        for i, j in zip(starts.tolist(), ends.tolist()):
            while i < j:
                page = int(part[i])
                dst = pc.addr + page * TPS
                if copy:
                    done = uffd.copy(dst, self.staging_addr + i * TPS, (j - i) * TPS, self.copy_buf)
                else:
                    done = uffd.zeropage(dst, (j - i) * TPS, self.zero_buf)
                # a short count stops at a page that got there first or failed: the next call
                # starts there and tells (0: present, skip it; a failure raises)
                placed = max(min(done // TPS, j - i), 1)
                pc._placed(page, page + placed, copy)
                i += placed

    def _assemble(self, idx: np.ndarray, data: np.ndarray | None) -> None:
        """Huge pages: collect the target pages of one host page (they arrive back to back on
        the channel), then place the whole host page with one UFFDIO_COPY."""
        pc, hp = self.pc, self.hp
        host = idx // hp
        cuts = np.flatnonzero(np.diff(host)) + 1
        for a, b in zip(np.concatenate(([0], cuts)).tolist(), np.concatenate((cuts, [idx.size])).tolist()):
            h = int(host[a])
            if self.assembling is None:
                self.assembling = h
                self.assembled[:] = False
            elif self.assembling != h:
                raise ProtocolError(f"Non-same host page detected: target page of host page {h} while "
                                    f"host page {self.assembling} is incomplete")
            sub = idx[a:b] - h * hp
            if data is None:
                self.staging[sub] = 0
            else:
                self.staging[sub] = data[a:b]
            self.assembled[sub] = True
            if self.assembled.all():
                first = h * hp
                if not pc.received[first]:
                    done = pc.uffd.copy(pc.addr + first * TPS, self.staging_addr, hp * TPS, self.copy_buf)
                    if done not in (0, hp * TPS):
                        raise GuestError(f"partial placement of huge page {h}: {done} bytes")
                pc._placed(first, first + hp, True)
                self.assembling = None
