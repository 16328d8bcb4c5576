//! `metaraft meta ...` (resources) and `metaraft rbac ...` (roles, bindings, checks, explain).

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::json;

use crate::cli::{ConsistencyArg, Output};
use metaraft::client::Client;
use metaraft::fsm::meta::rbac;
use metaraft::fsm::meta::{Kind, RunStatus, Stage};
use metaraft::pb;
use metaraft::pb::resource::Spec as S;

#[derive(Subcommand, Debug)]
pub enum MetaCmd {
    /// Create a resource; spec fields as --set key=value (see docs/metadata.md).
    Create {
        /// organization, workspace, project, user, team, role, role_binding, pipeline,
        /// pipeline_run, step_run, artifact, artifact_version, model, model_version, run_metadata.
        kind: String,
        #[arg(long, default_value = "")]
        name: String,
        #[arg(long, default_value = "")]
        parent: String,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long = "tag")]
        tags: Vec<String>,
        #[arg(long = "set", value_parser = parse_kv)]
        set: Vec<(String, String)>,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Get by id, or by --kind/--parent/--name.
    Get {
        id: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value = "")]
        parent: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, default_value_t = 0)]
        attempt: u32,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// List children of a parent, newest first (or --by-name), one page or --all.
    List {
        kind: String,
        #[arg(long, default_value = "")]
        parent: String,
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value = "")]
        pipeline: String,
        #[arg(long, default_value = "")]
        owner: String,
        #[arg(long, default_value = "")]
        tag: String,
        #[arg(long)]
        stage: Option<String>,
        #[arg(long)]
        by_name: bool,
        #[arg(long, default_value_t = 50)]
        page_size: u32,
        #[arg(long, default_value = "")]
        page_token: String,
        /// Follow page tokens to the end.
        #[arg(long)]
        all: bool,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
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

