//! Coalescing of the work a node sends to the leader.
//!
//! - [`ReadBatcher`]: concurrent linearizable reads share one read-index round. A read that
//!   arrives while a round is in flight waits for the *next* round, which starts after it
//!   arrived, so every read still sees every write acknowledged before it began. One round per
//!   batch instead of one per read cuts heartbeats on the leader and RPCs from followers.
//! - [`ForwardBatcher`]: writes a follower forwards travel to the leader several per RPC and are
//!   proposed there in one call, so the leader's per-request gRPC and Raft-core costs are paid
//!   per batch. Each write still gets its own result; nothing is merged.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::oneshot;

use super::{ConsensusError, Forwarded};
use crate::fsm::{Request, Response};
use crate::metrics::Metrics;
use crate::net::{NetError, PeerPool};

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

type ForwardResult = Result<Forwarded<Response>, NetError>;
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
        pool: &Arc<PeerPool>,
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
            let (me, pool) = (self.clone(), pool.clone());
            tokio::spawn(async move { me.send_until_empty(pool, timeout).await });
        }
        match tokio::time::timeout(timeout, rx).await {
            Err(_) => Err(NetError::Unreachable {
                addr: addr.into(),
                reason: format!("no answer within {timeout:?}"),
            }),
            Ok(Err(_)) => Err(NetError::Unreachable {
                addr: addr.into(),
                reason: "the forwarding task stopped".into(),
            }),
            Ok(Ok(r)) => r,
        }
    }

    async fn send_until_empty(&self, pool: Arc<PeerPool>, timeout: Duration) {
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
                send_batch(&pool, &addr, items, timeout).await;
            }
        }
    }
}

async fn send_batch(
    pool: &PeerPool,
    addr: &str,
    items: Vec<(Request, ForwardWaiter)>,
    timeout: Duration,
) {
    let (reqs, waiters): (Vec<Request>, Vec<ForwardWaiter>) = items.into_iter().unzip();
    let results = pool.forward_batch(addr, timeout, &reqs).await;
    for (w, r) in waiters.into_iter().zip(results) {
        let _ = w.send(r);
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
