#!/usr/bin/env bash
# imgpool export benchmark: `image add --from-volume` against `qemu-img convert -O raw` of the
# equivalent qcow2 chain and against `cp --sparse=always` of the already-flattened file, side
# by side in one run, on the same data.
#
#   sudo scripts/bench/export.sh                 4 GiB base (2 GiB of data), 10 snapshots with
#                                                400 MiB of scattered writes, median of 3
#   sudo scripts/bench/export.sh --scale 4 --repeat 1     a quarter of that, once
#
# Options:
#   --scale N        divide every size by N (default 1)
#   --repeat N       repeats, medians reported (default 3)
#
# The data: a base image with data in every other 64 MiB; a volume over it and a chain of
# qcow2 files over the same base, each written the same (40 MiB per snapshot in 256 KiB
# pieces at random offsets, each piece filled with one byte, written with python through the
# mount and with qemu-io into the qcow2 layer), then 10 snapshots / 10 layers.
# Each measurement starts with cold caches. Reported: seconds, MiB/s of logical size, ratio to
# qemu-img convert (higher is faster), bytes stored, and a check that all three produce the
# same SHA-512.
#
# Needs root. Installs what is missing (scripts/deps.sh) and builds the release binary
# (IMGPOOL_BIN=/path/to/imgpool skips the build). Unmounts and removes everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SCALE=1
REPEAT=3
die() { echo "exportbench: $*" >&2; exit 1; }
need_val() { [[ $# -ge 2 && -n $2 ]] || die "$1 needs a value"; }
while (($#)); do
    case "$1" in
        --scale) need_val "$@"; SCALE=$2; shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown argument '$1' (try --help)" ;;
    esac
    shift
done
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || die "--scale must be a positive integer"
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || die "--repeat must be a positive integer"
[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, drop_caches)"

source "$ROOT/scripts/bench/pool.sh"
bench_binary
command -v qemu-io >/dev/null || die "qemu-io is missing (package qemu-utils)"
bench_workdir exportbench /var/tmp
SIZE=$((4096 / SCALE))M
SIZE_B=$(numfmt --from=iec "$SIZE")
PIECE=$((256 * 1024))
PIECES=$((40 * 1024 * 1024 / PIECE / SCALE))
SNAPSHOTS=10
echo "exportbench: building the data ($SIZE base, $SNAPSHOTS snapshots of $PIECES x 256 KiB)" >&2

# The base: data in every other 64 MiB.
truncate -s "$SIZE_B" "$W/base.raw"
for ((at = 0; at < SIZE_B; at += 128 * 1024 * 1024)); do
    head -c $((64 * 1024 * 1024)) /dev/urandom | dd of="$W/base.raw" bs=1M seek=$((at / 1048576)) conv=notrunc status=none
done
ip init >/dev/null
ip disk add d1 "$W/disk" >/dev/null
ip image add base "$W/base.raw" >/dev/null
ip mount "$W/mnt" --no-bind >/dev/null
MOUNTED=1
ip volume create v --image base >/dev/null
for ((i = 0; i < 50; i++)); do [[ -e $W/mnt/volumes/v ]] && break; sleep 0.1; done
qemu-img convert -f raw -O qcow2 "$W/base.raw" "$W/layer0.qcow2"

# The same writes into the volume and into a new qcow2 layer, then a snapshot.
prev=$W/layer0.qcow2
for ((s = 1; s <= SNAPSHOTS; s++)); do
    layer=$W/layer$s.qcow2
    qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$layer"
    python3 - "$W/mnt/volumes/v" "$SIZE_B" "$PIECE" "$PIECES" "$s" >"$W/writes.$s" <<'EOF'
import os, random, sys
path, size, piece, pieces, level = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(level)
fd = os.open(path, os.O_WRONLY)
for _ in range(pieces):
    offset = rng.randrange(size // piece) * piece
    byte = rng.randrange(1, 256)
    os.pwrite(fd, bytes([byte]) * piece, offset)
    print(f"write -P {byte} {offset} {piece}")
os.fsync(fd)
os.close(fd)
EOF
    args=()
    while read -r line; do args+=(-c "$line"); done <"$W/writes.$s"
    qemu-io -f qcow2 "${args[@]}" "$layer" >/dev/null
    for ((i = 0; i < 50; i++)); do ip snapshot create "v@s$s" >/dev/null 2>&1 && break; sleep 0.1; done
    prev=$layer
done
LAST=$prev

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; ip cache drop >/dev/null 2>&1 || true; }
now() { date +%s.%N; }
RAW=$W/raw.jsonl
: >"$RAW"
record() { # tool rep seconds sha512 stored_bytes [seconds of the SHA-512 pass after it]
    printf '{"tool":"%s","rep":%s,"seconds":%s,"sha512":"%s","stored":%s,"sum_seconds":%s}\n' "$1" "$2" "$3" "$4" "$5" "${6:-null}" >>"$RAW"
}
stored() { stat -c '%b %B' "$1" | awk '{ print $1 * $2 }'; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }

START=$(date +%s)
for ((rep = 1; rep <= REPEAT; rep++)); do
    order=(imgpool qemu cp)
    mapfile -t order < <(printf '%s\n' "${order[@]}" | shuf)
    for tool in "${order[@]}"; do
        drop_caches
        case $tool in
            imgpool)
                ip image rm "exp" >/dev/null 2>&1 || true
                t0=$(now)
                ip image add exp --from-volume "v@s$SNAPSHOTS" >/dev/null
                t1=$(now)
                # Committed before its SHA-512 is known: the sum is computed after the export
                # returns (by the mount daemon, or now by `image checksum`), timed apart.
                ip image checksum exp --json >"$W/sum.json"
                t2=$(now)
                sha=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["sha512"])' <"$W/sum.json")
                copy=$(ip image show exp --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["copies"][0]["path"])')
                record imgpool "$rep" "$(elapsed "$t0" "$t1")" "$sha" "$(stored "$copy")" "$(elapsed "$t1" "$t2")" ;;
            qemu)
                rm -f "$W/flat.raw"
                t0=$(now)
                qemu-img convert -f qcow2 -O raw "$LAST" "$W/flat.raw"
                sync -f "$W/flat.raw"
                t1=$(now)
                record qemu "$rep" "$(elapsed "$t0" "$t1")" "$(sha512sum "$W/flat.raw" | cut -d' ' -f1)" "$(stored "$W/flat.raw")" ;;
            cp)
                [[ -e $W/flat.raw ]] || qemu-img convert -f qcow2 -O raw "$LAST" "$W/flat.raw"
                drop_caches
                rm -f "$W/copy.raw"
                t0=$(now)
                cp --sparse=always "$W/flat.raw" "$W/copy.raw"
                sync -f "$W/copy.raw"
                t1=$(now)
                record cp "$rep" "$(elapsed "$t0" "$t1")" "$(sha512sum "$W/copy.raw" | cut -d' ' -f1)" "$(stored "$W/copy.raw")" ;;
        esac
        echo "rep $rep $tool: $(tail -n1 "$RAW")" >&2
    done
