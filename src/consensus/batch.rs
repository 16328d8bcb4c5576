//! Coalescing of the work a node sends to the leader.
//!
//! - [`ReadBatcher`]: concurrent linearizable reads share one read-index round. A read that
//!   arrives while a round is in flight waits for the *next* round, which starts after it
//!   arrived, so every read still sees every write acknowledged before it began. One round per
//!   batch instead of one per read cuts heartbeats on the leader and RPCs from followers.
//! - [`ForwardBatcher`]: writes a follower forwards travel to the leader several per RPC and are
//!   proposed there in one call, so the leader's per-request gRPC and Raft-core costs are paid
//!   per batch. Each write still gets its own result; nothing is merged.
//! - [`Proposer`]: on the leader, every write (its own clients' and every forwarded batch) is
//!   handed to the Raft core by one driver task, which takes whatever queued while it handed over
//!   the previous batch. openraft runs its storage and replication commands after each message
//!   it receives, so one message of many writes means one log append, one flusher hand-off and
//!   one replication wake-up for all of them instead of one each.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::Raft;
use super::{ConsensusError, Forwarded};
use super::{PeerError, Peers};
use crate::fsm::{Request, Response};
use crate::metrics::Metrics;

type Waiter = oneshot::Sender<Result<u64, ConsensusError>>;

#[derive(Default)]
pub struct ReadBatcher {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    running: bool,
    waiters: Vec<Waiter>,
}

impl ReadBatcher {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for the result of a round that starts after this call. When no round is running a
    /// driver task is spawned (so a cancelled caller never strands the others); it calls `fetch`
    /// once per round until no reader waits.
    pub async fn read<F, Fut>(self: &Arc<Self>, fetch: F) -> Result<u64, ConsensusError>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, ConsensusError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let drive = {
            let mut st = self.lock();
            st.waiters.push(tx);
            !std::mem::replace(&mut st.running, true)
        };
        if drive {
            let me = self.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let mut st = me.lock();
                        if st.waiters.is_empty() {
                            st.running = false;
                            return;
                        }
                        std::mem::take(&mut st.waiters)
                    };
                    let r = fetch().await;
                    for w in batch {
                        let _ = w.send(r.clone());
                    }
                }
            });
        }
        rx.await
            .unwrap_or_else(|_| Err(ConsensusError::Fatal("read round dropped".into())))
    }
}

/// Most writes one ForwardBatch RPC carries (the leader refuses more).
pub const MAX_FORWARD_BATCH: usize = 512;
/// Batches one node keeps in flight to the leader. Two keeps the pipe full: one batch commits
/// while the next one fills.
const MAX_FORWARD_SENDERS: usize = 8;

type ForwardResult = Result<Forwarded<Response>, PeerError>;
type ForwardWaiter = oneshot::Sender<ForwardResult>;

