//! `versions` workload: clients create versions of one artifact through the metadata API, the
//! version number decided inside apply. After healing, one linearizable listing of all versions
//! must show:
//! - numbers 1..=max, each exactly once (unique and gap-free: nothing is deleted in this workload);
//! - every acknowledged create, under the number its acknowledgement reported (none lost, none
//!   renumbered);
//! - no create that definitely failed, and nothing never attempted.
//!
//! Final-read entries are encoded as `number * VALUE_SPAN + value`.

use std::collections::{BTreeMap, HashMap, HashSet};

use super::Verdict;
use crate::history::{Kind, Op, F};

/// Values are below this (client index * 10,000,000 + counter, with fewer than 900 clients).
pub const VALUE_SPAN: i64 = 10_000_000_000;

pub fn check(ops: &[Op]) -> Verdict {
    let mut acked: HashMap<i64, u64> = HashMap::new();
    let mut failed = HashSet::new();
    let mut attempted = HashSet::new();
    let mut final_read: Option<Vec<i64>> = None;
    for op in ops {
        match op.f() {
            F::AddVersion => {
                let Some(v) = op.invoke.value else { continue };
                attempted.insert(v);
                match op.kind() {
                    Kind::Ok => {
                        if let Some(n) = op.complete.and_then(|c| c.version) {
                            acked.insert(v, n);
                        }
                    }
                    Kind::Fail => {
                        failed.insert(v);
                    }
                    _ => {}
                }
            }
            F::FinalRead if op.kind() == Kind::Ok => {
                final_read = op.complete.and_then(|c| c.values.clone());
            }
            _ => {}
        }
    }
    let Some(read) = final_read else {
        return Verdict::unknown("no successful final read".into());
    };
    let mut anomalies = Vec::new();
    let mut by_number: BTreeMap<u64, Vec<i64>> = BTreeMap::new();
    let mut by_value: HashMap<i64, Vec<u64>> = HashMap::new();
    for e in read {
        let (n, v) = ((e / VALUE_SPAN) as u64, e % VALUE_SPAN);
        by_number.entry(n).or_default().push(v);
        by_value.entry(v).or_default().push(n);
    }
    for (n, vs) in &by_number {
        if vs.len() > 1 {
            anomalies.push(format!(
                "version number {n} given to {} creates: {vs:?}",
                vs.len()
            ));
        }
    }
    let max = by_number.keys().next_back().copied().unwrap_or(0);
    let gaps: Vec<u64> = (1..=max).filter(|n| !by_number.contains_key(n)).collect();
    if !gaps.is_empty() {
        anomalies.push(format!(
            "{} version numbers missing below {max}, e.g. {:?}",
            gaps.len(),
            &gaps[..gaps.len().min(10)]
        ));
    }
    for (v, ns) in &by_value {
        if ns.len() > 1 {
            anomalies.push(format!(
                "create {v} applied {} times: numbers {ns:?}",
                ns.len()
            ));
        }
    }
    let mut lost = Vec::new();
    for (v, n) in &acked {
        match by_value.get(v) {
            None => lost.push(*v),
            Some(ns) if !ns.contains(n) => anomalies.push(format!(
                "create {v} was acknowledged as version {n} but is listed as {ns:?}"
            )),
            _ => {}
        }
    }
    if !lost.is_empty() {
        lost.sort_unstable();
        anomalies.push(format!(
            "{} acknowledged creates lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    let mut resurrected: Vec<i64> = failed
        .iter()
        .filter(|v| by_value.contains_key(v))
        .copied()
        .collect();
    resurrected.sort_unstable();
    if !resurrected.is_empty() {
        anomalies.push(format!(
            "{} creates that failed are present, e.g. {:?}",
            resurrected.len(),
            &resurrected[..resurrected.len().min(10)]
        ));
    }
    let mut phantoms: Vec<i64> = by_value
        .keys()
        .filter(|v| !attempted.contains(v))
        .copied()
        .collect();
    phantoms.sort_unstable();
    if !phantoms.is_empty() {
        anomalies.push(format!(
            "{} versions never created, e.g. {:?}",
            phantoms.len(),
            &phantoms[..phantoms.len().min(10)]
        ));
    }
    Verdict::from_anomalies(anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::Validity;
    use crate::history::{pair, Event};

    /// A create of value `v`: ok with number `n`, fail, or info.
    fn create(events: &mut Vec<Event>, t: &mut u64, p: u64, v: i64, outcome: Kind, n: Option<u64>) {
        let mut inv = Event::new(p, Kind::Invoke, F::AddVersion, *t);
        inv.value = Some(v);
        *t += 1;
        let mut c = inv.clone();
        c.kind = outcome;
        c.version = n;
        c.time_ns = *t;
        *t += 1;
        events.push(inv);
        events.push(c);
    }

    fn final_read(events: &mut Vec<Event>, t: &mut u64, listed: &[(u64, i64)]) {
        let inv = Event::new(99, Kind::Invoke, F::FinalRead, *t);
        let mut c = inv.clone();
        c.kind = Kind::Ok;
        c.values = Some(
            listed
                .iter()
                .map(|(n, v)| *n as i64 * VALUE_SPAN + v)
                .collect(),
        );
        c.time_ns = *t + 1;
        *t += 2;
        events.push(inv);
        events.push(c);
    }

    fn judge(events: &[Event]) -> Verdict {
        check(&pair(events).expect("pairs"))
    }

    fn base() -> (Vec<Event>, u64) {
        let (mut e, mut t) = (Vec::new(), 0);
        create(&mut e, &mut t, 0, 1, Kind::Ok, Some(1));
        create(&mut e, &mut t, 1, 2, Kind::Ok, Some(2));
        create(&mut e, &mut t, 0, 3, Kind::Info, None);
        create(&mut e, &mut t, 1, 4, Kind::Fail, None);
        (e, t)
    }

    #[test]
    fn valid_history_with_an_unknown_create_applied() {
        let (mut e, mut t) = base();
        final_read(&mut e, &mut t, &[(1, 1), (2, 2), (3, 3)]);
        assert_eq!(judge(&e).valid, Validity::Valid);
    }

    #[test]
    fn duplicate_numbers_gaps_loss_renumbering_and_failed_creates_are_caught() {
        let cases: Vec<(&[(u64, i64)], &str)> = vec![
            (&[(1, 1), (1, 2)], "given to 2 creates"),
            (&[(1, 1), (3, 2)], "missing below 3"),
            (&[(1, 1)], "acknowledged creates lost"),
            (&[(2, 1), (1, 2)], "acknowledged as version 1"),
            (&[(1, 1), (2, 2), (3, 4)], "failed are present"),
            (&[(1, 1), (2, 2), (3, 77)], "never created"),
            (&[(1, 1), (2, 2), (3, 2)], "applied 2 times"),
        ];
        for (listed, want) in cases {
            let (mut e, mut t) = base();
            final_read(&mut e, &mut t, listed);
            let v = judge(&e);
            assert_eq!(v.valid, Validity::Invalid, "{listed:?}");
            assert!(
                v.anomalies.iter().any(|a| a.contains(want)),
                "{listed:?}: {:?}",
                v.anomalies
            );
        }
    }

    #[test]
    fn no_final_read_is_unknown() {
        let (e, _) = base();
        assert_eq!(judge(&e).valid, Validity::Unknown);
    }
}
