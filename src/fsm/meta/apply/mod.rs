//! Applying one [`MetaOp`]: every domain rule is decided here, from replicated state.
//!
//! A [`Tx`] reads through its own writes, so one op can touch a row several times (a step, its
//! run, the run's counts) and still produce one consistent set of mutations. Time comes from the
//! command (`at_ms`, stamped by the leader when it proposed it), never from a clock.

mod access;
mod catalog;
mod records;
mod runs;
mod validate;

use std::collections::BTreeMap;

use access::*;
use catalog::*;
use records::*;
pub use records::{
    builtin_role_id, decode_record, index_ids, load_head, load_record, read_count, Head,
};
pub use runs::derive_run_status;
use runs::*;
use validate::*;
pub use validate::{validate_name, validate_spec, MAX_META_VALUE_BYTES};

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
    let ancestors = ancestors_of(tx, kind, &parent)?;
    let org = ancestors.first().copied().unwrap_or(id);
    if owner != NIL {
        let o = tx.must_kind(&owner, Kind::User)?;
        if o.org() != org && kind != Kind::Organization {
            return invalid("owner belongs to another organization");
        }
    }
    let mut draft = Draft {
        index,
        at_ms,
        id,
        parent,
        org,
        ancestors,
        name: name.to_string(),
    };
    let spec = prepare(tx, &mut draft, spec.clone())?;
    check(validate_name(kind, &draft.name))?;
    let rec = Record {
        format: META_FORMAT_VERSION,
        id,
        parent,
        ancestors: draft.ancestors,
        name: draft.name,
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
        write_builtin_roles(tx, index, at_ms, &id)?;
    }
    Ok(rec)
}

/// The ancestors of a new record of `kind` under `parent` (root first), checking that the
/// parent exists and may hold that kind.
fn ancestors_of(tx: &Tx<'_>, kind: Kind, parent: &Id) -> R<Vec<Id>> {
    if kind.parent_kinds().is_empty() {
        if *parent != NIL {
            return invalid(format!("a {} has no parent", kind.name()));
        }
        return Ok(Vec::new());
    }
    let p = tx.must(parent, "parent")?;
    if !kind.parent_kinds().contains(&p.kind()) {
        return invalid(format!(
            "a {} cannot be created under a {}",
            kind.name(),
            p.kind().name()
        ));
    }
    let mut a = p.ancestors.clone();
    a.push(p.id);
    Ok(a)
}

/// A record being created: what its kind's rules read, and the name they may derive.
struct Draft {
    index: u64,
    at_ms: u64,
    id: Id,
    parent: Id,
    /// The organization it belongs to (itself for an organization).
    org: Id,
    ancestors: Vec<Id>,
    name: String,
}

/// The kind's own rules for a new record: checks against state, and the derived fields decided
/// here, whatever the client sent. Kinds without rules keep the spec as given.
fn prepare(tx: &mut Tx<'_>, d: &mut Draft, spec: Spec) -> R<Spec> {
    Ok(match spec {
        Spec::User {
            email,
            external_id,
            active,
            service_account,
            ..
        } => prepare_user(email, external_id, active, service_account),
        Spec::Team { members } => prepare_team(tx, d, members)?,
        Spec::Role { permissions, .. } => prepare_role(permissions),
        Spec::RoleBinding {
            subject,
            role,
            scope,
        } => prepare_binding(tx, d, subject, role, scope)?,
        Spec::Pipeline { description, .. } => prepare_pipeline(description),
        Spec::PipelineRun {
            pipeline,
            orchestrator_run_id,
            parent_run,
            step_counts,
            ..
        } => prepare_run(
            tx,
            d,
            pipeline,
            orchestrator_run_id,
            parent_run,
            step_counts[0],
        )?,
        Spec::StepRun {
            attempt, cache_key, ..
        } => prepare_step(tx, d, attempt, cache_key)?,
        Spec::Artifact { artifact_type, .. } => prepare_artifact(artifact_type),
        Spec::ArtifactVersion {
            uri,
            content_hash,
            run,
            ..
        } => prepare_artifact_version(tx, d, uri, content_hash, run)?,
        Spec::Model { description, .. } => prepare_model(description),
        Spec::ModelVersion {
            artifact_version,
            run,
            ..
        } => prepare_model_version(tx, d, artifact_version, run)?,
        other => other,
    })
}
