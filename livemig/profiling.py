"""Opt-in profiling of migration threads: LIVEMIG_PROFILE=DIR writes one cProfile file per thread."""
from __future__ import annotations

import cProfile
import os
import threading
from typing import Callable


def run_profiled(fn: Callable[[], None]) -> None:
    out = os.environ.get("LIVEMIG_PROFILE")
    if not out:
        fn()
        return
    prof = cProfile.Profile()
    try:
        prof.runcall(fn)
    finally:
        name = threading.current_thread().name.replace("/", "_")
        prof.dump_stats(os.path.join(out, f"{name}-{os.getpid()}.prof"))


def make_urgent() -> bool:
    """Let the calling thread (one that carries page requests) preempt bulk-transfer threads on
    wake-up: SCHED_FIFO at the lowest real-time priority where allowed (root / CAP_SYS_NICE).
    Such threads only wake, do a few microseconds of work and block again."""
    if os.environ.get("LIVEMIG_URGENT_THREADS", "1") == "0":
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
        return True
    except (OSError, AttributeError):
        return False
