//! Unit tests and a model-based proptest of `apply` against a naive in-memory model.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::*;

/// A `StateRead` over a BTreeMap, applying mutations the way storage does.
#[derive(Default)]
pub(crate) struct MemState(pub(crate) BTreeMap<Vec<u8>, Vec<u8>>);

impl StateRead for MemState {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        Ok(self.0.get(key).cloned())
    }
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::fsm::KvPairs, FsmError> {
        if start >= end {
            return Ok(Vec::new());
        }
        Ok(self
            .0
            .range(start.to_vec()..end.to_vec())
            .take(limit)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect())
    }
}

impl Staging for MemState {
    fn state(&self) -> impl StateRead + '_ {
        self
    }
    fn stage(&mut self, mutations: Vec<Mutation>) {
        self.write(mutations.into_iter());
    }
}

impl MemState {
    pub(crate) fn run(&mut self, index: u64, req: &Request, window: u64) -> Response {
        self.run_with(index, req, Dedup::window(window))
    }
    pub(crate) fn run_with(&mut self, index: u64, req: &Request, dedup: Dedup) -> Response {
        self.try_run(index, req, dedup).expect("apply").response
    }
    pub(crate) fn try_run(
        &mut self,
        index: u64,
        req: &Request,
        dedup: Dedup,
    ) -> Result<Applied, FsmError> {
        apply_entry::<()>(self, index, Payload::Normal(req), dedup)
    }
    pub(crate) fn write(&mut self, muts: impl Iterator<Item = Mutation>) {
        for m in muts {
            match m {
                Mutation::Put(k, v) => {
                    self.0.insert(k, v);
                }
                Mutation::Delete(k) => {
                    self.0.remove(&k);
                }
                Mutation::DeleteRange(start, end) => {
                    self.0.retain(|k, _| k < &start || k >= &end);
                }
            }
        }
    }
    fn value(&self, key: &[u8]) -> Option<ValueRecord> {
        self.0
            .get(&keys::data(key))
            .map(|raw| crate::codec::decode(raw).expect("decode"))
    }
}

fn put(key: &str, value: &str, expected: Option<u64>) -> Command {
    Command::Put {
        key: key.into(),
        value: value.into(),
        expected_revision: expected,
    }
}

#[test]
fn put_sets_revisions_and_versions() {
    let mut s = MemState::default();
    assert_eq!(
        s.run(3, &Request::new("", put("a", "1", None)), 100),
        Response::Put {
            revision: 3,
            prev_revision: 0
        }
    );
    assert_eq!(
        s.run(5, &Request::new("", put("a", "2", None)), 100),
        Response::Put {
            revision: 5,
            prev_revision: 3
        }
    );
    let v = s.value(b"a").expect("present");
    assert_eq!(
        (
            v.value.as_slice(),
            v.create_revision,
            v.mod_revision,
            v.version
        ),
        (&b"2"[..], 3, 5, 2)
    );
}

#[test]
fn compare_and_set_fails_cleanly() {
    let mut s = MemState::default();
    s.run(1, &Request::new("", put("a", "1", Some(0))), 100);
    let r = s.run(2, &Request::new("", put("a", "2", Some(0))), 100);
    assert_eq!(
        r,
        Response::RevisionMismatch {
            revision: 2,
            expected: 0,
            actual: 1
        }
    );
    assert_eq!(s.value(b"a").expect("present").value, b"1");
    let r = s.run(3, &Request::new("", put("a", "3", Some(1))), 100);
    assert_eq!(
        r,
        Response::Put {
            revision: 3,
            prev_revision: 1
        }
    );
}

#[test]
fn retried_request_id_applies_once() {
    let mut s = MemState::default();
    let req = Request::new("req-1", put("a", "1", None));
    let first = s.run(1, &req, 100);
    s.run(2, &Request::new("", put("a", "other", None)), 100);
    let retry = s.run(3, &req, 100);
    assert_eq!(first, retry);
    assert_eq!(
        s.value(b"a").expect("present").value,
        b"other",
        "the retry must not write again"
    );
}

