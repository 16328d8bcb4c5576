//! Command line: `serve`, `dev`, `kv`, `cluster`, `meta`, `rbac`, `bench`, `backup`, `restore`, `dr`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};

use metaraft::client::Client;
use metaraft::config::Config;
use metaraft::pb;

#[derive(Parser, Debug)]
#[command(name = "metaraft", version, about = "Raft-replicated metadata service")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run one node.
    Serve(ServeArgs),
    /// Run a local 3-node cluster on loopback until Ctrl-C (data kept for the next run).
    Dev(DevArgs),
    /// Key/value operations.
    Kv {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: KvCmd,
    },
    /// Cluster status and membership.
    Cluster {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: ClusterCmd,
    },
    /// Load generator: throughput and latency percentiles.
    Bench(crate::bench::BenchArgs),
    /// Backups: create, stream (continuous), verify, list.
    Backup {
        #[command(subcommand)]
        op: crate::backup_cmd::BackupCmd,
    },
    /// Rebuild a node's data directory from a backup, to any restorable index or time, as the
    /// first node of a new cluster lineage.
    Restore(crate::backup_cmd::RestoreArgs),
    /// Metadata resources: create, get, list, delete, run/step status, model stages, API keys.
    Meta {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: crate::meta_cmd::MetaCmd,
    },
    /// Roles, bindings, permission checks and `explain`.
    Rbac {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: crate::meta_cmd::RbacCmd,
    },
    /// DR replica: status (lag, last contact, snapshots) and promotion after losing the primary.
    Dr {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: DrCmd,
    },
}

#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Client endpoints, host:port, comma separated (any node).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003"
    )]
    pub endpoints: Vec<String>,
    /// Per-request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = 15000)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

/// TLS towards the client port. Given a CA, connections are TLS and the nodes' certificates
/// must carry the endpoint's host name or IP address.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM CA bundle that signed the nodes' certificates: turns TLS on.
    #[arg(long, global = true, env = "METARAFT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for clusters that require one (tls.client_auth); needs --key-file.
    #[arg(long, global = true, env = "METARAFT_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, global = true, env = "METARAFT_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The rustls client configuration these flags ask for; None for plaintext.
    pub fn config(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        let Some(ca) = &self.ca_file else {
            if self.cert_file.is_some() {
                anyhow::bail!(
                    "--cert-file needs --ca-file (the CA that signed the nodes' certificates)"
                );
            }
            return Ok(None);
        };
        let roots = metaraft::tls::load_roots(ca)?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        Ok(Some(metaraft::tls::client_config(roots, identity)?))
    }
}

impl Conn {
    pub fn client(&self) -> Result<Client> {
        Ok(Client::with_tls(
            &self.endpoints,
            Duration::from_millis(self.timeout_ms),
            self.tls.config()?,
        )?)
    }
}

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// TOML config file (see deploy/metaraft.toml). Flags override its keys.
    #[arg(long)]
    pub config: Option<PathBuf>,
    #[arg(long)]
    pub node_id: Option<u64>,
    #[arg(long)]
    pub client_addr: Option<String>,
    #[arg(long)]
    pub peer_addr: Option<String>,
    /// HTTP ops address; empty disables it.
    #[arg(long)]
    pub ops_addr: Option<String>,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Initial members as id=peer_host:port, comma separated.
    #[arg(long)]
    pub initial_members: Option<String>,
    /// Listen for peer traffic here (config key peer_listen_addr) while members use --peer-addr.
    #[arg(long)]
    pub peer_listen_addr: Option<String>,
    /// Run as a DR replica (config key dr_replica): a permanent learner, promoted only by
    /// `metaraft dr promote`.
    #[arg(long)]
    pub dr_replica: bool,
    /// Async runtime threads (config key runtime_threads; 0: automatic).
    #[arg(long)]
    pub runtime_threads: Option<usize>,
    /// This node's PEM certificate (config key tls.cert_file; with --tls-key-file and
    /// --tls-ca-file: TLS on the client port, mutual TLS on the peer port).
    #[arg(long)]
    pub tls_cert_file: Option<PathBuf>,
    /// Its PEM private key (config key tls.key_file).
    #[arg(long)]
    pub tls_key_file: Option<PathBuf>,
    /// PEM CA bundle that verifies peers, and clients with --tls-client-auth (tls.ca_file).
    #[arg(long)]
    pub tls_ca_file: Option<PathBuf>,
    /// Require client certificates on the client port (config key tls.client_auth).
    #[arg(long)]
    pub tls_client_auth: bool,
    /// PEM CA bundle that verifies client certificates (tls.client_ca_file; default: the CA).
    #[arg(long)]
    pub tls_client_ca_file: Option<PathBuf>,
    /// Names a member's certificate must be valid for, comma-separated (tls.peer_names).
    #[arg(long, value_delimiter = ',')]
    pub tls_peer_names: Option<Vec<String>>,
    /// Override raft.snapshot_logs_since_last.
    #[arg(long)]
    pub snapshot_logs_since_last: Option<u64>,
    /// Override raft.max_in_snapshot_log_to_keep.
    #[arg(long)]
    pub max_in_snapshot_log_to_keep: Option<u64>,
    /// Log filter (RUST_LOG syntax). openraft's own info lines are left out by default: they
    /// repeat per message (about 15,000 a second when replication to a node keeps restarting);
    /// `--log info` brings them back for an investigation. So are its warnings about failed
    /// heartbeats: ten a second per unreachable peer, while its replication stream's errors
    /// (about one a second, with backoff) already name that peer.
    #[arg(
        long,
        default_value = "info,openraft=warn,openraft::core::heartbeat=error"
    )]
    pub log: String,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the three nodes keep their data.
    #[arg(long, default_value = "metaraft-dev")]
    pub dir: PathBuf,
    /// First client port; nodes use base, base+1, base+2 (peer +100, ops +200).
    #[arg(long, default_value_t = 7001)]
    pub base_port: u16,
    #[arg(long, default_value = "warn,metaraft=info")]
    pub log: String,
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ConsistencyArg {
    Linearizable,
    Session,
    Stale,
    Lease,
}

