//! Consensus: the openraft handle and everything that needs the leader.
//!
//! - Writes: proposed locally when this node leads, otherwise forwarded over the peer transport
//!   to the leader (one hop; the leader never forwards again).
//! - Reads: LINEARIZABLE asks the leader for a read index (ReadIndex: a heartbeat round confirms
//!   leadership), then waits until this node applied it; SESSION waits for a revision; STALE reads
//!   locally, bounded by a maximum lag behind the known commit index.
//! - Membership: add learner, promote, remove, transfer leadership (forwarded to the leader).
//!
//! Its public face is [`Consensus`]'s methods: built once by [`Consensus::new`], it owns the Raft
//! handle, the state machine's read side and the batchers. What it needs from other members goes
//! through [`Peers`] (implemented by the network layer), so no transport type appears here.
//!
//! Files: mod.rs (the handle and writes), reads.rs (read barriers and [`Reader`]), admin.rs
//! (membership changes), status.rs (status, metrics upkeep), batch.rs (batching), peers.rs.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fsm::{Request, Response};
use crate::metrics::Metrics;
use crate::raft_types::{Node, NodeId, TypeConfig};
use crate::storage::{StateMachineStore, StorageError};

mod admin;
pub mod batch;
mod peers;
mod reads;
mod status;

pub use peers::{PeerError, Peers};
pub use reads::{Consistency, Reader};
pub use status::DrStatus;

