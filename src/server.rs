//! Wiring of one node: stores, Raft, the peer and client gRPC listeners, the ops port, and
//! graceful shutdown (stop accepting, stop Raft, flush).

use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::api::Api;
use crate::config::Config;
use crate::consensus::Raft;
use crate::consensus::{raft_config, Consensus};
use crate::metrics::Metrics;
use crate::net::service::PeerService;
use crate::net::{NetworkFactory, PeerPool, MAX_PEER_MESSAGE};
use crate::raft_types::Node;
use crate::storage::{LogStore, StateMachineStore};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("raft config: {0}")]
    RaftConfig(String),
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("cannot create data dir {path}: {source}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error(
        "node {node_id}: data directory {} is empty, but leader {leader} has replicated the log to \
         this node up to index {index}: this node's data was lost, or data_dir points at the wrong \
         directory. A node never rejoins under its old id with empty data (it could forget a vote \
         or an entry the cluster counted on). Remove it (`metaraft cluster remove {node_id}`) and \
         add this machine back as a new node with a new id: docs/operations.md, \"A node lost its \
         data\"",
        data_dir.display()
    )]
    DataLost {
        node_id: u64,
        data_dir: std::path::PathBuf,
        leader: u64,
        index: u64,
    },
}

/// How long a stopping node lets open RPCs finish before it closes its listeners anyway.
pub const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// How long a node with an empty data directory waits for each peer's answer at start.
const FRESH_START_CHECK: std::time::Duration = std::time::Duration::from_secs(3);

/// A node whose data directory is empty asks the other initial members whether their leader has
/// already replicated entries to it. If it has, the node's data was lost: rejoining under the old
/// id could let it forget a vote or an entry the cluster counted on, and the leader would keep
/// retrying a follower whose log went backwards. Best effort: with no leader reachable, or a
/// leader that has not replicated to this node since it started, there is nothing to learn.
async fn refuse_lost_data(config: &Config, pool: &PeerPool) -> Result<(), ServerError> {
    let asks = config
        .initial_members
        .iter()
        .filter(|(id, _)| **id != config.node_id)
        .map(|(_, addr)| pool.node_status(addr, false, FRESH_START_CHECK));
    for s in futures::future::join_all(asks).await.into_iter().flatten() {
        let index = s.replicated.get(&config.node_id).copied().unwrap_or(0);
        if s.role == "leader" && index > 0 {
            return Err(ServerError::DataLost {
                node_id: config.node_id,
                data_dir: config.data_dir.clone(),
                leader: s.node_id,
                index,
            });
        }
    }
    Ok(())
}

