use super::*;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::time::Duration;
use RegOp::*;

fn lin(h: &[(u64, u64, RegOp)]) -> Outcome {
    check(&h.to_vec(), Instant::now() + Duration::from_secs(10))
}

const INFO: u64 = u64::MAX;

#[test]
fn hand_written_cases() {
    let ok = Outcome::Linearizable;
    assert_eq!(lin(&[(0, 1, Write(1)), (2, 3, Read(Some(1)))]), ok);
    // A stale read, a lost write, a duplicated CAS.
    let stale = [(0, 1, Write(1)), (2, 3, Write(2)), (4, 5, Read(Some(1)))];
    assert_ne!(lin(&stale), ok);
    assert_ne!(lin(&[(0, 1, Write(5)), (2, 3, Read(None))]), ok);
    let dup = [
        (0, 1, Write(0)),
        (2, 3, CasOk(0, 1)),
        (4, 5, CasOk(1, 2)),
        (6, 7, CasOk(0, 1)),
    ];
    assert_ne!(lin(&dup), ok);
    // An unknown write may or may not apply, but once seen it cannot be unseen.
    let mut h = vec![(0, 1, Write(1)), (2, INFO, Write(9)), (4, 5, Read(Some(1)))];
    h.push((6, 7, Read(Some(9))));
    assert_eq!(lin(&h), ok);
    h.push((8, 9, Read(Some(1))));
    assert_ne!(lin(&h), ok);
    // Concurrent ops may reorder.
    let h = [
        (0, 3, Write(1)),
        (1, 2, Read(Some(1))),
        (4, 5, Write(2)),
        (6, 7, Read(Some(2))),
    ];
    assert_eq!(lin(&h), ok);
    // Touching intervals are concurrent; an unknown CAS applies only from its old value.
    assert_eq!(lin(&[(0, 2, Write(1)), (2, 3, Read(None))]), ok);
    let h = [
        (0, 1, Write(1)),
        (2, INFO, CasUnknown(2, 3)),
        (4, 5, Read(Some(3))),
    ];
    assert_ne!(lin(&h), ok);
    let h = [
        (0, 1, Write(2)),
        (2, INFO, CasUnknown(2, 3)),
        (4, 5, Read(Some(3))),
    ];
    assert_eq!(lin(&h), ok);
    // An unknown op takes effect no earlier than its invocation.
    assert_ne!(lin(&[(0, 1, Read(Some(4))), (2, INFO, Write(4))]), ok);
}

/// Every order of the ops that respects real time, each info op placed anywhere or nowhere.
fn brute(h: &KeyHistory, done: &mut Vec<bool>, s: Option<i64>) -> bool {
    if (0..h.len()).all(|i| done[i] || h[i].1 == INFO) {
        return true;
    }
    for i in 0..h.len() {
        let blocked = (0..h.len()).any(|j| !done[j] && j != i && h[j].1 < h[i].0);
        if done[i] || blocked {
            continue;
        }
        let next = match h[i].2 {
            Read(v) => (v == s).then_some(s),
            Write(v) => Some(Some(v)),
            CasOk(a, b) => (s == Some(a)).then_some(Some(b)),
            CasUnknown(a, b) => Some(if s == Some(a) { Some(b) } else { s }),
        };
        if let Some(n) = next {
            done[i] = true;
            let found = brute(h, done, n);
            done[i] = false;
            if found {
                return true;
            }
        }
    }
    false
}

type Raw = (u64, u64, bool, u8, i64, i64);

fn small(raw: Vec<Raw>) -> KeyHistory {
    let op = |k: u8, a: i64, b: i64| match k {
        0 => Read(Some(a)),
        1 => Read(None),
        2 | 3 => Write(a),
        4 => CasOk(a, b),
        _ => CasUnknown(a, b),
    };
    let end = |inv: u64, len: u64, info: bool| if info { INFO } else { inv + len };
    raw.into_iter()
        .map(|(i, l, info, k, a, b)| (i, end(i, l, info), op(k, a, b)))
        .collect()
}

