"""A fake destination that sends malformed return-path messages: the source must fail the
migration with a clear error, never hang, and keep (or get back) its guest running."""
import socket
import struct
import threading
import time

import pytest

from livemig.wire import returnpath as RP

BAD_RP = {
    "unknown type": (struct.pack(">HH", 99, 0), False, "unknown message type"),
    "wrong length": (struct.pack(">HH", 1, 3) + b"\x00" * 3, False, "length"),
    "over 512 bytes": (struct.pack(">HH", 3, 600) + b"\x00" * 600, False, "exceeds 512"),
    "req before id": (RP.req_pages(0, 4096, None), False, "REQ_PAGES before"),
    "request in precopy": (RP.req_pages(0, 4096, "pc.ram"), False, "not in postcopy"),
    "request outside block": (RP.req_pages(64 << 20, 4096, "pc.ram"), True, "outside"),
    "misaligned request": (RP.req_pages(100, 4096, "pc.ram"), True, "aligned"),
    "unknown block": (RP.req_pages(0, 4096, "pc.rom"), True, "unknown RAM block"),
    "bitmap not asked for": (RP.recv_bitmap("pc.ram", b"\x00" * 2048), False, "unexpected RecvBitmap"),
}


class FakeDestination:
    """Accepts the migration, drains the stream, and answers with `reply` after `delay` seconds."""

    def __init__(self, reply: bytes, delay: float):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.reply, self.delay = reply, delay
        self.received = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        conn, _ = self.srv.accept()
        self.srv.close()
        conn.settimeout(30)
        t0 = time.monotonic()
        sent = False
        try:
            while True:
                if not sent and time.monotonic() - t0 > self.delay:
                    conn.sendall(self.reply)
                    sent = True
                data = conn.recv(1 << 20)
                if not data:
                    break
                self.received += len(data)
        except OSError:
            pass
        conn.close()


def _assert_failed_and_source_runs(src, expect: str) -> None:
    """The migration failed with `expect` in its error, and the source guest runs on."""
    info = src.wait_status({"failed", "completed", "cancelled"}, timeout=30)
    assert info["status"] == "failed", info
    assert expect.lower() in info["error-desc"].lower(), info
    n = len(src.output())
    time.sleep(0.3)
    assert len(src.output()) > n, "the source guest is not running after the failed migration"
    assert src.cmd("query-status")["status"] == "running"


@pytest.mark.parametrize("case", sorted(BAD_RP))
def test_malformed_return_path(vms, case):
    reply, in_postcopy, expect = BAD_RP[case]
    src = vms("src", memory="64M", ws_mib=4, prefill=True)
    src.wait_passes(2)
    caps = [{"capability": "events", "state": True}]
    if in_postcopy:
        caps.append({"capability": "postcopy-ram", "state": True})
        src.cmd("migrate-set-parameters", **{"max-postcopy-bandwidth": 1_000_000})
    src.cmd("migrate-set-capabilities", capabilities=caps)
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 5_000_000})  # stays in precopy a while
    fake = FakeDestination(reply, delay=1.0 if in_postcopy else 0.3)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{fake.port}")
    if in_postcopy:
        src.cmd("migrate-start-postcopy")
    _assert_failed_and_source_runs(src, expect)


BAD_PREEMPT = {
    "not a page request": (RP.pong(7), "unexpected Pong"),
    "request outside block": (RP.req_pages(64 << 20, 4096, "pc.ram"), "outside"),
    "unknown type": (struct.pack(">HH", 99, 0), "unknown message type"),
}


class FakePreemptDestination:
    """Announces x-preempt-requests (unless `announce` is false, as a QEMU destination) and answers
    PONG on the main connection, accepts the source's postcopy-preempt connection and, a second
    later, sends `reply` on it (or on the main connection: `on_main`); drains both, counting what
    the preempt connection brings after the reply."""

    def __init__(self, reply: bytes, announce: bool = True, on_main: bool = False):
        self.srv = socket.create_server(("127.0.0.1", 0))
        self.port = self.srv.getsockname()[1]
        self.reply, self.announce, self.on_main = reply, announce, on_main
        self.after_reply = 0  # bytes on the preempt connection after the reply went out
        self.replied = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _drain(self, conn, count: bool = False):
        try:
            while data := conn.recv(1 << 20):
                if count and self.replied.is_set():
                    self.after_reply += len(data)
        except OSError:
            pass

    def _run(self):
        main, _ = self.srv.accept()
        main.sendall((RP.preempt_requests() if self.announce else b"") + RP.pong(1))
        threading.Thread(target=self._drain, args=(main,), daemon=True).start()
        self.srv.settimeout(30)
        try:
            preempt, _ = self.srv.accept()
        except OSError:
            return
        finally:
            self.srv.close()
        threading.Thread(target=self._drain, args=(preempt, True), daemon=True).start()
        time.sleep(1.0)  # the source is in postcopy by then
        self.replied.set()
        (main if self.on_main else preempt).sendall(self.reply)


@pytest.mark.parametrize("urgent", [True, False], ids=["urgent-process", "threads"])
@pytest.mark.parametrize("case", sorted(BAD_PREEMPT))
def test_malformed_request_on_preempt_channel(vms, case, urgent):
    """With x-preempt-requests the source also reads the preempt connection (in its urgent process,
    or in a thread): bad input there fails the migration clearly, before the package is loaded,
    and the source guest runs on."""
    reply, expect = BAD_PREEMPT[case]
    src = vms("src", memory="64M", ws_mib=4, prefill=True)
    src.wait_passes(2)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}
                                                      for c in ("events", "postcopy-ram", "postcopy-preempt")])
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 5_000_000, "max-postcopy-bandwidth": 1_000_000,
                                         "x-urgent-process": urgent})
    fake = FakePreemptDestination(reply)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{fake.port}")
    time.sleep(0.3)
    src.cmd("migrate-start-postcopy")
    _assert_failed_and_source_runs(src, expect)


@pytest.mark.parametrize("announce", [True, False], ids=["livemig-destination", "qemu-destination"])
def test_requested_page_already_sent_goes_again_only_to_livemig(vms, announce):
    """A requested page the background push has sent already: a destination that announced
    x-preempt-requests (a livemig, which keeps the first copy) gets it again on the preempt
    channel at once (x-preempt-resend, on by default); one that did not (QEMU, which would fail on
    a second copy) gets nothing there: the page is on its way on the main channel."""
    src = vms("src", memory="64M", ws_mib=4, prefill=True)
    src.wait_passes(2)
    src.cmd("migrate-set-capabilities", capabilities=[{"capability": c, "state": True}
                                                      for c in ("events", "postcopy-ram", "postcopy-preempt")])
    # page 0 (below the working set, all zero) goes in the first MiB; 64 MiB take the push ~16 s
    src.cmd("migrate-set-parameters", **{"max-bandwidth": 4_000_000, "max-postcopy-bandwidth": 4_000_000})
    fake = FakePreemptDestination(RP.req_pages(0, 4096, "pc.ram"), announce=announce, on_main=not announce)
    src.cmd("migrate", uri=f"tcp:127.0.0.1:{fake.port}")
    src.cmd("migrate-start-postcopy")
    assert fake.replied.wait(30)
    time.sleep(1.0)
    info = src.cmd("query-migrate")
    assert info["status"].startswith("postcopy"), info
    assert info["ram"]["postcopy-requests"] == 1, info
    if announce:
        assert fake.after_reply > 0, fake.after_reply  # its page record (a zero page here), at once
    else:
        assert fake.after_reply == 0, fake.after_reply
