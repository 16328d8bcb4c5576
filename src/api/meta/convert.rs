//! Protobuf <-> domain conversions of the metadata services: ids, kinds, statuses, stages,
//! values, permissions, and resources with their specs. No rules: the state machine decides.

use std::collections::HashMap;

use sha2::{Digest, Sha256};

use super::super::status::ApiError;
use super::super::ApiResult;
use crate::fsm::meta::rbac;
use crate::fsm::meta::{
    fmt_id, parse_id, ApiKey, Id, Kind, MetaValue, Permission, Record, RunStatus, Spec, Stage, NIL,
};
use crate::pb;

pub(super) fn id_field(field: &str, s: &str) -> ApiResult<Id> {
    parse_id(s).map_err(|e| ApiError::Invalid(format!("{field}: {e}")))
}

/// An optional id: empty = none.
pub(super) fn opt_id(field: &str, s: &str) -> ApiResult<Id> {
    if s.is_empty() {
        Ok(NIL)
    } else {
        id_field(field, s)
    }
}

pub(super) fn out_id(id: &Id) -> String {
    if *id == NIL {
        String::new()
    } else {
        fmt_id(id)
    }
}

pub(super) fn kind_from_pb(k: i32) -> ApiResult<Kind> {
    u8::try_from(k)
        .ok()
        .and_then(Kind::from_u8)
        .ok_or_else(|| ApiError::Invalid(format!("unknown resource kind {k}")))
}

pub(super) fn status_from_pb(s: i32) -> ApiResult<RunStatus> {
    RunStatus::ALL
        .iter()
        .copied()
        .find(|x| *x as i32 == s)
        .ok_or_else(|| ApiError::Invalid(format!("unknown run status {s}")))
}

pub(super) fn stage_from_pb(s: i32) -> ApiResult<Stage> {
    Stage::ALL
        .iter()
        .copied()
        .find(|x| *x as i32 == s)
        .ok_or_else(|| ApiError::Invalid(format!("unknown model stage {s}")))
}

pub(super) fn value_from_pb(v: Option<&pb::MetadataValue>) -> ApiResult<MetaValue> {
    use pb::metadata_value::Value;
    match v.and_then(|v| v.value.as_ref()) {
        Some(Value::Str(s)) => Ok(MetaValue::Str(s.clone())),
        Some(Value::Int(i)) => Ok(MetaValue::Int(*i)),
        Some(Value::Float(f)) => Ok(MetaValue::Float(f.to_bits())),
        Some(Value::Bool(b)) => Ok(MetaValue::Bool(*b)),
        None => Err(ApiError::Invalid("metadata value is missing".into())),
    }
}

pub(super) fn value_to_pb(v: &MetaValue) -> pb::MetadataValue {
    use pb::metadata_value::Value;
    pb::MetadataValue {
        value: Some(match v {
            MetaValue::Str(s) => Value::Str(s.clone()),
            MetaValue::Int(i) => Value::Int(*i),
            MetaValue::Float(f) => Value::Float(f64::from_bits(*f)),
            MetaValue::Bool(b) => Value::Bool(*b),
        }),
    }
}

pub(super) fn permission_from_pb(p: &pb::Permission) -> ApiResult<Permission> {
    let resource = rbac::parse_resource(&p.resource_type)
        .ok_or_else(|| ApiError::Invalid(format!("unknown resource type {:?}", p.resource_type)))?;
    let action = rbac::parse_action(&p.action)
        .ok_or_else(|| ApiError::Invalid(format!("unknown action {:?}", p.action)))?;
    Ok(Permission { resource, action })
}