/// A running node. Drop or call `shutdown` to stop it.
pub struct Server {
    pub node: Arc<Consensus>,
    shutdown_tx: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn bind(addr: &str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Accepted gRPC connections with TCP_NODELAY: without it a response written as two frames waits
/// for the peer's delayed ACK (~40 ms). The builder's `tcp_nodelay` only applies when tonic binds.
fn incoming(l: TcpListener, addr: &str) -> Result<TcpIncoming, ServerError> {
    TcpIncoming::from_listener(l, true, Some(std::time::Duration::from_secs(30))).map_err(|e| {
        ServerError::Listen {
            addr: addr.to_string(),
            source: std::io::Error::other(e.to_string()),
        }
    })
}

/// Serves `router` on `plain`'s connections, through TLS handshakes when `tls` is given, until
/// `shutdown` changes. `port` names the listener in logs and metrics.
async fn serve_port(
    router: tonic::transport::server::Router,
    plain: TcpIncoming,
    tls: Option<crate::tls::Live<rustls::ServerConfig>>,
    port: &'static str,
    metrics: Arc<Metrics>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let stop = async move {
        let _ = shutdown.changed().await;
    };
    let r = match tls {
        None => router.serve_with_incoming_shutdown(plain, stop).await,
        Some(cfg) => {
            let conns = crate::net::tls::incoming(plain, cfg, port, metrics);
            router.serve_with_incoming_shutdown(conns, stop).await
        }
    };
    if let Err(e) = r {
        tracing::error!(port, error = %e, "gRPC server stopped");
    }
}

/// SIGHUP: read the TLS files again (certificate rotation without a restart). New connections
/// use the new files; open ones keep theirs. A file that does not load leaves everything as it
/// was, with an error in the log.
async fn reload_tls_on_sighup(
    tls: crate::tls::NodeTls,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGHUP handler: TLS files reload only at restart");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => match tls.reload() {
                Ok(()) => tracing::info!("TLS files reloaded: new connections use them"),
                Err(e) => tracing::error!(
                    error = %e,
                    "TLS reload failed; the previous certificates stay in use"
                ),
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// The node's TLS material, when the config asks for TLS.
fn load_tls(config: &Config) -> Result<Option<crate::tls::NodeTls>, ServerError> {
    let Some(files) = config.tls.files() else {
        return Ok(None);
    };
    Ok(Some(crate::tls::NodeTls::load(
        &files,
        config.tls.client_auth,
        &config.tls.peer_names,
    )?))
}

/// The peer port's service; calls from another cluster lineage are refused.
fn peer_router(
    node: &Arc<Consensus>,
    raft: &Raft,
    sm: &StateMachineStore,
) -> tonic::transport::server::Router {
    let peer_svc = tonic::service::interceptor::InterceptedService::new(
        crate::pb::peer::peer_server::PeerServer::new(PeerService {
            node: node.clone(),
            raft: raft.clone(),
            sm: sm.clone(),
        })
        .max_decoding_message_size(MAX_PEER_MESSAGE)
        .max_encoding_message_size(MAX_PEER_MESSAGE),
        crate::net::CheckLineage(sm.lineage()),
    );
    crate::net::peer_server().add_service(peer_svc)
}

/// The client port's services, all over this node's consensus handle.
fn client_router(
    node: &Arc<Consensus>,
    pool: &Arc<PeerPool>,
    sm: &StateMachineStore,
    log: LogStore,
    max_req: usize,
) -> tonic::transport::server::Router {
    let api = || Api {
        node: node.clone(),
        peers: pool.clone(),
    };
    let kv = crate::pb::kv_server::KvServer::new(api()).max_decoding_message_size(max_req);
    let cluster = crate::pb::cluster_server::ClusterServer::new(api());
    let metadata =
        crate::pb::metadata_server::MetadataServer::new(api()).max_decoding_message_size(max_req);
    let identity = crate::pb::identity_server::IdentityServer::new(api());
    let rbac = crate::pb::rbac_server::RbacServer::new(api()).max_decoding_message_size(max_req);
    let backup = crate::pb::backup_server::BackupServer::new(crate::api::backup::BackupApi {
        node: node.clone(),
        sm: sm.clone(),
        log,
    });
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(kv)
        .add_service(cluster)
        .add_service(backup)
        .add_service(metadata)
        .add_service(identity)
        .add_service(rbac)
}

/// A node with `initial_members` whose Raft is not initialized yet initializes it with them.
async fn initialize_if_new(config: &Config, raft: &Raft) -> Result<(), ServerError> {
    if config.initial_members.is_empty() {
        return Ok(());
    }
    let initialized = raft
        .is_initialized()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?;
    if !initialized {
        let members: std::collections::BTreeMap<u64, Node> = config
            .initial_members
            .iter()
            .map(|(id, addr)| {
                (
                    *id,
                    Node {
                        peer_addr: addr.clone(),
                        client_addr: String::new(),
                    },
                )
            })
            .collect();
        // Every initial member calls this with the identical membership; openraft's vote
        // decides which copy wins. Client addresses are learned from NodeStatus.
        if let Err(e) = raft.initialize(members).await {
            tracing::info!(error = %e, "initialize skipped");
        }
    }
    Ok(())
}

impl Server {
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        config.validate()?;
        // Every TLS file is read and checked before anything is bound or opened.
        let tls = load_tls(&config)?;
        let rcfg = Arc::new(raft_config(&config).map_err(ServerError::RaftConfig)?);
        std::fs::create_dir_all(&config.data_dir).map_err(|source| ServerError::DataDir {
            path: config.data_dir.clone(),
            source,
        })?;
        let metrics = Arc::new(Metrics::default());
        let log = LogStore::open(&config.data_dir.join("log"), metrics.clone())?;
        let sm = StateMachineStore::open(&config.data_dir, config.raft.dedup_window)?;
        let pool = Arc::new(PeerPool::new(
            sm.lineage(),
            tls.as_ref().map(|t| t.peer_dialer.clone()),
        ));
        // Before this node binds its ports: initial members that start together then find each
        // other's ports closed (an immediate refusal) instead of bound but not yet served (a
        // wait for the whole timeout).
        if !config.initial_members.is_empty() && log.is_fresh()? && sm.applied_index() == 0 {
            refuse_lost_data(&config, &pool).await?;
        }
        let peer_bind = config.peer_bind_addr();
        let peer_l = incoming(bind(peer_bind).await?, peer_bind)?;
        let client_l = incoming(bind(&config.client_addr).await?, &config.client_addr)?;
        let ops_l = if config.ops_addr.is_empty() {
            None
        } else {
            Some(bind(&config.ops_addr).await?)
        };
        let factory = NetworkFactory {
            self_id: config.node_id,
            pool: pool.clone(),
            snapshot_min_bytes_per_sec: config
                .raft
                .snapshot_min_bandwidth_mb_s
                .saturating_mul(1 << 20),
            lost: Arc::default(),
            metrics: metrics.clone(),
        };
        let raft = Raft::new(config.node_id, rcfg, factory, log.clone(), sm.clone())
            .await
            .map_err(|e| ServerError::Raft(e.to_string()))?;
        let dr_replica = config.dr_replica && !config.data_dir.join(PROMOTED_MARKER).exists();
        let node = Arc::new(Consensus::new(
            config.clone(),
            raft.clone(),
            sm.clone(),
            pool.clone(),
            metrics.clone(),
            dr_replica,
        ));

        let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
        node.spawn_watchers(shutdown_rx.clone());
        let mut tasks = Vec::new();

        tasks.push(tokio::spawn(serve_port(
            peer_router(&node, &raft, &sm),
            peer_l,
            tls.as_ref().map(|t| t.peer_port.clone()),
            "peer",
            metrics.clone(),
            shutdown_rx.clone(),
        )));

        let router = client_router(&node, &pool, &sm, log, config.limits.max_request_bytes);
        tasks.push(tokio::spawn(serve_port(
            router,
            client_l,
            tls.as_ref().map(|t| t.client_port.clone()),
            "client",
            metrics.clone(),
            shutdown_rx.clone(),
        )));

        if let Some(t) = tls.clone() {
            tasks.push(tokio::spawn(reload_tls_on_sighup(t, shutdown_rx.clone())));
        }

        if let Some(l) = ops_l {
            tasks.push(tokio::spawn(crate::ops::serve(
                l,
                node.clone(),
                shutdown_rx.clone(),
            )));
        }

        initialize_if_new(&config, &raft).await?;
        tracing::info!(node = config.node_id, client = %config.client_addr, peer = %config.peer_addr, ops = %config.ops_addr, "node started");
        Ok(Server {
            node,
            shutdown_tx,
            tasks,
        })
    }

    /// Fires when a DR promotion was requested over the API.
    pub fn promote_requested(&self) -> tokio::sync::watch::Receiver<bool> {
        self.node.promotion_requests()
    }

    /// Stops accepting, stops Raft, and lets open RPCs finish for up to [`SHUTDOWN_GRACE`].
    /// Past it, the listeners are closed with whatever is still open: a follower always has the
    /// leader's replication stream open, and a `backup stream` client may be attached, and
    /// neither ends by itself.
    pub async fn shutdown(self) {
        let _ = self.shutdown_tx.send(true);
        if let Err(e) = self.node.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
        let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
        let mut cut = 0;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
                cut += 1;
            }
        }
        if cut > 0 {
            tracing::info!(
                listeners = cut,
                grace_ms = SHUTDOWN_GRACE.as_millis() as u64,
                "closed listeners with RPCs still open after the grace period"
            );
        }
        tracing::info!(node = self.node.id(), "node stopped");
    }
}

