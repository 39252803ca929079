"""The source side of a migration: migration thread (precopy passes, switchover, completion) and
return-path thread. Mirrors QEMU's migration_thread / source_return_path_thread. Its postcopy
and recovery parts are in outgoing_postcopy.py and outgoing_recovery.py; the page data path in
ram_send.py.
"""
from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import math
import os
import sys
import termios
import threading
import time
from typing import Any, Callable

from . import state as S
from .errors import LinkLost, MigrationError, ProtocolError, TransportError
from .multifd import MultifdSender
from .options import MigrationOptions
from .outgoing_postcopy import PostcopySource
from .outgoing_recovery import PostcopyRecovery
from .ram_send import (BATCH_PAGES, ITERATE_MAX_S, RAM_SECTION_ID, RATE_WINDOW_S, PageChannel, RamSender, Writer,
                       batch_pages, check_page_request)
from .ramblock import TPS, RamBlock
from .stats import RamStats
from .tls import TlsEndpoint
from .transport import URI, Channel, connect
from .urgent_src import SERVED, UrgentSource
from .wire import ram as WR
from .wire import returnpath as RPW
from .wire import stream as WS
from .wire.vmstate import describe, encode
from .threadname import NamedThread

ZERO_SCAN_PAGES = 1024  # pages per batch after a batch of zero pages only
SHUT_TIMEOUT_S = 120.0
SHRINK_DONE_BYTES = 256 << 10  # a stop-time copy this small is not worth another pass (~0.1 ms)
SHRINK_FACTOR = 0.75  # another pass only while each finds at least a quarter less left


class ShrinkPasses:
    """livemig's own, at the end of precopy: what is left fits the downtime limit; send it while
    the guest still runs and merge again, or stop the guest now? Another pass is worth it while
    the guest dirties slower than the link carries: it could take at most SHRINK_FACTOR of the
    time of the pass before it (which let the guest dirty what is left), and each merge finds at
    least SHRINK_FACTOR less than the one before. At most `max_passes` passes and `limit_ms`
    (downtime-limit) spent on them; below SHRINK_DONE_BYTES the copy made with the guest stopped
    is small already. QEMU stops at the first fit (max_passes 0)."""

    def __init__(self) -> None:
        self.passes = 0
        self.t0 = 0.0
        self.left: int | None = None  # what the last merge found

    def another(self, left: int, now: float, max_passes: int, limit_ms: int,
                pass_s: float, last_pass_s: float) -> bool:
        """`pass_s`: the least time sending `left` can take (at max-bandwidth: the pass before,
        mostly zero pages, says little of the link); `last_pass_s`: the time between the last two
        merges."""
        if self.passes == 0:
            self.t0 = now
        worth = (left > SHRINK_DONE_BYTES and self.passes < max_passes
                 and pass_s <= last_pass_s * SHRINK_FACTOR
                 and (self.left is None or left <= self.left * SHRINK_FACTOR)
                 and (now - self.t0) * 1000 < limit_ms)
        if worth:
            self.passes += 1
            self.left = left
        return worth


