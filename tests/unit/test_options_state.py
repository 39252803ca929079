"""Options (capabilities, parameters), the migration state table, URI parsing, RAM bitmaps, and the
memory-integrity checks, all on synthetic inputs."""
from __future__ import annotations

import itertools
import struct
import threading
import time
from collections import deque

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from livemig import options as O
from livemig import state as S
from livemig.errors import MigrationError, TransportError
from livemig.guest import image
from livemig.guest.image import check_invariant
from livemig.integrity import compare
from livemig.ramblock import pack_bitmap, runs, unpack_bitmap
from livemig.transport import URI, parse_uri

# ================================================================== capabilities


def caps(**kw):
    return [{"capability": k.replace("_", "-"), "state": v} for k, v in kw.items()]


def test_capability_defaults_and_query():
    o = O.MigrationOptions()
    q = o.query_capabilities()
    assert [c["capability"] for c in q] == list(O.CAPABILITIES)
    assert all(c["state"] is False for c in q)
    assert len(O.CAPABILITIES) == 21 and len(set(O.CAPABILITIES)) == 21
    assert O.SUPPORTED_CAPABILITIES <= set(O.CAPABILITIES)


def test_enable_supported_capabilities():
    o = O.MigrationOptions()
    o.set_capabilities([{"capability": c, "state": True} for c in sorted(O.SUPPORTED_CAPABILITIES)])
    assert all(o.cap(c) for c in O.SUPPORTED_CAPABILITIES)
    o.set_capabilities(caps(postcopy_ram=False, postcopy_preempt=False))
    assert not o.cap("postcopy-ram") and o.cap("return-path")
    o.set_capabilities([])
    assert o.cap("events")


@pytest.mark.parametrize("name", [c for c in O.CAPABILITIES if c not in O.SUPPORTED_CAPABILITIES])
def test_unsupported_capability(name):
    o = O.MigrationOptions()
    with pytest.raises(MigrationError, match=f"Capability '{name}' is not supported"):
        o.set_capabilities([{"capability": name, "state": True}])
    o.set_capabilities([{"capability": name, "state": False}])  # turning it off is fine
    assert o.cap(name) is False


@pytest.mark.parametrize("name", ["compress", "postcopy_ram", "Postcopy-ram", "", None, 3])
def test_unknown_capability(name):
    with pytest.raises(MigrationError, match="Parameter 'capability' does not accept value"):
        O.MigrationOptions().set_capabilities([{"capability": name, "state": True}])


@pytest.mark.parametrize("state", [1, 0, "on", "true", None, 1.0])
def test_capability_state_must_be_bool(state):
    with pytest.raises(MigrationError, match="Invalid parameter type for 'state', expected: boolean"):
        O.MigrationOptions().set_capabilities([{"capability": "events", "state": state}])


@pytest.mark.parametrize("item", [{"capability": "events", "state": True, "x": 1}, "events", ["events", True], None])
def test_capability_item_shape(item):
    with pytest.raises(MigrationError, match="expected: MigrationCapabilityStatus"):
        O.MigrationOptions().set_capabilities([item])


def test_capabilities_are_atomic():
    o = O.MigrationOptions()
    with pytest.raises(MigrationError):
        o.set_capabilities(caps(events=True, postcopy_ram=True) + caps(xbzrle=True))
    assert not o.cap("events") and not o.cap("postcopy-ram")
    with pytest.raises(MigrationError):
        o.set_capabilities(caps(return_path=True) + [{"capability": "nope", "state": True}])
    assert not o.cap("return-path")


def test_capability_conflicts(monkeypatch):
    # postcopy-preempt is supported and needs postcopy-ram
    O.MigrationOptions().set_capabilities(caps(postcopy_ram=True, postcopy_preempt=True))
    with pytest.raises(MigrationError, match="Postcopy preempt requires postcopy-ram"):
        O.MigrationOptions().set_capabilities(caps(postcopy_preempt=True))
    # switchover-ack is not implemented; with it supported, its dependency rule applies
    monkeypatch.setattr(O, "SUPPORTED_CAPABILITIES", O.SUPPORTED_CAPABILITIES | {"postcopy-preempt", "switchover-ack"})
    o = O.MigrationOptions()
    with pytest.raises(MigrationError, match="Postcopy preempt requires postcopy-ram"):
        o.set_capabilities(caps(postcopy_preempt=True))
    with pytest.raises(MigrationError, match="'switchover-ack' requires capability 'return-path'"):
        o.set_capabilities(caps(switchover_ack=True))
    o.set_capabilities(caps(postcopy_preempt=True, postcopy_ram=True, switchover_ack=True, return_path=True))
    # the check applies to the resulting set, so turning the base off later is refused too
    with pytest.raises(MigrationError, match="Postcopy preempt requires postcopy-ram"):
        o.set_capabilities(caps(postcopy_ram=False))
    with pytest.raises(MigrationError, match="requires capability 'return-path'"):
        o.set_capabilities(caps(return_path=False))
    assert o.cap("postcopy-ram") and o.cap("return-path")
    o.set_capabilities(caps(postcopy_preempt=False, postcopy_ram=False))


