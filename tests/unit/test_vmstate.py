"""Device state (wire.vmstate): encode/decode round trips, subsections, errors, vmdesc shape."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig.errors import ProtocolError
from livemig.wire import decoder as D
from livemig.wire import stream as S
from livemig.wire.cursor import Cursor, Incomplete
from livemig.wire.vmstate import SUBSECTION, Field, VMStateDescription, decode, describe, encode

RANGES = {"bool": (0, 1), "uint8": (0, 255), "uint16": (0, 65535), "uint32": (0, 2**32 - 1),
          "uint64": (0, 2**64 - 1), "int8": (-128, 127), "int16": (-2**15, 2**15 - 1),
          "int32": (-2**31, 2**31 - 1), "int64": (-2**63, 2**63 - 1)}
SIZES = {"bool": 1, "uint8": 1, "int8": 1, "uint16": 2, "int16": 2, "uint32": 4, "int32": 4, "uint64": 8, "int64": 8}

INNER = VMStateDescription("dev/a/inner", 1, (Field("deep", "uint32"),))
SUB_A = VMStateDescription("dev/a", 2, (Field("x", "int16"), Field("buf", "buffer", size=3)), subsections=(INNER,))
SUB_B = VMStateDescription("dev/b", 1, (Field("arr", "uint64", count=2),))
DEV = VMStateDescription(
    "dev", 5,
    (Field("flag", "bool"), Field("u8", "uint8"), Field("u16", "uint16"), Field("u32", "uint32"),
     Field("u64", "uint64"), Field("i8", "int8"), Field("i16", "int16"), Field("i32", "int32"),
     Field("i64", "int64"), Field("regs", "uint32", count=4), Field("signed", "int8", count=3),
     Field("ram", "buffer", size=10)),
    subsections=(SUB_A, SUB_B),
)
BASE = {"flag": True, "u8": 255, "u16": 0xBEEF, "u32": 0xDEADBEEF, "u64": 2**64 - 1, "i8": -1, "i16": -32768,
        "i32": -(2**31), "i64": 2**63 - 1, "regs": [0, 1, 2**32 - 1, 7], "signed": [-128, 0, 127],
        "ram": b"0123456789"}


def roundtrip(vmsd, values, version=None):
    raw = encode(vmsd, values)
    cur = Cursor(raw)
    got = decode(vmsd, cur, version)
    assert cur.pos == len(raw)
    return raw, got


def test_fields_layout_big_endian():
    raw, got = roundtrip(DEV, BASE)
    assert raw == (b"\x01\xff\xbe\xef\xde\xad\xbe\xef" + b"\xff" * 8 + b"\xff\x80\x00\x80\x00\x00\x00"
                   + b"\x7f" + b"\xff" * 7 + struct.pack(">4I", 0, 1, 2**32 - 1, 7) + b"\x80\x00\x7f" + b"0123456789")
    assert got == BASE
    assert DEV.fixed_size == len(raw)


def test_subsections_round_trip():
    values = dict(BASE, **{"dev/a": {"x": -2, "buf": b"abc", "dev/a/inner": {"deep": 9}},
                           "dev/b": {"arr": [1, 2**64 - 1]}})
    raw, got = roundtrip(DEV, values)
    assert got == values
    sub = raw[DEV.fixed_size:]
    assert sub.startswith(bytes((SUBSECTION, 5)) + b"dev/a" + struct.pack(">I", 2) + b"\xff\xfeabc")
    assert sub[16:].startswith(bytes((SUBSECTION, 11)) + b"dev/a/inner" + struct.pack(">I", 1) + struct.pack(">I", 9))
    assert sub.endswith(bytes((SUBSECTION, 5)) + b"dev/b" + struct.pack(">I", 1) + struct.pack(">QQ", 1, 2**64 - 1))
    # only the subsections present in `values` are sent
    only_b = dict(BASE, **{"dev/b": {"arr": [3, 4]}})
    assert roundtrip(DEV, only_b)[1] == only_b


def test_subsections_in_any_order():
    """QEMU's loader accepts subsections in any order (it looks each one up by name)."""
    a = bytes((SUBSECTION, 5)) + b"dev/a" + struct.pack(">Ih", 2, 7) + b"xyz"
    b = bytes((SUBSECTION, 5)) + b"dev/b" + struct.pack(">IQQ", 1, 5, 6)
    raw = encode(DEV, BASE) + b + a
    got = decode(DEV, Cursor(raw))
    assert got["dev/a"] == {"x": 7, "buf": b"xyz"} and got["dev/b"] == {"arr": [5, 6]}


