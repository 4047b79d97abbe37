#!/usr/bin/env bash
# Server CPU and RSS with N idle secured workers: starts SERVER_BIN on
# loopback with fresh keys, lets the fleet generator (FLEET_BIN, built from
# examples/fleet.rs) register N workers with keys of their own, then
# samples the server's CPU time over SECONDS once all are registered.
# Used to compare two builds (e.g. before and after a change):
#
#   cargo build --release --bin ots-server --example fleet
#   scripts/idle-cpu.sh target/release/ots-server target/release/examples/fleet 5000 20
set -euo pipefail
server_bin=$1
fleet_bin=$2
n=${3:-5000}
secs=${4:-20}
lab=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$lab"' EXIT
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
port=$((20000 + RANDOM % 10000))
"$server_bin" keygen "$lab/server" >/dev/null
mkdir -p "$lab/workers.d" "$lab/users.d"
OTS_SERVER_KEY="$lab/server.key" OTS_SERVER_WORKERS_DIR="$lab/workers.d" \
    OTS_SERVER_USERS_DIR="$lab/users.d" OTS_SERVER_LOG_LEVEL=warn \
    "$server_bin" --control "tcp://127.0.0.1:$port" --events "tcp://127.0.0.1:$((port + 1))" \
    --state-dir "$lab/state" 2>"$lab/server.log" &
server=$!
"$fleet_bin" --keys "$lab" "tcp://127.0.0.1:$port" "$n" $((secs + 120)) >"$lab/fleet.log" 2>&1 &
deadline=$((SECONDS + 120))
until grep -q "registered $(printf '%5d' "$n")/$n" "$lab/fleet.log"; do
    if ((SECONDS > deadline)); then
        echo "not all $n workers registered within 120 s" >&2
        tail -3 "$lab/fleet.log" >&2
        exit 1
    fi
    sleep 1 # polling interval, bounded by the deadline
done
sleep 5 # let the registration storm settle before measuring
ticks() { awk '{print $14 + $15}' "/proc/$server/stat"; }
hz=$(getconf CLK_TCK)
t0=$(ticks)
sleep "$secs" # the measurement window itself
t1=$(ticks)
rss=$(awk '/VmRSS/ {print $2}' "/proc/$server/status")
awk -v d=$((t1 - t0)) -v hz="$hz" -v s="$secs" -v n="$n" -v rss="$rss" \
    'BEGIN { printf "%d idle secured workers: server %.1f %% of a core over %d s, RSS %.0f MiB\n", n, 100 * d / hz / s, s, rss / 1024 }'
