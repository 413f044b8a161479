#!/usr/bin/env bash
# imgpool import benchmark: a qcow2 image imported directly (`imgpool image add NAME x.qcow2`)
# against the two-step way without qcow2 support (`qemu-img convert -O raw` to a temporary
# file, then `imgpool image add` of that raw file), side by side in one run, on the same data.
#
#   sudo scripts/bench/imports.sh                  1 GiB disk, half of it data, median of 3
#   sudo scripts/bench/imports.sh --size 256M --repeat 1
#
# Options:
#   --size SIZE        virtual disk size (default 1G); half of it is data, in 4 MiB stripes
#   --repeat N         repeats, medians reported (default 3)
#   --json-out FILE    results as JSON (default target/bench/imports.json)
#
# Cases (the same disk content in each):
#   plain    one qcow2 file, as `qemu-img convert -O qcow2` writes it
#   chain3   a base and two overlays (`qemu-img create -b`), a third of the data in each
#   zlib     one qcow2 file with compressed clusters (`qemu-img convert -c`)
# Each measurement starts cold (page cache dropped) on an empty pool; the two ways run in
# random order within each repeat. Reported: median seconds of each, the ratio (two-step time
# / direct time: above 1 means the direct import is faster), and the stored bytes of both
# (which must be equal, and equal to the data size).
#
# Needs root (drop_caches). Installs what is missing (scripts/deps.sh) and builds the release
# binary (IMGPOOL_BIN=/path/to/imgpool skips the build). Removes everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SIZE_ARG=1G
REPEAT=3
JSON_OUT=$ROOT/target/bench/imports.json
ORIG_ARGS=("$@")
die() { echo "importbench: $*" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }
need_val() { [[ $# -ge 2 && -n $2 ]] || { echo "importbench: $1 needs a value" >&2; exit 2; }; }
while (($#)); do
    case "$1" in
        --size) need_val "$@"; SIZE_ARG=$2; shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        --json-out) need_val "$@"; JSON_OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "importbench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "importbench: --repeat must be a positive integer" >&2; exit 2; }
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "importbench: --size '$SIZE_ARG' is not a size like 256M or 1G" >&2; exit 2; }
((SIZE >= 25165824 && SIZE % 8388608 == 0)) || { echo "importbench: --size must be a multiple of 8 MiB, at least 24M" >&2; exit 2; }
[[ $JSON_OUT = /* ]] || JSON_OUT=$ROOT/$JSON_OUT
[[ $(id -u) -eq 0 ]] || die "must run as root (drop_caches)"

source "$ROOT/scripts/bench/pool.sh"
bench_binary
bench_workdir importbench
mkdir -p "$W/src"
new_stripe() { head -c $((STRIPE / 4 * 3)) /dev/urandom | base64 -w0 >"$W/stripe"; } # 4 MiB of text
STRIPE=$((4 << 20))
STRIPES=$((SIZE / STRIPE))

# The disk: every other 4 MiB stripe data, the rest never written. For the chain, the data
# stripes go to the base, the middle and the top in turn. The data is random bytes in base64
# (text that deflate shrinks by about a quarter, as it does real disks), so that the zlib
# image has compressed clusters: qemu-img stores a cluster that does not shrink as is.
log "importbench: building the images ($SIZE_ARG)"
qemu-img create -q -f qcow2 "$W/src/base.qcow2" "$SIZE"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$W/src/mid.qcow2"
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 "$W/src/top.qcow2"
new_stripe
layers=(base mid top)
for ((i = 0; i < STRIPES; i += 2)); do
    layer=${layers[$(((i / 2) % 3))]}
    qemu-io -f qcow2 -c "write -s $W/stripe $((i * STRIPE)) $STRIPE" "$W/src/$layer.qcow2" >/dev/null
    new_stripe # no two stripes alike
done
rm -f "$W/stripe"
qemu-img convert -O qcow2 "$W/src/top.qcow2" "$W/src/plain.qcow2"
qemu-img convert -c -O qcow2 "$W/src/top.qcow2" "$W/src/zlib.qcow2"
EXPECTED_SHA=$(qemu-img convert -O raw "$W/src/plain.qcow2" "$W/check.raw" && sha512sum "$W/check.raw" | cut -c1-128)
rm -f "$W/check.raw"
declare -A IMAGE=([plain]=plain.qcow2 [chain3]=top.qcow2 [zlib]=zlib.qcow2)
CASES=(plain chain3 zlib)

RAW=$W/raw.jsonl
: >"$RAW"
fresh_pool() {
    rm -rf "$W/state" "$W/disk" "$W/tmp.raw"
    mkdir -p "$W/state" "$W/disk"
    "$BIN" --state-dir "$W/state" init >/dev/null 2>&1
    "$BIN" --state-dir "$W/state" disk add d1 "$W/disk" >/dev/null
}
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }

# Times one way of importing case CASE; records one result line.
measure() { # case way
    local case=$1 way=$2 src=$W/src/${IMAGE[$1]} t0 t1 info
    fresh_pool
    drop_caches
    t0=$(date +%s.%N)
    if [[ $way == direct ]]; then
        "$BIN" --state-dir "$W/state" image add img "$src" >/dev/null
    else
        qemu-img convert -O raw "$src" "$W/tmp.raw"
        "$BIN" --state-dir "$W/state" image add img "$W/tmp.raw" >/dev/null
    fi
    t1=$(date +%s.%N)
    info=$("$BIN" --state-dir "$W/state" image show img --json)
    python3 - "$case" "$way" "$REP" "$t0" "$t1" "$info" "$EXPECTED_SHA" >>"$RAW" <<'EOF'
import json, sys
case, way, rep, t0, t1, info, expected = sys.argv[1:]
info = json.loads(info)
if info["sha512"] != expected:
    sys.exit(f"importbench: {case} {way}: the image's sha512 is not the disk's")
print(json.dumps({"case": case, "way": way, "rep": int(rep), "seconds": float(t1) - float(t0),
                  "stored_bytes": info["stored_bytes"]}))
EOF
    log "rep $REP $case $way: $(tail -n1 "$RAW" | python3 -c 'import json,sys; r = json.load(sys.stdin); print(round(r["seconds"], 2), "s,", r["stored_bytes"] >> 20, "MiB stored")')"
}

LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
START=$(date +%s)
for ((REP = 1; REP <= REPEAT; REP++)); do
    for case in "${CASES[@]}"; do
        order=(direct two_step)
        ((RANDOM % 2)) && order=(two_step direct)
        for way in "${order[@]}"; do
            measure "$case" "$way"
        done
    done
done
ELAPSED=$(($(date +%s) - START))
LOAD_AFTER=$(cut -d' ' -f1-3 /proc/loadavg)

mkdir -p "$(dirname "$JSON_OUT")"
python3 - "$RAW" "$JSON_OUT" "scripts/bench/imports.sh ${ORIG_ARGS[*]:-}" "$SIZE" "$REPEAT" "$ELAPSED" \
    "$("$BIN" --version)" "$(qemu-img --version | head -n1)" "$(nproc)" "$LOAD_BEFORE" "$LOAD_AFTER" <<'EOF'
import json, statistics, sys
raw, out, command, size, repeat, elapsed, version, qemu, nproc, load0, load1 = sys.argv[1:]
rows = [json.loads(l) for l in open(raw)]
results = []
for case in ["plain", "chain3", "zlib"]:
    by = {way: [r for r in rows if r["case"] == case and r["way"] == way] for way in ("direct", "two_step")}
    med = {way: statistics.median(r["seconds"] for r in rs) for way, rs in by.items()}
    stored = {way: by[way][0]["stored_bytes"] for way in by}
    results.append({"case": case, "direct_s": med["direct"], "two_step_s": med["two_step"],
                    "two_step_over_direct": med["two_step"] / med["direct"],
                    "stored_direct": stored["direct"], "stored_two_step": stored["two_step"],
                    "all_seconds": {w: [round(r["seconds"], 2) for r in rs] for w, rs in by.items()}})
report = {"command": command, "size": int(size), "data_bytes": int(size) // 2, "repeat": int(repeat),
          "elapsed_s": int(elapsed), "imgpool": version, "qemu": qemu, "nproc": int(nproc),
          "load_before": load0, "load_after": load1, "results": results}
json.dump(report, open(out, "w"), indent=2)
print(f"{command}: {int(size) >> 20} MiB disk, {int(size) >> 21} MiB data, median of {repeat}, "
      f"{elapsed} s, load {load0} -> {load1}")
print("| image | direct import s | qemu-img convert + image add s | ratio (two-step / direct) | stored MiB (direct / two-step) |")
print("|---|--:|--:|--:|--:|")
for r in results:
    print(f"| {r['case']} | {r['direct_s']:.2f} | {r['two_step_s']:.2f} | {r['two_step_over_direct']:.2f} "
          f"| {r['stored_direct'] / 2**20:.1f} / {r['stored_two_step'] / 2**20:.1f} |")
EOF
