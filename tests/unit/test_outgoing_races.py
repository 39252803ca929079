"""The source's migration thread against a destination that misbehaves or a cancel that lands at
an awkward moment. The source is the real Outgoing over real loopback sockets (or a real file);
only the VM is a stand-in: anonymous RAM plus a dirty log the test scripts, with hooks at the
points where the real machine would be called (device state, dirty-log stop)."""
from __future__ import annotations

import mmap
import socket
import struct
import threading
import time

import numpy as np
import pytest

from livemig import state as S
from livemig.options import MigrationOptions
from livemig.outgoing import Outgoing
from livemig.ram_send import RamSender
from livemig.transport import parse_uri
from livemig.wire import returnpath as RP

MIB = 16


class StandInVM:
    """RAM and the calls Outgoing makes on a machine; `dirty` pages stay dirty at every sync."""

    def __init__(self, dirty: tuple[int, ...] = ()):
        self.memory_size = MIB << 20
        self.ram = mmap.mmap(-1, self.memory_size)
        np.frombuffer(self.ram, dtype=np.uint8)[:] = 7
        self.page_size = 4096
        self.running = True
        self.events: list[str] = []
        self.words = np.zeros((self.memory_size // 4096 + 63) // 64, dtype="<u8")
        for p in dirty:
            self.words[p // 64] |= np.uint64(1 << (p % 64))
        self.on_devices = lambda: None
        self.on_dirty_log_stop = lambda: None

    def dirty_log_start(self) -> None:
        pass

    def dirty_log_stop(self) -> None:
        self.on_dirty_log_stop()

    def dirty_log_sync(self, clear: bool = True) -> np.ndarray:
        return self.words.copy()

    def pause(self) -> None:
        self.running = False
        self.events.append("pause")

    def resume(self) -> None:
        self.running = True
        self.events.append("resume")

    def devices(self) -> list:
        self.on_devices()
        return []


def outgoing(vm: StandInVM, uri: str, caps=(), **params) -> Outgoing:
    opts = MigrationOptions()
    opts.set_capabilities([{"capability": c, "state": True} for c in caps])
    if params:
        opts.set_parameters(params)
    return Outgoing(vm, opts, parse_uri(uri), lambda event, data=None: None)


class FakeDestination:
    """A listening socket whose one connection runs `serve(conn)`, then is drained to EOF."""

    def __init__(self, serve=lambda conn: None):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.uri = f"tcp:127.0.0.1:{self.srv.getsockname()[1]}"
        self.conn: socket.socket | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._run, args=(serve,), daemon=True).start()

    def _run(self, serve) -> None:
        self.conn, _ = self.srv.accept()
        self.ready.set()
        serve(self.conn)
        try:
            while self.conn.recv(1 << 20):
                pass
        except OSError:
            pass


@pytest.mark.parametrize("postcopy", [False, True])
def test_shut0_before_the_end_of_the_stream_fails_and_keeps_the_guest(postcopy):
    """SHUT(0) says 'loaded, running': before the EOF went out it is bad input, not success."""
    dst = FakeDestination(lambda conn: conn.sendall(RP.shut(0)))
    vm = StandInVM()
    out = outgoing(vm, dst.uri, caps=("postcopy-ram",) if postcopy else ())
    out.start()
    if postcopy:
        out.start_postcopy()
    out.thread.join(20)
    assert not out.thread.is_alive()
    assert out.state.status == S.FAILED, out.state.status
    assert "SHUT(0)" in out.error and "before the end of the stream" in out.error, out.error
    assert vm.running


def test_cancel_in_the_device_phase_of_a_file_migration(tmp_path):
    """A file has no shutdown that would stop the sends: the cancel must still be honoured."""
    vm = StandInVM()
    out = outgoing(vm, f"file:{tmp_path}/mig.bin")
    seen = {}

    def cancel_once():
        if out.state.status == S.DEVICE and not seen:
            seen["status"] = "cancel"
            out.cancel()

    vm.on_devices = cancel_once
    out.start()
    out.thread.join(30)
    assert seen and out.state.status == S.CANCELLED, out.state.status
    assert vm.running and vm.events == ["pause", "resume"]


def test_bad_message_after_the_package_loaded_keeps_the_source_paused():
    """PONG(0x42) proves the destination loaded the package and runs the guest: a failure after it
    (here a bad return-path message while the source still stops dirty logging) must not resume
    the source's copy as well."""
    dst = FakeDestination()
    vm = StandInVM(dirty=(0,))
    out = outgoing(vm, dst.uri, caps=("postcopy-ram",), **{"downtime-limit": 0})

    def confirm_then_garble():
        if out.in_postcopy:
            dst.conn.sendall(RP.pong(0x42) + struct.pack(">HH", 99, 0))
            deadline = time.monotonic() + 5
            while not (out.package_loaded.is_set() and out.rp_error) and time.monotonic() < deadline:
                time.sleep(0.001)

    vm.on_dirty_log_stop = confirm_then_garble
    out.start()
    time.sleep(0.2)
    out.start_postcopy()
    out.thread.join(20)
    assert out.package_loaded.is_set()
    assert out.state.status == S.FAILED and "unknown message type 99" in out.error, out.error
    assert out.guest_moved and not vm.running and "resume" not in vm.events


def test_cancel_racing_a_failure_ends_cancelled():
    """migrate_cancel landing while the thread records a failure: the migration must end (cancelled),
    not stay in 'cancelling' and block every later migrate."""
    dst = FakeDestination(lambda conn: (time.sleep(0.3), conn.close()))

    class CancelWhileFailing(Outgoing):
        _err = None

        @property
        def error(self):
            return self._err

        @error.setter
        def error(self, value):
            if value is not None and threading.current_thread() is self.thread:
                t = threading.Thread(target=self.cancel)
                t.start()
                t.join()
            self._err = value

    vm = StandInVM()
    opts = MigrationOptions()
    opts.set_parameters({"max-bandwidth": 1_000_000})
    out = CancelWhileFailing(vm, opts, parse_uri(dst.uri), lambda event, data=None: None)
    out.start()
    out.thread.join(20)
    assert not out.thread.is_alive() and out.state.status == S.CANCELLED, out.state.status
    assert vm.running


def test_requests_taking_the_last_pages_end_the_push_cleanly(monkeypatch):
    """A page request may claim the last dirty pages between the push's check and its next batch."""
    dst = FakeDestination()
    vm = StandInVM(dirty=(0,))
    out = outgoing(vm, dst.uri, caps=("postcopy-ram",), **{"downtime-limit": 0})
    plain = RamSender.next_batch

    def raced(self, maxn=256):
        if out.in_postcopy and self.ndirty:
            t = threading.Thread(target=self.take, args=(0, self.block.npages))  # as the return path would
            t.start()
            t.join()
        return plain(self, maxn)

    monkeypatch.setattr(RamSender, "next_batch", raced)
    out.start()
    time.sleep(0.2)
    out.start_postcopy()
    deadline = time.monotonic() + 10
    while out.state.status != S.POSTCOPY_DEVICE and out.thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)  # the push runs dry (this destination never sends the PONG that ends it)
    assert out.error is None and out.state.status == S.POSTCOPY_DEVICE, (out.state.status, out.error)
    dst.conn.sendall(RP.pong(0x42))  # the package is loaded
    while not out.eof_sent and out.thread.is_alive() and time.monotonic() < deadline + 10:
        time.sleep(0.01)
    dst.conn.sendall(RP.shut(0))  # after the EOF: done
    out.thread.join(20)
    assert out.state.status == S.COMPLETED, (out.state.status, out.error)


class _CancelOnEntry:
    """The switch lock, with a migrate_cancel landing (from another thread) just before the
    migration thread takes it once the whole stream is queued."""

    def __init__(self, out: Outgoing):
        self.out, self.lock, self.fired = out, threading.Lock(), False
        self.armed = lambda: out.eof_sent  # precopy: the stream's end is queued

    def __enter__(self):
        out = self.out
        if not self.fired and threading.current_thread() is out.thread and self.armed():
            self.fired = True
            t = threading.Thread(target=out.cancel)
            t.start()
            t.join()
        self.lock.acquire()

    def __exit__(self, *exc):
        self.lock.release()


def test_a_cancel_after_the_whole_stream_is_queued_does_not_run_the_guest_twice():
    """migrate_cancel between the last flush and the hand-over: the destination has the whole
    stream and starts the guest, so the cancel must lose (completed on SHUT(0)), never end
    'cancelled' with the source's copy resumed as well."""
    def serve(conn: socket.socket) -> None:
        while conn.recv(1 << 20):  # the whole stream, then the source's FIN (its cancel)
            pass
        conn.sendall(RP.shut(0))

    dst = FakeDestination(serve)
    vm = StandInVM()
    out = outgoing(vm, dst.uri)
    out.switch_lock = _CancelOnEntry(out)
    out.start()
    out.thread.join(20)
    assert out.switch_lock.fired and not out.thread.is_alive()
    assert out.state.status == S.COMPLETED, (out.state.status, out.error)
    assert not vm.running and vm.events == ["pause"]


def test_a_cancel_after_the_postcopy_package_is_queued_does_not_resume_the_source():
    """The same race at the switch to postcopy: once the package is queued whole the destination
    may run the guest, so the cancel loses (postcopy goes on, refusing cancels from then on) and
    the source's copy stays paused."""
    dst = FakeDestination()
    vm = StandInVM(dirty=(0,))
    out = outgoing(vm, dst.uri, caps=("postcopy-ram",), **{"downtime-limit": 0})
    lock = out.switch_lock = _CancelOnEntry(out)
    lock.armed = lambda: out.in_postcopy
    out.start()
    time.sleep(0.2)
    out.start_postcopy()
    deadline = time.monotonic() + 10
    while out.state.status not in S.IN_POSTCOPY | S.FINISHED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert lock.fired and out.state.status in S.IN_POSTCOPY, out.state.status
    time.sleep(0.3)  # the source's cancel shut its sends down: postcopy pauses, never cancels
    assert out.state.status != S.CANCELLED and "resume" not in vm.events and not vm.running
    with pytest.raises(Exception, match="Postcopy migration in progress"):
        out.cancel()


def test_precopy_eta_with_a_zero_downtime_limit_is_endless_not_an_error():
    """downtime-limit 0 with a switchover budget: nothing ever fits, so precopy never ends (the
    policy switches to postcopy); the estimate must say so, not fail the migration."""
    import math
    from types import SimpleNamespace
    out = outgoing(StandInVM(), "tcp:127.0.0.1:1", **{"downtime-limit": 0})
    out.sender = SimpleNamespace(ndirty=50)
    out.last_pass = (1.0, 100 * 4096, 10)  # the link sends 100 pages a second, the guest dirties 10
    assert out._precopy_eta() == math.inf
    out.opts.set_parameters({"downtime-limit": 300})
    assert 0 < out._precopy_eta() < math.inf


@pytest.mark.parametrize("limit", [20_000_000, 80_000_000])
def test_max_bandwidth_holds_across_rate_windows(tmp_path, limit):
    """max-bandwidth: what a window's last batch sends beyond its quota counts against the next
    window, and a spent window is waited out before a new one starts (16 MiB of data pages)."""
    vm = StandInVM()
    out = outgoing(vm, f"file:{tmp_path}/mig.bin", **{"max-bandwidth": limit})
    t0 = time.monotonic()
    out.start()
    out.thread.join(30)
    rate = (tmp_path / "mig.bin").stat().st_size / (time.monotonic() - t0)
    assert out.state.status == S.COMPLETED
    assert 0.6 * limit < rate < 1.12 * limit, f"{rate / 1e6:.1f} MB/s against a limit of {limit / 1e6:.0f}"
