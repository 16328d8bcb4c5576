//! Snapshots: RocksDB checkpoints built off the apply path, installed as a new generation.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::RaftSnapshotBuilder;
use rocksdb::{checkpoint::Checkpoint, IteratorMode, Options, DB};

use super::*;
use crate::keys;
use crate::raft_types::{SnapshotMeta, TypeConfig};
use crate::storage::{dec, enc, sync_dir, StorageError};

impl StateMachineStore {
    /// Takes a checkpoint of the live DB and records its metadata, read from the checkpoint itself
    /// so the metadata always matches the data.
    pub(super) fn build_checkpoint(&self) -> Result<(SnapshotMeta, PathBuf), StorageError> {
        let snaps = self.shared.data_dir.join("snapshots");
        let n = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = snaps.join(format!("building-{n}"));
        {
            let db = self.db();
            let cp = Checkpoint::new(&db).map_err(StorageError::rocks("checkpoint"))?;
            cp.create_checkpoint(&tmp)
                .map_err(StorageError::rocks("create checkpoint"))?;
        }
        let meta = {
            let ro = DB::open_for_read_only(&Options::default(), &tmp, false)
                .map_err(StorageError::rocks("open checkpoint"))?;
            SnapshotMeta {
                last_log_id: read_last_applied(&ro)?,
                last_membership: Self::read_membership(&ro)?,
            }
        };
        write_file_synced(&tmp.join(SNAPSHOT_META_FILE), &enc("snapshot meta", &meta)?)?;
        sync_dir(&tmp)?;
        let idx = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let fin = snaps.join(format!("snap-{idx:020}-b{n}"));
        std::fs::rename(&tmp, &fin).map_err(StorageError::io("rename", &fin))?;
        sync_dir(&snaps)?;
        self.set_current_snapshot(meta.clone(), fin.clone());
        Ok((meta, fin))
    }

    pub(super) fn set_current_snapshot(&self, meta: SnapshotMeta, path: PathBuf) {
        let mut cur = match self.shared.current_snapshot.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *cur = Some((meta, path.clone()));
        drop(cur);
        // Keep the newest two snapshots: one may still be streaming to a follower.
        let snaps = self.shared.data_dir.join("snapshots");
        let mut all = list_snapshots(&snaps);
        all.sort();
        if all.len() > 2 {
            for old in &all[..all.len() - 2] {
                if *old != path {
                    let _ = std::fs::remove_dir_all(old);
                }
            }
        }
    }

    /// Replaces the live state with the snapshot in `dir` (a complete, fsync'd checkpoint).
    pub(super) fn install_dir(&self, meta: &SnapshotMeta, dir: &Path) -> Result<(), StorageError> {
        let on_disk: SnapshotMeta =
            dec("snapshot meta", &read_file(&dir.join(SNAPSHOT_META_FILE))?)?;
        if on_disk.last_log_id != meta.last_log_id {
            return Err(StorageError::Snapshot {
                path: dir.to_path_buf(),
                reason: format!(
                    "metadata says {:?}, files hold {:?}",
                    meta.last_log_id, on_disk.last_log_id
                ),
            });
        }
        let gen = self.shared.generation.load(Ordering::SeqCst) + 1;
        let target = self.shared.data_dir.join(format!("sm-{gen}"));
        let _ = std::fs::remove_dir_all(&target);
        std::fs::create_dir_all(&target).map_err(StorageError::io("create", &target))?;
        for ent in std::fs::read_dir(dir).map_err(StorageError::io("read dir", dir))? {
            let ent = ent.map_err(StorageError::io("read dir", dir))?;
            let name = ent.file_name();
            let src = ent.path();
            let dst = target.join(&name);
            if name.to_string_lossy().ends_with(".sst") {
                // SST files are immutable: share them.
                std::fs::hard_link(&src, &dst).map_err(StorageError::io("link", &dst))?;
            } else {
                // MANIFEST, WAL, OPTIONS are appended to by the live DB: copy them.
                std::fs::copy(&src, &dst).map_err(StorageError::io("copy", &dst))?;
            }
        }
        sync_dir(&target)?;
        let db = DB::open(&sm_options(), &target)
            .map_err(StorageError::rocks("open installed snapshot"))?;
        let applied = read_last_applied(&db)?;
        if let Some(id) = db
            .get(keys::SM_META_CLUSTER_ID)
            .map_err(StorageError::rocks("get cluster id"))?
        {
            self.set_lineage(&String::from_utf8_lossy(&id));
        }
        if applied != meta.last_log_id {
            return Err(StorageError::Snapshot {
                path: dir.to_path_buf(),
                reason: format!(
                    "installed state is at {applied:?}, expected {:?}",
                    meta.last_log_id
                ),
            });
        }
        let rbac = load_rbac(&db)?;
        let old_gen = self.shared.generation.swap(gen, Ordering::SeqCst);
        {
            let mut g = match self.shared.db.write() {
                Ok(g) => g,
                Err(p) => p.into_inner(),
            };
            *g = Arc::new(db);
            *self.rbac_write() = rbac;
        }
        write_current(&self.shared.data_dir, gen)?;
        let old = self.shared.data_dir.join(format!("sm-{old_gen}"));
        // Readers may still hold the old DB for a moment; remove it a little later.
        std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_secs(10));
            let _ = std::fs::remove_dir_all(old);
        });
        self.shared
            .applied_tx
            .send_replace(meta.last_log_id.map(|l| l.index).unwrap_or(0));
        Ok(())
    }
}

