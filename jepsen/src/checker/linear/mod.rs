//! Linearizability of one key's register history (read, write, compare-and-set), with operations
//! whose outcome is unknown (`info`): decided exactly, or given up at a deadline.
//!
//! # The search
//! Wing and Gong's search as refined by Lowe ("Testing for linearizability", 2017), as in
//! Porcupine: build a linearization one operation at a time, depth first on an explicit stack,
//! never expanding a configuration (ops linearized, register state) twice. Completed ("ok") ops are
//! sorted by response; op p, the earliest-responding one not yet linearized, bounds what may come
//! next: an op invoked after p's response cannot precede p (intervals that touch are concurrent).
//! So a configuration is p, the few later ops already linearized and the state: a few words, not a
//! bitset of the history. Moves are tried without info ops first, then by response time. A read of
//! the current state (or a CAS from a value to itself) is linearized at once without branching:
//! moving it to the front of any valid completion leaves the completion valid.
//!
//! # Unknown outcomes as tokens
//! An info op may take effect at any point after its invocation, or never. Branching on each of
//! thousands of them at every step is what makes the usual search hopeless, so they are tokens.
//! Once the search has passed an info op's invocation (it is no later than p's response) the op
//! stays usable, and equal usable info ops are interchangeable: a configuration needs only how many
//! of each kind were used. Take any linearization and repeat: drop an info op that leaves the state
//! as it was, that a write follows, or that starts a run of info ops coming back to where it
//! started; move one place later an info op followed by an ok op that neither reads nor compares
//! the state it made (it has no response, so moving it later never breaks real-time order). This
//! ends, and leaves every info op in a *chain* right before an ok op that needs the chain's last
//! state: a read of it or a CAS from it. In a chain the states are distinct, only the first token
//! may be a write and each CAS starts where the one before ended; and where a CAS(s, x) token is
//! usable a write of x is never spent to go from s to x (exchanging the two tokens in a
//! linearization that does gives one that does not). A move is such a chain, then one ok op (for the
//! rare ok CAS of unknown outcome: any chain to its old value, or one CAS token beyond).
//!
//! # Two passes
//! Pass 1 is relaxed: a kind may be used whenever one of its ops is usable, however many were used.
//! Every linearization is a relaxed one, so if pass 1 fails the history is not linearizable.
//! Relaxed, a state that a usable info write makes can be reached before any op, so all such states
//! are one memo class, and in one of them it loses nothing to linearize at once the first candidate
//! if it is a read, or a write or CAS leaving such a state (in a completion of the rest, put a write
//! token of the current state first and one of the op's value where the op was). Pass 1 takes that
//! move alone, so with info writes of every value about it runs nearly straight. It counts tokens
//! along its path, preferring chains whose tokens are left; a path that never used a token that
//! was not left is a true linearization. Otherwise pass 2 searches exactly, the tokens used of each
//! kind being part of a configuration. Both passes restart with a doubled step budget and another
//! order of moves (random guesses of each op's linearization point), keeping the configurations
//! proved dead, which cuts the long tail of depth-first search.
//!
//! # Pruning (each keeps the answer)
//! - An info read changes nothing: dropped. An info CasOk is a CAS whose outcome is unknown.
//! - An info write(v) or CAS(_, v) where no ok read returned v and no CAS compares with v: once it
//!   applied, the state is v until the next write, and in between only CASes of unknown outcome can
//!   come (anything else would observe v); they are legal in any state, so removing the op keeps a
//!   linearization. The other way, the op can always never take effect.
//! - An info CAS(old, _) where no op writes old never applies: the same as never taking effect.
//!   Both rules run to a fixpoint, since dropping one op can make another droppable.
//! - An ok read or CAS needing a value no op writes: not linearizable.
//! - Demand: a read (or CAS) of v invoked after a completed write of another value w finished, with
//!   no completed op that writes v able to fall between w and it, can only see v through an info
//!   op re-creating v after w. Reads chained so that each one's w starts after the previous read
//!   ends need distinct such info ops, each invoked before its read responds. Too few, counting
//!   those pass 2 has used already: not linearizable, or that branch of pass 2 is dead.
//!
//! Splitting a key's history at quiescent points would be unsound as such (info ops reach past any
//! point, and the state carries over); the memo gives its benefit anyway, since at such a point the
//! configurations differ only in state and tokens used.
//!
//! # Limits
//! The problem is NP-complete. Slowest cases: many concurrent ok ops and no info ops (plain WGL),
//! and histories where few info ops must each explain exactly the right reads (pass 2 may then
//! try many ways to spend them). The deadline is checked every 256 steps.