# ================================================================== parameters


def test_parameter_defaults():
    o = O.MigrationOptions()
    q = o.query_parameters()
    assert q == {k: v[0] for k, v in O.PARAMETERS.items()}
    assert q["max-bandwidth"] == 128 << 20 and q["downtime-limit"] == 300
    assert q["zero-page-detection"] == "multifd" and q["multifd-channels"] == 2
    q["downtime-limit"] = 1  # a copy
    assert o.param("downtime-limit") == 300


INT_PARAMS = [(k, lo, hi) for k, (_, kind, lo, hi) in O.PARAMETERS.items() if kind == "int"]


@pytest.mark.parametrize("name,lo,hi", INT_PARAMS, ids=[p[0] for p in INT_PARAMS])
def test_int_parameter_ranges(name, lo, hi):
    o = O.MigrationOptions()
    o.set_parameters({name: lo})
    assert o.param(name) == lo
    with pytest.raises(MigrationError, match=f"Parameter '{name}' expects a value in range"):
        o.set_parameters({name: lo - 1})
    if hi is not None:
        o.set_parameters({name: hi})
        assert o.param(name) == hi
        with pytest.raises(MigrationError, match=f"expects a value in range {lo}..{hi}"):
            o.set_parameters({name: hi + 1})
    else:
        o.set_parameters({name: 1 << 62})
    for bad in (True, "1", 1.0, None, [1]):
        with pytest.raises(MigrationError, match=f"Invalid parameter type for '{name}', expected: integer"):
            o.set_parameters({name: bad})


def test_specific_ranges_match_qemu():
    spec = {k: (lo, hi) for k, lo, hi in INT_PARAMS}
    assert spec["downtime-limit"] == (0, 2000000)
    assert spec["throttle-trigger-threshold"] == (1, 100)
    assert spec["cpu-throttle-initial"] == (1, 99) and spec["max-cpu-throttle"] == (1, 99)
    assert spec["multifd-channels"] == (1, 255)


def test_bool_and_string_parameters():
    o = O.MigrationOptions()
    o.set_parameters({"cpu-throttle-tailslow": True})
    assert o.param("cpu-throttle-tailslow") is True
    for bad in (1, "true", None):
        with pytest.raises(MigrationError, match="'cpu-throttle-tailslow', expected: boolean"):
            o.set_parameters({"cpu-throttle-tailslow": bad})
    for v in ("none", "legacy", "multifd"):
        o.set_parameters({"zero-page-detection": v})
        assert o.param("zero-page-detection") == v
    with pytest.raises(MigrationError, match="'zero-page-detection' does not accept value 'zero'"):
        o.set_parameters({"zero-page-detection": "zero"})
    with pytest.raises(MigrationError, match="'multifd-compression' does not accept value 'zstd'"):
        o.set_parameters({"multifd-compression": "zstd"})
    with pytest.raises(MigrationError, match="expected: StrOrNull"):
        o.set_parameters({"tls-hostname": 5})
    with pytest.raises(MigrationError, match="'tls-authz' is not supported"):
        o.set_parameters({"tls-authz": "authz0"})
    o.set_parameters({"tls-creds": "tls0", "tls-hostname": "dst.example", "tls-authz": ""})
    assert (o.param("tls-creds"), o.param("tls-hostname")) == ("tls0", "dst.example")
    o.set_parameters({"tls-creds": None, "tls-hostname": None})  # QEMU's StrOrNull: null unsets
    assert o.query_parameters()["tls-creds"] == o.query_parameters()["tls-hostname"] == ""
    with pytest.raises(MigrationError, match="expected: StrOrNull"):
        o.set_parameters({"tls-creds": 1})


