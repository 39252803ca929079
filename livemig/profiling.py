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

