//! `metaraft bench --workload ...`: the metadata workloads of the domain notes, each reporting
//! throughput and latency per operation type.
//!
//! - `ci-burst`: pipelines x steps launched at once: run creation, step creation, status changes
//!   and heartbeats, parallel steps of one run updating the same run record.
//! - `dashboard`: users listing runs newest first (20 per page, status filters), 5% going to a
//!   deep page or loading a run with its steps.
//! - `steady`: runs of 8 steps: a cache-key lookup per step, heartbeats, status changes.
//! - `registry`: 90% reads (latest artifact version, model version by stage, runs by metadata),
//!   10% writes (new versions, promotions).
//! - `admin`: permission checks in batches of 20, role-binding and team changes, key rotation.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};

use metaraft::client::Client;
use metaraft::pb;
use metaraft::pb::resource::Spec as S;

#[derive(Clone, Copy, Debug, clap::ValueEnum, PartialEq)]
pub enum Workload {
    /// The key/value load (Put/Get), as before.
    Kv,
    CiBurst,
    Dashboard,
    Steady,
    Registry,
    Admin,
}

/// Latency per operation type.
#[derive(Default)]
struct Rec {
    ops: BTreeMap<&'static str, (Histogram<u64>, u64)>,
}

impl Rec {
    async fn time<T, F>(&mut self, op: &'static str, f: F) -> Option<T>
    where
        F: std::future::Future<Output = Result<T, metaraft::client::ClientError>>,
    {
        let t = Instant::now();
        let r = f.await;
        let e = self.ops.entry(op).or_insert_with(|| {
            (
                Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
                0,
            )
        });
        match r {
            Ok(v) => {
                let _ = e.0.record(t.elapsed().as_micros().max(1) as u64);
                Some(v)
            }
            Err(_) => {
                e.1 += 1;
                None
            }
        }
    }

    fn merge(&mut self, o: Rec) {
        for (k, (h, errs)) in o.ops {
            let e = self.ops.entry(k).or_insert_with(|| {
                (
                    Histogram::new_with_bounds(1, 60_000_000, 3).expect("static bounds"),
                    0,
                )
            });
            let _ = e.0.add(&h);
            e.1 += errs;
        }
    }
}

fn create_req(parent: &str, name: &str, owner: &str, spec: S) -> pb::CreateResourceRequest {
    pb::CreateResourceRequest {
        resource: Some(pb::Resource {
            parent_id: parent.into(),
            name: name.into(),
            owner_id: owner.into(),
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    }
}

async fn create(c: &Client, parent: &str, name: &str, owner: &str, spec: S) -> Result<String> {
    Ok(c.meta_create(create_req(parent, name, owner, spec))
        .await
        .with_context(|| format!("create {name}"))?
        .resource
        .map(|r| r.id)
        .unwrap_or_default())
}

/// What every workload starts from: an org, users, a workspace, a project, pipelines.
struct World {
    org: String,
    users: Vec<String>,
    project: String,
    pipelines: Vec<String>,
}

async fn world(c: &Client, tag: &str) -> Result<World> {
    let org = create(
        c,
        "",
        &format!("bench-{tag}"),
        "",
        S::Organization(Default::default()),
    )
    .await?;
    let mut users = Vec::new();
    for u in 0..30 {
        users.push(
            create(
                c,
                &org,
                &format!("user{u}"),
                "",
                S::User(pb::UserSpec {
                    active: true,
                    ..Default::default()
                }),
            )
            .await?,
        );
    }
    let ws = create(c, &org, "ml", &users[0], S::Workspace(Default::default())).await?;
    let project = create(c, &ws, "main", &users[0], S::Project(Default::default())).await?;
    let mut pipelines = Vec::new();
    for p in 0..50 {
        pipelines.push(
            create(
                c,
                &project,
                &format!("pipe{p}"),
                &users[p % 30],
                S::Pipeline(Default::default()),
            )
            .await?,
        );
    }
    // Viewers on the workspace for half the users, developer on the project for the rest.
    for (i, u) in users.iter().enumerate() {
        let role = if i % 2 == 0 { "viewer" } else { "developer" };
        let role_id = c
            .meta_get(pb::GetResourceRequest {
                key: Some(pb::get_resource_request::Key::ByName(pb::ByName {
                    kind: pb::ResourceKind::Role as i32,
                    parent_id: org.clone(),
                    name: role.into(),
                    attempt: 0,
                })),
                read: None,
            })
            .await?
            .resource
            .map(|r| r.id)
            .unwrap_or_default();
        let scope = if i % 2 == 0 { &ws } else { &project };
        c.meta_create(create_req(
            &org,
            "",
            "",
            S::RoleBinding(pb::RoleBindingSpec {
                subject_id: u.clone(),
                role_id,
                scope_id: scope.clone(),
            }),
        ))
        .await?;
    }
    Ok(World {
        org,
        users,
        project,
        pipelines,
    })
}

fn run_spec(pipeline: &str, steps: u32) -> S {
    S::PipelineRun(pb::PipelineRunSpec {
        pipeline_id: pipeline.into(),
        expected_steps: steps,
        ..Default::default()
    })
}

fn status_req(id: &str, st: pb::RunStatus) -> pb::SetStatusRequest {
    pb::SetStatusRequest {
        id: id.into(),
        status: st as i32,
        ..Default::default()
    }
}

/// One run of `steps` steps, the steps in parallel (each: create, running, heartbeat, done).
async fn one_run(
    c: &Arc<Client>,
    w: &World,
    pipe: usize,
    name: &str,
    steps: u32,
    rec: &mut Rec,
    cache_lookup: bool,
) -> Result<()> {
    let owner = &w.users[pipe % w.users.len()];
    let Some(run) = rec
        .time(
            "create_run",
            c.meta_create(create_req(
                &w.project,
                name,
                owner,
                run_spec(&w.pipelines[pipe % w.pipelines.len()], steps),
            )),
        )
        .await
    else {
        return Ok(());
    };
    let run_id = run.resource.map(|r| r.id).unwrap_or_default();
    let mut set = tokio::task::JoinSet::new();
    for s in 0..steps {
        let (c, run_id, owner, project) =
            (c.clone(), run_id.clone(), owner.clone(), w.project.clone());
        set.spawn(async move {
            let mut rec = Rec::default();
            let ck = format!("{}-{s}", run_id.get(..8).unwrap_or(""));
            if cache_lookup {
                rec.time("cache_lookup", async {
                    match c
                        .find_step_by_cache_key(pb::CacheKeyRequest {
                            project_id: project.clone(),
                            cache_key: ck.clone(),
                            read: None,
                        })
                        .await
                    {
                        Err(e) if e.code() == Some(tonic::Code::NotFound) => Ok(()),
                        r => r.map(|_| ()),
                    }
                })
                .await;
            }
            let step = rec
                .time(
                    "create_step",
                    c.meta_create(create_req(
                        &run_id,
                        &format!("step{s}"),
                        &owner,
                        S::StepRun(pb::StepRunSpec {
                            attempt: 1,
                            cache_key: ck,
                            ..Default::default()
                        }),
                    )),
                )
                .await;
            let Some(step) = step.and_then(|r| r.resource) else {
                return rec;
            };
            rec.time(
                "set_step_status",
                c.set_step_status(status_req(&step.id, pb::RunStatus::Running)),
            )
            .await;
            rec.time(
                "heartbeat",
                c.heartbeat(pb::HeartbeatRequest {
                    id: step.id.clone(),
                    request_id: String::new(),
                }),
            )
            .await;
            rec.time(
                "set_step_status",
                c.set_step_status(status_req(&step.id, pb::RunStatus::Completed)),
            )
            .await;
            rec
        });
    }
    while let Some(r) = set.join_next().await {
        rec.merge(r?);
    }
    Ok(())
}

pub struct Opts {
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub endpoints: Vec<String>,
    pub concurrency: usize,
    pub duration: u64,
    pub json: bool,
}

pub async fn run(workload: Workload, o: Opts) -> Result<std::process::ExitCode> {
    let c = Arc::new(Client::with_tls(
        &o.endpoints,
        Duration::from_secs(30),
        o.tls.clone(),
    )?);
    let tag = format!("{:x}", rand::random::<u32>());
    let w = Arc::new(world(&c, &tag).await?);
    let mut start = Instant::now();
    let mut total = Rec::default();
    match workload {
        Workload::Kv => unreachable!("the kv load is bench/mod.rs's"),
        Workload::CiBurst => {
            // 50 pipelines x 20 steps, all launched at once (as fast as the cluster takes them).
            let mut set = tokio::task::JoinSet::new();
            for p in 0..50usize {
                let (c, w) = (c.clone(), w.clone());
                set.spawn(async move {
                    let mut rec = Rec::default();
                    one_run(&c, &w, p, &format!("burst-{p}"), 20, &mut rec, false)
                        .await
                        .map(|_| rec)
                });
            }
            while let Some(r) = set.join_next().await {
                total.merge(r??);
            }
        }
        _ => {
            let prep = prepare(&c, &w, workload).await?;
            // Measure from here: the data a workload reads is not part of it.
            start = Instant::now();
            let stop = Arc::new(AtomicBool::new(false));
            let seq = Arc::new(AtomicU64::new(0));
            let mut set = tokio::task::JoinSet::new();
            for wk in 0..o.concurrency {
                let (c, w, stop, seq, prep) = (
                    c.clone(),
                    w.clone(),
                    stop.clone(),
                    seq.clone(),
                    prep.clone(),
                );
                set.spawn(async move {
                    let mut rec = Rec::default();
                    let mut rng = rand::rngs::StdRng::seed_from_u64(wk as u64);
                    while !stop.load(Ordering::Relaxed) {
                        let n = seq.fetch_add(1, Ordering::Relaxed);
                        step(workload, &c, &w, &prep, &mut rng, &mut rec, n).await;
                    }
                    rec
                });
            }
            tokio::time::sleep(Duration::from_secs(o.duration)).await;
            stop.store(true, Ordering::Relaxed);
            while let Some(r) = set.join_next().await {
                total.merge(r?);
            }
        }
    }
    report(workload, &total, start.elapsed(), o.json);
    Ok(std::process::ExitCode::SUCCESS)
}

/// Data a read-heavy workload needs before it starts.
#[derive(Clone, Default)]
struct Prep {
    runs: Vec<String>,
    artifact: String,
    model: String,
    versions: Vec<String>,
}

async fn prepare(c: &Arc<Client>, w: &World, workload: Workload) -> Result<Prep> {
    let mut p = Prep::default();
    match workload {
        Workload::Dashboard | Workload::Admin => p.runs = prepare_runs(c, w).await?,
        Workload::Registry => prepare_registry(c, w, &mut p).await?,
        _ => {}
    }
    Ok(p)
}

/// 2,000 runs (one with 1,000 steps) to list and check.
async fn prepare_runs(c: &Arc<Client>, w: &World) -> Result<Vec<String>> {
    let mut runs = Vec::new();
    let mut set = tokio::task::JoinSet::new();
    for b in 0..16usize {
        let (c, project, pipes, users) = (
            c.clone(),
            w.project.clone(),
            w.pipelines.clone(),
            w.users.clone(),
        );
        set.spawn(async move {
            let mut ids = Vec::new();
            for r in 0..125usize {
                let i = b * 125 + r;
                let st = [
                    pb::RunStatus::Completed,
                    pb::RunStatus::Failed,
                    pb::RunStatus::Running,
                ][i % 3];
                let id = create(
                    &c,
                    &project,
                    &format!("run-{i:05}"),
                    &users[i % 30],
                    run_spec(&pipes[i % 50], 0),
                )
                .await?;
                if st != pb::RunStatus::Running {
                    c.set_run_status(status_req(&id, st)).await?;
                }
                ids.push(id);
            }
            Ok::<_, anyhow::Error>(ids)
        });
    }
    while let Some(r) = set.join_next().await {
        runs.extend(r??);
    }
    let big = create(
        c,
        &w.project,
        "big-run",
        &w.users[0],
        run_spec(&w.pipelines[0], 0),
    )
    .await?;
    for s in 0..1000 {
        create(
            c,
            &big,
            &format!("s{s}"),
            &w.users[0],
            S::StepRun(pb::StepRunSpec {
                attempt: 1,
                ..Default::default()
            }),
        )
        .await?;
    }
    runs.push(big);
    Ok(runs)
}

/// An artifact and a model of 20 versions each, and a run with metadata.
async fn prepare_registry(c: &Arc<Client>, w: &World, p: &mut Prep) -> Result<()> {
    p.artifact = create(
        c,
        &w.project,
        "dataset",
        &w.users[0],
        S::Artifact(Default::default()),
    )
    .await?;
    p.model = create(
        c,
        &w.project,
        "model",
        &w.users[0],
        S::Model(Default::default()),
    )
    .await?;
    for _ in 0..20 {
        p.versions.push(
            create(
                c,
                &p.model,
                "",
                &w.users[0],
                S::ModelVersion(Default::default()),
            )
            .await?,
        );
        create(
            c,
            &p.artifact,
            "",
            &w.users[0],
            S::ArtifactVersion(pb::ArtifactVersionSpec {
                uri: "s3://b/k".into(),
                ..Default::default()
            }),
        )
        .await?;
    }
    let run = create(
        c,
        &w.project,
        "scored",
        &w.users[0],
        run_spec(&w.pipelines[0], 0),
    )
    .await?;
    create(
        c,
        &run,
        "accuracy",
        &w.users[0],
        S::RunMetadata(pb::RunMetadataSpec {
            value: Some(pb::MetadataValue {
                value: Some(pb::metadata_value::Value::Str("high".into())),
            }),
        }),
    )
    .await?;
    Ok(())
}

fn list_req(kind: pb::ResourceKind, parent: &str, size: u32) -> pb::ListResourcesRequest {
    pb::ListResourcesRequest {
        kind: kind as i32,
        parent_id: parent.into(),
        page_size: size,
        read: Some(pb::ReadOptions {
            consistency: pb::Consistency::Linearizable as i32,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One operation (or a group of them) of a timed workload.
async fn step(
    workload: Workload,
    c: &Arc<Client>,
    w: &World,
    p: &Prep,
    rng: &mut rand::rngs::StdRng,
    rec: &mut Rec,
    n: u64,
) {
    match workload {
        Workload::Dashboard => dashboard_step(c, w, p, rng, rec).await,
        Workload::Steady => {
            let mut r = Rec::default();
            let _ = one_run(
                c,
                w,
                n as usize,
                &format!("steady-{n}-{:x}", rng.gen::<u32>()),
                8,
                &mut r,
                true,
            )
            .await;
            rec.merge(r);
        }
        Workload::Registry => registry_step(c, w, p, rng, rec).await,
        Workload::Admin => admin_step(c, w, p, rng, rec, n).await,
        Workload::Kv | Workload::CiBurst => {}
    }
}

/// Run listings, 5% of them a deep page or a run's 1,000 steps.
async fn dashboard_step(
    c: &Arc<Client>,
    w: &World,
    p: &Prep,
    rng: &mut rand::rngs::StdRng,
    rec: &mut Rec,
) {
    let x: f64 = rng.gen();
    if x < 0.025 {
        // A deep page: follow tokens 50 pages down.
        let mut req = list_req(pb::ResourceKind::PipelineRun, &w.project, 20);
        for _ in 0..50 {
            let Some(page) = rec.time("list_runs_deep", c.meta_list(req.clone())).await else {
                return;
            };
            if page.next_page_token.is_empty() {
                break;
            }
            req.page_token = page.next_page_token;
        }
    } else if x < 0.05 {
        let run = p.runs.last().cloned().unwrap_or_default();
        let mut req = list_req(pb::ResourceKind::StepRun, &run, 1000);
        req.order = pb::ListOrder::ByName as i32;
        rec.time("load_run_1000_steps", c.meta_list(req)).await;
    } else {
        let mut req = list_req(pb::ResourceKind::PipelineRun, &w.project, 20);
        if rng.gen_bool(0.5) {
            req.status = [
                pb::RunStatus::Failed,
                pb::RunStatus::Running,
                pb::RunStatus::Completed,
            ][rng.gen_range(0..3)] as i32;
            rec.time("list_runs_by_status", c.meta_list(req)).await;
        } else {
            rec.time("list_runs", c.meta_list(req)).await;
        }
    }
}

/// 90% reads (latest version, versions by stage, runs by metadata), 10% writes.
async fn registry_step(
    c: &Arc<Client>,
    w: &World,
    p: &Prep,
    rng: &mut rand::rngs::StdRng,
    rec: &mut Rec,
) {
    let x: f64 = rng.gen();
    if x < 0.3 {
        rec.time(
            "latest_artifact_version",
            c.meta_list(list_req(pb::ResourceKind::ArtifactVersion, &p.artifact, 1)),
        )
        .await;
    } else if x < 0.6 {
        let mut req = list_req(pb::ResourceKind::ModelVersion, &p.model, 10);
        req.stage = Some(pb::ModelStage::Production as i32);
        rec.time("model_versions_by_stage", c.meta_list(req)).await;
    } else if x < 0.9 {
        let mut req = list_req(pb::ResourceKind::PipelineRun, &w.project, 20);
        req.metadata_key = "accuracy".into();
        req.metadata_value = Some(pb::MetadataValue {
            value: Some(pb::metadata_value::Value::Str("high".into())),
        });
        rec.time("runs_by_metadata", c.meta_list(req)).await;
    } else if x < 0.95 {
        rec.time(
            "create_artifact_version",
            c.meta_create(create_req(
                &p.artifact,
                "",
                &w.users[0],
                S::ArtifactVersion(pb::ArtifactVersionSpec {
                    uri: "s3://b/k".into(),
                    ..Default::default()
                }),
            )),
        )
        .await;
    } else {
        let v = &p.versions[rng.gen_range(0..p.versions.len())];
        rec.time(
            "promote_model_version",
            c.promote_model_version(pb::PromoteRequest {
                model_version_id: v.clone(),
                stage: pb::ModelStage::Production as i32,
                archive_existing: true,
                request_id: String::new(),
            }),
        )
        .await;
    }
}

/// Permission checks in batches of 20, some team creations and binding listings.
async fn admin_step(
    c: &Arc<Client>,
    w: &World,
    p: &Prep,
    rng: &mut rand::rngs::StdRng,
    rec: &mut Rec,
    n: u64,
) {
    let x: f64 = rng.gen();
    let user = &w.users[rng.gen_range(0..w.users.len())];
    if x < 0.97 {
        let ids: Vec<String> = (0..20)
            .map(|_| p.runs[rng.gen_range(0..p.runs.len())].clone())
            .collect();
        rec.time(
            "check_permissions_x20",
            c.check_permissions(pb::CheckPermissionsRequest {
                subject_id: user.clone(),
                action: "read".into(),
                resource_type: String::new(),
                resource_ids: ids,
                read: None,
            }),
        )
        .await;
    } else if x < 0.99 {
        rec.time(
            "create_team",
            c.meta_create(create_req(
                &w.org,
                &format!("team-{n}-{:x}", rng.gen::<u32>()),
                "",
                S::Team(pb::TeamSpec {
                    member_ids: vec![user.clone()],
                }),
            )),
        )
        .await;
    } else {
        rec.time(
            "list_bindings",
            c.meta_list(list_req(pb::ResourceKind::RoleBinding, &w.org, 100)),
        )
        .await;
    }
}

fn report(workload: Workload, r: &Rec, elapsed: Duration, json: bool) {
    let secs = elapsed.as_secs_f64();
    let mut rows = Vec::new();
    let mut total = 0u64;
    for (op, (h, errs)) in &r.ops {
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        total += h.len();
        rows.push(serde_json::json!({
            "op": op, "ok": h.len(), "errors": errs, "per_sec": h.len() as f64 / secs,
            "p50_ms": ms(0.5), "p99_ms": ms(0.99), "max_ms": h.max() as f64 / 1000.0,
        }));
    }
    let name = clap::ValueEnum::to_possible_value(&workload)
        .map(|v| v.get_name().to_string())
        .unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::json!({"workload": name, "seconds": secs, "calls": total, "calls_per_sec": total as f64 / secs, "ops": rows})
        );
        return;
    }
    println!(
        "{name}: {total} calls in {secs:.1}s ({:.0}/s)",
        total as f64 / secs
    );
    println!(
        "{:<26} {:>8} {:>7} {:>9} {:>9} {:>9} {:>9}",
        "op", "ok", "errors", "per_sec", "p50_ms", "p99_ms", "max_ms"
    );
    for row in rows {
        println!(
            "{:<26} {:>8} {:>7} {:>9.0} {:>9.2} {:>9.2} {:>9.2}",
            row["op"].as_str().unwrap_or(""),
            row["ok"].as_u64().unwrap_or(0),
            row["errors"].as_u64().unwrap_or(0),
            row["per_sec"].as_f64().unwrap_or(0.0),
            row["p50_ms"].as_f64().unwrap_or(0.0),
            row["p99_ms"].as_f64().unwrap_or(0.0),
            row["max_ms"].as_f64().unwrap_or(0.0)
        );
    }
}
