//! `idempotent` workload: every write carries a request id and is retried with the same id
//! (possibly on another node) until it is acknowledged or gives up. A request id must be applied
//! at most once:
//! - all acknowledgements of one id report the same revision (a second apply would get a new one);
//! - two different ids never share a revision;
//! - the counter key's final version (how many writes it took) lies between the number of ids
//!   acknowledged and the number of ids attempted.

use std::collections::{HashMap, HashSet};

use super::Verdict;
use crate::history::{Kind, Op, F};

pub fn check(ops: &[Op]) -> Verdict {
    let mut anomalies = Vec::new();
    let mut rev_of: HashMap<String, u64> = HashMap::new();
    let mut id_of_rev: HashMap<u64, String> = HashMap::new();
    let mut attempted: HashSet<String> = HashSet::new();
    let mut definitely_failed: HashSet<String> = HashSet::new();
    let mut final_version = None;
    for op in ops {
        match op.f() {
            F::IdemWrite => {
                let Some(id) = op.invoke.request_id.clone() else {
                    continue;
                };
                attempted.insert(id.clone());
                let Some(c) = op.complete else { continue };
                match c.kind {
                    Kind::Ok => {
                        let Some(r) = c.revision else { continue };
                        if let Some(prev) = rev_of.insert(id.clone(), r) {
                            if prev != r {
                                anomalies.push(format!(
                                    "request id {id} acknowledged at revisions {prev} and {r}: applied twice"
                                ));
                            }
                        }
                        if let Some(other) = id_of_rev.insert(r, id.clone()) {
                            if other != id {
                                anomalies.push(format!(
                                    "request ids {other} and {id} both acknowledged at revision {r}"
                                ));
                            }
                        }
                    }
                    Kind::Fail => {
                        definitely_failed.insert(id);
                    }
                    _ => {}
                }
            }
            F::FinalRead if op.kind() == Kind::Ok => {
                final_version = op.complete.and_then(|c| c.version);
            }
            _ => {}
        }
    }
    for id in definitely_failed.intersection(&rev_of.keys().cloned().collect()) {
        // A definite failure means "not applied"; an acknowledgement of the same id says it was.
        anomalies.push(format!(
            "request id {id} both definitely failed and was acknowledged"
        ));
    }
    let Some(version) = final_version else {
        if anomalies.is_empty() {
            return Verdict::unknown("no successful final read".into());
        }
        return Verdict::from_anomalies(anomalies);
    };
    let acked = rev_of.len() as u64;
    let tried = attempted.len() as u64;
    if version < acked {
        anomalies.push(format!(
            "final version {version} is below the {acked} acknowledged request ids: lost writes"
        ));
    }
    if version > tried {
        anomalies.push(format!(
            "final version {version} exceeds the {tried} request ids ever sent: some id applied twice"
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

    fn attempt(h: &mut H, p: u64, id: &str, kind: Kind, rev: Option<u64>) {
        h.ev(p, Kind::Invoke, F::IdemWrite).request_id = Some(id.into());
        let c = h.ev(p, kind, F::IdemWrite);
        c.request_id = Some(id.into());
        c.revision = rev;
    }
    fn final_version(h: &mut H, v: u64) {
        h.ev(9, Kind::Invoke, F::FinalRead);
        h.ev(9, Kind::Ok, F::FinalRead).version = Some(v);
    }
    fn verdict(h: &H) -> Verdict {
        check(&pair(&h.events).unwrap())
    }

    #[test]
    fn retried_once_applied_is_valid() {
        let mut h = H::new();
        attempt(&mut h, 1, "a", Kind::Info, None);
        attempt(&mut h, 1, "a", Kind::Ok, Some(5));
        attempt(&mut h, 2, "b", Kind::Ok, Some(6));
        attempt(&mut h, 2, "c", Kind::Info, None);
        final_version(&mut h, 3);
        assert_eq!(verdict(&h).valid, Validity::Valid, "{:?}", verdict(&h));
    }

    #[test]
    fn duplicate_apply_is_caught() {
        let mut h = H::new();
        attempt(&mut h, 1, "a", Kind::Ok, Some(5));
        attempt(&mut h, 1, "a", Kind::Ok, Some(9));
        final_version(&mut h, 2);
        let v = verdict(&h);
        assert_eq!(v.valid, Validity::Invalid);
        assert_eq!(v.anomalies.len(), 2, "{:?}", v.anomalies);
    }

    #[test]
    fn lost_acknowledged_write_is_caught() {
        let mut h = H::new();
        attempt(&mut h, 1, "a", Kind::Ok, Some(5));
        attempt(&mut h, 1, "b", Kind::Ok, Some(6));
        final_version(&mut h, 1);
        assert_eq!(verdict(&h).valid, Validity::Invalid);
    }
}
