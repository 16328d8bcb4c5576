#!/usr/bin/env bash
# Backup and restore figures on a 3-node loopback cluster (fsync on), all measured in one run:
#   - the disk's own sequential write and read rate (dd, fsync / O_DIRECT), as the yardstick;
#   - `backup create` and `restore` throughput (MB/s) and time on N records;
#   - write p99 while full backups run back to back, against without (same run, ratio printed);
#   - `backup stream` lag behind the commit index under write load.
#
#   benches/backup-restore.sh [records]      (default 1000000)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
N="${1:-1000000}"
# Pace of each full backup in MB/s (0: unlimited); `backup create` defaults to 40.
RATE="${RATE:-40}"
cargo build --release --bin metaraft >&2
M="$CARGO_TARGET_DIR/release/metaraft"
WORK="$(mktemp -d /var/tmp/metaraft-backup.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT
EPS="127.0.0.1:18001,127.0.0.1:18002,127.0.0.1:18003"
members="1=127.0.0.1:18101,2=127.0.0.1:18102,3=127.0.0.1:18103"
for i in 1 2 3; do
    "$M" serve --node-id $i --client-addr 127.0.0.1:1800$i --peer-addr 127.0.0.1:1810$i \
        --ops-addr 127.0.0.1:1820$i --data-dir "$WORK/n$i" --initial-members "$members" \
        --log warn 2>"$WORK/n$i.log" &
    PIDS+=($!)
done
for _ in $(seq 1 100); do
    "$M" cluster status --endpoints "$EPS" --output json 2>/dev/null | grep -q '"leader": [0-9]' && break
    sleep 0.2
done
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

echo "== disk (same filesystem as the data)"
DW=$(dd if=/dev/zero of="$WORK/dd" bs=1M count=512 conv=fsync 2>&1 | tail -1)
DR=$(dd if="$WORK/dd" of=/dev/null bs=1M iflag=direct 2>&1 | tail -1)
rm -f "$WORK/dd"
echo "sequential write (fsync): ${DW##*, }   sequential read (O_DIRECT): ${DR##*, }"

echo "== load $N records (100-byte values)"
t0=$(date +%s.%N)
"$M" bench --endpoints "$EPS" --keys "$N" --preload --duration 1 --value-size 100 --concurrency 64 >/dev/null
t1=$(date +%s.%N)
echo "loaded in $(python3 -c "print(round($t1-$t0,1))") s"

echo "== backup create (unpaced: --max-rate-mb 0)"
t0=$(date +%s.%N)
"$M" backup create --endpoints "$EPS" --out "$WORK/bk" --max-rate-mb 0 >/dev/null
t1=$(date +%s.%N)
BYTES=$("$M" backup list "$WORK/bk" --output json | json "sum(b['bytes'] for b in d['bases'])")
python3 -c "s=$t1-$t0; print(f'{$BYTES/1e6:.1f} MB in {s:.2f} s = {$BYTES/1e6/s:.1f} MB/s')"

echo "== restore (verify everything, copy, check the state hash, new lineage, snapshot)"
t0=$(date +%s.%N)
"$M" restore --from "$WORK/bk" --data-dir "$WORK/restored" --output json > "$WORK/restore.json"
t1=$(date +%s.%N)
python3 -c "s=$t1-$t0; print(f'{$N} records, {$BYTES/1e6:.1f} MB in {s:.2f} s = {$BYTES/1e6/s:.1f} MB/s')"
rm -rf "$WORK/restored"

echo "== write p99 without and during back-to-back full backups (16 writers, 10 s each)"
"$M" bench --endpoints "$EPS" --keys 10000 --duration 10 --concurrency 16 --json > "$WORK/quiet.json"
during_backups() {
    ( i=0; while true; do "$M" backup create --endpoints "$EPS" --out "$WORK/loop$i" --max-rate-mb "$1" >/dev/null 2>&1 || true; rm -rf "$WORK/loop$i"; i=$((i+1)); done ) &
    local loop=$!
    "$M" bench --endpoints "$EPS" --keys 10000 --duration 10 --concurrency 16 --json > "$WORK/busy-$1.json"
    kill $loop 2>/dev/null || true
    wait $loop 2>/dev/null || true
    pkill -f "backup create --endpoints $EPS" 2>/dev/null || true
    rm -rf "$WORK"/loop*
}
leader_changes() {
    local t=0
    for i in 1 2 3; do
        v=$(curl -s "127.0.0.1:1820$i/metrics" | awk '/^metaraft_leader_changes/ {print $2}')
        t=$((t + ${v:-0}))
    done
    echo $t
}
LC0=$(leader_changes)
during_backups 0
during_backups "$RATE"
LC1=$(leader_changes)
echo "leader changes seen by the nodes during both backup phases: $((LC1 - LC0))"
python3 - "$WORK/quiet.json" "$WORK/busy-0.json" "$WORK/busy-$RATE.json" "$RATE" <<'PY'
import json, sys
q, u, p = (json.load(open(f)) for f in sys.argv[1:4])
print(f"without backup:             {q['ops_per_sec']:.0f} writes/s, p99 {q['p99_ms']:.2f} ms")
for name, b in ((f"during unpaced backups:", u), (f"during backups at {sys.argv[4]} MB/s:", p)):
    print(f"{name:<27} {b['ops_per_sec']:.0f} writes/s, p99 {b['p99_ms']:.2f} ms  "
          f"(p99 x{b['p99_ms']/q['p99_ms']:.2f}, throughput x{b['ops_per_sec']/q['ops_per_sec']:.2f})")
PY

echo "== backup stream lag under write load (64 writers, 10 s)"
"$M" backup stream --endpoints "$EPS" --out "$WORK/bk" --fsync-interval-ms 200 2>"$WORK/stream.log" &
SP=$!
PIDS+=($SP)
# Catch up first (the entries written since the base), timed, then measure steady-state lag.
t0=$(date +%s.%N)
C0=$("$M" cluster status --endpoints "$EPS" --output json | json "max(m['commit_index'] for m in d['members'])")
B0=$("$M" backup list "$WORK/bk" --output json | json "max(b['index'] for b in d['bases'])")
for _ in $(seq 1 600); do
    S=$("$M" backup list "$WORK/bk" --output json 2>/dev/null | json "max(r['to_index'] for r in d['restorable'])" || echo 0)
    [ "$S" -ge "$C0" ] && break
    sleep 0.2
done
t1=$(date +%s.%N)
python3 -c "n=$C0-$B0; s=$t1-$t0; print(f'catch-up: {n} entries after the base streamed in {s:.2f} s = {n/s:.0f} entries/s (idle cluster)')"
"$M" bench --endpoints "$EPS" --keys 10000 --duration 10 --concurrency 64 > "$WORK/load.txt" &
BP=$!
LAGS=()
while kill -0 $BP 2>/dev/null; do
    C=$("$M" cluster status --endpoints "$EPS" --output json 2>/dev/null | json "max(m['commit_index'] for m in d['members'])" || echo 0)
    S=$(ls "$WORK/bk/segments" >/dev/null 2>&1 && "$M" backup list "$WORK/bk" --output json 2>/dev/null | json "max(r['to_index'] for r in d['restorable'])" || echo 0)
    LAGS+=($((C > S ? C - S : 0)))
    sleep 0.5
done
cat "$WORK/load.txt"
python3 -c "l=[${LAGS[*]/%/,}]; print(f'stream lag behind commit: mean {sum(l)/len(l):.0f} entries, max {max(l)} entries over {len(l)} samples (fsync every 200 ms)')"
kill -TERM $SP 2>/dev/null || true
