//! # metaraft
//!
//! A Raft-replicated, highly available metadata service. Module map, top to bottom: each module
//! uses only the ones below it (docs/design.md, "Where to change what", says where a change goes).
//!
//! ```text
//! src/main.rs, cli/  the binary (not this library): parse, dispatch to one file per command
//!                    group (serve, kv, cluster + dr, meta + rbac, backup + restore, bench);
//!                    shared flag types in cli/args.rs
//! server.rs          wiring of one node: stores, Raft, listeners, graceful shutdown
//! api/               public gRPC services: Kv, Cluster (mod.rs), Backup (backup.rs), Metadata,
//!                    Identity, Rbac (meta/mod.rs, protobuf conversions in meta/convert.rs);
//!                    every error -> gRPC status in status.rs
//! client.rs          client library used by the CLI, the bench tool and tests
//! ops.rs             HTTP ops port: /healthz, /readyz, /metrics
//! net/               peer transport over gRPC (tonic): Raft RPCs, snapshot streaming, the
//!                    peer service, consensus::Peers over the PeerPool (peers.rs), the dialer,
//!                    TLS listeners, lost-data check, commit-only appends folded (coalesce.rs)
//! consensus/         the node's Raft handle behind methods: writes (proposal and forwarding
//!                    batches), reads (read(consistency) -> Reader), membership, status; what
//!                    it needs from peers is the Peers trait; no transport types
//! backup/            backup files (bases, log segments), verify, list, restore; no gRPC
//! storage/           the only RocksDB user: log store (group commit), state-machine store
//!                    (sm_store/: open, apply batches, snapshots, read views)
//! config/            TOML config with documented defaults (defaults.rs: the one table the
//!                    flags use too) and validate()
//! fsm/               deterministic state machine: apply_entry(state, index, entry) stages the
//!                    mutations and returns the response; every per-entry decision is here
//! fsm/meta/          the metadata domain: records, rules (apply/: one file per family of
//!                    rules), secondary indexes, queries, RBAC index
//! raft_types.rs      openraft type configuration (the `Raft` handle type is consensus's)
//! checkpoint_files.rs shipping checkpoint files (snapshot transfer, base backups): list, chunk,
//!                    CRC, safe names, receive with checks, publish durably
//! keys.rs            every key layout of both stores
//! codec.rs           the one binary encoding (bincode 2)
//! tls.rs             PEM files -> rustls configurations (client port TLS, peer port mTLS)
//! metrics.rs         the counters and histograms every layer records into
//! ```

pub mod api;
pub mod backup;
pub mod checkpoint_files;
pub mod client;
pub mod codec;
pub mod config;
pub mod consensus;
pub mod fsm;
pub mod keys;
pub mod metrics;
pub mod net;
pub mod ops;
pub mod raft_types;
pub mod server;
pub mod storage;
pub mod tls;

/// Generated protobuf code.
pub mod pb {
    tonic::include_proto!("metaraft.v1");
    pub mod peer {
        tonic::include_proto!("metaraft.peer.v1");
    }
}