done
ELAPSED=$(($(date +%s) - START))

python3 - "$RAW" "$SIZE_B" "$SNAPSHOTS" "$PIECES" "$REPEAT" "$ELAPSED" "$("$BIN" --version)" "$(uname -r)" "$(nproc)" "scripts/bench/export.sh --scale $SCALE --repeat $REPEAT" <<'EOF'
import json, statistics, sys
raw, size, snaps, pieces, repeat, elapsed, version, kernel, nproc, command = sys.argv[1:]
rows = [json.loads(l) for l in open(raw)]
size = int(size)
med = {}
for tool in ["imgpool", "qemu", "cp"]:
    mine = [r for r in rows if r["tool"] == tool]
    med[tool] = (statistics.median(r["seconds"] for r in mine), statistics.median(r["stored"] for r in mine), {r["sha512"] for r in mine})
shas = set().union(*(m[2] for m in med.values()))
names = {"imgpool": "imgpool image add --from-volume v@s10", "qemu": "qemu-img convert -O raw (qcow2 chain of 11)", "cp": "cp --sparse=always (flattened raw)"}
print(f"\nimgpool export benchmark: {command}")
print(f"{size >> 20} MiB volume over a base with half of it data, {snaps} snapshots of {pieces} x 256 KiB writes; median of {repeat}; {nproc} CPUs, kernel {kernel}, {version}; took {elapsed} s")
print(f"same SHA-512 from all three: {'yes' if len(shas) == 1 else 'NO: ' + str(shas)}\n")
print("| tool | seconds | MiB/s (logical) | speed / qemu-img convert | stored MiB |")
print("|---|--:|--:|--:|--:|")
for tool in ["imgpool", "qemu", "cp"]:
    s, stored, _ = med[tool]
    print(f"| {names[tool]} | {s:.2f} | {size / 2**20 / s:,.0f} | {med['qemu'][0] / s:.2f} | {stored / 2**20:,.0f} |")
sums = [r["sum_seconds"] for r in rows if r["tool"] == "imgpool"]
print(f"\nimgpool's SHA-512 of the image, computed after the export returned (`image checksum`): {statistics.median(sums):.2f} s (median)")
EOF
