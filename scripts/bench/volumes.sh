#!/usr/bin/env bash
# imgpool volume benchmark: the same fio job on a volume (through the mount) and on a plain
# sparse file on the same disk, side by side in one run; each figure as a ratio to the plain
# file.
#
#   sudo scripts/bench/volumes.sh                    1 GiB volume, 8 s per job, median of 3
#   sudo scripts/bench/volumes.sh --size 256M --runtime 3 --repeat 1
#
# Options:
#   --size SIZE        volume and plain file size (default 1G); the base image is half of it
#   --runtime SEC      seconds per fio job at most (default 8)
#   --repeat N         repeats, medians reported (default 3)
#   --json-out FILE    results as JSON (default target/bench/volumes.json)
#   --cases A,B        only these cases (default: all, listed below)
#
# Cases, each on a fresh target (a new volume over the image; a new plain file holding the
# image's bytes), the two targets in random order within each repeat:
#   seq_write, rand_write_4t, rand_write_qd32_direct   writes (fio end_fsync=1: durable)
#   seq_read_written, rand_read_written                reads of data the target wrote, cold
#   seq_read_base, rand_read_base                      reads of data it never wrote (the
#                                                      volume's base image), cold
# Reported: median MiB/s of each, the ratio volume/plain, and the daemon's CPU (% of one core)
# and peak RSS during the volume's job.
#
# Needs root. Installs what is missing (scripts/deps.sh) and builds the release binary
# (IMGPOOL_BIN=/path/to/imgpool skips the build). Unmounts and removes everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$ROOT/scripts/bench
cd "$ROOT"
SIZE_ARG=1G
RUNTIME=8
REPEAT=3
JSON_OUT=$ROOT/target/bench/volumes.json
CASES_ARG=""
ORIG_ARGS=("$@")
die() { echo "volbench: $*" >&2; exit 1; }
log() { printf '%s\n' "$*" >&2; }
need_val() { [[ $# -ge 2 && -n $2 ]] || { echo "volbench: $1 needs a value" >&2; exit 2; }; }
while (($#)); do
    case "$1" in
        --size) need_val "$@"; SIZE_ARG=$2; shift ;;
        --runtime) need_val "$@"; RUNTIME=$2; shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        --json-out) need_val "$@"; JSON_OUT=$2; shift ;;
        --cases) need_val "$@"; CASES_ARG=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "volbench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "volbench: --repeat must be a positive integer" >&2; exit 2; }
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "volbench: --runtime must be a whole number of seconds" >&2; exit 2; }
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "volbench: --size '$SIZE_ARG' is not a size like 256M or 1G" >&2; exit 2; }
((SIZE >= 8388608 && SIZE % 1048576 == 0)) || { echo "volbench: --size must be a multiple of 1 MiB, at least 8M" >&2; exit 2; }
[[ $JSON_OUT = /* ]] || JSON_OUT=$ROOT/$JSON_OUT
[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, drop_caches)"

source "$ROOT/scripts/bench/pool.sh"
bench_binary
bench_workdir volbench /tmp
ip init >/dev/null
ip disk add d1 "$W/disk" >/dev/null
IMAGE_SIZE=$((SIZE / 2))
head -c "$IMAGE_SIZE" /dev/urandom >"$W/image"
ip image add base "$W/image" >/dev/null
ip mount "$W/mnt" --no-bind >/dev/null
MOUNTED=1
PID=$(ip status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mounts"][0]["pid"])')
PLAIN=$W/disk/plain
VOLUME=$W/mnt/volumes/vol
RAW=$W/raw.jsonl
: >"$RAW"

# A fresh target: a new volume over the image, or a plain file holding the image's bytes.
fresh() {
    if [[ $1 == volume ]]; then
        local i
        for ((i = 0; i < 50; i++)); do
            # The kernel releases the last fio's file a moment after fio exits.
            ip volume rm vol >/dev/null 2>&1 && break
            ip volume show vol >/dev/null 2>&1 || break
            sleep 0.1
        done
        ip volume create vol --image base --size "$SIZE" >/dev/null
        for ((i = 0; i < 50; i++)); do [[ -e $VOLUME ]] && break; sleep 0.1; done
    else
        rm -f "$PLAIN"
        cp --sparse=always "$W/image" "$PLAIN"
        truncate -s "$SIZE" "$PLAIN"
    fi
}
file_of() { [[ $1 == volume ]] && echo "$VOLUME" || echo "$PLAIN"; }
drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; ip cache drop >/dev/null; }
cpu_ticks() { local s; s=$(cat "/proc/$PID/stat"); s=${s##*) }; awk '{ print $12 + $13 }' <<<"$s"; }

# fio JOB on TARGET with SIZE_FOR bytes and IO bytes; records one result line.
measure() { # case target job size io
    local case=$1 target=$2 job=$3 size=$4 io=$5 out t0 t1 c0 c1
    out=$W/out/$case.$target.$REP.json
    echo 5 >"/proc/$PID/clear_refs"
    c0=$(cpu_ticks); t0=$(date +%s.%N)
    FILE=$(file_of "$target") SIZE=$size IO_SIZE=$io RUNTIME=$RUNTIME INVALIDATE=1 \
        fio --output-format=json --output="$out" "$BENCH/jobs/$job.fio" >/dev/null 2>"$out.err" ||
        die "fio $job on $target failed: $(head -c 300 "$out.err")"
    c1=$(cpu_ticks); t1=$(date +%s.%N)
    python3 - "$out" "$case" "$target" "$REP" "$c0" "$c1" "$t0" "$t1" "$(getconf CLK_TCK)" \
        "$(awk '$1 == "VmHWM:" { print $2 }' "/proc/$PID/status")" >>"$RAW" <<'EOF'
import json, sys
out, case, target, rep, c0, c1, t0, t1, tck, hwm = sys.argv[1:]
text = open(out).read()
job = json.loads(text[text.index("{"):])["jobs"][0]
bw = (job["read"]["bw_bytes"] + job["write"]["bw_bytes"]) / 2**20
cpu = (float(c1) - float(c0)) / float(tck) / (float(t1) - float(t0)) * 100
print(json.dumps({"case": case, "target": target, "rep": int(rep), "mib_s": bw,
                  "daemon_cpu_pct": cpu if target == "volume" else None,
                  "daemon_hwm_kb": int(hwm) if target == "volume" else None}))
EOF
    log "rep $REP $case $target: $(tail -n1 "$RAW" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["mib_s"]), "MiB/s")')"
}

CASES=(seq_write rand_write_4t rand_write_qd32_direct seq_read_written rand_read_written seq_read_base rand_read_base)
if [[ -n $CASES_ARG ]]; then
    IFS=, read -ra WANTED <<<"$CASES_ARG"
    for wanted in "${WANTED[@]}"; do
        [[ " ${CASES[*]} " == *" $wanted "* ]] || die "unknown case '$wanted' (cases: ${CASES[*]})"
    done
    CASES=("${WANTED[@]}")
fi
START=$(date +%s)
for ((REP = 1; REP <= REPEAT; REP++)); do
    for case in "${CASES[@]}"; do
        order=(volume plain)
        ((RANDOM % 2)) && order=(plain volume)
        for target in "${order[@]}"; do
            fresh "$target"
            case $case in
                seq_write) measure "$case" "$target" seq_write "$SIZE" "$SIZE" ;;
                rand_write_4t) measure "$case" "$target" rand_write_4t "$SIZE" "$((SIZE / 4))" ;;
                rand_write_qd32_direct) measure "$case" "$target" rand_write_qd32_direct "$SIZE" "$((SIZE / 4))" ;;
                seq_read_written | rand_read_written)
                    # Written whole first, then read cold.
                    dd if=/dev/urandom of="$(file_of "$target")" bs=1M count=$((SIZE / 1048576)) conv=notrunc,fsync status=none
                    drop_caches
                    job=${case%_written}
                    [[ $job == rand_read ]] && job=rand_read_4t
                    measure "$case" "$target" "$job" "$SIZE" "$SIZE" ;;
                seq_read_base | rand_read_base)
                    drop_caches
                    job=${case%_base}
                    [[ $job == rand_read ]] && job=rand_read_4t
                    measure "$case" "$target" "$job" "$IMAGE_SIZE" "$IMAGE_SIZE" ;;
            esac
        done
    done
done
ELAPSED=$(($(date +%s) - START))

mkdir -p "$(dirname "$JSON_OUT")"
python3 - "$RAW" "$JSON_OUT" "scripts/bench/volumes.sh ${ORIG_ARGS[*]:-}" "$SIZE" "$RUNTIME" "$REPEAT" "$ELAPSED" \
    "$("$BIN" --version)" "$(uname -r)" "$(nproc)" <<'EOF'
import json, statistics, sys
raw, out, command, size, runtime, repeat, elapsed, version, kernel, nproc = sys.argv[1:]
rows = [json.loads(l) for l in open(raw)]
cases = []
for r in rows:
    if r["case"] not in cases:
        cases.append(r["case"])
results = []
print(f"\nimgpool volume benchmark: {command}\n{int(size) >> 20} MiB volume over a {int(size) >> 21} MiB image, "
      f"{runtime} s per job at most, median of {repeat}; {nproc} CPUs, kernel {kernel}, {version}; took {elapsed} s\n")
print("| case | plain file MiB/s | volume MiB/s | volume / plain | daemon CPU (% of a core) | daemon peak RSS (MiB) |")
print("|---|--:|--:|--:|--:|--:|")
for case in cases:
    med = lambda t, k: statistics.median(r[k] for r in rows if r["case"] == case and r["target"] == t)
    plain, vol = med("plain", "mib_s"), med("volume", "mib_s")
    cpu, hwm = med("volume", "daemon_cpu_pct"), med("volume", "daemon_hwm_kb") / 1024
    per_rep = {t: [round(r["mib_s"]) for r in rows if r["case"] == case and r["target"] == t] for t in ("plain", "volume")}
    results.append({"case": case, "plain_mib_s": plain, "volume_mib_s": vol, "ratio": vol / plain,
                    "daemon_cpu_pct": cpu, "daemon_peak_rss_mib": hwm, "per_repeat": per_rep})
    print(f"| {case} | {plain:,.0f} | {vol:,.0f} | {vol / plain:.2f} | {cpu:.1f} | {hwm:.1f} |")
json.dump({"command": command, "results": results}, open(out, "w"), indent=1)
EOF
log "results written to $JSON_OUT"
