//! `register` workload: per-key read / write / compare-and-set, checked for linearizability by
//! [`super::linear`]'s memoised search, one key at a time (P-compositionality: a history is
//! linearizable iff each key's sub-history is), the keys spread over the cores.
//!
//! Unknown outcomes (`info`) are kept with their response moved to the end of time: such an
//! operation may linearize anywhere after its invocation, including after everything else, which
//! is the same as never having happened. Definite failures are dropped: they did not happen.
//!
//! The budget is total: every key's search stops at one deadline, and nothing keeps running after
//! the verdict (an undecided key makes the verdict `unknown` and says so).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

pub use super::linear::{KeyHistory, Outcome, RegOp};
use super::{linear, Validity, Verdict};
use crate::history::{Kind, Op, F};

/// Splits the register operations by key, keeping only those that may have taken effect.
pub fn by_key(ops: &[Op]) -> BTreeMap<String, KeyHistory> {
    let mut out: BTreeMap<String, KeyHistory> = BTreeMap::new();
    for op in ops {
        let Some(key) = op.invoke.key.clone() else {
            continue;
        };
        let start = op.invoke.time_ns;
        let end = op.complete.map(|c| c.time_ns).unwrap_or(u64::MAX);
        let entry = match (op.f(), op.kind()) {
            (_, Kind::Fail) => None,
            (F::Read, Kind::Ok) => op.complete.map(|c| (start, end, RegOp::Read(c.value))),
            (F::Read, _) => None,
            (F::Write, k) => op.invoke.value.map(|v| {
                let end = if k == Kind::Ok { end } else { u64::MAX };
                (start, end, RegOp::Write(v))
            }),
            (F::Cas, k) => match (op.invoke.expected, op.invoke.value) {
                (Some(old), Some(new)) if k == Kind::Ok => {
                    Some((start, end, RegOp::CasOk(old, new)))
                }
                (Some(old), Some(new)) => Some((start, u64::MAX, RegOp::CasUnknown(old, new))),
                _ => None,
            },
            _ => None,
        };
        if let Some(e) = entry {
            out.entry(key).or_default().push(e);
        }
    }
    out
}

/// Whether one key's operations are linearizable, with no deadline (tests and small histories).
pub fn linearizable(ops: &KeyHistory) -> bool {
    let far = Instant::now() + Duration::from_secs(365 * 24 * 3600);
    matches!(linear::check(ops, far), Outcome::Linearizable)
}

