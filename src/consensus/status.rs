//! What this node reports about itself: its status, its DR lag, and the metrics kept in step
//! with the Raft core (which also stops the process if the core dies).

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::async_runtime::WatchReceiver;
use openraft::ServerState;

use super::{role_name, Consensus, LocalStatus};
use crate::raft_types::NodeId;

/// How far this node is behind the primary, as `dr status` shows it.
#[derive(Debug, Clone, Default)]
pub struct DrStatus {
    pub node_id: NodeId,
    pub dr_replica: bool,
    pub cluster_id: String,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub known_commit_index: u64,
    pub applied_index: u64,
    pub lag_entries: u64,
    pub lag_bytes: u64,
    pub lag_ms: u64,
    pub last_contact_ms_ago: u64,
    pub snapshots_received: u64,
    pub role: &'static str,
}

impl Consensus {
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
    pub fn dr_status(&self) -> DrStatus {
        let s = self.local_status();
        let m = &self.metrics;
        let now = crate::metrics::now_unix_ms();
        let lag = s.commit_index.saturating_sub(s.applied_index);
        let entries = m.replicated_entries.load(Ordering::Relaxed);
        let bytes = m.replicated_bytes.load(Ordering::Relaxed);
        let caught = m.caught_up_at_ms.load(Ordering::Relaxed);
        DrStatus {
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
            role: s.role,
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
