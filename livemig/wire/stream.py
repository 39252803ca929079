"""QEMU migration stream framing: file header, sections, footers, commands (encoders and constants).

Decoding lives in `wire.decoder`; these helpers only build bytes. See PROTOCOL.md §1 and §3.
"""
from __future__ import annotations

import enum
import struct

from .cursor import counted

MAGIC = 0x5145564D  # "QEVM"
VERSION = 3
VERSION_COMPAT = 2


class Section(enum.IntEnum):
    EOF = 0x00
    START = 0x01
    PART = 0x02
    END = 0x03
    FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    FOOTER = 0x7E


class Cmd(enum.IntEnum):
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


# Fixed payload lengths of commands (None: variable, checked by the handler).
CMD_LEN: dict[Cmd, int | None] = {
    Cmd.OPEN_RETURN_PATH: 0,
    Cmd.PING: 4,
    Cmd.POSTCOPY_ADVISE: None,  # 0 or 16
    Cmd.POSTCOPY_LISTEN: 0,
    Cmd.POSTCOPY_RUN: 0,
    Cmd.POSTCOPY_RAM_DISCARD: None,
    Cmd.PACKAGED: 4,
    Cmd.ENABLE_COLO: 0,
    Cmd.POSTCOPY_RESUME: 0,
    Cmd.RECV_BITMAP: None,
    Cmd.SWITCHOVER_START: 0,
}

PING_PACKAGED_LOADED = 0x42
PING_DRAIN = 5  # livemig's: has everything sent landed? (QEMU's own are 1-4 and 0x42)
MAX_PACKAGED_SIZE = 0xFFFFFFFF
MACHINE_TYPE = "pc-i440fx-livemig"

_HDR = struct.Struct(">II")
_SEC_ID = struct.Struct(">BI")
_INST_VER = struct.Struct(">II")
_CMD = struct.Struct(">BHH")


def file_header() -> bytes:
    return _HDR.pack(MAGIC, VERSION)


def configuration(machine: str = MACHINE_TYPE) -> bytes:
    """CONFIGURATION record: the machine type as be32 length + bytes (no subsections on x86)."""
    raw = machine.encode("ascii")
    return bytes((Section.CONFIGURATION,)) + struct.pack(">I", len(raw)) + raw


def section_header(kind: Section, section_id: int, idstr: str | None = None,
                   instance_id: int = 0, version_id: int = 0) -> bytes:
    """START/FULL carry idstr, instance and version; PART/END only the id."""
    out = _SEC_ID.pack(kind, section_id)
    if kind in (Section.START, Section.FULL):
        assert idstr is not None
        out += counted(idstr) + _INST_VER.pack(instance_id, version_id)
    return out


def section_footer(section_id: int) -> bytes:
    return _SEC_ID.pack(Section.FOOTER, section_id)


def command(cmd: Cmd, payload: bytes = b"") -> bytes:
    if len(payload) > 0xFFFF:
        raise ValueError("command payload over 65535 bytes")
    return _CMD.pack(Section.COMMAND, cmd, len(payload)) + payload


def ping(value: int) -> bytes:
    return command(Cmd.PING, struct.pack(">I", value))


def eof() -> bytes:
    return bytes((Section.EOF,))


def vmdescription(json_bytes: bytes) -> bytes:
    return bytes((Section.VMDESCRIPTION,)) + struct.pack(">I", len(json_bytes)) + json_bytes


def postcopy_advise(pagesize_summary: int, target_page_size: int) -> bytes:
    return command(Cmd.POSTCOPY_ADVISE, struct.pack(">QQ", pagesize_summary, target_page_size))


def packaged(blob: bytes) -> bytes:
    if len(blob) > MAX_PACKAGED_SIZE:
        raise ValueError("package too large")
    return command(Cmd.PACKAGED, struct.pack(">I", len(blob))) + blob


def ram_discard_prefix(block: str) -> bytes:
    """The head of a POSTCOPY_RAM_DISCARD payload: version 0, counted block name, NUL."""
    return b"\x00" + counted(block) + b"\x00"


def ram_discard(block: str, ranges: list[tuple[int, int]]) -> bytes:
    """POSTCOPY_RAM_DISCARD: the prefix, then (be64 start, be64 length) pairs."""
    payload = ram_discard_prefix(block) + b"".join(struct.pack(">QQ", s, n) for s, n in ranges)
    return command(Cmd.POSTCOPY_RAM_DISCARD, payload)


def recv_bitmap(block: str) -> bytes:
    return command(Cmd.RECV_BITMAP, counted(block))
