//! Domain rules, indexes and RBAC, applied through the real `fsm::apply` path on an in-memory
//! state, plus model-based proptests (run lifecycle, version numbering, RBAC decisions).

use proptest::prelude::*;

use super::query::{self, ListQuery, Order};
use super::rbac::{self, RbacIndex};
use super::*;
use crate::fsm::tests::MemState;
use crate::fsm::{Command, Dedup, FsmError, Request, Response};

struct World {
    s: MemState,
    index: u64,
    now: u64,
    next_id: u64,
}

fn id_of(n: u64) -> Id {
    let mut id = [0u8; 16];
    id[8..].copy_from_slice(&n.to_be_bytes());
    id[0] = 0xAB;
    id
}

impl World {
    fn new() -> Self {
        World {
            s: MemState::default(),
            index: 0,
            now: 1_000_000,
            next_id: 1,
        }
    }

    fn fresh(&mut self) -> Id {
        self.next_id += 1;
        id_of(self.next_id)
    }

    fn op(&mut self, op: MetaOp) -> MetaResponse {
        self.index += 1;
        self.now += 1000;
        let Command::Meta { format, op, .. } = Command::meta(&op).expect("encode") else {
            unreachable!()
        };
        let cmd = Command::Meta {
            format,
            at_ms: self.now,
            op,
        };
        match self.s.run(self.index, &Request::new("", cmd), 1_000_000) {
            Response::Meta { response, .. } => response,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn ok(&mut self, op: MetaOp) -> Record {
        match self.op(op) {
            MetaResponse::Record(r) => *r,
            other => panic!("expected a record, got {other:?}"),
        }
    }

    fn err(&mut self, op: MetaOp) -> (MetaErrorKind, String) {
        match self.op(op) {
            MetaResponse::Error { kind, message } => (kind, message),
            other => panic!("expected an error, got {other:?}"),
        }
    }

    fn create(&mut self, parent: Id, name: &str, owner: Id, spec: Spec) -> Record {
        let id = self.fresh();
        self.ok(MetaOp::Create {
            id,
            parent,
            name: name.into(),
            owner,
            tags: vec![],
            spec,
        })
    }

    /// org, workspace, project, and a user.
    fn tree(&mut self) -> (Id, Id, Id, Id) {
        let org = self.create(
            NIL,
            "acme",
            NIL,
            Spec::Organization {
                display_name: "Acme".into(),
            },
        );
        let user = self.create(org.id, "alice", NIL, user_spec(false));
        let ws = self.create(
            org.id,
            "ml",
            user.id,
            Spec::Workspace {
                display_name: String::new(),
            },
        );
        let p = self.create(
            ws.id,
            "vision",
            user.id,
            Spec::Project {
                display_name: String::new(),
                description: String::new(),
            },
        );
        (org.id, ws.id, p.id, user.id)
    }

    fn get(&self, id: &Id) -> Record {
        query::get(&self.s, id).expect("get")
    }
}

fn user_spec(service_account: bool) -> Spec {
    Spec::User {
        email: String::new(),
        external_id: String::new(),
        active: true,
        service_account,
        api_keys: vec![],
    }
}

fn run_spec(pipeline: Id, expected_steps: u32) -> Spec {
    let mut counts = [0u32; 9];
    counts[0] = expected_steps;
    Spec::PipelineRun {
        pipeline,
        orchestrator_run_id: String::new(),
        parent_run: NIL,
        status: RunStatus::Completed, // ignored: derived
        start_ms: 0,
        end_ms: 0,
        step_counts: counts,
        index: 99, // ignored: derived
    }
}

fn step_spec(attempt: u32, cache_key: &str) -> Spec {
    Spec::StepRun {
        attempt,
        cache_key: cache_key.into(),
        status: RunStatus::Completed, // ignored
        heartbeat_ms: 0,
        start_ms: 0,
        end_ms: 0,
    }
}

fn status_of(r: &Record) -> RunStatus {
    match &r.spec {
        Spec::PipelineRun { status, .. } | Spec::StepRun { status, .. } => *status,
        _ => panic!("no status"),
    }
}

#[test]
fn ids_round_trip_and_malformed_ids_are_refused() {
    let id = id_of(42);
    assert_eq!(parse_id(&fmt_id(&id)), Ok(id));
    for bad in [
        "",
        "xyz",
        "0123",
        "g0000000-0000-0000-0000-000000000000",
        "00000000000000000000000000000000-",
    ] {
        assert!(parse_id(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn names_are_unique_per_parent_and_validated() {
    let mut w = World::new();
    let (_, ws, p, u) = w.tree();
    let pipe = w.create(
        p,
        "train",
        u,
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    );
    let id = w.fresh();
    let (kind, msg) = w.err(MetaOp::Create {
        id,
        parent: p,
        name: "train".into(),
        owner: u,
        tags: vec![],
        spec: Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    });
    assert_eq!(kind, MetaErrorKind::AlreadyExists, "{msg}");
    // Same name in another project is fine.
    let p2 = w.create(
        ws,
        "nlp",
        u,
        Spec::Project {
            display_name: String::new(),
            description: String::new(),
        },
    );
    w.create(
        p2.id,
        "train",
        u,
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    );
    for bad in ["", " padded", "tab\there", &"x".repeat(MAX_NAME_BYTES + 1)] {
        let id = w.fresh();
        let (kind, _) = w.err(MetaOp::Create {
            id,
            parent: p,
            name: bad.into(),
            owner: u,
            tags: vec![],
            spec: Spec::Pipeline {
                description: String::new(),
                run_count: 0,
            },
        });
        assert_eq!(kind, MetaErrorKind::Invalid, "{bad:?}");
    }
    // Lookup by name; rename frees the old name.
    assert_eq!(
        query::get_by_name(&w.s, Kind::Pipeline, &p, "train", 0)
            .expect("by name")
            .id,
        pipe.id
    );
    w.ok(MetaOp::Update {
        id: pipe.id,
        expected_revision: Some(pipe.mod_revision),
        name: Some("train2".into()),
        tags: None,
        spec: None,
    });
    assert!(query::get_by_name(&w.s, Kind::Pipeline, &p, "train", 0).is_err());
    assert_eq!(
        query::get_by_name(&w.s, Kind::Pipeline, &p, "train2", 0)
            .expect("renamed")
            .id,
        pipe.id
    );
}

#[test]
fn references_and_parents_are_checked() {
    let mut w = World::new();
    let (org, _, p, u) = w.tree();
    // Unknown parent, wrong parent kind, unknown pipeline, unknown owner.
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: id_of(999_999),
        name: "x".into(),
        owner: u,
        tags: vec![],
        spec: run_spec(NIL, 0),
    });
    assert_eq!(k, MetaErrorKind::NotFound);
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: org,
        name: "x".into(),
        owner: u,
        tags: vec![],
        spec: run_spec(NIL, 0),
    });
    assert_eq!(k, MetaErrorKind::Invalid);
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: p,
        name: "x".into(),
        owner: u,
        tags: vec![],
        spec: run_spec(id_of(12345), 0),
    });
    assert_eq!(k, MetaErrorKind::NotFound);
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: p,
        name: "x".into(),
        owner: id_of(777),
        tags: vec![],
        spec: run_spec(NIL, 0),
    });
    assert_eq!(k, MetaErrorKind::NotFound);
    // A run cannot be its own parent.
    let id = w.fresh();
    let mut spec = run_spec(NIL, 0);
    if let Spec::PipelineRun { parent_run, .. } = &mut spec {
        *parent_run = id;
    }
    let (k, msg) = w.err(MetaOp::Create {
        id,
        parent: p,
        name: "x".into(),
        owner: u,
        tags: vec![],
        spec,
    });
    assert_eq!(k, MetaErrorKind::Invalid, "{msg}");
    // A refused op writes nothing.
    let before = w.s.0.clone();
    let id = w.fresh();
    w.err(MetaOp::Create {
        id,
        parent: p,
        name: "".into(),
        owner: u,
        tags: vec![],
        spec: run_spec(NIL, 0),
    });
    assert_eq!(before, w.s.0);
}