#[derive(Subcommand, Debug)]
pub enum RbacCmd {
    /// List the roles of an organization.
    Roles {
        org: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Create a custom role: --permission resource_type:action (either may be *).
    CreateRole {
        org: String,
        name: String,
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
    },
    /// Give a role (id or name) to a user or team at a scope (org, workspace, project, resource).
    Bind {
        org: String,
        #[arg(long)]
        subject: String,
        #[arg(long)]
        role: String,
        #[arg(long)]
        scope: String,
    },
    /// Remove a binding.
    Unbind { binding: String },
    /// List an organization's bindings.
    Bindings {
        org: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Check one or more resources; prints allowed/denied per resource.
    Check {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        action: String,
        /// Check creating/acting on this type inside each resource instead of the resource.
        #[arg(long, default_value = "")]
        resource_type: String,
        #[arg(required = true)]
        resources: Vec<String>,
    },
    /// Explain a decision: which binding granted it, or why it was denied.
    Explain {
        #[arg(long)]
        subject: String,
        #[arg(long)]
        action: String,
        #[arg(long, default_value = "")]
        resource_type: String,
        resource: String,
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

fn kind_arg(s: &str) -> Result<Kind> {
    Kind::parse(s).with_context(|| {
        let all: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        format!("unknown kind {s:?}; one of {}", all.join(", "))
    })
}

fn bool_arg(k: &str, v: &str) -> Result<bool> {
    match v {
        "true" | "yes" | "1" => Ok(true),
        "false" | "no" | "0" => Ok(false),
        _ => bail!("{k}: expected true or false, got {v:?}"),
    }
}

/// Builds a spec from --set pairs, refusing keys the kind does not have.
fn spec_from_pairs(kind: Kind, pairs: &[(String, String)]) -> Result<S> {
    let mut m: BTreeMap<&str, &str> = BTreeMap::new();
    for (k, v) in pairs {
        if m.insert(k, v).is_some() {
            bail!("--set {k} given twice");
        }
    }
    let mut take = |k: &str| m.remove(k).unwrap_or("").to_string();
    let spec = match kind {
        Kind::Organization => S::Organization(pb::OrganizationSpec {
            display_name: take("display_name"),
        }),
        Kind::Workspace => S::Workspace(pb::WorkspaceSpec {
            display_name: take("display_name"),
        }),
        Kind::Project => S::Project(pb::ProjectSpec {
            display_name: take("display_name"),
            description: take("description"),
        }),
        Kind::User => {
            let active = take("active");
            let sa = take("service_account");
            S::User(pb::UserSpec {
                email: take("email"),
                external_id: take("external_id"),
                active: active.is_empty() || bool_arg("active", &active)?,
                service_account: !sa.is_empty() && bool_arg("service_account", &sa)?,
                api_keys: vec![],
            })
        }
        Kind::Team => {
            let members = take("members");
            S::Team(pb::TeamSpec {
                member_ids: members
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect(),
            })
        }
        Kind::Role => S::Role(pb::RoleSpec {
            permissions: permissions(&take("permissions"))?,
            builtin: false,
        }),
        Kind::RoleBinding => S::RoleBinding(pb::RoleBindingSpec {
            subject_id: take("subject"),
            role_id: take("role"),
            scope_id: take("scope"),
        }),
        Kind::Pipeline => S::Pipeline(pb::PipelineSpec {
            description: take("description"),
            run_count: 0,
        }),
        Kind::PipelineRun => {
            let expected = take("expected_steps");
            S::PipelineRun(pb::PipelineRunSpec {
                pipeline_id: take("pipeline"),
                orchestrator_run_id: take("orchestrator_run_id"),
                parent_run_id: take("parent_run"),
                expected_steps: if expected.is_empty() {
                    0
                } else {
                    expected.parse().context("expected_steps")?
                },
                ..Default::default()
            })
        }
        Kind::StepRun => {
            let attempt = take("attempt");
            S::StepRun(pb::StepRunSpec {
                attempt: if attempt.is_empty() {
                    1
                } else {
                    attempt.parse().context("attempt")?
                },
                cache_key: take("cache_key"),
                ..Default::default()
            })
        }
        Kind::Artifact => S::Artifact(pb::ArtifactSpec {
            artifact_type: take("type"),
            latest_version: 0,
        }),
        Kind::ArtifactVersion => S::ArtifactVersion(pb::ArtifactVersionSpec {
            uri: take("uri"),
            content_hash: take("content_hash"),
            run_id: take("run"),
            number: 0,
        }),
        Kind::Model => S::Model(pb::ModelSpec {
            description: take("description"),
            latest_version: 0,
        }),
        Kind::ModelVersion => S::ModelVersion(pb::ModelVersionSpec {
            artifact_version_id: take("artifact_version"),
            run_id: take("run"),
            ..Default::default()
        }),
        Kind::RunMetadata => {
            use pb::metadata_value::Value;
            let v = take("value");
            let value = match take("type").as_str() {
                "" | "str" => Value::Str(v),
                "int" => Value::Int(v.parse().context("value: not an integer")?),
                "float" => Value::Float(v.parse().context("value: not a number")?),
                "bool" => Value::Bool(bool_arg("value", &v)?),
                t => bail!("type {t:?}: expected str, int, float or bool"),
            };
            S::RunMetadata(pb::RunMetadataSpec {
                value: Some(pb::MetadataValue { value: Some(value) }),
            })
        }
    };
    if let Some(k) = m.keys().next() {
        bail!("{} has no field {k:?}", kind.name());
    }
    Ok(spec)
}

fn permissions(s: &str) -> Result<Vec<pb::Permission>> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (rt, a) = p
                .split_once(':')
                .with_context(|| format!("permission {p:?}: expected resource_type:action"))?;
            if rbac::parse_resource(rt).is_none() {
                bail!("permission {p:?}: unknown resource type {rt:?}");
            }
            if rbac::parse_action(a).is_none() {
                bail!("permission {p:?}: unknown action {a:?}");
            }
            Ok(pb::Permission {
                resource_type: rt.into(),
                action: a.into(),
            })
        })
        .collect()
}

fn status_name(s: i32) -> &'static str {
    RunStatus::ALL
        .iter()
        .find(|x| **x as i32 == s)
        .map(|x| x.name())
        .unwrap_or("?")
}

fn stage_name(s: i32) -> &'static str {
    Stage::ALL
        .iter()
        .find(|x| **x as i32 == s)
        .map(|x| x.name())
        .unwrap_or("?")
}

