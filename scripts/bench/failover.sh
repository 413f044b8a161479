#!/usr/bin/env bash
# Disk-failure figures: the failover gap, read errors, and the time to restore a copy.
#
#   sudo scripts/bench/failover.sh                 1 GiB image, cached mode
#   sudo scripts/bench/failover.sh --size 256M --io-mode passthrough
#
# Three ext4 filesystems on loop devices are the pool's disks; an image written by fio with
# crc32c verification headers is imported with 2 copies; the pool is mounted. fio then reads
# and verifies the image with O_DIRECT through the view of the disk that holds no copy, in a
# loop (fio checks every block's crc32c header), while `xfs_io -x -c shutdown` kills the
# disk holding the copy that serves it. Printed:
#   failover gap   the longest single read (fio clat max) while the disk died, next to the
#                  longest read of a run without a failure on the same pool
#   read errors    fio's error count and verification failures (target: 0)
#   restore        seconds from the shutdown until the image has 2 healthy copies again,
#                  and that per GiB of copy data (probe, detection and copy together)
# Everything mounted or attached is undone on exit, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SIZE=1G
IO_MODE=cached
while (($#)); do
    case $1 in
        --size) SIZE=$2; shift 2 ;;
        --io-mode) IO_MODE=$2; shift 2 ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "failover.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
[[ $(id -u) == 0 ]] || { echo "failover.sh: needs root (loop devices, mounts)" >&2; exit 1; }
cd "$ROOT"
bash scripts/deps.sh >&2
if [[ -n ${IMGPOOL_BIN:-} ]]; then
    BIN=$IMGPOOL_BIN
else
    cargo build --release >&2
    BIN=$ROOT/target/release/imgpool
fi

W=$(mktemp -d /tmp/imgpool-failover.XXXXXX)
export IMGPOOL_STATE_DIR=$W/state
LOOPS=()
MNT=$W/mnt
cleanup() {
    local rc=$? m
    set +e
    if awk -v p="$MNT" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; then
        timeout 60 "$BIN" umount --lazy "$MNT" >/dev/null
    fi
    for m in $(awk -v d="$W" 'index($5, d "/") == 1 { print length($5) "\t" $5 }' /proc/self/mountinfo |
        sort -rn | cut -f2-); do
        umount -l "$m"
    done
    for l in "${LOOPS[@]}"; do losetup -d "$l"; done
    rm -rf --one-file-system "$W"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bytes=$(numfmt --from=iec "$SIZE")
disk_size=$((bytes * 2 + (256 << 20)))
"$BIN" init >/dev/null
for d in d1 d2 d3; do
    truncate -s "$disk_size" "$W/$d.fs"
    l=$(losetup --find --show "$W/$d.fs")
    LOOPS+=("$l")
    mkfs.ext4 -q -F "$l"
    mkdir -p "$W/$d"
    mount "$l" "$W/$d"
done
# d3 joins after the import, so that the copies land on d1 and d2 and d3 is the survivor whose
# view the reader uses.
"$BIN" disk add d1 "$W/d1" >/dev/null
"$BIN" disk add d2 "$W/d2" >/dev/null
FIO_IMAGE=(--name=image --bs=128k --size="$SIZE" --verify=crc32c --verify_state_save=0 --ioengine=psync)
fio "${FIO_IMAGE[@]}" --filename="$W/image" --rw=write --do_verify=0 --output=/dev/null
uuid=$("$BIN" image add img "$W/image" --copies 2 --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])')
rm -f "$W/image"
"$BIN" disk add d3 "$W/d3" >/dev/null
"$BIN" config set probe-interval 1s >/dev/null
mkdir -p "$MNT"
"$BIN" mount "$MNT" --io-mode "$IO_MODE" --cache-size 64MiB >/dev/null
serving=$("$BIN" image show img --json | python3 -c '
import json, sys
print(next(c["disk"] for c in json.load(sys.stdin)["copies"] if c["serving"]))')
VIEW=$W/d3/backing-images/img-$uuid/backing

# Reads the image over and over for $1 seconds with O_DIRECT, 128 KiB per read, checking
# every block's crc32c header; fio JSON to $2.
verify() {
    # From the work directory: fio may leave a verify state file where it runs.
    (cd "$W" && fio --name=image --filename="$VIEW" --rw=read --bs=128k --size="$SIZE" --verify=crc32c \
        --verify_state_save=0 --direct=1 --ioengine=psync --time_based --runtime="$1" --continue_on_error=all \
        --output-format=json --output="$2") || true
}
summary() {
    python3 - "$1" <<'EOF'
import json, sys
job = json.load(open(sys.argv[1]))["jobs"][0]
r = job["read"]
print(f'{r["clat_ns"]["max"] / 1e6:.1f} {r["clat_ns"]["mean"] / 1e6:.3f} {job["total_err"]} {r["io_bytes"]}')
EOF
}

echo "baseline: reading and verifying for 5 s without a failure..." >&2
verify 5 "$W/baseline.json"
read -r base_max base_mean base_err _ <<<"$(summary "$W/baseline.json")"

runtime=$((15 + 15 * bytes / (1 << 30)))
echo "failure: reading and verifying for $runtime s; disk $serving (the serving copy) is shut down after 2 s..." >&2
verify "$runtime" "$W/failure.json" &
reader=$!
sleep 2
shutdown_at=$(date +%s.%N)
xfs_io -x -c shutdown "$W/$serving"
restored=""
for _ in $(seq 1 1200); do
    if "$BIN" image show img --json | python3 -c '
import json, sys
i = json.load(sys.stdin)
sys.exit(0 if i["healthy_copies"] == 2 and i["state"] == "ready" else 1)'; then
        restored=$(date +%s.%N)
        break
    fi
    sleep 0.25
done
wait "$reader" || true
read -r fail_max fail_mean fail_err fail_bytes <<<"$(summary "$W/failure.json")"
[[ -n $restored ]] || { echo "failover.sh: the image did not get 2 healthy copies within 5 min" >&2; exit 1; }
restore=$(python3 -c "print(f'{$restored - $shutdown_at:.1f}')")
per_gib=$(python3 -c "print(f'{($restored - $shutdown_at) / ($bytes / 2**30):.1f}')")

printf '\n| %s mode, %s image, 3 ext4 loop disks | without failure | disk %s shut down |\n' "$IO_MODE" "$SIZE" "$serving"
printf '|---|---|---|\n'
printf '| longest single read (ms) | %s | %s |\n' "$base_max" "$fail_max"
printf '| mean read (ms) | %s | %s |\n' "$base_mean" "$fail_mean"
printf '| read errors (fio total_err) | %s | %s |\n' "$base_err" "$fail_err"
printf '| bytes read and verified | | %s |\n' "$(numfmt --to=iec "$fail_bytes")"
printf '| shutdown → 2 healthy copies (s) | | %s (%s s per GiB) |\n' "$restore" "$per_gib"
echo
"$BIN" status | sed -n '/faults:/p'
