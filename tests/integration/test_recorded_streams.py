"""Hostile input from a recorded real stream: a real livemig VM saves itself (`migrate file:`),
then mutated copies (bit flips, overwritten length-sized words, truncations, inserted and
deleted bytes) go through the destination's decoder with the real device descriptions, and a few
through a real destination process. Only ProtocolError may come out; page offsets stay inside
guest RAM; a real destination fails with an error-desc and keeps answering."""
from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from livemig.errors import ProtocolError
from livemig.machine.vm import KvmMachine
from livemig.wire import decoder as D

MEM = 32 << 20


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from vmtools import VM
    tmp = tmp_path_factory.mktemp("rec")
    vm = VM(tmp, "src", memory="32M", ws_mib=2)
    try:
        vm.wait_passes(2)
        vm.cmd("migrate", uri=f"file:{tmp}/saved.mig")
        vm.wait_status({"completed"})
        data = (tmp / "saved.mig").read_bytes()
    finally:
        vm.close()
    m = KvmMachine(MEM)
    devices = {(d.idstr, d.instance_id): d.vmsd for d in m.devices()}
    m.close()
    return data, devices, tmp


def _decode(data: bytes, devices) -> list:
    dec = D.StreamDecoder([D.LocalBlock("pc.ram", MEM)], devices, buffer_size=1 << 20)
    events = []
    pos = 0
    while not dec.done:
        sp = dec.space()
        n = min(len(sp), len(data) - pos, 256 << 10)
        if n == 0:
            dec.finish()
            break
        sp[:n] = data[pos:pos + n]
        pos += n
        dec.commit(n)
        while (ev := dec.next_event()) is not None:
            if isinstance(ev, (D.Pages, D.ZeroPages)):
                assert int(ev.offsets.max()) + 4096 <= MEM
                events.append(type(ev).__name__)
            else:
                events.append(ev)
    return events


def test_recorded_stream_decodes(recorded):
    data, devices, _ = recorded
    events = _decode(data, devices)
    assert any(isinstance(e, D.DeviceState) for e in events) and isinstance(events[-1], D.VmDescription)


MUTATION = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 1 << 30), st.integers(0, 7)),
    st.tuples(st.just("word"), st.integers(0, 1 << 30), st.sampled_from([0, 0xFFFFFFFF, 0x7FFFFFFF, 0x1000])),
    st.tuples(st.just("cut"), st.integers(0, 1 << 30), st.just(0)),
    st.tuples(st.just("insert"), st.integers(0, 1 << 30), st.integers(0, 255)),
    st.tuples(st.just("delete"), st.integers(0, 1 << 30), st.integers(1, 16)),
)


def mutate(data: bytes, muts, head_bias: bool) -> bytes:
    buf = bytearray(data)
    for kind, where, arg in muts:
        if not buf:  # an earlier cut left nothing to mutate
            break
        # most structure lives in the first and last few KiB (header, setup, devices, vmdesc)
        span = min(len(buf), 8192) if head_bias else len(buf)
        pos = where % max(span, 1)
        if not head_bias and where % 2:
            pos = len(buf) - 1 - pos % min(len(buf), 16384)
        if kind == "flip":
            buf[pos] ^= 1 << arg
        elif kind == "word":
            buf[pos:pos + 4] = arg.to_bytes(4, "big")
        elif kind == "cut":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = bytes([arg])
        else:
            del buf[pos:pos + arg]
    return bytes(buf)


@settings(max_examples=60, deadline=timedelta(seconds=5), suppress_health_check=[HealthCheck.too_slow,
                                                                                 HealthCheck.function_scoped_fixture])
@given(st.lists(MUTATION, min_size=1, max_size=3), st.booleans())
def test_mutated_recordings_only_raise_protocol_errors(recorded, muts, head_bias):
    data, devices, _ = recorded
    try:
        _decode(mutate(data, muts, head_bias), devices)
    except ProtocolError:
        pass


@pytest.mark.parametrize("muts", [
    [("word", 17, 0xFFFFFFFF)],  # the configuration's name length
    [("flip", 120, 3)],  # in the RAM setup
    [("cut", 5000, 0)],
    [("delete", 3000, 5)],
])
def test_mutated_recording_real_destination(vms, recorded, muts):
    data, _, tmp = recorded
    path = tmp / f"bad{abs(hash(str(muts)))}.mig"
    path.write_bytes(mutate(data, muts, True))
    dst = vms("dst", memory="32M", incoming="defer")
    dst.cmd("migrate-incoming", **{"uri": f"file:{path}", "exit-on-error": False})
    info = dst.wait_status({"failed", "completed"}, timeout=30)
    assert info["status"] == "failed" and info["error-desc"], info
    assert dst.cmd("query-status")["status"] == "inmigrate"