def test_foreign_subsection_returns_to_parent():
    """A subsection whose name is not prefixed by ours is left for the caller (cursor rewound)."""
    raw = encode(DEV, BASE) + bytes((SUBSECTION, 5)) + b"other" + struct.pack(">I", 1)
    cur = Cursor(raw)
    got = decode(DEV, cur)
    assert got == BASE and cur.pos == DEV.fixed_size


def test_unknown_subsection_is_fatal():
    raw = encode(DEV, BASE) + bytes((SUBSECTION, 5)) + b"dev/c" + struct.pack(">I", 1)
    with pytest.raises(ProtocolError, match="unknown subsection 'dev/c'"):
        decode(DEV, Cursor(raw))


def test_versions():
    raw = encode(DEV, BASE)
    assert decode(DEV, Cursor(raw), 5) == BASE
    assert decode(DEV, Cursor(raw), 1) == BASE  # older stream versions are accepted
    with pytest.raises(ProtocolError, match="version 6 is newer"):
        decode(DEV, Cursor(raw), 6)
    sub = bytes((SUBSECTION, 5)) + b"dev/b" + struct.pack(">IQQ", 2, 1, 2)
    with pytest.raises(ProtocolError, match="dev/b: stream version 2"):
        decode(DEV, Cursor(raw + sub))


def test_bad_bool():
    vmsd = VMStateDescription("b", 1, (Field("on", "bool"),))
    assert decode(vmsd, Cursor(b"\x01")) == {"on": 1}
    with pytest.raises(ProtocolError, match="bool value 2"):
        decode(vmsd, Cursor(b"\x02"))


def test_short_input_is_incomplete():
    raw = encode(DEV, dict(BASE, **{"dev/b": {"arr": [1, 2]}}))
    for n in range(len(raw)):
        if n == DEV.fixed_size:
            # the window ends right after the fields: the (optional) subsections can't be seen yet,
            # which is why the stream decoder only accepts a section once its footer is there
            assert decode(DEV, Cursor(raw, 0, n)) == BASE
            continue
        with pytest.raises(Incomplete):
            decode(DEV, Cursor(raw, 0, n))


def test_field_validation_and_encode_errors():
    with pytest.raises(ValueError):
        Field("f", "float")
    with pytest.raises(ValueError):
        Field("f", "buffer")
    with pytest.raises(ValueError, match="2 bytes, expected 3"):
        encode(VMStateDescription("v", 1, (Field("b", "buffer", size=3),)), {"b": b"ab"})
    with pytest.raises(ValueError, match="1 items, expected 2"):
        encode(VMStateDescription("v", 1, (Field("a", "uint8", count=2),)), {"a": [1]})
    with pytest.raises(KeyError):
        encode(VMStateDescription("v", 1, (Field("a", "uint8"),)), {})
    with pytest.raises(struct.error):
        encode(VMStateDescription("v", 1, (Field("a", "uint8"),)), {"a": 256})
    assert Field("a", "uint16", count=5).nbytes == 10 and Field("b", "buffer", size=7).nbytes == 7


def test_describe_shape():
    d = describe(DEV)
    json.dumps(d)  # serialisable as part of the vmdesc JSON
    assert d["fields"][0] == {"name": "flag", "type": "bool", "size": 1}
    assert d["fields"][9] == {"name": "regs", "type": "uint32", "size": 4, "array_len": 4}
    assert d["fields"][11] == {"name": "ram", "type": "buffer", "size": 10}
    assert [f["name"] for f in d["fields"]] == [f.name for f in DEV.fields]
    for f, fd in zip(DEV.fields, d["fields"]):
        assert fd["size"] * fd.get("array_len", 1) == f.nbytes
    assert [s["vmsd_name"] for s in d["subsections"]] == ["dev/a", "dev/b"]
    a = d["subsections"][0]
    assert a["version"] == 2 and a["fields"] == [{"name": "x", "type": "int16", "size": 2},
                                                   {"name": "buf", "type": "buffer", "size": 3}]
    assert a["subsections"] == [{"vmsd_name": "dev/a/inner", "version": 1,
                                 "fields": [{"name": "deep", "type": "uint32", "size": 4}]}]
    assert "subsections" not in d["subsections"][1]
    assert describe(VMStateDescription("empty", 1, ())) == {"fields": []}


