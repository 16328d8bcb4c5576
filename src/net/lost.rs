//! Detecting, on the leader, a member that lost log entries it had acknowledged.
//!
//! A member whose data directory was wiped or replaced and that starts again under its old id
//! answers the leader's appends with a conflict below what it acknowledged earlier. openraft
//! (`allow_log_reversion` off, as it must be) then stops replicating to it without a word: the
//! member stays a voter with an empty log, and the cluster silently tolerates one failure
//! fewer. (A member started with `initial_members` is refused at start instead, see
//! `server::refuse_lost_data`; this catches every other way back, such as a member added with
//! `add-learner`.)
//!
//! Within one leader's term a follower never drops an entry it acknowledged to that leader, so
//! such a conflict can only be lost data. The guard only observes: it says so at error level
//! and counts it in `metaraft_lost_data_detections_total`, at most once per [`REPORT_EVERY`]
//! per member, and leaves the answer to openraft as it was.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::Metrics;
use crate::raft_types::{NodeId, Vote};

/// A member that still lacks the entries is reported again after this long.
pub const REPORT_EVERY: Duration = Duration::from_secs(30);

/// When each member found to have lost data was last reported; shared by every replication
/// stream of this node.
#[derive(Default)]
pub struct LostMembers {
    marks: Mutex<HashMap<NodeId, Instant>>,
}

impl LostMembers {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Instant>> {
        self.marks.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One replication target's acknowledgements, as the leader's transport sees them.
#[derive(Clone)]
pub struct ReversionGuard {
    target: NodeId,
    /// The leader vote the requests carry, and the highest index acknowledged under it plus one
    /// (0: none yet). A new vote starts again from nothing: under another leader a follower may
    /// rightly have replaced entries it had acknowledged.
    acked: Arc<Mutex<(Option<Vote>, u64)>>,
    lost: Arc<LostMembers>,
    metrics: Arc<Metrics>,
}

impl ReversionGuard {
    pub fn new(target: NodeId, lost: Arc<LostMembers>, metrics: Arc<Metrics>) -> ReversionGuard {
        ReversionGuard {
            target,
            acked: Arc::new(Mutex::new((None, 0))),
            lost,
            metrics,
        }
    }

    fn acked(&self) -> std::sync::MutexGuard<'_, (Option<Vote>, u64)> {
        self.acked.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Called for every request sent to the target, before its answer can arrive.
    pub fn sending(&self, vote: &Vote) {
        let mut a = self.acked();
        if a.0.as_ref() != Some(vote) {
            *a = (Some(*vote), 0);
        }
    }

    /// The target acknowledged every entry up to `index`.
    pub fn acknowledged(&self, index: u64) {
        let mut a = self.acked();
        a.1 = a.1.max(index + 1);
    }

    /// The target lacks the entry at `index`. True when it had acknowledged that entry, or a
    /// later one, to this leader: it lost data (reported here).
    pub fn conflict(&self, index: u64) -> bool {
        let acked = self.acked().1;
        if acked == 0 || index >= acked {
            return false;
        }
        // Heartbeats meet the same gap ten times a second.
        let mut marks = self.lost.lock();
        if marks
            .get(&self.target)
            .is_none_or(|at| at.elapsed() >= REPORT_EVERY)
        {
            marks.insert(self.target, Instant::now());
            self.metrics
                .lost_data_detections
                .fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                node = self.target,
                index,
                acked = acked - 1,
                "node {t} lost log entries it had acknowledged: it lacks entry {index} but had \
                 acknowledged up to {last}; its data directory was wiped or replaced. It still \
                 counts as a voter but receives nothing. Remove it (`metaraft cluster remove {t}`) \
                 and add it back under a new id (docs/operations.md, \"A node lost its data\")",
                t = self.target,
                last = acked - 1,
            );
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vote(term: u64) -> Vote {
        Vote::new_committed(term, 1)
    }

    #[test]
    fn a_conflict_below_what_was_acknowledged_is_lost_data_reported_every_30_s() {
        let metrics = Arc::new(Metrics::default());
        let lost = Arc::new(LostMembers::default());
        let g = ReversionGuard::new(4, lost.clone(), metrics.clone());
        let reported = || metrics.lost_data_detections.load(Ordering::Relaxed);
        g.sending(&vote(2));
        // Before any acknowledgement, conflicts are the normal search for a common prefix.
        assert!(!g.conflict(50));
        g.acknowledged(24);
        // At or past the next index: normal.
        assert!(!g.conflict(25));
        assert!(!g.conflict(30));
        assert_eq!(reported(), 0);
        // It lacks entry 24 (or anything before), which it acknowledged: lost, reported once.
        assert!(g.conflict(24));
        assert!(g.conflict(0));
        assert_eq!(reported(), 1);
        // Any stream to that member shares the report; another member is its own.
        let again = ReversionGuard::new(4, lost.clone(), metrics.clone());
        again.sending(&vote(2));
        again.acknowledged(10);
        assert!(again.conflict(3));
        assert_eq!(reported(), 1);
        let other = ReversionGuard::new(5, lost.clone(), metrics.clone());
        other.sending(&vote(2));
        other.acknowledged(10);
        assert!(other.conflict(3));
        assert_eq!(reported(), 2);
        // Reported again once the interval passed.
        lost.lock()
            .insert(4, Instant::now() - REPORT_EVERY - Duration::from_secs(1));
        assert!(g.conflict(10));
        assert_eq!(reported(), 3);
    }

    #[test]
    fn a_new_leader_vote_forgets_earlier_acknowledgements() {
        let g = ReversionGuard::new(
            2,
            Arc::new(LostMembers::default()),
            Arc::new(Metrics::default()),
        );
        g.sending(&vote(2));
        g.acknowledged(100);
        g.sending(&vote(2));
        assert!(g.conflict(90), "same vote: remembered");
        let g = ReversionGuard::new(
            2,
            Arc::new(LostMembers::default()),
            Arc::new(Metrics::default()),
        );
        g.sending(&vote(2));
        g.acknowledged(100);
        // A later term of this node's leadership: the follower may have replaced uncommitted
        // entries under another leader in between.
        g.sending(&vote(3));
        assert!(!g.conflict(90));
    }
}
