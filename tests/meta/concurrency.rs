//! Concurrent writers through every node, reads and permission checks on followers, restarts.

use super::*;

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
