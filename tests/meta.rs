//! Cluster tests of the metadata services with three real `metaraft serve` processes: concurrent
//! writers through every node, reads and permission checks on followers, restarts, bad input.

#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use metaraft::client::Client;
use metaraft::pb;
use metaraft::pb::resource::Spec as S;
use tonic::Code;

async fn create(c: &Client, parent: &str, name: &str, owner: &str, spec: S) -> pb::Resource {
    c.meta_create(pb::CreateResourceRequest {
        resource: Some(pb::Resource {
            parent_id: parent.into(),
            name: name.into(),
            owner_id: owner.into(),
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
    .resource
    .expect("resource")
}

fn session(rev: u64) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: pb::Consistency::Session as i32,
        min_revision: rev,
        max_lag: 0,
    })
}

/// org, alice, workspace, project (through the given client).
async fn tree(c: &Client) -> (String, String, String, String) {
    let org = create(c, "", "acme", "", S::Organization(Default::default()))
        .await
        .id;
    let alice = create(
        c,
        &org,
        "alice",
        "",
        S::User(pb::UserSpec {
            active: true,
            ..Default::default()
        }),
    )
    .await
    .id;
    let ws = create(c, &org, "ml", &alice, S::Workspace(Default::default()))
        .await
        .id;
    let p = create(c, &ws, "vision", &alice, S::Project(Default::default()))
        .await
        .id;
    (org, alice, ws, p)
}

fn code_of(e: metaraft::client::ClientError) -> Code {
    e.code().expect("a gRPC status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m01_concurrent_versions_are_gap_free_and_promotions_keep_one_production() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let (_, alice, _, p) = tree(&client).await;
    let art = create(
        &client,
        &p,
        "dataset",
        &alice,
        S::Artifact(Default::default()),
    )
    .await
    .id;
    eprintln!("--- 8 writers x 25 versions, through all three nodes");
    let mut tasks = Vec::new();
    for w in 0..8 {
        let cl = c.client_at(w % 3);
        let (art, alice) = (art.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            let mut numbers = Vec::new();
            for i in 0..25 {
                let v = create(
                    &cl,
                    &art,
                    "",
                    &alice,
                    S::ArtifactVersion(pb::ArtifactVersionSpec {
                        uri: format!("s3://bucket/{w}/{i}"),
                        ..Default::default()
                    }),
                )
                .await;
                let Some(S::ArtifactVersion(s)) = v.spec else {
                    panic!("spec")
                };
                numbers.push(s.number);
            }
            numbers
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("writer"));
    }
    all.sort();
    assert_eq!(all, (1..=200).collect::<Vec<u64>>(), "unique and gap-free");
    let page = client
        .meta_list(pb::ListResourcesRequest {
            kind: pb::ResourceKind::ArtifactVersion as i32,
            parent_id: art.clone(),
            page_size: 10,
            read: linearizable(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!((page.total, page.total_exact), (200, true));
    let newest: Vec<String> = page.resources.iter().map(|r| r.name.clone()).collect();
    assert_eq!(newest[0], "200", "newest first");

    eprintln!("--- concurrent promotions to production, archiving the holder");
    let model = create(&client, &p, "resnet", &alice, S::Model(Default::default()))
        .await
        .id;
    let mut versions = Vec::new();
    for _ in 0..6 {
        versions.push(
            create(
                &client,
                &model,
                "",
                &alice,
                S::ModelVersion(Default::default()),
            )
            .await
            .id,
        );
    }
    let mut tasks = Vec::new();
    for w in 0..6 {
        let cl = c.client_at(w % 3);
        let vs = versions.clone();
        tasks.push(tokio::spawn(async move {
            for k in 0..5 {
                let v = &vs[(w + k) % vs.len()];
                cl.promote_model_version(pb::PromoteRequest {
                    model_version_id: v.clone(),
                    stage: pb::ModelStage::Production as i32,
                    archive_existing: true,
                    request_id: String::new(),
                })
                .await
                .expect("promote");
            }
        }));
    }
    for t in tasks {
        t.await.expect("promoter");
    }
    for node in 0..3 {
        let prod = c
            .client_at(node)
            .meta_list(pb::ListResourcesRequest {
                kind: pb::ResourceKind::ModelVersion as i32,
                parent_id: model.clone(),
                stage: Some(pb::ModelStage::Production as i32),
                read: linearizable(),
                ..Default::default()
            })
            .await
            .expect("list");
        assert_eq!(
            prod.resources.len(),
            1,
            "exactly one production version on node {node}"
        );
        assert_eq!(prod.total, 1);
    }
    let hashes: BTreeSet<Option<u64>> = {
        c.wait_converged(Duration::from_secs(20)).await;
        let mut h = BTreeSet::new();
        for i in 0..3 {
            h.insert(c.self_status(i, true).await.state_hash);
        }
        h
    };
    assert_eq!(hashes.len(), 1, "replicas hold identical state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m02_parallel_steps_reads_and_rbac_on_every_node_survive_a_restart() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let (org, alice, ws, p) = tree(&client).await;
    let pipe = create(
        &client,
        &p,
        "train",
        &alice,
        S::Pipeline(Default::default()),
    )
    .await
    .id;
    let run = create(
        &client,
        &p,
        "run-1",
        &alice,
        S::PipelineRun(pb::PipelineRunSpec {
            pipeline_id: pipe.clone(),
            expected_steps: 12,
            ..Default::default()
        }),
    )
    .await
    .id;
    eprintln!("--- 12 parallel steps of one run, each through a different node");
    let mut tasks = Vec::new();
    for s in 0..12 {
        let cl = c.client_at(s % 3);
        let (run, alice) = (run.clone(), alice.clone());
        tasks.push(tokio::spawn(async move {
            let step = create(
                &cl,
                &run,
                &format!("step-{s}"),
                &alice,
                S::StepRun(pb::StepRunSpec {
                    attempt: 1,
                    cache_key: format!("ck-{s}"),
                    ..Default::default()
                }),
            )
            .await
            .id;
            for st in [pb::RunStatus::Running, pb::RunStatus::Completed] {
                cl.set_step_status(pb::SetStatusRequest {
                    id: step.clone(),
                    status: st as i32,
                    ..Default::default()
                })
                .await
                .expect("set status");
            }
        }));
    }
    for t in tasks {
        t.await.expect("step");
    }
    let r = client
        .meta_get(pb::GetResourceRequest {
            key: Some(pb::get_resource_request::Key::Id(run.clone())),
            read: linearizable(),
        })
        .await
        .expect("get run");
    let Some(S::PipelineRun(spec)) = r.resource.and_then(|r| r.spec) else {
        panic!("spec")
    };
    assert_eq!(
        spec.status,
        pb::RunStatus::Completed as i32,
        "all 12 finished: completed"
    );
    assert_eq!(spec.step_counts.get("completed"), Some(&12));

    eprintln!("--- a binding, then checks on every node at the binding's revision");
    let bob = create(
        &client,
        &org,
        "bob",
        "",
        S::User(pb::UserSpec {
            active: true,
            ..Default::default()
        }),
    )
    .await
    .id;
    let viewer = client
        .meta_get(pb::GetResourceRequest {
            key: Some(pb::get_resource_request::Key::ByName(pb::ByName {
                kind: pb::ResourceKind::Role as i32,
                parent_id: org.clone(),
                name: "viewer".into(),
                attempt: 0,
            })),
            read: linearizable(),
        })
        .await
        .expect("viewer role")
        .resource
        .expect("role")
        .id;
    let bind = client
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: org.clone(),
                spec: Some(S::RoleBinding(pb::RoleBindingSpec {
                    subject_id: bob.clone(),
                    role_id: viewer,
                    scope_id: ws.clone(),
                })),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("bind");
    let check = |node: usize, action: &'static str, rev: u64| {
        let cl = c.client_at(node);
        let (bob, run, p) = (bob.clone(), run.clone(), p.clone());
        async move {
            cl.check_permissions(pb::CheckPermissionsRequest {
                subject_id: bob,
                action: action.into(),
                resource_type: String::new(),
                resource_ids: vec![run, p],
                read: session(rev),
            })
            .await
            .expect("check")
            .allowed
        }
    };
    for node in 0..3 {
        assert_eq!(
            check(node, "read", bind.revision).await,
            vec![true, true],
            "node {node}"
        );
        assert_eq!(
            check(node, "delete", bind.revision).await,
            vec![false, false],
            "node {node}"
        );
    }
    let ex = c
        .client_at(2)
        .explain(pb::ExplainRequest {
            subject_id: bob.clone(),
            action: "read".into(),
            resource_type: String::new(),
            resource_id: run.clone(),
            read: session(bind.revision),
        })
        .await
        .expect("explain");
    assert!(
        ex.allowed && ex.role == "viewer" && ex.scope_id == ws,
        "{ex:?}"
    );

    eprintln!("--- restart a follower: its RBAC index is rebuilt from disk");
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let f = (leader + 1) % 3;
    c.restart(f);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let mut ok = false;
    for _ in 0..50 {
        if let Ok(r) = c
            .client_at(f)
            .check_permissions(pb::CheckPermissionsRequest {
                subject_id: bob.clone(),
                action: "read".into(),
                resource_type: String::new(),
                resource_ids: vec![run.clone()],
                read: session(bind.revision),
            })
            .await
        {
            assert_eq!(r.allowed, vec![true]);
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(ok, "restarted node answers checks");
    let allowed = c
        .client_at(f)
        .list_allowed(pb::ListAllowedRequest {
            subject_id: bob.clone(),
            action: "read".into(),
            resource_type: "pipeline_run".into(),
            scope_id: p.clone(),
            read: linearizable(),
        })
        .await
        .expect("list allowed");
    assert!(
        allowed.all,
        "a workspace viewer reads every run of its projects"
    );
    eprintln!("--- ListAllowed: owned resources one by one; a deactivated user gets nothing");
    let owned = |subject: String| {
        let cl = c.client_at(f);
        let p = p.clone();
        async move {
            cl.list_allowed(pb::ListAllowedRequest {
                subject_id: subject,
                action: "delete".into(),
                resource_type: "pipeline_run".into(),
                scope_id: p,
                read: linearizable(),
            })
            .await
            .expect("list allowed")
        }
    };
    let a = owned(alice.clone()).await;
    assert!(
        !a.all && a.ids == vec![run.clone()],
        "alice owns the run: {a:?}"
    );
    client
        .meta_update(pb::UpdateResourceRequest {
            id: alice.clone(),
            spec: Some(pb::Resource {
                spec: Some(S::User(pb::UserSpec {
                    active: false,
                    ..Default::default()
                })),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("deactivate");
    let a = owned(alice.clone()).await;
    assert!(!a.all && a.ids.is_empty(), "deactivated: {a:?}");

    eprintln!("--- cache-key lookup and cascade delete through a follower");
    let step = c
        .client_at(f)
        .find_step_by_cache_key(pb::CacheKeyRequest {
            project_id: p.clone(),
            cache_key: "ck-3".into(),
            read: linearizable(),
        })
        .await
        .expect("cache key")
        .resource
        .expect("step");
    assert_eq!(step.name, "step-3");
    let del = c
        .client_at(f)
        .meta_delete(pb::DeleteResourceRequest {
            id: run.clone(),
            ..Default::default()
        })
        .await
        .expect("delete");
    assert_eq!(del.removed, 13, "the run and its 12 steps");
    let gone = client
        .meta_get(pb::GetResourceRequest {
            key: Some(pb::get_resource_request::Key::Id(step.id.clone())),
            read: linearizable(),
        })
        .await
        .expect_err("steps go with their run");
    assert_eq!(code_of(gone), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m03_bad_input_gets_clear_errors_and_retries_apply_once() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let (org, alice, _, p) = tree(&client).await;
    let mut md = client.metadata_at(1);
    let get = |id: &str| pb::GetResourceRequest {
        key: Some(pb::get_resource_request::Key::Id(id.into())),
        read: linearizable(),
    };
    // Malformed and unknown ids.
    let e = md.get(get("not-a-uuid")).await.expect_err("malformed");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("malformed id"), "{}", e.message());
    let e = md
        .get(get("00000000-0000-4000-8000-000000000001"))
        .await
        .expect_err("unknown");
    assert_eq!(e.code(), Code::NotFound);
    // No spec, unknown kind, invalid names, oversized metadata, unknown parent.
    let e = md
        .create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                name: "x".into(),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("no spec");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = md
        .list(pb::ListResourcesRequest {
            kind: 99,
            parent_id: p.clone(),
            ..Default::default()
        })
        .await
        .expect_err("kind");
    assert_eq!(e.code(), Code::InvalidArgument);
    for name in ["", " lead", "a\nb"] {
        let e = client
            .meta_create(pb::CreateResourceRequest {
                resource: Some(pb::Resource {
                    parent_id: p.clone(),
                    name: name.into(),
                    spec: Some(S::Pipeline(Default::default())),
                    ..Default::default()
                }),
                request_id: String::new(),
            })
            .await
            .expect_err("bad name");
        assert_eq!(code_of(e), Code::InvalidArgument, "{name:?}");
    }
    let run = create(&client, &p, "r", &alice, S::PipelineRun(Default::default()))
        .await
        .id;
    let e = client
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: run.clone(),
                name: "blob".into(),
                spec: Some(S::RunMetadata(pb::RunMetadataSpec {
                    value: Some(pb::MetadataValue {
                        value: Some(pb::metadata_value::Value::Str("x".repeat(70_000))),
                    }),
                })),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("oversized");
    assert_eq!(code_of(e), Code::InvalidArgument);
    // A run cannot be its own parent; an unknown parent run is NOT_FOUND.
    let e = client
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                id: "11111111-1111-4111-8111-111111111111".into(),
                parent_id: p.clone(),
                name: "loop".into(),
                spec: Some(S::PipelineRun(pb::PipelineRunSpec {
                    parent_run_id: "11111111-1111-4111-8111-111111111111".into(),
                    ..Default::default()
                })),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect_err("cycle");
    assert_eq!(code_of(e), Code::InvalidArgument);
    // Garbage page token; oversized check batch.
    let e = client
        .meta_list(pb::ListResourcesRequest {
            kind: pb::ResourceKind::PipelineRun as i32,
            parent_id: p.clone(),
            page_token: "deadbeefdeadbeef".into(),
            ..Default::default()
        })
        .await
        .expect_err("token");
    assert_eq!(code_of(e), Code::InvalidArgument);
    let e = client
        .check_permissions(pb::CheckPermissionsRequest {
            subject_id: alice.clone(),
            action: "read".into(),
            resource_type: String::new(),
            resource_ids: vec![run.clone(); 1001],
            read: None,
        })
        .await
        .expect_err("batch");
    assert_eq!(code_of(e), Code::ResourceExhausted);
    let e = client
        .check_permissions(pb::CheckPermissionsRequest {
            subject_id: alice.clone(),
            action: "fly".into(),
            resource_type: String::new(),
            resource_ids: vec![run.clone()],
            read: None,
        })
        .await
        .expect_err("action");
    assert_eq!(code_of(e), Code::InvalidArgument);
    // A finished run refuses a status change with the current status in the message.
    client
        .set_run_status(pb::SetStatusRequest {
            id: run.clone(),
            status: pb::RunStatus::Failed as i32,
            ..Default::default()
        })
        .await
        .expect("fail run");
    let e = client
        .set_run_status(pb::SetStatusRequest {
            id: run.clone(),
            status: pb::RunStatus::Running as i32,
            ..Default::default()
        })
        .await
        .expect_err("finished");
    assert!(
        e.to_string().contains("is failed"),
        "names the current status: {e}"
    );
    assert_eq!(code_of(e), Code::FailedPrecondition);
    // One request id, two nodes: one pipeline, the same answer twice.
    let req = pb::CreateResourceRequest {
        resource: Some(pb::Resource {
            parent_id: p.clone(),
            name: "once".into(),
            spec: Some(S::Pipeline(Default::default())),
            ..Default::default()
        }),
        request_id: "retry-1".into(),
    };
    let a = c
        .client_at(0)
        .meta_create(req.clone())
        .await
        .expect("first");
    let b = c.client_at(2).meta_create(req).await.expect("retry");
    assert_eq!(
        a.resource.as_ref().map(|r| &r.id),
        b.resource.as_ref().map(|r| &r.id)
    );
    assert_eq!(a.revision, b.revision);
    let _ = org;
}

/// Runs the CLI against the cluster; returns (exit code, stdout, stderr).
fn cli(c: &TestCluster, args: &[&str]) -> (i32, String, String) {
    let eps = c.endpoints().join(",");
    let mut full: Vec<&str> = vec![args[0], "--endpoints", &eps];
    full.extend_from_slice(&args[1..]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_metaraft"))
        .args(&full)
        .output()
        .expect("run metaraft");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json_id(stdout: &str) -> String {
    let v: serde_json::Value =
        serde_json::from_str(stdout.lines().next().unwrap_or("")).expect("json line");
    v["id"].as_str().expect("id").to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn m04_cli_manages_resources_and_roles_and_refuses_bad_input() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let (code, out, err) = cli(
        &c,
        &[
            "meta",
            "create",
            "organization",
            "--name",
            "acme",
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let org = json_id(&out);
    let (_, out, _) = cli(
        &c,
        &[
            "meta", "create", "user", "--parent", &org, "--name", "bob", "--output", "json",
        ],
    );
    let bob = json_id(&out);
    let (_, out, _) = cli(
        &c,
        &[
            "meta",
            "create",
            "workspace",
            "--parent",
            &org,
            "--name",
            "ml",
            "--output",
            "json",
        ],
    );
    let ws = json_id(&out);

    eprintln!("--- roles, a custom role, a binding, check and explain");
    let (code, out, _) = cli(&c, &["rbac", "roles", &org]);
    assert_eq!(code, 0);
    assert!(
        out.contains("name=\"admin\"") && out.contains("name=\"viewer\""),
        "{out}"
    );
    let (code, _, err) = cli(
        &c,
        &[
            "rbac",
            "create-role",
            &org,
            "auditor",
            "--permission",
            "pipeline_run:read",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(
        &c,
        &[
            "rbac",
            "explain",
            "--subject",
            &bob,
            "--action",
            "read",
            &ws,
        ],
    );
    assert_eq!(code, 2, "denied exits 2: {out}");
    assert!(out.starts_with("denied"), "{out}");
    let (code, _, err) = cli(
        &c,
        &[
            "rbac",
            "bind",
            &org,
            "--subject",
            &bob,
            "--role",
            "viewer",
            "--scope",
            &ws,
        ],
    );
    assert_eq!(code, 0, "{err}");
    let (code, out, _) = cli(
        &c,
        &[
            "rbac",
            "explain",
            "--subject",
            &bob,
            "--action",
            "read",
            &ws,
            "--output",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(v["role"], "viewer");
    let (code, out, _) = cli(
        &c,
        &[
            "rbac",
            "check",
            "--subject",
            &bob,
            "--action",
            "delete",
            &ws,
        ],
    );
    assert_eq!((code, out.trim().ends_with("denied")), (2, true), "{out}");

    eprintln!("--- bad input: each a clear error, nothing created");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["meta", "create", "gadget", "--name", "x"],
            "unknown kind",
        ),
        (
            vec![
                "meta",
                "create",
                "pipeline",
                "--parent",
                &ws,
                "--name",
                "x",
                "--set",
                "colour=red",
            ],
            "has no field",
        ),
        (
            vec![
                "meta", "create", "pipeline", "--parent", &ws, "--name", "x", "--set", "novalue",
            ],
            "expected key=value",
        ),
        (vec!["meta", "get", "not-a-uuid"], "malformed id"),
        (
            vec!["meta", "get", "00000000-0000-4000-8000-000000000009"],
            "MR-NOTFOUND",
        ),
        (
            vec![
                "meta",
                "list",
                "pipeline_run",
                "--parent",
                &ws,
                "--status",
                "sleeping",
            ],
            "unknown status",
        ),
        (
            vec![
                "rbac",
                "create-role",
                &org,
                "bad",
                "--permission",
                "pipeline_run",
            ],
            "expected resource_type:action",
        ),
        (
            vec![
                "rbac",
                "create-role",
                &org,
                "bad",
                "--permission",
                "pipeline_run:fly",
            ],
            "unknown action",
        ),
        (
            vec![
                "rbac",
                "bind",
                &org,
                "--subject",
                &bob,
                "--role",
                "nosuchrole",
                "--scope",
                &ws,
            ],
            "nosuchrole",
        ),
    ];
    for (args, want) in cases {
        let (code, out, err) = cli(&c, &args);
        assert_ne!(code, 0, "{args:?} succeeded: {out}");
        assert!(err.contains(want), "{args:?}: expected {want:?} in {err:?}");
    }
    let (_, out, _) = cli(&c, &["meta", "list", "pipeline", "--parent", &ws]);
    assert!(out.trim().is_empty(), "nothing was created: {out}");
}
