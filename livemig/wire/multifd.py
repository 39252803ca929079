"""Multifd channels (PROTOCOL.md §2 "Multifd"): the 64-byte init packet that opens each channel and
the fixed-size packet header that precedes each batch of pages, in QEMU's layout (no
compression, version 1). Sans-IO: bytes in, values out; every field is checked.

Packet header (big-endian, 320 bytes + 8 per page slot):
  be32 magic, be32 version, be32 flags, be32 pages_alloc, be32 normal_pages,
  be32 next_packet_size, be64 packet_num, 32 unused bytes (QEMU >= 9.0: be32 zero_pages first;
  livemig sends 0 and refuses others), char ramblock[256],
  be64 offset[pages_alloc]   (only the first normal_pages are meaningful)
then normal_pages x page_size bytes of page data, in offset order.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from ..errors import ProtocolError
from .ram import TARGET_PAGE_SIZE as TPS

MAGIC = 0x11223344
VERSION = 1
FLAG_SYNC = 0x1
FLAG_COMPRESSION_MASK = 0xE  # bits 1..3: compression method; 0 = none
PACKET_PAGES = (512 << 10) // TPS  # 128 page slots: a 512 KiB packet
INIT_LEN = 64
UUID_LEN = 16
BLOCK_NAME_LEN = 256
_INIT = struct.Struct(">II16sB7x32x")
_HDR = struct.Struct(">IIIIIIQI28x256s")
HEADER_LEN = _HDR.size + 8 * PACKET_PAGES  # 1344 bytes for 4 KiB target pages
assert _INIT.size == INIT_LEN and _HDR.size == 320


def init_packet(channel_id: int, uuid: bytes = bytes(UUID_LEN)) -> bytes:
    """The first 64 bytes on a multifd channel."""
    if not 0 <= channel_id <= 255 or len(uuid) != UUID_LEN:
        raise ValueError("bad multifd channel id or uuid")
    return _INIT.pack(MAGIC, VERSION, uuid, channel_id)


def parse_init(data: bytes, channels: int, uuid: bytes = bytes(UUID_LEN)) -> int:
    """Check an init packet; returns its channel id."""
    if len(data) != INIT_LEN:
        raise ProtocolError(f"multifd: init packet of {len(data)} bytes, expected {INIT_LEN}")
    magic, version, their_uuid, cid = _INIT.unpack(data)
    if magic != MAGIC:
        raise ProtocolError(f"multifd: received packet magic {magic:x} expected {MAGIC:x}")
    if version != VERSION:
        raise ProtocolError(f"multifd: received packet version {version} expected {VERSION}")
    if their_uuid != uuid:
        raise ProtocolError(f"multifd: received uuid '{their_uuid.hex()}' and expected uuid '{uuid.hex()}' "
                            f"for channel {cid}")
    if cid >= channels:
        raise ProtocolError(f"multifd: received channel id {cid} is greater than number of channels {channels}")
    return cid


def packet_header(offsets: np.ndarray, packet_num: int, block: str, flags: int = 0,
                  page_size: int = TPS) -> bytes:
    """Header of one packet carrying the pages at byte `offsets` (at most PACKET_PAGES)."""
    n = len(offsets)
    if n > PACKET_PAGES:
        raise ValueError(f"{n} pages exceed a multifd packet ({PACKET_PAGES})")
    name = block.encode()
    if len(name) >= BLOCK_NAME_LEN:
        raise ValueError("RAM block name too long for a multifd packet")
    slots = np.zeros(PACKET_PAGES, dtype=">u8")
    slots[:n] = offsets
    return _HDR.pack(MAGIC, VERSION, flags, PACKET_PAGES, n, n * page_size, packet_num, 0,
                     name) + slots.tobytes()


@dataclass(frozen=True)
class Packet:
    flags: int
    packet_num: int
    block: str
    offsets: np.ndarray  # uint64 byte offsets of the pages that follow, in order
    data_len: int  # bytes of page data after the header
    contiguous: bool = False  # the pages are one run: offsets[0], offsets[0] + page size, ...

    @property
    def sync(self) -> bool:
        return bool(self.flags & FLAG_SYNC)


def parse_header(data, block_sizes: dict[str, int], page_size: int = TPS) -> Packet:
    """Check one packet header (HEADER_LEN bytes) against the local RAM blocks."""
    if len(data) != HEADER_LEN:
        raise ProtocolError(f"multifd: packet header of {len(data)} bytes, expected {HEADER_LEN}")
    magic, version, flags, alloc, normal, next_size, num, zero_pages, raw_name = _HDR.unpack_from(data)
    if magic != MAGIC:
        raise ProtocolError(f"multifd: received packet magic {magic:x} expected {MAGIC:x}")
    if version != VERSION:
        raise ProtocolError(f"multifd: received packet version {version} expected {VERSION}")
    if flags & FLAG_COMPRESSION_MASK:
        raise ProtocolError(f"multifd: packet flags 0x{flags:x} ask for compression, which is off")
    if flags & ~(FLAG_SYNC | FLAG_COMPRESSION_MASK):
        raise ProtocolError(f"multifd: unknown packet flags 0x{flags:x}")
    if alloc != PACKET_PAGES:
        raise ProtocolError(f"multifd: received packet with {alloc} page slots, expected {PACKET_PAGES} "
                            "(maximum pages)")
    if zero_pages:
        raise ProtocolError(f"multifd: packet with {zero_pages} zero pages (QEMU >= 9.0 multifd zero-page "
                            "detection) is not supported: use zero-page-detection=legacy on the source")
    if normal > alloc:
        raise ProtocolError(f"multifd: received packet with {normal} normal pages and expected maximum pages are {alloc}")
    if next_size != normal * page_size:
        raise ProtocolError(f"multifd: packet of {normal} pages announces {next_size} bytes of data")
    offsets = np.frombuffer(data, dtype=">u8", count=normal, offset=_HDR.size).astype(np.uint64)
    name = ""
    if normal:
        name = raw_name.split(b"\0", 1)[0].decode("utf-8", "replace")
        size = block_sizes.get(name)
        if size is None:
            raise ProtocolError(f"multifd: unknown RAM block '{name}'")
        if size < page_size:
            raise ProtocolError(f"multifd: pages for RAM block '{name}' of 0x{size:x} bytes (less than a page)")
        first, last = int(offsets[0]), int(offsets[-1])
        # the common packet is one run of pages, checked by its ends before a diff; then the two
        # ends are the range and alignment checks (a uint64 diff of a descending pair wraps: no run)
        contiguous = last - first == (normal - 1) * page_size and (
            normal == 1 or bool((np.diff(offsets) == np.uint64(page_size)).all()))
        if contiguous and not first % page_size and last <= size - page_size:
            return Packet(flags, num, name, offsets, next_size, True)
        if int(offsets.max()) > size - page_size or np.any(offsets % np.uint64(page_size)):
            bad = offsets[(offsets > np.uint64(size - page_size)) | (offsets % np.uint64(page_size) != 0)][0]
            raise ProtocolError(f"multifd: page offset 0x{int(bad):x} outside RAM block '{name}' "
                                f"(0x{size:x} bytes) or not page aligned")
    return Packet(flags, num, name, offsets, next_size)