#[test]
fn run_status_follows_steps_and_finished_never_changes() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let pipe = w.create(
        p,
        "train",
        u,
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    );
    let run = w.create(p, "r1", u, run_spec(pipe.id, 2));
    assert_eq!(status_of(&run), RunStatus::Initializing);
    let s1 = w.create(run.id, "load", u, step_spec(1, "ck-load"));
    let s2 = w.create(run.id, "fit", u, step_spec(1, ""));
    w.ok(MetaOp::SetStepStatus {
        id: s1.id,
        status: RunStatus::Running,
        resume: false,
    });
    assert_eq!(status_of(&w.get(&run.id)), RunStatus::Running);
    w.ok(MetaOp::SetStepStatus {
        id: s1.id,
        status: RunStatus::Completed,
        resume: false,
    });
    assert_eq!(status_of(&w.get(&run.id)), RunStatus::Running);
    // A finished step never changes again.
    let (k, msg) = w.err(MetaOp::SetStepStatus {
        id: s1.id,
        status: RunStatus::Running,
        resume: false,
    });
    assert_eq!(k, MetaErrorKind::FailedPrecondition);
    assert!(
        msg.contains("completed"),
        "the message names the current status: {msg}"
    );
    w.ok(MetaOp::SetStepStatus {
        id: s2.id,
        status: RunStatus::Completed,
        resume: false,
    });
    let done = w.get(&run.id);
    assert_eq!(status_of(&done), RunStatus::Completed);
    // Nor does a finished run (no new steps, no status change) unless resumed.
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: run.id,
        name: "late".into(),
        owner: u,
        tags: vec![],
        spec: step_spec(1, ""),
    });
    assert_eq!(k, MetaErrorKind::FailedPrecondition);
    let (k, _) = w.err(MetaOp::SetRunStatus {
        id: run.id,
        status: RunStatus::Running,
        resume: false,
    });
    assert_eq!(k, MetaErrorKind::FailedPrecondition);
    w.ok(MetaOp::SetRunStatus {
        id: run.id,
        status: RunStatus::Running,
        resume: true,
    });
    assert_eq!(status_of(&w.get(&run.id)), RunStatus::Running);
    // Derived fields: run index and pipeline run count; cache-key lookup.
    assert!(matches!(
        w.get(&run.id).spec,
        Spec::PipelineRun { index: 1, .. }
    ));
    assert!(matches!(
        w.get(&pipe.id).spec,
        Spec::Pipeline { run_count: 1, .. }
    ));
    assert_eq!(
        query::by_cache_key(&w.s, &p, "ck-load").expect("cache").id,
        s1.id
    );
}

