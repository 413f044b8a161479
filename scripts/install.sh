#!/usr/bin/env bash
# Install imgpool on this node: the binary, the systemd unit, shell completions (bash, zsh,
# fish) and the manual pages. Run as root from the repository, after `cargo build --release`.
#
#   sudo scripts/install.sh                    into / (binary in /usr/local/bin)
#   sudo scripts/install.sh --enable           and enable and start imgpool.service
#   DESTDIR=/tmp/stage scripts/install.sh      into a staging tree (packaging, tests)
#
# IMGPOOL_BIN=/path/to/imgpool installs that binary instead of target/release/imgpool.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${DESTDIR:-}
ENABLE=0
for arg in "$@"; do
    case $arg in
        --enable) ENABLE=1 ;;
        -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "install: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done
BIN=${IMGPOOL_BIN:-$ROOT/target/release/imgpool}
[[ -x $BIN ]] || { echo "install: $BIN not found: run cargo build --release first" >&2; exit 1; }
if [[ -z $DEST && $(id -u) -ne 0 ]]; then
    echo "install: run as root (or set DESTDIR to stage the files)" >&2
    exit 1
fi

install -D -m 0755 "$BIN" "$DEST/usr/local/bin/imgpool"
install -D -m 0644 "$ROOT/scripts/systemd/imgpool.service" "$DEST/etc/systemd/system/imgpool.service"
completions() { # shell path
    local out
    out=$("$BIN" completions "$1")
    install -D -m 0644 /dev/stdin "$DEST$2" <<<"$out"
}
completions bash /usr/share/bash-completion/completions/imgpool
completions zsh /usr/share/zsh/vendor-completions/_imgpool
completions fish /usr/share/fish/vendor_completions.d/imgpool.fish
"$BIN" manpages "$DEST/usr/local/share/man/man1" >/dev/null
echo "installed imgpool into ${DEST:-/}: binary, unit, completions, $(ls "$DEST/usr/local/share/man/man1" | grep -c '^imgpool') manual pages"

if [[ -z $DEST ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if ((ENABLE)); then
        systemctl enable --now imgpool.service
    fi
fi