/// The domain spec of a resource message (output-only fields ignored).
pub fn spec_from_pb(r: &pb::Resource) -> ApiResult<Spec> {
    use pb::resource::Spec as S;
    let spec = r
        .spec
        .as_ref()
        .ok_or_else(|| ApiError::Invalid("resource has no spec".into()))?;
    Ok(match spec {
        S::Organization(s) => Spec::Organization {
            display_name: s.display_name.clone(),
        },
        S::Workspace(s) => Spec::Workspace {
            display_name: s.display_name.clone(),
        },
        S::Project(s) => Spec::Project {
            display_name: s.display_name.clone(),
            description: s.description.clone(),
        },
        S::User(s) => Spec::User {
            email: s.email.clone(),
            external_id: s.external_id.clone(),
            active: s.active,
            service_account: s.service_account,
            api_keys: Vec::new(),
        },
        S::Team(s) => Spec::Team {
            members: s
                .member_ids
                .iter()
                .map(|m| id_field("member_ids", m))
                .collect::<ApiResult<_>>()?,
        },
        S::Role(s) => Spec::Role {
            permissions: s
                .permissions
                .iter()
                .map(permission_from_pb)
                .collect::<ApiResult<_>>()?,
            builtin: false,
        },
        S::RoleBinding(s) => Spec::RoleBinding {
            subject: id_field("subject_id", &s.subject_id)?,
            role: id_field("role_id", &s.role_id)?,
            scope: id_field("scope_id", &s.scope_id)?,
        },
        S::Pipeline(s) => Spec::Pipeline {
            description: s.description.clone(),
            run_count: 0,
        },
        S::PipelineRun(s) => {
            let mut step_counts = [0u32; 9];
            step_counts[0] = s.expected_steps;
            Spec::PipelineRun {
                pipeline: opt_id("pipeline_id", &s.pipeline_id)?,
                orchestrator_run_id: s.orchestrator_run_id.clone(),
                parent_run: opt_id("parent_run_id", &s.parent_run_id)?,
                status: RunStatus::Initializing,
                start_ms: 0,
                end_ms: 0,
                step_counts,
                index: 0,
            }
        }
        S::StepRun(s) => Spec::StepRun {
            attempt: s.attempt,
            cache_key: s.cache_key.clone(),
            status: RunStatus::Initializing,
            heartbeat_ms: 0,
            start_ms: 0,
            end_ms: 0,
        },
        S::Artifact(s) => Spec::Artifact {
            artifact_type: s.artifact_type.clone(),
            latest_version: 0,
        },
        S::ArtifactVersion(s) => Spec::ArtifactVersion {
            uri: s.uri.clone(),
            content_hash: s.content_hash.clone(),
            run: opt_id("run_id", &s.run_id)?,
            number: 0,
        },
        S::Model(s) => Spec::Model {
            description: s.description.clone(),
            latest_version: 0,
        },
        S::ModelVersion(s) => Spec::ModelVersion {
            artifact_version: opt_id("artifact_version_id", &s.artifact_version_id)?,
            run: opt_id("run_id", &s.run_id)?,
            number: 0,
            stage: Stage::None,
        },
        S::RunMetadata(s) => Spec::RunMetadata {
            value: value_from_pb(s.value.as_ref())?,
        },
    })
}

pub fn record_to_pb(r: &Record) -> pb::Resource {
    pb::Resource {
        id: fmt_id(&r.id),
        kind: r.kind() as i32,
        parent_id: out_id(&r.parent),
        name: r.name.clone(),
        owner_id: out_id(&r.owner),
        tags: r.tags.clone(),
        ancestor_ids: r.ancestors.iter().map(fmt_id).collect(),
        created_ms: r.created_ms,
        updated_ms: r.updated_ms,
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        spec: Some(spec_to_pb(&r.spec)),
    }
}