#[test]
fn a_failed_step_fails_the_run_and_attempts_are_unique() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let run = w.create(p, "r", u, run_spec(NIL, 0));
    let s = w.create(run.id, "fit", u, step_spec(1, ""));
    let id = w.fresh();
    let (k, _) = w.err(MetaOp::Create {
        id,
        parent: run.id,
        name: "fit".into(),
        owner: u,
        tags: vec![],
        spec: step_spec(1, ""),
    });
    assert_eq!(k, MetaErrorKind::AlreadyExists);
    w.create(run.id, "fit", u, step_spec(2, ""));
    w.ok(MetaOp::SetStepStatus {
        id: s.id,
        status: RunStatus::Failed,
        resume: false,
    });
    assert_eq!(status_of(&w.get(&run.id)), RunStatus::Failed);
}

#[test]
fn deleting_a_run_takes_its_steps_and_metadata_and_indexes() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let run = w.create(p, "r", u, run_spec(NIL, 0));
    let step = w.create(run.id, "s", u, step_spec(1, "ck"));
    w.create(
        run.id,
        "accuracy",
        u,
        Spec::RunMetadata {
            value: MetaValue::Float(0.9f64.to_bits()),
        },
    );
    w.create(
        step.id,
        "rows",
        u,
        Spec::RunMetadata {
            value: MetaValue::Int(10),
        },
    );
    let keep = w.create(p, "other", u, run_spec(NIL, 0));
    match w.op(MetaOp::Delete {
        id: run.id,
        expected_revision: None,
    }) {
        MetaResponse::Deleted { removed } => assert_eq!(removed, 4),
        other => panic!("{other:?}"),
    }
    // Only the other run's rows, the containers and their indexes remain.
    for k in w.s.0.keys() {
        if k.first() == Some(&crate::keys::META_ROW) {
            let mut id = [0u8; 16];
            id.copy_from_slice(&k[1..]);
            assert!(id != run.id && id != step.id);
        }
    }
    assert!(query::by_cache_key(&w.s, &p, "ck").is_err());
    let page = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        page.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![keep.id]
    );
    assert_eq!(page.total, 1);
    let by_meta = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            metadata: Some(("accuracy".into(), MetaValue::Float(0.9f64.to_bits()))),
            ..Default::default()
        },
    )
    .expect("list");
    assert!(by_meta.records.is_empty());
    // Containers are refused while not empty.
    let (k, _) = w.err(MetaOp::Delete {
        id: p,
        expected_revision: None,
    });
    assert_eq!(k, MetaErrorKind::FailedPrecondition);
}

