//! Restore: rebuild a node's state exactly as it was at an index (a base backup, then the log
//! records after it replayed through the same apply code), check it against the recorded state
//! hash, and bootstrap a new cluster lineage from it that other nodes then join.

use std::path::{Path, PathBuf};

use serde::Serialize;

use super::{segment, verify, BackupError, BaseManifest, Catalog};
use crate::codec::decode;
use crate::raft_types::{Entry, Node};
use crate::storage::StateMachineStore;

#[derive(Clone, Debug)]
pub struct RestoreOpts {
    pub from: PathBuf,
    pub data_dir: PathBuf,
    pub to_index: Option<u64>,
    /// Unix milliseconds: restore to the last entry the backup received at or before this time.
    pub to_time_ms: Option<u64>,
    pub node_id: u64,
    pub peer_addr: String,
    pub client_addr: String,
    pub dedup_window: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct RestoreReport {
    pub base_index: u64,
    pub restored_index: u64,
    /// State hash at `restored_index`, before the new lineage starts: compare it with
    /// `cluster status --hash` of a replica of the old cluster at that index.
    pub state_hash: u32,
    pub previous_cluster_id: String,
    pub cluster_id: String,
    pub replayed_entries: u64,
    pub seconds: f64,
    /// Where the new lineage's revisions start (the next epoch).
    pub first_index: u64,
}

fn dir_is_empty(p: &Path) -> Result<bool, BackupError> {
    match std::fs::read_dir(p) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::io("read", p)(e)),
    }
}

/// The index `to_time_ms` resolves to: the last record received at or before it.
fn index_at_time(
    segs: &[segment::SegmentInfo],
    cluster_id: &str,
    t: u64,
) -> Result<Option<u64>, BackupError> {
    let mut found = None;
    for s in segs {
        if s.records == 0 || s.first_unix_ms > t {
            continue;
        }
        segment::read_segment(&s.path, cluster_id, false, |r| {
            if r.unix_ms <= t {
                found = Some(r.index);
            }
            Ok(())
        })?;
    }
    Ok(found)
}

/// The index a restore aims for: `--to-index`, the newest index at `--to-time`, or the latest.
fn target_index(o: &RestoreOpts, cat: &Catalog, latest: u64) -> Result<u64, BackupError> {
    Ok(match (o.to_index, o.to_time_ms) {
        (Some(_), Some(_)) => {
            return Err(BackupError::Refused(
                "give --to-index or --to-time, not both".into(),
            ))
        }
        (Some(n), None) => n,
        (None, Some(t)) => {
            let from_segs = index_at_time(&cat.segments, &cat.cluster_id, t)?;
            let from_bases = cat
                .bases
                .iter()
                .filter(|b| b.created_unix_ms <= t)
                .map(|b| b.index)
                .max();
            match from_segs.max(from_bases) {
                Some(i) => i,
                None => {
                    return Err(BackupError::Refused(format!(
                        "nothing in the backup is as old as {t} ms since the epoch"
                    )))
                }
            }
        }
        (None, None) => latest,
    })
}

/// Replays the backed-up records after `base_index` up to `target` through the normal apply;
/// returns how many it applied.
async fn replay(
    sm: &mut StateMachineStore,
    cat: &Catalog,
    base_index: u64,
    target: u64,
) -> Result<u64, BackupError> {
    let mut replayed = 0u64;
    let mut batch: Vec<Entry> = Vec::new();
    for s in &cat.segments {
        if s.last <= base_index || s.first > target {
            continue;
        }
        let mut pending: Vec<Entry> = Vec::new();
        segment::read_segment(&s.path, &cat.cluster_id, false, |rec| {
            if rec.index <= base_index || rec.index > target {
                return Ok(());
            }
            let e: Entry = decode(&rec.entry).map_err(|err| BackupError::Damaged {
                path: s.path.clone(),
                offset: 0,
                what: format!("record {} does not decode: {err}", rec.index),
            })?;
            if e.log_id.index != rec.index {
                return Err(BackupError::Damaged {
                    path: s.path.clone(),
                    offset: 0,
                    what: format!("record {} holds entry {}", rec.index, e.log_id.index),
                });
            }
            pending.push(e);
            Ok(())
        })?;
        for e in pending {
            batch.push(e);
            if batch.len() >= 512 {
                replayed += batch.len() as u64;
                sm.apply_entries(std::mem::take(&mut batch)).await?;
            }
        }
    }
    replayed += batch.len() as u64;
    sm.apply_entries(batch).await?;
    Ok(replayed)
}

pub async fn restore(o: &RestoreOpts) -> Result<RestoreReport, BackupError> {
    let started = std::time::Instant::now();
    if !dir_is_empty(&o.data_dir)? {
        return Err(BackupError::Refused(format!(
            "data directory {} is not empty; restore never writes over existing data",
            o.data_dir.display()
        )));
    }
    // Every checksum and the whole chain, before anything is written.
    let cat = verify(&o.from, true)?;
    let latest = cat
        .restorable
        .iter()
        .map(|r| r.to_index)
        .max()
        .ok_or_else(|| {
            BackupError::Refused(format!("{} holds no base backup", o.from.display()))
        })?;
    let target = target_index(o, &cat, latest)?;
    let Some(r) = cat
        .restorable
        .iter()
        .filter(|r| r.from_index <= target && target <= r.to_index)
        .max_by_key(|r| r.base_index)
    else {
        let ranges: Vec<String> = cat
            .restorable
            .iter()
            .map(|r| format!("{}..={}", r.from_index, r.to_index))
            .collect();
        return Err(BackupError::Refused(format!(
            "index {target} cannot be restored from this backup; restorable: {}",
            ranges.join(", ")
        )));
    };
    let base_path = super::base_dir(&o.from, r.base_index);
    let manifest = BaseManifest::read(&base_path)?;

    std::fs::create_dir_all(&o.data_dir).map_err(BackupError::io("create", &o.data_dir))?;
    StateMachineStore::seed_from_checkpoint(&o.data_dir, &base_path, &[super::base::MANIFEST])?;
    let mut sm = StateMachineStore::open(&o.data_dir, o.dedup_window)?;
    let (idx, hash) = sm.state_hash()?;
    if idx != manifest.applied_index || hash != manifest.state_hash {
        return Err(BackupError::Damaged {
            path: base_path.clone(),
            offset: 0,
            what: format!(
                "restored base hashes to {hash:08x}@{idx}, manifest says {:08x}@{}",
                manifest.state_hash, manifest.applied_index
            ),
        });
    }

    // Replay the records after the base, up to the target, through the normal apply.
    let replayed = replay(&mut sm, &cat, r.base_index, target).await?;
    let (restored, state_hash) = sm.state_hash()?;
    if restored != target {
        return Err(BackupError::Chain(format!(
            "replay stopped at index {restored}, short of {target}"
        )));
    }

    // A new lineage: new cluster id, the next revision epoch, this node the only voter.
    let lineage = crate::storage::start_new_lineage(
        &sm,
        &o.data_dir.join("log"),
        o.node_id,
        Node {
            peer_addr: o.peer_addr.clone(),
            client_addr: o.client_addr.clone(),
        },
    )
    .await?;
    Ok(RestoreReport {
        base_index: r.base_index,
        restored_index: restored,
        state_hash,
        previous_cluster_id: manifest.cluster_id,
        cluster_id: lineage.cluster_id,
        first_index: lineage.first_index,
        replayed_entries: replayed,
        seconds: started.elapsed().as_secs_f64(),
    })
}
