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
    if not bits.any():
        return []
    d = np.diff(np.concatenate(([0], bits.astype(np.int8), [0])))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))
