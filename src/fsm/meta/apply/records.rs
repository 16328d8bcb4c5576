//! Rows and what every kind shares: decoding, heads and counts, unique names, counters,
//! updates with their editable fields, deletes with their cascades and bindings.

use sha2::{Digest, Sha256};

use super::*;

/// Decodes a row, refusing formats newer than this binary.
pub fn load_record(state: &dyn StateRead, id: &Id) -> Result<Option<Record>, FsmError> {
    let key = keys::meta_row(id);
    let Some(raw) = state.get_raw(&key)? else {
        return Ok(None);
    };
    decode_record(&key, &raw).map(Some)
}

pub fn decode_record(key: &[u8], raw: &[u8]) -> Result<Record, FsmError> {
    let r: Record = crate::codec::decode(raw).map_err(|e| FsmError::Corrupt {
        key: key.to_vec(),
        reason: e.to_string(),
    })?;
    if r.format > META_FORMAT_VERSION {
        return Err(FsmError::Corrupt {
            key: key.to_vec(),
            reason: format!(
                "record format {} is newer than this binary supports ({META_FORMAT_VERSION}): upgrade this node",
                r.format
            ),
        });
    }
    Ok(r)
}

/// The leading fields of a [`Record`] up to its spec's variant: what permission checks need,
/// decoded without the spec. Must list `Record`'s fields in order (a unit test holds it to that).
#[derive(serde::Deserialize)]
struct RecordHead {
    format: u8,
    _id: Id,
    _parent: Id,
    ancestors: Vec<Id>,
    _name: String,
    owner: Id,
    _created_ms: u64,
    _updated_ms: u64,
    create_revision: u64,
    _mod_revision: u64,
    _tags: Vec<String>,
    spec_variant: u32,
}

/// What a permission check needs of a row: (kind, owner, ancestors, create revision).
pub type Head = (Kind, Id, Vec<Id>, u64);

/// The [`Head`] of a row, without decoding its spec.
pub fn load_head(state: &dyn StateRead, id: &Id) -> Result<Option<Head>, FsmError> {
    let key = keys::meta_row(id);
    let Some(raw) = state.get_raw(&key)? else {
        return Ok(None);
    };
    let corrupt = |reason: String| FsmError::Corrupt {
        key: key.clone(),
        reason,
    };
    let h: RecordHead = crate::codec::decode_prefix(&raw).map_err(|e| corrupt(e.to_string()))?;
    if h.format > META_FORMAT_VERSION {
        return Err(corrupt(format!(
            "record format {} is newer than this binary supports ({META_FORMAT_VERSION}): upgrade this node",
            h.format
        )));
    }
    let kind = Kind::ALL
        .get(h.spec_variant as usize)
        .copied()
        .ok_or_else(|| corrupt(format!("unknown spec variant {}", h.spec_variant)))?;
    Ok(Some((kind, h.owner, h.ancestors, h.create_revision)))
}

pub fn read_count(state: &dyn StateRead, count_key: &[u8]) -> Result<u64, FsmError> {
    match state.get_raw(count_key)? {
        None => Ok(0),
        Some(b) if b.len() == 8 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b);
            Ok(u64::from_be_bytes(a))
        }
        Some(_) => Err(FsmError::Corrupt {
            key: count_key.to_vec(),
            reason: "count is not 8 bytes".into(),
        }),
    }
}

/// The ids listed under an index prefix (first `limit`, in index order).
pub fn index_ids(state: &dyn StateRead, prefix: &[u8], limit: usize) -> Result<Vec<Id>, FsmError> {
    let end = keys::prefix_end(prefix).unwrap_or_else(|| vec![0xff; prefix.len() + 1]);
    let rows = state.scan(prefix, &end, limit)?;
    Ok(rows
        .into_iter()
        .filter_map(|(k, _)| {
            let tail = k.get(k.len().checked_sub(16)?..)?;
            let mut id = [0u8; 16];
            id.copy_from_slice(tail);
            Some(id)
        })
        .collect())
}

/// Deterministic id of a built-in role of an organization.
pub fn builtin_role_id(org: &Id, name: &str) -> Id {
    let mut h = Sha256::new();
    h.update(b"metaraft builtin role");
    h.update(org);
    h.update(name.as_bytes());
    let d = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id
}

pub(super) fn name_taken(tx: &Tx<'_>, r: &Record) -> R<()> {
    let nk = keys::meta_name(r.kind() as u8, &r.parent, &r.unique_name());
    if let Some(existing) = tx.get(&nk)? {
        if existing.as_slice() != r.id.as_slice() {
            return refuse(
                MetaErrorKind::AlreadyExists,
                format!(
                    "a {} named {:?} already exists in {}",
                    r.kind().name(),
                    r.name,
                    fmt_id(&r.parent)
                ),
            );
        }
    }
    Ok(())
}

