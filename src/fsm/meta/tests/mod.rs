//! Domain rules, indexes and RBAC, applied through the real `fsm::apply` path on an in-memory
//! state, plus model-based proptests (run lifecycle, version numbering, RBAC decisions).

use proptest::prelude::*;

use super::query::{self, ListQuery, Order};
use super::rbac::{self, RbacIndex};
use super::*;
use crate::fsm::tests::MemState;
use crate::fsm::{Command, Dedup, FsmError, Request, Response};

mod access;
mod formats;
mod lists;
mod models;

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
