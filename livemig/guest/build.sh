#!/bin/sh
# Reassemble workload.bin (the 512-byte boot sector) from workload.S with binutils.
set -eu
cd "$(dirname "$0")"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
as --64 -o "$tmp/workload.o" workload.S
ld -m elf_x86_64 -Ttext=0x7c00 -e _start -o "$tmp/workload.elf" "$tmp/workload.o"
objcopy -O binary -j .text "$tmp/workload.elf" workload.bin
size=$(wc -c < workload.bin)
[ "$size" -eq 512 ] || { echo "workload.bin is $size bytes, expected 512" >&2; exit 1; }
echo "workload.bin: 512 bytes"
