#!/usr/bin/env bash
# Build metaraft and the jepsen harness, then run the harness with the given arguments, e.g.
#   scripts/jepsen.sh suite --nemesis all --nodes 5 --time-limit 120 --seeds 5
#   scripts/jepsen.sh run --workload register --nemesis partitions,kills --time-limit 60
#   scripts/jepsen.sh check jepsen-runs/.../history.jsonl --workload register
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release --workspace --bins
exec "$CARGO_TARGET_DIR/release/metaraft-jepsen" "$@"
