#!/usr/bin/env bash
# imgpool snapshot benchmark (issue 11): snapshot create latency at 0, 10,000 and 100,000
# snapshots while fio writes; `snapshot list --json` of 10,000 and 100,000; batch deletion of
# 10,000 and 100,000 against a loop of single `snapshot rm` (1,000 timed, extrapolated), with the
# reclaim's duration, its writes and the reads' latency meanwhile; random reads against chain
# length (1, 1,000, 100,000 snapshots); and, with --cases million, 1,000,000 snapshots on a
# small volume.
#
#   sudo scripts/bench/snapshots.sh                      everything but the million, repeats 3
#   sudo scripts/bench/snapshots.sh --cases million      the million alone
#   sudo scripts/bench/snapshots.sh --scale 100 --repeat 1   a quick check: every count / 100
#
# Options:
#   --cases LIST     comma-separated, of create,list,delete,reads,million (default all but
#                    million)
#   --repeat N       repeats of each measurement that leaves the volume as it was (latencies,
#                    listings, reads); medians reported (default 3). A deletion is measured once
#                    per population: repeating it would mean creating its snapshots again.
#   --scale N        divide every snapshot count by N (default 1)
#   --dir DIR        where the pool's state and disk go (default a new directory in /tmp)
#   --json-out FILE  results as JSON (default target/bench/snapshots.json)
#
# How: a pool with one disk, mounted; snapshots are requested over the mount daemon's control
# socket by scripts/bench/snapshots.py (one connection per request, as the CLI sends them), each
# after a few 4 KiB writes through the mount. Latencies are timed from connect to answer, and
# also as `imgpool snapshot create` processes (wall).
#
# Needs root. Installs what is missing (scripts/deps.sh) and builds the release binary
# (IMGPOOL_BIN=/path/to/imgpool skips the build). Unmounts and removes everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$ROOT/scripts/bench
cd "$ROOT"
CASES=create,list,delete,reads
REPEAT=3
SCALE=1
BASE_DIR=/tmp
JSON_OUT=$ROOT/target/bench/snapshots.json
ORIG_ARGS=("$@")
die() { echo "snapbench: $*" >&2; exit 1; }
log() { printf '%s snapbench: %s\n' "$(date +%T)" "$*" >&2; }
need_val() { [[ $# -ge 2 && -n $2 ]] || { echo "snapbench: $1 needs a value" >&2; exit 2; }; }
while (($#)); do
    case "$1" in
        --cases) need_val "$@"; CASES=$2; shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        --scale) need_val "$@"; SCALE=$2; shift ;;
        --dir) need_val "$@"; BASE_DIR=$2; shift ;;
        --json-out) need_val "$@"; JSON_OUT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "snapbench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "snapbench: --repeat must be a positive integer" >&2; exit 2; }
[[ $SCALE =~ ^[1-9][0-9]*$ ]] || { echo "snapbench: --scale must be a positive integer" >&2; exit 2; }
for c in ${CASES//,/ }; do
    [[ $c =~ ^(create|list|delete|reads|million)$ ]] || { echo "snapbench: unknown case '$c' in --cases" >&2; exit 2; }
done
[[ -d $BASE_DIR ]] || { echo "snapbench: --dir '$BASE_DIR' is not a directory" >&2; exit 2; }
[[ $JSON_OUT = /* ]] || JSON_OUT=$ROOT/$JSON_OUT
[[ $(id -u) -eq 0 ]] || die "must run as root (mounts)"
has_case() { [[ ,$CASES, == *,$1,* ]]; }
n() { echo $(($1 / SCALE)); } # a snapshot count, scaled

W=""
BIN=""
MOUNTED=0
BG=()
cleanup() {
    local rc=$?
    set +e
    for pid in "${BG[@]}"; do kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; done
    if ((MOUNTED)); then
        "$BIN" --state-dir "$W/state" umount "$W/mnt" >/dev/null 2>&1 || umount -l "$W/mnt"
    fi
    if [[ -n $W && -d $W ]]; then
        if awk -v d="$W" 'index($5, d) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
            log "still mounted under $W, not removing it"
        else
            rm -rf --one-file-system "$W"
        fi
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

if [[ -n ${IMGPOOL_BIN:-} ]]; then
    bash scripts/deps.sh --no-cargo >&2
    BIN=$IMGPOOL_BIN
else
    bash scripts/deps.sh >&2
    cargo build --release >&2
    BIN=$ROOT/target/release/imgpool
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

W=$(mktemp -d "$BASE_DIR/imgpool-snapbench.XXXXXX")
ip() { "$BIN" --state-dir "$W/state" "$@"; }
py() { python3 "$BENCH/snapshots.py" "$@"; }
mkdir -p "$W/state" "$W/disk" "$W/mnt" "$W/out"
ip init >/dev/null
ip disk add d1 "$W/disk" >/dev/null
ip mount "$W/mnt" --no-bind >/dev/null
MOUNTED=1
PID=$(ip status --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["mounts"][0]["pid"])')
SOCK=$(ls "$W"/state/control/*.sock)
RAW=$W/raw.jsonl
: >"$RAW"
GIB=$((1 << 30))
SPAN_A=$((8 * GIB))
SPAN_B=$((512 << 20))

# Appends one result: record CASE KEY=JSON...; an empty value (its command failed) ends the run.
record() {
    local case=$1 out="" kv
    shift
    for kv in "$@"; do
        [[ -n ${kv#*=} ]] || die "$case: no figure for ${kv%%=*}"
        out+=", \"${kv%%=*}\": ${kv#*=}"
    done
    echo "{\"case\": \"$case\"$out}" >>"$RAW"
    log "$case${out#,}"
}
volume() { # NAME SIZE: a new volume, once the mount shows it
    ip volume create "$1" --size "$2" >/dev/null
    local i
    for ((i = 0; i < 100; i++)); do [[ -e $W/mnt/volumes/$1 ]] && return; sleep 0.1; done
    die "volume $1 did not appear in the mount"
}
dir_of() { echo "$W/disk/.imgpool/volumes/$(ip volume show "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["uuid"])')"; }
allocated() { stat -c '%b %B' "$(dir_of "$1")/data" | awk '{ print $1 * $2 }'; }
rss_kb() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$PID/status"; }
write_bytes() { awk '$1 == "write_bytes:" { print $2 }' "/proc/$PID/io"; }
# The snapshots of VOLUME named PREFIX<number> (the latency runs add others between them).
count_snapshots() { # VOLUME PREFIX
    ip snapshot list "$1" --json | python3 -c 'import json, re, sys
print(sum(bool(re.fullmatch(sys.argv[1] + "[0-9]+", s["name"])) for s in json.load(sys.stdin)))' "$2"
}

# fio in the background on a volume: fio_start NAME JOB OUT [fio options...]
fio_start() {
    local name=$1 job=$2 out=$3
    shift 3
    fio --name="$job" --filename="$W/mnt/volumes/$name" --bs=4k --ioengine=psync --direct=1 --time_based \
        --runtime=3600 --output-format=json --output="$out" "$@" >/dev/null 2>"$out.err" &
    FIO=$!
    BG+=("$FIO")
    sleep 1
    kill -0 "$FIO" 2>/dev/null || die "fio $job on $name failed: $(head -c 300 "$out.err")"
}
fio_stop() {
    kill -INT "$FIO" 2>/dev/null
    wait "$FIO" || true
    BG=("${BG[@]/$FIO/}")
}
# IOPS and completion latencies (ms: p50, p99, p99.9, max) of a finished fio read job.
fio_reads() {
    python3 - "$1" <<'EOF'
import json, sys
text = open(sys.argv[1]).read()
job = json.loads(text[text.index("{"):])["jobs"][0]["read"]
clat = job["clat_ns"]
print(json.dumps({"iops": job["iops"], "p50_ms": clat["percentile"]["50.000000"] / 1e6,
                  "p99_ms": clat["percentile"]["99.000000"] / 1e6,
                  "p999_ms": clat["percentile"]["99.900000"] / 1e6, "max_ms": clat["max"] / 1e6}))
EOF
}

# Create latency on volume "a" at the snapshot count it has now (LEVEL): alone, then with fio
# writing 4 KiB (O_DIRECT) at random over its written span at 1,000 writes/s meanwhile. And the
# disk's own floor: a 4 KiB write and fdatasync of a file next to the volume's.
create_latency() { # LEVEL
    local rep
    for ((rep = 1; rep <= REPEAT; rep++)); do
        record create level="$1" rep="$rep" path='"fdatasync"' stats="$(py fsync-latency "$W/disk" --count 200)"
        record create level="$1" rep="$rep" path='"quiet"' \
            stats="$(py latency "$SOCK" a "$W/mnt/volumes/a" --prefix "quiet$1-$rep-" --count 200 --gap 0.01)"
        fio_start a randwrite "$W/out/write.$1.$rep.json" --rw=randwrite --rate_iops=1000 --size="$SPAN_A"
        record create level="$1" rep="$rep" path='"socket"' \
            stats="$(py latency "$SOCK" a "$W/mnt/volumes/a" --prefix "lat$1-$rep-" --count 200 --gap 0.01)"
        record create level="$1" rep="$rep" path='"cli"' \
            stats="$(py cli-latency "$BIN" "$W/state" a --prefix "cli$1-$rep-" --count 50)"
        fio_stop
    done
}

list_time() { # LEVEL
    local rep listed
    listed=$(ip snapshot list a --json | python3 -c 'import json,sys; print(len(json.load(sys.stdin)))')
    for ((rep = 1; rep <= REPEAT; rep++)); do
        record list level="$1" listed="$listed" rep="$rep" \
            stats="$(py run -- "$BIN" --state-dir "$W/state" snapshot list a --json)"
    done
}

# Snapshots PREFIX<START>.. of VOLUME, each after two 4 KiB writes at random blocks of its SPAN:
# later writes land in granules that earlier snapshots saw, so that deleting those snapshots
# leaves versions to reclaim.
populate() { # VOLUME SPAN PREFIX START COUNT
    record populate volume="\"$1\"" count="$5" \
        stats="$(py populate "$SOCK" "$1" "$W/mnt/volumes/$1" --prefix "$3" --start "$4" --count "$5" --blocks 2 --span "$2" --seed "$4")"
}

START=$(date +%s)
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)

if has_case create || has_case list || has_case delete; then
    volume a 64G
    has_case create && create_latency 0
    populate a "$SPAN_A" s 0 "$(n 10000)"
    has_case create && create_latency "$(n 10000)"
    has_case list && list_time "$(n 10000)"
    populate a "$SPAN_A" s "$(n 10000)" "$(n 90000)"
    has_case create && create_latency "$(n 100000)"
    has_case list && list_time "$(n 100000)"
fi

if has_case delete; then
    # b: 10,000 snapshots for one batch, then 1,000 more for the loop of single deletions;
    # each after two 4 KiB writes at random places.
    volume b 64G
    populate b "$SPAN_B" s 0 "$(n 10000)"
    populate b "$SPAN_B" loop 0 "$(n 1000)"
    fio_start b randread "$W/out/loop.json" --rw=randread --size="$SPAN_B"
    record delete_loop volume='"b"' count="$(n 1000)" stats="$(py run -- bash -c "
        for ((i = 0; i < $(n 1000); i++)); do \"$BIN\" --state-dir \"$W/state\" snapshot rm b@loop\$i >/dev/null || exit 1; done")"
    py wait-reclaim "$(dir_of b)/index.db" >/dev/null
    fio_stop
    for v in b a; do
        count=$(n 10000) span=$SPAN_B
        [[ $v == a ]] && count=$(n 100000) span=$SPAN_A
        # The reads' latency before the deletion, then during its reclaim.
        fio_start "$v" randread "$W/out/quiet.$v.json" --rw=randread --size="$span"
        sleep 5
        fio_stop
        record reads_quiet volume="\"$v\"" stats="$(fio_reads "$W/out/quiet.$v.json")"
        before=$(allocated "$v")
        dir=$(dir_of "$v")
        size_before=$(stat -c %s "$dir/data")
        fio_start "$v" randread "$W/out/reclaim.$v.json" --rw=randread --size="$span"
        wb0=$(write_bytes)
        record delete_batch volume="\"$v\"" count="$count" stats="$(py run -- "$BIN" --state-dir "$W/state" snapshot rm "$v@s0%s$((count - 1))")"
        # From the command's return: its reclaim's duration is the two added.
        record reclaim volume="\"$v\"" stats="$(py wait-reclaim "$dir/index.db")"
        record listed_after_batch volume="\"$v\"" left="$(count_snapshots "$v" s)"
        wb1=$(write_bytes)
        fio_stop
        record reclaim_space volume="\"$v\"" allocated_before="$before" allocated_after="$(allocated "$v")" \
            data_size_before="$size_before" data_size_after="$(stat -c %s "$dir/data")" \
            daemon_write_bytes="$((wb1 - wb0))" reads="$(fio_reads "$W/out/reclaim.$v.json")"
    done
fi

if has_case reads; then
    # The same 128 MiB, each block written once in random order, spread over 1, 1,000 and
    # 100,000 snapshots; then random 4 KiB O_DIRECT reads of the whole volume.
    for chain in 1 "$(n 1000)" "$(n 100000)"; do
        volume "r$chain" 128M
        record spread volume="\"r$chain\"" stats="$(py spread "$SOCK" "r$chain" "$W/mnt/volumes/r$chain" --prefix s --count "$chain" --span $((128 << 20)))"
    done
    chains=(1 "$(n 1000)" "$(n 100000)")
    for ((rep = 1; rep <= REPEAT; rep++)); do
        # Rotated each repeat: none always goes first, or last, on a shared machine.
        for chain in "${chains[@]:$((rep % 3))}" "${chains[@]:0:$((rep % 3))}"; do
            fio --name=randread --filename="$W/mnt/volumes/r$chain" --rw=randread --bs=4k --direct=1 \
                --ioengine=psync --numjobs=4 --group_reporting --time_based --runtime=8 --size=128M \
                --output-format=json --output="$W/out/chain.$chain.$rep.json" >/dev/null
            record chain snapshots="$chain" rep="$rep" reads="$(fio_reads "$W/out/chain.$chain.$rep.json")"
        done
    done
fi

if has_case million; then
    count=$(n 1000000)
    volume m 16M
    dd if=/dev/urandom of="$W/mnt/volumes/m" bs=1M count=16 conv=notrunc,fsync status=none
    rss0=$(rss_kb VmRSS)
    record million_create count="$count" rss_before_kb="$rss0" stats="$(py populate "$SOCK" m "$W/mnt/volumes/m" --prefix m --count "$count" --blocks 0 --span $((16 << 20)))"
    dir=$(dir_of m)
    record million_size index_bytes="$(du -cb "$dir"/index.db* | tail -1 | cut -f1)" \
        data_bytes="$(allocated m)" state_bytes="$(du -sb "$W/state" | cut -f1)" \
        rss_kb="$(rss_kb VmRSS)" hwm_kb="$(rss_kb VmHWM)"
    for ((rep = 1; rep <= REPEAT; rep++)); do
        record million_list rep="$rep" stats="$(py run -- "$BIN" --state-dir "$W/state" snapshot list m --json)"
        fio --name=randread --filename="$W/mnt/volumes/m" --rw=randread --bs=4k --direct=1 \
            --ioengine=psync --numjobs=4 --group_reporting --time_based --runtime=8 --size=16M \
            --output-format=json --output="$W/out/million.$rep.json" >/dev/null
        record million_reads rep="$rep" reads="$(fio_reads "$W/out/million.$rep.json")"
    done
    fio_start m randread "$W/out/million.rm.json" --rw=randread --size=16M
    record million_delete stats="$(py run -- "$BIN" --state-dir "$W/state" snapshot rm "m@m0%m$((count - 1))")"
    record million_reclaim stats="$(py wait-reclaim "$dir/index.db")" left="$(count_snapshots m m)"
    fio_stop
    record million_after rss_kb="$(rss_kb VmRSS)" index_bytes="$(du -cb "$dir"/index.db* | tail -1 | cut -f1)"
fi

ELAPSED=$(($(date +%s) - START))
mkdir -p "$(dirname "$JSON_OUT")"
cp "$RAW" "${JSON_OUT%.json}.raw.jsonl"
python3 "$BENCH/snapshots.py" report "$RAW" "$JSON_OUT" \
    --meta command="scripts/bench/snapshots.sh ${ORIG_ARGS[*]:-}" elapsed_s="$ELAPSED" \
    version="$("$BIN" --version)" kernel="$(uname -r)" nproc="$(nproc)" \
    load_before="$LOAD_BEFORE" load_after="$(cut -d' ' -f1-3 /proc/loadavg)" \
    disk="$(df --output=source,fstype "$W/disk" | tail -1 | tr -s ' ')" repeat="$REPEAT" scale="$SCALE"
log "results written to $JSON_OUT"
