#!/usr/bin/env bash
# Installs ots on a server or worker host (or into a staging root):
#
#   cargo build --release --locked        # or: cargo install --path . --locked
#   sudo scripts/install.sh               # PREFIX=/usr, DESTDIR=/
#   DESTDIR=/tmp/root scripts/install.sh  # a staging tree (packaging, CI)
#
# Environment: DESTDIR (default empty), PREFIX (default /usr), SYSCONFDIR
# (default /etc), BINDIR_SRC (where the built binaries are; default
# target/release, else target/debug). Existing files in /etc/ots are never
# overwritten. Then, on a real host:
#   systemd-sysusers; systemd-tmpfiles --create
#   ots-server keygen /etc/ots/server                (server host)
#   ots-worker keygen /etc/ots/worker.d/NAME         (worker host: one per
#       device; as root the key is handed to the ots user), then write
#       /etc/ots/worker.d/NAME.toml with the device and give the server's
#       admin NAME.pub for its workers.d
#   systemctl enable --now ots-server     / ots-worker@NAME
set -euo pipefail
cd "$(dirname "$0")/.."

DESTDIR="${DESTDIR:-}"
PREFIX="${PREFIX:-/usr}"
SYSCONFDIR="${SYSCONFDIR:-/etc}"
if [ -z "${BINDIR_SRC:-}" ]; then
    if [ -x target/release/ots-server ]; then
        BINDIR_SRC=target/release
    else
        BINDIR_SRC=target/debug
        echo "install.sh: warning: no release build (target/release/ots-server); installing the DEBUG binaries of target/debug, which are several times slower — build with \`cargo build --release --locked\` first, or set BINDIR_SRC" >&2
    fi
fi
for b in ots-server ots-worker ots-submit; do
    [ -x "$BINDIR_SRC/$b" ] || { echo "install.sh: $BINDIR_SRC/$b not built (cargo build --release --locked)" >&2; exit 66; }
done

root="$DESTDIR"
bindir="$root$PREFIX/bin"
unitdir="$root$PREFIX/lib/systemd/system"
sysusersdir="$root$PREFIX/lib/sysusers.d"
tmpfilesdir="$root$PREFIX/lib/tmpfiles.d"
sharedir="$root$PREFIX/share"
etc="$root$SYSCONFDIR/ots"

install -d "$bindir" "$unitdir" "$sysusersdir" "$tmpfilesdir" \
    "$sharedir/ots/examples" "$sharedir/doc/ots" "$sharedir/man/man1" \
    "$sharedir/bash-completion/completions" "$sharedir/zsh/site-functions" \
    "$sharedir/fish/vendor_completions.d" "$etc/worker.d" "$etc/workers.d" "$etc/users.d"

for b in ots-server ots-worker ots-submit; do
    install -m 0755 "$BINDIR_SRC/$b" "$bindir/$b"
done

# Units name the binaries under PREFIX.
for u in systemd/ots-server.service systemd/ots-worker@.service; do
    sed "s#/usr/bin/#$PREFIX/bin/#g" "$u" > "$unitdir/$(basename "$u")"
    chmod 0644 "$unitdir/$(basename "$u")"
done
install -m 0644 systemd/ots.sysusers.conf "$sysusersdir/ots.conf"
install -m 0644 systemd/ots.tmpfiles.conf "$tmpfilesdir/ots.conf"

# The example conductor, at an absolute path the example config names.
install -m 0755 examples/conductor.sh "$sharedir/ots/examples/conductor.sh"
cp -r examples/images examples/packages "$sharedir/ots/examples/" 2>/dev/null || true
install -m 0644 README.md docs/PROTOCOL.md "$sharedir/doc/ots/"

# Man pages and completions, from the binaries' own --help definitions.
gen="$(mktemp -d)"
trap 'rm -rf "$gen"' EXIT
for b in ots-server ots-worker ots-submit; do
    "$BINDIR_SRC/$b" gen-docs "$gen"
done
install -m 0644 "$gen"/man/man1/*.1 "$sharedir/man/man1/"
install -m 0644 "$gen"/completions/bash/* "$sharedir/bash-completion/completions/"
install -m 0644 "$gen"/completions/zsh/* "$sharedir/zsh/site-functions/"
install -m 0644 "$gen"/completions/fish/* "$sharedir/fish/vendor_completions.d/"

# Configuration: the examples, adapted to a host install; never overwritten.
put_conf() { # SRC DEST
    if [ -e "$2" ]; then
        echo "install.sh: keeping existing $2"
    else
        install -m 0644 "$1" "$2"
    fi
}
tmp_server="$gen/server.toml"
sed -e 's#^control = .*#control = "tcp://0.0.0.0:5555"#' \
    -e 's#^events = .*#events = "tcp://0.0.0.0:5556"#' \
    -e "s#^state_dir = .*#state_dir = \"/var/lib/ots/server\"#" \
    conf/server.toml > "$tmp_server"
put_conf "$tmp_server" "$etc/server.toml"
tmp_worker="$gen/worker.toml"
sed -e "s#\"examples/conductor.sh\"#\"$PREFIX/share/ots/examples/conductor.sh\"#" \
    -e "s#^state_dir = .*#state_dir = \"/var/lib/ots/worker\"#" \
    conf/worker.toml > "$tmp_worker"
put_conf "$tmp_worker" "$etc/worker.toml"
cat > "$gen/example.toml" <<'TOML'
# /etc/ots/worker.d/NAME.toml: settings of the worker instance
# ots-worker@NAME, layered over /etc/ots/worker.toml. Copy this file to
# NAME.toml and name the device this instance owns.
device = "devicegroup:example devicename:board deviceid:1"
TOML
put_conf "$gen/example.toml" "$etc/worker.d/example.toml.sample"
echo "installed ots into ${DESTDIR:-/} (prefix $PREFIX)"
