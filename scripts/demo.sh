#!/usr/bin/env bash
# imgpool demo: build, create a throwaway pool of three disks in /tmp, import a
# demo image, mount the pool and show that every view serves the same bytes
# through one inode. Everything is removed at the end, even on failure.
#
#   scripts/demo.sh          run the demo and clean up
#   scripts/demo.sh --keep   leave the pool mounted and print how to clean up
#
# IMGPOOL_BIN=/path/to/imgpool skips the build and uses that binary.
# Needs root (FUSE mount and bind mounts).
set -euo pipefail

keep=0
for arg in "$@"; do
    case "$arg" in
        --keep) keep=1 ;;
        -h|--help) sed -n '2,10s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "demo: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

if [[ $(id -u) -ne 0 ]]; then
    echo "demo: must run as root (the pool is a FUSE mount with bind mounts)" >&2
    exit 1
fi

heading() { printf '\n== %s ==\n' "$*"; }
# Print a command the way `set -x` would, then run it.
show() { printf '+'; printf ' %q' "$@"; printf '\n'; }
run() { show "$@"; "$@"; }
# Run imgpool, printed as "imgpool ..." rather than the full binary path.
imgpool() { show imgpool "$@"; "$BIN" "$@"; }

# Mount points under a directory, from the kernel's own table: stat-based checks
# (mountpoint(1)) fail on a FUSE mount whose daemon died, which is exactly when
# cleanup matters most. Demo paths contain no characters that mountinfo escapes.
mounts_under() {
    awk -v d="$1" '$5 == d || index($5, d "/") == 1 { print $5 }' /proc/self/mountinfo
}
is_mounted() { [[ -n $(mounts_under "$1" | awk -v p="$1" '$0 == p') ]]; }

D=""
BIN=""
STATE=""

cleanup() {
    local rc=$? m
    set +e
    ((rc == 0)) || echo "demo: FAILED (exit $rc)" >&2
    [[ -n $D && -d $D ]] || return "$rc"
    if ((keep)); then
        heading "kept (--keep)"
        echo "pool:  $D (state in $STATE)"
        echo "clean up with:"
        if is_mounted "$D/mnt"; then
            echo "  $BIN --state-dir $STATE umount $D/mnt &&"
        fi
        echo "  rm -rf --one-file-system $D"
        return "$rc"
    fi
    if [[ -n $(mounts_under "$D") ]]; then
        heading "cleaning up"
        if is_mounted "$D/mnt" && [[ -n $BIN ]]; then
            # timeout: a wedged daemon must not hang the cleanup.
            timeout 60 "$BIN" --state-dir "$STATE" umount "$D/mnt"
        fi
        # Last resort, by path and only under $D: the bind mounts first (they sit
        # on top of the FUSE views), then the FUSE mount itself.
        for m in "$D"/disk*/backing-images "$D/mnt"; do
            if is_mounted "$m"; then
                echo "demo: lazily unmounting $m" >&2
                umount -l "$m"
            fi
        done
    fi
    if [[ -n $(mounts_under "$D") ]]; then
        echo "demo: still mounted under $D, not removing it:" >&2
        mounts_under "$D" >&2
        exit 1   # in an EXIT trap, only `exit` changes the script's status
    fi
    # --one-file-system: never descend into anything that is still mounted.
    rm -rf --one-file-system "$D"
    return "$rc"
}
trap cleanup EXIT
# Make Ctrl-C and kill run the EXIT trap too.
trap 'exit 130' INT
trap 'exit 143' TERM

heading "dependencies"
if [[ -n ${IMGPOOL_BIN:-} ]]; then
    bash scripts/deps.sh --no-cargo
else
    bash scripts/deps.sh
fi

heading "building"
if [[ -n ${IMGPOOL_BIN:-} ]]; then
    BIN=$IMGPOOL_BIN
    echo "using IMGPOOL_BIN=$BIN"
else
    # Under sudo, HOME is root's while rustup may be the invoking user's.
    for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
        if ! command -v cargo >/dev/null 2>&1 && [[ -x "$home/.cargo/bin/cargo" ]]; then
            PATH="$home/.cargo/bin:$PATH"
            export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
        fi
    done
    locked=()
    [[ -f Cargo.lock ]] && locked=(--locked)
    run cargo build "${locked[@]}" --release
    BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/imgpool"
