//! `metaraft serve` (one node) and `metaraft dev` (a local 3-node cluster).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::Args;

use metaraft::config::{defaults, Config};

use super::runtime;

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
        default_value = defaults::LOG_FILTER
    )]
    pub log: String,
}

#[derive(Args, Debug)]
pub struct DevArgs {
    /// Where the three nodes keep their data.
    #[arg(long, default_value = defaults::DEV_DIR)]
    pub dir: PathBuf,
    /// First client port; nodes use base, base+1, base+2 (peer +100, ops +200).
    #[arg(long, default_value_t = defaults::DEV_BASE_PORT)]
    pub base_port: u16,
    #[arg(long, default_value = defaults::DEV_LOG_FILTER)]
    pub log: String,
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

/// The node's configuration: the file given (or the defaults), then the flags over it.
fn build_config(a: &ServeArgs) -> Result<Config> {
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

/// Runs one node until SIGINT or SIGTERM; a DR promotion restarts it as a new lineage.
pub fn serve(a: ServeArgs) -> Result<ExitCode> {
    let c = build_config(&a)?;
    init_tracing(&a.log)?;
    let threads = c.effective_runtime_threads();
    tracing::info!(runtime_threads = threads, "starting node {}", c.node_id);
    runtime::with_threads(threads)?.block_on(async move {
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

/// Runs three nodes on loopback until Ctrl-C.
pub fn dev(a: DevArgs) -> Result<ExitCode> {
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
    runtime::multi_thread()?.block_on(async move {
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

#[cfg(test)]
mod tests {
    use metaraft::config::{defaults, Config};

    /// The client commands' default endpoints are the `dev` cluster's client addresses, and its
    /// first node listens where a node's defaults say.
    #[test]
    fn dev_cluster_matches_the_defaults() {
        let base = defaults::DEV_BASE_PORT;
        let endpoints: Vec<String> = (0..3).map(|i| format!("127.0.0.1:{}", base + i)).collect();
        assert_eq!(endpoints.join(","), defaults::CLIENT_ENDPOINTS);
        let c = Config::default();
        assert_eq!(c.client_addr, format!("127.0.0.1:{base}"));
        assert_eq!(c.peer_addr, format!("127.0.0.1:{}", base + 100));
        assert_eq!(c.ops_addr, format!("127.0.0.1:{}", base + 200));
    }
}
