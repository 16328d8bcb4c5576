#!/usr/bin/env bash
# A 3-node metaraft cluster on loopback with one follower killed: the leader's CPU and log
# volume while idle, then write throughput on the two nodes left.
#
#   benches/follower-down.sh [seconds]     (default 6: the measured write load)
#
# Before the replication backoff fix (docs/benchmarks.md, "Twelfth session") an idle leader
# spun a core and logged hundreds of thousands of lines a second here.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
DUR="${1:-6}"
case "$DUR" in *[!0-9]*|"") echo "usage: $0 [seconds] (a whole number)" >&2; exit 2;; esac
cargo build --release --bin metaraft >&2
M="$CARGO_TARGET_DIR/release/metaraft"
WORK="$(mktemp -d /var/tmp/metaraft-follower-down.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

members="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
for i in 1 2 3; do
    "$M" serve --node-id $i --client-addr 127.0.0.1:1700$i --peer-addr 127.0.0.1:1710$i \
        --ops-addr 127.0.0.1:1720$i --data-dir "$WORK/n$i" --initial-members "$members" \
        2>"$WORK/n$i.log" &
    PIDS+=($!)
done
EPS="127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003"
leader=""
for _ in $(seq 1 100); do
    leader=$("$M" cluster status --endpoints "$EPS" --output json 2>/dev/null \
        | python3 -c 'import json,sys; print(json.load(sys.stdin).get("leader") or "")' 2>/dev/null || true)
    [ -n "$leader" ] && break
    sleep 0.2
done
[ -n "$leader" ] || { echo "no leader elected" >&2; exit 1; }
down=$(( leader % 3 + 1 ))
other=$(( 6 - leader - down ))
kill -9 "${PIDS[$((down - 1))]}"
sleep 1
pid="${PIDS[$((leader - 1))]}"
ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
hz=$(getconf CLK_TCK)
lines0=$(wc -l < "$WORK/n$leader.log"); t0=$(ticks)
sleep 5
lines1=$(wc -l < "$WORK/n$leader.log"); t1=$(ticks)
echo "node $down down; leader $leader idle for 5 s: CPU $(( (t1 - t0) * 100 / hz / 5 ))% of a core, $(( lines1 - lines0 )) log lines"
"$M" bench --endpoints "127.0.0.1:1700$leader,127.0.0.1:1700$other" --concurrency 64 \
    --duration "$DUR" --value-size 256
