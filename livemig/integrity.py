"""Memory-integrity checks on guest RAM dumps: the workload's own invariant, and destination vs source."""
from __future__ import annotations

import numpy as np

from .guest.image import check_invariant

PAGE = 4096


def first_bytes(path: str) -> np.ndarray:
    """The first byte of every 4 KiB page of a pmemsave dump."""
    data = np.fromfile(path, dtype=np.uint8)
    return data[: data.size // PAGE * PAGE].reshape(-1, PAGE)[:, 0].copy()


def compare(src: np.ndarray, dst: np.ndarray) -> tuple[bool, str]:
    """Destination vs paused source: dst - src is one value n everywhere except at most one
    cyclically contiguous run of n + 1 (the pages the destination's interrupted pass reached)."""
    if src.shape != dst.shape:
        return False, f"dump sizes differ ({src.size} vs {dst.size} pages)"
    if src.size == 0:
        return False, "empty dumps: nothing was checked"
    d = (dst.astype(np.int16) - src.astype(np.int16)) & 0xFF
    values = np.unique(d)
    if values.size == 1:
        return True, f"every page advanced by {int(values[0])} on the destination"
    if values.size > 2:
        return False, f"{values.size} different page deltas between destination and source ({values[:6].tolist()})"
    lo, hi = int(values[0]), int(values[1])
    if (hi - lo) % 256 != 1 and (lo - hi) % 256 != 1:
        return False, f"page deltas {lo} and {hi} are not one pass apart"
    for v in (lo, hi):
        mask = d == v
        edges = int(np.count_nonzero(mask[1:] != mask[:-1])) + (1 if mask[0] != mask[-1] else 0)
        if edges <= 2:
            return True, f"pages advanced by {lo}/{hi} passes in two contiguous runs"
    return False, "page deltas are not in contiguous runs: pages were lost or sent stale"


def check(src: np.ndarray | None, dst: np.ndarray) -> tuple[bool, str]:
    ok, why = check_invariant(dst)
    if not ok:
        return False, f"guest invariant broken on the destination: {why}"
    if src is not None:
        ok2, why2 = compare(src, dst)
        if not ok2:
            return False, why2
        return True, f"{why}; {why2}"
    return True, why


def page_digests(path: str) -> np.ndarray:
    """A 64-bit digest of every 4 KiB page of a dump (two independent sums of the page's words)."""
    words = np.fromfile(path, dtype="<u8")
    pages = words[: words.size // 512 * 512].reshape(-1, 512)
    weights = (np.arange(1, 513, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    with np.errstate(over="ignore"):
        return (pages * weights).sum(axis=1, dtype=np.uint64) ^ pages.sum(axis=1, dtype=np.uint64)


def compare_pages(src: np.ndarray, dst: np.ndarray) -> tuple[bool, str]:
    """Every page of the destination equals the source's (digests from ``page_digests``)."""
    if src.shape != dst.shape:
        return False, f"dump sizes differ ({src.size} vs {dst.size} pages)"
    bad = np.flatnonzero(src != dst)
    if bad.size:
        return False, (f"{bad.size} of {src.size} pages differ, first at "
                       f"{', '.join(hex(int(p) * PAGE) for p in bad[:4])}")
    return True, f"all {src.size} pages identical"