#[test]
fn request_ids_expire_after_window() {
    let mut s = MemState::default();
    s.run(1, &Request::new("id", put("a", "1", None)), 10);
    for i in 2..20 {
        s.run(i, &Request::new("", put("b", "x", None)), 10);
    }
    assert!(
        s.0.keys().all(|k| k[0] != keys::SM_DEDUP_BUCKET),
        "the expired id's bucket was dropped"
    );
    assert!(s.0.keys().all(|k| k[0] != keys::SM_DEDUP_QUEUE));
}

/// A retry is answered from the first result for exactly `window` entries, at every offset
/// within a bucket, and applies anew from then on.
#[test]
fn request_ids_are_remembered_for_exactly_the_window() {
    for window in [1u64, 2, 3, 7] {
        for first in 1..(3 * window + 2) {
            for gap in 1..(2 * window + 2) {
                let mut s = MemState::default();
                let req = Request::new("id", put("a", "1", None));
                s.run(first, &req, window);
                for i in first + 1..first + gap {
                    s.run(i, &Request::new("", put("b", "x", None)), window);
                }
                let retry = s.run(first + gap, &req, window);
                let applied_again = retry
                    == Response::Put {
                        revision: first + gap,
                        prev_revision: first,
                    };
                assert_eq!(
                    applied_again,
                    gap >= window,
                    "window {window}, first {first}, retry {gap} entries later: {retry:?}"
                );
            }
        }
    }
}

/// Records of the first layout (`r` + id with a `q` queue key) are still answered and expired on
/// time while `legacy` is set, and nothing of that layout is written any more.
#[test]
fn first_layout_records_are_still_remembered_and_expired() {
    let window = 5;
    let mut s = MemState::default();
    let first = Response::Put {
        revision: 3,
        prev_revision: 0,
    };
    let rec = DedupRecord {
        index: 3,
        response: first.clone(),
    };
    s.0.insert(keys::dedup("old"), encode(&rec).expect("encode"));
    s.0.insert(keys::dedup_queue(3).to_vec(), b"old".to_vec());
    let legacy = Dedup {
        window,
        legacy: true,
    };
    let req = Request::new("old", put("a", "1", None));
    // Remembered through index 7 (3 + 5 > 7) ...
    assert_eq!(s.run_with(7, &req, legacy), first);
    assert!(s.value(b"a").is_none(), "the retry wrote nothing");
    // ... expired at index 8 with its queue key, and applied anew.
    let again = s.run_with(8, &req, legacy);
    assert_eq!(
        again,
        Response::Put {
            revision: 8,
            prev_revision: 0
        }
    );
    assert!(!s.0.contains_key(&keys::dedup("old")));
    assert!(!s.0.contains_key(keys::dedup_queue(3).as_slice()));
    assert!(s
        .0
        .keys()
        .all(|k| k[0] != keys::SM_DEDUP && k[0] != keys::SM_DEDUP_QUEUE));
    assert!(s.0.contains_key(&keys::dedup_at(8 / window, "old")));
}

#[test]
fn txn_is_atomic_and_sees_its_own_writes() {
    let mut s = MemState::default();
    s.run(1, &Request::new("", put("a", "1", None)), 100);
    let txn = Command::Txn {
        compares: vec![Compare::Value {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
        }],
        success: vec![
            Op::Put {
                key: b"b".to_vec(),
                value: b"x".to_vec(),
            },
            Op::Put {
                key: b"b".to_vec(),
                value: b"y".to_vec(),
            },
            Op::Delete { key: b"a".to_vec() },
        ],
        failure: vec![Op::Put {
            key: b"f".to_vec(),
            value: b"1".to_vec(),
        }],
    };
    assert_eq!(
        s.run(2, &Request::new("", txn.clone()), 100),
        Response::Txn {
            revision: 2,
            succeeded: true
        }
    );
    let b = s.value(b"b").expect("b");
    assert_eq!((b.value.as_slice(), b.version), (&b"y"[..], 2));
    assert!(s.value(b"a").is_none());
    assert_eq!(
        s.run(3, &Request::new("", txn), 100),
        Response::Txn {
            revision: 3,
            succeeded: false
        }
    );
    assert!(s.value(b"f").is_some());
}