/// The openraft handle of this node: metaraft's types over the RocksDB state machine.
pub type Raft = openraft::Raft<TypeConfig, StateMachineStore>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum ConsensusError {
    #[error("no leader is known right now{}", hint(.leader))]
    NoLeader { leader: Option<NodeId> },
    #[error("timed out: {0}")]
    Timeout(String),
    #[error("raft stopped: {0}")]
    Fatal(String),
    #[error("forwarding to the leader failed: {0}")]
    Forward(#[from] PeerError),
    #[error("membership change refused: {0}")]
    Membership(String),
    #[error("this node lags the commit index by {lag} entries (max_lag {max_lag})")]
    TooStale { lag: u64, max_lag: u64 },
    #[error("not a member of any cluster yet")]
    NotInitialized,
}

fn hint(leader: &Option<NodeId>) -> String {
    leader
        .map(|l| format!(" (last known leader: node {l})"))
        .unwrap_or_default()
}

/// What a follower gets back when it forwards a write or an admin request.
#[derive(Debug, Serialize, Deserialize)]
pub enum Forwarded<T> {
    Ok(T),
    NotLeader { leader: Option<NodeId> },
    Failed(String),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum AdminRequest {
    AddLearner { id: NodeId, node: Node },
    Promote { id: NodeId },
    Remove { id: NodeId },
    TransferLeader { id: NodeId },
}

#[derive(Debug, Clone, Serialize, Deserialize, Default)]
pub struct MembershipView {
    pub revision: u64,
    pub voters: Vec<NodeId>,
    pub learners: Vec<NodeId>,
}

/// One node's view of itself, as `cluster status` shows it.
#[derive(Debug, Clone, Default)]
pub struct LocalStatus {
    pub node_id: NodeId,
    pub role: &'static str,
    pub term: u64,
    pub last_log_index: u64,
    pub commit_index: u64,
    pub applied_index: u64,
    pub leader: Option<NodeId>,
    pub members: BTreeMap<NodeId, (Node, bool)>,
    /// Leader only: matched index per member.
    pub replication: BTreeMap<NodeId, u64>,
}

/// This node's consensus handle (see the module docs). Shared as `Arc<Consensus>`.
pub struct Consensus {
    id: NodeId,
    raft: Raft,
    sm: StateMachineStore,
    peers: Arc<dyn Peers>,
    metrics: Arc<Metrics>,
    config: Config,
    /// This node is a DR replica (a permanent learner; see `request_promotion`).
    dr_replica: bool,
    /// Set by a DR promotion request: the serve loop stops the node, converts its data into a
    /// new lineage, and starts it again.
    promote_requested: tokio::sync::watch::Sender<bool>,
    /// Coalesces read-index rounds served by this node as leader (local reads and followers' RPCs).
    leader_reads: Arc<batch::ReadBatcher>,
    /// Coalesces read-index requests this node makes (to itself or to the leader).
    reads: Arc<batch::ReadBatcher>,
    /// Coalesces the LEASE-read index requests this node makes, likewise.
    lease_reads: Arc<batch::ReadBatcher>,
    /// Batches the writes this node forwards to the leader.
    forwarder: Arc<batch::ForwardBatcher>,
    /// Hands this node's writes (as leader) to the Raft core in batches; stamps meta commands.
    proposer: Arc<batch::Proposer>,
}

pub fn role_name(s: ServerState) -> &'static str {
    match s {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
}

/// openraft configuration from ours; the reasons for each value are next to the config keys.
pub fn raft_config(c: &Config) -> Result<openraft::Config, String> {
    let r = &c.raft;
    let cfg = openraft::Config {
        cluster_name: "metaraft".into(),
        heartbeat_interval: r.heartbeat_ms,
        election_timeout_min: r.election_timeout_min_ms,
        election_timeout_max: r.election_timeout_max_ms,
        install_snapshot_timeout: r.snapshot_timeout_ms,
        max_payload_entries: r.max_payload_entries,
        snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(r.snapshot_logs_since_last),
        max_in_snapshot_log_to_keep: r.max_in_snapshot_log_to_keep,
        enable_pre_vote: Some(true),
        ..Default::default()
    };
    cfg.validate().map_err(|e| e.to_string())
}

impl Consensus {
    /// The handle of node `config.node_id` over its Raft core and state machine; `dr_replica`
    /// says whether it serves as a DR replica now (the config's wish, unless already promoted).
    pub fn new(
        config: Config,
        raft: Raft,
        sm: StateMachineStore,
        peers: Arc<dyn Peers>,
        metrics: Arc<Metrics>,
        dr_replica: bool,
    ) -> Consensus {
        let write_timeout = Duration::from_millis(config.limits.write_timeout_ms);
        Consensus {
            id: config.node_id,
            proposer: Arc::new(batch::Proposer::new(
                raft.clone(),
                metrics.clone(),
                write_timeout,
            )),
            forwarder: Arc::new(batch::ForwardBatcher::new(metrics.clone())),
            leader_reads: Default::default(),
            reads: Default::default(),
            lease_reads: Default::default(),
            promote_requested: tokio::sync::watch::channel(false).0,
            raft,
            sm,
            peers,
            metrics,
            config,
            dr_replica,
        }
    }

    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The configuration this node was started with.
    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Whether this node serves as a DR replica (a permanent learner).
    pub fn is_dr_replica(&self) -> bool {
        self.dr_replica
    }

    /// The cluster lineage id ("" before the first membership entry is applied).
    pub fn cluster_id(&self) -> Result<String, StorageError> {
        self.sm.cluster_id()
    }

    /// The highest log index applied to this node's state.
    pub fn applied_index(&self) -> u64 {
        self.sm.applied_index()
    }

    /// Asks the serve loop to promote this DR replica (it restarts the node as a new lineage).
    pub fn request_promotion(&self) {
        let _ = self.promote_requested.send(true);
    }

    /// Resolves once a promotion was requested.
    pub fn promotion_requests(&self) -> tokio::sync::watch::Receiver<bool> {
        self.promote_requested.subscribe()
    }

    /// Stops the Raft core (graceful shutdown).
    pub async fn shutdown(&self) -> Result<(), String> {
        self.raft.shutdown().await.map_err(|e| e.to_string())
    }

    fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.config.limits.write_timeout_ms)
    }

    fn fatal<E: std::fmt::Display>(e: E) -> ConsensusError {
        ConsensusError::Fatal(e.to_string())
    }

    /// The leader as this node knows it, with its peer address.
    pub fn leader(&self) -> Option<(NodeId, String)> {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let l = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&l)
            .map(|n| n.peer_addr.clone())?;
        Some((l, addr))
    }

    /// Waits until some leader is known (elections take a few timeouts).
    async fn wait_leader(&self, deadline: Instant) -> Result<(NodeId, String), ConsensusError> {
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(ConsensusError::NoLeader { leader: None });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Proposes several writes on this node in one call to the Raft core (batched with
    /// whatever else is being proposed here); one result per write, in order.
    pub async fn write_local_many(&self, reqs: Vec<Request>) -> Vec<Forwarded<Response>> {
        self.proposer.propose(reqs).await
    }

    /// Proposes on this node only; `NotLeader` when it does not lead.
    pub async fn write_local(&self, req: Request) -> Forwarded<Response> {
        self.proposer
            .propose(vec![req])
            .await
            .pop()
            .unwrap_or_else(|| Forwarded::Failed("no result for the proposal".into()))
    }

    /// Commits a write through the leader, wherever it is.
    pub async fn write(&self, req: Request) -> Result<Response, ConsensusError> {
        let deadline = Instant::now() + self.write_timeout();
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let result = if leader == self.id {
                self.write_local(req.clone()).await
            } else {
                let left = deadline.saturating_duration_since(Instant::now());
                self.forwarder
                    .forward(&self.peers, &addr, req.clone(), left)
                    .await?
            };
            match result {
                Forwarded::Ok(r) => return Ok(r),
                Forwarded::Failed(m) => return Err(ConsensusError::Fatal(m)),
                Forwarded::NotLeader { leader: hint } => {
                    // Leadership moved between our look-up and the proposal: try again until the deadline.
                    if Instant::now() >= deadline {
                        return Err(ConsensusError::NoLeader { leader: hint });
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }
}
