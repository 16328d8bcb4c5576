//! Applying one [`MetaOp`]: every domain rule is decided here, from replicated state.
//!
//! A [`Tx`] reads through its own writes, so one op can touch a row several times (a step, its
//! run, the run's counts) and still produce one consistent set of mutations. Time comes from the
//! command (`at_ms`, stamped by the leader when it proposed it), never from a clock.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use super::index;
use super::*;
use crate::fsm::{FsmError, Mutation, StateRead};
use crate::keys;

/// A domain refusal: becomes [`MetaResponse::Error`].
pub struct Refusal(pub MetaErrorKind, pub String);

/// Either a refusal (a normal response) or a failure of the node (corrupt state).
pub enum Fail {
    Refused(Refusal),
    Fsm(FsmError),
}

impl From<FsmError> for Fail {
    fn from(e: FsmError) -> Fail {
        Fail::Fsm(e)
    }
}

type R<T> = Result<T, Fail>;

fn refuse<T>(kind: MetaErrorKind, msg: impl Into<String>) -> R<T> {
    Err(Fail::Refused(Refusal(kind, msg.into())))
}

/// Reads and writes of one op, reading its own writes.
pub struct Tx<'a> {
    state: &'a dyn StateRead,
    overlay: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
}

impl<'a> Tx<'a> {
    pub fn new(state: &'a dyn StateRead) -> Self {
        Tx {
            state,
            overlay: BTreeMap::new(),
        }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        match self.overlay.get(key) {
            Some(v) => Ok(v.clone()),
            None => self.state.get_raw(key),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.overlay.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.overlay.insert(key, None);
    }

    /// Keys in `[start, end)`, at most `limit`, with this op's writes merged in.
    pub fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::fsm::KvPairs, FsmError> {
        crate::fsm::scan_with_overlay(&self.overlay, start, end, limit, |n| {
            self.state.scan(start, end, n)
        })
    }

    pub fn into_mutations(self) -> Vec<Mutation> {
        self.overlay
            .into_iter()
            .map(|(k, v)| match v {
                Some(v) => Mutation::Put(k, v),
                None => Mutation::Delete(k),
            })
            .collect()
    }

    pub fn load(&self, id: &Id) -> Result<Option<Record>, FsmError> {
        load_record(self, id)
    }

    fn must(&self, id: &Id, what: &str) -> R<Record> {
        match self.load(id)? {
            Some(r) => Ok(r),
            None => refuse(
                MetaErrorKind::NotFound,
                format!("{what} {} not found", fmt_id(id)),
            ),
        }
    }

    fn must_kind(&self, id: &Id, kind: Kind) -> R<Record> {
        let r = self.must(id, kind.name())?;
        if r.kind() != kind {
            return refuse(
                MetaErrorKind::Invalid,
                format!(
                    "{} is a {}, not a {}",
                    fmt_id(id),
                    r.kind().name(),
                    kind.name()
                ),
            );
        }
        Ok(r)
    }

    fn bump_count(&mut self, prefix: &[u8], delta: i64) -> Result<(), FsmError> {
        let ck = keys::meta_count(prefix);
        let cur = read_count(self, &ck)?;
        let next = (cur as i64 + delta).max(0) as u64;
        if next == 0 {
            self.delete(ck);
        } else {
            self.put(ck, next.to_be_bytes().to_vec());
        }
        Ok(())
    }

    /// Writes a row change (`None` = absent) with its name key, index entries and counts.
    fn write_row(&mut self, old: Option<&Record>, new: Option<&Record>) -> Result<(), FsmError> {
        let old_ix = old.map(index::keys_of).unwrap_or_default();
        let new_ix = new.map(index::keys_of).unwrap_or_default();
        for (prefix, k) in &old_ix {
            if !new_ix.iter().any(|(_, nk)| nk == k) {
                self.delete(k.clone());
                self.bump_count(prefix, -1)?;
            }
        }
        for (prefix, k) in &new_ix {
            if !old_ix.iter().any(|(_, ok)| ok == k) {
                self.put(k.clone(), Vec::new());
                self.bump_count(prefix, 1)?;
            }
        }
        let old_name = old.map(|r| keys::meta_name(r.kind() as u8, &r.parent, &r.unique_name()));
        let new_name = new.map(|r| keys::meta_name(r.kind() as u8, &r.parent, &r.unique_name()));
        if old_name != new_name {
            if let Some(k) = old_name {
                self.delete(k);
            }
            if let (Some(k), Some(r)) = (new_name, new) {
                self.put(k, r.id.to_vec());
            }
        }
        match (old, new) {
            (_, Some(r)) => {
                let raw = crate::codec::encode(r).map_err(|e| FsmError::Encode(e.to_string()))?;
                self.put(keys::meta_row(&r.id), raw);
            }
            (Some(r), None) => self.delete(keys::meta_row(&r.id)),
            (None, None) => {}
        }
        Ok(())
    }
}

impl StateRead for Tx<'_> {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        self.get(key)
    }
    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::fsm::KvPairs, FsmError> {
        Tx::scan(self, start, end, limit)
    }
}

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

