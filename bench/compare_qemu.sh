#!/usr/bin/env bash
# livemig vs QEMU 7.2 on the same boot-sector guest, same QMP sequence, same run (alternating),
# through the shared harness (../shared/bench/compare.py). Needs: apt-get install -y qemu-system-x86
# and livemig on PATH (pip install -e .).
#   SCENARIOS="idle idle-prefill full-precopy" MEMS="1G 4G" REPS=3 bench/compare_qemu.sh
# QEMU_PREALLOC=1 starts QEMU with -mem-prealloc, so that, like livemig's destination (which
# allocates guest RAM while it waits for the stream), it does not allocate guest RAM inside the
# migration window; on a host where fresh memory is dear (bench/host_memory.py) this decides
# the first pass. The host's memory settings and first-touch cost go into the results folder.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
harness=${HARNESS:-$here/../../shared/bench}
[ -f "$harness/compare.py" ] || { echo "shared bench harness not found at $harness (set HARNESS=)" >&2; exit 2; }
command -v qemu-system-x86_64 >/dev/null || { echo "QEMU missing: apt-get install -y qemu-system-x86" >&2; exit 2; }
out=${OUT:-$here/results/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$out"
python3 "$here/host_memory.py" --reps 1 --pause 3 | tee "$out/host_memory.txt"
if [ "${QEMU_PREALLOC:-0}" = 1 ]; then  # the harness runs qemu-system-x86_64 from PATH
  mkdir -p "$out/qemu-prealloc"
  printf '#!/bin/sh\nexec %s "$@" -mem-prealloc\n' "$(command -v qemu-system-x86_64)" \
    > "$out/qemu-prealloc/qemu-system-x86_64"
  chmod +x "$out/qemu-prealloc/qemu-system-x86_64"
  export PATH="$out/qemu-prealloc:$PATH"
  echo "QEMU runs with -mem-prealloc"
fi
for mem in ${MEMS:-1G 4G}; do
  for sc in ${SCENARIOS:-idle idle-prefill full-precopy}; do
    echo "== $sc $mem"
    (cd "$harness" && python3 compare.py --scenario "$sc" --mem "$mem" --reps "${REPS:-3}" \
        --out "$out/${sc}_${mem}" ${PORT:+--port $PORT}) | tee "$out/${sc}_${mem}.txt" || true
  done
done
# the CPU target as the issue words it: src + dst CPU s per GiB migrated, livemig / QEMU
python3 "$here/cpu_per_gib.py" "$out"/*_*/ | tee "$out/cpu_per_gib.md" || true
echo "results in $out"
