//! Field limits and record and command formats, old and new.

use super::*;

#[test]
fn oversized_and_invalid_fields_are_refused() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let run = w.create(p, "r", u, run_spec(NIL, 0));
    let id = w.fresh();
    let (k, msg) = w.err(MetaOp::Create {
        id,
        parent: run.id,
        name: "blob".into(),
        owner: u,
        tags: vec![],
        spec: Spec::RunMetadata {
            value: MetaValue::Str("x".repeat(apply::MAX_META_VALUE_BYTES + 1)),
        },
    });
    assert_eq!(k, MetaErrorKind::Invalid, "{msg}");
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: run.id,
        name: "nan".into(),
        owner: u,
        tags: vec![],
        spec: Spec::RunMetadata {
            value: MetaValue::Float(f64::NAN.to_bits()),
        },
    });
    assert_eq!(k, MetaErrorKind::Invalid);
    let (k, _) = w.err(MetaOp::Update {
        id: run.id,
        expected_revision: None,
        name: None,
        tags: Some(vec!["a".into(), "a".into()]),
        spec: None,
    });
    assert_eq!(k, MetaErrorKind::Invalid);
    let (k, _) = w.err(MetaOp::Update {
        id: run.id,
        expected_revision: Some(1),
        name: None,
        tags: None,
        spec: None,
    });
    assert_eq!(k, MetaErrorKind::RevisionMismatch);
    let (k, _) = w.err(MetaOp::Update {
        id: run.id,
        expected_revision: None,
        name: None,
        tags: None,
        spec: Some(Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        }),
    });
    assert_eq!(k, MetaErrorKind::Invalid);
}

#[test]
fn newer_record_format_is_a_clear_error() {
    let mut w = World::new();
    let (org, ..) = w.tree();
    let key = crate::keys::meta_row(&org);
    let mut r = w.get(&org);
    r.format = META_FORMAT_VERSION + 1;
    w.s.0.insert(key, crate::codec::encode(&r).expect("encode"));
    let e = query::get(&w.s, &org).expect_err("refused");
    assert!(e.to_string().contains("newer than this binary"), "{e}");
}

#[test]
fn newer_meta_command_format_is_refused_not_applied() {
    let mut w = World::new();
    let cmd = Command::Meta {
        format: META_FORMAT_VERSION + 1,
        at_ms: 1,
        op: vec![1, 2, 3],
    };
    let before = w.s.0.clone();
    let r = w.s.try_run(1, &Request::new("", cmd), Dedup::window(100));
    assert!(matches!(
        r,
        Err(FsmError::UnsupportedFormat { index: 1, .. })
    ));
    assert_eq!(before, w.s.0);
}

/// Version 1 of the on-disk records, frozen: new code must keep opening what it wrote.
mod v1_fixture {
    /// A record as the first release encodes it (bincode of the same field order): a project.
    pub fn project_record_bytes() -> Vec<u8> {
        // Produced by the format-1 encoder; see docs/upgrades.md. Kept as bytes so a change to
        // `Record` that breaks old data fails this test instead of silently re-encoding.
        include_bytes!("../testdata/record-v1-project.bin").to_vec()
    }
}

#[test]
fn record_head_matches_every_kind_of_record() {
    let mut w = World::new();
    let (org, _, p, u) = w.tree();
    let run = w.create(p, "r", u, run_spec(NIL, 0));
    w.ok(MetaOp::Update {
        id: run.id,
        expected_revision: None,
        name: None,
        tags: Some(vec!["a".into(), "b".into()]),
        spec: None,
    });
    let step = w.create(run.id, "s", u, step_spec(1, "ck"));
    let role = apply::builtin_role_id(&org, "viewer");
    for id in [org, p, u, run.id, step.id, role] {
        let full = w.get(&id);
        let head = apply::load_head(&w.s, &id).expect("head").expect("present");
        assert_eq!(
            head,
            (
                full.kind(),
                full.owner,
                full.ancestors.clone(),
                full.create_revision
            ),
            "{:?}",
            full.kind()
        );
    }
}

#[test]
fn format_1_records_still_decode() {
    let raw = v1_fixture::project_record_bytes();
    let r = apply::decode_record(b"fixture", &raw).expect("format-1 record decodes");
    assert_eq!(r.format, 1);
    assert_eq!(r.name, "vision");
    assert_eq!(r.kind(), Kind::Project);
}

/// A meta command of a known format whose op does not decode (a peer's garbage, a bug) is an
/// error answer on every replica, remembered under its request id, and writes nothing else; it
/// never stops apply. (The bytes of issue 24: format 1, op `ff ff`.)
#[test]
fn an_undecodable_meta_op_is_an_error_answer_not_a_stop() {
    let mut w = World::new();
    let before = w.s.0.clone();
    let cmd = Command::Meta {
        format: META_FORMAT_VERSION,
        at_ms: 0,
        op: vec![0xff, 0xff],
    };
    let r =
        w.s.try_run(1, &Request::new("", cmd.clone()), Dedup::window(100))
            .expect("applied, not a stop");
    match r.response {
        Response::Meta {
            response: MetaResponse::Error { kind, message },
            ..
        } => {
            assert_eq!(kind, MetaErrorKind::Invalid);
            assert!(message.contains("does not decode"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(before, w.s.0, "nothing written");
    // With a request id, a retry gets the same answer.
    let first = w.s.run(2, &Request::new("poison-1", cmd.clone()), 100);
    let again = w.s.run(3, &Request::new("poison-1", cmd), 100);
    assert_eq!(first.revision(), 2);
    assert_eq!(again, first);
}
