//! Folding the leader's commit-only appends into the appends that follow them.
//!
//! After every commit openraft's replication stream sends each follower an AppendEntries with no
//! entries, only the new commit index (the core's `ReplicateCommitted`; alpha.37 has no setting
//! for it). Under write load that was about 1,200 messages a second on a 3-node cluster, nearly
//! half of all appends, each costing both ends a decode, a pass through the Raft core and an
//! answer. Yet the next append with entries, usually a fraction of a millisecond later, carries
//! the same commit index or a later one.
//!
//! [`fold_commit_only`] holds such an entry-less request for at most `hold` and drops it when
//! the next request continues from the same place (same leader vote, same `prev_log_id`): that
//! request says everything it said. Otherwise the held request goes out as it was, first, so the
//! order never changes. openraft acknowledges cumulatively (its in-flight queue drains every
//! request up to the matching log id an answer names), so one answer covers both.
//!
//! The input is never polled after it ended: openraft's request stream is an `unfold` that
//! panics when polled again, and a held request is released exactly when the input ends, so the
//! next poll would otherwise reach the ended input (a panic on every step-down, transfer and
//! unreachable peer, in the HTTP/2 body task).
//!
//! The cost: under write load a follower learns a commit up to `hold` later (tokio's timer
//! rounds up to its 1 ms tick). Heartbeats are separate one-request streams and never wait: a
//! stream that ends releases what it holds at once.

use std::time::Duration;

use futures::{Stream, StreamExt};
use openraft::raft::AppendEntriesRequest;

use crate::raft_types::TypeConfig;

type Req = AppendEntriesRequest<TypeConfig>;

/// How long a commit-only append may wait for one it can fold into.
pub const COMMIT_HOLD: Duration = Duration::from_micros(300);