#[test]
fn lists_filter_and_paginate_newest_first_with_counts() {
    let mut w = World::new();
    let (_, _, p, u) = w.tree();
    let pipe = w.create(
        p,
        "train",
        u,
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    );
    let mut runs = Vec::new();
    for i in 0..25 {
        let r = w.create(
            p,
            &format!("r{i:02}"),
            u,
            run_spec(if i % 2 == 0 { pipe.id } else { NIL }, 0),
        );
        if i % 3 == 0 {
            w.ok(MetaOp::SetRunStatus {
                id: r.id,
                status: RunStatus::Failed,
                resume: false,
            });
        }
        if i % 5 == 0 {
            w.ok(MetaOp::Update {
                id: r.id,
                expected_revision: None,
                name: None,
                tags: Some(vec!["nightly".into()]),
                spec: None,
            });
        }
        runs.push(r);
    }
    let mut q = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_size: 10,
        ..Default::default()
    };
    let mut seen = Vec::new();
    loop {
        let page = query::list(&w.s, &q).expect("list");
        assert_eq!(page.total, 25);
        seen.extend(page.records.iter().map(|r| r.name.clone()));
        if page.next_page_token.is_empty() {
            break;
        }
        q.page_token = page.next_page_token;
    }
    let expected: Vec<String> = (0..25).rev().map(|i| format!("r{i:02}")).collect();
    assert_eq!(seen, expected, "newest first, every run exactly once");
    let failed = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            status: Some(RunStatus::Failed),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(failed.records.len(), 9);
    assert_eq!(failed.total, 9);
    let both = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            status: Some(RunStatus::Failed),
            pipeline: Some(pipe.id),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(both.records.len(), 5); // 0, 6, 12, 18, 24
    let tagged_failed = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            tag: Some("nightly".into()),
            status: Some(RunStatus::Failed),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(tagged_failed.records.len(), 2); // 0, 15
    assert!(!tagged_failed.total_exact);
    // A time range: the runs created strictly inside it.
    let t5 = runs[5].created_ms;
    let t10 = runs[10].created_ms;
    let ranged = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            created_after_ms: Some(t5),
            created_before_ms: Some(t10),
            page_size: 100,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        ranged
            .records
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec!["r09", "r08", "r07", "r06", "r05"]
    );
    // By name; tokens belong to their query.
    let by_name = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::PipelineRun),
            parent: p,
            order: Order::Name,
            page_size: 3,
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        by_name
            .records
            .iter()
            .map(|r| r.name.as_str())
            .collect::<Vec<_>>(),
        vec!["r00", "r01", "r02"]
    );
    let foreign = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        status: Some(RunStatus::Failed),
        page_token: by_name.next_page_token.clone(),
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &foreign),
        Err(query::QueryError::Invalid(_))
    ));
    let garbage = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_token: "zz".into(),
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &garbage),
        Err(query::QueryError::Invalid(_))
    ));
    let too_big = ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: p,
        page_size: 100_000,
        ..Default::default()
    };
    assert!(matches!(
        query::list(&w.s, &too_big),
        Err(query::QueryError::Invalid(_))
    ));
}