impl ConsistencyArg {
    pub fn to_pb(self) -> pb::Consistency {
        match self {
            ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
            ConsistencyArg::Session => pb::Consistency::Session,
            ConsistencyArg::Stale => pb::Consistency::Stale,
            ConsistencyArg::Lease => pb::Consistency::Lease,
        }
    }
}

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Write a value; prints the revision.
    Put {
        key: String,
        value: String,
        /// Compare-and-set: only if the key is at this revision (0 = must not exist).
        #[arg(long)]
        expected_revision: Option<u64>,
        /// Idempotency key (generated when absent).
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Print a value.
    Get {
        key: String,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
        #[arg(long, default_value_t = 0)]
        min_revision: u64,
        #[arg(long, default_value_t = 0)]
        max_lag: u64,
    },
    /// Delete a key; prints the revision.
    Delete {
        key: String,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// List keys with a prefix, one page.
    List {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        start_after: String,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term, and each member's role, log, commit, applied index and lag.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Include each member's state hash (CRC32 of the state machine at its applied index).
        #[arg(long)]
        hash: bool,
    },
    /// Add a non-voting learner.
    AddLearner {
        node_id: u64,
        peer_addr: String,
        #[arg(long, default_value = "")]
        client_addr: String,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a member (voter or learner).
    Remove { node_id: u64 },
    /// Hand leadership to a voter.
    TransferLeader { node_id: u64 },
}

fn init_tracing(filter: &str) -> Result<()> {
    let f = tracing_subscriber::EnvFilter::try_new(filter)
        .with_context(|| format!("bad --log filter {filter:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(f)
        .with_target(false)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    Ok(())
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A runtime of `threads` async threads; 1 is tokio's single-threaded scheduler.
pub fn runtime_with(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    Ok(b.enable_all().build()?)
}

pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve(a) => serve(a),
        Cmd::Dev(a) => dev(a),
        Cmd::Kv { conn, op } => runtime()?.block_on(kv(conn, op)),
        Cmd::Cluster { conn, op } => runtime()?.block_on(cluster(conn, op)),
        Cmd::Bench(a) => {
            if a.threads > metaraft::config::MAX_RUNTIME_THREADS {
                anyhow::bail!(
                    "--threads must be at most {}",
                    metaraft::config::MAX_RUNTIME_THREADS
                );
            }
            let threads = metaraft::config::runtime_threads_here(a.threads);
            runtime_with(threads)?.block_on(crate::bench::run(a))
        }
        Cmd::Backup { op } => crate::backup_cmd::run(op),
        Cmd::Restore(a) => crate::backup_cmd::restore(a),
        Cmd::Dr { conn, op } => runtime()?.block_on(dr(conn, op)),
        // The client's channels need the runtime, so they are made inside it.
        Cmd::Meta { conn, op } => {
            runtime()?.block_on(async { crate::meta_cmd::meta(conn.client()?, op).await })
        }
        Cmd::Rbac { conn, op } => {
            runtime()?.block_on(async { crate::meta_cmd::rbac(conn.client()?, op).await })
        }
    }
}

pub fn build_config(a: &ServeArgs) -> Result<Config> {
    let mut c = match &a.config {
        Some(p) => Config::from_file(p)?,
        None => Config::default(),
    };
    if let Some(v) = a.node_id {
        c.node_id = v;
    }
    if let Some(v) = &a.client_addr {
        c.client_addr = v.clone();
    }
    if let Some(v) = &a.peer_addr {
        c.peer_addr = v.clone();
    }
    if let Some(v) = &a.ops_addr {
        c.ops_addr = v.clone();
    }
    if let Some(v) = &a.data_dir {
        c.data_dir = v.clone();
    }
    if a.dr_replica {
        c.dr_replica = true;
    }
    if let Some(v) = &a.peer_listen_addr {
        c.peer_listen_addr = v.clone();
    }
    if let Some(v) = &a.initial_members {
        c.initial_members = Config::parse_members(v)?;
    }
    if let Some(v) = a.runtime_threads {
        c.runtime_threads = v;
    }
    if let Some(v) = &a.tls_cert_file {
        c.tls.cert_file = v.clone();
    }
    if let Some(v) = &a.tls_key_file {
        c.tls.key_file = v.clone();
    }
    if let Some(v) = &a.tls_ca_file {
        c.tls.ca_file = v.clone();
    }
    if a.tls_client_auth {
        c.tls.client_auth = true;
    }
    if let Some(v) = &a.tls_client_ca_file {
        c.tls.client_ca_file = v.clone();
    }
    if let Some(v) = &a.tls_peer_names {
        c.tls.peer_names = v.clone();
    }
    if let Some(v) = a.snapshot_logs_since_last {
        c.raft.snapshot_logs_since_last = v;
    }
    if let Some(v) = a.max_in_snapshot_log_to_keep {
        c.raft.max_in_snapshot_log_to_keep = v;
    }
    c.validate()?;
    Ok(c)
}

async fn wait_for_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn serve(a: ServeArgs) -> Result<ExitCode> {
    let c = build_config(&a)?;
    init_tracing(&a.log)?;
    let threads = c.effective_runtime_threads();
    tracing::info!(runtime_threads = threads, "starting node {}", c.node_id);
    runtime_with(threads)?.block_on(async move {
        let signal = wait_for_signal();
        tokio::pin!(signal);
        loop {
            let s = metaraft::server::Server::start(c.clone()).await?;
            let mut promote = s.promote_requested();
            tokio::select! {
                _ = &mut signal => {
                    tracing::info!("shutting down");
                    s.shutdown().await;
                    return Ok(ExitCode::SUCCESS);
                }
                _ = promote.wait_for(|p| *p) => {}
            }
            // DR promotion: stop, turn the data into a new lineage, start again as its voter.
            tracing::warn!("DR promotion: stopping to start a new cluster lineage");
            s.shutdown().await;
            let r = metaraft::server::dr_promote_offline(&c).await?;
            tracing::warn!(
                cluster = %r.cluster_id,
                previous = %r.previous_cluster_id,
                state_index = r.state_index,
                first_index = r.first_index,
                "DR promotion done: restarting as the only voter of the new cluster"
            );
        }
    })
}

fn dev(a: DevArgs) -> Result<ExitCode> {
    init_tracing(&a.log)?;
    let base = a.base_port;
    let members: std::collections::BTreeMap<u64, String> = (1..=3u64)
        .map(|i| (i, format!("127.0.0.1:{}", base + 100 + i as u16 - 1)))
        .collect();
    let configs: Vec<Config> = (1..=3u64)
        .map(|i| {
            let off = i as u16 - 1;
            Config {
                node_id: i,
                client_addr: format!("127.0.0.1:{}", base + off),
                peer_addr: format!("127.0.0.1:{}", base + 100 + off),
                ops_addr: format!("127.0.0.1:{}", base + 200 + off),
                data_dir: a.dir.join(format!("node{i}")),
                initial_members: members.clone(),
                ..Default::default()
            }
        })
        .collect();
    runtime()?.block_on(async move {
        let mut servers = Vec::new();
        for c in &configs {
            servers.push(
                metaraft::server::Server::start(c.clone())
                    .await
                    .with_context(|| format!("node {}", c.node_id))?,
            );
        }
        println!("metaraft dev cluster: data under {}", a.dir.display());
        for c in &configs {
            println!(
                "  node {}: client {}  peer {}  ops http://{}/metrics",
                c.node_id, c.client_addr, c.peer_addr, c.ops_addr
            );
        }
        let eps: Vec<String> = configs.iter().map(|c| c.client_addr.clone()).collect();
        println!(
            "try: metaraft kv put hello world --endpoints {}",
            eps.join(",")
        );
        println!("Ctrl-C stops the cluster; the next `metaraft dev` resumes with its data.");
        wait_for_signal().await;
        println!("stopping...");
        for s in servers {
            s.shutdown().await;
        }
        println!("stopped");
        Ok(ExitCode::SUCCESS)
    })
}

fn read_opts(c: ConsistencyArg, min_revision: u64, max_lag: u64) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: c.to_pb() as i32,
        min_revision,
        max_lag,
    })
}

