//! `metaraft meta ...` (resources: create, get, list, delete, run/step status, model stages, API
//! keys) and, in [`rbac`], `metaraft rbac ...`. Spec building and printing are in [`resource`].

mod rbac;
mod resource;

use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use metaraft::client::Client;
use metaraft::fsm::meta::{RunStatus, Stage};
use metaraft::pb;

use crate::cli::args::{Conn, ConsistencyArg, Output};
use crate::cli::runtime;
pub use rbac::{run_rbac, RbacCmd};
use resource::{kind_arg, list_all, parse_kv, print_resources, spec_from_pairs};

#[derive(Subcommand, Debug)]
pub enum MetaCmd {
    /// Create a resource; spec fields as --set key=value (see docs/metadata.md).
    Create(CreateArgs),
    /// Get by id, or by --kind/--parent/--name.
    Get(GetArgs),
    /// List children of a parent, newest first (or --by-name), one page or --all.
    List(ListArgs),
    /// Delete a resource with its dependents.
    Delete {
        id: String,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// Set a run's or step's status (--step for a step run).
    SetStatus {
        id: String,
        status: String,
        #[arg(long)]
        step: bool,
        #[arg(long)]
        resume: bool,
    },
    /// Move a model version to a stage (none, staging, production, archived).
    Promote {
        id: String,
        stage: String,
        #[arg(long)]
        archive_existing: bool,
    },
    /// Delete runs of a project created before a time, in pages of --limit.
    PurgeRuns {
        project: String,
        /// Unix milliseconds.
        #[arg(long)]
        before_ms: u64,
        #[arg(long, default_value_t = 500)]
        limit: u32,
    },
    /// Create an API key for a service account (prints the secret once).
    CreateApiKey {
        service_account: String,
        key_id: String,
        /// Older keys stay valid this long.
        #[arg(long, default_value_t = 0)]
        grace_ms: u64,
    },
}

// The flags of `meta create`, `get` and `list` (no doc comments here: clap would take them
// for the subcommands' about text).
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// organization, workspace, project, user, team, role, role_binding, pipeline,
    /// pipeline_run, step_run, artifact, artifact_version, model, model_version, run_metadata.
    pub kind: String,
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long, default_value = "")]
    pub parent: String,
    #[arg(long, default_value = "")]
    pub owner: String,
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    #[arg(long = "set", value_parser = parse_kv)]
    pub set: Vec<(String, String)>,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct GetArgs {
    pub id: Option<String>,
    #[arg(long)]
    pub kind: Option<String>,
    #[arg(long, default_value = "")]
    pub parent: String,
    #[arg(long)]
    pub name: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub attempt: u32,
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    pub kind: String,
    #[arg(long, default_value = "")]
    pub parent: String,
    #[arg(long)]
    pub status: Option<String>,
    #[arg(long, default_value = "")]
    pub pipeline: String,
    #[arg(long, default_value = "")]
    pub owner: String,
    #[arg(long, default_value = "")]
    pub tag: String,
    #[arg(long)]
    pub stage: Option<String>,
    #[arg(long)]
    pub by_name: bool,
    #[arg(long, default_value_t = 50)]
    pub page_size: u32,
    #[arg(long, default_value = "")]
    pub page_token: String,
    /// Follow page tokens to the end.
    #[arg(long)]
    pub all: bool,
    #[arg(long, value_enum, default_value = "linearizable")]
    pub consistency: ConsistencyArg,
    #[arg(long, value_enum, default_value = "text")]
    pub output: Output,
}

/// Runs one `meta` command. The client's channels need the runtime, so they are made inside it.
pub fn run_meta(conn: Conn, op: MetaCmd) -> Result<ExitCode> {
    runtime::multi_thread()?.block_on(async { meta(conn.client()?, op).await })
}