#[test]
fn model_stages_are_exclusive_and_api_keys_rotate() {
    let mut w = World::new();
    let (org, _, p, u) = w.tree();
    let m = w.create(
        p,
        "resnet",
        u,
        Spec::Model {
            description: String::new(),
            latest_version: 0,
        },
    );
    let mv = |w: &mut World| {
        w.create(
            m.id,
            "ignored",
            u,
            Spec::ModelVersion {
                artifact_version: NIL,
                run: NIL,
                number: 0,
                stage: Stage::None,
            },
        )
    };
    let v1 = mv(&mut w);
    let v2 = mv(&mut w);
    assert_eq!((v1.name.as_str(), v2.name.as_str()), ("1", "2"));
    w.ok(MetaOp::Promote {
        id: v1.id,
        stage: Stage::Production,
        archive_existing: false,
    });
    let (k, _) = w.err(MetaOp::Promote {
        id: v2.id,
        stage: Stage::Production,
        archive_existing: false,
    });
    assert_eq!(k, MetaErrorKind::FailedPrecondition);
    w.ok(MetaOp::Promote {
        id: v2.id,
        stage: Stage::Production,
        archive_existing: true,
    });
    assert!(matches!(
        w.get(&v1.id).spec,
        Spec::ModelVersion {
            stage: Stage::Archived,
            ..
        }
    ));
    let prod = query::list(
        &w.s,
        &ListQuery {
            kind: Some(Kind::ModelVersion),
            parent: m.id,
            stage: Some(Stage::Production),
            ..Default::default()
        },
    )
    .expect("list");
    assert_eq!(
        prod.records.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![v2.id]
    );

    let sa = w.create(org, "ci-bot", NIL, user_spec(true));
    let (h1, h2) = ([1u8; 32], [2u8; 32]);
    w.ok(MetaOp::AddApiKey {
        user: sa.id,
        key_id: "k1".into(),
        sha256: h1,
        grace_ms: 60_000,
    });
    let t = w.now;
    w.ok(MetaOp::AddApiKey {
        user: sa.id,
        key_id: "k2".into(),
        sha256: h2,
        grace_ms: 60_000,
    });
    // The old key works through the grace period, then not.
    assert!(query::verify_api_key(&w.s, &h1, t + 30_000)
        .expect("verify")
        .is_some());
    assert!(query::verify_api_key(&w.s, &h1, t + 1000 + 60_001)
        .expect("verify")
        .is_none());
    assert!(query::verify_api_key(&w.s, &h2, t + 10_000_000)
        .expect("verify")
        .is_some());
    w.ok(MetaOp::RevokeApiKey {
        user: sa.id,
        key_id: "k2".into(),
    });
    assert!(query::verify_api_key(&w.s, &h2, t)
        .expect("verify")
        .is_none());
    // Only service accounts hold keys.
    let (k, _) = w.err(MetaOp::AddApiKey {
        user: u,
        key_id: "k".into(),
        sha256: [3; 32],
        grace_ms: 0,
    });
    assert_eq!(k, MetaErrorKind::Invalid);
}

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
        include_bytes!("testdata/record-v1-project.bin").to_vec()
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

