#!/usr/bin/env bash
# Runs 3-node metaraft and 3-node etcd on loopback (fsync on for both), one after the other with
# the same load from `metaraft bench`, and prints the ratios.
#
#   benches/compare-etcd.sh [seconds-per-run] [rounds]     (defaults 10 and 1)
#   METARAFT_BIN=/path/to/metaraft benches/compare-etcd.sh ...  (another build, e.g. a previous
#                                                                commit's, instead of this tree's)
#   BASELINE_BIN=/path/to/old/metaraft benches/compare-etcd.sh ...
#       before/after a change: the other system is that metaraft build instead of etcd (same
#       loads, alternating rounds, ratios and CPU per operation of this build over it)
#
# With several rounds the two systems alternate (metaraft, etcd, metaraft, etcd, ...) on fresh
# data each time, and the summary gives each round's ratios and their median: on a shared VM the
# disk's and CPU's speed drift by tens of percent within minutes, and alternating exposes both
# systems to the same drift.
#
# Each load also reports the servers' CPU per operation (user + system time of the three server
# processes over the run, divided by the operations it completed) and, over the rounds, etcd's
# figure over metaraft's: what a request costs, which drifts less with the machine than
# throughput does.
#
# Installs Debian's etcd-server and etcd-client when missing. Data lives in a temporary directory on the same disk
# for both systems and is removed at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
DUR="${1:-10}"
ROUNDS="${2:-1}"
case "$DUR$ROUNDS" in *[!0-9]*|"") echo "usage: $0 [seconds-per-run] [rounds] (whole numbers)" >&2; exit 2;; esac
[ "$DUR" -gt 0 ] && [ "$ROUNDS" -gt 0 ] || { echo "seconds and rounds must be > 0" >&2; exit 2; }
ROUND=1
# etcd-server has the daemon only; etcdctl (the health check below) is in etcd-client.
etcd_pkgs=()
if [ -z "${BASELINE_BIN:-}" ]; then
    command -v etcd >/dev/null 2>&1 || etcd_pkgs+=(etcd-server)
    command -v etcdctl >/dev/null 2>&1 || etcd_pkgs+=(etcd-client)
else
    [ -x "$BASELINE_BIN" ] || { echo "BASELINE_BIN=$BASELINE_BIN is not an executable" >&2; exit 2; }
