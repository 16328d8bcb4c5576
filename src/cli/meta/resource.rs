//! What `meta` and `rbac` share: building a resource's spec from `--set key=value` pairs,
//! parsing kinds and permissions, listing pages and printing resources as text or JSON.

use std::collections::BTreeMap;

use anyhow::{bail, Context, Result};
use serde_json::json;

use metaraft::client::Client;
use metaraft::fsm::meta::rbac;
use metaraft::fsm::meta::{Kind, RunStatus, Stage};
use metaraft::pb;
use metaraft::pb::resource::Spec as S;

use crate::cli::args::Output;

pub fn parse_kv(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("expected key=value, got {s:?}")),
    }
}

pub fn kind_arg(s: &str) -> Result<Kind> {
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

/// The `--set` pairs not yet used by the spec being built.
struct Pairs<'a>(BTreeMap<&'a str, &'a str>);

impl Pairs<'_> {
    /// The value of `k` (empty when not given), marking it used.
    fn take(&mut self, k: &str) -> String {
        self.0.remove(k).unwrap_or("").to_string()
    }
}

/// Builds a spec from --set pairs, refusing keys the kind does not have.
pub fn spec_from_pairs(kind: Kind, pairs: &[(String, String)]) -> Result<S> {
    let mut m = Pairs(BTreeMap::new());
    for (k, v) in pairs {
        if m.0.insert(k, v).is_some() {
            bail!("--set {k} given twice");
        }
    }
    let spec = match kind {
        Kind::Organization => S::Organization(pb::OrganizationSpec {
            display_name: m.take("display_name"),
        }),
        Kind::Workspace => S::Workspace(pb::WorkspaceSpec {
            display_name: m.take("display_name"),
        }),
        Kind::Project => S::Project(pb::ProjectSpec {
            display_name: m.take("display_name"),
            description: m.take("description"),
        }),
        Kind::User => user_spec(&mut m)?,
        Kind::Team => team_spec(&mut m),
        Kind::Role => S::Role(pb::RoleSpec {
            permissions: permissions(&m.take("permissions"))?,
            builtin: false,
        }),
        Kind::RoleBinding => S::RoleBinding(pb::RoleBindingSpec {
            subject_id: m.take("subject"),
            role_id: m.take("role"),
            scope_id: m.take("scope"),
        }),
        Kind::Pipeline => S::Pipeline(pb::PipelineSpec {
            description: m.take("description"),
            run_count: 0,
        }),
        Kind::PipelineRun => pipeline_run_spec(&mut m)?,
        Kind::StepRun => step_run_spec(&mut m)?,
        Kind::Artifact => S::Artifact(pb::ArtifactSpec {
            artifact_type: m.take("type"),
            latest_version: 0,
        }),
        Kind::ArtifactVersion => S::ArtifactVersion(pb::ArtifactVersionSpec {
            uri: m.take("uri"),
            content_hash: m.take("content_hash"),
            run_id: m.take("run"),
            number: 0,
        }),
        Kind::Model => S::Model(pb::ModelSpec {
            description: m.take("description"),
            latest_version: 0,
        }),
        Kind::ModelVersion => S::ModelVersion(pb::ModelVersionSpec {
            artifact_version_id: m.take("artifact_version"),
            run_id: m.take("run"),
            ..Default::default()
        }),
        Kind::RunMetadata => run_metadata_spec(&mut m)?,
    };
    if let Some(k) = m.0.keys().next() {
        bail!("{} has no field {k:?}", kind.name());
    }
    Ok(spec)
}

/// `active` defaults to true, `service_account` to false.
fn user_spec(m: &mut Pairs) -> Result<S> {
    let active = m.take("active");
    let sa = m.take("service_account");
    Ok(S::User(pb::UserSpec {
        email: m.take("email"),
        external_id: m.take("external_id"),
        active: active.is_empty() || bool_arg("active", &active)?,
        service_account: !sa.is_empty() && bool_arg("service_account", &sa)?,
        api_keys: vec![],
    }))
}

/// `members`: user ids, comma separated.
fn team_spec(m: &mut Pairs) -> S {
    let members = m.take("members");
    S::Team(pb::TeamSpec {
        member_ids: members
            .split(',')
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect(),
    })
}

fn pipeline_run_spec(m: &mut Pairs) -> Result<S> {
    let expected = m.take("expected_steps");
    Ok(S::PipelineRun(pb::PipelineRunSpec {
        pipeline_id: m.take("pipeline"),
        orchestrator_run_id: m.take("orchestrator_run_id"),
        parent_run_id: m.take("parent_run"),
        expected_steps: if expected.is_empty() {
            0
        } else {
            expected.parse().context("expected_steps")?
        },
        ..Default::default()
    }))
}

/// `attempt` defaults to 1.
fn step_run_spec(m: &mut Pairs) -> Result<S> {
    let attempt = m.take("attempt");
    Ok(S::StepRun(pb::StepRunSpec {
        attempt: if attempt.is_empty() {
            1
        } else {
            attempt.parse().context("attempt")?
        },
        cache_key: m.take("cache_key"),
        ..Default::default()
    }))
}

/// `value` read as `type` (str, the default, int, float or bool).
fn run_metadata_spec(m: &mut Pairs) -> Result<S> {
    use pb::metadata_value::Value;
    let v = m.take("value");
    let value = match m.take("type").as_str() {
        "" | "str" => Value::Str(v),
        "int" => Value::Int(v.parse().context("value: not an integer")?),
        "float" => Value::Float(v.parse().context("value: not a number")?),
        "bool" => Value::Bool(bool_arg("value", &v)?),
        t => bail!("type {t:?}: expected str, int, float or bool"),
    };
    Ok(S::RunMetadata(pb::RunMetadataSpec {
        value: Some(pb::MetadataValue { value: Some(value) }),
    }))
}

pub fn permissions(s: &str) -> Result<Vec<pb::Permission>> {
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

pub fn print_resources(rs: &[pb::Resource], output: Output) {
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

pub async fn list_all(
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
