# Sourced by the benchmark scripts: the binary to measure, a scratch pool directory, and the
# cleanup that unmounts and removes it however the script ends.
#
#   source "$ROOT/scripts/bench/pool.sh"
#   bench_binary                  # BIN: $IMGPOOL_BIN, or the release build (installs deps)
#   bench_workdir volbench        # W: a new directory; ip ARGS runs imgpool on its pool
#   ...; MOUNTED=1 once "$W/mnt" is mounted
#
# The caller sets `set -euo pipefail` and defines ROOT.

W=""
BIN=""
MOUNTED=0
BENCH_NAME=bench

bench_cleanup() {
    local rc=$?
    set +e
    if ((MOUNTED)); then
        "$BIN" --state-dir "$W/state" umount "$W/mnt" >/dev/null 2>&1 || umount -l "$W/mnt"
    fi
    if [[ -n $W && -d $W ]]; then
        if awk -v d="$W" 'index($5, d) == 1 { f = 1 } END { exit !f }' /proc/self/mountinfo; then
            echo "$BENCH_NAME: still mounted under $W, not removing it" >&2
        else
            rm -rf --one-file-system "$W"
        fi
    fi
    exit "$rc"
}
trap bench_cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

bench_binary() {
    if [[ -n ${IMGPOOL_BIN:-} ]]; then
        bash "$ROOT/scripts/deps.sh" --no-cargo >&2
        BIN=$IMGPOOL_BIN
    else
        bash "$ROOT/scripts/deps.sh" >&2
        cargo build --release >&2
        BIN=$ROOT/target/release/imgpool
    fi
    BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")
}

# A scratch directory named after the benchmark, under $2 (default /tmp), with state/,
# disk/, mnt/ and out/.
bench_workdir() {
    BENCH_NAME=$1
    W=$(mktemp -d "${2:-/tmp}/imgpool-$1.XXXXXX")
    mkdir -p "$W/state" "$W/disk" "$W/mnt" "$W/out"
}

ip() { "$BIN" --state-dir "$W/state" "$@"; }