mod demand;
mod gen;
mod search;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Instant;

use demand::{demands, Demand};
pub use gen::{corrupt, generate};
use search::{End, Search};

#[derive(Clone, Debug)]
pub enum RegOp {
    /// A read that returned this (None = key absent); only ok reads are given.
    Read(Option<i64>),
    /// Blind write.
    Write(i64),
    /// Compare-and-set (old, new) that succeeded: the state must equal Some(old).
    CasOk(i64, i64),
    /// Compare-and-set with unknown outcome: applies iff state == Some(old), else no-op.
    CasUnknown(i64, i64),
}

/// (invoke time ns, response time ns, op). Response `u64::MAX` = outcome unknown (`info`): the op
/// may take effect at any point after its invocation, or never.
pub type KeyHistory = Vec<(u64, u64, RegOp)>;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Linearizable,
    /// A short explanation: the op no linearization gets past, and how far the search got.
    NotLinearizable(String),
    /// The deadline came first.
    Unknown,
}

/// An operation on interned values (state ids; 0 = key absent).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Op {
    Read(u32),
    Write(u32),
    Cas(u32, u32),
    CasUnk(u32, u32),
}

const INFO: u64 = u64::MAX;
/// No token kind; also the memo class of the states that a usable info write makes.
const NONE: u32 = u32::MAX;

/// Normalises (info reads dropped, info CasOk as CasUnknown, responses no earlier than
/// invocations) and drops the info ops that cannot matter, to a fixpoint (see the module doc).
fn prune(ops: &KeyHistory) -> Vec<(usize, u64, u64, RegOp)> {
    let mut v: Vec<_> = (ops.iter().enumerate())
        .filter_map(|(i, (inv, resp, op))| match (op, *resp == INFO) {
            (RegOp::Read(_), true) => None,
            (RegOp::CasOk(a, b), true) => Some((i, *inv, INFO, RegOp::CasUnknown(*a, *b))),
            (op, _) => Some((i, *inv, (*resp).max(*inv), op.clone())),
        })
        .collect();
    loop {
        let (mut seen, mut made) = (HashSet::new(), HashSet::new());
        for (_, _, _, op) in &v {
            match *op {
                RegOp::Read(x) => seen.extend(x),
                RegOp::Write(x) => made.extend([x]),
                RegOp::CasOk(a, b) | RegOp::CasUnknown(a, b) => {
                    seen.insert(a);
                    made.insert(b);
                }
            }
        }
        let before = v.len();
        v.retain(|(_, _, resp, op)| match *op {
            _ if *resp != INFO => true,
            RegOp::Write(x) => seen.contains(&x),
            RegOp::CasUnknown(a, b) => a != b && seen.contains(&b) && made.contains(&a),
            _ => true,
        });
        if v.len() == before {
            return v;
        }
    }
}

/// A set of configuration keys: appended to one arena, found by open addressing (so that millions
/// take little memory and are freed at once, keeping the deadline).
#[derive(Default)]
struct KeySet {
    arena: Vec<u32>,
    slots: Vec<u64>,
    len: usize,
}