// Over 100 lines: one exhaustive arm per kind, so that a new kind fails to compile here.
fn spec_to_pb(spec: &Spec) -> pb::resource::Spec {
    use pb::resource::Spec as S;
    match spec {
        Spec::Organization { display_name } => S::Organization(pb::OrganizationSpec {
            display_name: display_name.clone(),
        }),
        Spec::Workspace { display_name } => S::Workspace(pb::WorkspaceSpec {
            display_name: display_name.clone(),
        }),
        Spec::Project {
            display_name,
            description,
        } => S::Project(pb::ProjectSpec {
            display_name: display_name.clone(),
            description: description.clone(),
        }),
        Spec::User {
            email,
            external_id,
            active,
            service_account,
            api_keys,
        } => S::User(pb::UserSpec {
            email: email.clone(),
            external_id: external_id.clone(),
            active: *active,
            service_account: *service_account,
            api_keys: api_keys.iter().map(api_key_to_pb).collect(),
        }),
        Spec::Team { members } => S::Team(pb::TeamSpec {
            member_ids: members.iter().map(fmt_id).collect(),
        }),
        Spec::Role {
            permissions,
            builtin,
        } => S::Role(pb::RoleSpec {
            permissions: permissions.iter().map(permission_to_pb).collect(),
            builtin: *builtin,
        }),
        Spec::RoleBinding {
            subject,
            role,
            scope,
        } => S::RoleBinding(pb::RoleBindingSpec {
            subject_id: fmt_id(subject),
            role_id: fmt_id(role),
            scope_id: fmt_id(scope),
        }),
        Spec::Pipeline {
            description,
            run_count,
        } => S::Pipeline(pb::PipelineSpec {
            description: description.clone(),
            run_count: *run_count,
        }),
        Spec::PipelineRun {
            pipeline,
            orchestrator_run_id,
            parent_run,
            status,
            start_ms,
            end_ms,
            step_counts,
            index,
        } => S::PipelineRun(pb::PipelineRunSpec {
            pipeline_id: out_id(pipeline),
            orchestrator_run_id: orchestrator_run_id.clone(),
            parent_run_id: out_id(parent_run),
            expected_steps: step_counts[0],
            status: *status as i32,
            start_ms: *start_ms,
            end_ms: *end_ms,
            index: *index,
            step_counts: step_counts_to_pb(step_counts),
        }),
        Spec::StepRun {
            attempt,
            cache_key,
            status,
            heartbeat_ms,
            start_ms,
            end_ms,
        } => S::StepRun(pb::StepRunSpec {
            attempt: *attempt,
            cache_key: cache_key.clone(),
            status: *status as i32,
            heartbeat_ms: *heartbeat_ms,
            start_ms: *start_ms,
            end_ms: *end_ms,
        }),
        Spec::Artifact {
            artifact_type,
            latest_version,
        } => S::Artifact(pb::ArtifactSpec {
            artifact_type: artifact_type.clone(),
            latest_version: *latest_version,
        }),
        Spec::ArtifactVersion {
            uri,
            content_hash,
            run,
            number,
        } => S::ArtifactVersion(pb::ArtifactVersionSpec {
            uri: uri.clone(),
            content_hash: content_hash.clone(),
            run_id: out_id(run),
            number: *number,
        }),
        Spec::Model {
            description,
            latest_version,
        } => S::Model(pb::ModelSpec {
            description: description.clone(),
            latest_version: *latest_version,
        }),
        Spec::ModelVersion {
            artifact_version,
            run,
            number,
            stage,
        } => S::ModelVersion(pb::ModelVersionSpec {
            artifact_version_id: out_id(artifact_version),
            run_id: out_id(run),
            number: *number,
            stage: *stage as i32,
        }),
        Spec::RunMetadata { value } => S::RunMetadata(pb::RunMetadataSpec {
            value: Some(value_to_pb(value)),
        }),
    }
}

fn api_key_to_pb(k: &ApiKey) -> pb::ApiKeyInfo {
    pb::ApiKeyInfo {
        key_id: k.key_id.clone(),
        created_ms: k.created_ms,
        expires_ms: k.expires_ms,
    }
}

fn permission_to_pb(p: &Permission) -> pb::Permission {
    pb::Permission {
        resource_type: rbac::resource_name(p.resource).into(),
        action: rbac::action_name(p.action).into(),
    }
}

/// A run's step counts by status name, the statuses with no step left out.
fn step_counts_to_pb(counts: &[u32; 9]) -> HashMap<String, u32> {
    RunStatus::ALL
        .iter()
        .filter(|s| counts[**s as usize] > 0)
        .map(|s| (s.name().to_string(), counts[*s as usize]))
        .collect()
}

/// A fresh random (v4) UUID for a new resource.
pub(super) fn new_id() -> Id {
    let mut id: Id = rand::random();
    id[6] = (id[6] & 0x0f) | 0x40;
    id[8] = (id[8] & 0x3f) | 0x80;
    id
}

pub(super) fn sha256(s: &str) -> [u8; 32] {
    let d = Sha256::digest(s.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(&d);
    out
}

pub(super) fn action_field(a: &str) -> ApiResult<u8> {
    rbac::parse_action(a)
        .filter(|a| *a != rbac::ANY)
        .ok_or_else(|| ApiError::Invalid(format!("unknown action {a:?}")))
}

pub(super) fn rt_field(rt: &str) -> ApiResult<Option<u8>> {
    if rt.is_empty() {
        return Ok(None);
    }
    rbac::parse_resource(rt)
        .filter(|r| *r != rbac::ANY)
        .map(Some)
        .ok_or_else(|| ApiError::Invalid(format!("unknown resource type {rt:?}")))
}
