#!/usr/bin/env bash
# Build metaraft and run a local 3-node cluster until Ctrl-C. Data: ./metaraft-dev (kept).
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo build --release --bin metaraft
exec "$CARGO_TARGET_DIR/release/metaraft" dev "$@"
