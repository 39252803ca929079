"""livemig vs QEMU on the shared harness with extra migration capabilities set on both sides
(for instance `postcopy-preempt`, which the harness's own QMP sequence does not set).

    python3 bench/qemu_caps_compare.py --caps postcopy-preempt [--mem 1G] [--reps 3] [--postcopy-immediate]
                                       [--livemig-params x-urgent-process=true,...]

Each run is one `../shared/bench/migrate_once.py --scenario postcopy` whose
`migrate-set-capabilities` (source and destination) gets the extra capabilities appended; nothing
else of the harness changes (same guest, same QMP sequence, same integrity check). Runs alternate
qemu, livemig, qemu, ... and the medians and ratios are printed: switchover -> complete, page
requests, destination blocktime, blocktime per request. Needs qemu-system-x86 and livemig on PATH.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HARNESS = Path(os.environ.get("HARNESS", Path(__file__).resolve().parents[2] / "shared" / "bench"))


def run_one_patched(extra_caps: list[str], params: dict, argv: list[str]) -> int:
    """In this process: the harness's migrate_once with `extra_caps` added to every
    migrate-set-capabilities it sends, and `params` set on each side just before its
    `migrate-incoming` or `migrate`."""
    sys.path.insert(0, str(HARNESS))
    import migrate_once  # the shared harness, unchanged on disk

    plain = migrate_once.QMP.cmd

    def cmd(self, name, **args):
        if name == "migrate-set-capabilities":
            caps = list(args["capabilities"])
            have = {c["capability"] for c in caps}
            caps += [{"capability": c, "state": True} for c in extra_caps if c not in have]
            args["capabilities"] = caps
        if name in ("migrate", "migrate-incoming") and params:
            plain(self, "migrate-set-parameters", **params)
        return plain(self, name, **args)

    migrate_once.QMP.cmd = cmd
    sys.argv = [str(HARNESS / "migrate_once.py")] + argv
    return migrate_once.main()


def parse_params(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=", 1)
        out[k] = {"true": True, "false": False}.get(v.lower(), int(v) if v.lstrip("-").isdigit() else v)
    return out


def figures(res: dict) -> dict:
    s = (res.get("src_query_migrate") or {}).get("ram") or {}
    d = res.get("dst_query_migrate") or {}
    req = s.get("postcopy-requests") or 0
    bt = d.get("postcopy-blocktime")
    return {"ok": res.get("outcome") == "completed" and bool((res.get("integrity") or {}).get("ok"))
            and bool(res.get("verify_ok", True)),
            "s2c_s": res.get("switch_to_complete_s"), "requests": req, "blocktime_ms": bt,
            "per_request_ms": (bt / req) if (bt is not None and req) else None,
            "downtime_ms": (res.get("src_query_migrate") or {}).get("downtime"),
            "livemig_p50_us": (d.get("x-livemig-postcopy") or {}).get("p50-us"),
            "livemig_p99_us": (d.get("x-livemig-postcopy") or {}).get("p99-us"),
            "error": res.get("error")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--caps", default="postcopy-preempt", help="comma-separated capabilities to add")
    ap.add_argument("--mem", default="1G")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--postcopy-immediate", action="store_true")
    ap.add_argument("--port", type=int, default=4700)
    ap.add_argument("--livemig-params", default="",
                    help="livemig's own parameters for both sides, k=v,... (true/false/integers)")
    ap.add_argument("--run-one", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    a = ap.parse_args()
    caps = [c for c in a.caps.split(",") if c]
    if a.run_one is not None:
        vmm = a.run_one[a.run_one.index("--vmm") + 1]
        return run_one_patched(caps, parse_params(a.livemig_params) if vmm == "livemig" else {}, a.run_one)
    if not (HARNESS / "migrate_once.py").exists():
        sys.exit(f"shared bench harness not found at {HARNESS} (set HARNESS=)")
    out = Path(tempfile.mkdtemp(prefix="livemig-capscmp-"))
    rows: dict[str, list[dict]] = {"qemu": [], "livemig": []}
    for i in range(a.reps):
        for k, vmm in enumerate(("qemu", "livemig")):
            js = out / f"{vmm}_r{i + 1}.json"
            argv = ["--vmm", vmm, "--scenario", "postcopy", "--mem", a.mem, "--json", str(js),
                    "--port", str(a.port + 2 * i + k)] + (["--postcopy-immediate"] if a.postcopy_immediate else [])
            subprocess.run([sys.executable, __file__, "--caps", a.caps, "--livemig-params", a.livemig_params,
                            "--run-one"] + argv,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=900)
            f = figures(json.loads(js.read_text())) if js.exists() else {"ok": False, "error": "no result"}
            rows[vmm].append(f)
            print(f"{vmm:7} run {i + 1}: " + "  ".join(f"{key} {val}" for key, val in f.items()), flush=True)
    print(f"\npostcopy {a.mem}, extra capabilities {caps}, medians of the runs that passed "
          f"(qemu {sum(r['ok'] for r in rows['qemu'])}/{a.reps}, livemig {sum(r['ok'] for r in rows['livemig'])}/{a.reps}):")
    print("| metric | QEMU | livemig | livemig/QEMU |\n|---|---|---|---|")
    for key in ("s2c_s", "requests", "blocktime_ms", "per_request_ms", "downtime_ms", "livemig_p50_us", "livemig_p99_us"):
        med = {}
        for vmm in rows:
            vals = [r[key] for r in rows[vmm] if r["ok"] and r.get(key) is not None]
            med[vmm] = statistics.median(vals) if vals else None
        q, l = med["qemu"], med["livemig"]
        ratio = f"{l / q:.2f}" if q and l is not None else "-"
        print(f"| {key} | {q if q is None else round(q, 3)} | {l if l is None else round(l, 3)} | {ratio} |")
    print(f"results in {out}")
    return 0 if all(r["ok"] for v in rows.values() for r in v) else 1


if __name__ == "__main__":
    sys.exit(main())