@pytest.mark.parametrize("name", ["max_bandwidth", "compress-level", "mode", "", "x-vcpu-dirty-limit-period"])
def test_unknown_parameter(name):
    with pytest.raises(MigrationError, match=f"Parameter '{name}' is unexpected"):
        O.MigrationOptions().set_parameters({name: 1})


def test_parameters_are_atomic():
    o = O.MigrationOptions()
    with pytest.raises(MigrationError):
        o.set_parameters({"downtime-limit": 10, "max-bandwidth": -1})
    assert o.param("downtime-limit") == 300
    with pytest.raises(MigrationError):
        o.set_parameters({"max-bandwidth": 5, "bogus": 1})
    assert o.param("max-bandwidth") == 128 << 20
    o.set_parameters({"downtime-limit": 10, "max-bandwidth": 5})
    assert (o.param("downtime-limit"), o.param("max-bandwidth")) == (10, 5)


# ================================================================== state table

ALL = list(S.TRANSITIONS)


def reach(target: str) -> S.MigrationState:
    """A MigrationState driven to `target` through legal moves only (BFS from none)."""
    prev = {S.NONE: None}
    q = deque([S.NONE])
    while q:
        cur = q.popleft()
        for nxt in sorted(S.TRANSITIONS[cur]):
            if nxt not in prev:
                prev[nxt] = cur
                q.append(nxt)
    assert target in prev, f"{target} unreachable"
    path = [target]
    while prev[path[-1]] is not None:
        path.append(prev[path[-1]])
    m = S.MigrationState()
    for a, b in zip(reversed(path), list(reversed(path))[1:]):
        assert m.set(a, b)
    assert m.status == target
    return m


def test_table_is_closed_and_groups_are_consistent():
    names = {S.NONE, S.SETUP, S.CANCELLING, S.CANCELLED, S.ACTIVE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE,
             S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER, S.COMPLETED, S.FAILED,
             S.PRE_SWITCHOVER, S.DEVICE}
    assert set(S.TRANSITIONS) == names
    for src, dsts in S.TRANSITIONS.items():
        assert dsts <= names and src not in dsts
    for f in S.FINISHED:
        assert S.TRANSITIONS[f] == set()
    assert S.IN_POSTCOPY <= S.RUNNING
    assert not (S.RUNNING & S.FINISHED) and S.NONE not in S.RUNNING
    assert S.RUNNING | S.FINISHED | {S.NONE} == names
    # every running state can end: a path to a finished state exists
    for s in S.RUNNING:
        seen, todo = {s}, [s]
        while todo:
            for n in S.TRANSITIONS[todo.pop()]:
                if n not in seen:
                    seen.add(n)
                    todo.append(n)
        assert seen & S.FINISHED, s


@pytest.mark.parametrize("old,new", list(itertools.product(ALL, ALL)))
def test_every_move(old, new):
    m = reach(old)
    seen = []
    m._on_change = seen.append
    if new in S.TRANSITIONS[old]:
        assert m.set(old, new) is True
        assert m.status == new and seen == [new]
    else:
        with pytest.raises(AssertionError, match=f"illegal migration transition {old} -> {new}"):
            m.set(old, new)
        assert m.status == old and seen == []


# Transitions PROTOCOL.md §7 describes (sources and destinations; colo and wait-unplug aside).
SPEC_LEGAL = [
    (S.NONE, S.SETUP), (S.SETUP, S.ACTIVE), (S.SETUP, S.FAILED), (S.SETUP, S.CANCELLING),
    (S.CANCELLING, S.CANCELLED), (S.ACTIVE, S.DEVICE), (S.ACTIVE, S.PRE_SWITCHOVER), (S.PRE_SWITCHOVER, S.DEVICE),
    (S.DEVICE, S.COMPLETED), (S.DEVICE, S.POSTCOPY_DEVICE), (S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE),
    (S.DEVICE, S.POSTCOPY_ACTIVE), (S.POSTCOPY_ACTIVE, S.COMPLETED), (S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED),
    (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP), (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER),
    (S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED), (S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE),
    (S.POSTCOPY_RECOVER, S.POSTCOPY_PAUSED), (S.POSTCOPY_DEVICE, S.FAILED),
    (S.ACTIVE, S.CANCELLING), (S.PRE_SWITCHOVER, S.CANCELLING), (S.DEVICE, S.CANCELLING),
    # destination
    (S.ACTIVE, S.COMPLETED), (S.ACTIVE, S.FAILED), (S.ACTIVE, S.POSTCOPY_DEVICE), (S.ACTIVE, S.POSTCOPY_ACTIVE),
    (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER),
]
SPEC_ILLEGAL = [
    (S.NONE, S.ACTIVE), (S.ACTIVE, S.SETUP), (S.COMPLETED, S.SETUP), (S.FAILED, S.ACTIVE), (S.CANCELLED, S.NONE),
    # migrate_cancel is refused in every postcopy state
    (S.POSTCOPY_DEVICE, S.CANCELLING), (S.POSTCOPY_ACTIVE, S.CANCELLING), (S.POSTCOPY_PAUSED, S.CANCELLING),
    (S.POSTCOPY_RECOVER, S.CANCELLING), (S.POSTCOPY_RECOVER_SETUP, S.CANCELLING),
    (S.POSTCOPY_ACTIVE, S.ACTIVE), (S.POSTCOPY_PAUSED, S.POSTCOPY_ACTIVE),
]