impl KeySet {
    fn hash(key: &[u32]) -> u64 {
        let mut h = key.len() as u64;
        for &x in key {
            h = (h.rotate_left(5) ^ x as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
        (h ^ h >> 33).wrapping_mul(0xff51_afd7_ed55_8ccd) ^ h >> 29
    }

    fn get(&self, slot: u64) -> &[u32] {
        let at = (slot & ((1 << 40) - 1)) as usize - 1;
        &self.arena[at + 1..at + 1 + self.arena[at] as usize]
    }

    /// The slot holding `key`, or the empty slot where it would go.
    fn probe(&self, h: u64, key: Option<&[u32]>) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = h as usize & mask;
        while self.slots[i] != 0 {
            let s = self.slots[i];
            if key.is_some_and(|k| s >> 40 == h >> 40 && self.get(s) == k) {
                break;
            }
            i = (i + 1) & mask;
        }
        i
    }

    fn contains(&self, key: &[u32]) -> bool {
        !self.slots.is_empty() && self.slots[self.probe(Self::hash(key), Some(key))] != 0
    }

    /// Adds `key`; false if it was there already.
    fn insert(&mut self, key: &[u32]) -> bool {
        if self.slots.len() < 2 * (self.len + 1) {
            let old = std::mem::replace(&mut self.slots, vec![0; (self.len * 4).max(1024)]);
            for slot in old.into_iter().filter(|&s| s != 0) {
                let i = self.probe(Self::hash(self.get(slot)), None);
                self.slots[i] = slot;
            }
        }
        let h = Self::hash(key);
        let i = self.probe(h, Some(key));
        if self.slots[i] != 0 {
            return false;
        }
        self.slots[i] = (h >> 40) << 40 | (self.arena.len() as u64 + 1);
        self.arena.push(key.len() as u32);
        self.arena.extend_from_slice(key);
        self.len += 1;
        true
    }
}

/// The history prepared for the search: ok ops sorted by response; info ops as token kinds
/// (equal ops), each with its sorted invocation times.
struct Model {
    n: usize,
    inv: Vec<u64>,
    resp: Vec<u64>,
    op: Vec<Op>,
    orig: Vec<usize>,
    /// `win[win_at[p]..win_at[p + 1]]`: the ok ops j > p with inv[j] <= resp[p], ascending.
    win_at: Vec<usize>,
    win: Vec<u32>,
    kind_op: Vec<Op>,
    kind_inv: Vec<Vec<u64>>,
    kind_of: HashMap<Op, u32>,
    /// Per state: the kind of the info writes of it; the info CAS kinds into and out of it.
    w_kind: Vec<u32>,
    cas_in: Vec<Vec<u32>>,
    cas_out: Vec<Vec<u32>>,
    vals: Vec<Option<i64>>,
    demand: Vec<Demand>,
}

impl Model {
    fn new(ops: &KeyHistory) -> Result<Model, String> {
        let (mut ids, mut vals) = (HashMap::new(), vec![None]);
        let mut id = |v: i64| {
            *ids.entry(v).or_insert_with(|| {
                vals.push(Some(v));
                vals.len() as u32 - 1
            })
        };
        let (mut ok, mut info) = (Vec::new(), Vec::new());
        for (i, inv, resp, op) in prune(ops) {
            let o = match op {
                RegOp::Read(v) => Op::Read(v.map_or(0, &mut id)),
                RegOp::Write(v) => Op::Write(id(v)),
                RegOp::CasOk(a, b) => Op::Cas(id(a), id(b)),
                RegOp::CasUnknown(a, b) => Op::CasUnk(id(a), id(b)),
            };
            match resp {
                INFO => info.push((inv, o)),
                _ => ok.push((resp, inv, i, o)),
            }
        }
        let mut made = vec![false; vals.len()];
        for o in ok.iter().map(|x| x.3).chain(info.iter().map(|x| x.1)) {
            if let Op::Write(b) | Op::Cas(_, b) | Op::CasUnk(_, b) = o {
                made[b as usize] = true;
            }
        }
        for &(resp, inv, i, o) in &ok {
            if let Op::Read(a @ 1..) | Op::Cas(a, _) = o {
                if !made[a as usize] {
                    let (op, v) = (&ops[i].2, vals[a as usize]);
                    return Err(format!(
                        "op {i} {op:?} [{inv}, {resp}] needs {v:?}, never written"
                    ));
                }
            }
        }
        ok.sort_unstable_by_key(|&(r, v, i, _)| (r, v, i));
        let resp: Vec<u64> = ok.iter().map(|x| x.0).collect();
        let inv: Vec<u64> = ok.iter().map(|x| x.1).collect();
        let (win_at, win) = windows(&inv, &resp);
        let ns = vals.len();
        let mut m = Model {
            n: ok.len(),
            op: ok.iter().map(|x| x.3).collect(),
            orig: ok.iter().map(|x| x.2).collect(),
            inv,
            resp,
            win_at,
            win,
            kind_op: vec![],
            kind_inv: vec![],
            kind_of: HashMap::new(),
            w_kind: vec![NONE; ns],
            cas_in: vec![vec![]; ns],
            cas_out: vec![vec![]; ns],
            vals,
            demand: vec![],
        };
        m.add_tokens(info);
        m.demand = demands(&m);
        match (0..ns).find_map(|v| m.demand[v].deficit(&m, v, ops)) {
            Some(why) => Err(why),
            None => Ok(m),
        }
    }

