//! Node configuration: one TOML file (see `deploy/metaraft.toml`), every key optional with a
//! documented default (every default value is in [`defaults`], shared with the command line's
//! flags), command-line flags override it, `validate()` names the bad key.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod defaults;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid config key `{key}`: {reason}")]
    Invalid { key: &'static str, reason: String },
}

/// One node's configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This node's id (>= 1, never reused). Required.
    pub node_id: u64,
    /// Client gRPC listen address. Default [`defaults::CLIENT_ADDR`].
    pub client_addr: String,
    /// Peer (Raft) gRPC listen address; also how other members reach this node. Default
    /// [`defaults::PEER_ADDR`].
    pub peer_addr: String,
    /// Where to listen for peer traffic when that differs from the address members use
    /// (`peer_addr`), e.g. behind a proxy or NAT. Default empty: listen on peer_addr.
    pub peer_listen_addr: String,
    /// HTTP ops address (/healthz, /readyz, /metrics). Default [`defaults::OPS_ADDR`]. Empty
    /// disables it.
    pub ops_addr: String,
    /// Data directory (log, state machine, snapshots). Default [`defaults::DATA_DIR`].
    pub data_dir: PathBuf,
    /// Members that form the cluster on first start: node id -> peer address. Every initial member
    /// must be given the same map. Empty: the node waits to be added as a learner.
    #[serde(with = "member_map")]
    pub initial_members: BTreeMap<u64, String>,
    /// Run as a DR replica: a permanent non-voting learner at a backup site, never promoted by
    /// the cluster, promoted on its own by `metaraft dr promote`. Default false.
    pub dr_replica: bool,
    /// Threads that run this node's async work: gRPC, Raft, apply. (The log flusher and RocksDB's
    /// background jobs have threads of their own.) 0 (default): 1 when the node may use at most
    /// 2 CPUs, else one per CPU. 1: a single-threaded runtime, which on 2 CPUs did 30-50% more
    /// writes and about 25% more reads than two workers, for less CPU per request: no work
    /// stealing and no cross-thread wake-ups (docs/benchmarks.md). At most 1024.
    pub runtime_threads: usize,
    pub raft: RaftConfig,
    pub limits: Limits,
    pub tls: TlsConfig,
}

/// TLS on the client port and mutual TLS on the peer port. Off (plaintext, the default) when
/// all three files are empty; on when all three are set. Every member of a cluster must agree.
/// The ops port (/healthz, /readyz, /metrics) stays plain HTTP. Certificates are read at start
/// and again on SIGHUP (docs/tls.md, "Rotation").
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain of this node (leaf first). Served on both ports and presented to
    /// peers as a client certificate, so it must carry the host part of this node's peer_addr
    /// (DNS name or IP address) in its subject alternative names, and the names clients use
    /// for the client port. Default empty.
    pub cert_file: PathBuf,
    /// PEM private key of cert_file (PKCS#8, PKCS#1 or SEC1). Default empty.
    pub key_file: PathBuf,
    /// PEM CA bundle that signed the members' certificates: peers are verified against it in
    /// both directions. Default empty.
    pub ca_file: PathBuf,
    /// Require clients of the client port to present a certificate signed by client_ca_file.
    /// Default false: any client that trusts this node's certificate may connect.
    pub client_auth: bool,
    /// PEM CA bundle that verifies client certificates (client_auth). Default empty: ca_file.
    /// Give clients their own CA: a certificate that ca_file verifies is accepted on the peer
    /// port, so clients with certificates from ca_file could speak to it as members do.
    pub client_ca_file: PathBuf,
    /// Names a member's certificate must be valid for (DNS names or IP addresses, matched
    /// against its subject alternative names as a TLS client matches a server's; a wildcard
    /// certificate counts): a peer that connects with a certificate valid for none of them is refused,
    /// even when ca_file signed it. Set it when ca_file also signs certificates of services
    /// that are not members (an organisation-wide CA). Default empty: any certificate ca_file
    /// signed is a member's.
    pub peer_names: Vec<String>,
}

