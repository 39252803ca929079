"""RAM blocks as numpy views, and the page bitmaps the engine keeps over them."""
from __future__ import annotations

import mmap

import numpy as np

TPS = 4096


class RamBlock:
    """One guest RAM block ('pc.ram'): a host mapping viewed as pages."""

    def __init__(self, name: str, mem: mmap.mmap | memoryview | bytearray, page_size: int = TPS):
        self.name = name
        self.mem = mem
        self.size = len(mem)
        if self.size % TPS:
            raise ValueError("RAM block size must be a multiple of 4 KiB")
        self.page_size = page_size
        self.npages = self.size // TPS
        self.u8 = np.frombuffer(mem, dtype=np.uint8).reshape(self.npages, TPS)
        self.u64 = self.u8.view(np.uint64).reshape(self.npages, TPS // 8)


def nonzero_pages(u64: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Which pages `idx` of `u64` (one row of 512 uint64 words a page) hold a nonzero byte. A page
    whose first word is nonzero is decided by that word; only the others are read whole (most
    pages in use start with a nonzero word: 8 bytes read instead of 4 KiB, and nothing copied)."""
    first, n = int(idx[0]), idx.size
    contiguous = int(idx[-1]) - first + 1 == n
    nz = (u64[first:first + n, 0] if contiguous else u64[idx, 0]) != 0
    if not nz.all():
        rest = np.flatnonzero(~nz)
        if contiguous and rest.size * 4 >= n * 3:
            # mostly candidates (an untouched region, say): reduce the pages where they lie, with
            # no gather copy; the few pages already decided are read along
            nz = np.bitwise_or.reduce(u64[first:first + n], axis=1) != 0
        else:
            nz[rest] = np.bitwise_or.reduce(u64[idx[rest]], axis=1) != 0
    return nz


def unpack_bitmap(words: np.ndarray, npages: int) -> np.ndarray:
    """KVM-style uint64 bitmap (little-endian bit order) -> bool array of `npages`."""
    bits = np.unpackbits(np.ascontiguousarray(words).view(np.uint8), bitorder="little", count=npages)
    return bits.view(np.bool_)


def pack_bitmap(bits: np.ndarray) -> bytes:
    """bool array -> little-endian bitmap bytes padded to a multiple of 8 bytes (RECV_BITMAP layout)."""
    raw = np.packbits(bits.astype(np.uint8), bitorder="little").tobytes()
    return raw + b"\x00" * (-len(raw) % 8)


def runs(bits: np.ndarray) -> list[tuple[int, int]]:
    """(start, count) of each run of set bits."""
    starts, ends = run_bounds(bits)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def run_bounds(bits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and end (exclusive) indices of each run of set bits, as arrays (no Python loop)."""
    if not bits.size:
        return np.empty(0, np.intp), np.empty(0, np.intp)
    bounds = np.concatenate(([0], np.flatnonzero(bits[1:] != bits[:-1]) + 1, [bits.size]))
    starts, ends = bounds[:-1], bounds[1:]
    keep = bits[starts].astype(bool)
    return starts[keep], ends[keep]


# ----------------------------------------------------------------------------- page allocation
import ctypes  # noqa: E402
import threading  # noqa: E402

from .threadname import NamedThread  # noqa: E402

MADV_POPULATE_WRITE = 23  # Linux 5.14+
_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def populate(addr: int, length: int) -> bool:
    """Allocate [addr, addr+length) writable in one call, without holding the GIL; False if unsupported."""
    return _libc.madvise(addr, length, MADV_POPULATE_WRITE) == 0


class Prefaulter:
    """Allocates guest RAM in the background (thread mig/dst/prealloc), chunk by chunk.

    A destination that waits for a migration prepares its memory meanwhile, so that page
    allocation is not paid while the stream arrives. The mappings given are populated one after
    the other: guest RAM first, then (guest RAM on a memfd) its second mapping, which only a
    postcopy destination uses. Populating a page that already holds data leaves it untouched.
    """

    def __init__(self, addrs: list[int], size: int, chunk: int = 4 << 20):
        self.addrs = list(addrs)
        self.size, self.chunk = size, chunk
        self.done = [0] * len(self.addrs)  # bytes populated from the start of each mapping
        self._stop = threading.Event()
        self.thread = NamedThread(target=self._run, name="mig/dst/prealloc", daemon=True)

    def start(self) -> "Prefaulter":
        self.thread.start()
        return self

    def stop(self, wait: bool = True) -> None:
        """Stop; with `wait`, also wait for the chunk in progress: a postcopy destination's ADVISE
        drops guest RAM's pages, and one populated after that would never fault (the guest would
        read zeros). Without ADVISE the chunk may finish alongside the loader (populating a page
        that holds data leaves it as it is)."""
        self._stop.set()
        if wait and self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join()

    def ready(self, addr: int) -> int:
        """Bytes from the start of the mapping at `addr` that are populated (0 if not ours)."""
        return self.done[self.addrs.index(addr)] if addr in self.addrs else 0

    def _run(self) -> None:
        for i, addr in enumerate(self.addrs):
            off = 0
            while off < self.size:
                if self._stop.is_set():
                    return
                n = min(self.chunk, self.size - off)
                if not populate(addr + off, n):
                    return
                off += n
                self.done[i] = off