fi
if [[ ! -x $BIN ]]; then
    echo "demo: imgpool binary not found or not executable: $BIN" >&2
    exit 1
fi
BIN=$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")

heading "setting up a demo pool"
D=$(mktemp -d /tmp/imgpool-demo.XXXXXX)
STATE=$D/state
mkdir "$STATE" "$D/disk1" "$D/disk2" "$D/disk3" "$D/mnt"
echo "demo dir: $D (disks are plain directories: disk1 disk2 disk3)"

# A 64 MiB image with 12 MiB of data: 8 MiB at offset 0, 4 MiB at 32 MiB, holes
# elsewhere, like a freshly installed VM disk.
SRC=$D/demo.raw
run truncate -s 64M "$SRC"
run dd if=/dev/urandom of="$SRC" bs=1M count=8 conv=notrunc status=none
run dd if=/dev/urandom of="$SRC" bs=1M seek=32 count=4 conv=notrunc status=none
echo "demo.raw: $(du -h --apparent-size "$SRC" | cut -f1) apparent, $(du -h "$SRC" | cut -f1) allocated"

heading "creating the pool"
imgpool --state-dir "$STATE" init
for n in 1 2 3; do
    imgpool --state-dir "$STATE" disk add "disk$n" "$D/disk$n"
done
imgpool --state-dir "$STATE" disk list

heading "importing an image"
imgpool --state-dir "$STATE" image add demo-image "$SRC"
imgpool --state-dir "$STATE" image list
imgpool --state-dir "$STATE" ref add demo-image replica-1

heading "mounting"
imgpool --state-dir "$STATE" mount "$D/mnt"
if ! is_mounted "$D/mnt"; then
    echo "demo: 'imgpool mount' returned but $D/mnt is not mounted" >&2
    exit 1
fi