impl TlsConfig {
    /// The three files, when TLS is on (validate() checks they come together).
    pub fn files(&self) -> Option<crate::tls::TlsFiles> {
        if self.cert_file.as_os_str().is_empty() {
            return None;
        }
        Some(crate::tls::TlsFiles {
            cert_file: self.cert_file.clone(),
            key_file: self.key_file.clone(),
            ca_file: self.ca_file.clone(),
            client_ca_file: if self.client_ca_file.as_os_str().is_empty() {
                self.ca_file.clone()
            } else {
                self.client_ca_file.clone()
            },
        })
    }
}

/// Raft timing and log retention. Defaults ([`defaults`]) chosen for a LAN of 3-5 nodes with
/// fsync ~1 ms.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct RaftConfig {
    /// Leader heartbeat interval (ms). Default [`defaults::HEARTBEAT_MS`].
    pub heartbeat_ms: u64,
    /// Election timeout range (ms). Defaults [`defaults::ELECTION_TIMEOUT_MIN_MS`] and
    /// [`defaults::ELECTION_TIMEOUT_MAX_MS`]: a few heartbeats of slack so a busy 2-core machine
    /// (fsync stalls, GC of RocksDB) does not trigger spurious elections.
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// Take a snapshot after this many applied entries since the last one. Default
    /// [`defaults::SNAPSHOT_LOGS_SINCE_LAST`].
    pub snapshot_logs_since_last: u64,
    /// Log entries kept behind a snapshot for lagging followers. Default
    /// [`defaults::MAX_IN_SNAPSHOT_LOG_TO_KEEP`].
    pub max_in_snapshot_log_to_keep: u64,
    /// Most entries in one append RPC. Default [`defaults::MAX_PAYLOAD_ENTRIES`].
    pub max_payload_entries: u64,
    /// Timeout of one snapshot transfer (ms): the floor; a bigger snapshot gets
    /// size / snapshot_min_bandwidth_mb_s + 30 s instead. Default [`defaults::SNAPSHOT_TIMEOUT_MS`].
    pub snapshot_timeout_ms: u64,
    /// The slowest peer link a snapshot transfer is expected to see (MB/s): sets the timeout of
    /// a snapshot larger than the floor allows. Default [`defaults::SNAPSHOT_MIN_BANDWIDTH_MB_S`].
    pub snapshot_min_bandwidth_mb_s: u64,
    /// Request ids are remembered for this many log entries. Default [`defaults::DEDUP_WINDOW`].
    pub dedup_window: u64,
}

/// Request limits, answered with INVALID_ARGUMENT / RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Limits {
    /// Largest key in bytes. Default [`defaults::MAX_KEY_BYTES`].
    pub max_key_bytes: usize,
    /// Largest value in bytes. Default [`defaults::MAX_VALUE_BYTES`].
    pub max_value_bytes: usize,
    /// Largest gRPC request in bytes. Default [`defaults::MAX_REQUEST_BYTES`].
    pub max_request_bytes: usize,
    /// Largest Range limit (and the default when 0 is asked). Default [`defaults::MAX_RANGE_LIMIT`].
    pub max_range_limit: u32,
    /// Most operations in one Txn (compares + success + failure). Default [`defaults::MAX_TXN_OPS`].
    pub max_txn_ops: usize,
    /// How long a read waits for this node to apply the index it needs (ms). Default
    /// [`defaults::READ_WAIT_MS`].
    pub read_wait_ms: u64,
    /// How long a write waits for commit (ms). Default [`defaults::WRITE_TIMEOUT_MS`].
    pub write_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            client_addr: defaults::CLIENT_ADDR.into(),
            peer_addr: defaults::PEER_ADDR.into(),
            peer_listen_addr: String::new(),
            ops_addr: defaults::OPS_ADDR.into(),
            data_dir: PathBuf::from(defaults::DATA_DIR),
            initial_members: BTreeMap::new(),
            dr_replica: false,
            runtime_threads: defaults::RUNTIME_THREADS,
            raft: RaftConfig::default(),
            limits: Limits::default(),
            tls: TlsConfig::default(),
        }
    }
}

