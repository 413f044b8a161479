#!/usr/bin/env bash
# imgpool benchmark suite: one generated image, read with fio through every path
# that matters, side by side in one run.
#
#   sudo scripts/bench/run.sh                       2 GiB image, 8 s per job, 3 repeats
#   sudo scripts/bench/run.sh --quick               smoke run: 256M, 3 s per job, 1 repeat
#   sudo scripts/bench/run.sh --jobs seq_read,rand_read_4t --size 1G --repeat 5
#
# Options:
#   --size SIZE        image size (IEC suffixes: 256M, 1G, 2G; default 2G), random data
#   --repeat N         repeats of every measurement, medians reported (default 3)
#   --runtime SEC      seconds per fio job (default 8)
#   --jobs A,B,...     job files from scripts/bench/jobs/ (default: all six)
#   --json-out FILE    results as JSON (default target/bench/results.json)
#   --cache-size SIZE  the cached mount's chunk cache (default: imgpool's default)
#   --quick            --size 256M --runtime 3 --repeat 1 (later options still override)
#   --baseline-bin BIN another imgpool binary (e.g. an older commit's release build) to
#                      measure beside this one: it gets its own pool (state directory and one
#                      disk directory on the same filesystem), imports the same image and mounts
#                      it in cached and in passthrough mode with its own defaults; paths
#                      imgpool-cached-baseline and imgpool-passthrough-baseline
#   --paths A,B,...    measure only these paths (direct is always measured: the ratios need it)
#   --seed N           seed of the random path order (default: from the clock; printed)
#
# Paths measured, each with every job warm (file read once first, with O_DIRECT for the
# *_direct jobs; fio invalidate=0)
# for the whole runtime, and cold (sync + drop_caches + imgpool chunk caches emptied first,
# fio invalidate=1, one pass over the image at most, within the runtime):
#   direct        the copy file on its disk (<disk>/.imgpool/copies/<uuid>.img)
#   bind          a read-only bind mount of the copies directory
#   bindfs        bindfs -r of the copies directory (bindfs defaults otherwise)
#   imgpool-cached       MOUNT/images/<name>, the mount in cached mode (the default)
#   imgpool-passthrough  the same through a second mount in passthrough mode
#   imgpool-10x   ten fio processes at once, one per disk, each on that disk's
#                 <disk>/backing-images/<name>-<uuid>/backing (aggregate reported)
# For every repeat, job and cache state the paths run in a new random order, back to back:
# a virtual disk is faster for whoever reads first after a pause and slower right after a
# heavy reader, and a fixed order hands that luck to the same path every time.
# Reported per path and job: median MiB/s and IOPS, the ratio to direct (same job, same
# cache state, same run; for imgpool-10x the ten readers' sum over one direct reader),
# and for FUSE paths the daemon's CPU (utime+stime over the job, % of one core) and its
# peak RSS over the job (VmHWM, reset before each job).
# Memory: page cache growth (/proc/meminfo Cached) and daemon VmRSS after reading
# the whole image once through each path, starting from dropped caches.
#
# Needs root (mounts, drop_caches). Installs missing packages with scripts/deps.sh and
# builds the release binary (IMGPOOL_BIN=/path/to/imgpool skips the build). Everything it
# mounts or starts is unmounted or stopped on exit, also on failure or Ctrl-C.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH=$ROOT/scripts/bench
cd "$ROOT"

