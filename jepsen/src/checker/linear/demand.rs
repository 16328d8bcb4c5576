//! The demand bound: reads of a value after it was overwritten need info ops re-creating it.

use super::*;

/// The reads (and CASes) of one value that only an info op re-creating it can explain, for the
/// demand bound of the module doc.
#[derive(Default)]
pub(super) struct Demand {
    /// Per such read, by response: (response, invocation of its barrier, ok op index).
    reads: Vec<(u64, u64, u32)>,
    /// (barrier invocation, read index), ascending; suf[i] = the least read index in by_w[i..].
    by_w: Vec<(u64, u32)>,
    suf: Vec<u32>,
    /// Invocations of the info ops that make the value, ascending.
    supply: Vec<u64>,
    /// Per read: how many of those the chain of reads from it on leaves spare (may be negative).
    slack: Vec<i64>,
}

/// The demand of every value, in one pass over the ok ops.
pub(super) fn demands(m: &Model) -> Vec<Demand> {
    // Completed ops that certainly leave a value, by response; per prefix, the latest invocation
    // and the latest with another value (v's barrier is the latest one not writing v).
    let mut bars: Vec<(u64, u64, u32)> = (0..m.n)
        .filter_map(|j| match m.op[j] {
            Op::Write(u) | Op::Cas(_, u) => Some((m.resp[j], m.inv[j], u)),
            _ => None,
        })
        .collect();
    bars.sort_unstable();
    let (mut b1, mut b2) = ((0, NONE), (0, NONE));
    let top: Vec<_> = (bars.iter())
        .map(|&(_, inv, u)| {
            if u == b1.1 {
                b1.0 = b1.0.max(inv);
            } else if b1.1 == NONE || inv > b1.0 {
                (b2, b1) = (b1, (inv, u));
            } else if b2.1 == NONE || inv > b2.0 {
                b2 = (inv, u);
            }
            (b1, b2)
        })
        .collect();
    let mut prods: Vec<Vec<(u64, u64)>> = vec![vec![]; m.vals.len()];
    for j in 0..m.n {
        if let Op::Write(b) | Op::Cas(_, b) | Op::CasUnk(_, b) = m.op[j] {
            prods[b as usize].push((m.resp[j], m.inv[j]));
        }
    }
    let min_inv: Vec<Vec<u64>> = (prods.iter_mut())
        .map(|p| {
            p.sort_unstable();
            suffix_min(p, u64::MAX)
        })
        .collect();
    let mut d: Vec<Demand> = (0..m.vals.len()).map(|_| Demand::default()).collect();
    for r in 0..m.n {
        let (Op::Read(v) | Op::Cas(v, _)) = m.op[r] else {
            continue;
        };
        let i = bars.partition_point(|b| b.0 < m.inv[r]);
        let Some(&(b1, b2)) = top.get(i.wrapping_sub(1)) else {
            continue;
        };
        let w = if b1.1 != v { b1 } else { b2 };
        let k = prods[v as usize].partition_point(|x| x.0 < w.0);
        if w.1 != NONE && min_inv[v as usize].get(k).is_none_or(|&lo| lo > m.resp[r]) {
            d[v as usize].reads.push((m.resp[r], w.0, r as u32));
        }
    }
    for (k, o) in m.kind_op.iter().enumerate() {
        if let Op::Write(b) | Op::CasUnk(_, b) = *o {
            d[b as usize].supply.extend_from_slice(&m.kind_inv[k]);
        }
    }
    d.iter_mut().for_each(Demand::finish);
    d
}

impl Demand {
    fn finish(&mut self) {
        self.reads.sort_unstable();
        self.supply.sort_unstable();
        self.by_w = self
            .reads
            .iter()
            .enumerate()
            .map(|(i, r)| (r.1, i as u32))
            .collect();
        self.by_w.sort_unstable();
        self.suf = suffix_min(&self.by_w, NONE);
        self.slack = vec![0; self.reads.len()];
        for i in (0..self.reads.len()).rev() {
            let have = self.supply.partition_point(|&t| t <= self.reads[i].0) as i64;
            let rest = self
                .first_after(self.reads[i].0)
                .map_or(i64::MAX, |n| self.slack[n as usize]);
            self.slack[i] = (have - 1).min(rest.saturating_sub(1));
        }
    }

    /// The earliest-responding read whose barrier is invoked after t.
    fn first_after(&self, t: u64) -> Option<u32> {
        self.suf
            .get(self.by_w.partition_point(|x| x.0 <= t))
            .copied()
    }

    /// Whether `used` spent info ops leave too few for the reads whose barrier starts after t.
    pub(super) fn short(&self, t: u64, used: u32) -> bool {
        self.first_after(t)
            .is_some_and(|i| used as i64 > self.slack[i as usize])
    }

    /// Before the search (nothing linearized, nothing spent): the read where the supply runs out.
    pub(super) fn deficit(&self, m: &Model, v: usize, ops: &KeyHistory) -> Option<String> {
        let mut i = *self.suf.first()?;
        if self.slack[i as usize] >= 0 {
            return None;
        }
        for k in 1.. {
            let (resp, _, r) = self.reads[i as usize];
            let have = self.supply.partition_point(|&t| t <= resp);
            if have < k {
                let (j, val) = (m.orig[r as usize], m.vals[v]);
                return Some(format!(
                    "op {j} {:?} [{}, {resp}] needs {val:?} after a completed write of another \
                     value, and no completed write of {val:?} can fall in between; with the {} \
                     earlier such reads it needs {k} unknown-outcome ops re-creating {val:?}, and \
                     {have} exist by then",
                    ops[j].2,
                    m.inv[r as usize],
                    k - 1
                ));
            }
            i = self.first_after(resp)?;
        }
        None
    }
}

/// For each position i of `pairs`, the least second element of `pairs[i..]` (`top` past the end).
fn suffix_min<A, B: Copy + Ord>(pairs: &[(A, B)], top: B) -> Vec<B> {
    let mut low = top;
    let mut v: Vec<B> = pairs
        .iter()
        .rev()
        .map(|x| {
            low = low.min(x.1);
            low
        })
        .collect();
    v.reverse();
    v
}