def test_device_section_in_stream():
    """A FULL section with subsections decodes through the stream decoder (then the footer)."""
    values = dict(BASE, **{"dev/a": {"x": 1, "buf": b"abc"}})
    data = (S.file_header() + S.section_header(S.Section.FULL, 9, "dev", 2, 4) + encode(DEV, values)
            + S.section_footer(9) + S.eof())
    for chunk in (1, 4, len(data)):
        dec = D.StreamDecoder([], {("dev", 2): DEV})
        ev = []
        for i in range(0, len(data), chunk):
            ev += dec.feed(data[i:i + chunk])
        assert ev == [D.Header(3), D.DeviceState("dev", 2, 4, values), D.Eof()]


# ------------------------------------------------------------------ hypothesis


@st.composite
def field_and_value(draw, name):
    kind = draw(st.sampled_from(sorted(SIZES) + ["buffer"]))
    if kind == "buffer":
        size = draw(st.integers(1, 40))
        return Field(name, "buffer", size=size), draw(st.binary(min_size=size, max_size=size))
    lo, hi = RANGES[kind]
    count = draw(st.sampled_from([0, 0, 1, 2, 5]))
    if count:
        return Field(name, kind, count=count), draw(st.lists(st.integers(lo, hi), min_size=count, max_size=count))
    return Field(name, kind), draw(st.integers(lo, hi))


@st.composite
def vmsd_and_values(draw, name="d", depth=0):
    n = draw(st.integers(0, 6))
    pairs = [draw(field_and_value(f"f{i}")) for i in range(n)]
    subs, values = [], {f.name: v for f, v in pairs}
    if depth < 2:
        for j in range(draw(st.integers(0, 2))):
            sub, sv = draw(vmsd_and_values(f"{name}/s{j}", depth + 1))
            subs.append(sub)
            if draw(st.booleans()):
                values[sub.name] = sv
    vmsd = VMStateDescription(name, draw(st.integers(0, 2**32 - 1)), tuple(f for f, _ in pairs), tuple(subs))
    return vmsd, values


@settings(max_examples=150, deadline=None)
@given(vmsd_and_values())
def test_random_descriptions_round_trip(pair):
    vmsd, values = pair
    raw, got = roundtrip(vmsd, values, vmsd.version_id)
    assert got == values
    d = describe(vmsd)
    assert sum(f["size"] * f.get("array_len", 1) for f in d["fields"]) == vmsd.fixed_size
    json.dumps(d)


def test_globalstate_carries_the_run_state_in_qemus_layout():
    """QEMU 7.2's globalstate section: a uint32 size (name + NUL) and a 100-byte zero-padded name."""
    import pytest
    from livemig.errors import ProtocolError
    from livemig.machine.devices import GlobalState
    from livemig.wire.cursor import Cursor
    from livemig.wire.vmstate import decode, encode
    src = GlobalState()
    src.runstate = "paused"
    raw = encode(src.vmsd, src.save())
    assert raw == b"\x00\x00\x00\x07" + b"paused".ljust(100, b"\0")
    dst = GlobalState()
    assert not dst.received and dst.runstate == "running"
    dst.load(decode(dst.vmsd, Cursor(raw)))
    assert dst.received and dst.runstate == "paused"
    for bad in ({"size": 7, "runstate": b"bogus\0".ljust(100, b"\0")},
                {"size": 200, "runstate": b"paused".ljust(100, b"\0")},
                {"size": 0, "runstate": bytes(100)}):
        with pytest.raises(ProtocolError, match="globalstate: invalid runstate"):
            GlobalState().load(bad)
