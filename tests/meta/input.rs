//! Bad input through the API and the CLI.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn m03_bad_input_gets_clear_errors_and_retries_apply_once() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let (org, alice, _, p) = tree(&client).await;
    replayed_api_key_creation_is_refused_not_given_a_dead_secret(&client, &org).await;
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

/// A CreateApiKey retried with its request id (its answer lost, say) must not return a new
/// secret whose hash was never stored: the retry is refused, saying why, and the key the first
/// call made still verifies with the first secret.
async fn replayed_api_key_creation_is_refused_not_given_a_dead_secret(c: &Client, org: &str) {
    let sa = create(
        c,
        org,
        "pipeline-bot",
        "",
        S::User(pb::UserSpec {
            active: true,
            service_account: true,
            ..Default::default()
        }),
    )
    .await
    .id;
    let req = pb::CreateApiKeyRequest {
        service_account_id: sa.clone(),
        key_id: "k1".into(),
        grace_ms: 0,
        request_id: "create-k1-once".into(),
    };
    let first = c.create_api_key(req.clone()).await.expect("first creation");
    let e = c
        .create_api_key(req)
        .await
        .expect_err("a replayed creation");
    assert!(e.to_string().contains("never stored"), "{e}");
    assert_eq!(code_of(e), Code::AlreadyExists);
    let v = c
        .verify_api_key(pb::VerifyApiKeyRequest {
            secret: first.secret,
            read: linearizable(),
        })
        .await
        .expect("verify");
    assert!(v.valid, "the first secret verifies");
    assert_eq!(v.service_account.map(|r| r.id), Some(sa));
}