/// Increments the counter a container hands out (a pipeline's run count, an artifact's or a
/// model's latest version number), writes the container, and returns the new value.
pub(super) fn bump_counter(tx: &mut Tx<'_>, rec: &mut Record, index: u64, at_ms: u64) -> R<u64> {
    let old = rec.clone();
    let next = match &mut rec.spec {
        Spec::Pipeline { run_count: c, .. }
        | Spec::Artifact {
            latest_version: c, ..
        }
        | Spec::Model {
            latest_version: c, ..
        } => {
            *c += 1;
            *c
        }
        _ => return invalid(format!("a {} hands out no numbers", rec.kind().name())),
    };
    rec.mod_revision = index;
    rec.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(rec))?;
    Ok(next)
}

pub(super) fn expect_rev(r: &Record, expected: Option<u64>) -> R<()> {
    if let Some(e) = expected {
        if e != r.mod_revision {
            return refuse(
                MetaErrorKind::RevisionMismatch,
                format!(
                    "{} {} is at revision {}, expected {e}",
                    r.kind().name(),
                    fmt_id(&r.id),
                    r.mod_revision
                ),
            );
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
pub(super) fn update(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    expected: Option<u64>,
    name: Option<&str>,
    tags: Option<&[String]>,
    spec: Option<&Spec>,
) -> R<Record> {
    let old = tx.must(id, "record")?;
    expect_rev(&old, expected)?;
    let mut new = old.clone();
    if let Some(n) = name {
        if matches!(old.kind(), Kind::ArtifactVersion | Kind::ModelVersion) && n != old.name {
            return invalid("version names are their numbers and cannot change");
        }
        if matches!(old.spec, Spec::Role { builtin: true, .. }) && n != old.name {
            return invalid("built-in roles cannot be renamed");
        }
        check(validate_name(old.kind(), n))?;
        new.name = n.to_string();
    }
    if let Some(t) = tags {
        check(validate_tags(t))?;
        new.tags = t.to_vec();
    }
    if let Some(s) = spec {
        if s.kind() != old.kind() {
            return invalid(format!(
                "spec is for a {}, record is a {}",
                s.kind().name(),
                old.kind().name()
            ));
        }
        check(validate_spec(s))?;
        new.spec = merge_spec(tx, &old, s)?;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    name_taken(tx, &new)?;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

/// The editable fields of `given` over the derived fields of `old.spec`.
pub(super) fn merge_spec(tx: &Tx<'_>, old: &Record, given: &Spec) -> R<Spec> {
    Ok(match (&old.spec, given.clone()) {
        (Spec::Organization { .. }, s @ Spec::Organization { .. })
        | (Spec::Workspace { .. }, s @ Spec::Workspace { .. })
        | (Spec::Project { .. }, s @ Spec::Project { .. })
        | (Spec::RunMetadata { .. }, s @ Spec::RunMetadata { .. }) => s,
        (
            Spec::User {
                service_account,
                api_keys,
                ..
            },
            Spec::User {
                email,
                external_id,
                active,
                ..
            },
        ) => Spec::User {
            email,
            external_id,
            active,
            service_account: *service_account,
            api_keys: api_keys.clone(),
        },
        (Spec::Team { .. }, Spec::Team { members }) => {
            check_members(tx, &old.org(), &members)?;
            Spec::Team { members }
        }
        (Spec::Role { builtin: true, .. }, Spec::Role { .. }) => {
            return invalid("built-in roles cannot be changed")
        }
        (Spec::Role { .. }, Spec::Role { permissions, .. }) => Spec::Role {
            permissions,
            builtin: false,
        },
        (Spec::RoleBinding { .. }, Spec::RoleBinding { .. }) => {
            return invalid("role bindings cannot be changed: delete and create")
        }
        (Spec::Pipeline { run_count, .. }, Spec::Pipeline { description, .. }) => Spec::Pipeline {
            description,
            run_count: *run_count,
        },
        (
            old_s @ Spec::PipelineRun { .. },
            Spec::PipelineRun {
                orchestrator_run_id: o,
                ..
            },
        ) => {
            let mut s = old_s.clone();
            if let Spec::PipelineRun {
                orchestrator_run_id,
                ..
            } = &mut s
            {
                *orchestrator_run_id = o;
            }
            s
        }
        (s @ Spec::StepRun { .. }, Spec::StepRun { .. }) => s.clone(),
        (Spec::Artifact { latest_version, .. }, Spec::Artifact { artifact_type, .. }) => {
            Spec::Artifact {
                artifact_type,
                latest_version: *latest_version,
            }
        }
        (
            Spec::ArtifactVersion { run, number, .. },
            Spec::ArtifactVersion {
                uri, content_hash, ..
            },
        ) => Spec::ArtifactVersion {
            uri,
            content_hash,
            run: *run,
            number: *number,
        },
        (Spec::Model { latest_version, .. }, Spec::Model { description, .. }) => Spec::Model {
            description,
            latest_version: *latest_version,
        },
        (s @ Spec::ModelVersion { .. }, Spec::ModelVersion { .. }) => s.clone(),
        _ => return invalid("spec kind mismatch"),
    })
}

/// Children of a record (all kinds), at most `limit`.
pub(super) fn children(tx: &Tx<'_>, id: &Id, limit: usize) -> Result<Vec<Id>, FsmError> {
    let prefix = keys::meta_index_prefix(index::IX_CHILDREN, id);
    index_ids(tx, &prefix, limit)
}

/// Bindings whose subject, role or scope is `id` (loaded from the kind index: bindings are few).
pub(super) fn bindings_naming(tx: &Tx<'_>, id: &Id) -> Result<Vec<Record>, FsmError> {
    let prefix = keys::meta_index_prefix(index::IX_KIND, &[Kind::RoleBinding as u8]);
    let mut out = Vec::new();
    for b in index_ids(tx, &prefix, usize::MAX)? {
        if let Some(r) = tx.load(&b)? {
            if let Spec::RoleBinding {
                subject,
                role,
                scope,
            } = &r.spec
            {
                if subject == id || role == id || scope == id {
                    out.push(r);
                }
            }
        }
    }
    Ok(out)
}

pub(super) fn delete(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    expected: Option<u64>,
) -> R<u64> {
    let r = tx.must(id, "record")?;
    expect_rev(&r, expected)?;
    match &r.spec {
        Spec::Organization { .. } | Spec::Workspace { .. } | Spec::Project { .. } => {
            let kids = children(tx, id, 8)?;
            let mut others = 0;
            for k in &kids {
                match tx.load(k)? {
                    Some(Record {
                        spec: Spec::Role { builtin: true, .. },
                        ..
                    }) => {}
                    _ => others += 1,
                }
            }
            if others > 0 {
                return refuse(
                    MetaErrorKind::FailedPrecondition,
                    format!("{} {} is not empty", r.kind().name(), fmt_id(id)),
                );
            }
        }
        Spec::Pipeline { .. } => {
            let runs = read_count(
                tx,
                &keys::meta_count(&keys::meta_index_prefix(index::IX_PIPELINE, id)),
            )?;
            if runs > 0 {
                return refuse(
                    MetaErrorKind::FailedPrecondition,
                    format!("pipeline {} still has {runs} runs", fmt_id(id)),
                );
            }
        }
        Spec::Role { builtin: true, .. } => return invalid("built-in roles cannot be deleted"),
        _ => {}
    }
    let mut removed = 0u64;
    // Bindings that name the record go with it (a user, team, role or scope).
    if matches!(
        r.kind(),
        Kind::User
            | Kind::Team
            | Kind::Role
            | Kind::Workspace
            | Kind::Project
            | Kind::Pipeline
            | Kind::Artifact
            | Kind::Model
    ) {
        for b in bindings_naming(tx, id)? {
            tx.write_row(Some(&b), None)?;
            removed += 1;
        }
    }
    if let Spec::User { api_keys, .. } = &r.spec {
        for k in api_keys {
            tx.delete(keys::meta_api_key(&k.sha256));
        }
        // Leave the teams it was in.
        let prefix = keys::meta_index_prefix(index::IX_KIND, &[Kind::Team as u8]);
        for t in index_ids(tx, &prefix, usize::MAX)? {
            if let Some(team) = tx.load(&t)? {
                if let Spec::Team { members } = &team.spec {
                    if members.contains(id) {
                        let mut nt = team.clone();
                        if let Spec::Team { members } = &mut nt.spec {
                            members.retain(|m| m != id);
                        }
                        nt.mod_revision = index;
                        nt.updated_ms = at_ms;
                        tx.write_row(Some(&team), Some(&nt))?;
                    }
                }
            }
        }
    }
    if let Spec::StepRun { status, .. } = &r.spec {
        if let Some(run) = tx.load(&r.parent)? {
            adjust_run(tx, index, at_ms, run, Some(*status), None, false)?;
        }
    }
    removed += cascade(tx, &r)?;
    Ok(removed)
}

/// Removes a record and everything under it (steps, versions, metadata), bounded.
pub(super) fn cascade(tx: &mut Tx<'_>, root: &Record) -> R<u64> {
    let mut stack = vec![root.clone()];
    let mut removed = 0u64;
    while let Some(r) = stack.pop() {
        removed += 1;
        if removed as usize > MAX_CASCADE {
            return refuse(
                MetaErrorKind::FailedPrecondition,
                format!(
                    "{} {} has more than {MAX_CASCADE} dependents: delete them in pages first",
                    root.kind().name(),
                    fmt_id(&root.id)
                ),
            );
        }
        for c in children(tx, &r.id, MAX_CASCADE + 1)? {
            if let Some(cr) = tx.load(&c)? {
                stack.push(cr);
            }
        }
        if let Spec::StepRun { cache_key, .. } = &r.spec {
            if !cache_key.is_empty() {
                let ck = keys::meta_cache(&r.project(), cache_key);
                if tx.get(&ck)?.as_deref() == Some(&r.id[..]) {
                    tx.delete(ck);
                }
            }
        }
        tx.write_row(Some(&r), None)?;
    }
    Ok(removed)
}