async fn kv(conn: Conn, op: KvCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match op {
        KvCmd::Put {
            key,
            value,
            expected_revision,
            request_id,
        } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    expected_revision,
                    request_id,
                })
                .await?;
            println!("revision {}", r.revision);
        }
        KvCmd::Get {
            key,
            consistency,
            min_revision,
            max_lag,
        } => {
            let r = c
                .get(pb::GetRequest {
                    key: key.into_bytes(),
                    read: read_opts(consistency, min_revision, max_lag),
                })
                .await?;
            match r.kv {
                Some(kv) => println!("{}", String::from_utf8_lossy(&kv.value)),
                None => {
                    eprintln!("not found (applied index {})", r.applied_index);
                    return Ok(ExitCode::from(2));
                }
            }
        }
        KvCmd::Delete {
            key,
            expected_revision,
        } => {
            let r = c
                .delete(pb::DeleteRequest {
                    key: key.into_bytes(),
                    expected_revision,
                    request_id: String::new(),
                })
                .await?;
            println!("revision {} deleted {}", r.revision, r.deleted);
        }
        KvCmd::List {
            prefix,
            limit,
            start_after,
            consistency,
        } => {
            let r = c
                .range(pb::RangeRequest {
                    prefix: prefix.into_bytes(),
                    start_after: start_after.into_bytes(),
                    limit,
                    read: read_opts(consistency, 0, 0),
                    keys_only: false,
                })
                .await?;
            for kv in &r.kvs {
                println!(
                    "{}\t{}\trev={}",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value),
                    kv.mod_revision
                );
            }
            if r.more {
                if let Some(last) = r.kvs.last() {
                    eprintln!(
                        "(more: --start-after {})",
                        String::from_utf8_lossy(&last.key)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "leader": s.leader,
        "term": s.term,
        "answered_by": s.answered_by,
        "members": s.members.iter().map(|m| serde_json::json!({
            "node_id": m.node_id,
            "role": m.role,
            "voter": m.voter,
            "peer_addr": m.peer_addr,
            "client_addr": m.client_addr,
            "term": m.term,
            "last_log_index": m.last_log_index,
            "commit_index": m.commit_index,
            "applied_index": m.applied_index,
            "lag": m.lag,
            "state_hash": m.state_hash.map(|h| format!("{h:08x}")),
            "hash_index": m.hash_index,
            "error": if m.error.is_empty() { None } else { Some(&m.error) },
        })).collect::<Vec<_>>(),
    })
}

