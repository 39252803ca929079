"""The destination's loader (the real Incoming, on a real unix socket, with real userfaultfd in
postcopy) against streams a misbehaving source could send. Only the VM is a stand-in: guest RAM
in an mmap and no devices, so each test can read guest memory and the state the loader reached."""
from __future__ import annotations

import ctypes
import mmap
import socket
import time

import numpy as np
import pytest

from livemig import state as S
from livemig.incoming import Incoming
from livemig.options import MigrationOptions
from livemig.transport import parse_uri
from livemig.uffd import probe
from livemig.wire import ram as WR
from livemig.wire import stream as WS

MEM = 4 << 20
needs_uffd = pytest.mark.skipif(not probe()[0], reason=f"userfaultfd unavailable: {probe()[2]}")


class StandInVM:
    """Guest RAM (anonymous memory) and the calls Incoming makes on a machine; no devices."""

    def __init__(self, page_size: int = 4096):
        self.memory_size = MEM
        self.page_size = page_size
        self.ram_fd = None
        self.ram = mmap.mmap(-1, MEM)
        c = ctypes.c_char.from_buffer(self.ram)
        self.ram_host_addr = ctypes.addressof(c)
        del c
        self.ram_alias_addr = 0
        self.started = 0

    def devices(self) -> list:
        return []

    def take_ram_alias(self):
        return None

    def vcpu_thread_ids(self) -> list[int]:
        return []

    def pause(self) -> None:
        pass


@pytest.fixture
def dest(tmp_path):
    made = []

    def make(caps=(), page_size=4096):
        opts = MigrationOptions()
        opts.set_capabilities([{"capability": c, "state": True} for c in caps])
        vm = StandInVM(page_size)
        path = tmp_path / f"mig{len(made)}.sock"
        inc = Incoming(vm, opts, parse_uri(f"unix:{path}"), lambda event, data=None: None, exit_on_error=False,
                       on_started=lambda: setattr(vm, "started", vm.started + 1))
        inc.start()
        src = socket.socket(socket.AF_UNIX)
        src.connect(str(path))
        made.append((inc, src))
        return inc, vm, src

    yield make
    for inc, src in made:
        src.close()
        inc.thread.join(10)


