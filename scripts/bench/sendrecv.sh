#!/usr/bin/env bash
# imgpool send/receive benchmark (issue 13): a volume copied and refreshed over ssh to
# localhost, side by side with what one would use on flat files, in one run on the same data.
#
#   sudo scripts/bench/sendrecv.sh                  4 GiB volume with 2 GiB of data
#   sudo scripts/bench/sendrecv.sh --size 256M      a small run (the change sizes scaled down)
#
# Options:
#   --size SIZE      the volume (and flat file) size, half of it data (default 4G)
#   --changes LIST   the change sizes of the incremental sends (default 1M,100M,1G at 4G: 1 MiB,
#                    about 1/40 and 1/4 of the volume; sizes over a quarter are left out)
#   --repeat N       runs of the full copy on one machine and of cp, in alternating order;
#                    the table has the median (default 3)
#   --json-out FILE  the raw results (default target/bench/sendrecv.json)
#
# The data: random bytes in every other 64 MiB of a volume (written through the mount) and of
# a sparse flat file, the same bytes at the same places. The other node is a second pool
# (its own state directory and disk directory) reached through an sshd that the script starts
# on 127.0.0.1 with generated keys; the flat files' other side is a directory behind the same
# sshd. Each measurement starts with cold caches (sync, drop_caches); each runs once, but
# for the full copy on one machine (--repeat).
#   full      imgpool copy v localhost:v (send | ssh | recv, every snapshot and the live
#             state) against `dd bs=16M | ssh dd bs=16M conv=sparse` of the flat file, and the
#             same send | recv on one machine (no ssh) against `cp --sparse=always`
#   refresh   1% of the volume rewritten in 64 KiB pieces at random places (the same in the
#             flat file), then a snapshot: imgpool copy --refresh against
#             `rsync --inplace --no-whole-file` of the flat file over the same ssh
#   increment send v@cN --from c(N-1) > pipe, for each change size (64 KiB pieces at random
#             places, then a snapshot): time and bytes, at a fixed volume size
# Reported: seconds, bytes that crossed (imgpool copy's count, rsync's "Total bytes sent",
# dd's bytes), the ratios, and whether the two sides' content is the same (SHA-512 of the
# mount's files against the flat file).
#
# Needs root. Installs what is missing (scripts/deps.sh) and builds the release binary
# (IMGPOOL_BIN=/path/to/imgpool skips the build). Stops its sshd, unmounts and removes
# everything on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
SIZE_ARG=4G
CHANGES_ARG=""
JSON_OUT=$ROOT/target/bench/sendrecv.json
REPEAT=3
ORIG_ARGS=("$@")
die() { echo "sendrecvbench: $*" >&2; exit 1; }
log() { printf 'sendrecvbench: %s\n' "$*" >&2; }
need_val() { [[ $# -ge 2 && -n $2 ]] || { echo "sendrecvbench: $1 needs a value" >&2; exit 2; }; }
while (($#)); do
    case "$1" in
        --size) need_val "$@"; SIZE_ARG=$2; shift ;;
        --changes) need_val "$@"; CHANGES_ARG=$2; shift ;;
        --json-out) need_val "$@"; JSON_OUT=$2; shift ;;
        --repeat) need_val "$@"; REPEAT=$2; shift ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "sendrecvbench: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ $REPEAT =~ ^[1-9][0-9]*$ ]] || { echo "sendrecvbench: --repeat must be a whole number of runs, 1 or more" >&2; exit 2; }
SIZE=$(numfmt --from=iec "$SIZE_ARG" 2>/dev/null) || { echo "sendrecvbench: --size '$SIZE_ARG' is not a size like 256M or 4G" >&2; exit 2; }
((SIZE >= 134217728 && SIZE % 134217728 == 0)) || { echo "sendrecvbench: --size must be a multiple of 128M" >&2; exit 2; }
# 1 MiB, 100/4096 and 1/4 of the volume, in whole 64 KiB pieces: 1M,100M,1G at 4G.
[[ -n $CHANGES_ARG ]] || CHANGES_ARG=1M,$((SIZE * 100 / 4096 / 65536 * 65536)),$((SIZE / 4))
CHANGES=()
for c in ${CHANGES_ARG//,/ }; do
    b=$(numfmt --from=iec "$c" 2>/dev/null) || { echo "sendrecvbench: --changes: '$c' is not a size" >&2; exit 2; }
    ((b >= 65536)) || { echo "sendrecvbench: --changes: '$c' is under one 64 KiB piece" >&2; exit 2; }
    CHANGES+=("$b")
done
[[ $JSON_OUT = /* ]] || JSON_OUT=$ROOT/$JSON_OUT
[[ $(id -u) -eq 0 ]] || die "must run as root (mounts, drop_caches, sshd)"

source "$ROOT/scripts/bench/pool.sh"
SSHD_PID=""
sendrecv_cleanup() {
    local rc=$?
    [[ -n $SSHD_PID ]] && kill "$SSHD_PID" 2>/dev/null && wait "$SSHD_PID" 2>/dev/null
    (exit "$rc")
    bench_cleanup
}
trap sendrecv_cleanup EXIT
bench_binary
bench_workdir sendrecvbench /var/tmp
mkdir -p "$W/state2" "$W/disk2" "$W/ssh" "$W/remote"
there() { "$BIN" --state-dir "$W/state2" "$@"; }

# The ssh link: an sshd of this run's own on a free port, keys made here.
ssh-keygen -q -t ed25519 -N "" -f "$W/ssh/host_key"
ssh-keygen -q -t ed25519 -N "" -f "$W/ssh/client_key"
cp "$W/ssh/client_key.pub" "$W/ssh/authorized_keys"
mkdir -p /run/sshd
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$W/ssh/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $W/ssh/host_key
AuthorizedKeysFile $W/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
StrictModes no
UsePAM no
PidFile none
LogLevel INFO
EOF
SSHD=$(command -v sshd || echo /usr/sbin/sshd)
"$SSHD" -D -e -f "$W/ssh/sshd_config" 2>"$W/ssh/sshd.log" &
SSHD_PID=$!
RSH="ssh -p $PORT -i $W/ssh/client_key -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o BatchMode=yes -o LogLevel=ERROR"
for ((i = 0; i < 100; i++)); do $RSH localhost true 2>/dev/null && break; sleep 0.1; done
$RSH localhost true || die "ssh to the benchmark's sshd fails: $(cat "$W/ssh/sshd.log")"
COPY=(copy --rsh "$RSH" --remote-state-dir "$W/state2" --remote-imgpool "$BIN")

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; ip cache drop >/dev/null 2>&1 || true; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'; }
RAW=$W/raw.jsonl
: >"$RAW"
record() { # case tool seconds bytes [changed]
    printf '{"case":"%s","tool":"%s","seconds":%s,"bytes":%s,"changed":%s}\n' "$1" "$2" "$3" "$4" "${5:-0}" >>"$RAW"
    log "$(tail -n1 "$RAW")"
}
json_field() { python3 -c 'import json,sys; print(json.load(sys.stdin)[sys.argv[1]])' "$1"; }

# The data: the same random 64 MiB pieces in every other 64 MiB of the volume and the flat file.
log "building the data: $SIZE_ARG volume, half of it data"
ip init >/dev/null
ip disk add d1 "$W/disk" >/dev/null
there init >/dev/null
there disk add d1 "$W/disk2" >/dev/null
ip volume create v --size "$SIZE" >/dev/null
ip mount "$W/mnt" --no-bind >/dev/null
MOUNTED=1
for ((i = 0; i < 50; i++)); do [[ -e $W/mnt/volumes/v ]] && break; sleep 0.1; done
truncate -s "$SIZE" "$W/flat.raw"
for ((at = 0; at < SIZE; at += 128 * 1048576)); do
    head -c $((64 * 1048576)) /dev/urandom >"$W/piece"
    dd if="$W/piece" of="$W/mnt/volumes/v" bs=16M seek=$((at / 16777216)) conv=notrunc,fsync status=none
    dd if="$W/piece" of="$W/flat.raw" bs=16M seek=$((at / 16777216)) conv=notrunc status=none
done
rm -f "$W/piece"
sync
snapshot() { for ((i = 0; i < 50; i++)); do ip snapshot create "v@$1" >/dev/null 2>&1 && return; sleep 0.1; done; ip snapshot create "v@$1"; }
snapshot s0

# Rewrites `bytes` in 64 KiB pieces at random places, the same in the volume and the flat file.
rewrite() { # bytes seed
    python3 - "$W/mnt/volumes/v" "$W/flat.raw" "$SIZE" "$1" "$2" <<'EOF'
import os, random, sys
volume, flat, size, total, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
piece = 65536
rng = random.Random(seed)
slots = rng.sample(range(size // piece), total // piece)
fds = [os.open(volume, os.O_WRONLY), os.open(flat, os.O_WRONLY)]
for slot in slots:
    data = rng.randbytes(piece)
    for fd in fds:
        os.pwrite(fd, data, slot * piece)
for fd in fds:
    os.fsync(fd)
    os.close(fd)
EOF
}

# Full: over ssh, imgpool copy against dd | ssh dd.
drop_caches
t0=$(now)
out=$(ip "${COPY[@]}" v localhost:v --json)
t1=$(now)
record full imgpool-copy-ssh "$(elapsed "$t0" "$t1")" "$(json_field bytes <<<"$out")"
drop_caches
t0=$(now)
dd if="$W/flat.raw" bs=16M status=none | $RSH localhost "dd of=$W/remote/flat.raw bs=16M conv=sparse status=none && sync -f $W/remote/flat.raw"
t1=$(now)
record full dd-ssh "$(elapsed "$t0" "$t1")" "$SIZE"
# Full on one machine: send | recv against cp --sparse=always, --repeat times in alternating
# order. Each send is of a snapshot never sent before (the same content as s0), so the sender
# hashes all of it, as a first copy does.
full_local_imgpool() {
    drop_caches
    t0=$(now)
    ip send "v@full$1" | there recv local >/dev/null
    t1=$(now)
    record full imgpool-send-recv-local "$(elapsed "$t0" "$t1")" 0
    there volume rm --recursive local >/dev/null
}
full_local_cp() {
    drop_caches
    t0=$(now)
    cp --sparse=always "$W/flat.raw" "$W/copy.raw"
    sync -f "$W/copy.raw"
    t1=$(now)
    record full cp-sparse "$(elapsed "$t0" "$t1")" 0
    rm -f "$W/copy.raw"
}
for ((r = 1; r <= REPEAT; r++)); do
    snapshot "full$r"
    if ((r % 2)); then full_local_imgpool "$r"; full_local_cp; else full_local_cp; full_local_imgpool "$r"; fi
done

# Refresh after 1% rewritten: imgpool copy --refresh against rsync --inplace.
CHANGED=$((SIZE / 100 / 65536 * 65536))
rewrite "$CHANGED" 1
snapshot s1
drop_caches
t0=$(now)
out=$(ip "${COPY[@]}" v localhost:v --refresh --json)
t1=$(now)
record refresh imgpool-copy-refresh "$(elapsed "$t0" "$t1")" "$(json_field bytes <<<"$out")" "$CHANGED"
drop_caches
t0=$(now)
sent=$(rsync --inplace --no-whole-file --stats -e "$RSH" "$W/flat.raw" "localhost:$W/remote/flat.raw" | awk -F': ' '/^Total bytes sent/ { gsub(/,/, "", $2); print $2 }')
t1=$(now)
record refresh rsync-inplace "$(elapsed "$t0" "$t1")" "$sent" "$CHANGED"

# The same content on both sides: the target volume's SHA-512 through an export there (an
# image of it), the flat files' with sha512sum.
there image add check --from-volume v >/dev/null
THERE_SHA=$(there image show check --json | json_field sha512)
there image rm check >/dev/null
REMOTE_SHA=$(sha512sum "$W/remote/flat.raw" | cut -d' ' -f1)
FLAT_SHA=$(sha512sum "$W/flat.raw" | cut -d' ' -f1)

# Incremental send alone, as a function of the change size.
prev=s1
n=0
for bytes in "${CHANGES[@]}"; do
    if ((bytes > SIZE / 4)); then
        log "leaving out a change of $bytes bytes: over a quarter of the volume"
        continue
    fi
    n=$((n + 1))
    rewrite "$bytes" $((100 + n))
    snapshot "c$n"
    drop_caches
    t0=$(now)
    sent=$(ip send "v@c$n" --from "$prev" | wc -c)
    t1=$(now)
    record increment "send-$bytes" "$(elapsed "$t0" "$t1")" "$sent" "$bytes"
    prev=c$n
done

mkdir -p "$(dirname "$JSON_OUT")"
cp "$RAW" "$JSON_OUT"
python3 - "$RAW" "$SIZE" "$FLAT_SHA" "$THERE_SHA" "$REMOTE_SHA" "$("$BIN" --version)" "$(uname -r)" "$(nproc)" "scripts/bench/sendrecv.sh ${ORIG_ARGS[*]}" <<'EOF'
import json, sys
raw, size, flat, there, remote, version, kernel, nproc, command = sys.argv[1:]
rows = [json.loads(l) for l in open(raw)]
size = int(size)
runs = {}
for r in rows:
    runs.setdefault((r["case"], r["tool"]), []).append(r)
# A measurement run more than once is shown by its median run.
by = {k: sorted(v, key=lambda r: r["seconds"])[len(v) // 2] for k, v in runs.items()}
mib = lambda b: f"{b / 2**20:,.1f}"
print(f"\nimgpool send/receive benchmark: {command}")
print(f"{size >> 20} MiB volume, {size >> 21} MiB of data; over ssh to localhost; cold caches; one run each unless said; {nproc} CPUs, kernel {kernel}, {version}")
print(f"same content: volume there {'=' if there == flat else '!='} flat file here, rsync'd flat file {'=' if remote == flat else '!='} flat file here\n")
print("| case | imgpool | seconds | MiB crossed | other | seconds | MiB crossed | speed imgpool / other |")
print("|---|---|--:|--:|---|--:|--:|--:|")
def pair(case, a, b, label):
    x, y = by[(case, a)], by[(case, b)]
    xb = mib(x["bytes"]) if x["bytes"] else "-"
    yb = mib(y["bytes"]) if y["bytes"] else "-"
    n = len(runs[(case, a)])
    label = label if n == 1 else f"{label} (median of {n}: " + ", ".join(f"{r['seconds']:.2f}" for r in runs[(case, a)]) + " / " + ", ".join(f"{r['seconds']:.2f}" for r in runs[(case, b)]) + ")"
    print(f"| {label} | {a} | {x['seconds']:.2f} | {xb} | {b} | {y['seconds']:.2f} | {yb} | {y['seconds'] / x['seconds']:.2f} |")
pair("full", "imgpool-copy-ssh", "dd-ssh", "full, over ssh")
pair("full", "imgpool-send-recv-local", "cp-sparse", "full, one machine")
pair("refresh", "imgpool-copy-refresh", "rsync-inplace", "refresh after 1% rewritten")
changed = by[("refresh", "imgpool-copy-refresh")]["changed"]
print(f"\nrefresh: {mib(changed)} MiB rewritten; imgpool sent {by[('refresh', 'imgpool-copy-refresh')]['bytes'] / changed:.3f}x of it, rsync {by[('refresh', 'rsync-inplace')]['bytes'] / changed:.3f}x")
inc = [r for r in rows if r["case"] == "increment"]
if inc:
    print("\n| incremental send | seconds | MiB sent | sent / changed |")
    print("|---|--:|--:|--:|")
    for r in inc:
        print(f"| {mib(r['changed'])} MiB changed | {r['seconds']:.2f} | {mib(r['bytes'])} | {r['bytes'] / r['changed']:.3f} |")
EOF