impl Default for RaftConfig {
    fn default() -> Self {
        RaftConfig {
            heartbeat_ms: defaults::HEARTBEAT_MS,
            election_timeout_min_ms: defaults::ELECTION_TIMEOUT_MIN_MS,
            election_timeout_max_ms: defaults::ELECTION_TIMEOUT_MAX_MS,
            snapshot_logs_since_last: defaults::SNAPSHOT_LOGS_SINCE_LAST,
            max_in_snapshot_log_to_keep: defaults::MAX_IN_SNAPSHOT_LOG_TO_KEEP,
            max_payload_entries: defaults::MAX_PAYLOAD_ENTRIES,
            snapshot_timeout_ms: defaults::SNAPSHOT_TIMEOUT_MS,
            snapshot_min_bandwidth_mb_s: defaults::SNAPSHOT_MIN_BANDWIDTH_MB_S,
            dedup_window: defaults::DEDUP_WINDOW,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_key_bytes: defaults::MAX_KEY_BYTES,
            max_value_bytes: defaults::MAX_VALUE_BYTES,
            max_request_bytes: defaults::MAX_REQUEST_BYTES,
            max_range_limit: defaults::MAX_RANGE_LIMIT,
            max_txn_ops: defaults::MAX_TXN_OPS,
            read_wait_ms: defaults::READ_WAIT_MS,
            write_timeout_ms: defaults::WRITE_TIMEOUT_MS,
        }
    }
}

/// TOML table keys are strings: `[initial_members]` `1 = "host:port"`.
mod member_map {
    use std::collections::BTreeMap;

    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(m: &BTreeMap<u64, String>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(m.iter().map(|(k, v)| (k.to_string(), v)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<u64, String>, D::Error> {
        let raw = BTreeMap::<String, String>::deserialize(d)?;
        raw.into_iter()
            .map(|(k, v)| {
                k.parse::<u64>().map(|id| (id, v)).map_err(|_| {
                    D::Error::custom(format!("initial_members: {k:?} is not a node id"))
                })
            })
            .collect()
    }
}

fn check_addr(key: &'static str, v: &str) -> Result<(), ConfigError> {
    v.parse::<std::net::SocketAddr>()
        .map(|_| ())
        .map_err(|e| ConfigError::Invalid {
            key,
            reason: format!("{v:?} is not host:port ({e})"),
        })
}

/// Upper bound of `runtime_threads`.
pub const MAX_RUNTIME_THREADS: usize = 1024;

/// The async threads for `runtime_threads` (0: automatic) when the process may use `cpus` CPUs.
pub fn resolve_runtime_threads(configured: usize, cpus: usize) -> usize {
    match configured {
        0 if cpus <= 2 => 1,
        0 => cpus,
        n => n,
    }
}

/// [`resolve_runtime_threads`] for the CPUs this process may use (cgroup quotas included).
pub fn runtime_threads_here(configured: usize) -> usize {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    resolve_runtime_threads(configured, cpus)
}

impl Config {
    /// The async threads this node runs: `runtime_threads`, or the automatic choice from the CPUs
    /// the process may use (cgroup quotas included).
    pub fn effective_runtime_threads(&self) -> usize {
        runtime_threads_here(self.runtime_threads)
    }

    /// The address the peer service binds.
    pub fn peer_bind_addr(&self) -> &str {
        if self.peer_listen_addr.is_empty() {
            &self.peer_addr
        } else {
            &self.peer_listen_addr
        }
    }

    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text).map_err(|reason| ConfigError::Parse {
            path: path.into(),
            reason,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Parses `1=host:port,2=host:port`.
    pub fn parse_members(s: &str) -> Result<BTreeMap<u64, String>, ConfigError> {
        let mut m = BTreeMap::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (id, addr) = part.split_once('=').ok_or_else(|| ConfigError::Invalid {
                key: "initial_members",
                reason: format!("{part:?} is not id=host:port"),
            })?;
            let id: u64 = id.trim().parse().map_err(|_| ConfigError::Invalid {
                key: "initial_members",
                reason: format!("{id:?} is not a node id"),
            })?;
            if m.insert(id, addr.trim().to_string()).is_some() {
                return Err(ConfigError::Invalid {
                    key: "initial_members",
                    reason: format!("node {id} given twice"),
                });
            }
        }
        Ok(m)
    }

    /// Checks every key; the error names the first bad one and why.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.node_id == 0 {
            return Err(ConfigError::Invalid {
                key: "node_id",
                reason: "must be set and >= 1".into(),
            });
        }
        check_addr("client_addr", &self.client_addr)?;
        check_addr("peer_addr", &self.peer_addr)?;
        if !self.peer_listen_addr.is_empty() {
            check_addr("peer_listen_addr", &self.peer_listen_addr)?;
        }
        if !self.ops_addr.is_empty() {
            check_addr("ops_addr", &self.ops_addr)?;
        }
        if self.client_addr == self.peer_addr {
            return Err(ConfigError::Invalid {
                key: "peer_addr",
                reason: "must differ from client_addr".into(),
            });
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                key: "data_dir",
                reason: "must not be empty".into(),
            });
        }
        if self.runtime_threads > MAX_RUNTIME_THREADS {
            return Err(ConfigError::Invalid {
                key: "runtime_threads",
                reason: format!(
                    "{} is more than {MAX_RUNTIME_THREADS}; 0 picks a value from the CPUs this node may use",
                    self.runtime_threads
                ),
            });
        }
        if self.dr_replica && !self.initial_members.is_empty() {
            return Err(ConfigError::Invalid {
                key: "dr_replica",
                reason: "a DR replica joins as a learner (cluster add-learner); give it no \
                         initial_members"
                    .into(),
            });
        }
        for (id, addr) in &self.initial_members {
            if *id == 0 {
                return Err(ConfigError::Invalid {
                    key: "initial_members",
                    reason: "node ids start at 1".into(),
                });
            }
            check_addr("initial_members", addr)?;
        }
        if !self.initial_members.is_empty() {
            match self.initial_members.get(&self.node_id) {
                None => {
                    return Err(ConfigError::Invalid {
                        key: "initial_members",
                        reason: format!("does not include this node ({})", self.node_id),
                    })
                }
                Some(a) if *a != self.peer_addr => {
                    return Err(ConfigError::Invalid {
                        key: "initial_members",
                        reason: format!(
                            "names {a} for this node but peer_addr is {}",
                            self.peer_addr
                        ),
                    })
                }
                _ => {}
            }
        }
        self.raft.validate()?;
        self.tls.validate()?;
        self.limits.validate()
    }
}