ALL_JOBS=(seq_read rand_read_4t rand_read_qd32 seq_read_direct rand_read_4t_direct rand_read_qd32_direct)
SIZE_ARG=2G
REPEAT=3
RUNTIME=8
JOBS_ARG=""
CACHE_ARGS=()
JSON_OUT=$ROOT/target/bench/results.json
REPLICAS=10
BASELINE_BIN=""
PATHS_ARG=""
SEED=""
ORIG_ARGS=("$@")

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; }
die() { echo "bench: $*" >&2; exit 1; }
need_val() { [[ $# -ge 2 && -n $2 ]] || { echo "bench: $1 needs a value (try --help)" >&2; exit 2; }; }

while (($#)); do
    case "$1" in
        --quick) SIZE_ARG=256M; RUNTIME=3; REPEAT=1 ;;
        --size) need_val "$@"; SIZE_ARG=$2; shift ;;
        --cache-size) need_val "$@"; CACHE_ARGS=(--cache-size "$2"); shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        --runtime) need_val "$@"; RUNTIME=$2; shift ;;
        --jobs) need_val "$@"; JOBS_ARG=$2; shift ;;
        --json-out) need_val "$@"; JSON_OUT=$2; shift ;;
        --baseline-bin) need_val "$@"; BASELINE_BIN=$2; shift ;;
        --seed) need_val "$@"; SEED=$2; shift ;;
        --paths) need_val "$@"; PATHS_ARG=$2; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "bench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done

[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat must be a positive integer" >&2; exit 2; }
[[ -z $SEED || $SEED =~ ^[0-9]+$ ]] || { echo "bench: --seed must be a non-negative integer" >&2; exit 2; }
[[ -z $BASELINE_BIN || -x $BASELINE_BIN ]] || { echo "bench: --baseline-bin $BASELINE_BIN is not an executable file" >&2; exit 2; }
[[ $RUNTIME =~ ^[1-9][0-9]*$ ]] || { echo "bench: --runtime must be a positive number of seconds" >&2; exit 2; }
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "bench: --size '$SIZE_ARG' is not a size like 256M or 2G" >&2; exit 2; }
((SIZE >= 1048576 && SIZE % 4096 == 0)) || { echo "bench: --size must be at least 1M and a multiple of 4 KiB (O_DIRECT jobs)" >&2; exit 2; }
if [[ -n $JOBS_ARG ]]; then
    IFS=, read -r -a JOBS <<<"$JOBS_ARG"
else
    JOBS=("${ALL_JOBS[@]}")