// ---- RBAC ------------------------------------------------------------------------------------

fn rbac_index(w: &World) -> RbacIndex {
    RbacIndex::load(&w.s).expect("load")
}

fn bind(w: &mut World, org: Id, subject: Id, role: &str, scope: Id) -> Record {
    let role = apply::builtin_role_id(&org, role);
    w.create(
        org,
        "",
        NIL,
        Spec::RoleBinding {
            subject,
            role,
            scope,
        },
    )
}

#[test]
fn rbac_bindings_scopes_owners_and_teams() {
    let mut w = World::new();
    let (org, ws, p, alice) = w.tree();
    let bob = w.create(org, "bob", NIL, user_spec(false)).id;
    let carol = w.create(org, "carol", NIL, user_spec(false)).id;
    let run = w.create(p, "r", alice, run_spec(NIL, 0));
    let mut ix = rbac_index(&w);
    // Owner: alice owns the run; bob has nothing.
    assert_eq!(
        ix.check(&w.s, &alice, rbac::A_DELETE, None, &run.id)
            .expect("check"),
        rbac::Reason::Owner
    );
    assert!(!ix
        .check(&w.s, &bob, rbac::A_READ, None, &run.id)
        .expect("check")
        .allowed());
    // A viewer binding at the workspace lets bob read the run, not delete it.
    let b = bind(&mut w, org, bob, "viewer", ws);
    ix.observe(
        &crate::keys::meta_row(&b.id),
        w.s.0
            .get(&crate::keys::meta_row(&b.id))
            .map(|v| v.as_slice()),
    )
    .expect("observe");
    ix.refresh();
    let r = ix
        .check(&w.s, &bob, rbac::A_READ, None, &run.id)
        .expect("check");
    assert!(
        matches!(r, rbac::Reason::Binding { scope, .. } if scope == ws),
        "{r:?}"
    );
    assert!(!ix
        .check(&w.s, &bob, rbac::A_DELETE, None, &run.id)
        .expect("check")
        .allowed());
    // A team with a developer binding on the project: carol may create pipelines there.
    let team = w.create(
        org,
        "ml-team",
        NIL,
        Spec::Team {
            members: vec![carol],
        },
    );
    bind(&mut w, org, team.id, "developer", p);
    let ix = rbac_index(&w);
    let r = ix
        .check(&w.s, &carol, rbac::A_CREATE, Some(Kind::Pipeline as u8), &p)
        .expect("check");
    assert!(
        matches!(r, rbac::Reason::Binding { team: Some(t), .. } if t == team.id),
        "{r:?}"
    );
    assert!(!ix
        .check(&w.s, &carol, rbac::A_SHARE, None, &p)
        .expect("check")
        .allowed());
    // Deleting the team removes its bindings.
    w.ok(MetaOp::Update {
        id: team.id,
        expected_revision: None,
        name: None,
        tags: None,
        spec: Some(Spec::Team { members: vec![] }),
    });
    let ix = rbac_index(&w);
    assert!(!ix
        .check(&w.s, &carol, rbac::A_CREATE, Some(Kind::Pipeline as u8), &p)
        .expect("check")
        .allowed());
    // Deactivated users are denied even as owners.
    w.ok(MetaOp::Update {
        id: alice,
        expected_revision: None,
        name: None,
        tags: None,
        spec: Some(Spec::User {
            email: String::new(),
            external_id: String::new(),
            active: false,
            service_account: false,
            api_keys: vec![],
        }),
    });
    let ix = rbac_index(&w);
    assert!(!ix
        .check(&w.s, &alice, rbac::A_READ, None, &run.id)
        .expect("check")
        .allowed());
}

// ---- Model-based proptests -------------------------------------------------------------------

