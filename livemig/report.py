"""Migration reports: the sampled query-migrate timeline as JSON, and a PNG plot of it.

A sample is taken by whoever drives the migration (the CLI, the benchmarks) every ~100 ms:
`sample(t, info)` keeps the figures worth plotting. `write_report(dir, samples, result)` writes
`timeline.json` (samples + both sides' final query-migrate) and `report.png`: throughput,
remaining bytes, dirty rate and passes over time with the switchover marked, and the
destination's remote-fault latency histogram (postcopy with postcopy-blocktime).
"""
from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

SWITCH_STATES = ("device", "postcopy-device", "postcopy-active")


def sample(t: float, info: dict) -> dict[str, Any]:
    """The plotted figures of one source query-migrate at `t` seconds since `migrate`."""
    ram = info.get("ram", {})
    return {"t": round(t, 4), "status": info.get("status"),
            "transferred": ram.get("transferred", 0), "remaining": ram.get("remaining", 0),
            "mbps": ram.get("mbps", 0.0), "dirty-pages-rate": ram.get("dirty-pages-rate", 0),
            "dirty-sync-count": ram.get("dirty-sync-count", 0),
            "postcopy-requests": ram.get("postcopy-requests", 0)}


def switchover_time(samples: list[dict]) -> float | None:
    """When the guest stopped on the source (first sample in device or a postcopy state)."""
    for s in samples:
        if s["status"] in SWITCH_STATES or (s["status"] == "completed" and s is samples[-1]):
            return s["t"]
    return None


def throughput_series(samples: list[dict]) -> tuple[list[float], list[float]]:
    """MB/s between consecutive samples, from the transferred counter."""
    ts, mbs = [], []
    for a, b in zip(samples, samples[1:]):
        dt = b["t"] - a["t"]
        if dt > 0:
            ts.append(b["t"])
            mbs.append(max(b["transferred"] - a["transferred"], 0) / dt / 1e6)
    return ts, mbs


def write_report(out: str | Path, samples: list[dict], result: dict) -> list[Path]:
    """Write timeline.json and (if matplotlib is importable) report.png into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    src, dst = result.get("source", {}), result.get("destination", {})
    doc = {"samples": samples, "switchover-s": switchover_time(samples), "source": src, "destination": dst,
           "switchover-reason": src.get("x-livemig-switchover-reason")}
    written = [out / "timeline.json"]
    written[0].write_text(json.dumps(doc, indent=1))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    fig, axes = plt.subplots(5, 1, figsize=(9, 13), constrained_layout=True)
    t = [s["t"] for s in samples]
    sw = doc["switchover-s"]
    title = f"livemig migration: {src.get('status', '?')}, total {src.get('total-time', '-')} ms, " \
            f"downtime {src.get('downtime', '-')} ms"
    reason = doc["switchover-reason"]
    fig.suptitle(title + ("\n" + textwrap.fill(f"postcopy: {reason}", 100) if reason else ""))
    ts, mbs = throughput_series(samples)
    panels = [
        (axes[0], ts, mbs, "throughput (MB/s)"),
        (axes[1], t, [s["remaining"] / 1e6 for s in samples], "remaining (MB)"),
        (axes[2], t, [s["dirty-pages-rate"] * 4096 / 1e6 for s in samples], "dirty rate (MB/s)"),
        (axes[3], t, [s["dirty-sync-count"] for s in samples], "passes (dirty syncs)"),
    ]
    for ax, x, y, label in panels:
        ax.step(x, y, where="post") if label.startswith("passes") else ax.plot(x, y)
        ax.set_ylabel(label)
        ax.set_xlabel("seconds since migrate")
        if sw is not None:
            ax.axvline(sw, color="red", linestyle="--", label="switchover")
            ax.legend(loc="upper right")
    ax = axes[4]
    dist = dst.get("postcopy-latency-dist") or []
    if any(dist):
        last = max(i for i, c in enumerate(dist) if c) + 1
        ax.bar(range(last), dist[:last])
        ax.set_xticks(range(last))
        ax.set_xticklabels([f"{1 << i}" for i in range(last)], rotation=45)
        ax.set_xlabel("remote-fault latency, from (µs; bucket up to twice that)")
        ax.set_ylabel("faults")
    else:
        ax.text(0.5, 0.5, "no remote faults (precopy, or postcopy-blocktime off)", ha="center", va="center")
        ax.set_axis_off()
    png = out / "report.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return written + [png]
