//! Secondary indexes of metadata records: which index entries a record has.
//!
//! An entry is `I + ix + scope + sort + tie + id` (see `keys.rs`). `sort` is the inverted creation
//! time, so an ascending scan lists newest first and a time range is one contiguous key range.
//! Apply diffs the entries of the old and new version of a row and writes the difference (and
//! the per-scope counts) in the same batch as the row, so an index is never out of step with it.

use super::{Id, Kind, Record, Spec};
use crate::keys;

/// Children of a parent, by kind: scope = parent + kind.
pub const IX_CHILDREN: u8 = 1;
/// Runs of a project by status: scope = project + kind + status.
pub const IX_STATUS: u8 = 2;
/// Runs of a pipeline: scope = pipeline.
pub const IX_PIPELINE: u8 = 3;
/// Runs of a pipeline by status: scope = pipeline + status.
pub const IX_PIPELINE_STATUS: u8 = 4;
/// Records of a parent by owner: scope = parent + kind + owner.
pub const IX_OWNER: u8 = 5;
/// Records of a parent by tag: scope = parent + kind + tag + 0.
pub const IX_TAG: u8 = 6;
/// Runs of a project by metadata key/value: scope = project + key + 0 + value + 0; id = the run.
pub const IX_RUN_META: u8 = 7;
/// Model versions by stage: scope = model + stage.
pub const IX_STAGE: u8 = 8;
/// Every record of a kind: scope = kind. Only for the small kinds RBAC loads at start.
pub const IX_KIND: u8 = 9;
/// Everything a subject owns, by kind: scope = owner + kind (for ListAllowed).
pub const IX_OWNED: u8 = 10;

/// Kinds listed whole by [`IX_KIND`] (small, loaded into the RBAC index).
pub fn kind_indexed(k: Kind) -> bool {
    matches!(
        k,
        Kind::Organization | Kind::User | Kind::Team | Kind::Role | Kind::RoleBinding
    )
}

/// Newest first: larger times sort first.
pub fn sort_key(created_ms: u64) -> u64 {
    u64::MAX - created_ms
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The index prefixes (`I + ix + scope`) a record is listed under, each with the id stored in
/// the entry (the record's own id except for run metadata, which lists its run).
pub fn entries(r: &Record) -> Vec<(Vec<u8>, Id)> {
    let kind = [r.kind() as u8];
    let mut out = vec![(
        keys::meta_index_prefix(IX_CHILDREN, &cat(&[&r.parent, &kind])),
        r.id,
    )];
    if r.owner != super::NIL {
        out.push((
            keys::meta_index_prefix(IX_OWNER, &cat(&[&r.parent, &kind, &r.owner])),
            r.id,
        ));
        out.push((
            keys::meta_index_prefix(IX_OWNED, &cat(&[&r.owner, &kind])),
            r.id,
        ));
    }
    for t in &r.tags {
        out.push((
            keys::meta_index_prefix(IX_TAG, &cat(&[&r.parent, &kind, t.as_bytes(), &[0]])),
            r.id,
        ));
    }
    if kind_indexed(r.kind()) {
        out.push((keys::meta_index_prefix(IX_KIND, &kind), r.id));
    }
    match &r.spec {
        Spec::PipelineRun {
            pipeline, status, ..
        } => {
            let st = [*status as u8];
            out.push((
                keys::meta_index_prefix(IX_STATUS, &cat(&[&r.parent, &kind, &st])),
                r.id,
            ));
            if *pipeline != super::NIL {
                out.push((keys::meta_index_prefix(IX_PIPELINE, pipeline), r.id));
                out.push((
                    keys::meta_index_prefix(IX_PIPELINE_STATUS, &cat(&[pipeline, &st])),
                    r.id,
                ));
            }
        }
        Spec::ModelVersion { stage, .. } => {
            out.push((
                keys::meta_index_prefix(IX_STAGE, &cat(&[&r.parent, &[*stage as u8]])),
                r.id,
            ));
        }
        // Listed under the run's project, pointing at the run (the parent).
        Spec::RunMetadata { value } if r.ancestors.len() == 4 => {
            out.push((
                keys::meta_index_prefix(
                    IX_RUN_META,
                    &run_meta_scope(&r.ancestors[2], &r.name, &value.canonical()),
                ),
                r.parent,
            ));
        }
        _ => {}
    }
    out
}

/// Scope of [`IX_RUN_META`]: project + key + 0 + value + 0 (keys and values hold no 0 byte...
/// values may: the value is length-prefixed instead).
pub fn run_meta_scope(project: &Id, key: &str, canonical: &[u8]) -> Vec<u8> {
    let len = (canonical.len() as u32).to_be_bytes();
    cat(&[project, key.as_bytes(), &[0], &len, canonical])
}

/// The full index keys of a record (prefix + sort + tie + id).
pub fn keys_of(r: &Record) -> Vec<(Vec<u8>, Vec<u8>)> {
    let sort = sort_key(r.created_ms);
    entries(r)
        .into_iter()
        .map(|(prefix, id)| {
            let k = keys::meta_index(&prefix, sort, u64::MAX - r.create_revision, &id);
            (prefix, k)
        })
        .collect()
}
