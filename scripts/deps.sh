#!/usr/bin/env bash
# Install the system packages imgpool's build, tests and demo need, when missing.
#
#   scripts/deps.sh              check everything (commands, /dev/fuse, cargo)
#   scripts/deps.sh --no-cargo   same, but do not require cargo (prebuilt binary)
#
# Idempotent: when nothing is missing it prints one line and changes nothing.
# Run it as a command (bash scripts/deps.sh), not with `source`: it sets
# `set -euo pipefail` and would leak that into the caller.
set -euo pipefail

need_cargo=1
case "${1:-}" in
    --no-cargo) need_cargo=0 ;;
    "") ;;
    *) echo "usage: $0 [--no-cargo]" >&2; exit 2 ;;
esac

# command -> Debian package that provides it.
declare -A pkg_of=(
    [fusermount3]=fuse3
    [fio]=fio
    [xfs_io]=xfsprogs
    [mkfs.ext4]=e2fsprogs
    [filefrag]=e2fsprogs      # a copy's sectors on its disk, for the bad-sector test
    [losetup]=mount           # losetup ships in "mount" (util-linux source)
    [bindfs]=bindfs
    [sha512sum]=coreutils
    [qemu-img]=qemu-utils     # tests/imports.rs and bench/imports.sh only: imgpool reads qcow2 itself
    [qemu-io]=qemu-utils
    [python3]=python3
    [setpriv]=util-linux
    [promtool]=prometheus     # checks the daemon's /metrics output in tests/operations.rs
    [truncate]=coreutils
    [sshd]=openssh-server     # tests/copy.rs starts its own sshd on 127.0.0.1 (the "other node")
    [ssh]=openssh-client      # imgpool copy reaches another node with ssh
    [ssh-keygen]=openssh-client
    [rsync]=rsync             # bench/sendrecv.sh compares a refresh with rsync
)

# Collect the packages of missing commands, each package once, in a stable order.
declare -A want=()
for cmd in $(printf '%s\n' "${!pkg_of[@]}" | sort); do
    if ! command -v "$cmd" >/dev/null 2>&1; then
        want[${pkg_of[$cmd]}]=1
    fi
done
missing_pkgs=()
if ((${#want[@]})); then
    mapfile -t missing_pkgs < <(printf '%s\n' "${!want[@]}" | sort)
fi

installed=0
if ((${#missing_pkgs[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        echo "deps: missing packages: ${missing_pkgs[*]} (run as root, or: apt-get install ${missing_pkgs[*]})" >&2
        exit 1
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        echo "deps: missing packages: ${missing_pkgs[*]}, and apt-get is not available to install them" >&2
        exit 1
    fi
    echo "deps: installing ${missing_pkgs[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # -qq keeps a successful run short; errors still reach stderr.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing_pkgs[@]}" >/dev/null
    installed=1
    # Verify: a package name that no longer provides the command should fail here,
    # not later in the middle of a test.
    for cmd in "${!pkg_of[@]}"; do
        if ! command -v "$cmd" >/dev/null 2>&1; then
            echo "deps: '$cmd' still missing after installing ${pkg_of[$cmd]}" >&2
            exit 1
        fi
    done
fi

# FUSE: the device node must exist and be openable. Opening /dev/fuse without
# mounting is harmless (the kernel drops the unused connection on close), and it
# catches containers where the node exists but the device cgroup denies access.
fuse_usable() { [[ -c /dev/fuse ]] && { : <>/dev/fuse; } 2>/dev/null; }
if ! fuse_usable; then
    if [[ ! -e /dev/fuse ]] && command -v modprobe >/dev/null 2>&1; then
        modprobe fuse 2>/dev/null || true
    fi
    if ! fuse_usable; then
        echo "deps: /dev/fuse is missing or not usable (tried 'modprobe fuse'); load the fuse module on the host and give this environment access to /dev/fuse" >&2
        exit 1
    fi
fi

# Rust: rustup installs into ~/.cargo/bin, which a non-login shell (CI, sudo)
# may not have on PATH.
# Under sudo, HOME is root's while rustup may be the invoking user's.
for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$home/.cargo/bin/cargo" ]]; then
        PATH="$home/.cargo/bin:$PATH"
        export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
    fi
done
if ((need_cargo)) && ! command -v cargo >/dev/null 2>&1; then
    echo "deps: cargo not found; Rust is needed: install it with rustup (https://rustup.rs)" >&2
    exit 1
fi

if ((installed)); then
    echo "deps: all present (installed ${missing_pkgs[*]})"
else
    echo "deps: all present"
fi