heading "views"
shopt -s nullglob
run ls -l "$D/mnt/images" "$D"/mnt/disks/*
cfgs=("$D"/mnt/disks/*/demo-image-*/backing.cfg)
if ((${#cfgs[@]} == 0)); then
    echo "demo: no demo-image-*/backing.cfg in any disk view under $D/mnt/disks" >&2
    exit 1
fi
run cat "${cfgs[0]}"
[[ -z $(tail -c1 "${cfgs[0]}") ]] || echo   # JSON without a trailing newline

heading "checking that every path serves the same bytes"
view_paths=("$D"/mnt/disks/*/demo-image-*/backing)
bind_paths=("$D"/disk*/backing-images/demo-image-*/backing)
shopt -u nullglob
if ((${#view_paths[@]} == 0)); then
    echo "demo: no disk view serves demo-image (expected $D/mnt/disks/<disk>/demo-image-<uuid>/backing)" >&2
    exit 1
fi
if ((${#bind_paths[@]} == 0)); then
    echo "demo: no bind mount serves demo-image (expected $D/diskN/backing-images/demo-image-<uuid>/backing)" >&2
    exit 1
fi
paths=("$D/mnt/images/demo-image" "${view_paths[@]}" "${bind_paths[@]}")

show sha512sum "$SRC" "${paths[@]}"
sums=$(sha512sum "$SRC" "${paths[@]}")
printf '%s\n' "$sums"
src_sum=${sums%% *}
bad=0
while read -r sum path; do
    if [[ $sum != "$src_sum" ]]; then
        echo "FAIL: $path differs from the source" >&2
        bad=$((bad + 1))
    fi
done <<<"$sums"
if ((bad)); then
    echo "FAIL: $bad of ${#paths[@]} paths do not serve the source's bytes" >&2
    exit 1
fi
echo "OK: all ${#paths[@]} paths serve the same bytes as demo.raw"

heading "one inode behind every path"
run stat -c '%i %n' "${paths[@]}"
inodes=$(stat -c '%i' "${paths[@]}" | sort -u | wc -l)
if ((inodes != 1)); then
    echo "FAIL: $inodes different inode numbers; every view should share one inode" >&2
    exit 1
fi
echo "OK: one inode ($(stat -c '%i' "${paths[0]}")) in every view, cached once by the kernel"

heading "a writable volume over the image, a snapshot, and an image made of it"
imgpool --state-dir "$STATE" volume create demo-volume --image demo-image
VOL=$D/mnt/volumes/demo-volume
for ((i = 0; i < 50; i++)); do [[ -e $VOL ]] && break; sleep 0.1; done
# The volume reads as its image until written; then 1 MiB of it is rewritten.
cmp "$VOL" "$SRC" && echo "OK: the new volume reads as demo-image"
run dd if=/dev/urandom of="$VOL" bs=1M seek=8 count=1 conv=notrunc,fsync status=none
cp --sparse=always "$VOL" "$D/written.raw"
imgpool --state-dir "$STATE" snapshot create demo-volume@after-write
run dd if=/dev/zero of="$VOL" bs=1M count=1 conv=notrunc,fsync status=none
imgpool --state-dir "$STATE" snapshot list demo-volume
SNAP=$D/mnt/snapshots/demo-volume/after-write
for ((i = 0; i < 50; i++)); do [[ -e $SNAP ]] && break; sleep 0.1; done
if ! cmp "$SNAP" "$D/written.raw"; then
    echo "FAIL: the snapshot file does not read as the volume did when it was taken" >&2
    exit 1
fi
echo "OK: $SNAP reads as the volume did at the snapshot, though the volume changed since"
imgpool --state-dir "$STATE" image add demo-export --from-volume demo-volume@after-write
# An export is committed before its SHA-512 is computed (the mount daemon computes it in the
# background); `image checksum` gives it now.
imgpool --state-dir "$STATE" image checksum demo-export
want=$(sha512sum <"$D/written.raw" | cut -d' ' -f1)
got=$("$BIN" --state-dir "$STATE" image checksum demo-export --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha512"])')
if [[ $got != "$want" ]]; then
    echo "FAIL: the exported image's SHA-512 is not the snapshot's" >&2
    exit 1
fi
echo "OK: demo-export holds the snapshot's bytes (SHA-512 $got)"

heading "send and receive: the volume copied to a second pool (another node's, over a pipe)"
NODE2=$D/node2
mkdir -p "$NODE2/disk1"
imgpool --state-dir "$NODE2/state" init
imgpool --state-dir "$NODE2/state" disk add disk1 "$NODE2/disk1"
# Node2 lacks demo-image: --with-image carries it in the stream.
echo "+ imgpool send demo-volume@after-write --with-image | imgpool --state-dir $NODE2/state recv demo-copy"
"$BIN" --state-dir "$STATE" send demo-volume@after-write --with-image |
    "$BIN" --state-dir "$NODE2/state" recv demo-copy
# Then what changed since (the volume as it is now, through a temporary snapshot): 1 MiB of
# zeros, which the stream carries as a range, not as data.
echo "+ imgpool send demo-volume --from after-write | imgpool --state-dir $NODE2/state recv demo-copy"
"$BIN" --state-dir "$STATE" send demo-volume --from after-write --json 2>"$D/send.json" |
    "$BIN" --state-dir "$NODE2/state" recv demo-copy
echo "the stream: $(python3 -c 'import json,sys; d = json.load(sys.stdin); print(d["bytes"], "bytes, carrying", d["data_bytes"], "bytes of data and", d["zero_bytes"], "that read as zeros")' <"$D/send.json")"
imgpool --state-dir "$NODE2/state" snapshot list demo-copy
"$BIN" --state-dir "$NODE2/state" image add demo-copy-now --from-volume demo-copy >/dev/null
want=$(sha512sum <"$VOL" | cut -d' ' -f1)
got=$("$BIN" --state-dir "$NODE2/state" image checksum demo-copy-now --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["sha512"])')
if [[ $got != "$want" ]]; then
    echo "FAIL: the received volume does not hold the sent volume's bytes" >&2
    exit 1
fi
echo "OK: demo-copy on the second pool holds demo-volume's bytes (SHA-512 $got)"

heading "status"
imgpool --state-dir "$STATE" status

if ((keep)); then
    exit 0   # the EXIT trap prints how to clean up
fi

heading "unmounting"
imgpool --state-dir "$STATE" umount "$D/mnt"

heading "done"
echo "the demo pool in $D is removed on exit"
