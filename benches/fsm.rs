//! Criterion benchmarks of the apply path, and the ratio of batched apply (one RocksDB batch per
//! openraft apply call) against its baseline (one batch per entry), measured in the same run.
//!
//!   cargo bench --bench fsm
//!   (scripts/env.sh sets the shared CARGO_TARGET_DIR: `. scripts/env.sh && cargo bench --bench fsm`)

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BatchSize, Criterion, Throughput};
use metaraft::fsm::{self, Command, FsmError, Payload, Request, Staging, StateRead};
use metaraft::raft_types::Entry;
use metaraft::storage::StateMachineStore;
use openraft::storage::RaftStateMachine;

struct Mem(BTreeMap<Vec<u8>, Vec<u8>>);

impl StateRead for Mem {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        Ok(self.0.get(key).cloned())
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<fsm::KvPairs, FsmError> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .0
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Staging for Mem {
    fn state(&self) -> impl StateRead + '_ {
        self
    }
    fn stage(&mut self, mutations: Vec<fsm::Mutation>) {
        for m in mutations {
            match m {
                fsm::Mutation::Put(k, v) => {
                    self.0.insert(k, v);
                }
                fsm::Mutation::Delete(k) => {
                    self.0.remove(&k);
                }
                fsm::Mutation::DeleteRange(start, end) => {
                    self.0.retain(|k, _| k < &start || k >= &end);
                }
            }
        }
    }
}

fn put(i: u64) -> Request {
    Request::new(
        format!("{i:032x}"),
        Command::Put {
            key: format!("bench/{:06}", i % 10_000).into_bytes(),
            value: vec![b'x'; 256],
            expected_revision: None,
        },
    )
}

fn entry(index: u64) -> Entry {
    openraft::Entry {
        log_id: openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: openraft::EntryPayload::Normal(std::sync::Arc::new(put(index))),
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn apply_batch(sm: &mut StateMachineStore, entries: Vec<Entry>) {
    let s = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(s).await.expect("apply");
}

/// Applies `n` entries starting at `from`, `per_call` entries per apply call; returns elapsed.
fn timed_apply(
    sm: &mut StateMachineStore,
    rt: &tokio::runtime::Runtime,
    from: u64,
    n: u64,
    per_call: u64,
) -> Duration {
    let t = Instant::now();
    let mut i = from;
    while i < from + n {
        let end = (i + per_call).min(from + n);
        rt.block_on(apply_batch(sm, (i..end).map(entry).collect()));
        i = end;
    }
    t.elapsed()
}

fn bench_pure_apply(c: &mut Criterion) {
    let mut state = Mem(BTreeMap::new());
    let mut idx = 0u64;
    let mut g = c.benchmark_group("fsm");
    g.throughput(Throughput::Elements(1));
    g.bench_function("pure_apply_put_256B", |b| {
        b.iter_batched(
            || {
                idx += 1;
                (idx, put(idx))
            },
            |(i, req)| {
                let dedup = fsm::Dedup::window(1_000_000);
                fsm::apply_entry::<()>(&mut state, i, Payload::Normal(&req), dedup).expect("apply");
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn bench_store_apply(c: &mut Criterion) {
    let rt = rt();
    let dir = tempfile::tempdir().expect("tmp");
    let mut sm = StateMachineStore::open(dir.path(), 1_000_000).expect("open");
    let mut next = 1u64;
    let mut g = c.benchmark_group("state_machine_store");
    g.throughput(Throughput::Elements(64));
    g.bench_function("apply_64_entries_one_batch", |b| {
        b.iter(|| {
            timed_apply(&mut sm, &rt, next, 64, 64);
            next += 64;
        })
    });
    g.bench_function("apply_64_entries_one_by_one", |b| {
        b.iter(|| {
            timed_apply(&mut sm, &rt, next, 64, 1);
            next += 64;
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = bench_pure_apply, bench_store_apply
}

/// The same-run ratio: 20,000 entries applied in calls of 64 against calls of 1, alternating
/// rounds so both see the same store size and machine state.
fn ratio_report() {
    let rt = rt();
    let dir = tempfile::tempdir().expect("tmp");
    let mut sm = StateMachineStore::open(dir.path(), 1_000_000).expect("open");
    let mut next = 1u64;
    let (mut batched, mut baseline) = (Duration::ZERO, Duration::ZERO);
    let n = 5_000;
    for _ in 0..4 {
        batched += timed_apply(&mut sm, &rt, next, n, 64);
        next += n;
        baseline += timed_apply(&mut sm, &rt, next, n, 1);
        next += n;
    }
    let per = |d: Duration| (4 * n) as f64 / d.as_secs_f64();
    println!(
        "apply throughput: batched (64/call) {:.0} entries/s, baseline (1/call) {:.0} entries/s, ratio {:.2}x",
        per(batched),
        per(baseline),
        per(batched) / per(baseline)
    );
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
    ratio_report();
}