#[derive(Debug, Clone)]
enum StepAction {
    Create,
    Set(usize, RunStatus, bool),
    Delete(usize),
}

fn status_strategy() -> impl Strategy<Value = RunStatus> {
    prop::sample::select(RunStatus::ALL.to_vec())
}

fn step_actions() -> impl Strategy<Value = Vec<StepAction>> {
    prop::collection::vec(
        prop_oneof![
            2 => Just(StepAction::Create),
            6 => (0..8usize, status_strategy(), prop::bool::weighted(0.1)).prop_map(|(i, s, r)| StepAction::Set(i, s, r)),
            1 => (0..8usize).prop_map(StepAction::Delete),
        ],
        1..60,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// The run lifecycle against a reference: step statuses only move as the rules allow, the
    /// run's counts equal the steps' statuses, and its status is derived from them.
    #[test]
    fn run_lifecycle_matches_the_model(actions in step_actions(), expected in 0u32..4) {
        let mut w = World::new();
        let (_, _, p, u) = w.tree();
        let run = w.create(p, "r", u, run_spec(NIL, expected));
        let mut steps: Vec<(Id, RunStatus)> = Vec::new();
        let mut run_status = RunStatus::Initializing;
        for a in actions {
            let mut resumed = false;
            match a {
                StepAction::Create => {
                    let id = w.fresh();
                    let name = format!("s{}", w.next_id);
                    let resp = w.op(MetaOp::Create { id, parent: run.id, name, owner: u, tags: vec![], spec: step_spec(1, "") });
                    if run_status.is_finished() {
                        prop_assert!(matches!(resp, MetaResponse::Error { kind: MetaErrorKind::FailedPrecondition, .. }), "{:?}", resp);
                    } else {
                        prop_assert!(matches!(resp, MetaResponse::Record(_)), "{:?}", resp);
                        steps.push((id, RunStatus::Initializing));
                    }
                }
                StepAction::Set(i, to, resume) => {
                    if steps.is_empty() { continue; }
                    let i = i % steps.len();
                    let (id, from) = steps[i];
                    let resp = w.op(MetaOp::SetStepStatus { id, status: to, resume });
                    let allowed = if resume {
                        from.is_finished() && !to.is_finished()
                    } else {
                        !from.is_finished() && from.can_move_to(to) && !run_status.is_finished()
                    };
                    prop_assert_eq!(matches!(resp, MetaResponse::Record(_)), allowed, "{:?} -> {:?} resume={} run={:?}: {:?}", from, to, resume, run_status, resp);
                    if allowed {
                        steps[i].1 = to;
                        resumed = resume;
                    }
                }
                StepAction::Delete(i) => {
                    if steps.is_empty() { continue; }
                    let i = i % steps.len();
                    let (id, _) = steps.remove(i);
                    let resp = w.op(MetaOp::Delete { id, expected_revision: None });
                    prop_assert!(matches!(resp, MetaResponse::Deleted { removed: 1 }), "{:?}", resp);
                }
            }
            // Reference derivation from the model's steps.
            let r = w.get(&run.id);
            let Spec::PipelineRun { status, step_counts, .. } = r.spec else { unreachable!() };
            let mut counts = [0u32; 9];
            counts[0] = expected;
            for (_, s) in &steps { counts[*s as usize] += 1; }
            prop_assert_eq!(step_counts, counts);
            if run_status.is_finished() && !resumed {
                prop_assert_eq!(status, run_status, "a finished run changed without a resume");
            } else {
                let finished = steps.iter().filter(|(_, s)| s.is_finished()).count() as u32;
                let started = steps.iter().any(|(_, s)| *s != RunStatus::Initializing);
                if steps.iter().any(|(_, s)| *s == RunStatus::Failed) {
                    prop_assert_eq!(status, RunStatus::Failed);
                } else if expected > 0 && finished >= expected && finished as usize == steps.len() {
                    prop_assert!(matches!(status, RunStatus::Completed | RunStatus::Stopped), "{:?}", status);
                } else if started || resumed {
                    prop_assert_eq!(status, RunStatus::Running);
                } else {
                    prop_assert_eq!(status, run_status);
                }
            }
            run_status = status;
        }
    }

    /// Versions of one artifact created in any interleaving with deletes are numbered 1, 2, 3...
    /// in creation order: unique, never reused, no gaps in what was handed out.
    #[test]
    fn version_numbers_are_unique_and_gap_free(ops in prop::collection::vec(prop::bool::weighted(0.8), 1..80)) {
        let mut w = World::new();
        let (_, _, p, u) = w.tree();
        let a = w.create(p, "dataset", u, Spec::Artifact { artifact_type: "data".into(), latest_version: 0 });
        let mut handed = Vec::new();
        let mut live: Vec<Id> = Vec::new();
        for create in ops {
            if create || live.is_empty() {
                let v = w.create(a.id, "x", u, Spec::ArtifactVersion { uri: "s3://b/k".into(), content_hash: String::new(), run: NIL, number: 0 });
                let Spec::ArtifactVersion { number, .. } = v.spec else { unreachable!() };
                handed.push(number);
                live.push(v.id);
            } else {
                let id = live.remove(0);
                w.op(MetaOp::Delete { id, expected_revision: None });
            }
        }
        let want: Vec<u64> = (1..=handed.len() as u64).collect();
        prop_assert_eq!(handed, want);
        let page = query::list(&w.s, &ListQuery { kind: Some(Kind::ArtifactVersion), parent: a.id, page_size: 1000, ..Default::default() }).expect("list");
        prop_assert_eq!(page.records.len(), live.len());
        prop_assert_eq!(page.total, live.len() as u64);
    }

    /// RBAC decisions of the index equal a naive evaluator's, for random bindings, teams,
    /// owners and targets.
    #[test]
    fn rbac_index_agrees_with_naive_evaluator(
        bindings in prop::collection::vec((0..4usize, 0..3usize, 0..5usize), 0..8),
        team_members in prop::collection::vec(0..4usize, 0..4),
        checks in prop::collection::vec((0..4usize, 1u8..=6, 0..5usize, prop::bool::ANY), 1..40),
    ) {
        let mut w = World::new();
        let (org, ws, p, alice) = w.tree();
        let mut users = vec![alice];
        for n in ["bob", "carol"] {
            users.push(w.create(org, n, NIL, user_spec(false)).id);
        }
        let mut members: Vec<Id> = team_members.iter().map(|i| users[i % users.len()]).collect();
        members.sort();
        members.dedup();
        let team = w.create(org, "t", NIL, Spec::Team { members }).id;
        let subjects = [users[0], users[1], users[2], team];
        let pipe = w.create(p, "pipe", users[1], Spec::Pipeline { description: String::new(), run_count: 0 });
        let run = w.create(p, "run", users[2], run_spec(pipe.id, 0));
        let targets = [org, ws, p, pipe.id, run.id];
        let roles = ["admin", "developer", "viewer"];
        for (s, r, t) in bindings {
            let id = w.fresh();
            let role = apply::builtin_role_id(&org, roles[r]);
            w.op(MetaOp::Create { id, parent: org, name: String::new(), owner: NIL, tags: vec![], spec: Spec::RoleBinding { subject: subjects[s], role, scope: targets[t] } });
        }
        let ix = rbac_index(&w);
        for (s, action, t, create_child) in checks {
            let subject = subjects[s.min(2)];
            let rt = create_child.then_some(Kind::PipelineRun as u8);
            let fast = ix.check(&w.s, &subject, action, rt, &targets[t]).expect("check").allowed();
            let slow = rbac::naive_check(&w.s, &subject, action, rt, &targets[t]).expect("naive");
            prop_assert_eq!(fast, slow, "subject {} action {} target {}", s, action, t);
        }
    }
}
