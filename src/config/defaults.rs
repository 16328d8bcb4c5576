//! Every default value of the node's configuration and of the command line's flags, written
//! once. `Config::default()`, `RaftConfig::default()` and `Limits::default()` read the node's;
//! the CLI's clap attributes (`default_value = defaults::X`, `default_value_t = defaults::Y`)
//! read the same constants, so a flag that mirrors a config key cannot drift from it.
//!
//! The local cluster of `metaraft dev` (and `scripts/dev.sh`) uses the node defaults' ports for
//! its first node: client 7001-7003, peer 7101-7103, ops 7201-7203; the client commands'
//! default endpoints are its client addresses.

// ---- Node (`Config`) ----

/// Client gRPC listen address (`client_addr`); also `restore --client-addr`.
pub const CLIENT_ADDR: &str = "127.0.0.1:7001";
/// Peer (Raft) gRPC address (`peer_addr`); also `restore --peer-addr`.
pub const PEER_ADDR: &str = "127.0.0.1:7101";
/// HTTP ops address (`ops_addr`): /healthz, /readyz, /metrics.
pub const OPS_ADDR: &str = "127.0.0.1:7201";
/// Data directory (`data_dir`), relative to the working directory.
pub const DATA_DIR: &str = "data";
/// Async runtime threads (`runtime_threads`): 0 picks them from the CPUs the node may use.
pub const RUNTIME_THREADS: usize = 0;

// ---- Raft (`RaftConfig`): a LAN of 3-5 nodes with fsync ~1 ms ----

/// Leader heartbeat interval (`raft.heartbeat_ms`).
pub const HEARTBEAT_MS: u64 = 100;
/// Election timeout range (`raft.election_timeout_min_ms` / `_max_ms`): a few heartbeats of
/// slack so a busy 2-core machine (fsync stalls, RocksDB compactions) does not trigger
/// spurious elections.
pub const ELECTION_TIMEOUT_MIN_MS: u64 = 500;
/// See [`ELECTION_TIMEOUT_MIN_MS`].
pub const ELECTION_TIMEOUT_MAX_MS: u64 = 1000;
/// Applied entries between snapshots (`raft.snapshot_logs_since_last`).
pub const SNAPSHOT_LOGS_SINCE_LAST: u64 = 50_000;
/// Log entries kept behind a snapshot for lagging followers (`raft.max_in_snapshot_log_to_keep`).
pub const MAX_IN_SNAPSHOT_LOG_TO_KEEP: u64 = 10_000;
/// Most entries in one append RPC (`raft.max_payload_entries`).
pub const MAX_PAYLOAD_ENTRIES: u64 = 1000;
/// Floor of a snapshot transfer's timeout (`raft.snapshot_timeout_ms`): 10 minutes.
pub const SNAPSHOT_TIMEOUT_MS: u64 = 600_000;
/// Slowest peer link a snapshot transfer is expected to see, MB/s
/// (`raft.snapshot_min_bandwidth_mb_s`).
pub const SNAPSHOT_MIN_BANDWIDTH_MB_S: u64 = 5;
/// Log entries a request id is remembered for (`raft.dedup_window`); also what `restore`
/// replays with. The state machine owns the value.
pub const DEDUP_WINDOW: u64 = crate::fsm::DEFAULT_DEDUP_WINDOW;

// ---- Request limits (`Limits`) ----

/// Largest key in bytes (`limits.max_key_bytes`).
pub const MAX_KEY_BYTES: usize = 4096;
/// Largest value in bytes (`limits.max_value_bytes`): 1 MiB.
pub const MAX_VALUE_BYTES: usize = 1 << 20;
/// Largest gRPC request in bytes (`limits.max_request_bytes`): 4 MiB.
pub const MAX_REQUEST_BYTES: usize = 4 << 20;
/// Largest Range limit, and the limit when 0 is asked (`limits.max_range_limit`).
pub const MAX_RANGE_LIMIT: u32 = 10_000;
/// Most operations in one Txn, compares + success + failure (`limits.max_txn_ops`).
pub const MAX_TXN_OPS: usize = 128;
/// How long a read waits for this node to apply the index it needs (`limits.read_wait_ms`).
pub const READ_WAIT_MS: u64 = 5000;
/// How long a write waits for commit (`limits.write_timeout_ms`).
pub const WRITE_TIMEOUT_MS: u64 = 10_000;

// ---- Command line ----

/// `serve --log`: openraft's own info lines are left out (they repeat per message, about
/// 15,000 a second when replication to a node keeps restarting), and so are its warnings about
/// failed heartbeats (ten a second per unreachable peer; its replication stream's errors, about
/// one a second, already name that peer).
pub const LOG_FILTER: &str = "info,openraft=warn,openraft::core::heartbeat=error";
/// `--endpoints` of the client commands and `bench`: the `dev` cluster's client addresses.
pub const CLIENT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";
/// `--timeout-ms` of the client commands: per request.
pub const CLIENT_TIMEOUT_MS: u64 = 15_000;
/// `dev --dir`: where the local cluster keeps its three nodes' data.
pub const DEV_DIR: &str = "metaraft-dev";
/// `dev --base-port`: the first node's client port (peer +100, ops +200).
pub const DEV_BASE_PORT: u16 = 7001;
/// `dev --log`.
pub const DEV_LOG_FILTER: &str = "warn,metaraft=info";
/// `restore --node-id`: the restored node is the first of a new cluster.
pub const RESTORE_NODE_ID: u64 = 1;
/// `backup create|stream --max-rate-mb`: pace of base transfers, MB/s (0: unlimited).
pub const BACKUP_MAX_RATE_MB: u64 = 40;
/// `backup stream --fsync-interval-ms`.
pub const BACKUP_FSYNC_INTERVAL_MS: u64 = 1000;
/// `backup stream --segment-kb`: a new segment file past this size (64 MiB).
pub const BACKUP_SEGMENT_KB: u64 = 65_536;
/// `backup stream --base-every`: entries between bases (0: only when needed).
pub const BACKUP_BASE_EVERY: u64 = 0;
/// `backup stream --retain-bases`: newest bases kept (0 keeps all).
pub const BACKUP_RETAIN_BASES: usize = 3;
/// `dr promote --wait-s`: how long to wait for the promoted node to accept writes.
pub const DR_PROMOTE_WAIT_S: u64 = 60;
