//! Consensus: the openraft handle and everything that needs the leader.
//!
//! - Writes: proposed locally when this node leads, otherwise forwarded over the peer transport
//!   to the leader (one hop; the leader never forwards again).
//! - Reads: LINEARIZABLE asks the leader for a read index (ReadIndex: a heartbeat round confirms
//!   leadership), then waits until this node applied it; SESSION waits for a revision; STALE reads
//!   locally, bounded by a maximum lag behind the known commit index.
//! - Membership: add learner, promote, remove, transfer leadership (forwarded to the leader).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::{ChangeMembers, ReadPolicy, ServerState};
use serde::{Deserialize, Serialize};

use crate::config::Config;
use crate::fsm::{Request, Response};
use crate::metrics::Metrics;
use crate::net::{NetError, PeerPool};
use crate::raft_types::{Node, NodeId, TypeConfig};
use crate::storage::StateMachineStore;

pub mod batch;

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
    Forward(#[from] NetError),
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

pub struct Consensus {
    pub id: NodeId,
    pub raft: Raft,
    pub sm: StateMachineStore,
    pub pool: Arc<PeerPool>,
    pub metrics: Arc<Metrics>,
    pub config: Config,
    /// This node is a DR replica (a permanent learner; see `dr_promote`).
    pub dr_replica: bool,
    /// Set by a DR promotion request: the serve loop stops the node, converts its data into a
    /// new lineage, and starts it again.
    pub promote_requested: tokio::sync::watch::Sender<bool>,
    /// Coalesces read-index rounds served by this node as leader (local reads and followers' RPCs).
    pub leader_reads: Arc<batch::ReadBatcher>,
    /// Coalesces read-index requests this node makes (to itself or to the leader).
    pub reads: Arc<batch::ReadBatcher>,
    /// Coalesces the LEASE-read index requests this node makes, likewise.
    pub lease_reads: Arc<batch::ReadBatcher>,
    /// Batches the writes this node forwards to the leader.
    pub forwarder: Arc<batch::ForwardBatcher>,
    /// Hands this node's writes (as leader) to the Raft core in batches; stamps meta commands.
    pub proposer: Arc<batch::Proposer>,
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
                    .forward(&self.pool, &addr, req.clone(), left)
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

    /// Leader only: confirms leadership with a quorum and returns the index reads must wait for.
    pub async fn read_index_local(self: &Arc<Self>) -> Result<u64, ConsensusError> {
        let me = self.clone();
        self.leader_reads
            .read(move || {
                let me = me.clone();
                async move { me.read_index_round().await }
            })
            .await
    }

    /// One ReadIndex round on the leader: confirm leadership with a quorum.
    async fn read_index_round(&self) -> Result<u64, ConsensusError> {
        self.read_round(ReadPolicy::ReadIndex).await
    }

    /// Leader only: the index a LEASE read must wait for, vouched for by the leader lease.
    pub async fn lease_index_local(&self) -> Result<u64, ConsensusError> {
        self.read_round(ReadPolicy::LeaseRead).await
    }

    async fn read_round(&self, policy: ReadPolicy) -> Result<u64, ConsensusError> {
        let r = tokio::time::timeout(self.write_timeout(), self.raft.ensure_linearizable(policy))
            .await
            .map_err(|_| ConsensusError::Timeout("read index".into()))?;
        match r {
            Ok(id) => Ok(id.index()),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Err(ConsensusError::NoLeader {
                    leader: f.leader_id,
                }),
                None => Err(Self::fatal(e)),
            },
        }
    }

    /// Read index from the leader (local or remote).
    pub async fn read_index(self: &Arc<Self>) -> Result<u64, ConsensusError> {
        let me = self.clone();
        self.reads
            .read(move || {
                let me = me.clone();
                async move { me.read_index_uncoalesced(false).await }
            })
            .await
    }

    /// LEASE read barrier: the leader's lease-vouched index (asked of the leader by followers,
    /// one request per read), then wait until this node applied it.
    pub async fn lease_barrier(self: &Arc<Self>) -> Result<u64, ConsensusError> {
        let me = self.clone();
        let idx = self
            .lease_reads
            .read(move || {
                let me = me.clone();
                async move { me.read_index_uncoalesced(true).await }
            })
            .await?;
        self.wait_applied(idx).await
    }

    async fn read_index_uncoalesced(self: &Arc<Self>, lease: bool) -> Result<u64, ConsensusError> {
        let deadline = Instant::now() + self.write_timeout();
        loop {
            let (leader, addr) = self.wait_leader(deadline).await?;
            let r = if leader == self.id {
                if lease {
                    self.lease_index_local().await
                } else {
                    self.read_index_local().await
                }
            } else {
                let mut c = self.pool.client(&addr)?;
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(
                    left,
                    c.read_index(crate::pb::peer::ReadIndexRequest { lease }),
                )
                .await
                {
                    Err(_) => Err(ConsensusError::Timeout("read index from leader".into())),
                    Ok(Ok(r)) => Ok(r.into_inner().index),
                    Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                        Err(ConsensusError::NoLeader {
                            leader: Some(leader),
                        })
                    }
                    Ok(Err(s)) => Err(crate::net::status_to_net(&addr, s).into()),
                }
            };
            match r {
                Err(ConsensusError::NoLeader { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                other => return other,
            }
        }
    }

    /// Waits until this node applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<u64, ConsensusError> {
        let t = Duration::from_millis(self.config.limits.read_wait_ms);
        self.sm.wait_applied(index, t).await.map_err(|applied| {
            ConsensusError::Timeout(format!(
                "waiting to apply index {index} (applied {applied})"
            ))
        })
    }

    /// Linearizable read barrier: after it returns, local state reflects every write acknowledged
    /// before the call began.
    pub async fn linearizable_barrier(self: &Arc<Self>) -> Result<u64, ConsensusError> {
        let idx = self.read_index().await?;
        self.wait_applied(idx).await
    }

    /// STALE read check against the commit index this node knows.
    pub fn check_stale(&self, max_lag: u64) -> Result<u64, ConsensusError> {
        let applied = self.sm.applied_index();
        if max_lag > 0 {
            let committed = self
                .raft
                .metrics()
                .borrow_watched()
                .cluster_committed
                .map(|l| l.index)
                .unwrap_or(0);
            let lag = committed.saturating_sub(applied);
            if lag > max_lag {
                return Err(ConsensusError::TooStale { lag, max_lag });
            }
        }
        Ok(applied)
    }

    fn membership_view(&self, revision: u64) -> MembershipView {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        MembershipView {
            revision,
            voters: voters.iter().copied().collect(),
            learners: mem
                .nodes()
                .map(|(id, _)| *id)
                .filter(|id| !voters.contains(id))
                .collect(),
        }
    }

    /// Runs a membership change on this node (must be the leader).
    pub async fn admin_local(&self, req: AdminRequest) -> Forwarded<MembershipView> {
        let r = match req {
            AdminRequest::AddLearner { id, node } => self
                .raft
                .add_learner(id, node, true)
                .await
                .map(|r| r.log_id.index),
            AdminRequest::Promote { id } => {
                if let Err(why) = self.check_promotable(id).await {
                    return Forwarded::Failed(why);
                }
                let ids: BTreeSet<NodeId> = [id].into();
                self.raft
                    .change_membership(ChangeMembers::AddVoterIds(ids), false)
                    .await
                    .map(|r| r.log_id.index)
            }
            AdminRequest::Remove { id } => {
                let is_voter = self.raft.voter_ids().any(|v| v == id);
                let ids: BTreeSet<NodeId> = [id].into();
                if is_voter {
                    match self
                        .raft
                        .change_membership(ChangeMembers::RemoveVoters(ids.clone()), false)
                        .await
                    {
                        Ok(_) => self
                            .raft
                            .change_membership(ChangeMembers::RemoveNodes(ids), false)
                            .await
                            .map(|r| r.log_id.index),
                        Err(e) => Err(e),
                    }
                } else {
                    self.raft
                        .change_membership(ChangeMembers::RemoveNodes(ids), false)
                        .await
                        .map(|r| r.log_id.index)
                }
            }
            AdminRequest::TransferLeader { id } => {
                if !self.raft.voter_ids().any(|v| v == id) {
                    return Forwarded::Failed(format!("node {id} is not a voter"));
                }
                if let Err(e) = self.raft.trigger().transfer_leader(id).await {
                    return Forwarded::Failed(e.to_string());
                }
                let deadline = Instant::now() + self.write_timeout();
                while Instant::now() < deadline {
                    if self.raft.metrics().borrow_watched().current_leader == Some(id) {
                        return Forwarded::Ok(self.membership_view(self.sm.applied_index()));
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return Forwarded::Failed(format!(
                    "node {id} did not take over leadership in time"
                ));
            }
        };
        match r {
            Ok(rev) => Forwarded::Ok(self.membership_view(rev)),
            Err(e) => match e.forward_to_leader() {
                Some(f) => Forwarded::NotLeader {
                    leader: f.leader_id,
                },
                None => Forwarded::Failed(e.to_string()),
            },
        }
    }

    /// A DR replica is never made a voter by the cluster: it is asked, and one that cannot be
    /// asked is not promoted either.
    async fn check_promotable(&self, id: NodeId) -> Result<(), String> {
        let addr = {
            let m = self.raft.metrics();
            let m = m.borrow_watched();
            m.membership_config
                .membership()
                .get_node(&id)
                .map(|n| n.peer_addr.clone())
        };
        let Some(addr) = addr else {
            return Err(format!(
                "node {id} is not a member; add it as a learner first"
            ));
        };
        let mut c = self.pool.client(&addr).map_err(|e| e.to_string())?;
        let req = crate::pb::peer::NodeStatusRequest { with_hash: false };
        match tokio::time::timeout(Duration::from_secs(3), c.node_status(req)).await {
            Ok(Ok(s)) if s.get_ref().dr_replica => Err(format!(
                "node {id} is a DR replica: it never becomes a voter of this cluster (promote \
                 it on its own with `metaraft dr promote` after losing the primary site)"
            )),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(s)) => Err(format!(
                "cannot confirm node {id} is not a DR replica: {}",
                s.message()
            )),
            Err(_) => Err(format!(
                "cannot confirm node {id} is not a DR replica: no answer from {addr}"
            )),
        }
    }

    /// Called for every replication request a leader sends this node.
    pub fn note_replication(&self, entries: usize, bytes: usize) {
        let m = &self.metrics;
        m.last_leader_contact_ms
            .store(crate::metrics::now_unix_ms(), Ordering::Relaxed);
        if entries > 0 {
            m.replicated_entries
                .fetch_add(entries as u64, Ordering::Relaxed);
            m.replicated_bytes
                .fetch_add(bytes as u64, Ordering::Relaxed);
        }
    }

    /// How far this node (a DR replica, usually) is behind the primary.
    pub fn dr_status(&self) -> crate::pb::DrStatusResponse {
        let s = self.local_status();
        let m = &self.metrics;
        let now = crate::metrics::now_unix_ms();
        let lag = s.commit_index.saturating_sub(s.applied_index);
        let entries = m.replicated_entries.load(Ordering::Relaxed);
        let bytes = m.replicated_bytes.load(Ordering::Relaxed);
        let caught = m.caught_up_at_ms.load(Ordering::Relaxed);
        crate::pb::DrStatusResponse {
            node_id: self.id,
            dr_replica: self.dr_replica,
            cluster_id: self.sm.cluster_id().unwrap_or_default(),
            leader: s.leader,
            term: s.term,
            known_commit_index: s.commit_index,
            applied_index: s.applied_index,
            lag_entries: lag,
            lag_bytes: bytes.checked_div(entries).map(|avg| lag * avg).unwrap_or(0),
            lag_ms: if lag == 0 || caught == 0 {
                0
            } else {
                now.saturating_sub(caught)
            },
            last_contact_ms_ago: m.leader_contact_age_ms(now).unwrap_or(0),
            snapshots_received: m.snapshots_received.load(Ordering::Relaxed),
            role: s.role.to_string(),
        }
    }

    pub async fn admin(&self, req: AdminRequest) -> Result<MembershipView, ConsensusError> {
        let deadline = Instant::now() + self.write_timeout();
        let (leader, addr) = self.wait_leader(deadline).await?;
        let r = if leader == self.id {
            self.admin_local(req).await
        } else {
            // Membership changes wait for learners to catch up: allow the full write timeout.
            self.pool
                .call_blob(
                    &addr,
                    self.write_timeout() * 3,
                    &req,
                    |mut c, b| async move { c.admin(b).await },
                )
                .await?
        };
        match r {
            Forwarded::Ok(v) => Ok(v),
            Forwarded::NotLeader { leader } => Err(ConsensusError::NoLeader { leader }),
            Forwarded::Failed(m) => Err(ConsensusError::Membership(m)),
        }
    }

    pub fn local_status(&self) -> LocalStatus {
        let m = self.raft.metrics();
        let m = m.borrow_watched();
        let mem = m.membership_config.membership();
        let voters: BTreeSet<NodeId> = mem.voter_ids().collect();
        LocalStatus {
            node_id: self.id,
            role: role_name(m.state),
            term: m.current_term,
            last_log_index: m.last_log_index.unwrap_or(0),
            commit_index: m.cluster_committed.map(|l| l.index).unwrap_or(0),
            applied_index: self.sm.applied_index(),
            leader: m.current_leader,
            members: mem
                .nodes()
                .map(|(id, n)| (*id, (n.clone(), voters.contains(id))))
                .collect(),
            replication: m
                .replication
                .as_ref()
                .map(|r| {
                    r.iter()
                        .map(|(id, l)| (*id, l.map(|l| l.index).unwrap_or(0)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// Keeps the Prometheus gauges in step with Raft metrics, and stops the process if the Raft
    /// core died (openraft returns `Fatal` forever after a panic or a storage error).
    pub fn spawn_watchers(self: &Arc<Self>, shutdown: tokio::sync::watch::Receiver<bool>) {
        let me = self.clone();
        tokio::spawn(async move {
            let mut rx = me.raft.metrics();
            let mut last_leader = None;
            loop {
                let (fatal, leader) = {
                    let m = rx.borrow_and_update();
                    me.metrics.term.store(m.current_term, Ordering::Relaxed);
                    me.metrics.commit_index.store(
                        m.cluster_committed.map(|l| l.index).unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    me.metrics.applied_index.store(
                        m.last_applied.map(|l| l.index).unwrap_or(0),
                        Ordering::Relaxed,
                    );
                    let applied = m.last_applied.map(|l| l.index).unwrap_or(0);
                    let commit = m.cluster_committed.map(|l| l.index).unwrap_or(0);
                    if applied >= commit {
                        me.metrics
                            .caught_up_at_ms
                            .store(crate::metrics::now_unix_ms(), Ordering::Relaxed);
                    }
                    me.metrics
                        .last_log_index
                        .store(m.last_log_index.unwrap_or(0), Ordering::Relaxed);
                    me.metrics
                        .is_leader
                        .store(u64::from(m.state == ServerState::Leader), Ordering::Relaxed);
                    // A lone voter is its own quorum: nothing to wait for, nothing to report.
                    let acked_at = match (&m.last_quorum_acked, m.state) {
                        (Some(t), ServerState::Leader)
                            if m.membership_config
                                .membership()
                                .voter_ids()
                                .nth(1)
                                .is_some() =>
                        {
                            let age = u64::try_from(openraft::Instant::elapsed(&**t).as_millis())
                                .unwrap_or(u64::MAX);
                            crate::metrics::now_unix_ms().saturating_sub(age)
                        }
                        _ => 0,
                    };
                    me.metrics
                        .quorum_acked_at_ms
                        .store(acked_at, Ordering::Relaxed);
                    (m.running_state.clone().err(), m.current_leader)
                };
                if leader != last_leader {
                    if leader.is_some() {
                        me.metrics.leader_changes.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::info!(node = me.id, leader = ?leader, "leader changed");
                    last_leader = leader;
                }
                if let Some(f) = fatal {
                    if !*shutdown.borrow() {
                        tracing::error!(node = me.id, error = %f, "raft core stopped; exiting so the supervisor restarts this node");
                        std::process::exit(70);
                    }
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        });
    }
}