    fn add_tokens(&mut self, mut info: Vec<(u64, Op)>) {
        info.sort_unstable_by_key(|x| x.0);
        for (t, o) in info {
            let next = self.kind_op.len() as u32;
            let k = *self.kind_of.entry(o).or_insert(next);
            if k == next {
                self.kind_op.push(o);
                self.kind_inv.push(vec![]);
                match o {
                    Op::Write(v) => self.w_kind[v as usize] = k,
                    Op::CasUnk(a, b) => {
                        self.cas_out[a as usize].push(k);
                        self.cas_in[b as usize].push(k);
                    }
                    _ => unreachable!("only info writes and CASes are left"),
                }
            }
            self.kind_inv[k as usize].push(t);
        }
    }

    /// How many ops of token kind k are usable once the ops responding before t are done.
    fn avail(&self, k: u32, t: u64) -> u32 {
        self.kind_inv[k as usize].partition_point(|&x| x <= t) as u32
    }

    /// The (from, to) states of a token kind (from = NONE for a write).
    fn ends(&self, k: u32) -> (u32, u32) {
        match self.kind_op[k as usize] {
            Op::Write(v) => (NONE, v),
            Op::CasUnk(a, b) => (a, b),
            _ => unreachable!("tokens are writes and CASes"),
        }
    }

    /// The memo class of state s at time t in pass 1: NONE if a usable info write makes s.
    fn class(&self, s: u32, t: u64) -> u32 {
        match self.w_kind[s as usize] {
            k if k != NONE && self.kind_inv[k as usize][0] <= t => NONE,
            _ => s,
        }
    }
}

/// For each ok op p (sorted by response), the later ops invoked no later than its response.
fn windows(inv: &[u64], resp: &[u64]) -> (Vec<usize>, Vec<u32>) {
    let n = inv.len();
    let lo: Vec<usize> = (0..n)
        .map(|j| resp.partition_point(|&r| r < inv[j]).min(j))
        .collect();
    let mut at = vec![0usize; n + 1];
    (0..n).for_each(|j| (lo[j]..j).for_each(|p| at[p + 1] += 1));
    (0..n).for_each(|p| at[p + 1] += at[p]);
    let (mut fill, mut win) = (at.clone(), vec![0u32; at[n]]);
    for (j, &l) in lo.iter().enumerate() {
        for f in &mut fill[l..j] {
            win[*f] = j as u32;
            *f += 1;
        }
    }
    (at, win)
}

/// Decides whether one key's history is linearizable, or gives up with `Unknown` once `deadline`
/// has passed. Failed operations must already be removed.
pub fn check(ops: &KeyHistory, deadline: Instant) -> Outcome {
    if Instant::now() >= deadline {
        return Outcome::Unknown;
    }
    let m = match Model::new(ops) {
        Ok(m) => m,
        Err(why) => return Outcome::NotLinearizable(why),
    };
    let mut search = Search::new(&m, false, deadline);
    let mut end = search.run();
    if let End::Found(false) = end {
        search = Search::new(&m, true, deadline);
        end = search.run();
    }
    match end {
        End::Found(_) => Outcome::Linearizable,
        End::Dead => Outcome::NotLinearizable(search.explain(ops)),
        End::Timeout | End::Restart => Outcome::Unknown,
    }
}
