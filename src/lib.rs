//! # metaraft
//!
//! A Raft-replicated, highly available metadata service. Module map (dependencies point down):
//!
//! ```text
//! main.rs, cli.rs    the binary: serve, dev, kv, cluster, meta and rbac (meta_cmd.rs), backup,
//!                    restore, dr, bench (bench.rs: load generator)
//! server.rs          wiring of one node: stores, Raft, listeners, graceful shutdown
//! api/               public gRPC services (Kv, Cluster, Backup; Metadata, Identity, Rbac in
//!                    api/meta.rs); errors -> gRPC status in api/status.rs
//! consensus/         openraft handle, write forwarding and proposal batching, read paths
//!                    (read-index, session, stale), membership
//! net/               peer transport: Raft RPCs and snapshot streaming over gRPC (tonic); the
//!                    dialer of every outgoing connection; TLS listeners (net/tls.rs); the
//!                    leader's check for members that lost acknowledged entries (net/lost.rs);
//!                    commit-only appends folded into the next append (net/coalesce.rs)
//! fsm/               deterministic state machine: apply_entry(state, index, entry) stages the
//!                    mutations and returns the response; every per-entry decision is here
//! fsm/meta/          the metadata domain: records, apply rules, secondary indexes, queries, RBAC index
//! storage/           the only RocksDB user: log store (group commit), state-machine store, checkpoints
//! keys.rs            every key layout of both stores
//! checkpoint_files.rs shipping checkpoint files (snapshot transfer, base backups): list, chunk,
//!                    CRC, safe names, receive with checks, publish durably
//! raft_types.rs      openraft type configuration (the `Raft` handle type is consensus's)
//! codec.rs           the one binary encoding (bincode 2): a leaf
//! config.rs          TOML config with documented defaults and validate()
//! tls.rs             PEM files -> rustls configurations (client port TLS, peer port mTLS)
//! ops.rs / metrics.rs HTTP ops port: /healthz, /readyz, /metrics
//! client.rs          client library used by the CLI, the bench tool and tests
//! backup/            backup files (bases, log segments), verify, list, restore; no gRPC
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