#[test]
fn debug_output_never_shows_keys_or_values() {
    let r = Request::new("id", put("secret-key", "secret-value", None));
    let s = format!("{r:?}");
    assert!(!s.contains("secret"), "{s}");
    assert!(s.contains("<10 bytes>") && s.contains("<12 bytes>"), "{s}");
}

#[test]
fn newer_format_is_refused_not_applied() {
    let mut s = MemState::default();
    let mut req = Request::new("", put("a", "1", None));
    req.format_version = COMMAND_FORMAT_VERSION + 1;
    assert!(matches!(
        s.try_run(1, &req, Dedup::window(100)),
        Err(FsmError::UnsupportedFormat { index: 1, .. })
    ));
    assert!(s.value(b"a").is_none());
}

#[test]
fn corrupt_record_is_an_error_not_a_panic() {
    let mut s = MemState::default();
    s.0.insert(keys::data(b"a"), vec![0xff, 0xff, 0xff]);
    let r = apply(
        &s,
        1,
        &Request::new("", put("a", "1", None)),
        Dedup::window(100),
    );
    assert!(matches!(r, Err(FsmError::Corrupt { .. })));
}

#[test]
fn revisions_read_in_place_match_the_record_and_reject_damage() {
    let rec = ValueRecord {
        value: b"some value".to_vec(),
        create_revision: 3,
        mod_revision: 9,
        version: 4,
    };
    let raw = crate::codec::encode(&rec).expect("encode");
    let mut s = MemState::default();
    s.0.insert(keys::data(b"a"), raw.clone());
    assert_eq!(
        get_revisions(&s, b"a").expect("read"),
        Some(Revisions {
            create_revision: 3,
            mod_revision: 9,
            version: 4
        })
    );
    assert_eq!(get_revisions(&s, b"missing").expect("read"), None);

    // Truncated, with trailing bytes, and with a value length past the end: every command that
    // reads revisions answers Corrupt.
    let mut long = raw.clone();
    long.push(0);
    let mut past_end = raw.clone();
    past_end[0] = 200;
    for bad in [raw[..raw.len() - 1].to_vec(), long, past_end] {
        s.0.insert(keys::data(b"a"), bad);
        let cmds = [
            put("a", "1", None),
            put("a", "1", Some(9)),
            Command::Delete {
                key: b"a".to_vec(),
                expected_revision: None,
            },
            Command::Txn {
                compares: vec![Compare::Revision {
                    key: b"a".to_vec(),
                    revision: 9,
                }],
                success: vec![],
                failure: vec![],
            },
        ];
        for cmd in cmds {
            let r = apply(&s, 10, &Request::new("", cmd.clone()), Dedup::window(100));
            assert!(
                matches!(r, Err(FsmError::Corrupt { .. })),
                "{cmd:?} on a damaged record: {r:?}"
            );
        }
    }
}

// ---- model-based proptest ----

#[derive(Debug, Clone)]
enum ModelOp {
    Put(u8, u8, Option<u64>),
    Delete(u8, Option<u64>),
    Txn(u8, u64, u8, u8),
    Retry(usize),
}

fn op_strategy() -> impl Strategy<Value = ModelOp> {
    prop_oneof![
        (0u8..4, any::<u8>(), proptest::option::of(0u64..6))
            .prop_map(|(k, v, e)| ModelOp::Put(k, v, e)),
        (0u8..4, proptest::option::of(0u64..6)).prop_map(|(k, e)| ModelOp::Delete(k, e)),
        (0u8..4, 0u64..6, 0u8..4, any::<u8>()).prop_map(|(k, r, k2, v)| ModelOp::Txn(k, r, k2, v)),
        (0usize..50).prop_map(ModelOp::Retry),
    ]
}

