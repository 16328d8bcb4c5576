//! Artifacts, models, their versions and model stage promotion.

use super::*;

/// A new artifact: versions are numbered from 1 as they are added.
pub(super) fn prepare_artifact(artifact_type: String) -> Spec {
    Spec::Artifact {
        artifact_type,
        latest_version: 0,
    }
}

/// A new artifact version: the next number of its artifact, which is also its name.
pub(super) fn prepare_artifact_version(
    tx: &mut Tx<'_>,
    d: &mut Draft,
    uri: String,
    content_hash: String,
    run: Id,
) -> R<Spec> {
    if run != NIL {
        tx.must_kind(&run, Kind::PipelineRun)?;
    }
    let mut a = tx.must_kind(&d.parent, Kind::Artifact)?;
    let number = bump_counter(tx, &mut a, d.index, d.at_ms)?;
    d.name = number.to_string();
    Ok(Spec::ArtifactVersion {
        uri,
        content_hash,
        run,
        number,
    })
}

/// A new model: versions are numbered from 1 as they are added.
pub(super) fn prepare_model(description: String) -> Spec {
    Spec::Model {
        description,
        latest_version: 0,
    }
}

/// A new model version: the next number of its model, which is also its name; no stage yet.
pub(super) fn prepare_model_version(
    tx: &mut Tx<'_>,
    d: &mut Draft,
    artifact_version: Id,
    run: Id,
) -> R<Spec> {
    if artifact_version != NIL {
        tx.must_kind(&artifact_version, Kind::ArtifactVersion)?;
    }
    if run != NIL {
        tx.must_kind(&run, Kind::PipelineRun)?;
    }
    let mut m = tx.must_kind(&d.parent, Kind::Model)?;
    let number = bump_counter(tx, &mut m, d.index, d.at_ms)?;
    d.name = number.to_string();
    Ok(Spec::ModelVersion {
        artifact_version,
        run,
        number,
        stage: Stage::None,
    })
}

pub(super) fn promote(
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