fi
((${#JOBS[@]})) || { echo "bench: --jobs is empty" >&2; exit 2; }
for j in "${JOBS[@]}"; do
    [[ -f $BENCH/jobs/$j.fio ]] || { echo "bench: no job file scripts/bench/jobs/$j.fio (jobs: ${ALL_JOBS[*]})" >&2; exit 2; }
done
[[ $JSON_OUT = /* ]] || JSON_OUT=$ROOT/$JSON_OUT
LOGS=$(dirname "$JSON_OUT")/logs   # mount.log and bindfs.log of the last run

[[ $(id -u) -eq 0 ]] || die "must run as root (bind mounts, FUSE mounts, drop_caches)"

log() { printf '%s\n' "$*" >&2; }
heading() { printf '\n== %s ==\n' "$*" >&2; }

# --- state that cleanup needs -------------------------------------------------------
W=""            # work directory: pool state, disks, mount points, fio output
BIN=""
STATE=""
declare -A BG_PIDS=()  # pid -> command name, of fio (via timeout) and cat processes running in the background
BINDFS_PID=""
DAEMON_PIDS=()  # imgpool daemons of the mounts this run made
IMG_MOUNTS=()   # imgpool mount points this run made
declare -A MOUNT_BIN=() MOUNT_STATE=()  # mount point -> the binary and state directory that mounted it
BASE_STATE=""
BASE_PT_STATE=""
MOUNTINFO_BEFORE=$(grep -E 'fuse|backing-images|bench' /proc/self/mountinfo || true)

# Mount points at or under a directory, deepest first, from the kernel's table (stat
# fails on a FUSE mount whose daemon died). Work paths contain no escaped characters.
mounts_under() {
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo |
        awk '{ print length($0) "\t" $0 }' | sort -rn | cut -f2-
}
is_mounted() { awk -v p="$1" '$5 == p { f = 1 } END { exit !f }' /proc/self/mountinfo; }
alive() { [[ -n $1 ]] && kill -0 "$1" 2>/dev/null; }
# Stop one process we started: TERM, up to 10 s, then KILL. With a name, only while the
# pid still runs that command (a pid that exited could have been reused).
stop_pid() {
    local p=$1 name=${2:-} i
    alive "$p" || return 0
    if [[ -n $name && $(cat "/proc/$p/comm" 2>/dev/null) != "$name" ]]; then return 0; fi
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 100; i++)); do alive "$p" || return 0; sleep 0.1; done
    log "bench: pid $p ignored SIGTERM for 10 s, sending SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
}

cleanup() {
    local rc=$? p m leftover
    set +e
    trap - INT TERM
    ((rc == 0)) || log "bench: FAILED (exit $rc), cleaning up"
    for p in "${!BG_PIDS[@]}"; do stop_pid "$p" "${BG_PIDS[$p]}"; done
    # Reap them, by pid: a bare `wait` would also wait for bindfs, which runs until unmounted.
    for p in "${!BG_PIDS[@]}"; do wait "$p" 2>/dev/null; done
    if [[ -n $W && -d $W ]]; then
        # Keep the daemons' logs next to the results, for a look after a failure.
        mkdir -p "$LOGS" && cp -f "$STATE/mount.log" "$W/bindfs.log" "$LOGS/" 2>/dev/null
        [[ -n $BASE_STATE ]] && cp -f "$BASE_STATE/mount.log" "$LOGS/mount-baseline.log" 2>/dev/null
        [[ -n $BASE_PT_STATE ]] && cp -f "$BASE_PT_STATE/mount.log" "$LOGS/mount-baseline-passthrough.log" 2>/dev/null
        if is_mounted "$W/bind"; then umount "$W/bind" || log "bench: umount $W/bind failed"; fi
        if is_mounted "$W/bindfs"; then
            fusermount3 -u "$W/bindfs" 2>/dev/null || umount "$W/bindfs" || log "bench: umount $W/bindfs failed"
        fi
        stop_pid "$BINDFS_PID" bindfs
        for m in "${IMG_MOUNTS[@]}"; do
            if is_mounted "$m"; then
                timeout 60 "${MOUNT_BIN[$m]}" --state-dir "${MOUNT_STATE[$m]}" umount "$m" >/dev/null ||
                    log "bench: imgpool umount $m failed"
            fi
        done
        # Last resort, by path and only under $W: lazy unmounts, deepest first.
        for m in $(mounts_under "$W"); do
            log "bench: lazily unmounting $m"
            umount -l "$m"
        done
        for p in "${DAEMON_PIDS[@]}"; do stop_pid "$p" imgpool; done
        if [[ -n $(mounts_under "$W") ]]; then
            log "bench: still mounted under $W, not removing it:"
            mounts_under "$W" >&2
            rc=1
        else
            rm -rf --one-file-system "$W"
        fi
    fi
    # Mounts that were not there when the run started (another run's are not ours).
    leftover=$(grep -E 'fuse|backing-images|bench' /proc/self/mountinfo |
        grep -vxF -f <(printf '%s\n' "$MOUNTINFO_BEFORE") || true)
    if [[ -n $leftover ]]; then
        log "bench: mounts left behind (grep -E 'fuse|backing-images|bench' /proc/self/mountinfo):"
        log "$leftover"
        ((rc)) || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- dependencies and build ---------------------------------------------------------
heading "dependencies"
if [[ -n ${IMGPOOL_BIN:-} ]]; then
    bash scripts/deps.sh --no-cargo >&2
else
    bash scripts/deps.sh >&2
fi
for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$home/.cargo/bin/cargo" ]]; then
        PATH="$home/.cargo/bin:$PATH"
        export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
    fi
done
for cmd in fio bindfs fusermount3 python3 fincore numfmt; do
    command -v "$cmd" >/dev/null || die "'$cmd' not found"
done

heading "build"
if [[ -n ${IMGPOOL_BIN:-} ]]; then
    BIN=$IMGPOOL_BIN
    log "using IMGPOOL_BIN=$BIN"
else
    locked=()
    [[ -f Cargo.lock ]] && locked=(--locked)
    cargo build "${locked[@]}" --release >&2
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/imgpool"
fi
[[ -x $BIN ]] || die "imgpool binary not found or not executable: $BIN"
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

# --- pool: ten disks, one image imported once ---------------------------------------
heading "setup"
W=$(mktemp -d /tmp/imgpool-bench.XXXXXX)
STATE=$W/state
mkdir -p "$STATE" "$W/out" "$W/bind" "$W/bindfs" "$W/mnt"
RAW=$W/raw.jsonl
: >"$RAW"
ip() { "$BIN" --state-dir "$STATE" "$@"; }
ip init >&2
for ((i = 1; i <= REPLICAS; i++)); do
    d=$(printf 'd%02d' "$i")
    mkdir -p "$W/disks/$d"
    ip disk add "$d" "$W/disks/$d" >&2
done
NAME=benchimg
log "generating a $SIZE_ARG random image ($SIZE bytes)"
head -c "$SIZE" /dev/urandom >"$W/src.img"
ip image add "$NAME" "$W/src.img" >&2
if [[ -n $BASELINE_BIN ]]; then
    # The baseline's own pools, one per mount: an older binary may not open this one's store,
    # and binaries before 6e9b902 fail a disk when two mounts of one pool probe it at once.
    BASE_STATE=$W/state-baseline
    BASE_PT_STATE=$W/state-baseline-passthrough
    for st in "$BASE_STATE" "$BASE_PT_STATE"; do
        mkdir -p "$st" "$st-disk"
        "$BASELINE_BIN" --state-dir "$st" init >&2
        "$BASELINE_BIN" --state-dir "$st" disk add b01 "$st-disk" >&2
        "$BASELINE_BIN" --state-dir "$st" image add "$NAME" "$W/src.img" >&2
    done
fi
rm -f "$W/src.img"
SHOW=$(ip image show "$NAME" --json)
read -r UUID COPY < <(python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["uuid"], d["copies"][0]["path"])' <<<"$SHOW")
[[ -f $COPY ]] || die "copy file $COPY from 'imgpool image show --json' does not exist"
COPYDIR=$(dirname "$COPY")
COPYBASE=$(basename "$COPY")
log "image $NAME uuid $UUID, copy $COPY"

# (b) read-only bind mount of the copy's directory
mount --bind "$COPYDIR" "$W/bind"
mount -o remount,bind,ro "$W/bind"

# (c) bindfs -r, in the foreground of a background job so that its pid is ours
bindfs -f -r "$COPYDIR" "$W/bindfs" >"$W/bindfs.log" 2>&1 &
BINDFS_PID=$!
for ((i = 0; i < 100; i++)); do is_mounted "$W/bindfs" && break; alive "$BINDFS_PID" || break; sleep 0.1; done
is_mounted "$W/bindfs" || die "bindfs did not mount $W/bindfs: $(cat "$W/bindfs.log")"

daemon_pid_of() { # binary state mountpoint
    "$1" --state-dir "$2" status --json | python3 -c '
import json, sys
for m in json.load(sys.stdin)["mounts"]:
    if m["mountpoint"] == sys.argv[1]:
        print(m["pid"])' "$3"
}
MOUNTED_PID=""
mount_imgpool() { # binary state mountpoint [mount options...]; sets MOUNTED_PID
    local bin=$1 state=$2 mp=$3
    shift 3
    mkdir -p "$mp"
    IMG_MOUNTS+=("$mp")
    MOUNT_BIN[$mp]=$bin
    MOUNT_STATE[$mp]=$state
    "$bin" --state-dir "$state" mount "$mp" "$@" >&2
    MOUNTED_PID=$(daemon_pid_of "$bin" "$state" "$mp")
    [[ -n $MOUNTED_PID ]] || die "no daemon pid for $mp in 'imgpool status --json'"
    DAEMON_PIDS+=("$MOUNTED_PID")
}
# (d) imgpool in its default (cached) mode, with every disk's view bind-mounted
mount_imgpool "$BIN" "$STATE" "$W/mnt" --io-mode cached "${CACHE_ARGS[@]}"
IMG_PID=$MOUNTED_PID

# Paths: name -> files (space separated) and the pid whose CPU and RSS are measured.
PATHS=(direct bind bindfs imgpool-cached)
declare -A FILES=(
    [direct]=$COPY
    [bind]=$W/bind/$COPYBASE
    [bindfs]=$W/bindfs/$COPYBASE
    [imgpool-cached]=$W/mnt/images/$NAME
)
declare -A PID_OF=([direct]="" [bind]="" [bindfs]=$BINDFS_PID [imgpool-cached]=$IMG_PID)
declare -A DAEMON_OF=([direct]="" [bind]="" [bindfs]=bindfs [imgpool-cached]=imgpool)

# (e) imgpool in passthrough mode: a second mount of the same pool
mount_imgpool "$BIN" "$STATE" "$W/mnt-passthrough" --no-bind --io-mode passthrough
PATHS+=(imgpool-passthrough)
FILES[imgpool-passthrough]=$W/mnt-passthrough/images/$NAME
PID_OF[imgpool-passthrough]=$MOUNTED_PID
DAEMON_OF[imgpool-passthrough]=imgpool
mode=$(ip status --json | python3 -c '
import json, sys
for m in json.load(sys.stdin)["mounts"]:
    if m["mountpoint"] == sys.argv[1] and m["stats"]:
        print(m["stats"]["io_mode"])' "$W/mnt-passthrough")
[[ $mode == passthrough ]] || log "bench: WARNING: the passthrough mount runs in '${mode:-unknown}' mode (see $STATE/mount.log)"

# (e2) the baseline binary's cached mount of its own pool, with its own defaults
if [[ -n $BASELINE_BIN ]]; then
    mount_imgpool "$BASELINE_BIN" "$BASE_STATE" "$W/mnt-baseline" --no-bind
    PATHS+=(imgpool-cached-baseline)
    FILES[imgpool-cached-baseline]=$W/mnt-baseline/images/$NAME
    PID_OF[imgpool-cached-baseline]=$MOUNTED_PID
    BASE_HAS_CACHE_DROP=0
    "$BASELINE_BIN" cache drop --help >/dev/null 2>&1 && BASE_HAS_CACHE_DROP=1
    DAEMON_OF[imgpool-cached-baseline]=imgpool
    mount_imgpool "$BASELINE_BIN" "$BASE_PT_STATE" "$W/mnt-baseline-passthrough" --no-bind --io-mode passthrough
    PATHS+=(imgpool-passthrough-baseline)
    FILES[imgpool-passthrough-baseline]=$W/mnt-baseline-passthrough/images/$NAME
    PID_OF[imgpool-passthrough-baseline]=$MOUNTED_PID
    DAEMON_OF[imgpool-passthrough-baseline]=imgpool
fi

# (f) ten replicas: one bind-mounted path per disk
ten=()
for ((i = 1; i <= REPLICAS; i++)); do
    d=$(printf 'd%02d' "$i")
    f=$W/disks/$d/backing-images/$NAME-$UUID/backing
    for ((t = 0; t < 50; t++)); do [[ -e $f ]] && break; sleep 0.1; done
    [[ -e $f ]] || die "$f does not exist (bind mount of disk $d's view missing?)"
    ten+=("$f")
done
PATHS+=("imgpool-${REPLICAS}x")
FILES[imgpool-${REPLICAS}x]="${ten[*]}"
PID_OF[imgpool-${REPLICAS}x]=$IMG_PID
DAEMON_OF[imgpool-${REPLICAS}x]=imgpool

if [[ -n $PATHS_ARG ]]; then
    IFS=, read -r -a wanted <<<"$PATHS_ARG"
    chosen=(direct)
    for p in "${wanted[@]}"; do
        [[ -n ${FILES[$p]:-} ]] || die "--paths: no path '$p' (paths: ${PATHS[*]})"
        [[ $p == direct ]] || chosen+=("$p")
    done
    PATHS=("${chosen[@]}")
fi

for p in "${PATHS[@]}"; do
    for f in ${FILES[$p]}; do
        [[ $(stat -c %s "$f") -eq $SIZE ]] || die "$p: $f is not $SIZE bytes"
    done
done
inodes=$(stat -c %i "${ten[@]}" "${FILES[imgpool-cached]}" | sort -u | wc -l)
((inodes == 1)) || log "bench: WARNING: the imgpool paths have $inodes different inode numbers (expected 1)"

# --- measurement helpers ------------------------------------------------------------
CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # utime + stime of a whole process (all threads), in clock ticks
    # Fields after the ")" that ends comm: state is $1 there, utime $12, stime $13.
    local s
    s=$(cat "/proc/$1/stat") || return 1
    s=${s##*) }
    awk '{ print $12 + $13 }' <<<"$s"
}
status_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
meminfo_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }
# Cold means nothing cached anywhere: the kernel's caches and the imgpool daemons' chunk caches
# (`imgpool cache drop` empties those of every running mount of the pool).
drop_caches() {
    sync
    echo 3 >/proc/sys/vm/drop_caches
    ip cache drop >/dev/null
    if [[ -n $BASE_STATE ]]; then
        # Binaries from before the control socket empty their chunk cache on SIGUSR1.
        if ((BASE_HAS_CACHE_DROP)); then
            "$BASELINE_BIN" --state-dir "$BASE_STATE" cache drop >/dev/null
        else
            kill -USR1 "${PID_OF[imgpool-cached-baseline]}"
            sleep 0.2
        fi
    fi
}
now() { date +%s.%N; }
json_str_list() { local s="" x; for x in "$@"; do s+="${s:+,}\"$x\""; done; printf '[%s]' "$s"; }

# Read files to the end, several at once when more than one; with READ_DIRECT=1, with
# O_DIRECT (what fills imgpool's chunk cache for O_DIRECT readers: the page cache holds
# nothing for them).
read_one() {
    if [[ ${READ_DIRECT:-0} == 1 ]]; then
        dd if="$1" of=/dev/null bs=1M iflag=direct status=none
    else
        cat "$1" >/dev/null
    fi
}
read_files() {
    local f pids=() p rc=0
    if (($# == 1)); then read_one "$1"; return; fi
    for f in "$@"; do
        # Simple commands, so that each pid runs the command its name says (see stop_pid).
        if [[ ${READ_DIRECT:-0} == 1 ]]; then
            dd if="$f" of=/dev/null bs=1M iflag=direct status=none &
            BG_PIDS[$!]="dd"
        else
            cat "$f" >/dev/null &
            BG_PIDS[$!]="cat"
        fi
        pids+=($!)
    done
    for p in "${pids[@]}"; do wait "$p" || rc=1; unset "BG_PIDS[$p]"; done
    return "$rc"
}

mem_probe() { # path rep
    local path=$1 rep=$2 pid=${PID_OF[$1]} c0 c1 rss="null" hwm="null" copy_res t0 t1
    local -a files
    read -r -a files <<<"${FILES[$path]}"
    drop_caches
    sleep 1
    c0=$(meminfo_kb Cached)
    t0=$(now)
    read_files "${files[@]}" || die "memory probe: reading $path failed"
    t1=$(now)
    c1=$(meminfo_kb Cached)
    if [[ -n $pid ]]; then rss=$(status_kb "$pid" VmRSS); hwm=$(status_kb "$pid" VmHWM); fi
    copy_res=$(fincore --bytes --noheadings --output RES "$COPY" | tr -d ' ')
    printf '{"kind":"mem","path":"%s","rep":%d,"readers":%d,"cached_before_kb":%d,"cached_after_kb":%d,"daemon":%s,"daemon_rss_kb":%s,"daemon_hwm_kb":%s,"copy_cached_bytes":%d,"read_s":%s}\n' \
        "$path" "$rep" "${#files[@]}" "$c0" "$c1" "$( [[ -n $pid ]] && echo "\"${DAEMON_OF[$path]}\"" || echo null)" \
        "$rss" "$hwm" "$copy_res" "$(python3 -c "print(round($t1-$t0,3))")" >>"$RAW"
    log "memory $path rep $rep: page cache +$(((c1 - c0) / 1024)) MiB (copy file $((copy_res / 1048576)) MiB cached), daemon RSS $([[ $rss != null ]] && echo "$((rss / 1024)) MiB" || echo -)"
}

RUN_NO=0
TOTAL_RUNS=$((REPEAT * ${#JOBS[@]} * 2 * ${#PATHS[@]}))
run_fio() { # path job mode rep
    local path=$1 job=$2 mode=$3 rep=$4 pid=${PID_OF[$1]} inval io_size k tag
    local -a files outs=() pids=() rcs=()
    local cpu0="" cpu1="" hwm="null" t0 t1 rc=0 cpu="null" summary
    read -r -a files <<<"${FILES[$path]}"
    RUN_NO=$((RUN_NO + 1))
    if [[ $mode == warm ]]; then
        # Warm: the same kind of read (buffered or O_DIRECT) has read the whole image once.
        READ_DIRECT=$([[ $job == *_direct ]] && echo 1 || echo 0) read_files "${files[@]}" ||
            die "warm-up read of $path failed"
        inval=0
        io_size=$((SIZE * 1000))
    else
        drop_caches
        inval=1
        io_size=$SIZE
    fi
    if [[ -n $pid ]]; then
        alive "$pid" || die "the ${DAEMON_OF[$path]} daemon of $path (pid $pid) is gone; its log is kept in $LOGS"
        echo 5 >"/proc/$pid/clear_refs"   # reset VmHWM to the current RSS
        cpu0=$(cpu_ticks "$pid")
    fi
    t0=$(now)
    for ((k = 0; k < ${#files[@]}; k++)); do
        tag=$W/out/$job.$mode.$path.$rep.$k
        outs+=("$tag.json")
        FILE=${files[$k]} SIZE=$SIZE IO_SIZE=$io_size RUNTIME=$RUNTIME INVALIDATE=$inval \
            timeout --kill-after=10 $((RUNTIME + 120)) \
            fio --readonly --output-format=json --output="$tag.json" "$BENCH/jobs/$job.fio" 2>"$tag.err" &
        pids+=($!)
        BG_PIDS[$!]="timeout"
    done
    for k in "${!pids[@]}"; do
        if wait "${pids[$k]}"; then rcs+=(0); else rcs+=($?); rc=1; fi
        unset "BG_PIDS[${pids[$k]}]"
    done
    t1=$(now)
    if [[ -n $pid ]]; then
        if cpu1=$(cpu_ticks "$pid"); then
            cpu=$(python3 -c "print(round(($cpu1-$cpu0)/$CLK_TCK/($t1-$t0)*100,1))")
            hwm=$(status_kb "$pid" VmHWM)
        else
            log "bench: daemon pid $pid of $path is gone"
            rc=1
        fi
    fi
    printf '{"kind":"fio","path":"%s","job":"%s","mode":"%s","rep":%d,"readers":%d,"outputs":%s,"rcs":[%s],"wall_s":%s,"daemon":%s,"daemon_cpu_pct":%s,"daemon_hwm_kb":%s}\n' \
        "$path" "$job" "$mode" "$rep" "${#files[@]}" "$(json_str_list "${outs[@]}")" "$(IFS=,; echo "${rcs[*]}")" \
        "$(python3 -c "print(round($t1-$t0,3))")" "$( [[ -n $pid ]] && echo "\"${DAEMON_OF[$path]}\"" || echo null)" \
        "$cpu" "$hwm" >>"$RAW"
    if ((rc)); then
        summary="ERROR (fio exit ${rcs[*]}): $(cat "$W/out/$job.$mode.$path.$rep".*.err | head -c 300 | tr '\n' ' ')"
    else
        summary=$(python3 "$BENCH/report.py" sum "${outs[@]}")
    fi
    printf '[%3d/%d] rep %d %-22s %-4s %-12s %s%s\n' "$RUN_NO" "$TOTAL_RUNS" "$rep" "$job" "$mode" "$path" \
        "$summary" "$([[ $cpu != null ]] && echo ", daemon CPU $cpu%")" >&2
}

# --- the run ------------------------------------------------------------------------
# A new random order of the paths in ORDER (Fisher-Yates, bash's RANDOM seeded once).
shuffle_paths() {
    local i j t
    ORDER=("${PATHS[@]}")
    for ((i = ${#ORDER[@]} - 1; i > 0; i--)); do
        j=$((RANDOM % (i + 1)))
        t=${ORDER[i]}; ORDER[i]=${ORDER[j]}; ORDER[j]=$t
    done
}
[[ -n $SEED ]] || SEED=$(($(date +%s) % 32768))
RANDOM=$SEED
heading "running: ${JOBS[*]} x warm,cold x ${PATHS[*]}, $REPEAT repeat(s), ${RUNTIME}s each, path order seed $SEED"
START=$(now)
for ((rep = 1; rep <= REPEAT; rep++)); do
    shuffle_paths
    for p in "${ORDER[@]}"; do mem_probe "$p" "$rep"; done
    for job in "${JOBS[@]}"; do
        for mode in warm cold; do
            shuffle_paths
            for p in "${ORDER[@]}"; do run_fio "$p" "$job" "$mode" "$rep"; done
        done
    done
done
END=$(now)

# --- report -------------------------------------------------------------------------
fstype=$(findmnt -no FSTYPE,SOURCE -T "$W" | awk '{ print $1 " on " $2 }')
mkdir -p "$(dirname "$JSON_OUT")"
report_rc=0
python3 "$BENCH/report.py" report --raw "$RAW" --json-out "$JSON_OUT" \
    --meta command="scripts/bench/run.sh${ORIG_ARGS[*]:+ ${ORIG_ARGS[*]}}" \
    --meta nproc="$(nproc)" \
    --meta mem_total_kb="$(meminfo_kb MemTotal)" \
    --meta kernel="$(uname -r)" \
    --meta workdir_fs="$fstype" \
    --meta fio="$(fio --version)" \
    --meta bindfs="$(bindfs --version 2>&1 | head -n1)" \
    --meta imgpool="$("$BIN" --version)" \
    --meta git_commit="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" \
    --meta size_bytes="$SIZE" --meta runtime_s="$RUNTIME" --meta repeat="$REPEAT" \
    --meta replicas="$REPLICAS" --meta imgpool_threads=4 --meta path_order_seed="$SEED" \
    --meta baseline="$([[ -n $BASELINE_BIN ]] && "$BASELINE_BIN" --version || echo none)" \
    --meta io_modes="cached passthrough" \
    --meta elapsed_s="$(python3 -c "print(round($END-$START))")" \
    --meta date="$(date -u +%Y-%m-%dT%H:%M:%SZ)" || report_rc=$?
log "results written to $JSON_OUT"
((report_rc == 0)) || die "some measurements failed (see Errors above)"
