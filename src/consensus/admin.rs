//! Membership changes: run on the leader, forwarded to it from any other member.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use openraft::async_runtime::WatchReceiver;
use openraft::ChangeMembers;

use super::{AdminRequest, Consensus, ConsensusError, Forwarded, MembershipView, PeerError};
use crate::raft_types::NodeId;

impl Consensus {
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
        match self
            .peers
            .is_dr_replica(&addr, Duration::from_secs(3))
            .await
        {
            Ok(true) => Err(format!(
                "node {id} is a DR replica: it never becomes a voter of this cluster (promote \
                 it on its own with `metaraft dr promote` after losing the primary site)"
            )),
            Ok(false) => Ok(()),
            Err(PeerError::Timeout { .. }) => Err(format!(
                "cannot confirm node {id} is not a DR replica: no answer from {addr}"
            )),
            Err(PeerError::Refused { message, .. }) => Err(format!(
                "cannot confirm node {id} is not a DR replica: {message}"
            )),
            Err(e) => Err(e.to_string()),
        }
    }

    pub async fn admin(&self, req: AdminRequest) -> Result<MembershipView, ConsensusError> {
        let deadline = Instant::now() + self.write_timeout();
        let (leader, addr) = self.wait_leader(deadline).await?;
        let r = if leader == self.id {
            self.admin_local(req).await
        } else {
            // Membership changes wait for learners to catch up: allow the full write timeout.
            self.peers
                .admin(&addr, req, self.write_timeout() * 3)
                .await?
        };
        match r {
            Forwarded::Ok(v) => Ok(v),
            Forwarded::NotLeader { leader } => Err(ConsensusError::NoLeader { leader }),
            Forwarded::Failed(m) => Err(ConsensusError::Membership(m)),
        }
    }
}
