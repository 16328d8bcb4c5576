//! `set` workload: unique adds, then one final linearizable read after healing. Every
//! acknowledged add must be present (no lost writes); no add that definitely failed may be
//! present; nothing that was never added may appear. Adds with unknown outcome may go either way.

use std::collections::{BTreeSet, HashSet};

use super::Verdict;
use crate::history::{Kind, Op, F};

pub fn check(ops: &[Op]) -> Verdict {
    let mut ok = BTreeSet::new();
    let mut failed = HashSet::new();
    let mut attempted = HashSet::new();
    let mut final_read: Option<Vec<i64>> = None;
    for op in ops {
        match op.f() {
            F::Add => {
                let Some(v) = op.invoke.value else { continue };
                attempted.insert(v);
                match op.kind() {
                    Kind::Ok => {
                        ok.insert(v);
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
    let present: HashSet<i64> = read.iter().copied().collect();
    let mut anomalies = Vec::new();
    let lost: Vec<i64> = ok
        .iter()
        .filter(|v| !present.contains(v))
        .copied()
        .collect();
    if !lost.is_empty() {
        anomalies.push(format!(
            "{} acknowledged adds lost, e.g. {:?}",
            lost.len(),
            &lost[..lost.len().min(10)]
        ));
    }
    let mut resurrected: Vec<i64> = present.intersection(&failed).copied().collect();
    resurrected.sort_unstable();
    if !resurrected.is_empty() {
        anomalies.push(format!(
            "{} adds that failed are present, e.g. {:?}",
            resurrected.len(),
            &resurrected[..resurrected.len().min(10)]
        ));
    }
    let mut unexpected: Vec<i64> = present.difference(&attempted).copied().collect();
    unexpected.sort_unstable();
    if !unexpected.is_empty() {
        anomalies.push(format!(
            "{} elements never added are present, e.g. {:?}",
            unexpected.len(),
            &unexpected[..unexpected.len().min(10)]
        ));
    }
    if read.len() != present.len() {
        anomalies.push(format!(
            "final read has duplicates: {} elements, {} distinct",
            read.len(),
            present.len()
        ));
    }
    Verdict::from_anomalies(anomalies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::Validity;
    use crate::history::pair;

    fn add(h: &mut H, p: u64, v: i64, kind: Kind) {
        h.ev(p, Kind::Invoke, F::Add).value = Some(v);
        h.ev(p, kind, F::Add);
    }

    fn final_read(h: &mut H, values: Vec<i64>) {
        h.ev(9, Kind::Invoke, F::FinalRead);
        h.ev(9, Kind::Ok, F::FinalRead).values = Some(values);
    }

    fn verdict(h: &H) -> Verdict {
        check(&pair(&h.events).unwrap())
    }

    #[test]
    fn all_present_is_valid_and_unknown_adds_may_go_either_way() {
        let mut h = H::new();
        add(&mut h, 1, 1, Kind::Ok);
        add(&mut h, 1, 2, Kind::Info);
        add(&mut h, 2, 3, Kind::Info);
        final_read(&mut h, vec![1, 3]);
        assert_eq!(verdict(&h).valid, Validity::Valid);
    }

    #[test]
    fn lost_write_is_caught() {
        let mut h = H::new();
        add(&mut h, 1, 1, Kind::Ok);
        add(&mut h, 1, 2, Kind::Ok);
        final_read(&mut h, vec![1]);
        let v = verdict(&h);
        assert_eq!(v.valid, Validity::Invalid);
        assert!(v.anomalies[0].contains("lost"), "{:?}", v.anomalies);
    }

    #[test]
    fn failed_or_phantom_elements_are_caught() {
        let mut h = H::new();
        add(&mut h, 1, 1, Kind::Fail);
        final_read(&mut h, vec![1, 42]);
        let v = verdict(&h);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.anomalies.len(), 2, "{:?}", v.anomalies);
    }

    #[test]
    fn no_final_read_is_unknown() {
        let mut h = H::new();
        add(&mut h, 1, 1, Kind::Ok);
        assert_eq!(verdict(&h).valid, Validity::Unknown);
    }
}
