"""Device state as QEMU vmstate fields and subsections, and the vmdesc JSON that describes them.

A device declares a VMStateDescription (name, version, typed fields, optional subsections) and
hands over its state as a dict; encode/decode turn that dict into section payload bytes and back.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field as dc_field
from typing import Any

from ..errors import ProtocolError
from .cursor import Cursor

SUBSECTION = 0x05

# vmdesc type name -> (struct code, size)
_SCALARS: dict[str, tuple[str, int]] = {
    "bool": ("B", 1),
    "uint8": ("B", 1),
    "uint16": ("H", 2),
    "uint32": ("I", 4),
    "uint64": ("Q", 8),
    "int8": ("b", 1),
    "int16": ("h", 2),
    "int32": ("i", 4),
    "int64": ("q", 8),
}


@dataclass(frozen=True)
class Field:
    """One vmstate field: a big-endian scalar, an array of them (count > 0), or a raw buffer."""

    name: str
    type: str
    size: int = 0  # bytes, for type "buffer"
    count: int = 0  # > 0: fixed array of `count` scalars

    def __post_init__(self) -> None:
        if self.type == "buffer":
            if self.size <= 0:
                raise ValueError(f"buffer field {self.name} needs a size")
        elif self.type not in _SCALARS:
            raise ValueError(f"unknown vmstate type {self.type}")

    @property
    def nbytes(self) -> int:
        if self.type == "buffer":
            return self.size
        return _SCALARS[self.type][1] * max(self.count, 1)


@dataclass(frozen=True)
class VMStateDescription:
    name: str
    version_id: int
    fields: tuple[Field, ...]
    subsections: tuple["VMStateDescription", ...] = dc_field(default=())

    @property
    def fixed_size(self) -> int:
        return sum(f.nbytes for f in self.fields)


def _pack_field(f: Field, value: Any) -> bytes:
    if f.type == "buffer":
        raw = bytes(value)
        if len(raw) != f.size:
            raise ValueError(f"field {f.name}: {len(raw)} bytes, expected {f.size}")
        return raw
    code, _ = _SCALARS[f.type]
    if f.count:
        vals = list(value)
        if len(vals) != f.count:
            raise ValueError(f"field {f.name}: {len(vals)} items, expected {f.count}")
        return struct.pack(f">{f.count}{code}", *vals)
    return struct.pack(">" + code, int(value))


def encode(vmsd: VMStateDescription, values: dict[str, Any]) -> bytes:
    """Fields in order, then each subsection whose name is a key of `values` (its dict)."""
    out = bytearray()
    for f in vmsd.fields:
        out += _pack_field(f, values[f.name])
    for sub in vmsd.subsections:
        if sub.name in values:
            name = sub.name.encode("ascii")
            out += bytes((SUBSECTION, len(name))) + name + struct.pack(">I", sub.version_id)
            out += encode(sub, values[sub.name])
    return bytes(out)


def decode(vmsd: VMStateDescription, cur: Cursor, version_id: int | None = None) -> dict[str, Any]:
    """Read the fields and any subsections of `vmsd` at the cursor."""
    if version_id is not None and version_id > vmsd.version_id:
        raise ProtocolError(f"{vmsd.name}: stream version {version_id} is newer than ours ({vmsd.version_id})")
    values: dict[str, Any] = {}
    for f in vmsd.fields:
        if f.type == "buffer":
            values[f.name] = cur.read(f.size)
            continue
        code, size = _SCALARS[f.type]
        raw = cur.read(size * max(f.count, 1))
        if f.count:
            values[f.name] = list(struct.unpack(f">{f.count}{code}", raw))
        else:
            (values[f.name],) = struct.unpack(">" + code, raw)
            if f.type == "bool" and values[f.name] > 1:
                raise ProtocolError(f"{vmsd.name}.{f.name}: bool value {values[f.name]}")
    by_name = {s.name: s for s in vmsd.subsections}
    while cur.remaining >= 1 and cur.peek_u8() == SUBSECTION:
        start = cur.pos
        cur.u8()
        n = cur.u8()
        name = cur.read(n).decode("ascii", "replace")
        if not name.startswith(vmsd.name + "/") and not name.startswith(vmsd.name):
            cur.pos = start  # not ours: the parent handles it
            break
        sub = by_name.get(name)
        if sub is None:
            raise ProtocolError(f"{vmsd.name}: unknown subsection {name!r}")
        ver = cur.be32()
        values[name] = decode(sub, cur, ver)
    return values


def describe(vmsd: VMStateDescription) -> dict[str, Any]:
    """The vmdesc JSON entry (fields and subsections) for one description."""
    fields = []
    for f in vmsd.fields:
        d: dict[str, Any] = {"name": f.name, "type": f.type, "size": f.nbytes if f.type == "buffer" else _SCALARS[f.type][1]}
        if f.count:
            d["array_len"] = f.count
        fields.append(d)
    out: dict[str, Any] = {"fields": fields}
    if vmsd.subsections:
        out["subsections"] = [
            {"vmsd_name": s.name, "version": s.version_id, **describe(s)} for s in vmsd.subsections
        ]
    return out
