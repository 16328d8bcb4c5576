//! Generated histories for tests and `metaraft-jepsen check-bench`.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{KeyHistory, RegOp};

/// A history of `n_ops` operations from a simulated linearizable register: `n_procs` clients,
/// random latencies (a 5% tail up to 20 ms, so many overlaps), 50% reads, 30% writes, 20% CAS,
/// values 0..5. A share of the writes and CASes (so that about `info_fraction` of the history
/// is `info`) lose their response: each took effect, or not, at random, possibly after its client
/// gave up on it. Failed CASes are left out, as the caller does. Linearizable by construction:
/// results come from applying the ops in the order of their linearization points.
pub fn generate(seed: u64, n_ops: usize, n_procs: usize, info_fraction: f64) -> KeyHistory {
    let mut rng = StdRng::seed_from_u64(seed);
    let q = (info_fraction * 2.0).clamp(0.0, 1.0);
    let per = 2 * n_ops / n_procs.max(1) + 8;
    let mut raw = Vec::with_capacity(per * n_procs.max(1));
    let lat = |rng: &mut StdRng| match rng.gen_bool(0.05) {
        true => rng.gen_range(0..20_000_000u64),
        false => rng.gen_range(10_000..1_000_000u64),
    };
    for _ in 0..n_procs.max(1) {
        let mut t: u64 = rng.gen_range(0..1_000_000);
        for _ in 0..per {
            let inv = t + rng.gen_range(0..200_000);
            let kind = [0, 0, 0, 0, 0, 1, 1, 1, 2, 2][rng.gen_range(0..10)];
            let (a, b) = (rng.gen_range(0..5i64), rng.gen_range(0..5i64));
            let info = kind != 0 && rng.gen_bool(q);
            let lin = inv + lat(&mut rng);
            let resp = lin + lat(&mut rng);
            let effect = !info || rng.gen_bool(0.5);
            raw.push((lin, inv, resp, kind, a, b, info, effect));
            t = if info { inv + 5_000_000 } else { resp };
        }
    }
    raw.sort_by_key(|r| r.0);
    let (mut state, mut out) = (None, Vec::with_capacity(n_ops));
    for (_, inv, resp, kind, a, b, info, effect) in raw {
        if out.len() == n_ops {
            break;
        }
        let resp = if info { u64::MAX } else { resp };
        let op = match kind {
            0 => Some(RegOp::Read(state)),
            1 => {
                state = if effect { Some(a) } else { state };
                Some(RegOp::Write(a))
            }
            _ => {
                let hit = state == Some(a);
                state = if hit && effect { Some(b) } else { state };
                match (info, hit) {
                    (true, _) => Some(RegOp::CasUnknown(a, b)),
                    (false, true) => Some(RegOp::CasOk(a, b)),
                    (false, false) => None,
                }
            }
        };
        out.extend(op.map(|op| (inv, resp, op)));
    }
    out.sort_by_key(|o| o.0);
    out
}

/// Makes a history certainly non-linearizable: at the invocation time T of a random op in its
/// middle half, adds a stale read of fresh values X, Y (used nowhere else): write X in [T, T+1],
/// write Y in [T+2, T+3], read X in [T+4, T+5]. Only the first write makes the state X, and the
/// second one, which follows it in real time, overwrites it before the read, which follows both.
pub fn corrupt(h: &mut KeyHistory, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let values = h.iter().flat_map(|(_, _, op)| match *op {
        RegOp::Read(v) => [v.unwrap_or(0), 0],
        RegOp::Write(v) => [v, v],
        RegOp::CasOk(a, b) | RegOp::CasUnknown(a, b) => [a, b],
    });
    let x = values.max().unwrap_or(0) + 1;
    let t = match h.len() {
        0 => 0,
        n => h[rng.gen_range(n / 4..=n * 3 / 4)].0,
    };
    h.push((t, t + 1, RegOp::Write(x)));
    h.push((t + 2, t + 3, RegOp::Write(x + 1)));
    h.push((t + 4, t + 5, RegOp::Read(Some(x))));
    h.sort_by_key(|o| o.0);
}