pub struct ForwardBatcher {
    state: Mutex<ForwardState>,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct ForwardState {
    /// (leader peer address, write, waiter), oldest first.
    queue: Vec<(String, Request, ForwardWaiter)>,
    senders: usize,
}

impl ForwardBatcher {
    pub fn new(metrics: Arc<Metrics>) -> ForwardBatcher {
        ForwardBatcher {
            state: Mutex::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ForwardState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forwards `req` to the leader at `addr`, in a batch with whatever else is waiting. An idle
    /// node sends at once: batching adds no latency, it only collects writes that arrive while
    /// earlier batches are in flight. Senders run as their own tasks, so a caller that gives up
    /// never strands the others.
    pub async fn forward(
        self: &Arc<Self>,
        peers: &Arc<dyn Peers>,
        addr: &str,
        req: Request,
        timeout: Duration,
    ) -> ForwardResult {
        let (tx, rx) = oneshot::channel();
        let start_sender = {
            let mut st = self.lock();
            st.queue.push((addr.to_string(), req, tx));
            let start = st.senders < MAX_FORWARD_SENDERS;
            if start {
                st.senders += 1;
            }
            start
        };
        if start_sender {
            let (me, peers) = (self.clone(), peers.clone());
            tokio::spawn(async move { me.send_until_empty(peers, timeout).await });
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(PeerError::Unreachable {
                addr: addr.into(),
                reason: format!("no answer within {timeout:?}"),
            }),
            Ok(Err(_)) => Err(PeerError::Unreachable {
                addr: addr.into(),
                reason: "the forwarding task stopped".into(),
            }),
            Ok(Ok(r)) => r,
        }
    }

    async fn send_until_empty(&self, peers: Arc<dyn Peers>, timeout: Duration) {
        loop {
            let taken: Vec<_> = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.senders -= 1;
                    return;
                }
                let n = st.queue.len().min(MAX_FORWARD_BATCH);
                st.queue.drain(..n).collect()
            };
            // Normally one leader address; two only while leadership moves.
            let mut by_addr: BTreeMap<String, Vec<(Request, ForwardWaiter)>> = BTreeMap::new();
            for (addr, req, w) in taken {
                by_addr.entry(addr).or_default().push((req, w));
            }
            for (addr, items) in by_addr {
                self.metrics.observe_forward_batch(items.len());
                send_batch(peers.as_ref(), &addr, items, timeout).await;
            }
        }
    }
}

async fn send_batch(
    peers: &dyn Peers,
    addr: &str,
    items: Vec<(Request, ForwardWaiter)>,
    timeout: Duration,
) {
    let (reqs, waiters): (Vec<Request>, Vec<ForwardWaiter>) = items.into_iter().unzip();
    let results = peers.forward_batch(addr, timeout, reqs).await;
    for (w, r) in waiters.into_iter().zip(results) {
        let _ = w.send(r);
    }
}

/// Most writes one proposal carries: bounds the core's work per message.
pub const MAX_PROPOSE_BATCH: usize = 1024;

type ProposeWaiter = oneshot::Sender<Forwarded<Response>>;

/// Hands this node's writes to its Raft core in batches (see the module docs). Writes keep the
/// order they were queued in, and meta commands are stamped with the leader's clock in that
/// order, so stamps never decrease along the log.
pub struct Proposer {
    raft: Raft,
    metrics: Arc<Metrics>,
    timeout: Duration,
    state: Mutex<ProposeState>,
    /// The last time stamped on a meta command by this node as leader.
    clock: std::sync::atomic::AtomicU64,
}

#[derive(Default)]
struct ProposeState {
    queue: Vec<(Request, ProposeWaiter)>,
    running: bool,
}

impl Proposer {
    pub fn new(raft: Raft, metrics: Arc<Metrics>, timeout: Duration) -> Proposer {
        Proposer {
            raft,
            metrics,
            timeout,
            state: Mutex::default(),
            clock: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ProposeState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Proposes `reqs` on this node; one result per write, in order. A write whose result does
    /// not arrive within the write timeout is `Failed` (its outcome is unknown, as for any write
    /// that times out); `NotLeader` when this node does not lead.
    pub async fn propose(self: &Arc<Self>, reqs: Vec<Request>) -> Vec<Forwarded<Response>> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut rxs = Vec::with_capacity(reqs.len());
        let drive = {
            let mut st = self.lock();
            for r in reqs {
                let (tx, rx) = oneshot::channel();
                st.queue.push((r, tx));
                rxs.push(rx);
            }
            !std::mem::replace(&mut st.running, true)
        };
        if drive {
            // A task of its own, so a caller that gives up never strands the queue.
            let me = self.clone();
            tokio::spawn(async move { me.drive().await });
        }
        let mut out = Vec::with_capacity(rxs.len());
        for rx in rxs {
            out.push(match tokio::time::timeout_at(deadline, rx).await {
                Err(_) => Forwarded::Failed("commit timed out".into()),
                Ok(Err(_)) => Forwarded::Failed("the proposal was dropped".into()),
                Ok(Ok(r)) => r,
            });
        }
        out
    }

    /// Stamps a meta command with the leader's clock, never read during apply; non-decreasing
    /// on this leader.
    fn stamp(&self, mut req: Request) -> Request {
        if let crate::fsm::Command::Meta { at_ms, .. } = &mut req.command {
            let now = crate::metrics::now_unix_ms();
            let prev = self
                .clock
                .fetch_max(now, std::sync::atomic::Ordering::SeqCst);
            *at_ms = now.max(prev);
        }
        req
    }

    async fn drive(&self) {
        loop {
            let taken: Vec<(Request, ProposeWaiter)> = {
                let mut st = self.lock();
                if st.queue.is_empty() {
                    st.running = false;
                    return;
                }
                let n = st.queue.len().min(MAX_PROPOSE_BATCH);
                st.queue.drain(..n).collect()
            };
            self.metrics.observe_propose_batch(taken.len());
            let (reqs, waiters): (Vec<Arc<Request>>, Vec<ProposeWaiter>) = taken
                .into_iter()
                .map(|(r, w)| (Arc::new(self.stamp(r)), w))
                .unzip();
            let deadline = tokio::time::Instant::now() + self.timeout;
            match self.raft.client_write_many(reqs).await {
                Err(fatal) => {
                    for w in waiters {
                        let _ = w.send(Forwarded::Failed(fatal.to_string()));
                    }
                }
                Ok(results) => {
                    tokio::spawn(answer(results, waiters, deadline));
                }
            }
            // Let the tasks that are about to queue writes run before the next batch is taken.
            tokio::task::yield_now().await;
        }
    }
}

/// Sends each write's result to its waiter as the core reports it, until the deadline.
async fn answer(
    mut results: futures::stream::BoxStream<
        'static,
        Result<
            openraft::raft::WriteResult<crate::raft_types::TypeConfig>,
            openraft::errors::Fatal<crate::raft_types::TypeConfig>,
        >,
    >,
    waiters: Vec<ProposeWaiter>,
    deadline: tokio::time::Instant,
) {
    use futures::StreamExt;
    let mut waiters = waiters.into_iter();
    let mut failure = "commit timed out".to_string();
    for w in waiters.by_ref() {
        // Err: the stream can say nothing more; this write and every later one fail with it.
        let r = match tokio::time::timeout_at(deadline, results.next()).await {
            Err(_) => Err(failure.clone()),
            Ok(None) => Err("raft stopped".to_string()),
            Ok(Some(Err(fatal))) => Err(fatal.to_string()),
            Ok(Some(Ok(Ok(w)))) => Ok(Forwarded::Ok(w.response)),
            Ok(Some(Ok(Err(openraft::errors::ClientWriteError::ForwardToLeader(f))))) => {
                Ok(Forwarded::NotLeader {
                    leader: f.leader_id,
                })
            }
            Ok(Some(Ok(Err(e)))) => Ok(Forwarded::Failed(e.to_string())),
        };
        match r {
            Ok(r) => {
                let _ = w.send(r);
            }
            Err(why) => {
                failure = why;
                let _ = w.send(Forwarded::Failed(failure.clone()));
                break;
            }
        }
    }
    for w in waiters {
        let _ = w.send(Forwarded::Failed(failure.clone()));
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_reads_share_rounds_and_each_round_starts_after_its_readers() {
        let b = Arc::new(ReadBatcher::default());
        let rounds = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..100 {
            let (b, rounds) = (b.clone(), rounds.clone());
            tasks.push(tokio::spawn(async move {
                let before = rounds.load(Ordering::SeqCst);
                let r2 = rounds.clone();
                let got = b
                    .read(move || {
                        let rounds = r2.clone();
                        async move {
                            let n = rounds.fetch_add(1, Ordering::SeqCst) + 1;
                            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
                            Ok(n)
                        }
                    })
                    .await
                    .expect("read");
                // The round that answered started after this reader arrived.
                assert!(
                    got > before,
                    "round {got} started before reader (saw {before})"
                );
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        assert!(rounds.load(Ordering::SeqCst) < 100, "reads were coalesced");
    }
}