class Outgoing(PostcopySource, PostcopyRecovery):
    """One outgoing migration of `machine` to `uri`."""

    def __init__(self, machine: Any, options: MigrationOptions, uri: URI,
                 emit: Callable[[str, dict | None], None], resume: bool = False, tls: TlsEndpoint | None = None):
        self.machine = machine
        self.opts = options
        self.uri = uri
        self.tls = tls  # every connection of this migration (main, preempt, multifd, recovery) is TLS
        self.emit = emit
        self.state = S.MigrationState(self._on_state)
        self.stats = RamStats(total=machine.memory_size)
        self.error: str | None = None
        self.cancel_requested = False
        self.chan: Channel | None = None
        self.thread = NamedThread(target=self._run, name="mig/src/main", daemon=True)
        self.switch_lock = threading.Lock()
        self.handed_over = False
        self.eof_sent = False  # the EOF is on its way: a SHUT(0) before it is bad input
        self.rp_thread: threading.Thread | None = None
        self.rp_error: str | None = None
        self.rp_io = False  # rp_error is a broken connection, not bad input
        self.shut = threading.Event()
        self.shut_value: int | None = None
        self.shut_at = 0.0  # when SHUT arrived (monotonic)
        self.pongs: list[int] = []
        self.pong_cv = threading.Condition()  # notified at each PONG
        self.start_time = 0.0
        self.setup_time = 0
        self.end_time = 0.0
        self.downtime_ms: int | None = None
        self.shrinking = False  # sending what fits the downtime limit while the guest still runs
        self.shrink = ShrinkPasses()
        self.expected_downtime = options.param("downtime-limit")
        self.bandwidth = 0.0  # bytes/s, last measured window
        self.was_running = False
        self.paused_by_us = False
        self.on_finish: Callable[["Outgoing"], None] | None = None
        self.on_runstate: Callable[[str], None] = lambda runstate: None  # the VM's run state changes
        self.postcopy_requested = False
        self.in_postcopy = False
        self.requests: collections.deque[tuple[int, int]] = collections.deque()
        self.wakeup = threading.Event()  # a page request arrived
        self._rp_last_block: str | None = None
        self.preempt: PageChannel | None = None  # postcopy-preempt channel, while open
        self.preempt_chan: Channel | None = None
        self.preempt_bytes = 0  # bytes sent on preempt connections closed so far
        self.preempt_requests = False  # the destination sends page requests on the preempt channel too
        self.preempt_requests_served = 0  # requests that came that way (to this process's threads)
        self.urgent: UrgentSource | None = None  # serves them instead, in a process of its own
        self.urgent_thread: threading.Thread | None = None
        self.urgent_end: dict | None = None
        self.preempt_lock = threading.Lock()
        self.package_loaded = threading.Event()  # PONG(0x42)
        self.multifd: MultifdSender | None = None
        self.pause_requested = False  # migrate-pause
        self.pause_reason: str | None = None
        self.resume_uri: URI | None = None
        self.resume_event = threading.Event()  # migrate resume=true
        self.bitmap: bytes | None = None  # RECV_BITMAP reply (recovery)
        self.bitmap_event = threading.Event()
        self.resume_acked = threading.Event()
        self.switch_reason: str | None = None  # why the switchover policy chose postcopy
        self.last_pass = (0.0, 0, 0)  # seconds, bytes sent, pages dirtied: the last pass

    # -- control (called from QMP)
    def start(self) -> None:
        self.start_time = time.monotonic()
        self.state.set(S.NONE, S.SETUP)
        self.thread.start()

    def cancel(self) -> None:
        # the switch lock (never held across I/O) orders a cancel against the two moments the guest
        # changes hands: the postcopy package queued whole, and the precopy stream queued whole
        with self.switch_lock:
            st = self.state.status
            if st in S.IN_POSTCOPY:
                raise MigrationError("Postcopy migration in progress, cannot cancel")
            if st in S.FINISHED or st == S.NONE:
                return
            if self.handed_over:
                return  # the whole stream is out: the destination may be running the guest already
            self.cancel_requested = True
            self.state.set({S.SETUP, S.ACTIVE, S.PRE_SWITCHOVER, S.DEVICE}, S.CANCELLING)
            if self.chan is not None:
                if st == S.DEVICE:
                    # a blocked send fails; what is queued still goes, so if the stream (or the
                    # package) was queued whole the destination's answer decides, as it must
                    self.chan.shutdown_write(wait=False)  # under the QMP and switch locks
                else:
                    self.chan.shutdown()

    def start_postcopy(self) -> None:
        """migrate-start-postcopy: only a flag; the migration thread switches at its next step."""
        self.postcopy_requested = True
        self.wakeup.set()

    def _on_state(self, status: str) -> None:
        if self.opts.cap("events"):
            self.emit("MIGRATION", {"status": status})

    # -- query-migrate
    def query(self) -> dict:
        st = self.state.status
        info: dict[str, Any] = {"status": st}
        if st in (S.FAILED, S.CANCELLED, S.CANCELLING) or st == S.SETUP:
            if self.error and st == S.FAILED:
                info["error-desc"] = self.error
            return info
        now = self.end_time if st == S.COMPLETED else time.monotonic()
        info["total-time"] = int((now - self.start_time) * 1000)
        info["setup-time"] = self.setup_time
        if st == S.COMPLETED or st in S.IN_POSTCOPY:
            info["downtime"] = self.downtime_ms or 0
        else:
            info["expected-downtime"] = int(self.expected_downtime)
        self.stats.remaining = 0 if st == S.COMPLETED else self._sender_remaining()
        info["ram"] = self.stats.as_qmp()
        if self.switch_reason:
            info["x-livemig-switchover-reason"] = self.switch_reason
        served = int(self.sender.counters[SERVED]) if getattr(self, "sender", None) is not None else 0
        info["ram"]["postcopy-requests"] += served  # those the urgent process answered
        if self.preempt_requests:  # livemig's own: page requests that came on the preempt channel
            info["x-livemig-preempt-requests"] = self.preempt_requests_served + served
        if served:  # livemig's own: of those, the ones its urgent process answered
            info["x-livemig-urgent-requests"] = served
        if self.pause_reason and st in (S.POSTCOPY_PAUSED, S.POSTCOPY_RECOVER_SETUP, S.POSTCOPY_RECOVER):
            info["x-livemig-pause-reason"] = self.pause_reason
        marks = getattr(self, "switchover_marks", None)
        if st == S.COMPLETED and marks:  # livemig's own: where the downtime went (ms since the stop)
            info["x-livemig-switchover"] = {k: (v if isinstance(v, int) else round(v * 1000, 2)) for k, v in marks.items()}
        return info

    def _sender_remaining(self) -> int:
        sender = getattr(self, "sender", None)
        return sender.ndirty * TPS if sender else self.stats.total

    # -- the migration thread
    def _run(self) -> None:
        try:
            self._migrate()
        except Exception as e:  # every failure ends here: report it, keep the guest
            self._fail(e)
        finally:
            self._cleanup()
            if self.on_finish:
                self.on_finish(self)

    def _check(self) -> None:
        if self.cancel_requested:
            raise MigrationError("migration cancelled")
        if self.shut_value not in (None, 0):
            raise MigrationError(f"the destination failed (SHUT {self.shut_value} on the return path)")
        if self.pause_requested:
            raise LinkLost("paused by migrate-pause")
        if self.rp_error:
            raise (LinkLost if self.rp_io else MigrationError)(self.rp_error)

    def _migrate(self) -> None:
        m = self.machine
        self.chan = connect(self.uri, tls=self.tls)
        self._check()
        w = self.writer = Writer(self.chan)
        block = RamBlock("pc.ram", m.ram, getattr(m, "page_size", TPS))
        self.sender = RamSender(block, w, self.stats)
        use_rp = self.chan.bidirectional
        w.write(WS.file_header() + WS.configuration())
        if use_rp:
            self.rp_thread = NamedThread(target=self._rp_loop, name="mig/src/return", daemon=True)
            self.rp_thread.start()
            w.write(WS.command(WS.Cmd.OPEN_RETURN_PATH) + WS.ping(1))
        if self.opts.cap("postcopy-ram"):
            if not use_rp:
                raise MigrationError("postcopy needs a return path: use a socket transport (tcp:, unix:, fd:)")
            w.write(WS.postcopy_advise(block.page_size, TPS))
            if self.opts.cap("postcopy-preempt") and self.uri.scheme not in ("tcp", "unix"):
                raise MigrationError("postcopy-preempt opens a second connection: use a tcp: or unix: URI")
            if self.opts.cap("postcopy-preempt") and self.tls is None and self.opts.param("x-urgent-process"):
                self.urgent = UrgentSource()  # started now: serves the preempt connection if it is asked to
        w.write(WS.section_header(WS.Section.START, RAM_SECTION_ID, WR.IDSTR, WR.INSTANCE, WR.VERSION))
        huge = block.page_size if self.opts.cap("postcopy-ram") and block.page_size != TPS else None
        w.write(WR.setup_payload([WR.BlockInfo(block.name, block.size, huge)]))
        w.write(WS.section_footer(RAM_SECTION_ID))
        w.flush()
        if self.opts.cap("multifd"):
            self.multifd = MultifdSender(self.uri, self.opts.param("multifd-channels"), block, self._check,
                                         tls=self.tls)
        m.dirty_log_start()
        self.dirty_logging = True
        self._sync()  # dirty-sync-count 1, as QEMU's setup
        self.setup_time = int((time.monotonic() - self.start_time) * 1000)
        if not self.state.set(S.SETUP, S.ACTIVE):
            self._check()
        self._window_start = time.monotonic()
        self._window_bytes0 = self._sent()
        self._rate_window_start = self._window_start
        self._rate_bytes0 = self._sent()
        while True:
            self._check()
            if self.postcopy_requested:
                self._postcopy()
                return
            # switch over only once the first full pass is done (the bulk copy costs no downtime
            # while the guest runs) and what is left fits the downtime limit
            pending = self.sender.ndirty * TPS
            if pending == 0 or (not self.shrinking and self.stats.dirty_sync_count >= 2
                                and pending <= self._threshold()):
                if self.shrinking:
                    self._drain()  # the next merge then counts what the guest dirtied until it all landed
                self._sync()
                left = self.sender.ndirty * TPS
                if left <= self._threshold():
                    self.shrinking = self.shrink.another(
                        left, time.monotonic(), self.opts.param("x-shrink-passes"), self.opts.param("downtime-limit"),
                        left / (self.opts.param("max-bandwidth") or math.inf), self.last_pass[0])
                    if self.shrinking:
                        continue
                    break
                self.shrinking = False
                if pending == 0 and (reason := self._policy()):
                    self.switch_reason = reason  # a pass ended and precopy is not worth going on
                    self.postcopy_requested = True
                    continue
            self._iterate()
        with self._urgent():
            self._complete()

    def _sent(self) -> int:
        """Bytes sent (or queued) on the main channel and the multifd channels."""
        mf = self.multifd
        if mf is None:
            return self.writer.position
        self.stats.multifd_bytes = mf.bytes
        return self.writer.position + mf.bytes

    def _threshold(self) -> float:
        """Bytes that fit the downtime limit: measured bandwidth x downtime-limit. The bandwidth is the
        lower of the last 100 ms window (before the first one ends: the average so far) and the
        average since the last sync, so that one fast window does not trigger a switchover the link
        cannot finish in time."""
        bw = self.bandwidth
        if not bw:  # no 100 ms window has ended yet (a fast first pass): the average so far
            elapsed = time.monotonic() - self._window_start
            bw = (self._sent() - self._window_bytes0) / elapsed if elapsed > 0 else 0.0
        dt = time.monotonic() - self._pass_t0
        if dt >= RATE_WINDOW_S:
            bw = min(bw, (self._sent() - self._pass_bytes0) / dt)
        return bw * self.opts.param("downtime-limit") / 1000.0

    def _multifd_sync(self) -> bytes:
        """Drain the multifd channels up to a SYNC packet each; returns the main channel's marker."""
        if self.multifd is None or not self.multifd.unsynced:
            return b""
        self.multifd.sync()
        return WR.multifd_flush()

    def _precopy_eta(self) -> float:
        """Seconds precopy still needs from the last pass's figures: each pass sends what the one
        before let the guest dirty, so the passes shrink by dirty rate / bandwidth until what is
        left fits the downtime limit (infinite if the guest dirties as fast as the link sends)."""
        dt, sent, dirtied = self.last_pass
        if dt <= 0 or sent <= 0:
            return 0.0
        bw, rate = sent / dt, dirtied * TPS / dt
        left, fits = self.sender.ndirty * TPS, bw * self.opts.param("downtime-limit") / 1000
        if left <= fits:
            return left / bw
        if rate >= bw or fits <= 0:  # downtime-limit 0: nothing left ever fits
            return math.inf
        r = rate / bw
        passes = math.ceil(math.log(fits / left) / math.log(r)) if r > 0 else 1
        return left / bw * (1 - r ** passes) / (1 - r)

    def _policy(self) -> str | None:
        """livemig's switchover policy (postcopy-ram on): why to switch to postcopy now, or None."""
        if not self.opts.cap("postcopy-ram"):
            return None
        done = self.stats.dirty_sync_count - 1 - self.shrink.passes  # full passes
        after = self.opts.param("x-postcopy-after-passes")
        if after and done >= after:
            return f"{done} precopy pass(es) done (x-postcopy-after-passes {after})"
        budget = self.opts.param("x-switchover-budget") / 1000
        if not budget:
            return None
        eta = self._precopy_eta()
        used = time.monotonic() - self.start_time
        if used + eta <= budget:
            return None
        dt, sent, dirtied = self.last_pass
        how = (f"dirty rate {dirtied * TPS / dt / 1e6:.0f} MB/s vs bandwidth {sent / dt / 1e6:.0f} MB/s"
               if dt > 0 else "no pass figures")
        need = "never converge" if math.isinf(eta) else f"need {eta:.1f} s more"
        return f"precopy would {need} ({how}); budget {budget:.1f} s, {used:.1f} s used"

    def _sync(self, final: bool = False) -> None:
        if self.multifd is not None and self.multifd.unsynced:
            # a page sent before this merge may be sent again after it: the flush keeps the two
            # copies in order across channels
            self.writer.write(WS.section_header(WS.Section.PART, RAM_SECTION_ID) + self._multifd_sync()
                              + WR.eos() + WS.section_footer(RAM_SECTION_ID))
            self.writer.flush()  # the destination's receivers wait for this marker
        now = time.monotonic()
        prev_t0, prev_bytes0 = getattr(self, "_pass_t0", now), getattr(self, "_pass_bytes0", 0)
        self._pass_t0, self._pass_bytes0 = now, self._sent()
        words = self.machine.dirty_log_sync(clear=False) if final else self.machine.dirty_log_sync()
        newly = self.sender.merge(words)
        self.last_pass = (now - prev_t0, self._pass_bytes0 - prev_bytes0, newly)
        st = self.stats
        st.dirty_sync_count += 1
        if st.dirty_sync_count > 1 and self.last_pass[0] > 0:
            st.dirty_pages_rate = int(newly / self.last_pass[0])  # over the last pass (QEMU: the last >= 1 s)
        if self.bandwidth > 0:
            self.expected_downtime = self.sender.ndirty * TPS / self.bandwidth * 1000
        st.remaining = self.sender.ndirty * TPS
        if self.opts.cap("events"):
            self.emit("MIGRATION_PASS", {"pass": st.dirty_sync_count})

    def _iterate(self) -> None:
        """One RAM PART section: pages until 50 ms, the rate limit or the bitmap runs out."""
        w, sender = self.writer, self.sender
        w.write(WS.section_header(WS.Section.PART, RAM_SECTION_ID))
        t0 = time.monotonic()
        limit = self.opts.param("max-bandwidth") * RATE_WINDOW_S or float("inf")  # 0: unlimited
        throttled = False
        n = batch = batch_pages(limit)
        while sender.ndirty:
            idx = sender.next_batch(n)
            if not idx.size:
                break
            # untouched RAM goes as ZERO records: scan it in bigger batches (less Python per GiB)
            n = batch if sender.send(idx, self.multifd) else ZERO_SCAN_PAGES
            if self._sent() - self._rate_bytes0 >= limit:
                throttled = True
                break
            if time.monotonic() - t0 > ITERATE_MAX_S or self.cancel_requested:
                break
        w.write(WR.eos() + WS.section_footer(RAM_SECTION_ID))
        w.flush()
        if throttled:  # before _account, which would start a new window with its quota unused
            self._wait_rate_window(limit)
        self._account()

    def _account(self) -> None:
        now = time.monotonic()
        st = self.stats
        st.transferred = self._sent()
        if not self.in_postcopy:
            st.precopy_bytes = self._sent()
        dt = now - self._window_start
        if dt >= RATE_WINDOW_S:
            sent = self._sent() - self._window_bytes0
            self.bandwidth = sent / dt
            st.mbps = sent * 8 / dt / 1e6
            st.pages_per_second = int((st.normal + st.duplicate - getattr(self, "_win_pages0", 0)) / dt)
            self._win_pages0 = st.normal + st.duplicate
            self._window_start, self._window_bytes0 = now, self._sent()
        if now - self._rate_window_start >= RATE_WINDOW_S:
            self._rate_window_start, self._rate_bytes0 = now, self._sent()

    def _wait_rate_window(self, limit: float, urgent: threading.Event | None = None) -> None:
        """Sleep out the rate window whose `limit` bytes are spent; what the last batch sent
        beyond them counts against the next window."""
        end = self._rate_window_start + RATE_WINDOW_S
        while (left := end - time.monotonic()) > 0 and not self.cancel_requested:
            if urgent is not None:
                urgent.wait(min(left, 0.01))
                if self.requests:
                    return  # queued page requests ignore the rate limit
            else:
                time.sleep(min(left, 0.01))
        sent = self._sent()
        over = min(max(sent - self._rate_bytes0 - limit, 0), limit)
        self._rate_window_start, self._rate_bytes0 = time.monotonic(), sent - over

    # -- completion (postcopy: outgoing_postcopy.py; recovery: outgoing_recovery.py)
    def _await_shut(self, where: str) -> None:
        """The source completes only once the destination says so (SHUT 0 on the return path)."""
        deadline = time.monotonic() + SHUT_TIMEOUT_S
        while not self.shut.wait(0.05):
            self._check()
            if time.monotonic() > deadline:
                raise (LinkLost if self.in_postcopy else MigrationError)(
                    "destination did not confirm completion (no SHUT on the return path)")
        if self.shut_value != 0:
            raise MigrationError(f"destination reported an error {where} (SHUT {self.shut_value})")

    @contextlib.contextmanager
    def _urgent(self):
        """The guest is stopped: run this thread and the return-path thread (which takes in the
        destination's SHUT) ahead of ordinary threads (SCHED_FIFO, if allowed), so the downtime is
        not spent waiting for a core that the destination's threads hold."""
        rp = self.rp_thread.native_id if self.rp_thread is not None else None
        tids = [0] + ([rp] if rp else [])
        boosted = []
        for tid in tids:
            try:
                os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
                boosted.append(tid)
            except (OSError, AttributeError):
                break
        try:
            yield
        finally:
            for tid in boosted:
                try:
                    os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))
                except OSError:
                    pass  # the return-path thread has ended

    def _drain(self, max_wait: float = 0.25) -> None:
        """While the guest still runs: wait until the destination has taken in what was sent so
        far, so that this backlog is not part of the downtime (before the stop) or left out of the
        next merge's count (shrink passes). With a return path a PING proves it (the destination
        answers in stream order, after every byte before it; on loopback its receive queue alone
        holds megabytes, which SIOCOUTQ does not see); without one, wait for the send queue to empty."""
        if self.rp_thread is None or not self.pongs or self.rp_error:
            self._drain_send_queue(max_wait=max_wait)
            return
        with self.pong_cv:
            seen = self.pongs.count(WS.PING_DRAIN)
        self.writer.write(WS.ping(WS.PING_DRAIN))
        self.writer.flush()
        with self.pong_cv:
            self.pong_cv.wait_for(lambda: self.pongs.count(WS.PING_DRAIN) > seen or self.rp_error
                                  or self.shut.is_set(), timeout=max_wait)

    def _drain_send_queue(self, low: int = 64 << 10, max_wait: float = 0.25) -> None:
        """Wait until at most `low` bytes of the main channel are still in the kernel's send queue."""
        sock = self.chan.sock if self.chan is not None else None
        if sock is None:
            return
        deadline = time.monotonic() + max_wait
        buf = bytearray(4)
        try:
            while time.monotonic() < deadline:
                fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, buf)  # SIOCOUTQ: bytes not yet sent
                if int.from_bytes(buf, sys.byteorder) <= low:
                    return
                time.sleep(0.0005)
        except OSError:
            return

    def _stop_guest(self) -> float:
        """Switchover begins: stop the vCPU (if it runs) and enter `device`; returns the stop time."""
        m = self.machine
        self.was_running = m.running
        t_stop = time.monotonic()
        if self.was_running:
            m.pause()
            self.paused_by_us = True
            self.on_runstate("finish-migrate")
            self.emit("STOP", None)
        if not self.state.set(S.ACTIVE, S.DEVICE):
            self._check()
        return t_stop

    def _device_sections(self) -> bytes:
        if (gs := getattr(self.machine, "globalstate", None)) is not None:
            gs.runstate = "running" if self.was_running else "paused"  # as the guest was before us
        out = bytearray()
        for i, dev in enumerate(self.machine.devices(), start=1):
            out += WS.section_header(WS.Section.FULL, i, dev.idstr, dev.instance_id, dev.vmsd.version_id)
            out += encode(dev.vmsd, dev.save())
            out += WS.section_footer(i)
        return bytes(out)

    def _vmdesc(self) -> bytes:
        devs = []  # RAM is not a vmstate device: QEMU's tools parse it by its fixed layout
        for d in self.machine.devices():
            devs.append({"name": d.idstr, "instance_id": d.instance_id, "vmsd_name": d.vmsd.name,
                         "version": d.vmsd.version_id, **describe(d.vmsd)})
        desc = {"page_size": TPS, "configuration": {"vmsd_name": "configuration", "version": 1, "fields": [
            {"name": "len", "type": "uint32", "size": 4}, {"name": "name", "type": "buffer", "size": len(WS.MACHINE_TYPE)}]},
            "devices": devs}
        return json.dumps(desc, separators=(",", ":")).encode()

    def _complete(self) -> None:
        """Stop the guest, send the rest and the device state, wait for the destination's SHUT."""
        w = self.writer
        marks = self.switchover_marks = {}
        self._drain()
        t_stop = self._stop_guest()
        precopy_bytes = self._sent()
        marks["pause"] = time.monotonic() - t_stop
        w.write(WS.command(WS.Cmd.SWITCHOVER_START))
        self._sync(final=True)
        marks["sync"] = time.monotonic() - t_stop
        marks["pages"] = self.sender.ndirty
        marks["shrink-passes"] = self.shrink.passes
        w.write(WS.section_header(WS.Section.END, RAM_SECTION_ID))
        n = BATCH_PAGES
        while self.sender.ndirty:
            if self.cancel_requested:  # a file: or pipe has no shutdown that would stop the sends
                self._check()
            n = BATCH_PAGES if self.sender.send(self.sender.next_batch(n), self.multifd) else ZERO_SCAN_PAGES
        w.write(self._multifd_sync() + WR.eos() + WS.section_footer(RAM_SECTION_ID))
        marks["ram"] = time.monotonic() - t_stop
        w.write(self._device_sections())
        self._check()
        self.eof_sent = True  # from here SHUT(0) is a legal answer
        w.write(WS.eof() + WS.vmdescription(self._vmdesc()))
        w.flush()  # a cancel during it makes it fail: the destination then has part of a stream
        with self.switch_lock:
            self.handed_over = True  # the destination may start the guest any moment: no cancel now
            if self.cancel_requested:  # came after the stream was queued whole: SHUT decides
                self.cancel_requested = False
                self.state.set(S.CANCELLING, S.DEVICE)
        marks["devices"] = time.monotonic() - t_stop
        self.stats.downtime_bytes = self._sent() - precopy_bytes
        self.stats.transferred = self._sent()
        self.stats.remaining = 0
        if self.chan.bidirectional:
            self._await_shut("loading the migration stream")
        with self.switch_lock:
            self.end_time = self.shut_at or time.monotonic()  # the downtime ends when SHUT arrives
            marks["shut"] = self.end_time - t_stop
            self.downtime_ms = int((self.end_time - t_stop) * 1000)
            dt = self.end_time - self.start_time - self.setup_time / 1000
            if dt > 0:
                self.stats.mbps = self.stats.transferred * 8 / dt / 1e6
            # a cancel that lost the race with SHUT(0): the guest runs on the destination now
            self.cancel_requested = False
            self.on_runstate("postmigrate")  # before `completed` shows: the guest is not ours now
            self.state.set({S.DEVICE, S.CANCELLING}, S.COMPLETED)

    # -- failure and cleanup
    def _fail(self, e: Exception) -> None:
        if isinstance(e, (MigrationError, OSError)):
            msg = str(e)
        else:
            msg = f"internal error: {type(e).__name__}: {e}"
        if self.rp_error:  # the return path failed first; the send error is only its echo
            msg = self.rp_error
        self.end_time = time.monotonic()
        if self.state.status == S.CANCELLING or self.cancel_requested:
            self.state.set({S.CANCELLING}, S.CANCELLED)
            if self.state.status != S.CANCELLED:
                self.state.set({S.SETUP, S.ACTIVE, S.DEVICE, S.PRE_SWITCHOVER}, S.CANCELLING)
                self.state.set(S.CANCELLING, S.CANCELLED)
            return
        self.error = msg
        if self.handed_over and self.shut_value is None:
            # the whole stream went out and the destination never said how loading ended: it may run
            # the guest now, so this side must not (`cont` resumes it here if the destination is gone)
            self.error = f"{msg} (the whole stream was sent: the destination may be running the guest; " \
                         "the source stays paused)"
        st = self.state.status
        if st in S.IN_POSTCOPY - {S.POSTCOPY_DEVICE} or (st == S.POSTCOPY_DEVICE and self.package_loaded.is_set()):
            self.error = f"{msg} (postcopy: the guest runs on the destination; the source keeps its paused copy)"
            self.guest_moved = True
        if not self.state.set(S.RUNNING - {S.CANCELLING}, S.FAILED):
            self.state.set(S.CANCELLING, S.CANCELLED)  # a cancel came in since the check above

    def _cleanup(self) -> None:
        if getattr(self, "dirty_logging", False):
            try:
                self.machine.dirty_log_stop()
            except Exception:
                pass
        if self.state.status != S.COMPLETED and self.paused_by_us and not getattr(self, "guest_moved", False) \
                and not (self.handed_over and self.shut_value is None):
            try:
                self.machine.resume()  # a failed or cancelled precopy leaves the guest running
            except Exception as e:  # e.g. the vCPU died meanwhile: say so, and release the rest anyway
                print(f"livemig: the source guest could not be resumed: {e}", file=sys.stderr)
            else:
                self.on_runstate("running")
                self.emit("RESUME", None)
        if self.chan is not None:
            self.chan.shutdown()
            self.chan.close()
        if self.preempt_chan is not None:
            self.preempt_chan.shutdown()  # wakes a return-path thread blocked sending on it
            self.preempt_chan.close()
        if self.multifd is not None:
            self.multifd.close(graceful=self.state.status == S.COMPLETED)
        self._close_urgent()
        if self.rp_thread is not None:
            self.rp_thread.join(timeout=5)
        sender = getattr(self, "sender", None)
        if sender is not None and not (self.rp_thread is not None and self.rp_thread.is_alive()):
            sender.release()

    # -- the return-path thread
    def _queue_request(self, msg: RPW.ReqPages) -> None:
        if not self.in_postcopy:
            raise ProtocolError("return path: page request while not in postcopy")
        self._rp_last_block = check_page_request(msg, self.sender.block, self._rp_last_block)
        self.stats.postcopy_requests += 1
        if self.preempt is not None and self._send_urgent(msg.start, msg.length):
            return
        self.requests.append((msg.start, msg.length))
        self.wakeup.set()

    def _rp_loop(self) -> None:
        chan = self.chan
        assert chan is not None and chan.bidirectional
        dec = RPW.RPDecoder({self.sender.block.name: -(-self.sender.block.npages // 64) * 8})
        buf = bytearray(1 << 16)
        try:
            while True:
                n = chan.recv_into(buf)
                if not n:
                    if self.shut_value is None and self.state.status not in S.FINISHED and not self.rp_error:
                        self.rp_io = True
                        self.rp_error = "destination closed the return path before completion"
                        if not self.pongs and self.tls is None:
                            self.rp_error += (" (it never answered: see its error; a destination with tls-creds "
                                              "set refuses a plaintext source)")
                    break
                dec.feed(memoryview(buf)[:n])
                while (msg := dec.next_message()) is not None:
                    if isinstance(msg, RPW.ReqPages):
                        self._queue_request(msg)
                    elif isinstance(msg, RPW.Pong):
                        with self.pong_cv:
                            self.pongs.append(msg.value)
                            self.pong_cv.notify_all()
                        if msg.value == WS.PING_PACKAGED_LOADED:
                            self.package_loaded.set()
                    elif isinstance(msg, RPW.Shut):
                        if msg.value == 0 and not self.eof_sent:
                            raise ProtocolError("return path: SHUT(0) (loading done) before the end of the stream")
                        self.shut_at = time.monotonic()
                        self.shut_value = msg.value
                        self.shut.set()
                        return
                    elif isinstance(msg, RPW.RecvBitmap) and self.state.status == S.POSTCOPY_RECOVER:
                        self.bitmap = msg.bitmap
                        self.bitmap_event.set()
                    elif isinstance(msg, RPW.ResumeAck) and self.state.status == S.POSTCOPY_RECOVER:
                        self.resume_acked.set()
                    elif isinstance(msg, RPW.PreemptRequests) and not self.in_postcopy:
                        self.preempt_requests = True
                    else:
                        raise ProtocolError(f"return path: unexpected {type(msg).__name__} message")
        except ProtocolError as e:
            self.rp_error = str(e)
        except (OSError, TransportError) as e:  # TransportError: sending an urgent page on preempt
            if self.state.status not in S.FINISHED and not self.cancel_requested and not self.rp_error:
                self.rp_io = True
                self.rp_error = f"return path failed: {getattr(e, 'strerror', None) or e}"
        except Exception as e:  # never let the return path die silently
            self.rp_error = f"return path: {type(e).__name__}: {e}"
        if self.rp_error and not self.shut.is_set():
            chan.shutdown()
