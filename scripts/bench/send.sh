#!/usr/bin/env bash
# imgpool send benchmark: the whole send of a volume, and incremental sends as a function of the
# change size at a fixed volume size (issue 13: the time grows with the change, not the volume).
#
#   sudo scripts/bench/send.sh                   4 GiB volume, 2 GiB of data, changes of 1 MiB,
#                                                100 MiB and 1 GiB, median of 3
#   sudo scripts/bench/send.sh --scale 4 --repeat 1      a quarter of every size, once
#
# Options:
#   --scale N        divide every size by N (default 1)
#   --repeat N       repeats, medians reported (default 3)
#
# The data: a volume over zeros with data in every other 64 MiB (written through the mount),
# snapshot s0; then each change rewrites that many bytes as 4 KiB blocks at random places
# (random bytes), and takes snapshot c1, c2, c3. Measured, each from cold caches, with the
# volume closed (read under its writer lock): `send v@s0` (whole), and `send v@cN --from
# c(N-1)` for each change, to a file on the same filesystem. Reported: seconds, stream bytes,
# stream bytes over the bytes changed. The whole send runs first, so the incrementals start
# from a recorded sum (a first incremental without one reads the older snapshot's granules
# once more).
#
# Needs root. Installs what is missing (scripts/deps.sh) and builds the release binary
# (IMGPOOL_BIN=/path/to/imgpool skips the build). Unmounts and removes everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SCALE=1
REPEAT=3
die() { echo "sendbench: $*" >&2; exit 1; }
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
bench_workdir sendbench /var/tmp
SIZE_B=$((4096 * 1024 * 1024 / SCALE))
CHANGES=($((1024 * 1024 / SCALE)) $((100 * 1024 * 1024 / SCALE)) $((1024 * 1024 * 1024 / SCALE)))
echo "sendbench: $((SIZE_B >> 20)) MiB volume, half of it data; changes of ${CHANGES[*]} bytes" >&2

ip init >/dev/null
ip disk add d1 "$W/disk" >/dev/null
ip volume create v --size "$SIZE_B" >/dev/null
ip mount "$W/mnt" --no-bind >/dev/null
MOUNTED=1
for ((i = 0; i < 50; i++)); do [[ -e $W/mnt/volumes/v ]] && break; sleep 0.1; done

# Waits until the mount let go of the volume (its last file closed), so that a snapshot and a
# send read it here, under its writer lock.
closed() {
    for ((i = 0; i < 100; i++)); do
        ip volume show v --json | python3 -c 'import json,sys; sys.exit(json.load(sys.stdin)["open_by_pid"] is not None)' && return
        sleep 0.05
    done
    die "the volume stays open in the mount"
}

python3 - "$W/mnt/volumes/v" "$SIZE_B" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
piece = 64 << 20
fd = os.open(path, os.O_WRONLY)
for at in range(0, size, 2 * piece):
    for off in range(at, min(at + piece, size), 1 << 20):
        os.pwrite(fd, os.urandom(1 << 20), off)
os.fsync(fd)
os.close(fd)
EOF
closed
ip snapshot create v@s0 >/dev/null
for n in 1 2 3; do
    python3 - "$W/mnt/volumes/v" "$SIZE_B" "${CHANGES[$((n - 1))]}" "$n" <<'EOF'
import os, random, sys
path, size, change, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(seed)
fd = os.open(path, os.O_WRONLY)
for block in rng.sample(range(size // 4096), change // 4096):
    os.pwrite(fd, os.urandom(4096), block * 4096)
os.fsync(fd)
os.close(fd)
EOF
    closed
    ip snapshot create "v@c$n" >/dev/null
done

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
RAW=$W/raw.jsonl
: >"$RAW"
measure() { # label changed_bytes send-args...
    local label=$1 changed=$2
    shift 2
    drop_caches
    local t0 t1
    t0=$(date +%s.%N)
    ip send "$@" >"$W/out/stream"
    t1=$(date +%s.%N)
    printf '{"label":"%s","changed":%s,"seconds":%s,"bytes":%s}\n' "$label" "$changed" \
        "$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')" \
        "$(stat -c %s "$W/out/stream")" >>"$RAW"
    echo "$label: $(tail -n1 "$RAW")" >&2
    rm -f "$W/out/stream"
}

START=$(date +%s)
for ((rep = 1; rep <= REPEAT; rep++)); do
    measure whole "$((SIZE_B / 2))" v@s0
    prev=s0
    for n in 1 2 3; do
        measure "incremental $n" "${CHANGES[$((n - 1))]}" "v@c$n" --from "$prev"
        prev=c$n
    done
done
ELAPSED=$(($(date +%s) - START))

python3 - "$RAW" "$SIZE_B" "$REPEAT" "$ELAPSED" "$("$BIN" --version)" "$(uname -r)" "$(nproc)" "scripts/bench/send.sh --scale $SCALE --repeat $REPEAT" <<'EOF'
import json, statistics, sys
raw, size, repeat, elapsed, version, kernel, nproc, command = sys.argv[1:]
rows = [json.loads(l) for l in open(raw)]
labels = list(dict.fromkeys(r["label"] for r in rows))
print(f"\nimgpool send benchmark: {command}")
print(f"{int(size) >> 20} MiB volume, half of it data; median of {repeat}; cold caches; {nproc} CPUs, kernel {kernel}, {version}; took {elapsed} s\n")
print("| send | bytes changed | seconds | stream MiB | stream / changed |")
print("|---|--:|--:|--:|--:|")
for label in labels:
    mine = [r for r in rows if r["label"] == label]
    s = statistics.median(r["seconds"] for r in mine)
    b = statistics.median(r["bytes"] for r in mine)
    changed = mine[0]["changed"]
    what = "whole (`send v@s0`)" if label == "whole" else f"`--from` after {changed / 2**20:g} MiB of 4 KiB writes"
    print(f"| {what} | {changed / 2**20:,.0f} MiB | {s:.2f} | {b / 2**20:,.1f} | {b / changed:.3f} |")
EOF