/// `input` with entry-less requests folded into the next request when it continues from the
/// same place and arrives within `hold` (see the module docs).
pub fn fold_commit_only<S>(input: S, hold: Duration) -> impl Stream<Item = Req> + Send + 'static
where
    S: Stream<Item = Req> + Send + Unpin + 'static,
{
    // Fused: once the input has ended it answers `None` without being polled again.
    let input = input.fuse();
    // (input, the held entry-less request, a request taken while holding that goes next)
    futures::stream::unfold(
        (input, None::<Req>, None::<Req>),
        move |(mut input, mut held, mut ready)| async move {
            loop {
                let next = match (ready.take(), &held) {
                    (Some(r), _) => Some(r),
                    (None, None) => Some(input.next().await?),
                    // Polling `next()` again later resumes the same pending request: openraft's
                    // request stream keeps its own state, so a timeout loses nothing.
                    (None, Some(_)) => tokio::time::timeout(hold, input.next())
                        .await
                        .ok()
                        .flatten(),
                };
                match (held.take(), next) {
                    (None, None) => return None,
                    (Some(h), None) => return Some((h, (input, None, None))),
                    (None, Some(n)) if n.entries.is_empty() => held = Some(n),
                    (None, Some(n)) => return Some((n, (input, None, None))),
                    (Some(h), Some(n)) if n.vote == h.vote && n.prev_log_id == h.prev_log_id => {
                        // `n` carries a commit index at least as new: `h` adds nothing.
                        ready = Some(n);
                    }
                    (Some(h), Some(n)) => return Some((h, (input, None, Some(n)))),
                }
            }
        },
    )
    // And so is the output, for whoever polls it after its end.
    .fuse()
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::raft_types::{Entry, LogId, Vote};

    fn log_id(index: u64) -> LogId {
        openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        )
    }

    /// An append after `prev` carrying entries `prev+1..=last` (none when equal), commit `commit`.
    fn req(prev: u64, last: u64, commit: u64) -> Req {
        AppendEntriesRequest {
            vote: Vote::new_committed(1, 1),
            prev_log_id: Some(log_id(prev)),
            leader_commit: Some(log_id(commit)),
            entries: (prev + 1..=last)
                .map(|i| Entry {
                    log_id: log_id(i),
                    payload: openraft::EntryPayload::Blank,
                })
                .collect(),
        }
    }

    fn shape(r: &Req) -> (u64, usize, u64) {
        (
            r.prev_log_id.map(|l| l.index).unwrap_or(0),
            r.entries.len(),
            r.leader_commit.map(|l| l.index).unwrap_or(0),
        )
    }

    /// Sends `reqs` with the given pauses before each, collects what the fold emits.
    async fn run(reqs: Vec<(u64, Req)>, hold: Duration) -> Vec<(u64, usize, u64)> {
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            for (pause_ms, r) in reqs {
                tokio::time::sleep(Duration::from_millis(pause_ms)).await;
                if tx.send(r).await.is_err() {
                    return;
                }
            }
        });
        let input = tokio_stream::wrappers::ReceiverStream::new(rx);
        fold_commit_only(input, hold)
            .map(|r| shape(&r))
            .collect()
            .await
    }

    #[tokio::test]
    async fn a_commit_only_append_folds_into_the_next_one_from_the_same_place() {
        let hold = Duration::from_millis(200);
        let out = run(vec![(0, req(10, 10, 10)), (20, req(10, 15, 10))], hold).await;
        assert_eq!(out, vec![(10, 5, 10)]);
        // Several in a row fold into the last, which carries the newest commit.
        let out = run(
            vec![
                (0, req(10, 10, 8)),
                (5, req(10, 10, 10)),
                (5, req(10, 12, 10)),
            ],
            hold,
        )
        .await;
        assert_eq!(out, vec![(10, 2, 10)]);
    }

    #[tokio::test]
    async fn anything_else_goes_out_unchanged_and_in_order() {
        let hold = Duration::from_millis(200);
        // Entries first: never held.
        let out = run(vec![(0, req(10, 12, 9)), (0, req(12, 14, 10))], hold).await;
        assert_eq!(out, vec![(10, 2, 9), (12, 2, 10)]);
        // A commit-only append followed by one from elsewhere: both, the held one first.
        let out = run(vec![(0, req(10, 10, 10)), (0, req(12, 14, 10))], hold).await;
        assert_eq!(out, vec![(10, 0, 10), (12, 2, 10)]);
        // A commit-only append that nothing follows goes out when the stream ends...
        let out = run(vec![(0, req(10, 10, 10))], hold).await;
        assert_eq!(out, vec![(10, 0, 10)]);
        // ...or when the hold runs out, before what comes later.
        let out = run(vec![(0, req(10, 10, 10)), (400, req(10, 11, 11))], hold).await;
        assert_eq!(out, vec![(10, 0, 10), (10, 1, 11)]);
    }

    #[tokio::test]
    async fn a_one_request_stream_such_as_a_heartbeat_never_waits() {
        let start = Instant::now();
        let out: Vec<Req> = fold_commit_only(
            futures::stream::iter(vec![req(10, 10, 10)]),
            Duration::from_secs(5),
        )
        .collect()
        .await;
        assert_eq!(out.len(), 1);
        assert!(start.elapsed() < Duration::from_secs(1));
    }

    /// Panics when polled after it ended, as openraft's request stream (an `unfold`) does.
    struct StrictEnd<S> {
        inner: S,
        ended: bool,
    }

    impl<S: Stream + Unpin> Stream for StrictEnd<S> {
        type Item = S::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<S::Item>> {
            assert!(!self.ended, "polled after it returned Ready(None)");
            let r = std::pin::Pin::new(&mut self.inner).poll_next(cx);
            if let std::task::Poll::Ready(None) = r {
                self.ended = true;
            }
            r
        }
    }

    fn strict(reqs: Vec<Req>) -> StrictEnd<futures::stream::Iter<std::vec::IntoIter<Req>>> {
        StrictEnd {
            inner: futures::stream::iter(reqs),
            ended: false,
        }
    }

    #[tokio::test]
    async fn an_input_that_ended_is_never_polled_again() {
        let hold = Duration::from_secs(5);
        // The input ends while a commit-only append is held: it goes out, then the fold ends.
        for reqs in [
            vec![req(10, 10, 10)],
            vec![req(10, 12, 9), req(12, 12, 12)],
            vec![req(10, 10, 10), req(10, 10, 11)],
            vec![req(10, 10, 10), req(11, 12, 12)],
            vec![],
        ] {
            let n = reqs.len();
            let out: Vec<Req> = fold_commit_only(strict(reqs), hold).collect().await;
            assert!(out.len() <= n.max(1));
        }
        // Polling the fold itself after its end stays harmless.
        let mut out = Box::pin(fold_commit_only(strict(vec![req(10, 10, 10)]), hold));
        assert!(out.next().await.is_some());
        assert!(out.next().await.is_none());
        assert!(out.next().await.is_none());
    }

    #[tokio::test]
    async fn a_replication_stream_ending_mid_hold_through_a_chain_does_not_panic() {
        // What `stream_append` builds: the first request taken out, chained before the rest.
        let rest = strict(vec![req(10, 10, 10)]);
        let input = futures::stream::iter(Some(req(9, 10, 9))).chain(rest);
        let out: Vec<_> = fold_commit_only(input, Duration::from_secs(5))
            .map(|r| shape(&r))
            .collect()
            .await;
        assert_eq!(out, vec![(9, 1, 9), (10, 0, 10)]);
    }

    #[tokio::test]
    async fn a_held_append_goes_out_within_the_hold() {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(req(10, 10, 10)).await.expect("send");
        let mut out = Box::pin(fold_commit_only(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            Duration::from_millis(50),
        ));
        let start = Instant::now();
        let first = out.next().await.expect("released");
        assert_eq!(shape(&first), (10, 0, 10));
        assert!(start.elapsed() < Duration::from_secs(2));
        drop(tx);
        assert!(out.next().await.is_none());
    }
}
