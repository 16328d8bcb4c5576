//! `session` workload: each client writes and reads a few keys.
//! - SESSION reads (asking for at least the client's last seen revision) never go back in
//!   revision for one client, are served at an applied index at least the one asked for, and see
//!   the client's own earlier writes (read-your-writes).
//! - STALE reads report an applied index that never exceeds the commit index: any write invoked
//!   after the read completed must get a larger revision than the index the read reported.
//! - Any read's value was written no later than the index it was served at.

use std::collections::HashMap;

use super::Verdict;
use crate::history::{Kind, Op, F};

pub fn check(ops: &[Op]) -> Verdict {
    let mut anomalies = Vec::new();
    // Per process: highest applied index seen so far by a session read.
    let mut last_index: HashMap<u64, u64> = HashMap::new();
    // Per (process, key): the revision of the client's latest acknowledged write.
    let mut own_writes: HashMap<(u64, String), u64> = HashMap::new();
    // (invoke time, revision) of acknowledged writes, for the stale bound.
    let mut writes: Vec<(u64, u64)> = Vec::new();
    let mut stale: Vec<(u64, u64, u64)> = Vec::new(); // (complete time, index, process)
    let mut ordered: Vec<&Op> = ops.iter().collect();
    ordered.sort_by_key(|o| o.invoke.time_ns);
    for op in ordered {
        let Some(c) = op.complete.filter(|c| c.kind == Kind::Ok) else {
            continue;
        };
        let p = op.invoke.process;
        match op.f() {
            F::Write | F::IdemWrite => {
                if let Some(r) = c.revision {
                    writes.push((op.invoke.time_ns, r));
                    if let Some(k) = &op.invoke.key {
                        own_writes.insert((p, k.clone()), r);
                    }
                }
            }
            F::SessionRead => {
                let idx = c.index.unwrap_or(0);
                let asked = op.invoke.index.unwrap_or(0);
                if idx < asked {
                    anomalies.push(format!(
                        "process {p}: session read asked for revision {asked}, served at {idx}"
                    ));
                }
                let prev = last_index.get(&p).copied().unwrap_or(0);
                if idx < prev {
                    anomalies.push(format!(
                        "process {p}: session read went back from index {prev} to {idx}"
                    ));
                }
                last_index.insert(p, idx.max(prev));
                if let (Some(k), Some(mine)) = (
                    &op.invoke.key,
                    op.invoke
                        .key
                        .as_ref()
                        .and_then(|k| own_writes.get(&(p, k.clone()))),
                ) {
                    let seen = c.revision.unwrap_or(0);
                    if seen < *mine {
                        anomalies.push(format!(
                            "process {p}: session read of {k} saw revision {seen}, older than its own write at {mine}"
                        ));
                    }
                }
                check_value_index(op, c, &mut anomalies);
            }
            F::StaleRead => {
                stale.push((c.time_ns, c.index.unwrap_or(0), p));
                check_value_index(op, c, &mut anomalies);
            }
            _ => {}
        }
    }
    // Stale bound: for a read completed at t reporting index a, every write invoked after t has
    // revision > a (its entry was appended after t, past the commit index of time t).
    writes.sort_unstable();
    let mut suffix_min = vec![u64::MAX; writes.len() + 1];
    for i in (0..writes.len()).rev() {
        suffix_min[i] = suffix_min[i + 1].min(writes[i].1);
    }
    for (t, a, p) in stale {
        let from = writes.partition_point(|(wt, _)| *wt <= t);
        let min_later = suffix_min[from];
        if min_later <= a {
            anomalies.push(format!(
                "process {p}: stale read reported applied index {a}, but a later write got revision {min_later}"
            ));
        }
    }
    Verdict::from_anomalies(anomalies)
}

fn check_value_index(op: &Op, c: &crate::history::Event, anomalies: &mut Vec<String>) {
    if let (Some(rev), Some(idx)) = (c.revision, c.index) {
        if rev > idx {
            anomalies.push(format!(
                "process {}: read returned a value of revision {rev} from applied index {idx}",
                op.invoke.process
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checker::testkit::H;
    use crate::checker::Validity;
    use crate::history::pair;

    fn write(h: &mut H, p: u64, key: &str, rev: u64) {
        h.op(p, F::Write, key, Kind::Ok).revision = Some(rev);
    }
    fn sread(h: &mut H, p: u64, key: &str, asked: u64, idx: u64, rev: u64) {
        let i = h.ev(p, Kind::Invoke, F::SessionRead);
        i.key = Some(key.into());
        i.index = Some(asked);
        let c = h.ev(p, Kind::Ok, F::SessionRead);
        c.key = Some(key.into());
        c.index = Some(idx);
        c.revision = Some(rev);
    }
    fn stale(h: &mut H, p: u64, idx: u64) {
        h.ev(p, Kind::Invoke, F::StaleRead).key = Some("a".into());
        h.ev(p, Kind::Ok, F::StaleRead).index = Some(idx);
    }
    fn verdict(h: &H) -> Verdict {
        check(&pair(&h.events).unwrap())
    }

    #[test]
    fn monotonic_sessions_are_valid() {
        let mut h = H::new();
        write(&mut h, 1, "a", 5);
        sread(&mut h, 1, "a", 5, 5, 5);
        sread(&mut h, 1, "a", 5, 7, 5);
        stale(&mut h, 2, 3);
        write(&mut h, 1, "a", 8);
        assert_eq!(verdict(&h).valid, Validity::Valid, "{:?}", verdict(&h));
    }

    #[test]
    fn going_back_is_caught() {
        let mut h = H::new();
        sread(&mut h, 1, "a", 0, 7, 0);
        sread(&mut h, 1, "a", 0, 6, 0);
        assert_eq!(verdict(&h).valid, Validity::Invalid);
    }

    #[test]
    fn missing_own_write_is_caught() {
        let mut h = H::new();
        write(&mut h, 1, "a", 9);
        sread(&mut h, 1, "a", 9, 9, 4);
        assert_eq!(verdict(&h).valid, Validity::Invalid);
    }

    #[test]
    fn stale_index_beyond_commit_is_caught() {
        let mut h = H::new();
        stale(&mut h, 2, 10);
        write(&mut h, 1, "a", 8);
        let v = verdict(&h);
        assert_eq!(v.valid, Validity::Invalid);
        assert!(v.anomalies[0].contains("stale"), "{:?}", v.anomalies);
    }
}