/// The metadata and state hash of a checkpoint directory.
pub fn checkpoint_meta_and_hash(dir: &Path) -> Result<(SnapshotMeta, u32), StorageError> {
    let ro = DB::open_for_read_only(&Options::default(), dir, false)
        .map_err(StorageError::rocks("open checkpoint"))?;
    let meta = SnapshotMeta {
        last_log_id: read_last_applied(&ro)?,
        last_membership: StateMachineStore::read_membership(&ro)?,
    };
    let hash = hash_iter(ro.iterator(IteratorMode::Start))?;
    Ok((meta, hash))
}

/// CRC32 over every (key, value), length-prefixed, in key order: the state hash.
pub(super) fn hash_iter<I>(iter: I) -> Result<u32, StorageError>
where
    I: Iterator<Item = Result<(Box<[u8]>, Box<[u8]>), rocksdb::Error>>,
{
    let mut h = crc32fast::Hasher::new();
    for r in iter {
        let (k, v) = r.map_err(StorageError::rocks("hash"))?;
        h.update(&(k.len() as u64).to_le_bytes());
        h.update(&k);
        h.update(&(v.len() as u64).to_le_bytes());
        h.update(&v);
    }
    Ok(h.finalize())
}

pub(super) fn latest_snapshot(
    snaps: &Path,
) -> Result<Option<(SnapshotMeta, PathBuf)>, StorageError> {
    let mut all = list_snapshots(snaps);
    all.sort();
    while let Some(p) = all.pop() {
        match std::fs::read(p.join(SNAPSHOT_META_FILE)) {
            Ok(b) => return Ok(Some((dec("snapshot meta", &b)?, p))),
            Err(_) => {
                let _ = std::fs::remove_dir_all(&p);
            }
        }
    }
    Ok(None)
}

/// Builds a snapshot off the apply path: the checkpoint is a point-in-time view.
pub struct SnapshotBuilder {
    pub(super) store: StateMachineStore,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotDir;

    async fn build_snapshot(
        &mut self,
    ) -> Result<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>, std::io::Error>
    {
        let _g = self.store.shared.snapshot_lock.lock().await;
        let store = self.store.clone();
        let (meta, path) = tokio::task::spawn_blocking(move || store.build_checkpoint())
            .await
            .map_err(std::io::Error::other)??;
        tracing::info!(index = ?meta.last_log_id.map(|l| l.index), path = %path.display(), "snapshot built");
        Ok(openraft::Snapshot {
            meta,
            snapshot: SnapshotDir { path },
        })
    }
}