fn validate_tags(tags: &[String]) -> Result<(), String> {
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

fn validate_text(field: &str, v: &str) -> Result<(), String> {
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

/// Applies one meta op at `index` with the leader's time `at_ms`.
pub fn apply_meta(
    state: &dyn StateRead,
    index: u64,
    at_ms: u64,
    op: &MetaOp,
) -> Result<(Vec<Mutation>, MetaResponse), FsmError> {
    let mut tx = Tx::new(state);
    let r = match op {
        MetaOp::Create {
            id,
            parent,
            name,
            owner,
            tags,
            spec,
        } => create(
            &mut tx, index, at_ms, *id, *parent, name, *owner, tags, spec,
        )
        .map(|r| MetaResponse::Record(Box::new(r))),
        MetaOp::Update {
            id,
            expected_revision,
            name,
            tags,
            spec,
        } => update(
            &mut tx,
            index,
            at_ms,
            id,
            *expected_revision,
            name.as_deref(),
            tags.as_deref(),
            spec.as_ref(),
        )
        .map(|r| MetaResponse::Record(Box::new(r))),
        MetaOp::Delete {
            id,
            expected_revision,
        } => delete(&mut tx, index, at_ms, id, *expected_revision)
            .map(|removed| MetaResponse::Deleted { removed }),
        MetaOp::SetStepStatus { id, status, resume } => {
            set_step_status(&mut tx, index, at_ms, id, *status, *resume)
                .map(|r| MetaResponse::Record(Box::new(r)))
        }
        MetaOp::SetRunStatus { id, status, resume } => {
            set_run_status(&mut tx, index, at_ms, id, *status, *resume)
                .map(|r| MetaResponse::Record(Box::new(r)))
        }
        MetaOp::Heartbeat { id } => {
            heartbeat(&mut tx, index, at_ms, id).map(|r| MetaResponse::Record(Box::new(r)))
        }
        MetaOp::Promote {
            id,
            stage,
            archive_existing,
        } => promote(&mut tx, index, at_ms, id, *stage, *archive_existing)
            .map(|r| MetaResponse::Record(Box::new(r))),
        MetaOp::AddApiKey {
            user,
            key_id,
            sha256,
            grace_ms,
        } => add_api_key(&mut tx, index, at_ms, user, key_id, sha256, *grace_ms)
            .map(|r| MetaResponse::Record(Box::new(r))),
        MetaOp::RevokeApiKey { user, key_id } => {
            revoke_api_key(&mut tx, index, at_ms, user, key_id)
                .map(|r| MetaResponse::Record(Box::new(r)))
        }
        MetaOp::PurgeRuns {
            project,
            before_ms,
            limit,
        } => purge_runs(&mut tx, index, at_ms, project, *before_ms, *limit),
    };
    match r {
        Ok(resp) => Ok((tx.into_mutations(), resp)),
        // A refusal writes nothing: the whole op is dropped.
        Err(Fail::Refused(Refusal(kind, message))) => {
            Ok((Vec::new(), MetaResponse::Error { kind, message }))
        }
        Err(Fail::Fsm(e)) => Err(e),
    }
}

fn invalid<T>(msg: impl Into<String>) -> R<T> {
    refuse(MetaErrorKind::Invalid, msg)
}

fn check(r: Result<(), String>) -> R<()> {
    match r {
        Ok(()) => Ok(()),
        Err(m) => invalid(m),
    }
}

fn name_taken(tx: &Tx<'_>, r: &Record) -> R<()> {
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

#[allow(clippy::too_many_arguments)]
fn create(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: Id,
    parent: Id,
    name: &str,
    owner: Id,
    tags: &[String],
    spec: &Spec,
) -> R<Record> {
    let kind = spec.kind();
    if id == NIL {
        return invalid("id is nil");
    }
    check(validate_tags(tags))?;
    check(validate_spec(spec))?;
    if tx.get(&keys::meta_row(&id))?.is_some() {
        return refuse(
            MetaErrorKind::AlreadyExists,
            format!("id {} already exists", fmt_id(&id)),
        );
    }
    let ancestors = if kind.parent_kinds().is_empty() {
        if parent != NIL {
            return invalid(format!("a {} has no parent", kind.name()));
        }
        Vec::new()
    } else {
        let p = tx.must(&parent, "parent")?;
        if !kind.parent_kinds().contains(&p.kind()) {
            return invalid(format!(
                "a {} cannot be created under a {}",
                kind.name(),
                p.kind().name()
            ));
        }
        let mut a = p.ancestors.clone();
        a.push(p.id);
        a
    };
    let org = ancestors.first().copied().unwrap_or(id);
    if owner != NIL {
        let o = tx.must_kind(&owner, Kind::User)?;
        if o.org() != org && kind != Kind::Organization {
            return invalid("owner belongs to another organization");
        }
    }
    // Derived fields are decided here, whatever the client sent.
    let mut name = name.to_string();
    let spec = match spec.clone() {
        Spec::User {
            email,
            external_id,
            active,
            service_account,
            ..
        } => Spec::User {
            email,
            external_id,
            active,
            service_account,
            api_keys: Vec::new(),
        },
        Spec::Team { members } => {
            check_members(tx, &org, &members)?;
            Spec::Team { members }
        }
        Spec::Role { permissions, .. } => Spec::Role {
            permissions,
            builtin: false,
        },
        Spec::RoleBinding {
            subject,
            role,
            scope,
        } => {
            let s = tx.must(&subject, "subject")?;
            if !matches!(s.kind(), Kind::User | Kind::Team) || s.org() != org {
                return invalid("a binding's subject must be a user or team of the organization");
            }
            let r = tx.must_kind(&role, Kind::Role)?;
            if r.org() != org {
                return invalid("the role belongs to another organization");
            }
            let sc = tx.must(&scope, "scope")?;
            if sc.org() != org {
                return invalid("the scope belongs to another organization");
            }
            if name.is_empty() {
                name = fmt_id(&id);
            }
            Spec::RoleBinding {
                subject,
                role,
                scope,
            }
        }
        Spec::Pipeline { description, .. } => Spec::Pipeline {
            description,
            run_count: 0,
        },
        Spec::PipelineRun {
            pipeline,
            orchestrator_run_id,
            parent_run,
            step_counts,
            ..
        } => {
            let mut run_index = 0;
            if pipeline != NIL {
                let mut p = tx.must_kind(&pipeline, Kind::Pipeline)?;
                if p.parent != parent {
                    return invalid("the pipeline belongs to another project");
                }
                run_index = bump_counter(tx, &mut p, index, at_ms)?;
            }
            if parent_run != NIL {
                if parent_run == id {
                    return invalid("a run cannot be its own parent");
                }
                let pr = tx.must_kind(&parent_run, Kind::PipelineRun)?;
                if pr.parent != parent {
                    return invalid("the parent run belongs to another project");
                }
                // Parents exist before children and never change, so the chain has no cycle;
                // its depth is still bounded.
                let mut depth = 1;
                let mut cur = pr;
                while let Spec::PipelineRun { parent_run: up, .. } = &cur.spec {
                    if *up == NIL {
                        break;
                    }
                    depth += 1;
                    if depth >= MAX_RUN_DEPTH {
                        return invalid(format!("parent runs nest deeper than {MAX_RUN_DEPTH}"));
                    }
                    match tx.load(up)? {
                        Some(r) => cur = r,
                        None => break,
                    }
                }
            }
            // step_counts[0] carries the number of steps the run expects (0 = unknown).
            let expected = step_counts[0];
            let mut counts = [0u32; 9];
            counts[0] = expected;
            Spec::PipelineRun {
                pipeline,
                orchestrator_run_id,
                parent_run,
                status: RunStatus::Initializing,
                start_ms: at_ms,
                end_ms: 0,
                step_counts: counts,
                index: run_index,
            }
        }
        Spec::StepRun {
            attempt, cache_key, ..
        } => {
            let run = tx.must_kind(&parent, Kind::PipelineRun)?;
            if let Spec::PipelineRun { status, .. } = &run.spec {
                if status.is_finished() {
                    return refuse(
                        MetaErrorKind::FailedPrecondition,
                        format!(
                            "run {} is {}: it takes no new steps",
                            fmt_id(&parent),
                            status.name()
                        ),
                    );
                }
            }
            let step = Spec::StepRun {
                attempt,
                cache_key: cache_key.clone(),
                status: RunStatus::Initializing,
                heartbeat_ms: at_ms,
                start_ms: 0,
                end_ms: 0,
            };
            adjust_run(
                tx,
                index,
                at_ms,
                run,
                None,
                Some(RunStatus::Initializing),
                false,
            )?;
            if !cache_key.is_empty() {
                tx.put(
                    keys::meta_cache(&ancestors.get(2).copied().unwrap_or(NIL), &cache_key),
                    id.to_vec(),
                );
            }
            step
        }
        Spec::Artifact { artifact_type, .. } => Spec::Artifact {
            artifact_type,
            latest_version: 0,
        },
        Spec::ArtifactVersion {
            uri,
            content_hash,
            run,
            ..
        } => {
            if run != NIL {
                tx.must_kind(&run, Kind::PipelineRun)?;
            }
            let mut a = tx.must_kind(&parent, Kind::Artifact)?;
            let number = bump_counter(tx, &mut a, index, at_ms)?;
            name = number.to_string();
            Spec::ArtifactVersion {
                uri,
                content_hash,
                run,
                number,
            }
        }
        Spec::Model { description, .. } => Spec::Model {
            description,
            latest_version: 0,
        },
        Spec::ModelVersion {
            artifact_version,
            run,
            ..
        } => {
            if artifact_version != NIL {
                tx.must_kind(&artifact_version, Kind::ArtifactVersion)?;
            }
            if run != NIL {
                tx.must_kind(&run, Kind::PipelineRun)?;
            }
            let mut m = tx.must_kind(&parent, Kind::Model)?;
            let number = bump_counter(tx, &mut m, index, at_ms)?;
            name = number.to_string();
            Spec::ModelVersion {
                artifact_version,
                run,
                number,
                stage: Stage::None,
            }
        }
        other => other,
    };
    check(validate_name(kind, &name))?;
    let rec = Record {
        format: META_FORMAT_VERSION,
        id,
        parent,
        ancestors,
        name,
        owner,
        created_ms: at_ms,
        updated_ms: at_ms,
        create_revision: index,
        mod_revision: index,
        tags: tags.to_vec(),
        spec,
    };
    name_taken(tx, &rec)?;
    tx.write_row(None, Some(&rec))?;
    if kind == Kind::Organization {
        for (role, perms) in rbac::builtin_roles() {
            let rid = builtin_role_id(&id, role);
            let r = Record {
                format: META_FORMAT_VERSION,
                id: rid,
                parent: id,
                ancestors: vec![id],
                name: role.to_string(),
                owner: NIL,
                created_ms: at_ms,
                updated_ms: at_ms,
                create_revision: index,
                mod_revision: index,
                tags: Vec::new(),
                spec: Spec::Role {
                    permissions: perms,
                    builtin: true,
                },
            };
            tx.write_row(None, Some(&r))?;
        }
    }
    Ok(rec)
}

/// Increments the counter a container hands out (a pipeline's run count, an artifact's or a
/// model's latest version number), writes the container, and returns the new value.
fn bump_counter(tx: &mut Tx<'_>, rec: &mut Record, index: u64, at_ms: u64) -> R<u64> {
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

fn check_members(tx: &Tx<'_>, org: &Id, members: &[Id]) -> R<()> {
    let mut seen = members.to_vec();
    seen.sort();
    seen.dedup();
    if seen.len() != members.len() {
        return invalid("duplicate team members");
    }
    for m in members {
        let u = tx.must_kind(m, Kind::User)?;
        if u.org() != *org {
            return invalid("a team member belongs to another organization");
        }
    }
    Ok(())
}

fn expect_rev(r: &Record, expected: Option<u64>) -> R<()> {
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
fn update(
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
fn merge_spec(tx: &Tx<'_>, old: &Record, given: &Spec) -> R<Spec> {
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

/// Counts a step's status change into its run and re-derives the run's status.
/// `from`/`to` = None means the step is being created / deleted.
fn adjust_run(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    run: Record,
    from: Option<RunStatus>,
    to: Option<RunStatus>,
    resume: bool,
) -> R<Record> {
    let old = run.clone();
    let mut run = run;
    if let Spec::PipelineRun {
        status,
        step_counts,
        end_ms,
        ..
    } = &mut run.spec
    {
        if let Some(f) = from {
            let c = &mut step_counts[f as usize];
            *c = c.saturating_sub(1);
        }
        if let Some(t) = to {
            step_counts[t as usize] = step_counts[t as usize].saturating_add(1);
        }
        let derived = derive_run_status(*status, step_counts, resume);
        if derived != *status {
            *status = derived;
            if derived.is_finished() {
                *end_ms = at_ms;
            } else {
                *end_ms = 0;
            }
        }
    }
    run.mod_revision = index;
    run.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&run))?;
    Ok(run)
}

/// A run's status from its steps: any failed step fails it; all expected steps finished
/// completes it (stopped if one stopped); any step started makes it running. A finished run
/// keeps its status unless resumed.
pub fn derive_run_status(current: RunStatus, counts: &[u32; 9], resume: bool) -> RunStatus {
    if current.is_finished() && !resume {
        return current;
    }
    let c = |s: RunStatus| counts[s as usize];
    let expected = counts[0];
    let finished: u32 = RunStatus::ALL
        .iter()
        .filter(|s| s.is_finished())
        .map(|s| c(*s))
        .sum();
    let total: u32 = RunStatus::ALL.iter().map(|s| c(*s)).sum();
    if c(RunStatus::Failed) > 0 {
        return RunStatus::Failed;
    }
    if expected > 0 && finished >= expected && finished == total {
        return if c(RunStatus::Stopped) > 0 {
            RunStatus::Stopped
        } else {
            RunStatus::Completed
        };
    }
    if c(RunStatus::Running) + c(RunStatus::Retrying) + finished > 0 {
        return RunStatus::Running;
    }
    if current.is_finished() {
        // Resumed with no step started yet.
        return RunStatus::Running;
    }
    current
}

fn finished_refusal<T>(what: &str, id: &Id, status: RunStatus) -> R<T> {
    refuse(
        MetaErrorKind::FailedPrecondition,
        format!(
            "{what} {} is {}: a finished {what} never changes status (resume it explicitly)",
            fmt_id(id),
            status.name()
        ),
    )
}

/// Whether a step or run may move `from -> to`: a finished one only through `resume` (to an
/// unfinished status), an unfinished one as [`RunStatus::can_move_to`] allows.
fn check_transition(what: &str, id: &Id, from: RunStatus, to: RunStatus, resume: bool) -> R<()> {
    if resume {
        if !from.is_finished() || to.is_finished() {
            return refuse(
                MetaErrorKind::FailedPrecondition,
                format!(
                    "resume moves a finished {what} to an unfinished status; {what} {} is {}",
                    fmt_id(id),
                    from.name()
                ),
            );
        }
    } else if from.is_finished() {
        return finished_refusal(what, id, from);
    } else if !from.can_move_to(to) {
        return refuse(
            MetaErrorKind::FailedPrecondition,
            format!(
                "{what} {} cannot move from {} to {}",
                fmt_id(id),
                from.name(),
                to.name()
            ),
        );
    }
    Ok(())
}

fn set_step_status(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    to: RunStatus,
    resume: bool,
) -> R<Record> {
    let old = tx.must_kind(id, Kind::StepRun)?;
    let Spec::StepRun { status: from, .. } = old.spec else {
        return invalid("not a step");
    };
    check_transition("step", id, from, to, resume)?;
    let run = tx.must_kind(&old.parent, Kind::PipelineRun)?;
    if let Spec::PipelineRun { status, .. } = &run.spec {
        if status.is_finished() && !resume {
            return finished_refusal("run", &run.id, *status);
        }
    }
    let mut new = old.clone();
    if let Spec::StepRun {
        status,
        start_ms,
        end_ms,
        heartbeat_ms,
        ..
    } = &mut new.spec
    {
        *status = to;
        if matches!(to, RunStatus::Running) && *start_ms == 0 {
            *start_ms = at_ms;
        }
        *end_ms = if to.is_finished() { at_ms } else { 0 };
        *heartbeat_ms = at_ms;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    if from != to {
        adjust_run(tx, index, at_ms, run, Some(from), Some(to), resume)?;
    }
    Ok(new)
}

fn set_run_status(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    to: RunStatus,
    resume: bool,
) -> R<Record> {
    let old = tx.must_kind(id, Kind::PipelineRun)?;
    let Spec::PipelineRun { status: from, .. } = old.spec else {
        return invalid("not a run");
    };
    check_transition("run", id, from, to, resume)?;
    let mut new = old.clone();
    if let Spec::PipelineRun { status, end_ms, .. } = &mut new.spec {
        *status = to;
        *end_ms = if to.is_finished() { at_ms } else { 0 };
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

fn heartbeat(tx: &mut Tx<'_>, index: u64, at_ms: u64, id: &Id) -> R<Record> {
    let old = tx.must_kind(id, Kind::StepRun)?;
    let mut new = old.clone();
    if let Spec::StepRun {
        status,
        heartbeat_ms,
        ..
    } = &mut new.spec
    {
        if status.is_finished() {
            return finished_refusal("step", id, *status);
        }
        *heartbeat_ms = at_ms;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

fn promote(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    id: &Id,
    stage: Stage,
    archive_existing: bool,
) -> R<Record> {
    let old = tx.must_kind(id, Kind::ModelVersion)?;
    if stage.exclusive() {
        let prefix =
            keys::meta_index_prefix(index::IX_STAGE, &[&old.parent[..], &[stage as u8]].concat());
        for holder in index_ids(tx, &prefix, 16)? {
            if holder == *id {
                continue;
            }
            let h = tx.must_kind(&holder, Kind::ModelVersion)?;
            if !archive_existing {
                return refuse(
                    MetaErrorKind::FailedPrecondition,
                    format!(
                        "version {} of model {} is already in {} (pass archive_existing to move it to archived)",
                        h.name,
                        fmt_id(&old.parent),
                        stage.name()
                    ),
                );
            }
            let mut archived = h.clone();
            if let Spec::ModelVersion { stage: s, .. } = &mut archived.spec {
                *s = Stage::Archived;
            }
            archived.mod_revision = index;
            archived.updated_ms = at_ms;
            tx.write_row(Some(&h), Some(&archived))?;
        }
    }
    let mut new = old.clone();
    if let Spec::ModelVersion { stage: s, .. } = &mut new.spec {
        *s = stage;
    }
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

#[allow(clippy::too_many_arguments)]
fn add_api_key(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    user: &Id,
    key_id: &str,
    sha256: &[u8; 32],
    grace_ms: u64,
) -> R<Record> {
    let old = tx.must_kind(user, Kind::User)?;
    check(validate_name(Kind::User, key_id).map_err(|e| format!("key id: {e}")))?;
    let ak = keys::meta_api_key(sha256);
    if tx.get(&ak)?.is_some() {
        return refuse(
            MetaErrorKind::AlreadyExists,
            "this API key is already registered",
        );
    }
    let mut new = old.clone();
    let mut dropped = Vec::new();
    if let Spec::User {
        service_account,
        api_keys,
        ..
    } = &mut new.spec
    {
        if !*service_account {
            return invalid("API keys belong to service accounts only");
        }
        if api_keys.iter().any(|k| k.key_id == key_id) {
            return refuse(
                MetaErrorKind::AlreadyExists,
                format!("key id {key_id:?} already exists"),
            );
        }
        // Expired keys are dropped; live ones expire after the grace period.
        api_keys.retain(|k| {
            let expired = k.expires_ms != 0 && k.expires_ms <= at_ms;
            if expired {
                dropped.push(k.sha256);
            }
            !expired
        });
        for k in api_keys.iter_mut() {
            let end = at_ms.saturating_add(grace_ms);
            if k.expires_ms == 0 || k.expires_ms > end {
                k.expires_ms = end;
            }
        }
        api_keys.push(ApiKey {
            key_id: key_id.to_string(),
            sha256: *sha256,
            created_ms: at_ms,
            expires_ms: 0,
        });
    }
    for h in dropped {
        tx.delete(keys::meta_api_key(&h));
    }
    tx.put(ak, user.to_vec());
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

fn revoke_api_key(tx: &mut Tx<'_>, index: u64, at_ms: u64, user: &Id, key_id: &str) -> R<Record> {
    let old = tx.must_kind(user, Kind::User)?;
    let mut new = old.clone();
    let mut removed = None;
    if let Spec::User { api_keys, .. } = &mut new.spec {
        if let Some(pos) = api_keys.iter().position(|k| k.key_id == key_id) {
            removed = Some(api_keys.remove(pos).sha256);
        }
    }
    let Some(h) = removed else {
        return refuse(
            MetaErrorKind::NotFound,
            format!("key id {key_id:?} not found"),
        );
    };
    tx.delete(keys::meta_api_key(&h));
    new.mod_revision = index;
    new.updated_ms = at_ms;
    tx.write_row(Some(&old), Some(&new))?;
    Ok(new)
}

/// Children of a record (all kinds), at most `limit`.
fn children(tx: &Tx<'_>, id: &Id, limit: usize) -> Result<Vec<Id>, FsmError> {
    let prefix = keys::meta_index_prefix(index::IX_CHILDREN, id);
    index_ids(tx, &prefix, limit)
}

/// Bindings whose subject, role or scope is `id` (loaded from the kind index: bindings are few).
fn bindings_naming(tx: &Tx<'_>, id: &Id) -> Result<Vec<Record>, FsmError> {
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

fn delete(tx: &mut Tx<'_>, index: u64, at_ms: u64, id: &Id, expected: Option<u64>) -> R<u64> {
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
fn cascade(tx: &mut Tx<'_>, root: &Record) -> R<u64> {
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

fn purge_runs(
    tx: &mut Tx<'_>,
    index: u64,
    at_ms: u64,
    project: &Id,
    before_ms: u64,
    limit: u32,
) -> R<MetaResponse> {
    tx.must_kind(project, Kind::Project)?;
    if limit == 0 || limit > 1000 {
        return invalid("purge limit must be 1..=1000");
    }
    let prefix = keys::meta_index_prefix(
        index::IX_CHILDREN,
        &[&project[..], &[Kind::PipelineRun as u8]].concat(),
    );
    // Created before `before_ms` = sort key above sort_key(before_ms).
    let start = keys::meta_index(
        &prefix,
        index::sort_key(before_ms).saturating_add(1),
        0,
        &NIL,
    );
    let end = keys::prefix_end(&prefix).unwrap_or_default();
    let rows = tx.scan(&start, &end, limit as usize + 1)?;
    let more = rows.len() > limit as usize;
    let mut runs = 0u64;
    let mut removed = 0u64;
    for (k, _) in rows.into_iter().take(limit as usize) {
        let mut id = [0u8; 16];
        id.copy_from_slice(&k[k.len() - 16..]);
        if tx.load(&id)?.is_some() {
            removed += delete(tx, index, at_ms, &id, None)?;
            runs += 1;
        }
    }
    Ok(MetaResponse::Purged {
        removed,
        runs,
        more,
    })
}
