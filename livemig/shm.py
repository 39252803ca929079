"""What the destination shares with its urgent-path process: numpy arrays on a memfd (passed by
file descriptor) and a pipe used as a mutex between threads and processes."""
from __future__ import annotations

import mmap
import os
import select

import numpy as np

from .errors import GuestError

LOCK_TIMEOUT_S = 10.0


def shared_array(n: int, dtype=np.bool_, fd: int | None = None) -> tuple[int, np.ndarray]:
    """A zeroed array of `n` items on a new memfd, or the one already on memfd `fd` (another
    process's); returns (fd, array). The caller owns the fd."""
    size = max(n * np.dtype(dtype).itemsize, 1)
    if fd is None:
        fd = os.memfd_create("livemig-shared", os.MFD_CLOEXEC)
        os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return fd, np.frombuffer(m, dtype=dtype, count=n)


def nonzero_of_shared(view: np.ndarray) -> np.ndarray:
    """np.flatnonzero of a shared array's `view` that another process may write meanwhile: taken
    on a private copy. numpy counts the nonzero items, allocates, then fills; if the count changes
    in between it returns entries it never filled (garbage, out of range as often as not)."""
    return np.flatnonzero(view.copy())


class PipeLock:
    """A mutex that works across processes: holding it means having read the one byte in the pipe.
    `fds` (read end, write end) attaches to a lock made in another process."""

    def __init__(self, fds: tuple[int, int] | None = None):
        if fds is None:
            self.r, self.w = os.pipe()
            os.set_blocking(self.r, False)  # two waiters both woken: the loser goes back to poll
            os.write(self.w, b"\0")
        else:
            self.r, self.w = fds

    @property
    def fds(self) -> tuple[int, int]:
        return self.r, self.w

    def __enter__(self) -> PipeLock:
        while True:
            try:
                if os.read(self.r, 1):
                    return self
            except BlockingIOError:
                pass
            poller = select.poll()  # one per wait: a poll object is not for two threads at once
            poller.register(self.r, select.POLLIN)
            if not poller.poll(LOCK_TIMEOUT_S * 1000):
                raise GuestError("the postcopy claim lock was not released (its holder died?)")

    def __exit__(self, *exc) -> None:
        os.write(self.w, b"\0")

    def close(self) -> None:
        for fd in (self.r, self.w):
            try:
                os.close(fd)
            except OSError:
                pass
