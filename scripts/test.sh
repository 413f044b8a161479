#!/usr/bin/env bash
# Run the whole test suite: system deps, fmt, clippy, build, tests.
#
#   scripts/test.sh              everything
#   scripts/test.sh mount        only tests whose name contains "mount"
#   scripts/test.sh --nocapture  any other libtest argument
#
# Extra arguments go to the test binaries (after cargo's `--`).
# Mount tests need root and /dev/fuse.
# Exit code: the tests' exit code if they fail; otherwise 1 if fmt or clippy
# failed; 0 when everything passed.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# rustup installs into ~/.cargo/bin, which a non-login shell may not have on PATH.
# Under sudo, HOME is root's while rustup may be the invoking user's.
for home in "${HOME:-/root}" "$(getent passwd "${SUDO_USER:-root}" | cut -d: -f6)"; do
    if ! command -v cargo >/dev/null 2>&1 && [[ -x "$home/.cargo/bin/cargo" ]]; then
        PATH="$home/.cargo/bin:$PATH"
        export RUSTUP_HOME="${RUSTUP_HOME:-$home/.rustup}"
    fi
done

bash scripts/deps.sh

if [[ $(id -u) -ne 0 ]]; then
    echo "note: not running as root; tests that mount FUSE, loop devices or bind mounts need root" >&2
fi

# --locked makes CI fail if Cargo.lock is out of date instead of silently
# resolving new versions; without a lock file there is nothing to lock to.
locked=()
if [[ -f Cargo.lock ]]; then
    locked=(--locked)
fi

echo "== toolchain: $(cargo --version); kernel $(uname -r) =="

# Lint failures are recorded, not fatal: the tests still run, so one run reports
# everything. They still fail the script at the end.
lint_failed=()

echo "== layers: no import cycle, no upward import (scripts/check-layers.py) =="
python3 scripts/check-layers.py || lint_failed+=(layers)

if cargo fmt --version >/dev/null 2>&1; then
    echo "== cargo fmt --check =="
    cargo fmt --check || lint_failed+=(fmt)
else
    echo "== skipping cargo fmt: rustfmt is not installed (rustup component add rustfmt) =="
fi

if cargo clippy --version >/dev/null 2>&1; then
    echo "== cargo clippy =="
    cargo clippy "${locked[@]}" --all-targets -- -D warnings || lint_failed+=(clippy)
else
    echo "== skipping cargo clippy: clippy is not installed (rustup component add clippy) =="
fi

echo "== cargo build =="
cargo build "${locked[@]}" --all-targets

echo "== cargo test =="
test_rc=0
log=$(mktemp)
trap 'rm -f "$log"' EXIT
cargo test "${locked[@]}" -- --test-threads=2 "$@" 2>&1 | tee "$log" || test_rc=$?
# One total over all test binaries, as the last line a reader (or CI) sees.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"

if ((test_rc != 0)); then
    echo "FAIL: tests failed (exit $test_rc)${lint_failed[*]:+; also failed: ${lint_failed[*]}}" >&2
    exit "$test_rc"
fi
if ((${#lint_failed[@]})); then
    echo "FAIL: tests passed, but ${lint_failed[*]} failed" >&2
    exit 1
fi
