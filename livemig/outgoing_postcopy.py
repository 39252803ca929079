"""The source's postcopy (PROTOCOL.md §5.3, §5.7, §6.2): the switch (stop, discards, package),
the background push with page requests jumping the queue, and the postcopy-preempt connection
(served by the return-path threads or by an urgent process). A part of Outgoing, kept apart.
"""
from __future__ import annotations

import socket
import sys
import time
from typing import Any

import numpy as np

from . import state as S
from .errors import LinkLost, MigrationError, ProtocolError, TransportError
from .ramblock import TPS, run_bounds
from .ram_send import ITERATE_MAX_S, RAM_SECTION_ID, RATE_WINDOW_S, PageChannel, RamSender, Writer
from .threadname import NamedThread
from .transport import Channel, connect
from .urgent_src import UrgentSource
from .wire import ram as WR
from .wire import returnpath as RPW
from .wire import stream as WS

MAX_DISCARDS_PER_COMMAND = 12
POSTCOPY_BATCH_PAGES = 128  # background push granule in postcopy (requests wait at most one)
POSTCOPY_SOCKET_BUFFER = 2 << 20  # postcopy send queue: shorter waits, but too short starves the push


class PostcopySource:
    """Outgoing's postcopy methods (a mixin: they work on Outgoing's state)."""

    def _postcopy(self) -> None:
        m, w, sender = self.machine, self.writer, self.sender
        w.write(WS.section_header(WS.Section.PART, RAM_SECTION_ID) + self._multifd_sync() + WR.eos()
                + WS.section_footer(RAM_SECTION_ID))
        w.flush()
        if self.opts.cap("postcopy-preempt"):
            self._open_preempt()  # before the guest stops, as QEMU: a failure here costs nothing
        self.wakeup.clear()
        self._drain()
        with self._urgent():
            self._switch_to_postcopy(w, sender, m)
        after_package = True
        while True:
            try:
                if after_package:  # a failure from here pauses (the destination may run the guest)
                    after_package = False
                    self._after_package(w, m)
                self._postcopy_loop()
                self._finish_postcopy(self.writer)
                return
            except (LinkLost, TransportError, OSError) as e:
                # from postcopy-device on the destination may run the guest: never fail, pause
                if self.state.status not in (S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER) \
                        or isinstance(e, ProtocolError) or (self.rp_error and not self.rp_io):
                    raise  # bad input (the send error may only be the echo of it) fails
                self._pause(str(e))
                self._recover()

    def _switch_to_postcopy(self, w: Writer, sender: RamSender, m: Any) -> None:
        """Stop the guest, discard, send the package; ends in postcopy-device (cancel refused)."""
        self._check()  # a cancel that came first wins
        t_stop = self._stop_guest()
        marks = self.switchover_marks = {"pause": time.monotonic() - t_stop}
        self.stats.precopy_bytes = self._sent()
        w.write(WS.command(WS.Cmd.SWITCHOVER_START))
        self._sync(final=True)  # the guest is stopped: this is the last dirty information
        marks["sync"] = time.monotonic() - t_stop
        sender.canonicalize()
        # discard every page the destination must not keep: never sent, or dirtied since
        for name_ranges in self._discard_commands():
            w.write(name_ranges)
        sender.named = False  # the CONTINUE context restarts after the discards
        marks["discards"] = time.monotonic() - t_stop
        marks["pages"] = sender.ndirty
        marks["ranges"] = self.discard_ranges
        w.write(WS.ping(2))
        package = bytearray(WS.command(WS.Cmd.POSTCOPY_LISTEN))
        package += self._device_sections()
        package += WS.ping(3) + WS.ping(WS.PING_PACKAGED_LOADED) + WS.command(WS.Cmd.POSTCOPY_RUN)
        marks["devices"] = time.monotonic() - t_stop
        self.in_postcopy = True  # page requests are legal from the moment the package can arrive
        if self.urgent is not None:
            self.urgent.postcopy()
        w.write(WS.packaged(bytes(package)))
        w.flush()  # a cancel during it makes it fail: the destination then has part of a package
        marks["sent"] = time.monotonic() - t_stop
        with self.switch_lock:
            if self.cancel_requested:  # came after the package was queued whole: it lost the race
                self.cancel_requested = False
                self.state.set(S.CANCELLING, S.DEVICE)
            self.state.set(S.DEVICE, S.POSTCOPY_DEVICE)  # the package is out: cancel is refused from here
        self.downtime_ms = int((time.monotonic() - t_stop) * 1000)
        marks["package"] = time.monotonic() - t_stop
        self.switch_time = time.monotonic()

    def _after_package(self, w: Writer, m: Any) -> None:
        try:
            w.write(WS.ping(4))
            w.flush()
        finally:  # after the package: a memslot update is not free, keep it out of the downtime
            m.dirty_log_stop()
            self.dirty_logging = False
        self._shrink_send_buffer()

    def _finish_postcopy(self, w: Writer) -> None:
        self._close_preempt()
        w.write(WS.section_header(WS.Section.END, RAM_SECTION_ID) + WR.eos() + WS.section_footer(RAM_SECTION_ID))
        self.eof_sent = True  # from here SHUT(0) is a legal answer
        w.write(WS.eof())
        w.flush()
        extra = self.preempt_bytes
        self.stats.postcopy_bytes = self._sent() - self.stats.precopy_bytes + extra
        self.stats.transferred = self._sent() + extra
        self._await_shut("in postcopy")
        self.end_time = time.monotonic()
        self.on_runstate("postmigrate")
        if not self.state.set(S.POSTCOPY_ACTIVE, S.COMPLETED):
            raise MigrationError(f"postcopy ended in state {self.state.status}")

    def _discard_commands(self) -> list[bytes]:
        """POSTCOPY_RAM_DISCARD for every run of dirty pages, at most 12 ranges per command; the
        (be64 start, be64 length) pairs are built by numpy, not range by range."""
        starts, ends = run_bounds(self.sender.dirty)
        pairs = np.empty((starts.size, 2), dtype=">u8")
        pairs[:, 0] = starts * TPS
        pairs[:, 1] = (ends - starts) * TPS
        raw = pairs.tobytes()
        self.discard_ranges = int(starts.size)
        step = 16 * MAX_DISCARDS_PER_COMMAND
        prefix = WS.ram_discard_prefix(self.sender.block.name)
        return [WS.command(WS.Cmd.POSTCOPY_RAM_DISCARD, prefix + raw[i:i + step]) for i in range(0, len(raw), step)]

    def _postcopy_loop(self) -> None:
        """Background push of the remaining pages; page requests jump the queue."""
        w, sender = self.writer, self.sender
        while True:
            if self.state.status == S.POSTCOPY_DEVICE and self.package_loaded.is_set():
                self.state.set(S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE)
            self._check()
            if not sender.ndirty and not self.requests:
                if self.package_loaded.is_set():
                    self.state.set(S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE)  # if the PONG came just now
                    return
                self.package_loaded.wait(0.05)
                continue
            w.write(WS.section_header(WS.Section.PART, RAM_SECTION_ID))
            t0 = time.monotonic()
            limit = self.opts.param("max-postcopy-bandwidth") * RATE_WINDOW_S
            throttled = False
            while time.monotonic() - t0 < ITERATE_MAX_S:
                if self._serve_requests():
                    continue
                if not sender.ndirty:
                    break
                if limit and self._sent() - self._rate_bytes0 >= limit:
                    throttled = True
                    break
                idx = sender.next_batch(max(POSTCOPY_BATCH_PAGES, sender.host_pages))
                if not idx.size:
                    break  # a request claimed the last dirty pages since ndirty was read
                sender.send(idx)
            w.write(WR.eos() + WS.section_footer(RAM_SECTION_ID))
            w.flush()
            if throttled:  # before _account, which would start a new window with its quota unused
                self._wait_rate_window(limit, urgent=self.wakeup)
            self._account()
            self.stats.postcopy_bytes = self._sent() - self.stats.precopy_bytes

    def _serve_requests(self) -> bool:
        """Send every queued requested page that is still dirty; True if any request was taken."""
        took = False
        if self.requests:
            self.wakeup.clear()  # before the drain: a request queued from here on sets it again
        while self.requests:
            start, length = self.requests.popleft()
            took = True
            for first, count in self.sender.host_page_spans(start // TPS, length // TPS):
                idx = self.sender.take(first, count)
                if idx.size:
                    self.sender.send(idx)
        if took:
            self.writer.flush()
        return took

    def _shrink_send_buffer(self) -> None:
        """A requested page queues behind whatever background data is already buffered: bound
        that queue in postcopy (one channel carries both). 2 MiB measured best on loopback:
        512 KiB starved the push (4 GiB switchover->complete 12% longer), 0 stalled it."""
        sock = self.chan.sock if self.chan is not None else None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, POSTCOPY_SOCKET_BUFFER)
            except OSError:
                pass

    def _open_preempt(self) -> None:
        """postcopy-preempt: a second connection, opened once a PONG proves the destination has
        its main channel (so it takes this one as the preempt channel); no header on it."""
        deadline = time.monotonic() + 10
        while not self.pongs:
            self._check()
            if time.monotonic() > deadline:
                raise MigrationError("no PONG from the destination: cannot open the postcopy-preempt channel")
            time.sleep(0.001)
        chan = connect(self.uri, tls=self.tls)
        self.preempt_chan = chan
        if self.urgent is not None and (not self.preempt_requests or chan.sock is None):
            self._close_urgent()  # requests come on the main return path: threads answer them
        if self.urgent is not None:
            block, m = self.sender.block, self.machine
            try:
                self.urgent.start(chan.fd, block.name, block.size, block.page_size, self._resend(),
                                  self.sender.share(), getattr(m, "ram_fd", None), m.ram_host_addr)
            except OSError as e:  # it died: threads answer
                print(f"livemig: urgent process not used: {e}", file=sys.stderr, flush=True)
                self._close_urgent()
        if self.urgent is not None:
            self.urgent_thread = NamedThread(target=self._urgent_wait, args=(self.urgent, chan),
                                                  name="mig/src/preempt-return", daemon=True)
            self.urgent_thread.start()
            return
        self.preempt = PageChannel(self.sender.block, Writer(chan), self.stats)
        self._start_preempt_reader(chan)

    def _urgent_wait(self, urgent: UrgentSource, chan: Channel) -> None:
        """mig/src/preempt-return with an urgent process: wait for its end; bad input from the
        destination fails the migration, as on the return path. If it cannot read guest RAM, this
        thread answers the connection instead."""
        end = urgent.wait()
        self.urgent_end = end
        if end.get("unable"):
            print(f"livemig: urgent process not used: {end['unable']}", file=sys.stderr, flush=True)
            urgent.close()
            self._count_urgent(end)  # what it sent before it stopped
            self.urgent = self.urgent_thread = self.urgent_end = None  # this thread serves from here on
            with self.preempt_lock:
                self.preempt = PageChannel(self.sender.block, Writer(chan), self.stats)
            if self.preempt_requests:
                self._preempt_rp_loop(chan, bytes.fromhex(end.get("leftover", "")))
            return
        if end["op"] == "error" and not self.rp_error and self.state.status not in S.FINISHED:
            self.rp_error = end["error"]
            self.rp_io = not end.get("protocol", False)
            if self.chan is not None:
                self.chan.shutdown()

    def _close_urgent(self) -> None:
        """The urgent process has ended or must: take its figures, stop it."""
        urgent, self.urgent = self.urgent, None
        if urgent is None:
            return
        t = self.urgent_thread
        if t is not None:
            if t.is_alive():
                try:
                    urgent.finish()  # it reports and exits
                except OSError:
                    pass
            t.join(timeout=5)
        urgent.close()
        self._count_urgent(self.urgent_end or {})
        self.urgent_end = None

    def _count_urgent(self, end: dict) -> None:
        """Add what the urgent process sent (its final report) to the migration's figures."""
        self.preempt_bytes += end.get("bytes", 0)
        self.stats.normal += end.get("normal", 0)
        self.stats.duplicate += end.get("duplicate", 0)

    def _start_preempt_reader(self, chan: Channel) -> None:
        if self.preempt_requests:
            NamedThread(target=self._preempt_rp_loop, args=(chan,), name="mig/src/preempt-return",
                             daemon=True).start()

    def _preempt_rp_loop(self, chan: Channel, leftover: bytes = b"") -> None:
        """mig/src/preempt-return (x-preempt-requests): page requests that the destination sends
        on the preempt connection, answered on it at once; they never wait for the main socket,
        which the background push keeps busy. Page requests only; anything else fails.
        `leftover`: bytes of requests an urgent process read but did not answer."""
        dec = RPW.RPDecoder()
        dec.feed(leftover)
        buf = bytearray(1 << 12)
        try:
            while True:
                while (msg := dec.next_message()) is not None:
                    if not isinstance(msg, RPW.ReqPages):
                        raise ProtocolError(f"postcopy-preempt channel: unexpected {type(msg).__name__} message")
                    self.preempt_requests_served += 1
                    self._queue_request(msg)
                if not (n := chan.recv_into(buf)):
                    break
                dec.feed(memoryview(buf)[:n])
        except ProtocolError as e:
            self.rp_error = str(e)
            if self.chan is not None:
                self.chan.shutdown()
        except (OSError, TransportError):
            pass  # a broken connection: the main channel's threads see it too and pause or fail

    def _close_preempt(self) -> None:
        if self.urgent is not None:
            try:
                self.urgent.finish()
            except OSError:
                pass  # it has ended already; _close_urgent takes its figures
            assert self.urgent_thread is not None
            self.urgent_thread.join(timeout=30)
            if self.urgent_thread.is_alive():
                raise LinkLost("the postcopy-preempt channel is stuck (destination not reading)")
            self._close_urgent()
            return
        if self.preempt is None:
            return
        if not self.preempt_lock.acquire(timeout=30):
            raise LinkLost("the postcopy-preempt channel is stuck (destination not reading)")
        try:
            self.preempt.w.flush()
            self.preempt_bytes += self.preempt.w.position
            self.preempt_chan.shutdown_write()
            self.preempt = None
        finally:
            self.preempt_lock.release()

    def _send_urgent(self, start: int, length: int) -> bool:
        """Return-path thread, preempt on: send the requested host page at once on the preempt
        channel (the background scan then continues after it). Each channel carries whole host
        pages, so a host page is never split across channels."""
        with self.preempt_lock:
            if self.preempt is None:
                return False
            self.sender.send_requested(self.preempt, start // TPS, length // TPS, self._resend())
            return True

    def _resend(self) -> bool:
        """Re-send a requested page the background push has queued already (x-preempt-resend):
        only to a destination that announced x-preempt-requests, a livemig, which keeps the first
        copy of a page; a QEMU destination would fail on the second."""
        return self.preempt_requests and bool(self.opts.param("x-preempt-resend"))