pub fn check(ops: &[Op], budget: Duration) -> Verdict {
    let deadline = Instant::now() + budget;
    let keys: Vec<(String, KeyHistory)> = by_key(ops).into_iter().collect();
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .min(keys.len())
        .max(1);
    // Key i goes to thread i % threads; scoped threads: all are joined before the verdict.
    let mut outcomes: Vec<(usize, Outcome)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let keys = &keys;
                s.spawn(move || {
                    keys.iter()
                        .enumerate()
                        .skip(t)
                        .step_by(threads)
                        .map(|(i, (_, h))| (i, linear::check(h, deadline)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
            .collect()
    });
    outcomes.sort_by_key(|(i, _)| *i);
    let mut anomalies = Vec::new();
    let mut valid = Validity::Valid;
    for (i, outcome) in outcomes {
        let (key, hist) = &keys[i];
        let n = hist.len();
        match outcome {
            Outcome::Linearizable => {}
            Outcome::NotLinearizable(why) => {
                valid = valid.and(Validity::Invalid);
                anomalies.push(format!(
                    "key {key}: {n} operations are not linearizable: {why}"
                ));
            }
            Outcome::Unknown => {
                valid = valid.and(Validity::Unknown);
                anomalies.push(format!(
                    "key {key}: {n} operations not decided within the total budget of {budget:?}"
                ));
            }
        }
    }
    Verdict { valid, anomalies }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::history::pair;
    use proptest::prelude::*;

    fn verdict(h: &H) -> Validity {
        check(&pair(&h.events).unwrap(), Duration::from_secs(10)).valid
    }

    #[test]
    fn sequential_history_is_linearizable() {
        let mut h = H::new();
        h.ev(1, Kind::Invoke, F::Write).value = Some(1);
        h.ev(1, Kind::Ok, F::Write);
        h.op(1, F::Read, "k", Kind::Ok).value = Some(1);
        for e in h.events.iter_mut() {
            e.key = Some("k".into());
        }
        assert_eq!(verdict(&h), Validity::Valid);
    }

    fn write(h: &mut H, p: u64, v: i64, kind: Kind) {
        let i = h.ev(p, Kind::Invoke, F::Write);
        i.key = Some("k".into());
        i.value = Some(v);
        h.ev(p, kind, F::Write).key = Some("k".into());
    }

    fn cas(h: &mut H, p: u64, old: i64, new: i64, kind: Kind) {
        let i = h.ev(p, Kind::Invoke, F::Cas);
        i.key = Some("k".into());
        i.expected = Some(old);
        i.value = Some(new);
        h.ev(p, kind, F::Cas).key = Some("k".into());
    }

    #[test]
    fn stale_read_is_caught() {
        let mut h = H::new();
        write(&mut h, 1, 1, Kind::Ok);
        write(&mut h, 1, 2, Kind::Ok);
        h.op(2, F::Read, "k", Kind::Ok).value = Some(1);
        assert_eq!(verdict(&h), Validity::Invalid);
    }

    #[test]
    fn lost_write_is_caught() {
        let mut h = H::new();
        write(&mut h, 1, 5, Kind::Ok);
        h.op(2, F::Read, "k", Kind::Ok).value = None;
        assert_eq!(verdict(&h), Validity::Invalid);
    }

    #[test]
    fn duplicated_cas_is_caught() {
        // 0 -> 1 applied once, then 1 -> 2, then a second "0 -> 1" success cannot be.
        let mut h = H::new();
        write(&mut h, 1, 0, Kind::Ok);
        cas(&mut h, 1, 0, 1, Kind::Ok);
        cas(&mut h, 1, 1, 2, Kind::Ok);
        cas(&mut h, 2, 0, 1, Kind::Ok);
        assert_eq!(verdict(&h), Validity::Invalid);
    }

    #[test]
    fn unknown_write_may_or_may_not_apply() {
        let mut h = H::new();
        write(&mut h, 1, 1, Kind::Ok);
        write(&mut h, 2, 9, Kind::Info);
        h.op(3, F::Read, "k", Kind::Ok).value = Some(1);
        h.op(3, F::Read, "k", Kind::Ok).value = Some(9);
        assert_eq!(verdict(&h), Validity::Valid);
        // ... but once seen it cannot be unseen.
        h.op(3, F::Read, "k", Kind::Ok).value = Some(1);
        assert_eq!(verdict(&h), Validity::Invalid);
    }

    #[test]
    fn failed_write_must_not_be_seen() {
        let mut h = H::new();
        write(&mut h, 1, 1, Kind::Ok);
        write(&mut h, 2, 7, Kind::Fail);
        h.op(3, F::Read, "k", Kind::Ok).value = Some(7);
        assert_eq!(verdict(&h), Validity::Invalid);
    }

    #[test]
    fn concurrent_ops_may_reorder() {
        let mut h = H::new();
        // p1 write 1 overlaps p2's read of 1 and p3's write 2; final read 2.
        let i = h.ev(1, Kind::Invoke, F::Write);
        i.key = Some("k".into());
        i.value = Some(1);
        h.ev(2, Kind::Invoke, F::Read).key = Some("k".into());
        let r = h.ev(2, Kind::Ok, F::Read);
        r.key = Some("k".into());
        r.value = Some(1);
        h.ev(1, Kind::Ok, F::Write).key = Some("k".into());
        write(&mut h, 3, 2, Kind::Ok);
        h.op(2, F::Read, "k", Kind::Ok).value = Some(2);
        assert_eq!(verdict(&h), Validity::Valid);
    }

    /// A sequential model produces histories (with random overlaps of each op with the next)
    /// that are linearizable by construction.
    fn model_history(ops: Vec<(u8, i64, i64)>, overlap: Vec<bool>) -> KeyHistory {
        let mut state: Option<i64> = None;
        let mut out = Vec::new();
        let mut t = 0u64;
        for (i, (kind, a, b)) in ops.into_iter().enumerate() {
            let start = t;
            // Overlapping the previous op's interval keeps the sequential order a valid witness.
            let end = t + 10;
            t += if overlap.get(i).copied().unwrap_or(false) {
                5
            } else {
                20
            };
            let op = match kind % 3 {
                0 => RegOp::Read(state),
                1 => {
                    state = Some(a);
                    RegOp::Write(a)
                }
                _ => {
                    if state == Some(a) {
                        state = Some(b);
                        RegOp::CasOk(a, b)
                    } else {
                        RegOp::Read(state)
                    }
                }
            };
            out.push((start, end, op));
        }
        out
    }

    #[test]
    fn the_budget_is_total_and_nothing_runs_past_it() {
        // Five keys of long generated histories, a budget of zero: undecided at once, every key
        // named, and the call returns (its searches are joined, none left running).
        let mut h = H::new();
        for k in 0..5 {
            for e in linear_events(&linear::generate(k, 20_000, 10, 0.1), &format!("k{k}")) {
                h.events.push(e);
            }
        }
        let start = Instant::now();
        let v = check(&pair(&h.events).unwrap(), Duration::ZERO);
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(v.valid, Validity::Unknown);
        assert_eq!(v.anomalies.len(), 5, "{:?}", v.anomalies);
        assert!(v.anomalies[0].contains("total budget"), "{:?}", v.anomalies);
    }

    /// A key's generated operations as history events (one process per operation).
    fn linear_events(ops: &KeyHistory, key: &str) -> Vec<crate::history::Event> {
        use crate::history::Event;
        let mut out = Vec::new();
        for (p, (start, end, op)) in ops.iter().enumerate() {
            let p = p as u64 + 1;
            let (f, value, expected, kind) = match op {
                RegOp::Read(v) => (F::Read, *v, None, Kind::Ok),
                RegOp::Write(v) => (F::Write, Some(*v), None, Kind::Ok),
                RegOp::CasOk(a, b) => (F::Cas, Some(*b), Some(*a), Kind::Ok),
                RegOp::CasUnknown(a, b) => (F::Cas, Some(*b), Some(*a), Kind::Info),
            };
            let mut inv = Event::new(p, Kind::Invoke, f, *start);
            inv.key = Some(key.into());
            inv.expected = expected;
            if f != F::Read {
                inv.value = value;
            }
            out.push(inv);
            let kind = if *end == u64::MAX { Kind::Info } else { kind };
            let mut done = Event::new(p, kind, f, if *end == u64::MAX { *start + 1 } else { *end });
            done.key = Some(key.into());
            if f == F::Read {
                done.value = value;
            }
            out.push(done);
        }
        out.sort_by_key(|e| e.time_ns);
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn model_histories_are_linearizable(
            ops in prop::collection::vec((0u8..3, 0i64..3, 0i64..3), 0..60),
            overlap in prop::collection::vec(any::<bool>(), 60),
        ) {
            prop_assert!(linearizable(&model_history(ops, overlap)));
        }
    }
}
