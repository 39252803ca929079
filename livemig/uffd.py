"""Linux userfaultfd from Python: open, API handshake, register MISSING, COPY / ZEROPAGE / WAKE,
and reading fault messages. Every ioctl argument is a small buffer (<= 1024 bytes), so
fcntl.ioctl releases the GIL while the kernel works.
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import struct
import time

from . import gilcalls
from .errors import GuestError

UFFD_API = 0xAA
UFFDIO_API = 0xC018AA3F
UFFDIO_REGISTER = 0xC020AA00
UFFDIO_UNREGISTER = 0x8010AA01
UFFDIO_WAKE = 0x8010AA02
UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_CONTINUE = 0xC020AA07
USERFAULTFD_IOC_NEW = 0xAA00
UFFDIO_REGISTER_MODE_MISSING = 1
UFFDIO_REGISTER_MODE_MINOR = 4
UFFD_EVENT_PAGEFAULT = 0x12
UFFD_FEATURE_THREAD_ID = 1 << 8
UFFD_FEATURE_MISSING_HUGETLBFS = 1 << 4
UFFD_FEATURE_MINOR_SHMEM = 1 << 10
MSG_SIZE = 32
EAGAIN_RETRIES = 1000  # a placement ioctl that makes no progress (the address space is changing)
SYS_userfaultfd = 323  # x86-64

_libc = ctypes.CDLL(None, use_errno=True)
_MSG = struct.Struct("<B7xQQI4x")  # event, flags, address, ptid (pagefault layout)


def _open_fd(flags: int) -> int:
    try:
        dev = os.open("/dev/userfaultfd", os.O_RDWR | os.O_CLOEXEC)
        try:
            return fcntl.ioctl(dev, USERFAULTFD_IOC_NEW, flags)
        finally:
            os.close(dev)
    except OSError:
        fd = _libc.syscall(SYS_userfaultfd, flags)
        if fd < 0:
            e = ctypes.get_errno()
            raise GuestError(f"userfaultfd is not available on this host: {os.strerror(e)}") from None
        return fd


def probe() -> tuple[bool, int, str]:
    """(available, supported features, reason) without keeping anything open."""
    try:
        fd = _open_fd(os.O_CLOEXEC | os.O_NONBLOCK)
    except GuestError as e:
        return False, 0, str(e)
    try:
        buf = bytearray(struct.pack("<QQQ", UFFD_API, 0, 0))
        fcntl.ioctl(fd, UFFDIO_API, buf, True)
        _, features, _ = struct.unpack("<QQQ", buf)
        return True, features, "ok"
    except OSError as e:
        return False, 0, f"UFFDIO_API failed: {e.strerror}"
    finally:
        os.close(fd)


class UserFault:
    """One userfaultfd: register ranges, place pages atomically, read faults (blocking)."""

    def __init__(self, want_features: int = UFFD_FEATURE_THREAD_ID):
        ok, supported, why = probe()
        if not ok:
            raise GuestError(why)
        # non-blocking: the fault thread sleeps in poll(); a fault resolved between poll() and
        # read() leaves the queue, and a blocking read() would then hang
        self.fd = _open_fd(os.O_CLOEXEC | os.O_NONBLOCK)
        self._msg_buf = bytearray(MSG_SIZE * 16)  # up to 16 fault messages a read
        feats = want_features & supported
        buf = bytearray(struct.pack("<QQQ", UFFD_API, feats, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_API, buf, True)
        except OSError as e:
            os.close(self.fd)
            raise GuestError(f"UFFDIO_API failed: {e.strerror}") from None
        self.features = feats

    @classmethod
    def attach(cls, fd: int) -> UserFault:
        """A userfaultfd another process made and passed here (its API handshake is done)."""
        self = cls.__new__(cls)
        self.fd = fd
        self.features = 0
        self._msg_buf = bytearray(MSG_SIZE * 16)
        return self

    def register(self, addr: int, length: int, mode: int = UFFDIO_REGISTER_MODE_MISSING) -> None:
        buf = bytearray(struct.pack("<QQQQ", addr, length, mode, 0))
        try:
            fcntl.ioctl(self.fd, UFFDIO_REGISTER, buf, True)
        except OSError as e:
            raise GuestError(f"UFFDIO_REGISTER of {length} bytes failed: {e.strerror}") from None

    def unregister(self, addr: int, length: int) -> None:
        try:
            fcntl.ioctl(self.fd, UFFDIO_UNREGISTER, struct.pack("<QQ", addr, length))
        except OSError:
            pass

    def wake(self, addr: int, length: int) -> None:
        fcntl.ioctl(self.fd, UFFDIO_WAKE, struct.pack("<QQ", addr, length))

    def copy(self, dst: int, src: int, length: int, buf: bytearray | None = None, hold_gil: bool = False) -> int:
        """UFFDIO_COPY; returns bytes placed. Pages already present end the copy early (EEXIST
        or a partial count with EAGAIN): the caller skips one page and continues. `buf` (40
        bytes) lets each placing thread use its own argument buffer. `hold_gil`: for a page or
        a few (gilcalls)."""
        buf = buf if buf is not None else bytearray(40)
        struct.pack_into("<QQQQq", buf, 0, dst, src, length, 0, 0)
        return self._place(UFFDIO_COPY, buf, 32, "UFFDIO_COPY", hold_gil)

    def zeropage(self, dst: int, length: int, buf: bytearray | None = None) -> int:
        """UFFDIO_ZEROPAGE, with the same partial-result rules as copy(); `buf` is 32 bytes."""
        buf = buf if buf is not None else bytearray(32)
        struct.pack_into("<QQQq", buf, 0, dst, length, 0, 0)
        return self._place(UFFDIO_ZEROPAGE, buf, 24, "UFFDIO_ZEROPAGE")

    def cont(self, dst: int, length: int, buf: bytearray | None = None, hold_gil: bool = False) -> int:
        """UFFDIO_CONTINUE: map the page-cache pages already under [dst, dst+length) (minor
        faults), with the same partial-result rules as copy(); `buf` is 32 bytes. `hold_gil`:
        for a page or a few (gilcalls)."""
        buf = buf if buf is not None else bytearray(32)
        struct.pack_into("<QQQq", buf, 0, dst, length, 0, 0)
        return self._place(UFFDIO_CONTINUE, buf, 24, "UFFDIO_CONTINUE", hold_gil)

    def _place(self, request: int, buf: bytearray, result_at: int, what: str, hold_gil: bool = False) -> int:
        """Bytes placed from the start of the range: 0 means its first page is present already
        (EEXIST). A short count stops at a page that is present or that failed: the caller asks
        again from there, which tells the two apart. No progress at all with EAGAIN (the address
        space was changing) is retried here."""
        addr = gilcalls.buffer_address(buf) if hold_gil else 0
        for attempt in range(EAGAIN_RETRIES):
            if attempt:  # (the caller's pack_into zeroed it for the first)
                struct.pack_into("<q", buf, result_at, 0)
            if hold_gil:
                err = gilcalls.ioctl(self.fd, request, addr)
                if err == -errno.EEXIST:
                    return 0
                if err < 0 and err != -errno.EAGAIN:
                    raise GuestError(f"{what} failed: {os.strerror(-err)}")
            else:
                try:
                    fcntl.ioctl(self.fd, request, buf, True)
                except OSError as e:
                    if e.errno == errno.EEXIST:
                        return 0
                    if e.errno != errno.EAGAIN:
                        raise GuestError(f"{what} failed: {e.strerror}") from None
            (done,) = struct.unpack_from("<q", buf, result_at)
            if done > 0:
                return done
            time.sleep(0.0001)
        raise GuestError(f"{what} made no progress (EAGAIN {EAGAIN_RETRIES} times)")

    def read_faults(self) -> list[tuple[int, int, int]]:
        """Read pending fault messages: [(address, flags, thread id)]; [] when woken otherwise."""
        buf = self._msg_buf
        n = gilcalls.read_nowait(self.fd, buf)  # the fd is non-blocking: no need to give up the GIL
        if n < 0:
            if n in (-errno.EAGAIN, -errno.EINTR):
                return []
            raise OSError(-n, os.strerror(-n))
        data = memoryview(buf)[:n]
        out = []
        for off in range(0, len(data) - MSG_SIZE + 1, MSG_SIZE):
            event, flags, addr, ptid = _MSG.unpack_from(data, off)
            if event == UFFD_EVENT_PAGEFAULT:
                out.append((addr, flags, ptid))
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