/// The naive model: key -> (value, create, mod, version).
type Model = BTreeMap<u8, (u8, u64, u64, u64)>;

fn model_put(m: &mut Model, k: u8, v: u8, idx: u64) -> u64 {
    let prev = m.get(&k).cloned();
    let (create, version) = prev.map(|p| (p.1, p.3 + 1)).unwrap_or((idx, 1));
    m.insert(k, (v, create, idx, version));
    prev.map(|p| p.2).unwrap_or(0)
}

proptest! {
    #[test]
    fn apply_matches_model(ops in proptest::collection::vec(op_strategy(), 1..60)) {
        let mut s = MemState::default();
        let mut model: Model = BTreeMap::new();
        let mut history: Vec<(Request, Response)> = Vec::new();
        for (i, op) in ops.iter().enumerate() {
            let idx = i as u64 + 1;
            let key = |k: u8| vec![k];
            let (req, expected) = match op.clone() {
                ModelOp::Put(k, v, e) => {
                    let req = Request::new(format!("r{idx}"), Command::Put { key: key(k), value: vec![v], expected_revision: e });
                    let actual = model.get(&k).map(|x| x.2).unwrap_or(0);
                    let exp = match e {
                        Some(e) if e != actual => Response::RevisionMismatch { revision: idx, expected: e, actual },
                        _ => Response::Put { revision: idx, prev_revision: model_put(&mut model, k, v, idx) },
                    };
                    (req, exp)
                }
                ModelOp::Delete(k, e) => {
                    let req = Request::new("", Command::Delete { key: key(k), expected_revision: e });
                    let actual = model.get(&k).map(|x| x.2).unwrap_or(0);
                    let exp = match e {
                        Some(e) if e != actual => Response::RevisionMismatch { revision: idx, expected: e, actual },
                        _ => Response::Delete { revision: idx, deleted: model.remove(&k).is_some() },
                    };
                    (req, exp)
                }
                ModelOp::Txn(k, r, k2, v) => {
                    let req = Request::new("", Command::Txn {
                        compares: vec![Compare::Revision { key: key(k), revision: r }],
                        success: vec![Op::Put { key: key(k2), value: vec![v] }],
                        failure: vec![Op::Delete { key: key(k2) }],
                    });
                    let ok = model.get(&k).map(|x| x.2).unwrap_or(0) == r;
                    if ok { model_put(&mut model, k2, v, idx); } else { model.remove(&k2); }
                    (req, Response::Txn { revision: idx, succeeded: ok })
                }
                ModelOp::Retry(n) => {
                    let Some((req, first)) = history.iter().filter(|(r, _)| !r.request_id.is_empty()).nth(n).cloned() else { continue };
                    (req, first)
                }
            };
            let got = s.run(idx, &req, DEFAULT_DEDUP_WINDOW);
            prop_assert_eq!(&got, &expected);
            history.push((req, got));
            for k in 0u8..4 {
                let stored = s.value(&[k]).map(|r| (r.value[0], r.create_revision, r.mod_revision, r.version));
                prop_assert_eq!(stored, model.get(&k).cloned());
            }
        }
    }
}

/// The byte-string fields are encoded with `serde_bytes`; these mirrors are the same types as
/// they were before (plain `Vec<u8>`, a per-byte serde sequence). Logs, snapshots, backups and
/// peers of earlier versions hold that encoding, so both must produce and accept the same bytes.
mod legacy {
    use serde::{Deserialize, Serialize};

    #[derive(Serialize, Deserialize)]
    pub struct Request {
        pub format_version: u8,
        pub request_id: String,
        pub command: Command,
    }

