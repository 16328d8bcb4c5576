//! Starting a new cluster lineage from a node's state (restore, DR promotion): a new cluster id,
//! the next revision epoch, a higher term, and this node as the only voter.
//!
//! Epochs: a new lineage starts at the next multiple of 2^40. A client that saw revisions of the
//! old lineage beyond what was saved (writes lost within the RPO) still never sees a revision go
//! backwards on the new one.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{LogStore, StateMachineStore, StorageError};
use crate::raft_types::{Entry, LogId, Membership, Node, Vote};

pub const EPOCH_BITS: u32 = 40;

/// The first index of the epoch after the one `index` is in.
pub fn next_epoch_start(index: u64) -> u64 {
    ((index >> EPOCH_BITS) + 1) << EPOCH_BITS
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct NewLineage {
    pub cluster_id: String,
    pub previous_cluster_id: String,
    /// The index the state was at (unchanged data).
    pub state_index: u64,
    /// The first log index of the new lineage (revisions continue from here).
    pub first_index: u64,
    pub epoch: u64,
    pub term: u64,
}

/// Turns the state in `sm` (with its log directory `log_dir`, which is rewritten) into the first
/// node of a new lineage. The node must not be running.
pub async fn start_new_lineage(
    sm: &StateMachineStore,
    log_dir: &Path,
    node_id: u64,
    node: Node,
) -> Result<NewLineage, StorageError> {
    let (applied, _) = sm.last_applied()?;
    let applied: LogId =
        applied.ok_or_else(|| StorageError::Lineage("the state machine is empty".into()))?;
    let previous = sm.cluster_id()?;
    let first = next_epoch_start(applied.index);
    let skip_to = LogId::new(applied.leader_id, first - 1);
    sm.rebase_applied(skip_to)?;
    let cluster_id =
        sm.new_lineage(format!("{previous}/{}/{node_id}", applied.index).as_bytes())?;
    let term = applied.leader_id.term + 1;
    let nodes: BTreeMap<u64, Node> = [(node_id, node)].into_iter().collect();
    let membership = Membership::new(vec![BTreeSet::from([node_id])], nodes)
        .map_err(|e| StorageError::Lineage(format!("membership: {e}")))?;
    let entry = Entry {
        log_id: openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId { term, node_id },
            first,
        ),
        payload: openraft::EntryPayload::Membership(membership),
    };
    LogStore::bootstrap_lineage(
        log_dir,
        skip_to,
        &entry,
        &Vote::new_committed(term, node_id),
    )?;
    // A snapshot at the new position, so nodes that join can be sent the state.
    sm.snapshot_now().await?;
    Ok(NewLineage {
        cluster_id,
        previous_cluster_id: previous,
        state_index: applied.index,
        first_index: first,
        epoch: first >> EPOCH_BITS,
        term,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epochs_advance() {
        assert_eq!(next_epoch_start(0), 1 << 40);
        assert_eq!(next_epoch_start(5), 1 << 40);
        assert_eq!(next_epoch_start((1 << 40) + 3), 2 << 40);
    }
}
