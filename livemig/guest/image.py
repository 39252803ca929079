"""The workload guest: a 512-byte boot sector (workload.bin, built from workload.S by build.sh).

Options are little-endian u32 values patched into the sector at fixed offsets:

    WS_MIB_OFFSET  = 0x1f6   working set in MiB: 0 = all RAM ([1 MiB, low RAM end) + RAM above 4 GiB),
                             N = [1 MiB, 1 MiB + N MiB) (clamped to the low RAM end)
    PREFILL_OFFSET = 0x1fa   nonzero: increment the first byte of every page of all RAM once
                             ([1 MiB, low RAM end) + RAM above 4 GiB) before the loop starts

The guest increments the first byte of every 4 KiB page of the working set in address order, forever,
and writes '#' to COM1 when the loop starts, then one character per completed pass ('.', or '\\n'
instead of every 64th '.'). So serial output length - 1 == completed passes.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

SECTOR_SIZE = 512
WS_MIB_OFFSET = 0x1F6
PREFILL_OFFSET = 0x1FA
WORKING_SET_START = 0x100000  # 1 MiB: code, stack and page tables are all below it
LOOP_START_CHAR = b"#"
PASS_CHARS = b".\n"

_BIN = Path(__file__).with_name("workload.bin")


def boot_sector() -> bytes:
    data = _BIN.read_bytes()
    if len(data) != SECTOR_SIZE or data[510:] != b"\x55\xaa":
        raise ValueError(f"{_BIN} is not a 512-byte boot sector")
    return data


def make_image(ws_mib: int = 0, prefill: bool = False) -> bytes:
    """The boot sector with the working-set size (MiB, 0 = all RAM) and prefill flag patched in."""
    if not 0 <= ws_mib < 1 << 32:
        raise ValueError(f"ws_mib {ws_mib} out of range")
    b = bytearray(boot_sector())
    struct.pack_into("<I", b, WS_MIB_OFFSET, ws_mib)
    struct.pack_into("<I", b, PREFILL_OFFSET, 1 if prefill else 0)
    return bytes(b)


def passes_from_output(out: bytes) -> int:
    """Completed passes from the serial output (characters after the '#')."""
    i = out.find(LOOP_START_CHAR)
    return -1 if i < 0 else len(out) - i - 1


def check_invariant(first_bytes: np.ndarray) -> tuple[bool, str]:
    """Check the guest's invariant on the first byte of each working-set page, in address order.

    Every page must equal the previous one, except at most one place where it is one less (mod 256)
    (the point the interrupted pass had reached).
    """
    a = np.asarray(first_bytes, dtype=np.uint8).ravel()
    if a.size < 2:
        return True, f"{a.size} page(s): trivially consistent"
    d = (a[:-1].astype(np.int16) - a[1:].astype(np.int16)) & 0xFF  # previous - current (mod 256)
    bad = np.flatnonzero((d != 0) & (d != 1))
    if bad.size:
        i = int(bad[0]) + 1
        return False, (f"page {i} has first byte {int(a[i])} after {int(a[i - 1])} "
                       f"({bad.size} bad transition(s))")
    steps = np.flatnonzero(d == 1)
    if steps.size > 1:
        return False, (f"{steps.size} places where a page is one less than the previous one "
                       f"(pages {', '.join(str(int(s) + 1) for s in steps[:5])})")
    if steps.size == 1:
        i = int(steps[0]) + 1
        return True, f"pass in progress at page {i} of {a.size} (value {int(a[i - 1])} before, {int(a[i])} from there)"
    return True, f"all {a.size} pages equal ({int(a[0])})"