def test_cancel_that_loses_the_race_with_shut_completes():
    # livemig's one addition to QEMU's table: a cancel issued just before the destination's SHUT(0)
    # must not restart the source guest (it runs on the destination), so cancelling -> completed
    assert S.COMPLETED in S.TRANSITIONS[S.CANCELLING]


def test_spec_transitions():
    for a, b in SPEC_LEGAL:
        assert b in S.TRANSITIONS[a], f"{a} -> {b} should be legal"
    for a, b in SPEC_ILLEGAL:
        assert b not in S.TRANSITIONS[a], f"{a} -> {b} should be illegal"


def test_compare_and_set():
    changes = []
    m = S.MigrationState(on_change=changes.append)
    assert m.status == S.NONE
    assert m.set(S.ACTIVE, S.COMPLETED) is False  # not in `old`: no change, no error
    assert m.set(S.NONE, S.SETUP)
    assert m.set({S.ACTIVE, S.SETUP}, S.ACTIVE)
    assert m.set({S.SETUP, S.DEVICE}, S.FAILED) is False
    assert changes == [S.SETUP, S.ACTIVE] and m.status == S.ACTIVE


def test_changes_are_announced_in_the_order_they_happen():
    """A change made while the listener still announces the one before it waits for it: a client
    never sees 'cancelling' after 'cancelled'."""
    heard = []
    first_heard = threading.Event()
    m = S.MigrationState()

    def slow_listener(status: str) -> None:
        if status == S.CANCELLING:
            first_heard.set()
            time.sleep(0.2)  # the QMP thread is slow to send its event
        heard.append(status)

    m._on_change = slow_listener
    reach_into(m, S.ACTIVE)
    t = threading.Thread(target=m.set, args=(S.ACTIVE, S.CANCELLING))
    t.start()
    first_heard.wait(5)
    assert m.set(S.CANCELLING, S.CANCELLED)  # the migration thread, meanwhile
    t.join()
    assert heard[-2:] == [S.CANCELLING, S.CANCELLED]


def reach_into(m: S.MigrationState, status: str) -> None:
    for a, b in ((S.NONE, S.SETUP), (S.SETUP, S.ACTIVE)):
        if m.status == status:
            return
        m.set(a, b)


def test_wait_for():
    m = reach(S.ACTIVE)
    t0 = time.monotonic()
    assert m.wait_for({S.COMPLETED}, timeout=0.05) == S.ACTIVE
    assert time.monotonic() - t0 >= 0.04
    assert m.wait_for({S.ACTIVE, S.FAILED}) == S.ACTIVE  # already there: no wait

    def later():
        time.sleep(0.05)
        m.set(S.ACTIVE, S.DEVICE)
        time.sleep(0.05)
        m.set(S.DEVICE, S.COMPLETED)

    th = threading.Thread(target=later)
    th.start()
    try:
        assert m.wait_for(S.FINISHED, timeout=10) == S.COMPLETED
    finally:
        th.join()


# ================================================================== transport.parse_uri


