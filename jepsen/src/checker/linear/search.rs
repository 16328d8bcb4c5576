//! The memoised depth-first search over configurations (see the module docs of `linear`).

use super::*;

/// A configuration: ok ops 0..p and those in `set` (all > p) are linearized; the state is s.
#[derive(Clone)]
struct Cfg {
    p: u32,
    s: u32,
    set: Vec<u32>,
}

impl Cfg {
    fn add(&mut self, j: u32) {
        if j == self.p {
            let run = self
                .set
                .iter()
                .enumerate()
                .take_while(|&(i, &x)| x == j + 1 + i as u32);
            let k = run.count();
            self.p += 1 + k as u32;
            self.set.drain(..k);
        } else if let Err(i) = self.set.binary_search(&j) {
            self.set.insert(i, j);
        }
    }
}

/// Use the tokens of `chain` (in order), then linearize ok op j, leaving state `to`.
#[derive(Clone)]
struct Move {
    j: u32,
    to: u32,
    chain: Vec<u32>,
    /// Pass 1: the chain uses a kind none of whose ops is left on this path.
    short: bool,
}

impl Move {
    fn new(j: u32, to: u32, chain: Vec<u32>, short: bool) -> Move {
        Move {
            j,
            to,
            chain,
            short,
        }
    }
}

struct Frame {
    c: Cfg,
    moves: Vec<Move>,
    next: usize,
    via: Move,
}

pub(super) enum End {
    /// A linearization; `true` if it used only tokens that were left (always, in pass 2).
    Found(bool),
    Dead,
    Timeout,
    Restart,
}

pub(super) struct Search<'a> {
    m: &'a Model,
    /// Pass 2: count tokens. Pass 1: a kind is usable once one of its ops is.
    exact: bool,
    deadline: Instant,
    steps: u64,
    limit: u64,
    round: u32,
    timed_out: bool,
    /// Tokens used on the current path, per kind and per state they make.
    used: Vec<u32>,
    used_to: Vec<u32>,
    /// The kinds with used > 0, in the order they became so.
    touched: Vec<u32>,
    shorts: usize,
    /// Configurations entered in this round, and those proved dead in any round.
    memo: KeySet,
    dead: KeySet,
    stack: Vec<Frame>,
    /// (ops linearized, p, s) of the configuration that got furthest.
    best: (usize, u32, u32),
}

impl<'a> Search<'a> {
    pub(super) fn new(m: &'a Model, exact: bool, deadline: Instant) -> Self {
        let (used, used_to) = (vec![0; m.kind_op.len()], vec![0; m.vals.len()]);
        let (steps, limit, round, timed_out, touched, shorts) = (0, 0, 0, false, vec![], 0);
        let (memo, dead, stack, best) = (KeySet::default(), KeySet::default(), vec![], (0, 0, 0));
        Search {
            m,
            exact,
            deadline,
            steps,
            limit,
            round,
            timed_out,
            used,
            used_to,
            touched,
            shorts,
            memo,
            dead,
            stack,
            best,
        }
    }

    fn tick(&mut self) -> bool {
        if self.steps.is_multiple_of(256) && Instant::now() >= self.deadline {
            self.timed_out = true;
        }
        self.steps += 1;
        self.timed_out
    }

    fn key(&self, c: &Cfg) -> Vec<u32> {
        let s = if self.exact {
            c.s
        } else {
            self.m.class(c.s, self.m.resp[c.p as usize])
        };
        let mut k = vec![c.p, s, c.set.len() as u32];
        k.extend_from_slice(&c.set);
        if self.exact {
            let mut t = self.touched.clone();
            t.sort_unstable();
            t.iter().for_each(|&x| k.extend([x, self.used[x as usize]]));
        }
        k
    }

    fn candidates(&self, c: &Cfg) -> Vec<u32> {
        let win = &self.m.win[self.m.win_at[c.p as usize]..self.m.win_at[c.p as usize + 1]];
        let rest = win.iter().filter(|j| c.set.binary_search(j).is_err());
        std::iter::once(c.p).chain(rest.copied()).collect()
    }

    /// Linearizes at once the candidates that cannot change the state (see the module doc).
    fn absorb(&self, c: &mut Cfg) {
        while (c.p as usize) < self.m.n {
            let p = c.p;
            for j in self.candidates(c) {
                match self.m.op[j as usize] {
                    Op::Read(v) if v == c.s => c.add(j),
                    Op::Cas(a, b) if a == b && a == c.s => c.add(j),
                    Op::CasUnk(a, b) if a == b => c.add(j),
                    _ => {}
                }
            }
            if c.p == p {
                return;
            }
        }
    }