/// Written into the data directory of a promoted DR replica: it is a voter of its own cluster now,
/// whatever its config says.
pub const PROMOTED_MARKER: &str = "PROMOTED";

/// Converts a stopped DR replica's data into the first node of a new lineage: entries it holds
/// as committed are applied, then `storage::start_new_lineage` (new cluster id, next revision
/// epoch, this node the only voter), then the marker. Everything the replica had stays.
pub async fn dr_promote_offline(
    config: &Config,
) -> Result<crate::storage::NewLineage, ServerError> {
    use openraft::storage::RaftLogStorage;
    let log_dir = config.data_dir.join("log");
    // The stopped node's stores may take a moment to close.
    let mut tries = 0;
    let (log, mut sm) = loop {
        let r = LogStore::open(&log_dir, Arc::new(Metrics::default())).and_then(|l| {
            StateMachineStore::open(&config.data_dir, config.raft.dedup_window).map(|s| (l, s))
        });
        match r {
            Ok(x) => break x,
            Err(e) if tries < 50 => {
                tries += 1;
                tracing::debug!(error = %e, "stores still open; waiting");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => return Err(e.into()),
        }
    };
    let mut l = log.clone();
    let committed = l
        .read_committed()
        .await
        .map_err(|e| ServerError::Raft(e.to_string()))?
        .map(|c| c.index)
        .unwrap_or(0);
    let applied = sm.applied_index();
    if committed > applied {
        let entries = log.read_entries(applied + 1, committed + 1)?;
        sm.apply_entries(entries).await?;
    }
    drop(l);
    drop(log);
    let node = Node {
        peer_addr: config.peer_addr.clone(),
        client_addr: config.client_addr.clone(),
    };
    let r = crate::storage::start_new_lineage(&sm, &log_dir, config.node_id, node).await?;
    let marker = config.data_dir.join(PROMOTED_MARKER);
    std::fs::write(&marker, format!("{}\n", r.cluster_id))
        .and_then(|_| std::fs::File::open(&marker).and_then(|f| f.sync_all()))
        .map_err(|source| ServerError::DataDir {
            path: marker.clone(),
            source,
        })?;
    Ok(r)
}