impl RaftConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.heartbeat_ms == 0 {
            return Err(ConfigError::Invalid {
                key: "raft.heartbeat_ms",
                reason: "must be > 0".into(),
            });
        }
        if self.election_timeout_min_ms <= self.heartbeat_ms {
            return Err(ConfigError::Invalid {
                key: "raft.election_timeout_min_ms",
                reason: "must be greater than raft.heartbeat_ms".into(),
            });
        }
        if self.election_timeout_max_ms <= self.election_timeout_min_ms {
            return Err(ConfigError::Invalid {
                key: "raft.election_timeout_max_ms",
                reason: "must be greater than raft.election_timeout_min_ms".into(),
            });
        }
        if self.snapshot_logs_since_last == 0 {
            return Err(ConfigError::Invalid {
                key: "raft.snapshot_logs_since_last",
                reason: "must be > 0".into(),
            });
        }
        if self.max_payload_entries == 0 {
            return Err(ConfigError::Invalid {
                key: "raft.max_payload_entries",
                reason: "must be > 0".into(),
            });
        }
        if self.snapshot_min_bandwidth_mb_s == 0 {
            return Err(ConfigError::Invalid {
                key: "raft.snapshot_min_bandwidth_mb_s",
                reason: "must be > 0".into(),
            });
        }
        if self.dedup_window == 0 {
            return Err(ConfigError::Invalid {
                key: "raft.dedup_window",
                reason: "must be > 0".into(),
            });
        }
        Ok(())
    }
}

impl TlsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let set = [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
            ("tls.ca_file", &self.ca_file),
        ];
        let given = set
            .iter()
            .filter(|(_, p)| !p.as_os_str().is_empty())
            .count();
        if given != 0 && given != set.len() {
            let (key, _) = set
                .iter()
                .find(|(_, p)| p.as_os_str().is_empty())
                .copied()
                .unwrap_or(set[0]);
            return Err(ConfigError::Invalid {
                key,
                reason: "TLS needs all of tls.cert_file, tls.key_file and tls.ca_file (the \
                         peer port is always mutual TLS)"
                    .into(),
            });
        }
        if given == 0 && self.client_auth {
            return Err(ConfigError::Invalid {
                key: "tls.client_auth",
                reason: "needs tls.cert_file, tls.key_file and tls.ca_file".into(),
            });
        }
        if given == 0 && !self.peer_names.is_empty() {
            return Err(ConfigError::Invalid {
                key: "tls.peer_names",
                reason: "needs tls.cert_file, tls.key_file and tls.ca_file".into(),
            });
        }
        if let Some(bad) = self
            .peer_names
            .iter()
            .find(|n| crate::tls::server_name(n).is_err())
        {
            return Err(ConfigError::Invalid {
                key: "tls.peer_names",
                reason: format!("{bad:?} is not a DNS name or an IP address"),
            });
        }
        if !self.client_ca_file.as_os_str().is_empty() && !self.client_auth {
            return Err(ConfigError::Invalid {
                key: "tls.client_ca_file",
                reason: "verifies client certificates: set tls.client_auth = true too".into(),
            });
        }
        Ok(())
    }
}

