"""RAM section records ("ram", instance 0, version 4): MEM_SIZE setup, PAGE, ZERO, CONTINUE, EOS.

Batch encoders build the 8-byte headers of many pages at once with numpy. See PROTOCOL.md §2.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .cursor import counted

IDSTR = "ram"
INSTANCE = 0
VERSION = 4
TARGET_PAGE_SIZE = 4096

FLAG_ZERO = 0x002
FLAG_MEM_SIZE = 0x004
FLAG_PAGE = 0x008
FLAG_EOS = 0x010
FLAG_CONTINUE = 0x020
FLAG_XBZRLE = 0x040
FLAG_HOOK = 0x080
FLAG_MULTIFD_FLUSH = 0x200
FLAGS_MAX = 0x400

_BE64 = struct.Struct(">Q")
PAGE_RECORD = 8 + TARGET_PAGE_SIZE  # CONTINUE|PAGE record size
ZERO_RECORD = 9  # CONTINUE|ZERO record size

ZERO_DTYPE = np.dtype([("word", ">u8"), ("fill", "u1")])


@dataclass(frozen=True)
class BlockInfo:
    """One RAMBlock as listed in the setup record."""

    name: str
    length: int
    page_size: int | None = None  # sent only for postcopy with non-default page size


def setup_payload(blocks: list[BlockInfo]) -> bytes:
    """START payload: total | MEM_SIZE, the block list, then EOS."""
    total = sum(b.length for b in blocks)
    out = bytearray(_BE64.pack(total | FLAG_MEM_SIZE))
    for b in blocks:
        out += counted(b.name) + _BE64.pack(b.length)
        if b.page_size is not None:
            out += _BE64.pack(b.page_size)
    out += eos()
    return bytes(out)


def eos() -> bytes:
    return _BE64.pack(FLAG_EOS)


def multifd_flush() -> bytes:
    return _BE64.pack(FLAG_MULTIFD_FLUSH)


def continue_page_header_into(buf: bytearray, offset: int) -> None:
    """page_header(offset, FLAG_PAGE, None) written at the start of `buf` (a reused record)."""
    _BE64.pack_into(buf, 0, offset | FLAG_PAGE | FLAG_CONTINUE)


def page_header(offset: int, flags: int, block: str | None) -> bytes:
    """Header of one record; `block` None means CONTINUE (same block as the last record)."""
    if block is None:
        return _BE64.pack(offset | flags | FLAG_CONTINUE)
    return _BE64.pack(offset | flags) + counted(block)


def page_headers(offsets: np.ndarray) -> np.ndarray:
    """Big-endian CONTINUE|PAGE words for many byte offsets (one uint64 each)."""
    return (offsets.astype(np.uint64) | np.uint64(FLAG_PAGE | FLAG_CONTINUE)).astype(">u8")


def zero_records(offsets: np.ndarray) -> bytes:
    """CONTINUE|ZERO records (word + fill byte 0) for many byte offsets, as one bytes object."""
    rec = np.zeros(len(offsets), dtype=ZERO_DTYPE)
    rec["word"] = offsets.astype(np.uint64) | np.uint64(FLAG_ZERO | FLAG_CONTINUE)
    return rec.tobytes()