/// The interesting fields of a resource, for text and JSON output.
fn fields(r: &pb::Resource) -> Vec<(&'static str, serde_json::Value)> {
    let kind = u8::try_from(r.kind)
        .ok()
        .and_then(Kind::from_u8)
        .map(|k| k.name())
        .unwrap_or("?");
    let mut f = vec![
        ("kind", json!(kind)),
        ("id", json!(r.id)),
        ("name", json!(r.name)),
        ("parent_id", json!(r.parent_id)),
        ("owner_id", json!(r.owner_id)),
        ("mod_revision", json!(r.mod_revision)),
        ("created_ms", json!(r.created_ms)),
    ];
    if !r.tags.is_empty() {
        f.push(("tags", json!(r.tags)));
    }
    match &r.spec {
        Some(S::PipelineRun(s)) => {
            f.push(("status", json!(status_name(s.status))));
            f.push(("index", json!(s.index)));
            f.push(("step_counts", json!(s.step_counts)));
        }
        Some(S::StepRun(s)) => {
            f.push(("status", json!(status_name(s.status))));
            f.push(("attempt", json!(s.attempt)));
        }
        Some(S::Pipeline(s)) => f.push(("run_count", json!(s.run_count))),
        Some(S::ArtifactVersion(s)) => {
            f.push(("number", json!(s.number)));
            f.push(("uri", json!(s.uri)));
        }
        Some(S::ModelVersion(s)) => {
            f.push(("number", json!(s.number)));
            f.push(("stage", json!(stage_name(s.stage))));
        }
        Some(S::Role(s)) => {
            let p: Vec<String> = s
                .permissions
                .iter()
                .map(|p| format!("{}:{}", p.resource_type, p.action))
                .collect();
            f.push(("permissions", json!(p)));
            f.push(("builtin", json!(s.builtin)));
        }
        Some(S::RoleBinding(s)) => {
            f.push(("subject_id", json!(s.subject_id)));
            f.push(("role_id", json!(s.role_id)));
            f.push(("scope_id", json!(s.scope_id)));
        }
        Some(S::Team(s)) => f.push(("member_ids", json!(s.member_ids))),
        Some(S::User(s)) => {
            f.push(("active", json!(s.active)));
            f.push(("service_account", json!(s.service_account)));
            let keys: Vec<&str> = s.api_keys.iter().map(|k| k.key_id.as_str()).collect();
            f.push(("api_keys", json!(keys)));
        }
        _ => {}
    }
    f
}

fn print_resources(rs: &[pb::Resource], output: Output) {
    for r in rs {
        let f = fields(r);
        match output {
            Output::Json => {
                let m: serde_json::Map<String, serde_json::Value> =
                    f.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
                println!("{}", serde_json::Value::Object(m));
            }
            Output::Text => {
                let line: Vec<String> = f
                    .into_iter()
                    .filter(|(_, v)| v != &json!(""))
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect();
                println!("{}", line.join(" "));
            }
        }
    }
}

fn read_opts(c: ConsistencyArg) -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: c.to_pb() as i32,
        ..Default::default()
    })
}

async fn list_all(
    c: &Client,
    mut req: pb::ListResourcesRequest,
    all: bool,
) -> Result<Vec<pb::Resource>> {
    let mut out = Vec::new();
    loop {
        let page = c.meta_list(req.clone()).await?;
        out.extend(page.resources);
        if !all || page.next_page_token.is_empty() {
            if !all && !page.next_page_token.is_empty() {
                eprintln!("next page: --page-token {}", page.next_page_token);
            }
            return Ok(out);
        }
        req.page_token = page.next_page_token;
    }
}