impl Limits {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_key_bytes == 0
            || self.max_value_bytes == 0
            || self.max_range_limit == 0
            || self.max_txn_ops == 0
        {
            return Err(ConfigError::Invalid {
                key: "limits",
                reason: "limits must be > 0".into(),
            });
        }
        if self.max_request_bytes < self.max_key_bytes + self.max_value_bytes {
            return Err(ConfigError::Invalid {
                key: "limits.max_request_bytes",
                reason: "must hold at least one key and one value".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> Config {
        Config {
            node_id: 1,
            ..Default::default()
        }
    }

    #[test]
    fn defaults_validate_once_node_id_is_set() {
        assert!(Config::default().validate().is_err());
        valid().validate().expect("valid");
    }

    #[test]
    fn example_config_parses_and_validates() {
        let text = include_str!("../../deploy/metaraft.toml");
        let c = Config::from_toml(text).expect("parse example");
        c.validate().expect("example validates");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = Config::from_toml("node_id = 1\nnode_idd = 2\n").expect_err("unknown key");
        assert!(e.contains("node_idd"), "{e}");
    }

    #[test]
    fn bad_values_name_the_key() {
        let mut c = valid();
        c.client_addr = "nonsense".into();
        assert!(c
            .validate()
            .expect_err("bad")
            .to_string()
            .contains("client_addr"));
        let mut c = valid();
        c.raft.election_timeout_min_ms = 10;
        assert!(c
            .validate()
            .expect_err("bad")
            .to_string()
            .contains("election_timeout_min_ms"));
        let mut c = valid();
        c.initial_members = Config::parse_members("2=127.0.0.1:1").expect("parse");
        assert!(c
            .validate()
            .expect_err("bad")
            .to_string()
            .contains("does not include"));
    }

    #[test]
    fn tls_peer_names_need_tls_and_real_names() {
        let mut c = valid();
        c.tls.peer_names = vec!["metaraft-0.metaraft.ns.svc".into()];
        let e = c.validate().expect_err("no TLS").to_string();
        assert!(e.contains("tls.peer_names"), "{e}");
        c.tls.cert_file = "node.pem".into();
        c.tls.key_file = "node.key".into();
        c.tls.ca_file = "ca.pem".into();
        c.validate().expect("a DNS name");
        c.tls.peer_names.push("10.0.0.7".into());
        c.validate().expect("an IP address");
        for bad in ["bad host", "", "*.metaraft.ns.svc"] {
            c.tls.peer_names = vec!["10.0.0.7".into(), bad.into()];
            let e = c.validate().expect_err(bad).to_string();
            assert!(e.contains("tls.peer_names"), "{e}");
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let c = Config::from_toml(
            "node_id = 1\n[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\npeer_names = [\"m1\", \"m2\"]\n",
        )
        .expect("peer_names in the file");
        assert_eq!(c.tls.peer_names, vec!["m1".to_string(), "m2".to_string()]);
        c.validate().expect("valid");
    }

    #[test]
    fn tls_files_come_together() {
        let mut c = valid();
        assert!(c.tls.files().is_none());
        c.tls.cert_file = "node.pem".into();
        c.tls.key_file = "node.key".into();
        let e = c.validate().expect_err("no CA").to_string();
        assert!(e.contains("tls.ca_file"), "{e}");
        c.tls.ca_file = "ca.pem".into();
        c.validate().expect("all three");
        assert!(c.tls.files().is_some());
        let mut c = valid();
        c.tls.client_auth = true;
        let e = c.validate().expect_err("client_auth alone").to_string();
        assert!(e.contains("tls.client_auth"), "{e}");
        let c = Config::from_toml(
            "node_id = 1\n[tls]\ncert_file = \"a\"\nkey_file = \"b\"\nca_file = \"c\"\nclient_auth = true\n",
        )
        .expect("tls table");
        c.validate().expect("valid tls table");
        let mut c = c.clone();
        c.tls.client_auth = false;
        c.tls.client_ca_file = "clients.pem".into();
        let e = c
            .validate()
            .expect_err("client CA without client_auth")
            .to_string();
        assert!(e.contains("tls.client_ca_file"), "{e}");
        c.tls.client_auth = true;
        c.validate().expect("client CA with client_auth");
        assert_eq!(
            c.tls.files().expect("files").client_ca_file,
            PathBuf::from("clients.pem")
        );
        c.tls.client_ca_file = PathBuf::new();
        assert_eq!(
            c.tls.files().expect("files").client_ca_file,
            PathBuf::from("c")
        );
        let e = Config::from_toml("node_id = 1\n[tls]\ncert = \"a\"\n").expect_err("typo");
        assert!(e.contains("cert"), "{e}");
    }

    #[test]
    fn zero_snapshot_bandwidth_is_refused() {
        let mut c = valid();
        c.raft.snapshot_min_bandwidth_mb_s = 0;
        let e = c.validate().expect_err("zero bandwidth").to_string();
        assert!(e.contains("snapshot_min_bandwidth_mb_s"), "{e}");
    }

    #[test]
    fn dr_replica_and_peer_listen_addr_are_checked() {
        let mut c = valid();
        c.dr_replica = true;
        c.initial_members = Config::parse_members("1=127.0.0.1:7101").expect("parse");
        let e = c.validate().expect_err("dr with members").to_string();
        assert!(e.contains("dr_replica"), "{e}");
        c.initial_members.clear();
        c.validate().expect("a DR replica without initial members");
        let mut c = valid();
        c.peer_listen_addr = "no-port".into();
        let e = c.validate().expect_err("bad listen addr").to_string();
        assert!(e.contains("peer_listen_addr"), "{e}");
        c.peer_listen_addr = "127.0.0.1:9101".into();
        c.validate().expect("valid listen addr");
        assert_eq!(c.peer_bind_addr(), "127.0.0.1:9101");
        assert_eq!(valid().peer_bind_addr(), valid().peer_addr);
    }

    #[test]
    fn runtime_threads_resolve_and_are_bounded() {
        // Automatic: a single thread on small machines (or cgroup quotas), one per CPU above.
        assert_eq!(resolve_runtime_threads(0, 1), 1);
        assert_eq!(resolve_runtime_threads(0, 2), 1);
        assert_eq!(resolve_runtime_threads(0, 8), 8);
        // An explicit value wins whatever the CPUs.
        assert_eq!(resolve_runtime_threads(1, 16), 1);
        assert_eq!(resolve_runtime_threads(4, 2), 4);
        assert!(valid().effective_runtime_threads() >= 1);

        let mut c = valid();
        c.runtime_threads = MAX_RUNTIME_THREADS;
        c.validate().expect("the bound itself is allowed");
        c.runtime_threads = MAX_RUNTIME_THREADS + 1;
        let e = c.validate().expect_err("too many threads").to_string();
        assert!(e.contains("runtime_threads"), "{e}");
        let e = Config::from_toml("node_id = 1\nruntime_threads = -1\n").expect_err("negative");
        assert!(e.contains("runtime_threads"), "{e}");
    }

    #[test]
    fn member_table_rejects_non_numeric_ids() {
        let e = Config::from_toml("node_id = 1\n[initial_members]\nx = \"127.0.0.1:1\"\n")
            .expect_err("bad id");
        assert!(e.contains("not a node id"), "{e}");
    }

    #[test]
    fn member_list_parsing() {
        let m = Config::parse_members("1=127.0.0.1:7101, 2=127.0.0.1:7102").expect("parse");
        assert_eq!(m.len(), 2);
        assert!(Config::parse_members("1=a,1=b").is_err());
        assert!(Config::parse_members("x=a").is_err());
        assert!(Config::parse_members("1:a").is_err());
    }
}