async fn cluster(conn: Conn, op: ClusterCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let show = |r: pb::MembershipResponse| {
        println!(
            "ok at revision {}: voters {:?} learners {:?}",
            r.revision, r.voters, r.learners
        )
    };
    match op {
        ClusterCmd::Status { output, hash } => {
            let s = c.status(hash).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                match s.leader {
                    Some(l) => println!("leader: node {l}   term: {}", s.term),
                    None => println!("leader: none known   term: {}", s.term),
                }
                println!(
                    "{:<6} {:<12} {:<22} {:>10} {:>10} {:>10} {:>8}  {}",
                    "node",
                    "role",
                    "peer",
                    "last_log",
                    "commit",
                    "applied",
                    "lag",
                    if hash { "hash@index" } else { "" }
                );
                for m in &s.members {
                    let lag = m.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                    let h = match (m.state_hash, m.hash_index) {
                        (Some(h), Some(i)) => format!("{h:08x}@{i}"),
                        _ => String::new(),
                    };
                    println!(
                        "{:<6} {:<12} {:<22} {:>10} {:>10} {:>10} {:>8}  {}{}",
                        m.node_id,
                        m.role,
                        m.peer_addr,
                        m.last_log_index,
                        m.commit_index,
                        m.applied_index,
                        lag,
                        h,
                        if m.error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", m.error)
                        }
                    );
                }
            }
        }
        ClusterCmd::AddLearner {
            node_id,
            peer_addr,
            client_addr,
        } => show(c.add_learner(node_id, peer_addr, client_addr).await?),
        ClusterCmd::Promote { node_id } => show(c.promote(node_id).await?),
        ClusterCmd::Remove { node_id } => show(c.remove(node_id).await?),
        ClusterCmd::TransferLeader { node_id } => {
            if node_id == 0 {
                bail!("node_id must be >= 1");
            }
            show(c.transfer_leader(node_id).await?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand, Debug)]