    fn usable(&self, k: u32, t: u64, counted: bool) -> bool {
        self.m.avail(k, t) > if counted { self.used[k as usize] } else { 0 }
    }

    /// The first token of a chain from s that reaches y: CAS(s, y) if usable, else a write of y.
    fn first(&self, s: u32, y: u32, t: u64, counted: bool) -> Option<u32> {
        let cas = self.m.kind_of.get(&Op::CasUnk(s, y)).copied();
        let w = Some(self.m.w_kind[y as usize]).filter(|&k| k != NONE);
        let cas = cas.filter(|&k| self.usable(k, t, counted));
        cas.or_else(|| w.filter(|&k| self.usable(k, t, counted)))
    }

    /// Pass 1: a shortest chain from state s to `target` (breadth first, backwards).
    fn bfs_chain(&self, s: u32, target: u32, t: u64, counted: bool) -> Option<Vec<u32>> {
        let (mut next, mut q) = (HashMap::from([(target, NONE)]), VecDeque::from([target]));
        while let Some(y) = q.pop_front() {
            if let Some(k) = self.first(s, y, t, counted) {
                let (mut chain, mut z) = (vec![k], y);
                while next[&z] != NONE {
                    chain.push(next[&z]);
                    z = self.m.ends(next[&z]).1;
                }
                return Some(chain);
            }
            for &k in &self.m.cas_in[y as usize] {
                let x = self.m.ends(k).0;
                if x != s && !next.contains_key(&x) && self.usable(k, t, counted) {
                    next.insert(x, k);
                    q.push_back(x);
                }
            }
        }
        None
    }

    /// Pass 2: every chain from s to `target` whose tokens are left (depth first, backwards).
    fn all_chains(&mut self, s: u32, target: u32, t: u64) -> Vec<Vec<u32>> {
        let (mut out, mut st) = (vec![], vec![(target, Vec::new())]);
        while let Some((y, rest)) = st.pop() {
            if self.tick() {
                break;
            }
            let with = |k: u32| {
                std::iter::once(k)
                    .chain(rest.iter().copied())
                    .collect::<Vec<_>>()
            };
            out.extend(self.first(s, y, t, true).map(with));
            for &k in &self.m.cas_in[y as usize] {
                let x = self.m.ends(k).0;
                let on_path = x == y || rest.iter().any(|&e| self.m.ends(e).1 == x);
                if x != s && !on_path && self.usable(k, t, true) {
                    st.push((x, with(k)));
                }
            }
        }
        out
    }

    /// Moves for op j, reaching state `need` first, then leaving state `to`.
    fn push_chains(&mut self, c: &Cfg, j: u32, need: u32, to: u32, out: &mut Vec<Move>) {
        let t = self.m.resp[c.p as usize];
        if need == c.s {
            out.push(Move::new(j, to, vec![], false));
        } else if self.exact {
            let chains = self.all_chains(c.s, need, t);
            out.extend(
                chains
                    .into_iter()
                    .map(|chain| Move::new(j, to, chain, false)),
            );
        } else if let Some(chain) = self.bfs_chain(c.s, need, t, true) {
            out.push(Move::new(j, to, chain, false));
        } else if let Some(chain) = self.bfs_chain(c.s, need, t, false) {
            out.push(Move::new(j, to, chain, true));
        }
    }

    /// A guess at where op j linearizes, to order moves: its response in the first round, the
    /// middle of its interval in the second, a random point of it after that.
    fn guess(&self, j: u32) -> u64 {
        let (a, b) = (self.m.inv[j as usize], self.m.resp[j as usize]);
        let f = match self.round {
            0 => 256,
            1 => 128,
            r => KeySet::hash(&[j, r]) >> 56,
        };
        a + ((b - a) as u128 * f as u128 / 256) as u64
    }

    /// The moves from configuration c, most promising first.
    fn moves(&mut self, c: &Cfg) -> Vec<Move> {
        let (s, t, mut out) = (c.s, self.m.resp[c.p as usize], Vec::new());
        for j in self.candidates(c) {
            match self.m.op[j as usize] {
                Op::Write(v) => out.push(Move::new(j, v, vec![], false)),
                Op::Read(v) => self.push_chains(c, j, v, v, &mut out),
                Op::Cas(a, b) => self.push_chains(c, j, a, b, &mut out),
                Op::CasUnk(a, b) => {
                    out.push(Move::new(j, if s == a { b } else { s }, vec![], false));
                    let outs = self.m.cas_out[a as usize].iter().map(|&k| self.m.ends(k).1);
                    for x in std::iter::once(a).chain(outs.collect::<Vec<_>>()) {
                        if x != s {
                            self.push_chains(c, j, x, if x == a { b } else { x }, &mut out);
                        }
                    }
                }
            }
        }
        out.sort_by_cached_key(|mv| (mv.short, mv.chain.len(), self.guess(mv.j)));
        let first = out.first().filter(|mv| {
            !mv.short
                && match self.m.op[mv.j as usize] {
                    Op::Read(_) => true,
                    Op::CasUnk(..) => false,
                    _ => self.m.class(mv.to, t) == NONE,
                }
        });
        match first {
            Some(mv) if !self.exact && self.m.class(s, t) == NONE => vec![mv.clone()],
            _ => out,
        }
    }