fn agrees(h: &KeyHistory) -> Result<bool, TestCaseError> {
    let want = brute(h, &mut vec![false; h.len()], None);
    let got = lin(h);
    prop_assert_eq!(got == Outcome::Linearizable, want, "{:?} on {:?}", got, h);
    Ok(want)
}

fn raw() -> impl Strategy<Value = Vec<Raw>> {
    let op = (
        0u64..12,
        0u64..8,
        prop::bool::weighted(0.3),
        0u8..6,
        0i64..3,
        0i64..3,
    );
    prop::collection::vec(op, 0..=7)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]
    #[test]
    fn agrees_with_brute_force(raw in raw()) {
        agrees(&small(raw))?;
    }

    #[test]
    fn agrees_with_brute_force_on_generated(seed: u64, n in 1usize..8, p in 1usize..4) {
        let mut h = generate(seed, n, p, 0.3);
        if seed % 2 == 0 {
            let i = (seed / 2) as usize % h.len();
            h[i].2 = match h[i].2 { Read(v) => Read(v.map_or(Some(0), |v| Some((v + 1) % 5))), ref o => o.clone() };
        }
        agrees(&h)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]
    #[test]
    fn generated_histories_are_linearizable(
        seed: u64, n in 0usize..400, p in 1usize..8, info in 0.0f64..0.6,
    ) {
        prop_assert_eq!(lin(&generate(seed, n, p, info)), Outcome::Linearizable);
    }
}

#[test]
fn both_verdicts_are_common_among_random_small_histories() {
    let mut rng = StdRng::seed_from_u64(7);
    let mut valid = 0;
    for _ in 0..20_000 {
        let n = rng.gen_range(0..=7);
        let r = (0..n).map(|_| {
            let (i, l, info) = (rng.gen_range(0..12), rng.gen_range(0..8), rng.gen_bool(0.3));
            (
                i,
                l,
                info,
                rng.gen_range(0..6),
                rng.gen_range(0..3),
                rng.gen_range(0..3),
            )
        });
        valid += agrees(&small(r.collect())).unwrap() as usize;
    }
    assert!((4_000..16_000).contains(&valid), "{valid} of 20000 valid");
}

#[test]
fn corrupted_histories_are_not_linearizable() {
    for seed in 0..12 {
        let mut h = generate(seed, 3_000, 1 + seed as usize % 8, 0.1 * (seed % 4) as f64);
        assert_eq!(lin(&h), Outcome::Linearizable);
        let mut dup = h.clone();
        corrupt(&mut h, seed);
        assert!(
            matches!(lin(&h), Outcome::NotLinearizable(_)),
            "seed {seed}"
        );
        // A CAS succeeding twice on a value written once: found by the search itself.
        duplicate_cas(&mut dup, seed);
        assert!(
            matches!(lin(&dup), Outcome::NotLinearizable(_)),
            "seed {seed}"
        );
    }
}

fn duplicate_cas(h: &mut KeyHistory, seed: u64) {
    let t = h[h.len() / 3 + seed as usize % (h.len() / 3)].0;
    h.extend([(t, t + 1, Write(99)), (t + 2, t + 3, CasOk(99, 98))]);
    h.push((t + 2, t + 3, CasOk(99, 98)));
}

#[test]
fn deadline_gives_unknown_promptly() {
    let mut h = generate(3, 100_000, 20, 0.0);
    duplicate_cas(&mut h, 3); // decided only after a search of minutes
    let slack = Duration::from_millis(if cfg!(debug_assertions) { 2_000 } else { 100 });
    for wait in [0, 50] {
        let t0 = Instant::now();
        assert_eq!(
            check(&h, t0 + Duration::from_millis(wait)),
            Outcome::Unknown
        );
        let late = t0.elapsed().saturating_sub(Duration::from_millis(wait));
        assert!(late < slack, "{late:?} late");
    }
}