pub enum DrCmd {
    /// Lag of the DR replica at --endpoints: entries, bytes (estimate), time; last contact.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Promote the DR replica at --endpoints (one endpoint) into a new single-voter cluster.
    /// Only after the primary site is lost: the old cluster's nodes are refused afterwards.
    Promote {
        /// The replica's node id, as a guard against promoting the wrong endpoint.
        #[arg(long)]
        node_id: u64,
        /// Seconds to wait for the promoted node to accept writes.
        #[arg(long, default_value_t = 60)]
        wait_s: u64,
    },
}

async fn dr(conn: Conn, op: DrCmd) -> Result<ExitCode> {
    if conn.endpoints.len() != 1 {
        anyhow::bail!("give exactly one endpoint: the DR replica's client address");
    }
    let c = conn.client()?;
    let mut cc = c.cluster_at(0);
    match op {
        DrCmd::Status { output } => {
            let s = cc.dr_status(pb::DrStatusRequest {}).await?.into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "node_id": s.node_id, "dr_replica": s.dr_replica, "role": s.role,
                        "cluster_id": s.cluster_id, "leader": s.leader, "term": s.term,
                        "known_commit_index": s.known_commit_index,
                        "applied_index": s.applied_index, "lag_entries": s.lag_entries,
                        "lag_bytes": s.lag_bytes, "lag_ms": s.lag_ms,
                        "last_contact_ms_ago": s.last_contact_ms_ago,
                        "snapshots_received": s.snapshots_received,
                    })
                ),
                Output::Text => {
                    println!(
                        "node {} ({}{}), cluster {}, term {}, leader {}",
                        s.node_id,
                        s.role,
                        if s.dr_replica { ", DR replica" } else { "" },
                        s.cluster_id,
                        s.term,
                        s.leader
                            .map(|l| l.to_string())
                            .unwrap_or_else(|| "unknown".into())
                    );
                    println!(
                        "lag: {} entries (~{} bytes), {} ms; applied {} of known commit {}",
                        s.lag_entries, s.lag_bytes, s.lag_ms, s.applied_index, s.known_commit_index
                    );
                    println!(
                        "last contact from a leader: {}; snapshots received: {}",
                        if s.last_contact_ms_ago == 0 && s.leader.is_none() {
                            "never".to_string()
                        } else {
                            format!("{} ms ago", s.last_contact_ms_ago)
                        },
                        s.snapshots_received
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DrCmd::Promote { node_id, wait_s } => {
            let t = std::time::Instant::now();
            let r = cc
                .dr_promote(pb::DrPromoteRequest { node_id })
                .await?
                .into_inner();
            eprintln!(
                "promoting node {node_id} (state at index {}, leaving cluster {})",
                r.state_index, r.previous_cluster_id
            );
            let deadline = t + Duration::from_secs(wait_s);
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Only once the node reports the new lineage: a write before that would go to
                // the old cluster if any of it were still alive.
                let promoted = match cc.dr_status(pb::DrStatusRequest {}).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        (s.cluster_id != r.previous_cluster_id && !s.cluster_id.is_empty())
                            .then_some(s.cluster_id)
                    }
                    Err(_) => None,
                };
                if let Some(cluster) = promoted {
                    let probe = c
                        .put(pb::PutRequest {
                            key: b"metaraft/dr-promoted-at".to_vec(),
                            value: metaraft::metrics::now_unix_ms().to_string().into_bytes(),
                            ..Default::default()
                        })
                        .await;
                    if let Ok(p) = probe {
                        println!(
                            "promoted: node {node_id} leads new cluster {cluster} (first write at revision {} after {:.2}s)",
                            p.revision,
                            t.elapsed().as_secs_f64()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!("node {node_id} did not accept writes within {wait_s}s");
                }
            }
        }
    }
}