pub async fn meta(c: Client, op: MetaCmd) -> Result<ExitCode> {
    match op {
        MetaCmd::Create {
            kind,
            name,
            parent,
            owner,
            tags,
            set,
            output,
        } => {
            let kind = kind_arg(&kind)?;
            let spec = spec_from_pairs(kind, &set)?;
            let r = c
                .meta_create(pb::CreateResourceRequest {
                    resource: Some(pb::Resource {
                        parent_id: parent,
                        name,
                        owner_id: owner,
                        tags,
                        spec: Some(spec),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await?;
            print_resources(r.resource.as_slice(), output);
        }
        MetaCmd::Get {
            id,
            kind,
            parent,
            name,
            attempt,
            consistency,
            output,
        } => {
            use pb::get_resource_request::Key;
            let key = match (id, kind, name) {
                (Some(id), None, None) => Key::Id(id),
                (None, Some(k), Some(n)) => Key::ByName(pb::ByName {
                    kind: kind_arg(&k)? as i32,
                    parent_id: parent,
                    name: n,
                    attempt,
                }),
                _ => bail!("give an id, or --kind and --name (and --parent)"),
            };
            let r = c
                .meta_get(pb::GetResourceRequest {
                    key: Some(key),
                    read: read_opts(consistency),
                })
                .await?;
            print_resources(r.resource.as_slice(), output);
        }
        MetaCmd::List {
            kind,
            parent,
            status,
            pipeline,
            owner,
            tag,
            stage,
            by_name,
            page_size,
            page_token,
            all,
            consistency,
            output,
        } => {
            let status = match status {
                None => 0,
                Some(s) => {
                    RunStatus::parse(&s).with_context(|| format!("unknown status {s:?}"))? as i32
                }
            };
            let stage = match stage {
                None => None,
                Some(s) => {
                    Some(Stage::parse(&s).with_context(|| format!("unknown stage {s:?}"))? as i32)
                }
            };
            let req = pb::ListResourcesRequest {
                kind: kind_arg(&kind)? as i32,
                parent_id: parent,
                status,
                pipeline_id: pipeline,
                owner_id: owner,
                tag,
                stage,
                order: if by_name { 1 } else { 0 },
                page_size,
                page_token,
                read: read_opts(consistency),
                ..Default::default()
            };
            let rs = list_all(&c, req, all).await?;
            print_resources(&rs, output);
        }
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
        } => {
            let st =
                RunStatus::parse(&status).with_context(|| format!("unknown status {status:?}"))?;
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
        }
        MetaCmd::Promote {
            id,
            stage,
            archive_existing,
        } => {
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
        }
        MetaCmd::PurgeRuns {
            project,
            before_ms,
            limit,
        } => {
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
        }
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

async fn role_id(c: &Client, org: &str, role: &str) -> Result<String> {
    if metaraft::fsm::meta::parse_id(role).is_ok() {
        return Ok(role.to_string());
    }
    let r = c
        .meta_get(pb::GetResourceRequest {
            key: Some(pb::get_resource_request::Key::ByName(pb::ByName {
                kind: Kind::Role as i32,
                parent_id: org.to_string(),
                name: role.to_string(),
                attempt: 0,
            })),
            read: None,
        })
        .await
        .with_context(|| format!("role {role:?}"))?;
    Ok(r.resource.map(|r| r.id).unwrap_or_default())
}

pub async fn rbac(c: Client, op: RbacCmd) -> Result<ExitCode> {
    match op {
        RbacCmd::Roles { org, output } => {
            let req = pb::ListResourcesRequest {
                kind: Kind::Role as i32,
                parent_id: org,
                order: 1,
                page_size: 1000,
                ..Default::default()
            };
            print_resources(&list_all(&c, req, true).await?, output);
        }
        RbacCmd::Bindings { org, output } => {
            let req = pb::ListResourcesRequest {
                kind: Kind::RoleBinding as i32,
                parent_id: org,
                page_size: 1000,
                ..Default::default()
            };
            print_resources(&list_all(&c, req, true).await?, output);
        }
        RbacCmd::CreateRole {
            org,
            name,
            permissions: perms,
        } => {
            let r = c
                .meta_create(pb::CreateResourceRequest {
                    resource: Some(pb::Resource {
                        parent_id: org,
                        name,
                        spec: Some(S::Role(pb::RoleSpec {
                            permissions: permissions(&perms.join(","))?,
                            builtin: false,
                        })),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await?;
            print_resources(r.resource.as_slice(), Output::Text);
        }
        RbacCmd::Bind {
            org,
            subject,
            role,
            scope,
        } => {
            let role_id = role_id(&c, &org, &role).await?;
            let r = c
                .meta_create(pb::CreateResourceRequest {
                    resource: Some(pb::Resource {
                        parent_id: org,
                        spec: Some(S::RoleBinding(pb::RoleBindingSpec {
                            subject_id: subject,
                            role_id,
                            scope_id: scope,
                        })),
                        ..Default::default()
                    }),
                    request_id: String::new(),
                })
                .await?;
            print_resources(r.resource.as_slice(), Output::Text);
        }
        RbacCmd::Unbind { binding } => {
            c.meta_delete(pb::DeleteResourceRequest {
                id: binding,
                ..Default::default()
            })
            .await?;
            println!("removed");
        }
        RbacCmd::Check {
            subject,
            action,
            resource_type,
            resources,
        } => {
            let r = c
                .check_permissions(pb::CheckPermissionsRequest {
                    subject_id: subject,
                    action,
                    resource_type,
                    resource_ids: resources.clone(),
                    read: None,
                })
                .await?;
            let mut all = true;
            for (id, ok) in resources.iter().zip(r.allowed) {
                println!("{id} {}", if ok { "allowed" } else { "denied" });
                all &= ok;
            }
            return Ok(if all {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
        RbacCmd::Explain {
            subject,
            action,
            resource_type,
            resource,
            output,
        } => {
            let r = c
                .explain(pb::ExplainRequest {
                    subject_id: subject,
                    action,
                    resource_type,
                    resource_id: resource,
                    read: None,
                })
                .await?;
            match output {
                Output::Text => println!("{}", r.explanation),
                Output::Json => println!(
                    "{}",
                    json!({
                        "allowed": r.allowed,
                        "explanation": r.explanation,
                        "owner": r.owner,
                        "binding_id": r.binding_id,
                        "role": r.role,
                        "scope_id": r.scope_id,
                        "team_id": r.team_id,
                    })
                ),
            }
            return Ok(if r.allowed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(2)
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}
