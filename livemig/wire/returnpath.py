"""Return-path messages, destination -> source (MIG_RP_MSG_*), and a sans-IO decoder for them.

Framing: be16 type, be16 len, payload. RECV_BITMAP carries a trailer outside the framing. See
PROTOCOL.md §4 for the rules checked here.
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ..errors import ProtocolError
from .cursor import Cursor, Incomplete, counted

MAX_LEN = 512  # the source's receive buffer
# the first two bytes of a TLS record (alert, handshake, data; TLS 1.0-1.3), read as a message type
TLS_RECORDS = {0x1501, 0x1503, 0x1601, 0x1603, 0x1703}
BITMAP_END_MARK = 0x0123456789ABCDEF
RESUME_ACK_VALUE = 1


class RP(enum.IntEnum):
    SHUT = 1
    PONG = 2
    REQ_PAGES_ID = 3
    REQ_PAGES = 4
    RECV_BITMAP = 5
    RESUME_ACK = 6
    SWITCHOVER_ACK = 7
    # livemig's own (QEMU has no such message; a QEMU source fails on it, clearly and early):
    # "I will also send page requests on the postcopy-preempt channel" (x-preempt-requests)
    PREEMPT_REQUESTS = 0x4C4D


_FIXED = {RP.SHUT: 4, RP.PONG: 4, RP.REQ_PAGES: 12, RP.RESUME_ACK: 4, RP.SWITCHOVER_ACK: 0, RP.PREEMPT_REQUESTS: 0}
_HDR = struct.Struct(">HH")
_REQ_ID = struct.Struct(">HHQIB")  # REQ_PAGES_ID: header, start, length, name length


@dataclass(frozen=True)
class Shut:
    value: int


@dataclass(frozen=True)
class Pong:
    value: int


@dataclass(frozen=True)
class ReqPages:
    start: int
    length: int
    block: str | None  # None: REQ_PAGES (the last named block)


@dataclass(frozen=True)
class RecvBitmap:
    block: str
    bitmap: bytes  # little-endian bitmap, padded to 8 bytes


@dataclass(frozen=True)
class ResumeAck:
    value: int


@dataclass(frozen=True)
class SwitchoverAck:
    pass


@dataclass(frozen=True)
class PreemptRequests:
    pass


RPMessage = Shut | Pong | ReqPages | RecvBitmap | ResumeAck | SwitchoverAck | PreemptRequests


def _msg(t: RP, payload: bytes) -> bytes:
    return _HDR.pack(t, len(payload)) + payload


def shut(value: int) -> bytes:
    return _msg(RP.SHUT, struct.pack(">I", value))


def pong(value: int) -> bytes:
    return _msg(RP.PONG, struct.pack(">I", value))


def req_pages(start: int, length: int, block: str | None) -> bytes:
    if block is None:
        return _msg(RP.REQ_PAGES, struct.pack(">QI", start, length))
    return _msg(RP.REQ_PAGES_ID, struct.pack(">QI", start, length) + counted(block))


def recv_bitmap(block: str, bitmap: bytes) -> bytes:
    if len(bitmap) % 8:
        raise ValueError("bitmap must be padded to 8 bytes")
    return _msg(RP.RECV_BITMAP, counted(block)) + struct.pack(">Q", len(bitmap)) + bitmap + struct.pack(">Q", BITMAP_END_MARK)


def resume_ack(value: int = RESUME_ACK_VALUE) -> bytes:
    return _msg(RP.RESUME_ACK, struct.pack(">I", value))


def switchover_ack() -> bytes:
    return _msg(RP.SWITCHOVER_ACK, b"")


def preempt_requests() -> bytes:
    return _msg(RP.PREEMPT_REQUESTS, b"")


class RPDecoder:
    """Feed bytes from the return path; take decoded messages with next_message().

    `bitmap_sizes` maps block name -> expected RECV_BITMAP size in bytes (needed to bound the trailer).
    """

    def __init__(self, bitmap_sizes: dict[str, int] | None = None):
        self._buf = bytearray()
        self.bitmap_sizes = bitmap_sizes or {}
        self.last_block: str | None = None

    def feed(self, data: bytes | memoryview) -> None:
        self._buf += data

    def pending(self) -> bytes:
        """The bytes fed but not decoded yet (another decoder can take over from here)."""
        return bytes(self._buf)

    def next_message(self) -> RPMessage | None:
        """One decoded message, or None if more bytes are needed. Raises ProtocolError on bad input."""
        buf = self._buf
        if len(buf) < 4:  # not even a header (after the last message of a receive, usually)
            return None
        if len(buf) > _REQ_ID.size:  # a page request, the message that waits on a guest: directly
            t, n, start, length, name_len = _REQ_ID.unpack_from(buf)
            end = 4 + n
            if t == RP.REQ_PAGES_ID and name_len and n == 13 + name_len and len(buf) >= end and buf[17:end].isascii():
                block = buf[17:end].decode("ascii")
                del buf[:end]
                self.last_block = block
                return ReqPages(start, length, block)
        cur = Cursor(self._buf)
        try:
            msg = self._parse(cur)
        except Incomplete:
            return None
        del self._buf[:cur.pos]
        return msg

    def _parse(self, cur: Cursor) -> RPMessage:
        t, n = _HDR.unpack(cur.read(4))
        try:
            kind = RP(t)
        except ValueError:
            hint = " (TLS records: the destination uses TLS; set tls-creds here too)" if t in TLS_RECORDS else ""
            raise ProtocolError(f"return path: unknown message type {t}{hint}") from None
        if n > MAX_LEN:
            raise ProtocolError(f"return path: message {kind.name} of {n} bytes exceeds {MAX_LEN}")
        fixed = _FIXED.get(kind)
        if fixed is not None and n != fixed:
            raise ProtocolError(f"return path: {kind.name} has length {n}, expected {fixed}")
        body = Cursor(cur.read(n))
        if kind is RP.SHUT:
            return Shut(body.be32())
        if kind is RP.PONG:
            return Pong(body.be32())
        if kind is RP.RESUME_ACK:
            v = body.be32()
            if v != RESUME_ACK_VALUE:
                raise ProtocolError(f"return path: RESUME_ACK value {v}, expected {RESUME_ACK_VALUE}")
            return ResumeAck(v)
        if kind is RP.SWITCHOVER_ACK:
            return SwitchoverAck()
        if kind is RP.PREEMPT_REQUESTS:
            return PreemptRequests()
        if kind is RP.REQ_PAGES:
            if self.last_block is None:
                raise ProtocolError("return path: REQ_PAGES before any REQ_PAGES_ID")
            start, length = body.be64(), body.be32()
            return ReqPages(start, length, None)
        if kind is RP.REQ_PAGES_ID:
            if n < 14:
                raise ProtocolError(f"return path: REQ_PAGES_ID of {n} bytes is too short")
            start, length = body.be64(), body.be32()
            name_len = body.u8()
            if n != 13 + name_len:
                raise ProtocolError(f"return path: REQ_PAGES_ID length {n} does not match name length {name_len}")
            body.pos -= 1
            block = body.counted_string("block name")
            self.last_block = block
            return ReqPages(start, length, block)
        # RECV_BITMAP
        if n < 2:
            raise ProtocolError("return path: RECV_BITMAP without a block name")
        name_len = body.u8()
        if n != 1 + name_len:
            raise ProtocolError(f"return path: RECV_BITMAP length {n} does not match name length {name_len}")
        body.pos -= 1
        block = body.counted_string("block name")
        size = cur.be64()
        expected = self.bitmap_sizes.get(block)
        if expected is None:
            raise ProtocolError(f"return path: RECV_BITMAP for unknown block {block!r}")
        if size != expected:
            raise ProtocolError(f"return path: RECV_BITMAP of {size} bytes for {block!r}, expected {expected}")
        bitmap = cur.read(size)
        if cur.be64() != BITMAP_END_MARK:
            raise ProtocolError("return path: RECV_BITMAP end marker missing")
        return RecvBitmap(block, bitmap)
