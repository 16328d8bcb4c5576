//! `register` workload: per-key read / write / compare-and-set, checked for linearizability with
//! todc-utils' Wing-Gong/Lowe search, one key at a time (P-compositionality: a history is
//! linearizable iff each key's sub-history is).
//!
//! Unknown outcomes (`info`) are kept with their response moved to the end of time: such an
//! operation may linearize anywhere after its invocation, including after everything else, which
//! is the same as never having happened. Definite failures are dropped: they did not happen.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use todc_utils::{Action, History, Specification, WGLChecker};

use super::{Validity, Verdict};
use crate::history::{Kind, Op, F};

#[derive(Clone, Debug)]
pub enum RegOp {
    /// Read returned this (None = key absent).
    Read(Option<i64>),
    Write(i64),
    /// Compare-and-set that applied.
    CasOk(i64, i64),
    /// Compare-and-set whose outcome is unknown: applies iff the compare holds.
    CasUnknown(i64, i64),
}

pub struct RegisterSpec;

impl Specification for RegisterSpec {
    type State = Option<i64>;
    type Operation = RegOp;

    fn init() -> Self::State {
        None
    }

    fn apply(op: &RegOp, state: &Option<i64>) -> (bool, Option<i64>) {
        match op {
            RegOp::Read(v) => (v == state, *state),
            RegOp::Write(v) => (true, Some(*v)),
            RegOp::CasOk(old, new) => (*state == Some(*old), Some(*new)),
            RegOp::CasUnknown(old, new) => {
                if *state == Some(*old) {
                    (true, Some(*new))
                } else {
                    (true, *state)
                }
            }
        }
    }
}

/// The checker's input for one key: (invoke time, response time, operation); an unknown outcome
/// has response time `u64::MAX`.
pub type KeyHistory = Vec<(u64, u64, RegOp)>;

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

/// Runs todc-utils' search on one key's operations.
pub fn linearizable(ops: &KeyHistory) -> bool {
    if ops.is_empty() {
        return true;
    }
    // (time, is_response, op index): calls sort before responses at equal times, which treats
    // touching operations as concurrent (the permissive reading).
    let mut points: Vec<(u64, bool, usize)> = Vec::with_capacity(ops.len() * 2);
    for (i, (s, e, _)) in ops.iter().enumerate() {
        points.push((*s, false, i));
        points.push((*e, true, i));
    }
    points.sort();
    // One todc "process" per operation: the real process order is implied by real time.
    let actions = points
        .into_iter()
        .map(|(_, resp, i)| {
            let op = ops[i].2.clone();
            (
                i,
                if resp {
                    Action::Response(op)
                } else {
                    Action::Call(op)
                },
            )
        })
        .collect();
    WGLChecker::<RegisterSpec>::is_linearizable(History::from_actions(actions))
}

pub fn check(ops: &[Op], budget: Duration) -> Verdict {
    let keys = by_key(ops);
    let mut anomalies = Vec::new();
    let mut valid = Validity::Valid;
    for (key, hist) in keys {
        let n = hist.len();
        let (tx, rx) = mpsc::channel();
        // The search runs on its own thread so a pathological history yields "unknown" at the
        // budget instead of hanging the run; the thread is left to finish on its own.
        std::thread::spawn(move || {
            let _ = tx.send(linearizable(&hist));
        });
        match rx.recv_timeout(budget) {
            Ok(true) => {}
            Ok(false) => {
                valid = valid.and(Validity::Invalid);
                anomalies.push(format!("key {key}: {n} operations are not linearizable"));
            }
            Err(_) => {
                valid = valid.and(Validity::Unknown);
                anomalies.push(format!(
                    "key {key}: search over {n} operations exceeded {budget:?}"
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
