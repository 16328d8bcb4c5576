//! Read barriers (LINEARIZABLE, SESSION, STALE, LEASE) and the [`Reader`] a read goes through:
//! one call makes the local state fresh enough, and the data and the index reported with it then
//! come from the same place.

use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ReadPolicy;

use super::{Consensus, ConsensusError, Forwarded, PeerError};
use crate::fsm::meta::rbac::RbacIndex;
use crate::storage::{SnapshotView, StateMachineStore, StorageError, StoredValue};

/// How fresh a read must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Consistency {
    /// Reflects every write acknowledged before the read began (a read index from the leader).
    Linearizable,
    /// At least this revision (read-your-writes for a client that saw it).
    Session { min_revision: u64 },
    /// Whatever this node has, refused when it lags the commit index it knows by more than
    /// `max_lag` entries (0: no bound).
    Stale { max_lag: u64 },
    /// Like linearizable, vouched for by the leader's lease instead of a heartbeat round.
    Lease,
}

/// This node's state, fresh enough for the consistency a read asked for. Every index it reports
/// is the one its data was read at, never below the barrier the read waited for.
#[derive(Clone)]
pub struct Reader {
    sm: StateMachineStore,
    barrier: u64,
}

impl Reader {
    /// The index the read waited for.
    pub fn barrier(&self) -> u64 {
        self.barrier
    }

    /// Runs `f` over one consistent snapshot; returns its result and the index it read at.
    pub fn view<T>(
        &self,
        f: impl FnOnce(&SnapshotView<'_>) -> T,
    ) -> Result<(T, u64), StorageError> {
        let barrier = self.barrier;
        self.sm.read_view(|v| (f(v), v.applied.max(barrier)))
    }

    /// [`Reader::view`] with the RBAC index, brought up to date first.
    pub fn with_rbac<T>(
        &self,
        f: impl FnOnce(&RbacIndex, &SnapshotView<'_>) -> T,
    ) -> Result<(T, u64), StorageError> {
        let barrier = self.barrier;
        self.sm
            .with_rbac(|ix, v| (f(ix, v), v.applied.max(barrier)))
    }

    /// One key's value, and the index it was read at.
    pub fn get(&self, key: &[u8]) -> Result<(Option<StoredValue>, u64), StorageError> {
        let (v, applied) = self.sm.get(key)?;
        Ok((v, applied.max(self.barrier)))
    }

    /// Up to `limit` values under `prefix` after `after` (blocking: call it off the runtime's
    /// threads), whether more follow, and the index they were read at.
    pub fn range(
        &self,
        prefix: &[u8],
        after: &[u8],
        limit: usize,
    ) -> Result<(Vec<StoredValue>, bool, u64), StorageError> {
        let (vals, more, applied) = self.sm.range(prefix, after, limit)?;
        Ok((vals, more, applied.max(self.barrier)))
    }
}

impl Consensus {
    /// Makes the local state fresh enough for `consistency` and returns the reader to read it
    /// through.
    pub async fn read(
        self: &Arc<Self>,
        consistency: Consistency,
    ) -> Result<Reader, ConsensusError> {
        let barrier = match consistency {
            Consistency::Linearizable => self.linearizable_barrier().await?,
            Consistency::Session { min_revision } => self.wait_applied(min_revision).await?,
            Consistency::Stale { max_lag } => self.check_stale(max_lag)?,
            Consistency::Lease => self.lease_barrier().await?,
        };
        Ok(Reader {
            sm: self.sm.clone(),
            barrier,
        })
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
    async fn read_index(self: &Arc<Self>) -> Result<u64, ConsensusError> {
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
    async fn lease_barrier(self: &Arc<Self>) -> Result<u64, ConsensusError> {
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
                let left = deadline.saturating_duration_since(Instant::now());
                match self.peers.read_index(&addr, lease, left).await {
                    Err(PeerError::Timeout { .. }) => {
                        Err(ConsensusError::Timeout("read index from leader".into()))
                    }
                    Err(e) => Err(e.into()),
                    Ok(Forwarded::Ok(index)) => Ok(index),
                    Ok(Forwarded::NotLeader { .. }) => Err(ConsensusError::NoLeader {
                        leader: Some(leader),
                    }),
                    Ok(Forwarded::Failed(m)) => Err(ConsensusError::Fatal(m)),
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
    async fn wait_applied(&self, index: u64) -> Result<u64, ConsensusError> {
        let t = Duration::from_millis(self.config.limits.read_wait_ms);
        self.sm.wait_applied(index, t).await.map_err(|applied| {
            ConsensusError::Timeout(format!(
                "waiting to apply index {index} (applied {applied})"
            ))
        })
    }

    /// Linearizable read barrier: after it returns, local state reflects every write acknowledged
    /// before the call began.
    async fn linearizable_barrier(self: &Arc<Self>) -> Result<u64, ConsensusError> {
        let idx = self.read_index().await?;
        self.wait_applied(idx).await
    }

    /// STALE read check against the commit index this node knows.
    fn check_stale(&self, max_lag: u64) -> Result<u64, ConsensusError> {
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
}
