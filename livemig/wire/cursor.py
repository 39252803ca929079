"""A bounds-checked big-endian reader over a bytes-like window.

Decoders parse one record at a time from a Cursor. When the window ends before the record does,
the cursor raises Incomplete and the caller retries the whole record once more bytes arrived.
"""
from __future__ import annotations

import struct

from ..errors import ProtocolError

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


class Incomplete(Exception):
    """The record needs more bytes than the window holds (not an error by itself)."""


class Cursor:
    __slots__ = ("buf", "pos", "end")

    def __init__(self, buf: bytes | bytearray | memoryview, pos: int = 0, end: int | None = None):
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else end

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def need(self, n: int) -> None:
        if self.pos + n > self.end:
            raise Incomplete(n)

    def read(self, n: int) -> bytes:
        self.need(n)
        b = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return b

    def skip(self, n: int) -> None:
        self.need(n)
        self.pos += n

    def peek_u8(self) -> int:
        self.need(1)
        return self.buf[self.pos]

    def u8(self) -> int:
        self.need(1)
        v = self.buf[self.pos]
        self.pos += 1
        return v

    def be16(self) -> int:
        self.need(2)
        (v,) = _BE16.unpack_from(self.buf, self.pos)
        self.pos += 2
        return v

    def be32(self) -> int:
        self.need(4)
        (v,) = _BE32.unpack_from(self.buf, self.pos)
        self.pos += 4
        return v

    def be64(self) -> int:
        self.need(8)
        (v,) = _BE64.unpack_from(self.buf, self.pos)
        self.pos += 8
        return v

    def counted_string(self, what: str = "string") -> str:
        """u8 length + bytes, no NUL; length 0 is rejected (as qemu_get_counted_string does)."""
        n = self.u8()
        if n == 0:
            raise ProtocolError(f"empty {what} in stream")
        raw = self.read(n)
        try:
            return raw.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError(f"{what} is not ASCII: {raw!r}") from None


def counted(s: str) -> bytes:
    """Encode a counted string (1..255 ASCII bytes)."""
    raw = s.encode("ascii")
    if not 0 < len(raw) < 256:
        raise ValueError(f"counted string must be 1..255 bytes: {s!r}")
    return bytes((len(raw),)) + raw