@pytest.mark.parametrize("uri,expected", [
    ("tcp:127.0.0.1:4444", URI("tcp", host="127.0.0.1", port=4444)),
    ("tcp:localhost:0", URI("tcp", host="localhost", port=0)),
    ("tcp:0.0.0.0:65535", URI("tcp", host="0.0.0.0", port=65535)),
    ("tcp:[::1]:4444", URI("tcp", host="::1", port=4444)),
    ("tcp:[fe80::1%eth0]:1", URI("tcp", host="fe80::1%eth0", port=1)),
    ("unix:/tmp/mig.sock", URI("unix", path="/tmp/mig.sock")),
    ("unix:rel/sock:with:colons", URI("unix", path="rel/sock:with:colons")),
    ("fd:0", URI("fd", fd=0)),
    ("fd:42", URI("fd", fd=42)),
    ("file:/tmp/x", URI("file", path="/tmp/x")),
    ("file:/tmp/x,offset=4096", URI("file", path="/tmp/x", offset=4096)),
])
def test_parse_good_uris(uri, expected):
    got = parse_uri(uri)
    assert got == expected
    assert parse_uri(str(got)) == got
    if "]" in uri or "offset" in uri:
        assert str(got) == uri  # brackets around IPv6 hosts and the file offset survive str()


@pytest.mark.parametrize("uri", [
    "", "tcp", "127.0.0.1:4444x", "tcp:", "tcp:host", "tcp:host:", "tcp::", "tcp:[]:1", "tcp:host:65536",
    "tcp:host:99999", "tcp:host:-1", "tcp:host:0x10", "tcp:host:port", "tcp:host: 1", "tcp:h:\u00b2", "tcp:h:\u0664",
    "tcp:h:" + "1" * 5000, "unix:", "fd:", "fd:-1", "fd:abc", "fd:1.5", "fd:\u00b2", "file:", "file:,offset=1",
    "file:/x,offset=", "file:/x,offset=abc", "file:/x,offset=-1", "file:/x,foo=1", "file:/x,offset=\u00b2",
    "exec:cat", "rdma:host:1", "vsock:1:2", "TCP:127.0.0.1:1", None, 4444, b"tcp:h:1",
])
def test_parse_bad_uris(uri):
    with pytest.raises(TransportError):
        parse_uri(uri)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=40),
                 st.tuples(st.sampled_from(["tcp:", "unix:", "fd:", "file:", "tcp:h:", "file:/x,offset="]),
                           st.text(max_size=30)).map("".join)))
def test_parse_uri_only_raises_transport_error(uri):
    try:
        u = parse_uri(uri)
    except TransportError as e:
        assert str(e)
        return
    assert u.scheme in ("tcp", "unix", "fd", "file")
    if u.scheme == "tcp":
        assert 0 <= u.port <= 65535 and u.host


# ================================================================== ramblock bitmaps


def test_unpack_bitmap_bit_order():
    words = np.array([1 | (1 << 63), 2], dtype=np.uint64)
    bits = unpack_bitmap(words, 128)
    assert bits.dtype == np.bool_ and bits.shape == (128,)
    assert np.flatnonzero(bits).tolist() == [0, 63, 65]
    assert np.flatnonzero(unpack_bitmap(words, 64)).tolist() == [0, 63]
    assert unpack_bitmap(words[:0], 0).shape == (0,)


def test_pack_bitmap_layout():
    bits = np.zeros(70, dtype=bool)
    bits[[0, 9, 69]] = True
    raw = pack_bitmap(bits)
    assert len(raw) == 16  # ceil(70 / 8) = 9 bytes, padded to 16
    assert raw[0] == 0x01 and raw[1] == 0x02 and raw[8] == 0x20 and raw[9:] == bytes(7)
    assert pack_bitmap(np.zeros(0, dtype=bool)) == b""
    assert pack_bitmap(np.ones(64, dtype=bool)) == b"\xff" * 8
    assert len(pack_bitmap(np.ones(65, dtype=bool))) == 16


def naive_runs(bits):
    out, start = [], None
    for i, b in enumerate(list(bits) + [False]):
        if b and start is None:
            start = i
        elif not b and start is not None:
            out.append((start, i - start))
            start = None
    return out


@settings(max_examples=200, deadline=None)
@given(st.lists(st.booleans(), max_size=300))
def test_bitmap_round_trips_and_runs(bits):
    arr = np.array(bits, dtype=bool)
    raw = pack_bitmap(arr)
    assert len(raw) % 8 == 0 and len(raw) == (len(bits) + 63) // 64 * 8
    words = np.frombuffer(raw, dtype="<u8").astype(np.uint64)
    assert unpack_bitmap(words, len(bits)).tolist() == bits
    assert runs(arr) == naive_runs(bits)
    assert all(isinstance(x, int) for r in runs(arr) for x in r)


