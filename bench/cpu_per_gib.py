#!/usr/bin/env python3
"""CPU seconds per GiB migrated, source + destination, from the shared harness's results: the
issue-5 target "CPU s per GiB migrated, src + dst <= 1.2x QEMU", computed as it is worded.

Reads the per-run JSON files (`qemu_r1.json`, `livemig_r1.json`, ...) that `compare.py` writes
into each scenario folder (`bench/compare_qemu.sh` puts them under its results folder), and prints
for each folder the medians of (src + dst CPU s during the migration) / (GiB on the wire), and
livemig / QEMU. Only completed runs count. The harness's CPU is per process, so a source whose
guest runs faster during the migration is charged for it (livemig's vCPU does not wait for a big
lock); `bench/thread_cpu.py` splits it by thread.

    python3 bench/cpu_per_gib.py bench/results/DATE/idle-prefill_1G [more folders ...]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VMMS = ("qemu", "livemig")


def per_gib(run: dict) -> float | None:
    """(src + dst CPU s in the migration) / GiB transferred, or None if it did not complete."""
    cpu = run.get("cpu_s_migration") or {}
    ram = (run.get("src_query_migrate") or {}).get("ram") or {}
    moved = ram.get("transferred") or 0
    if run.get("outcome") != "completed" or moved <= 0 or cpu.get("src") is None or cpu.get("dst") is None:
        return None
    return (cpu["src"] + cpu["dst"]) / (moved / 2**30)


def folder_medians(folder: Path) -> dict[str, tuple[float, int]]:
    """vmm -> (median CPU s per GiB, completed runs) over the folder's runs of that VMM."""
    out = {}
    for vmm in VMMS:
        vals = [v for f in sorted(folder.glob(f"{vmm}_r*.json")) if (v := per_gib(json.loads(f.read_text()))) is not None]
        if vals:
            out[vmm] = (statistics.median(vals), len(vals))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="scenario folders written by compare.py")
    args = ap.parse_args()
    print("| scenario | QEMU CPU s/GiB (runs) | livemig CPU s/GiB (runs) | livemig / QEMU |")
    print("|---|---|---|---|")
    for folder in args.folders:
        m = folder_medians(folder)
        cells = [f"{m[v][0]:.2f} ({m[v][1]})" if v in m else "-" for v in VMMS]
        ratio = f"{m['livemig'][0] / m['qemu'][0]:.2f}" if len(m) == 2 else "-"
        print(f"| {folder.name} | {cells[0]} | {cells[1]} | {ratio} |")


if __name__ == "__main__":
    main()
