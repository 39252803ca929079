"""The source's postcopy recovery (PROTOCOL.md §6.1): migrate-pause, postcopy-paused, and
migrate resume=true (reconnect, RECV_BITMAP, POSTCOPY_RESUME, RESUME_ACK). A part of Outgoing.
"""
from __future__ import annotations

import sys
import threading
import time

import numpy as np

from . import state as S
from .errors import LinkLost, MigrationError, ProtocolError, TransportError
from .ram_send import PageChannel, Writer
from .ramblock import unpack_bitmap
from .threadname import NamedThread
from .transport import URI, connect
from .wire import stream as WS


class PostcopyRecovery:
    """Outgoing's recovery methods (a mixin: they work on Outgoing's state)."""

    def pause(self) -> None:
        """migrate-pause: cut the connections; the migration thread pauses (postcopy-paused)."""
        self.pause_requested = True
        for c in (self.chan, self.preempt_chan):
            if c is not None:
                c.shutdown()
        self.wakeup.set()

    def resume(self, uri: URI) -> None:
        """migrate resume=true: reconnect to `uri` (the destination's migrate-recover address)."""
        if uri.scheme not in ("tcp", "unix"):
            raise MigrationError("postcopy recovery needs a tcp: or unix: URI")
        if self.tls is not None:
            self.tls.check_host(uri.host if uri.scheme == "tcp" else "")
        if not self.state.set(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP):
            raise MigrationError("Cannot resume if there is no paused migration")
        self.pause_requested = False  # a migrate-pause that raced with the pause itself
        self.resume_uri = uri
        self.resume_event.set()

    def _pause(self, reason: str) -> None:
        """Drop the broken connections and wait in postcopy-paused (the guest runs on the destination)."""
        self.pause_reason = reason
        self.state.set({S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER}, S.POSTCOPY_PAUSED)
        print(f"livemig: postcopy paused ({reason}); waiting for migrate resume=true", file=sys.stderr, flush=True)
        for c in (self.chan, self.preempt_chan):
            if c is not None:
                c.shutdown()
        if self.rp_thread is not None:
            self.rp_thread.join(timeout=10)
        self._close_urgent()  # its connection is down: it has ended; threads serve the next one
        with self.preempt_lock:
            if self.preempt is not None:  # what went on the broken connection still counts
                self.preempt_bytes += self.preempt.w.position
            self.preempt = None
        for c in (self.chan, self.preempt_chan):
            if c is not None:
                c.close()
        self.chan = self.preempt_chan = None
        self.requests.clear()  # the destination asks again for what it still misses
        self.rp_error, self.rp_io, self.pause_requested = None, False, False
        self.bitmap = None
        self.bitmap_event.clear()
        self.resume_acked.clear()

    def _recover(self) -> None:
        """Wait for migrate resume=true, reconnect, reload the dirty bitmap from what the
        destination received, resume; any failure here goes back to postcopy-paused."""
        while True:
            self.resume_event.wait()
            self.resume_event.clear()
            try:
                chan = connect(self.resume_uri, tls=self.tls)
            except TransportError as e:
                self.pause_reason = str(e)
                self.state.set(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_PAUSED)
                continue
            self.chan = chan
            sent = self.writer.position
            self.writer = Writer(chan)
            self.writer.sent = sent  # byte counters go on across connections
            self.sender.w = self.sender.main.w = self.writer
            self.sender.named = False  # a new connection: a new CONTINUE context
            self._rp_last_block = None
            self.state.set(S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER)
            self.rp_thread = NamedThread(target=self._rp_loop, name="mig/src/return", daemon=True)
            self.rp_thread.start()
            try:
                self._resume_handshake()
                return
            except (LinkLost, TransportError, OSError) as e:
                if isinstance(e, ProtocolError) or (self.rp_error and not self.rp_io):
                    raise
                self._pause(str(e))

    def _wait(self, event: threading.Event, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not event.wait(0.05):
            self._check()
            if time.monotonic() > deadline:
                raise LinkLost(f"recovery: no {what} from the destination within {timeout:.0f} s")

    def _resume_handshake(self) -> None:
        w, sender = self.writer, self.sender
        block = sender.block
        w.write(WS.recv_bitmap(block.name))
        w.flush()
        self._wait(self.bitmap_event, "RECV_BITMAP")
        received = unpack_bitmap(np.frombuffer(self.bitmap, dtype=np.uint64), block.npages)
        with sender.lock:
            np.logical_not(received, out=sender.dirty)
            sender.ndirty = int(np.count_nonzero(sender.dirty))
            sender.canonicalize()
        if self.opts.cap("postcopy-preempt"):
            chan = connect(self.resume_uri, tls=self.tls)  # after the main channel: the destination tells them apart
            self.preempt_chan = chan
            with self.preempt_lock:
                self.preempt = PageChannel(block, Writer(chan), self.stats)
            self._start_preempt_reader(chan)
        w.write(WS.command(WS.Cmd.POSTCOPY_RESUME))
        w.flush()
        self._wait(self.resume_acked, "RESUME_ACK")
        self.package_loaded.set()  # only a destination that runs the guest can resume
        self.pause_reason = None
        self.state.set(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