    /// Takes (or gives back) the tokens of a move's chain.
    fn spend(&mut self, mv: &Move, take: bool) {
        for i in 0..mv.chain.len() {
            let k = mv.chain[if take { i } else { mv.chain.len() - 1 - i }];
            let (v, u) = (self.m.ends(k).1 as usize, &mut self.used[k as usize]);
            if take {
                (*u, self.used_to[v]) = (*u + 1, self.used_to[v] + 1);
                if *u == 1 {
                    self.touched.push(k);
                }
            } else {
                (*u, self.used_to[v]) = (*u - 1, self.used_to[v] - 1);
                if *u == 0 {
                    debug_assert_eq!(self.touched.last(), Some(&k));
                    self.touched.pop();
                }
            }
        }
        self.shorts = if take {
            self.shorts + mv.short as usize
        } else {
            self.shorts - mv.short as usize
        };
    }

    /// Goes to configuration c by `via`, unless c was entered before or is known dead.
    fn enter(&mut self, mut c: Cfg, via: Move) -> Option<End> {
        self.spend(&via, true);
        self.absorb(&mut c);
        if c.p as usize == self.m.n {
            return Some(End::Found(self.shorts == 0));
        }
        let t = self.m.resp[c.p as usize];
        let short = |k: &u32| {
            let v = self.m.ends(*k).1 as usize;
            self.m.demand[v].short(t, self.used_to[v])
        };
        let key = self.key(&c);
        if (self.exact && via.chain.iter().any(short))
            || self.dead.contains(&key)
            || !self.memo.insert(&key)
        {
            self.spend(&via, false);
            return None;
        }
        if c.p as usize + c.set.len() > self.best.0 {
            self.best = (c.p as usize + c.set.len(), c.p, c.s);
        }
        let moves = self.moves(&c);
        self.stack.push(Frame {
            c,
            moves,
            next: 0,
            via,
        });
        None
    }

    /// Depth-first rounds, each with twice the step budget of the one before.
    pub(super) fn run(&mut self) -> End {
        let mut budget = 4 * self.m.n as u64 + 100_000;
        loop {
            self.limit = self.steps + budget;
            match self.dfs() {
                End::Restart => budget *= 2,
                end => return end,
            }
            while let Some(f) = self.stack.pop() {
                self.spend(&f.via, false);
            }
            (self.memo, self.round) = (KeySet::default(), self.round + 1);
        }
    }

    fn dfs(&mut self) -> End {
        let root = Cfg {
            p: 0,
            s: 0,
            set: vec![],
        };
        if let Some(end) = self.enter(root, Move::new(0, 0, vec![], false)) {
            return end;
        }
        while let Some(top) = self.stack.last_mut() {
            if top.next == top.moves.len() {
                // A move list built after the deadline may be cut short: never call it dead.
                if self.timed_out {
                    return End::Timeout;
                }
                let f = self.stack.pop().expect("a frame");
                self.dead.insert(&self.key(&f.c));
                self.spend(&f.via, false);
                continue;
            }
            let mv = top.moves[top.next].clone();
            top.next += 1;
            let mut c = top.c.clone();
            c.add(mv.j);
            c.s = mv.to;
            if let Some(end) = self.enter(c, mv) {
                return end;
            }
            if self.tick() {
                return End::Timeout;
            }
            if self.steps > self.limit {
                return End::Restart;
            }
        }
        if self.timed_out {
            return End::Timeout;
        }
        End::Dead
    }

    pub(super) fn explain(&self, ops: &KeyHistory) -> String {
        let (m, (done, p, s)) = (self.m, self.best);
        let (i, j) = (m.orig[p as usize], p as usize);
        format!(
            "no linearization gets past op {i} {:?} [{}, {}]: at most {done} of the {} completed \
             ops linearize before it, leaving the register {:?}",
            ops[i].2, m.inv[j], m.resp[j], m.n, m.vals[s as usize]
        )
    }
}
