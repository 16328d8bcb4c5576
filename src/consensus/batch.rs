//! Read-index coalescing: concurrent linearizable reads share one read-index round.
//!
//! A read that arrives while a round is in flight waits for the *next* round, which starts after
//! it arrived, so every read still sees every write acknowledged before it began. One round per
//! batch instead of one per read cuts heartbeats on the leader and RPCs from followers.

use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use super::ConsensusError;

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