def wait_for(inc: Incoming, states: set[str], timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while inc.state.status not in states and time.monotonic() < deadline:
        time.sleep(0.01)
    return inc.state.status


def ram_setup(page_size: int = 4096) -> bytes:
    huge = page_size if page_size != 4096 else None  # announced with postcopy-ram, as the source does
    return (WS.section_header(WS.Section.START, 0, WR.IDSTR, WR.INSTANCE, WR.VERSION)
            + WR.setup_payload([WR.BlockInfo("pc.ram", MEM, huge)]) + WS.section_footer(0))


def part(records: bytes) -> bytes:
    return WS.section_header(WS.Section.PART, 0) + records + WR.eos() + WS.section_footer(0)


def postcopy_start(page_size: int = 4096) -> bytes:
    return (WS.file_header() + WS.configuration() + WS.command(WS.Cmd.OPEN_RETURN_PATH)
            + WS.postcopy_advise(page_size, 4096) + ram_setup(page_size))


def all_pages_as_zero() -> bytes:
    return part(WR.page_header(0, WR.FLAG_ZERO, "pc.ram") + b"\0"
                + WR.zero_records(np.arange(1, MEM // 4096, dtype=np.uint64) * 4096))


def test_a_run_of_records_is_consecutive_only_if_each_follows_the_one_before(dest):
    """Records for pages 0, 3, 5, 5 (first and last of the run 3..5 look like a run of three): page
    4 was never named and must stay as it was; page 5 gets its later copy."""
    inc, vm, src = dest()
    recs = WR.page_header(0, WR.FLAG_PAGE, "pc.ram") + b"\x01" * 4096
    for page, fill in ((3, 0x33), (5, 0x55), (5, 0x56)):
        recs += WR.page_header(page * 4096, WR.FLAG_PAGE, None) + bytes([fill]) * 4096
    src.sendall(WS.file_header() + WS.configuration() + ram_setup() + part(recs))
    deadline = time.monotonic() + 10
    while not inc.received[5] and time.monotonic() < deadline:
        time.sleep(0.01)
    ram = np.frombuffer(vm.ram, np.uint8).reshape(-1, 4096)
    assert ram[3, 0] == 0x33 and ram[5, 0] == 0x56 and (ram[5] == 0x56).all()
    assert not ram[4].any() and not inc.received[4]


@needs_uffd
def test_postcopy_run_twice_fails(dest):
    inc, vm, src = dest(("postcopy-ram",))
    src.sendall(postcopy_start() + all_pages_as_zero() + WS.command(WS.Cmd.POSTCOPY_LISTEN)
                + WS.command(WS.Cmd.POSTCOPY_RUN))
    assert wait_for(inc, {S.POSTCOPY_ACTIVE, S.FAILED}) == S.POSTCOPY_ACTIVE
    src.sendall(WS.command(WS.Cmd.POSTCOPY_RUN))
    assert wait_for(inc, {S.FAILED}) == S.FAILED
    assert "POSTCOPY_RUN twice" in inc.error and vm.started == 1


@needs_uffd
def test_postcopy_stream_ending_before_run_fails_without_shut0(dest):
    inc, vm, src = dest(("postcopy-ram",))
    src.sendall(postcopy_start() + all_pages_as_zero() + WS.command(WS.Cmd.POSTCOPY_LISTEN) + WS.eof())
    assert wait_for(inc, {S.COMPLETED, S.FAILED}) == S.FAILED
    assert "no POSTCOPY_RUN" in inc.error and vm.started == 0
    src.settimeout(5)
    answer = src.recv(100)
    assert answer.endswith(bytes([0, 1, 0, 4, 0, 0, 0, 1])), answer.hex()  # SHUT(1), not SHUT(0)


@needs_uffd
def test_postcopy_stream_ending_with_pages_never_sent_fails(dest):
    """Unregistered, pages never sent would read as zeros: the guest must not complete that way."""
    inc, vm, src = dest(("postcopy-ram",))
    one_page = part(WR.page_header(0, WR.FLAG_PAGE, "pc.ram") + b"\xab" * 4096)
    src.sendall(postcopy_start() + one_page + WS.command(WS.Cmd.POSTCOPY_LISTEN)
                + WS.command(WS.Cmd.POSTCOPY_RUN) + WS.eof())
    assert wait_for(inc, {S.COMPLETED, S.FAILED}) == S.FAILED
    assert f"{MEM // 4096 - 1} pages of guest RAM never sent" in inc.error


@needs_uffd
def test_postcopy_preempt_connection_never_opened_still_completes(dest):
    """The source may finish before it opens the preempt connection: that is no failure."""
    inc, vm, src = dest(("postcopy-ram", "postcopy-preempt"))
    src.sendall(postcopy_start() + all_pages_as_zero() + WS.command(WS.Cmd.POSTCOPY_LISTEN)
                + WS.command(WS.Cmd.POSTCOPY_RUN) + WS.eof())
    assert wait_for(inc, {S.COMPLETED, S.FAILED}) == S.COMPLETED, inc.error
    assert vm.started == 1


@needs_uffd
def test_discard_not_in_whole_huge_pages_fails(dest):
    """With 2 MiB host pages the kernel would round a partial range and keep the page, while the
    loader would count it as gone."""
    inc, vm, src = dest(("postcopy-ram",), page_size=2 << 20)
    src.sendall(postcopy_start(page_size=2 << 20)
                + WS.command(WS.Cmd.POSTCOPY_RAM_DISCARD, WS.ram_discard_prefix("pc.ram")
                             + (4096).to_bytes(8, "big") + (4096).to_bytes(8, "big")))
    assert wait_for(inc, {S.FAILED}) == S.FAILED
    assert "not in whole host pages" in inc.error, inc.error


def test_a_multifd_channel_that_stalls_in_its_init_packet_fails_the_migration(dest, monkeypatch):
    """A peer that sends multifd's magic and then nothing: the destination gives up after the
    channel timeout with a clear error, instead of waiting for the rest of the packet forever."""
    import livemig.incoming as incoming
    from livemig.wire import multifd as WM
    monkeypatch.setattr(incoming, "CHANNELS_TIMEOUT_S", 1.0)
    inc, vm, src = dest(caps=("multifd",))
    src.sendall(WS.file_header())
    stalled = socket.socket(socket.AF_UNIX)
    stalled.connect(inc.uri.path)
    stalled.sendall(WM.MAGIC.to_bytes(4, "big"))
    try:
        assert wait_for(inc, {S.FAILED}, timeout=10) == S.FAILED
        assert "less than" in (inc.error or ""), inc.error
    finally:
        stalled.close()


@needs_uffd
def test_a_device_state_that_fails_to_load_after_run_tells_the_source(dest, monkeypatch):
    """POSTCOPY_RUN, then a device refuses its state: the guest never started here, so the source
    must hear SHUT(1) (it fails and may run its guest again), not a bare cut that it would take
    for a link to recover."""
    from livemig.errors import GuestError
    from livemig.wire import returnpath as RP
    from livemig.wire.vmstate import Field, VMStateDescription, encode

    class Refuses:
        idstr, instance_id = "bad", 0
        vmsd = VMStateDescription("bad", 1, (Field("x", "uint8"),))

        def save(self) -> dict:
            return {"x": 0}

        def load(self, d: dict) -> None:
            raise GuestError("state refused")

    monkeypatch.setattr(StandInVM, "devices", lambda self: [Refuses()])
    inc, vm, src = dest(("postcopy-ram",))
    src.sendall(postcopy_start() + all_pages_as_zero() + WS.command(WS.Cmd.POSTCOPY_LISTEN)
                + WS.section_header(WS.Section.FULL, 1, "bad", 0, 1) + encode(Refuses.vmsd, {"x": 1})
                + WS.section_footer(1) + WS.command(WS.Cmd.POSTCOPY_RUN))
    assert wait_for(inc, {S.FAILED}) == S.FAILED and "state refused" in inc.error, inc.error
    src.settimeout(10)
    got = bytearray()
    while chunk := src.recv(4096):
        got += chunk
    dec = RP.RPDecoder()
    dec.feed(bytes(got))
    msgs = []
    while (m := dec.next_message()) is not None:
        msgs.append(m)
    assert RP.Shut(1) in msgs and vm.started == 0, msgs