async fn meta(c: Client, op: MetaCmd) -> Result<ExitCode> {
    match op {
        MetaCmd::Create(a) => create(&c, a).await?,
        MetaCmd::Get(a) => get(&c, a).await?,
        MetaCmd::List(a) => list(&c, a).await?,
        MetaCmd::Delete {
            id,
            expected_revision,
        } => {
            let r = c
                .meta_delete(pb::DeleteResourceRequest {
                    id,
                    expected_revision,
                    request_id: String::new(),
                })
                .await?;
            println!("removed {} (revision {})", r.removed, r.revision);
        }
        MetaCmd::SetStatus {
            id,
            status,
            step,
            resume,
        } => set_status(&c, id, status, step, resume).await?,
        MetaCmd::Promote {
            id,
            stage,
            archive_existing,
        } => promote(&c, id, stage, archive_existing).await?,
        MetaCmd::PurgeRuns {
            project,
            before_ms,
            limit,
        } => purge_runs(&c, project, before_ms, limit).await?,
        MetaCmd::CreateApiKey {
            service_account,
            key_id,
            grace_ms,
        } => {
            let r = c
                .create_api_key(pb::CreateApiKeyRequest {
                    service_account_id: service_account,
                    key_id,
                    grace_ms,
                    request_id: String::new(),
                })
                .await?;
            println!("{}", r.secret);
            eprintln!("store this secret now: it is not kept and cannot be shown again");
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn create(c: &Client, a: CreateArgs) -> Result<()> {
    let kind = kind_arg(&a.kind)?;
    let spec = spec_from_pairs(kind, &a.set)?;
    let r = c
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                parent_id: a.parent,
                name: a.name,
                owner_id: a.owner,
                tags: a.tags,
                spec: Some(spec),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await?;
    print_resources(r.resource.as_slice(), a.output);
    Ok(())
}

async fn get(c: &Client, a: GetArgs) -> Result<()> {
    use pb::get_resource_request::Key;
    let key = match (a.id, a.kind, a.name) {
        (Some(id), None, None) => Key::Id(id),
        (None, Some(k), Some(n)) => Key::ByName(pb::ByName {
            kind: kind_arg(&k)? as i32,
            parent_id: a.parent,
            name: n,
            attempt: a.attempt,
        }),
        _ => bail!("give an id, or --kind and --name (and --parent)"),
    };
    let r = c
        .meta_get(pb::GetResourceRequest {
            key: Some(key),
            read: a.consistency.read_opts(0, 0),
        })
        .await?;
    print_resources(r.resource.as_slice(), a.output);
    Ok(())
}

async fn list(c: &Client, a: ListArgs) -> Result<()> {
    let status = match a.status {
        None => 0,
        Some(s) => RunStatus::parse(&s).with_context(|| format!("unknown status {s:?}"))? as i32,
    };
    let stage = match a.stage {
        None => None,
        Some(s) => Some(Stage::parse(&s).with_context(|| format!("unknown stage {s:?}"))? as i32),
    };
    let req = pb::ListResourcesRequest {
        kind: kind_arg(&a.kind)? as i32,
        parent_id: a.parent,
        status,
        pipeline_id: a.pipeline,
        owner_id: a.owner,
        tag: a.tag,
        stage,
        order: if a.by_name { 1 } else { 0 },
        page_size: a.page_size,
        page_token: a.page_token,
        read: a.consistency.read_opts(0, 0),
        ..Default::default()
    };
    let rs = list_all(c, req, a.all).await?;
    print_resources(&rs, a.output);
    Ok(())
}

async fn set_status(
    c: &Client,
    id: String,
    status: String,
    step: bool,
    resume: bool,
) -> Result<()> {
    let st = RunStatus::parse(&status).with_context(|| format!("unknown status {status:?}"))?;
    let req = pb::SetStatusRequest {
        id,
        status: st as i32,
        resume,
        request_id: String::new(),
    };
    let r = if step {
        c.set_step_status(req).await?
    } else {
        c.set_run_status(req).await?
    };
    print_resources(r.resource.as_slice(), Output::Text);
    Ok(())
}

async fn promote(c: &Client, id: String, stage: String, archive_existing: bool) -> Result<()> {
    let st = Stage::parse(&stage).with_context(|| format!("unknown stage {stage:?}"))?;
    let r = c
        .promote_model_version(pb::PromoteRequest {
            model_version_id: id,
            stage: st as i32,
            archive_existing,
            request_id: String::new(),
        })
        .await?;
    print_resources(r.resource.as_slice(), Output::Text);
    Ok(())
}

/// Pages of `limit` runs until none is left.
async fn purge_runs(c: &Client, project: String, before_ms: u64, limit: u32) -> Result<()> {
    let (mut runs, mut removed) = (0, 0);
    loop {
        let r = c
            .purge_runs(pb::PurgeRunsRequest {
                project_id: project.clone(),
                before_ms,
                limit,
                request_id: String::new(),
            })
            .await?;
        runs += r.runs;
        removed += r.removed;
        if !r.more {
            break;
        }
    }
    println!("purged {runs} runs ({removed} records)");
    Ok(())
}
