//! Checks of client-supplied names, tags and specs that need no state.

use super::*;

pub fn validate_name(kind: Kind, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{} name is empty", kind.name()));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(format!(
            "{} name is {} bytes, limit {MAX_NAME_BYTES}",
            kind.name(),
            name.len()
        ));
    }
    if name.chars().any(|c| c.is_control()) || name.trim() != name {
        return Err(format!(
            "{} name {name:?} has control characters or leading/trailing spaces",
            kind.name()
        ));
    }
    Ok(())
}

pub(super) fn validate_tags(tags: &[String]) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!("{} tags, limit {MAX_TAGS}", tags.len()));
    }
    for t in tags {
        if t.is_empty() || t.len() > MAX_NAME_BYTES || t.chars().any(|c| c.is_control()) {
            return Err(format!(
                "tag {t:?} must be 1..{MAX_NAME_BYTES} bytes without control characters"
            ));
        }
    }
    let mut s = tags.to_vec();
    s.sort();
    s.dedup();
    if s.len() != tags.len() {
        return Err("duplicate tags".into());
    }
    Ok(())
}

pub(super) fn validate_text(field: &str, v: &str) -> Result<(), String> {
    if v.len() > MAX_TEXT_BYTES {
        return Err(format!(
            "{field} is {} bytes, limit {MAX_TEXT_BYTES}",
            v.len()
        ));
    }
    Ok(())
}

/// Largest run-metadata value (the domain plans for ~15 KB of metadata per run).
pub const MAX_META_VALUE_BYTES: usize = 64 * 1024;

/// Checks of a spec's client-supplied fields that need no state.
pub fn validate_spec(spec: &Spec) -> Result<(), String> {
    match spec {
        Spec::Organization { display_name } | Spec::Workspace { display_name } => {
            validate_text("display_name", display_name)
        }
        Spec::Project {
            display_name,
            description,
        } => {
            validate_text("display_name", display_name)?;
            validate_text("description", description)
        }
        Spec::User {
            email, external_id, ..
        } => {
            validate_text("email", email)?;
            validate_text("external_id", external_id)
        }
        Spec::Team { members } => {
            if members.len() > MAX_TEAM_MEMBERS {
                return Err(format!(
                    "{} members, limit {MAX_TEAM_MEMBERS}",
                    members.len()
                ));
            }
            Ok(())
        }
        Spec::Role { permissions, .. } => {
            if permissions.len() > MAX_PERMISSIONS {
                return Err(format!(
                    "{} permissions, limit {MAX_PERMISSIONS}",
                    permissions.len()
                ));
            }
            for p in permissions {
                rbac::check_permission(p)?;
            }
            Ok(())
        }
        Spec::Pipeline { description, .. } | Spec::Model { description, .. } => {
            validate_text("description", description)
        }
        Spec::PipelineRun {
            orchestrator_run_id,
            ..
        } => validate_text("orchestrator_run_id", orchestrator_run_id),
        Spec::StepRun { cache_key, .. } => validate_text("cache_key", cache_key),
        Spec::Artifact { artifact_type, .. } => validate_text("artifact_type", artifact_type),
        Spec::ArtifactVersion {
            uri, content_hash, ..
        } => {
            validate_text("uri", uri)?;
            validate_text("content_hash", content_hash)
        }
        Spec::RunMetadata { value } => {
            if value.byte_len() > MAX_META_VALUE_BYTES {
                return Err(format!(
                    "metadata value is {} bytes, limit {MAX_META_VALUE_BYTES}",
                    value.byte_len()
                ));
            }
            if let MetaValue::Float(bits) = value {
                if f64::from_bits(*bits).is_nan() {
                    return Err("metadata value is NaN".into());
                }
            }
            Ok(())
        }
        Spec::RoleBinding { .. } | Spec::ModelVersion { .. } => Ok(()),
    }
}
