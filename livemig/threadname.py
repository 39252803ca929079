"""Kernel names of threads (what `top -H`, py-spy and /proc show), used to tell vCPU threads apart."""
from __future__ import annotations

import ctypes
import threading

from .profiling import run_profiled

PR_SET_NAME = 15
VCPU_THREAD_NAME = "vcpu0"
_libc = ctypes.CDLL(None, use_errno=True)


def set_thread_name(name: str) -> None:
    """Name the calling thread (at most 15 bytes are kept)."""
    _libc.prctl(PR_SET_NAME, ctypes.c_char_p(name.encode()[:15]), 0, 0, 0)


class NamedThread(threading.Thread):
    """A thread whose kernel name is its Python name, as QEMU names its threads with debug-threads=on.

    Names are cut to 15 bytes by the kernel, so keep the first 15 distinct."""

    def run(self) -> None:
        set_thread_name(self.name)
        run_profiled(super().run)  # LIVEMIG_PROFILE=DIR: one cProfile file per thread


def is_vcpu_thread(pid: int, tid: int) -> bool:
    """Whether thread `tid` of process `pid` is a vCPU thread (False if it is gone)."""
    try:
        with open(f"/proc/{pid}/task/{tid}/comm", "rb") as f:
            return f.read().strip() == VCPU_THREAD_NAME.encode()
    except OSError:
        return False
