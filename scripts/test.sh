#!/usr/bin/env bash
# Run every test: unit tests, openraft's storage conformance suite, proptests, and the cluster
# tests that start real 3-node clusters on loopback.
cd "$(dirname "$0")/.."
. scripts/env.sh
cargo test --release --workspace "$@"