fi
if [ ${#etcd_pkgs[@]} -gt 0 ]; then
    echo "installing ${etcd_pkgs[*]}" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${etcd_pkgs[@]}" >/dev/null
    # Debian's package starts a system etcd at once; an idle fourth etcd would take CPU from
    # both systems under test. Stop the one this script just installed.
    if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet etcd 2>/dev/null; then
        echo "stopping and disabling the etcd.service the package started" >&2
        $SUDO systemctl disable --now etcd >/dev/null 2>&1 || true
    fi
fi
if [ -n "${METARAFT_BIN:-}" ]; then
    [ -x "$METARAFT_BIN" ] || { echo "METARAFT_BIN=$METARAFT_BIN is not an executable" >&2; exit 2; }
    M="$METARAFT_BIN"
else
    cargo build --release --bin metaraft >&2
    M="$CARGO_TARGET_DIR/release/metaraft"
fi
WORK="$(mktemp -d /var/tmp/metaraft-vs-etcd.XXXXXX)"
PIDS=()
cleanup() { for p in "${PIDS[@]:-}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

MR_EPS="127.0.0.1:17001,127.0.0.1:17002,127.0.0.1:17003"
ETCD_EPS="127.0.0.1:12379,127.0.0.1:22379,127.0.0.1:32379"

start_metaraft() { # [binary]
    local bin="${1:-$M}"
    local members="1=127.0.0.1:17101,2=127.0.0.1:17102,3=127.0.0.1:17103"
    for i in 1 2 3; do
        "$bin" serve --node-id $i --client-addr 127.0.0.1:1700$i --peer-addr 127.0.0.1:1710$i \
            --ops-addr 127.0.0.1:1720$i --data-dir "$WORK/r$ROUND/mr$i" --initial-members "$members" \
            --log warn 2>"$WORK/mr$i.log" &
        PIDS+=($!)
    done
    for _ in $(seq 1 100); do
        "$M" cluster status --endpoints "$MR_EPS" --output json 2>/dev/null | grep -q '"leader": [0-9]' && return 0
        sleep 0.2
    done
    echo "metaraft did not elect a leader" >&2; exit 1
}

start_etcd() {
    local cluster="e1=http://127.0.0.1:12380,e2=http://127.0.0.1:22380,e3=http://127.0.0.1:32380"
    for i in 1 2 3; do
        etcd --name e$i --data-dir "$WORK/r$ROUND/etcd$i" \
            --listen-client-urls http://127.0.0.1:${i}2379 --advertise-client-urls http://127.0.0.1:${i}2379 \
            --listen-peer-urls http://127.0.0.1:${i}2380 --initial-advertise-peer-urls http://127.0.0.1:${i}2380 \
            --initial-cluster "$cluster" --initial-cluster-state new --initial-cluster-token bench \
            --log-level error >"$WORK/etcd$i.log" 2>&1 &
        PIDS+=($!)
    done
    for _ in $(seq 1 100); do
        ETCDCTL_API=3 etcdctl --endpoints "$ETCD_EPS" endpoint health >/dev/null 2>&1 && return 0
        sleep 0.2
    done
    echo "etcd did not become healthy" >&2; exit 1
}

stop_all() { for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; PIDS=(); sleep 1; }

# name | preload first (yes/no) | bench flags
LOADS=(
    "write-64|no|--concurrency 64 --read-ratio 0"
    "write-1|no|--concurrency 1 --read-ratio 0"
    "linread-64|yes|--concurrency 64 --read-ratio 1 --keys 10000"
)

# CPU seconds (user + system) the server processes have used so far.
server_cpu() {
    local ticks=0 p
    for p in "${PIDS[@]}"; do
        ticks=$((ticks + $(awk '{print $14 + $15}' "/proc/$p/stat")))
    done
    echo "$ticks $(getconf CLK_TCK)" | awk '{printf "%.3f", $1 / $2}'
}

run_loads() { # target eps label
    for l in "${LOADS[@]}"; do
        local name="${l%%|*}" rest="${l#*|}"
        local preload="${rest%%|*}" flags="${rest#*|}"
        if [ "$preload" = yes ]; then
            # Every key written once, in its own run, so the measured run (and the servers' CPU
            # counted for it) holds reads only.
            # shellcheck disable=SC2086
            "$M" bench --target "$1" --endpoints "$2" --duration 1 --value-size 256 $flags \
                --preload >/dev/null
        fi
        local cpu0 cpu1 out
        cpu0=$(server_cpu)
        # shellcheck disable=SC2086
        out=$("$M" bench --target "$1" --endpoints "$2" --duration "$DUR" --value-size 256 $flags --json)
        cpu1=$(server_cpu)
        # The servers' CPU per operation: what a request costs the three servers together, a
        # figure that moves less with the machine's speed than throughput does.
        echo "$out" | python3 -c '
import json, sys
r = json.loads(sys.stdin.read())
cpu = float(sys.argv[2]) - float(sys.argv[1])
out = {"round": int(sys.argv[3]), "load": sys.argv[4]}
out.update(r)
out["target"] = sys.argv[5]
out["server_cpu_s"] = round(cpu, 3)
out["server_us_per_op"] = round(cpu / r["ok"] * 1e6, 1) if r["ok"] else None
print(json.dumps(out))' "$cpu0" "$cpu1" "$ROUND" "$name" "$3" >>"$WORK/results.jsonl"
        tail -1 "$WORK/results.jsonl" >&2
    done
}

for ROUND in $(seq 1 "$ROUNDS"); do
    mkdir -p "$WORK/r$ROUND"
    echo "== round $ROUND/$ROUNDS: metaraft (3 nodes, loopback, fsync on)" >&2
    start_metaraft; run_loads metaraft "$MR_EPS" metaraft; stop_all
    if [ -n "${BASELINE_BIN:-}" ]; then
        echo "== round $ROUND/$ROUNDS: baseline $BASELINE_BIN (3 nodes, loopback, fsync on)" >&2
        start_metaraft "$BASELINE_BIN"; run_loads metaraft "$MR_EPS" baseline; stop_all
    else
        echo "== round $ROUND/$ROUNDS: etcd $(etcd --version | head -1 | awk '{print $3}') (3 members, loopback, fsync on)" >&2
        start_etcd; run_loads etcd "$ETCD_EPS" etcd; stop_all
    fi
done

OTHER=etcd
if [ -n "${BASELINE_BIN:-}" ]; then OTHER=baseline; fi
python3 - "$WORK/results.jsonl" "$OTHER" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
other = sys.argv[2]
by = {(r["round"], r["target"], r["load"]): r for r in rows}
rounds = sorted({r["round"] for r in rows})
loads = list(dict.fromkeys(r["load"] for r in rows))
ratios = {l: [] for l in loads}
cpu_ratios = {l: [] for l in loads}
def us(r):
    v = r.get("server_us_per_op")
    return f"{v:.0f}" if v is not None else "-"
print(f"{'round':<6} {'load':<12} {'metaraft ops/s':>15} {other + ' ops/s':>14} {'ratio':>7} {'mr p99 ms':>10} {other + ' p99 ms':>15} {'mr cpu us/op':>13} {other + ' cpu us/op':>17}")
for rd in rounds:
    for load in loads:
        m, e = by.get((rd, "metaraft", load)), by.get((rd, other, load))
        if not m or not e:
            continue
        ratio = m["ops_per_sec"] / e["ops_per_sec"] if e["ops_per_sec"] else float("inf")
        ratios[load].append(ratio)
        if m.get("server_us_per_op") and e.get("server_us_per_op"):
            cpu_ratios[load].append(e["server_us_per_op"] / m["server_us_per_op"])
        print(f"{rd:<6} {load:<12} {m['ops_per_sec']:>15.0f} {e['ops_per_sec']:>14.0f} {ratio:>6.2f}x {m['p99_ms']:>10.2f} {e['p99_ms']:>15.2f} {us(m):>13} {us(e):>17}")
if len(rounds) > 1:
    print()
    print(f"median of {len(rounds)} rounds (lowest - highest):")
    for load in loads:
        r = ratios[load]
        if r:
            print(f"  {load:<12} {statistics.median(r):>5.2f}x  ({min(r):.2f}x - {max(r):.2f}x)")
c = {l: v for l, v in cpu_ratios.items() if v}
if c:
    print()
    print(f"server CPU per operation, {other}'s over metaraft's (median, lowest - highest):")
    for load, r in c.items():
        print(f"  {load:<12} {statistics.median(r):>5.2f}x  ({min(r):.2f}x - {max(r):.2f}x)")
PY