def test_runs_edges():
    assert runs(np.zeros(0, dtype=bool)) == []
    assert runs(np.zeros(5, dtype=bool)) == []
    assert runs(np.ones(5, dtype=bool)) == [(0, 5)]
    assert runs(np.array([1, 0, 1, 1, 0, 1], dtype=bool)) == [(0, 1), (2, 2), (5, 1)]


# ================================================================== integrity checks


def test_check_invariant():
    ok, why = check_invariant(np.full(10, 7, dtype=np.uint8))
    assert ok and "all 10 pages equal (7)" in why
    ok, why = check_invariant(np.array([6, 6, 6, 5, 5], dtype=np.uint8))
    assert ok and "pass in progress at page 3" in why
    ok, _ = check_invariant(np.array([0, 0, 255, 255], dtype=np.uint8))  # wraps mod 256
    assert ok
    assert check_invariant(np.array([], dtype=np.uint8))[0] and check_invariant(np.array([3], dtype=np.uint8))[0]
    ok, why = check_invariant(np.array([5, 5, 7, 7], dtype=np.uint8))
    assert not ok and "page 2 has first byte 7 after 5" in why
    ok, why = check_invariant(np.array([4, 5, 5], dtype=np.uint8))  # a page ahead of the previous one
    assert not ok and "page 1" in why
    ok, why = check_invariant(np.array([6, 5, 5, 4], dtype=np.uint8))
    assert not ok and "2 places" in why and "pages 1, 3" in why


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 200), st.integers(0, 255), st.data())
def test_check_invariant_holds_for_any_interrupted_pass(n, v, data):
    cut = data.draw(st.integers(0, n))
    a = np.full(n, v, dtype=np.uint8)
    a[:cut] += 1  # the pass reached page `cut`
    assert check_invariant(a)[0]
    i = data.draw(st.integers(0, n - 1))
    a[i] = (int(a[i]) + data.draw(st.integers(2, 254))) % 256  # corrupt one page: never consistent any more
    assert not check_invariant(a)[0]


def test_compare():
    src = np.arange(8, dtype=np.uint8)
    ok, why = compare(src, src + 3)
    assert ok and "every page advanced by 3" in why
    ok, why = compare(src, src[:4])
    assert not ok and "dump sizes differ" in why
    d = np.array([1, 1, 2, 2, 2, 1, 1, 1], dtype=np.uint8)
    assert compare(src, src + d)[0]
    d = np.array([2, 1, 1, 1, 1, 1, 2, 2], dtype=np.uint8)  # cyclic run
    assert compare(src, src + d)[0]
    d = np.array([255, 0, 0, 255], dtype=np.uint8)  # n = 255, n + 1 = 0 (mod 256)
    assert compare(src[:4], src[:4] + d)[0]
    ok, why = compare(src, src + np.array([1, 2, 1, 2, 1, 1, 1, 1], dtype=np.uint8))
    assert not ok and "not in contiguous runs" in why
    ok, why = compare(src, src + np.array([1, 3, 3, 1, 1, 1, 1, 1], dtype=np.uint8))
    assert not ok and "not one pass apart" in why
    ok, why = compare(src, src + np.array([1, 2, 3, 1, 1, 1, 1, 1], dtype=np.uint8))
    assert not ok and "3 different page deltas" in why


def test_compare_empty_dumps():
    ok, why = compare(np.zeros(0, dtype=np.uint8), np.zeros(0, dtype=np.uint8))
    assert not ok and "nothing" in why


def test_make_image():
    img = image.make_image(64, prefill=True)
    assert len(img) == image.SECTOR_SIZE and img[510:] == b"\x55\xaa"
    assert struct.unpack_from("<I", img, image.WS_MIB_OFFSET)[0] == 64
    assert struct.unpack_from("<I", img, image.PREFILL_OFFSET)[0] == 1
    base = image.make_image()
    assert struct.unpack_from("<II", base, image.WS_MIB_OFFSET) == (0, 0)
    for bad in (-1, 1 << 32):
        with pytest.raises(ValueError):
            image.make_image(bad)
    assert image.passes_from_output(b"boot#...\n.") == 5 and image.passes_from_output(b"boot") == -1