    #[derive(Serialize, Deserialize)]
    pub enum Command {
        Put {
            key: Vec<u8>,
            value: Vec<u8>,
            expected_revision: Option<u64>,
        },
        Delete {
            key: Vec<u8>,
            expected_revision: Option<u64>,
        },
        Txn {
            compares: Vec<Compare>,
            success: Vec<Op>,
            failure: Vec<Op>,
        },
        Meta {
            format: u8,
            at_ms: u64,
            op: Vec<u8>,
        },
    }

    #[derive(Serialize, Deserialize)]
    pub enum Compare {
        Revision { key: Vec<u8>, revision: u64 },
        Value { key: Vec<u8>, value: Vec<u8> },
    }

    #[derive(Serialize, Deserialize)]
    pub enum Op {
        Put { key: Vec<u8>, value: Vec<u8> },
        Delete { key: Vec<u8> },
    }

    #[derive(Serialize, Deserialize)]
    pub struct ValueRecord {
        pub value: Vec<u8>,
        pub create_revision: u64,
        pub mod_revision: u64,
        pub version: u64,
    }
}

fn bytes() -> impl Strategy<Value = Vec<u8>> {
    // Lengths across the varint boundaries (250, 2^16).
    prop_oneof![
        prop::collection::vec(any::<u8>(), 0..300),
        prop::collection::vec(any::<u8>(), 65_530..65_540),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn byte_string_encoding_is_unchanged(
        k in bytes(), v in bytes(), op in bytes(), id in "[a-z0-9-]{0,40}",
        rev in any::<u64>(), exp in any::<Option<u64>>(), at in any::<u64>(),
    ) {
        use crate::codec::{decode, encode};
        let pairs: Vec<(Request, legacy::Request)> = vec![
            (
                Request::new(id.clone(), Command::Put { key: k.clone(), value: v.clone(), expected_revision: exp }),
                legacy::Request { format_version: 1, request_id: id.clone(), command: legacy::Command::Put { key: k.clone(), value: v.clone(), expected_revision: exp } },
            ),
            (
                Request::new(id.clone(), Command::Delete { key: k.clone(), expected_revision: exp }),
                legacy::Request { format_version: 1, request_id: id.clone(), command: legacy::Command::Delete { key: k.clone(), expected_revision: exp } },
            ),
            (
                Request::new(id.clone(), Command::Txn {
                    compares: vec![Compare::Revision { key: k.clone(), revision: rev }, Compare::Value { key: v.clone(), value: k.clone() }],
                    success: vec![Op::Put { key: k.clone(), value: v.clone() }],
                    failure: vec![Op::Delete { key: v.clone() }],
                }),
                legacy::Request { format_version: 1, request_id: id.clone(), command: legacy::Command::Txn {
                    compares: vec![legacy::Compare::Revision { key: k.clone(), revision: rev }, legacy::Compare::Value { key: v.clone(), value: k.clone() }],
                    success: vec![legacy::Op::Put { key: k.clone(), value: v.clone() }],
                    failure: vec![legacy::Op::Delete { key: v.clone() }],
                } },
            ),
            (
                Request::new(id.clone(), Command::Meta { format: 1, at_ms: at, op: op.clone() }),
                legacy::Request { format_version: 2, request_id: id.clone(), command: legacy::Command::Meta { format: 1, at_ms: at, op: op.clone() } },
            ),
        ];
        for (new, old) in pairs {
            let old_bytes = encode(&old).unwrap();
            prop_assert_eq!(&encode(&new).unwrap(), &old_bytes);
            prop_assert_eq!(decode::<Request>(&old_bytes).unwrap(), new);
        }
        let rec = ValueRecord { value: v.clone(), create_revision: rev, mod_revision: at, version: 7 };
        let old = legacy::ValueRecord { value: v.clone(), create_revision: rev, mod_revision: at, version: 7 };
        let old_bytes = encode(&old).unwrap();
        prop_assert_eq!(&encode(&rec).unwrap(), &old_bytes);
        prop_assert_eq!(decode::<ValueRecord>(&old_bytes).unwrap(), rec);
    }
}
