"""The destination side: accept the stream, load RAM straight into guest memory, load device
state, start the guest, confirm with SHUT on the return path. Mirrors QEMU's
process_incoming_migration / qemu_loadvm_state.
"""
from __future__ import annotations

import os
import sys
import threading
from typing import Any, Callable

import numpy as np

from . import state as S
from .errors import MigrationError, ProtocolError, TransportError
from .options import MigrationOptions
from .multifd import MultifdReceiver
from .postcopy import PostcopyDestination, PreemptReader, check_host
from .ramblock import TPS, RamBlock, pack_bitmap, populate
from .shm import shared_array
from .stats import RamStats
from .tls import TlsEndpoint, TlsError
from .transport import Channel, Listener, URI
from .urgent_dst import UrgentProcess
from .wire import decoder as D
from .wire import multifd as WM
from .wire import returnpath as RPW
from .wire import stream as WS
from .threadname import NamedThread



CHANNELS_TIMEOUT_S = 30.0  # the source opens all its channels at once; wait this long for the rest


class Incoming:
    """One incoming migration into `machine` (created but never started)."""

    def __init__(self, machine: Any, options: MigrationOptions, uri: URI,
                 emit: Callable[[str, dict | None], None], exit_on_error: bool = True,
                 on_started: Callable[[], None] | None = None, tls: TlsEndpoint | None = None):
        self.machine = machine
        self.opts = options
        self.uri = uri
        self.emit = emit
        self.exit_on_error = exit_on_error
        self.on_started = on_started
        self.state = S.MigrationState(self._on_state)
        self.stats = RamStats(total=machine.memory_size)
        self.error: str | None = None
        self.tls = tls  # every accepted connection (main, preempt, multifd, recovery) is TLS
        self.listener = Listener(uri, tls)  # bind now: errors reach the migrate-incoming caller
        self.chan: Channel | None = None
        self.rp_open = False
        self.rp_lock = threading.Lock()
        self.block = RamBlock("pc.ram", machine.ram, getattr(machine, "page_size", TPS))
        self.nonzero = np.zeros(self.block.npages, dtype=np.bool_)  # pages we wrote non-zero data to
        # shared: an urgent process (urgent_dst.py) reads and marks it too
        self.received_fd, self.received = shared_array(self.block.npages)
        self.device_states: dict[tuple[str, int], dict] = {}
        self.pc: PostcopyDestination | None = None  # set by POSTCOPY_ADVISE
        self.running_guest = False  # POSTCOPY_RUN started the guest here
        self.run_thread: threading.Thread | None = None  # mig/dst/run: loads the package's devices
        self.run_error: str | None = None
        self.run_lock = threading.Lock()
        self.vmdesc: bytes | None = None
        self.thread = NamedThread(target=self._run, name="mig/dst/main", daemon=True)
        self.populate = True
        self.populated = 0  # guest RAM's pages below this are allocated (by the prefaulter), until ADVISE drops them
        self.prefaulter = None  # background allocation started by the VM process, if any
        self.multifd: MultifdReceiver | None = None
        self.multifd_error: str | None = None
        self.pause_reason: str | None = None  # postcopy-paused: why
        self.recover_listener: Listener | None = None  # migrate-recover
        self.recover_event = threading.Event()
        self.listening = threading.Event()  # POSTCOPY_LISTEN was handled
        self.preempt_chan: Channel | None = None
        self.preempt_requests = False  # page requests go on the preempt connection (announced)
        self.livemig_source = False  # the stream's CONFIGURATION named livemig's machine type
        self.preempt_send_lock = threading.Lock()

    def start(self) -> None:
        self.state.set(S.NONE, S.SETUP)
        self.thread.start()

    def _on_state(self, status: str) -> None:
        if self.opts.cap("events"):
            self.emit("MIGRATION", {"status": status})

    def query(self) -> dict:
        info: dict[str, Any] = {"status": self.state.status}
        if self.error and self.state.status == S.FAILED:
            info["error-desc"] = self.error
        addr = self.listener.address
        if addr is not None:
            info["socket-address"] = [addr]
        if self.pause_reason and self.state.status in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER):
            info["x-livemig-pause-reason"] = self.pause_reason
        if self.pc is not None and self.state.status == S.COMPLETED:
            if self.opts.cap("postcopy-blocktime"):
                info.update(self.pc.stats())
            info["x-livemig-postcopy"] = {"requests": self.pc.requests, "faults": self.pc.faults,
                                          **self.pc.latency_percentiles()}
        return info

    # -- postcopy recovery (PROTOCOL.md §6.1)
    def pause(self) -> None:
        """migrate-pause: cut the main connection; the loader pauses (postcopy-paused)."""
        if self.chan is not None:
            self.chan.shutdown()

    def recover(self, uri: URI) -> None:
        """migrate-recover: listen on `uri` for the source's new connection. Again while the
        source has not connected (a wrong address, say): the new listener replaces the old one,
        as in QEMU."""
        if uri.scheme not in ("tcp", "unix"):
            raise MigrationError("postcopy recovery needs a tcp: or unix: URI")
        new = Listener(uri, self.tls)  # bound now: errors reach the caller (the old one stays)
        old, self.recover_listener = self.recover_listener, new
        self.recover_event.set()
        if old is not None:
            old.close()  # wakes the loader from accepting on it; it takes the new one

    def _can_pause(self) -> bool:
        return self.running_guest and self.state.status in (S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER)

    def _pause_and_recover(self, dec: D.StreamDecoder, reason: str) -> Channel:
        """The connection broke after the guest started here: keep the guest (threads faulting on
        missing pages wait), drop the connection, wait for migrate-recover and the source's new
        connection. Returns it."""
        self.pause_reason = reason
        self.state.set({S.POSTCOPY_ACTIVE, S.POSTCOPY_RECOVER}, S.POSTCOPY_PAUSED)
        print(f"livemig: postcopy paused ({reason}); waiting for migrate-recover", file=sys.stderr, flush=True)
        with self.rp_lock:
            self.rp_open = False
        for c in (self.chan, getattr(self, "preempt_chan", None)):
            if c is not None:
                c.shutdown()
        self._close_listener()  # a preempt thread still waiting to accept gives up
        t = getattr(self, "preempt_thread", None)
        if t is not None:
            t.join(timeout=10)
        for c in (self.chan, getattr(self, "preempt_chan", None)):
            if c is not None:
                c.close()
        self.preempt_chan = self.preempt_error = None
        assert self.pc is not None
        self.pc.main_placer.drop_partial()
        dec.reconnect()
        while True:
            self.recover_event.wait()
            self.recover_event.clear()
            listener = self.recover_listener
            if listener is None:
                continue
            try:
                chan = listener.accept(keep_open=self.opts.cap("postcopy-preempt"))
            except TransportError as e:
                if self.recover_listener is not listener:
                    continue  # a newer migrate-recover replaced it
                listener.close()
                self.recover_listener = None
                print(f"livemig: postcopy recovery: {e}", file=sys.stderr, flush=True)
                continue
            if self.recover_listener is not listener:  # replaced just as the source came in on it
                chan.close()
                continue
            break
        self._close_listener()
        self.listener, self.recover_listener = listener, None
        self.chan = chan
        self.state.set(S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER)
        with self.rp_lock:
            self.rp_open = True
        if self.opts.cap("postcopy-preempt"):
            self.preempt_thread = NamedThread(target=self._preempt_loop, name="mig/dst/preempt", daemon=True)
            self.preempt_thread.start()
        return chan

    def cancel(self) -> None:
        """Stop waiting or loading (used when the process quits)."""
        self.listener.close()
        if self.chan is not None:
            self.chan.shutdown()
        if self.multifd is not None:
            for c in self.multifd.chans:
                c.chan.shutdown()  # a loader waiting at MULTIFD_FLUSH wakes up

    # -- the loader thread
    def _run(self) -> None:
        try:
            self.decoder = self._new_decoder()  # while the source has not connected yet
            self._accept()
            if self.opts.cap("postcopy-preempt"):
                # accepted at once, as QEMU does: the source opens it before the switch, and a TLS
                # handshake needs this side to answer before the source can go on
                self.preempt_thread = NamedThread(target=self._preempt_loop, name="mig/dst/preempt", daemon=True)
                self.preempt_thread.start()
            if self.prefaulter is not None:
                # from here on the loader allocates what it receives; only a postcopy destination,
                # whose ADVISE drops guest RAM, waits for the prefaulter's chunk in progress
                self.prefaulter.stop(wait=self.opts.cap("postcopy-ram"))
                self.populated = self.prefaulter.ready(self.machine.ram_host_addr) // TPS
            self.state.set(S.SETUP, S.ACTIVE)
            self._load()
            self._finish()
        except Exception as e:
            self._fail(e)

    def _accept(self) -> None:
        """The main channel, and with multifd every multifd channel (told apart by their first
        bytes, in any order); the listener stays open if a postcopy-preempt channel may follow."""
        keep = self.opts.cap("postcopy-preempt")
        if not self.opts.cap("multifd"):
            self.chan = self.listener.accept(keep_open=keep)
            return
        want = self.opts.param("multifd-channels")
        if self.listener.sock is None:
            raise MigrationError("multifd needs several connections: use a tcp: or unix: URI")
        chans: dict[int, Channel] = {}
        ch: Channel | None = None
        try:
            while self.chan is None or len(chans) < want:
                timeout = None if self.chan is None and not chans else CHANNELS_TIMEOUT_S
                ch = self.listener.accept(keep_open=True, timeout=timeout)
                magic = ch.peek(4, CHANNELS_TIMEOUT_S)
                if magic == WS.MAGIC.to_bytes(4, "big") and self.chan is None:
                    self.chan = ch
                elif magic == WM.MAGIC.to_bytes(4, "big"):
                    ch.peek(WM.INIT_LEN, CHANNELS_TIMEOUT_S)  # the whole init packet, or give up
                    init = bytearray(WM.INIT_LEN)
                    if not ch.recv_exact_into([init]):
                        raise ProtocolError("multifd: channel closed before its init packet")
                    cid = WM.parse_init(bytes(init), want)
                    if cid in chans:
                        raise ProtocolError(f"multifd: channel {cid} connected twice")
                    chans[cid] = ch
                else:
                    ch.close()
                    hint = " (a TLS handshake: the source uses TLS; set tls-creds here too)" if magic[:2] == b"\x16\x03" else ""
                    raise ProtocolError(f"unknown migration channel (starts with {magic.hex()}){hint}")
        except Exception as e:
            for c in list(chans.values()) + [ch]:
                if c is not None and c is not self.chan:
                    c.close()
            if not isinstance(e, TransportError) or isinstance(e, TlsError):
                raise
            raise MigrationError(f"multifd: {len(chans)} of {want} channels connected ({e}); "
                                 "is the multifd capability on at the source?") from None
        if not keep:
            self.listener.close_socket()
        self.multifd = MultifdReceiver(chans, self.block, self, self._multifd_failed)

    # -- multifd receivers' view of guest memory (PageStore)
    def prepare(self, idx: np.ndarray) -> None:
        if self.pc is not None and self.pc.listening:
            raise ProtocolError("multifd pages after POSTCOPY_LISTEN")
        if self.populate:
            fresh = idx[~self.received[idx]]  # ascending; allocate each run of them in one call
            if fresh.size:
                cuts = np.flatnonzero(np.diff(fresh) != 1) + 1
                for run in np.split(fresh, cuts):
                    self._populate(int(run[0]), run.size)

    def prepare_run(self, first: int, n: int) -> None:
        """prepare() of the pages first .. first + n - 1."""
        if self.pc is not None and self.pc.listening:
            raise ProtocolError("multifd pages after POSTCOPY_LISTEN")
        if self.populate and not self.received[first:first + n].all():
            self._populate(first, n)

    def stored(self, pages: np.ndarray | slice) -> None:
        """Pages (an index array, or a slice for one run) hold what a multifd packet carried."""
        self.nonzero[pages] = True
        self.received[pages] = True

    def _multifd_failed(self, msg: str) -> None:
        if self.state.status in S.FINISHED or self.multifd_error:
            return
        self.multifd_error = msg
        if self.chan is not None:
            self.chan.shutdown()  # the loader stops reading the main channel

    def _send_rp(self, data: bytes) -> None:
        """A return-path message (from the loader, the fault thread ...); TransportError if the
        connection broke."""
        if not self.rp_open or self.chan is None or not self.chan.bidirectional:
            return
        with self.rp_lock:
            self.chan.send_small(data)

    def _announce_preempt_requests(self) -> bool:
        """x-preempt-requests (with postcopy-preempt) is announced only to a source whose stream
        named livemig's machine type: a QEMU source fails on the unknown return-path message."""
        return bool(self.opts.cap("postcopy-preempt") and self.opts.param("x-preempt-requests")
                    and self.livemig_source)

    def _send_requests(self, data: bytes) -> None:
        """Page requests (fault thread, recovery): on the preempt connection once the source
        has been told to read it there (x-preempt-requests), else on the return path."""
        chan = self.preempt_chan if self.preempt_requests else None
        if chan is None:
            self._send_rp(data)
            return
        with self.preempt_send_lock:
            chan.send_small(data)

    def _new_decoder(self) -> D.StreamDecoder:
        """The stream's parser (capabilities are fixed once migrate-incoming ran)."""
        devices = {(d.idstr, d.instance_id): d.vmsd for d in self.machine.devices()}
        return D.StreamDecoder([D.LocalBlock(self.block.name, self.block.size, self.block.page_size)], devices,
                               postcopy=self.opts.cap("postcopy-ram"))

    def _load(self) -> None:
        dec = self.decoder
        assert dec is not None
        chan = self.chan
        assert chan is not None
        eof = False
        while not dec.done:
            try:
                n = chan.recv_into(dec.space())
                if n == 0 and self._can_pause():
                    raise TransportError("the source closed the migration connection")
            except TransportError as e:
                if not self._can_pause():
                    raise
                chan = self._pause_and_recover(dec, str(e))
                continue
            if n == 0:
                dec.finish()
                break
            dec.commit(n)
            try:
                while (ev := dec.next_event()) is not None:
                    if self._handle(ev):
                        eof = True
                        if self.pc is not None and self.pc.listening:
                            break  # postcopy streams end at EOF: the source waits for SHUT
            except (OSError, TransportError) as e:  # a reply on the return path failed
                if not self._can_pause() or isinstance(e, ProtocolError):
                    raise
                chan = self._pause_and_recover(dec, f"return path: {e}")
                continue
            if eof and self.pc is not None and self.pc.listening:
                break
        self.stats.transferred = dec.bytes_consumed
        if not eof:
            raise ProtocolError("migration stream ended without EOF")

    def _handle(self, ev) -> bool:
        if isinstance(ev, D.Pages) and self.pc is not None and self.pc.listening:
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            self.pc.place_pages(idx, ev.data)
            self.stats.normal += idx.size
            return False
        if isinstance(ev, D.ZeroPages) and self.pc is not None and self.pc.listening:
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            self.pc.place_zero_pages(idx)
            self.stats.duplicate += idx.size
            return False
        if isinstance(ev, D.Pages):
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            n = idx.size
            first = int(idx[0])
            if ev.contiguous or n == 1 or bool((idx[1:] - idx[:-1] == 1).all()):  # a run of pages
                if self.populate and not self.received[first]:
                    self._populate(first, n)
                self.block.u8[first:first + n] = ev.data
                self.nonzero[first:first + n] = True
                self.received[first:first + n] = True
            else:
                self.block.u8[idx] = ev.data
                self.nonzero[idx] = True
                self.received[idx] = True
            self.stats.normal += n
            return False
        if isinstance(ev, D.ZeroPages):
            idx = (ev.offsets >> np.uint64(12)).astype(np.intp)
            dirty = idx[self.nonzero[idx]]
            if dirty.size:
                self.block.u8[dirty] = 0
                self.nonzero[dirty] = False
            if self.pc is not None:
                self.pc.map_zero(idx)  # after ADVISE: an unmapped "received" page would fault later
            self.received[idx] = True
            self.stats.duplicate += idx.size
            return False
        if isinstance(ev, D.DeviceState):
            self.device_states[(ev.idstr, ev.instance_id)] = ev.values
            return False
        if isinstance(ev, D.Configuration):
            if ev.machine != WS.MACHINE_TYPE:
                raise ProtocolError(f"Machine type received is '{ev.machine}' and local is '{WS.MACHINE_TYPE}'")
            self.livemig_source = True
            return False
        if isinstance(ev, D.OpenReturnPath):
            if self.chan is None or not self.chan.bidirectional:
                raise ProtocolError("OPEN_RETURN_PATH on a one-way transport")
            self.rp_open = True
            if self._announce_preempt_requests():
                self._send_rp(RPW.preempt_requests())  # a livemig source reads the preempt connection too
                self.preempt_requests = True
            return False
        if isinstance(ev, D.Ping):
            if not self.rp_open:
                raise ProtocolError(f"PING {ev.value} without a return path")
            self._send_rp(RPW.pong(ev.value))
            return False
        if isinstance(ev, D.RecvBitmapRequest):
            if self.state.status != S.POSTCOPY_RECOVER:
                raise ProtocolError("RECV_BITMAP outside postcopy recovery")
            if ev.block != self.block.name:
                raise ProtocolError(f"RECV_BITMAP for unknown RAM block '{ev.block}'")
            self._send_rp(RPW.recv_bitmap(self.block.name, pack_bitmap(self.received)))
            return False
        if isinstance(ev, D.PostcopyResume):
            if self.state.status != S.POSTCOPY_RECOVER or self.pc is None:
                raise ProtocolError("POSTCOPY_RESUME outside postcopy recovery")
            self.state.set(S.POSTCOPY_RECOVER, S.POSTCOPY_ACTIVE)
            self.pause_reason = None
            self._send_rp(RPW.resume_ack())
            self.pc.resend_requests()
            return False
        if isinstance(ev, D.MultifdFlush):
            if self.multifd is None:
                raise ProtocolError("MULTIFD_FLUSH but multifd is off here: set the multifd capability on both sides")
            if self.pc is not None and self.pc.listening:
                raise ProtocolError("MULTIFD_FLUSH in postcopy")
            self.multifd.sync()
            return False
        if isinstance(ev, D.Eof):
            return True
        if isinstance(ev, D.VmDescription):
            self.vmdesc = ev.json
            return False
        if isinstance(ev, D.RamSetup):
            if self.multifd is not None:
                self.multifd.ready.set()  # after ADVISE (which discards guest RAM), before any page
            return False
        if isinstance(ev, (D.Header, D.SectionEnd, D.SwitchoverStart)):
            return False
        if isinstance(ev, D.PostcopyAdvise):
            if self.multifd is not None and self.multifd.ready.is_set():
                raise ProtocolError("POSTCOPY_ADVISE after the RAM setup (multifd pages may have arrived)")
            self._advise(ev)
            return False
        if isinstance(ev, D.Discard):
            if self.pc is None or self.pc.listening:
                raise ProtocolError("POSTCOPY_RAM_DISCARD outside the ADVISE..LISTEN window")
            hps = self.block.page_size
            for start, length in ev.ranges:
                if start % hps or length % hps:
                    raise ProtocolError(f"POSTCOPY_RAM_DISCARD range 0x{start:x}+0x{length:x} is not in whole "
                                        f"host pages of 0x{hps:x} bytes")
            self.pc.discard(ev.ranges)
            return False
        if isinstance(ev, D.Packaged):
            if self.pc is None or self.pc.listening:
                raise ProtocolError("PACKAGED without POSTCOPY_ADVISE")
            return False
        if isinstance(ev, D.PostcopyListen):
            if self.pc is None or self.pc.listening:
                raise ProtocolError("POSTCOPY_LISTEN without POSTCOPY_ADVISE (or twice)")
            if not self.rp_open:
                raise ProtocolError("postcopy needs a return path")
            if self.multifd is not None:
                self.multifd.finish()  # postcopy pages come on the main and preempt channels only
            self.pc.listen()
            self.listening.set()  # the preempt channel may place pages from now on
            self.state.set(S.ACTIVE, S.POSTCOPY_DEVICE)
            return False
        if isinstance(ev, D.PostcopyRun):
            if self.pc is None or not self.pc.listening:
                raise ProtocolError("POSTCOPY_RUN before POSTCOPY_LISTEN")
            if self.run_thread is not None:
                raise ProtocolError("POSTCOPY_RUN twice")
            # Loading the vCPU can make KVM touch guest pages that have not arrived (the kvmclock
            # and steal-time areas its MSRs point at): load on a thread of its own, as QEMU does,
            # while this one goes on reading the stream that brings those pages.
            self.run_thread = NamedThread(target=self._postcopy_run, name="mig/dst/run", daemon=True)
            self.run_thread.start()
            return False
        raise ProtocolError(f"unexpected {type(ev).__name__} in a precopy stream")

    def _postcopy_run(self) -> None:
        """mig/dst/run: the device state of the package, then the guest starts (POSTCOPY_RUN)."""
        try:
            self._load_devices()
        except Exception as e:
            self.run_error = f"loading the device state failed: {e}"
            try:  # the guest never started here: the source must fail (and may run it again),
                self._send_rp(RPW.shut(1))  # not take the cut below for a link to recover
            except Exception:
                pass
            if self.chan is not None:
                self.chan.shutdown()  # the loader stops and fails the migration with run_error
            return
        with self.run_lock:
            if self.state.status != S.POSTCOPY_DEVICE:
                return  # failed meanwhile: the guest must not start
            if self.on_started:
                self.on_started()  # starts the guest and says RESUME, unless it is to stay paused
            self.running_guest = True
            self.state.set(S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE)

    def _join_run_thread(self) -> None:
        t = self.run_thread
        if t is not None:
            t.join(timeout=60)
            if t.is_alive():
                raise ProtocolError("the device state of the postcopy package did not load within 60 s")
            if self.run_error:
                raise ProtocolError(self.run_error)

    def _populate(self, first: int, n: int) -> None:
        """Allocate a run of fresh destination pages in one call (far cheaper than faulting them one
        by one); pages below `populated` are allocated already."""
        lo = max(first, self.populated)
        if lo < first + n and not populate(self.machine.ram_host_addr + lo * TPS, (first + n - lo) * TPS):
            self.populate = False  # kernel older than 5.14: let the copy fault pages in
        elif self.pc is not None and self.pc.minor:
            self.pc.populate_alias(first, n)

    def _advise(self, ev: D.PostcopyAdvise) -> None:
        if ev.pagesize_summary is None:
            raise ProtocolError("dirty-bitmaps-only postcopy (ADVISE of length 0) is not supported")
        if ev.pagesize_summary != self.block.page_size:
            raise ProtocolError(f"postcopy page sizes differ: source summary 0x{ev.pagesize_summary:x}, "
                                f"destination 0x{self.block.page_size:x}")
        if ev.target_page_size != TPS:
            raise ProtocolError(f"target page sizes differ: source {ev.target_page_size}, destination {TPS}")
        check_host()
        alias_addr, pf = self.machine.ram_alias_addr, self.prefaulter
        urgent = None
        if self.preempt_requests and self.opts.param("x-urgent-process") and self.tls is None:
            urgent = UrgentProcess()  # started now: its start-up is not in the downtime
        self.pc = PostcopyDestination(self.block, self.machine.ram_host_addr, self._send_requests,
                                      self.received, self.nonzero, self.machine.vcpu_thread_ids,
                                      ram_fd=self.machine.ram_fd, alias=self.machine.take_ram_alias(),
                                      alias_ready=(lambda: pf.ready(alias_addr)) if pf and alias_addr else None,
                                      urgent=urgent, received_fd=self.received_fd)
        if self.pc.advise(zero_mapped=self.populated):
            self.populated = 0  # advise() dropped guest RAM

    def _load_devices(self) -> None:
        """Load every device's state (the caller starts the vCPUs)."""
        m = self.machine
        for dev in m.devices():
            values = self.device_states.get((dev.idstr, dev.instance_id))
            if values is None and not getattr(dev, "optional", False):
                raise ProtocolError(f"migration stream has no state for device '{dev.idstr}' {dev.instance_id}")
        for dev in m.devices():
            if (values := self.device_states.get((dev.idstr, dev.instance_id))) is not None:
                dev.load(values)

    def _preempt_loop(self) -> None:
        """mig/dst/preempt: the second connection carries requested pages only, as bare page
        records; the source closes it before it sends EOF on the main channel. Accepted as soon
        as it comes; read once POSTCOPY_LISTEN has set guest memory up for placing."""
        try:
            chan = self.listener.accept()
            self.preempt_chan = chan
            while not self.listening.wait(0.1):
                if self.state.status in S.FINISHED or self.error:
                    return
            pc = self.pc
            assert pc is not None
            urgent = pc.urgent
            if urgent is not None and not urgent.given_preempt and chan.sock is not None:
                self._preempt_in_urgent_process(pc, urgent, chan)
                return
            reader = PreemptReader(pc)
            try:
                while reader.feed(chan.recv_into):
                    pass
            finally:
                self.stats.normal += reader.normal
                self.stats.duplicate += reader.duplicate
        except Exception as e:
            if self.state.status in S.FINISHED or self.state.status == S.POSTCOPY_PAUSED or self.error \
                    or getattr(self, "preempt_unused", False):
                return  # the listener closed at the end of a migration that did not use preempt, or on failure
            self.preempt_error = f"postcopy-preempt channel: {e}"
            print(f"livemig: {self.preempt_error}", file=sys.stderr, flush=True)
            for c in (getattr(self, "preempt_chan", None), self.chan):
                if c is not None:
                    c.shutdown()  # the main loader sees the failure; the source's sends fail

    def _preempt_in_urgent_process(self, pc: PostcopyDestination, urgent: UrgentProcess, chan: Channel) -> None:
        """mig/dst/preempt with an urgent process: hand it the connection, wait for its end, take
        back its figures; this process's own fault thread serves what faults come after."""
        urgent.give_preempt(chan.sock)
        end = urgent.wait()
        if end.get("stats") is not None:
            pc.merge(end["stats"])  # no more arrival notes once it returns, so the drain gets all
            self.stats.normal += end.get("normal", 0)
            self.stats.duplicate += end.get("duplicate", 0)
        else:  # it ended without a report (killed): what it had claimed and not written goes back
            pc.stop_urgent_notes()
            pc.release_claims()
        late = urgent.drain_arrivals()
        for page, when in late:
            pc._requested_arrived(page, when)
        if pc.fault_thread is None and self.state.status not in S.FINISHED:
            pc.start_fault_thread()
        if end["op"] == "error":
            raise TransportError(end["error"])

    def _finish(self) -> None:
        if self.pc is not None and self.pc.listening:
            self._join_run_thread()
            if self.state.status != S.POSTCOPY_ACTIVE:
                raise ProtocolError(f"the postcopy stream ended in state {self.state.status} "
                                    "(no POSTCOPY_RUN, or no POSTCOPY_RESUME after a recovery)")
            t = getattr(self, "preempt_thread", None)
            if t is not None:
                if getattr(self, "preempt_chan", None) is None:
                    self.preempt_unused = True
                    self._close_listener()  # the source never opened it: stop waiting
                t.join(timeout=60)  # every requested page is placed before the guest is complete
                if t.is_alive():
                    raise ProtocolError("the postcopy-preempt connection did not end within 60 s of the stream's end")
                if getattr(self, "preempt_error", None):
                    raise ProtocolError(self.preempt_error)
            missing = self.block.npages - int(np.count_nonzero(self.received))
            if missing:  # unregistered, they would read as zeros
                raise ProtocolError(f"the postcopy stream ended with {missing} pages of guest RAM never sent")
            self.pc.finish()
            if not self.state.set(S.POSTCOPY_ACTIVE, S.COMPLETED):
                raise ProtocolError(f"postcopy ended in state {self.state.status}")
            self._send_shut_ok()
        else:
            if self.pc is not None:
                self.pc.close_urgent()  # postcopy was possible but did not come
            if self.multifd is not None:
                self.multifd.finish()  # before the guest may run
            self._load_devices()
            self.state.set(S.ACTIVE, S.COMPLETED)
            self._send_shut_ok()  # before the vCPU starts, whose thread competes for the GIL and a core
            if self.on_started:
                self.on_started()
        if self.pc is not None:
            self.pc.release()
        if (alias := self.machine.take_ram_alias()) is not None:
            alias.close()  # no postcopy came: the second mapping of guest RAM is not needed
        self._close()

    def _send_shut_ok(self) -> None:
        """SHUT(0): the source counts its downtime until it sees this."""
        try:
            self._send_rp(RPW.shut(0))
        except (OSError, TransportError):
            pass

    def _close(self) -> None:
        """Close the connections; the preempt thread ends before guest memory's placement state
        goes (it may be placing a page)."""
        pchan = getattr(self, "preempt_chan", None)
        if pchan is not None:
            pchan.shutdown()
        t = getattr(self, "preempt_thread", None)
        if t is not None and t is not threading.current_thread():
            t.join(timeout=5)
        if pchan is not None:
            pchan.close()
        if self.chan is not None:
            self.chan.close()
        if self.multifd is not None:
            self.multifd.close()
        self._close_listener()

    def _close_listener(self) -> None:
        try:
            self.listener.close()
        except OSError:
            pass

    def _fail(self, e: Exception) -> None:
        if isinstance(e, (MigrationError, OSError)):
            msg = str(e)
        else:
            msg = f"internal error: {type(e).__name__}: {e}"
        if self.multifd_error:  # a receiver failed first; the main channel's error is its echo
            msg = self.multifd_error
        if self.run_error:  # the device state failed to load; the loader's error is its echo
            msg = self.run_error
        self.error = msg
        if self.pc is not None:
            self.pc.close_urgent()
        try:
            self._send_rp(RPW.shut(1))
        except Exception:
            pass
        self._close()
        self._close_listener()
        with self.run_lock:
            self.state.set({S.SETUP, S.ACTIVE, S.POSTCOPY_DEVICE, S.POSTCOPY_ACTIVE, S.POSTCOPY_PAUSED,
                            S.POSTCOPY_RECOVER}, S.FAILED)
        if self.running_guest:
            # pages that never arrived must not read as zeros: keep userfaultfd registered (faulting
            # threads wait) and stop the vCPU; the process stays up with the guest's state
            try:
                self.machine.pause()
            except Exception:
                pass
            print(f"livemig: postcopy failed after the guest started here; guest paused: {msg}",
                  file=sys.stderr, flush=True)
            return
        t = getattr(self, "preempt_thread", None)
        if self.pc is not None and self.pc.listening and not (t is not None and t.is_alive()):
            try:
                self.pc.finish()
                self.pc.release()
            except Exception:
                pass
        if self.exit_on_error:
            print(f"livemig: load of migration failed: {msg}", file=sys.stderr, flush=True)
            os._exit(1)
