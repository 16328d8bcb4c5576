//! The state-machine store: applied state in RocksDB, snapshots as RocksDB checkpoints.
//!
//! Layout under the data directory:
//! - `sm-<generation>/`: the live state-machine DB. `SM_CURRENT` names the live generation.
//!   Installing a snapshot opens a new generation built from the snapshot's files, then flips
//!   `SM_CURRENT` (write temp, fsync, rename, fsync dir).
//! - `snapshots/snap-<index>-<n>/`: checkpoints (SST files hard-linked) plus `snapshot.meta`.
//!   The newest two are kept; older ones are removed.

mod apply;
mod snapshot;
mod view;

pub use snapshot::{checkpoint_meta_and_hash, SnapshotBuilder};
pub use view::SnapshotView;

use apply::{load_rbac, RecentValues, Staged, MAX_APPLY_BATCH, MAX_APPLY_BATCH_BYTES};
use snapshot::{hash_iter, latest_snapshot};
use view::{scan_db, snapshot_applied};

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::fsm::meta::rbac::RbacIndex;
use futures::{Stream, StreamExt};
use openraft::storage::{EntryResponder, RaftStateMachine};
use openraft::OptionalSend;
use rocksdb::{checkpoint::Checkpoint, Direction, IteratorMode, Options, ReadOptions, DB};
use tokio::sync::watch;

use super::dedup_filter::DedupFilter;
use super::{dec, enc, sync_dir, StorageError};
use crate::fsm;
use crate::keys;
use crate::raft_types::{LogId, SnapshotMeta, StoredMembership, TypeConfig};

pub const SNAPSHOT_META_FILE: &str = "snapshot.meta";

const SM_CURRENT: &str = "SM_CURRENT";

/// A snapshot on local disk: a directory holding a RocksDB checkpoint and `snapshot.meta`.
#[derive(Debug, Clone)]
pub struct SnapshotDir {
    pub path: PathBuf,
}

/// A user value as the API layer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredValue {
    pub key: Vec<u8>,
    pub record: fsm::ValueRecord,
}

struct Shared {
    data_dir: PathBuf,
    db: RwLock<Arc<DB>>,
    generation: AtomicU64,
    applied_tx: watch::Sender<u64>,
    dedup_window: u64,
    current_snapshot: Mutex<Option<(SnapshotMeta, PathBuf)>>,
    snapshot_seq: AtomicU64,
    /// Serialises snapshot builds and installs.
    snapshot_lock: tokio::sync::Mutex<()>,
    /// The cluster lineage id, kept in step with the stored one (the network stamps it on
    /// every peer request and refuses requests from other lineages).
    lineage: Arc<std::sync::RwLock<String>>,
    /// Users, teams, roles and bindings for permission checks, kept in step with apply.
    rbac: RwLock<RbacIndex>,
}

/// The openraft state machine over RocksDB. Clones share the same store.
pub struct StateMachineStore {
    shared: Arc<Shared>,
    /// Apply's cache of recently written key/value records; see [`RecentValues`]. Owned by the
    /// instance openraft applies with; clones (readers, snapshot builders) start empty and never
    /// apply.
    recent: RecentValues,
    /// Whether the first dedup layout (`keys::dedup_queue`) may still hold records (see
    /// [`fsm::Dedup::legacy`]); `None` until checked against the current data. Once `false` it
    /// stays so: this code never writes that layout. Reset when a snapshot replaces the data.
    legacy_dedup: Option<bool>,
    /// Apply's filter of the request ids whose records exist (see [`DedupFilter`]); `None`
    /// until built from the database by the first apply call, and again whenever the data is
    /// replaced or a batch fails.
    dedup_filter: Option<DedupFilter>,
}

impl Clone for StateMachineStore {
    fn clone(&self) -> Self {
        StateMachineStore {
            shared: self.shared.clone(),
            recent: RecentValues::default(),
            legacy_dedup: None,
            dedup_filter: None,
        }
    }
}

fn sm_options() -> Options {
    let mut o = Options::default();
    o.create_if_missing(true);
    // Most point reads during apply miss (request-id lookups): bloom filters answer those without
    // walking the memtable skip list or reading SST blocks.
    o.set_memtable_whole_key_filtering(true);
    // Apply reads every key it writes (revisions, versions); a small memtable keeps those skip-list
    // searches shallow and cache-resident. Measured: see docs/benchmarks.md.
    o.set_write_buffer_size(8 << 20);
    o.set_memtable_prefix_bloom_ratio(0.1);
    let mut t = rocksdb::BlockBasedOptions::default();
    t.set_bloom_filter(10.0, false);
    t.set_whole_key_filtering(true);
    t.set_block_cache(&rocksdb::Cache::new_lru_cache(256 << 20));
    o.set_block_based_table_factory(&t);
    o
}

impl StateMachineStore {
    /// Opens (or creates) the state machine under `data_dir`.
    pub fn open(data_dir: &Path, dedup_window: u64) -> Result<StateMachineStore, StorageError> {
        let snaps = data_dir.join("snapshots");
        std::fs::create_dir_all(&snaps).map_err(StorageError::io("create", &snaps))?;
        let gen = match std::fs::read_to_string(data_dir.join(SM_CURRENT)) {
            Ok(s) => s.trim().parse::<u64>().map_err(|e| StorageError::Decode {
                what: format!("{}", data_dir.join(SM_CURRENT).display()),
                reason: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(e) => {
                return Err(StorageError::Io {
                    op: "read",
                    path: data_dir.join(SM_CURRENT),
                    source: e,
                })
            }
        };
        let db_path = data_dir.join(format!("sm-{gen}"));
        let db =
            DB::open(&sm_options(), &db_path).map_err(StorageError::rocks("open state machine"))?;
        if gen == 0 {
            write_current(data_dir, 0)?;
        }
        // Remove generations and half-written snapshots a crash left behind.
        cleanup_dir(data_dir, |name| {
            name.starts_with("sm-") && name != format!("sm-{gen}")
        });
        cleanup_dir(&snaps, |name| {
            name.starts_with("incoming-")
                || name.starts_with("building-")
                || name.starts_with("backup-")
        });

        let applied = read_last_applied(&db)?.map(|l| l.index).unwrap_or(0);
        let (applied_tx, _) = watch::channel(applied);
        let current = latest_snapshot(&snaps)?;
        let lineage = db
            .get(keys::SM_META_CLUSTER_ID)
            .map_err(StorageError::rocks("get cluster id"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default();
        let rbac = load_rbac(&db)?;
        let store = StateMachineStore {
            shared: Arc::new(Shared {
                data_dir: data_dir.to_path_buf(),
                db: RwLock::new(Arc::new(db)),
                generation: AtomicU64::new(gen),
                applied_tx,
                dedup_window,
                current_snapshot: Mutex::new(current),
                snapshot_seq: AtomicU64::new(0),
                snapshot_lock: tokio::sync::Mutex::new(()),
                lineage: Arc::new(std::sync::RwLock::new(lineage)),
                rbac: RwLock::new(rbac),
            }),
            recent: RecentValues::default(),
            legacy_dedup: None,
            dedup_filter: None,
        };
        Ok(store)
    }

    fn rbac_write(&self) -> std::sync::RwLockWriteGuard<'_, RbacIndex> {
        self.shared.rbac.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` over one consistent snapshot of the state machine.
    pub fn read_view<T>(&self, f: impl FnOnce(&SnapshotView<'_>) -> T) -> Result<T, StorageError> {
        let db = self.db();
        let snap = db.snapshot();
        let applied = snapshot_applied(&snap)?;
        let view = SnapshotView {
            db: &db,
            snap,
            applied,
        };
        Ok(f(&view))
    }

    /// Runs `f` with the RBAC index (refreshed) and a consistent snapshot.
    pub fn with_rbac<T>(
        &self,
        f: impl FnOnce(&RbacIndex, &SnapshotView<'_>) -> T,
    ) -> Result<T, StorageError> {
        {
            let dirty = self
                .shared
                .rbac
                .read()
                .map(|g| g.is_dirty())
                .unwrap_or(true);
            if dirty {
                self.rbac_write().refresh();
            }
        }
        let ix = self.shared.rbac.read().unwrap_or_else(|p| p.into_inner());
        self.read_view(|v| f(&ix, v))
    }

    fn db(&self) -> Arc<DB> {
        match self.shared.db.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Where the network layer writes an incoming snapshot before handing it to openraft.
    pub fn new_incoming_dir(&self) -> PathBuf {
        let n = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        self.shared
            .data_dir
            .join("snapshots")
            .join(format!("incoming-{}-{n}", std::process::id()))
    }

    /// The directory a received snapshot is renamed to once complete.
    pub fn received_dir(&self, index: u64) -> PathBuf {
        let n = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        self.shared
            .data_dir
            .join("snapshots")
            .join(format!("snap-{index:020}-r{n}"))
    }

    /// Index of the last applied entry (0 before any).
    pub fn applied_index(&self) -> u64 {
        *self.shared.applied_tx.borrow()
    }

    pub fn subscribe_applied(&self) -> watch::Receiver<u64> {
        self.shared.applied_tx.subscribe()
    }

    /// Waits until at least `index` is applied, or the timeout passes (returns the applied index).
    pub async fn wait_applied(&self, index: u64, timeout: std::time::Duration) -> Result<u64, u64> {
        let mut rx = self.subscribe_applied();
        let r = tokio::time::timeout(timeout, async {
            rx.wait_for(|a| *a >= index).await.map(|v| *v)
        })
        .await;
        match r {
            Ok(Ok(v)) => Ok(v),
            _ => Err(self.applied_index()),
        }
    }

    /// The value of `key` and the applied index it was read at, both from one RocksDB snapshot:
    /// the index published by [`Self::applied_index`] can trail the data by one batch, and a
    /// reply must never claim an index older than the value it carries.
    pub fn get(&self, key: &[u8]) -> Result<(Option<StoredValue>, u64), StorageError> {
        let db = self.db();
        let snap = db.snapshot();
        let applied = snapshot_applied(&snap)?;
        let value = match snap
            .get(keys::data(key))
            .map_err(StorageError::rocks("get"))?
        {
            None => None,
            Some(b) => Some(StoredValue {
                key: key.to_vec(),
                record: dec("value", &b)?,
            }),
        };
        Ok((value, applied))
    }

    /// Keys starting with `prefix`, strictly after `start_after` (if non-empty), at most `limit`;
    /// returns (values, more, applied index), all read from one RocksDB snapshot.
    pub fn range(
        &self,
        prefix: &[u8],
        start_after: &[u8],
        limit: usize,
    ) -> Result<(Vec<StoredValue>, bool, u64), StorageError> {
        let db = self.db();
        let snap = db.snapshot();
        let applied = snapshot_applied(&snap)?;
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snap);
        let upper =
            keys::prefix_end(&keys::data(prefix)).unwrap_or_else(|| vec![keys::SM_DATA + 1]);
        ro.set_iterate_upper_bound(upper);
        let start = if start_after.is_empty() || start_after < prefix {
            keys::data(prefix)
        } else {
            let mut s = keys::data(start_after);
            s.push(0); // strictly after
            s
        };
        let mut out = Vec::new();
        let mut more = false;
        for r in db.iterator_opt(IteratorMode::From(&start, Direction::Forward), ro) {
            let (k, v) = r.map_err(StorageError::rocks("range"))?;
            let Some(uk) = keys::user_key(&k) else { break };
            if out.len() >= limit {
                more = true;
                break;
            }
            out.push(StoredValue {
                key: uk.to_vec(),
                record: dec("value", &v)?,
            });
        }
        Ok((out, more, applied))
    }

    /// CRC32 over every key and value of the state machine, read from one consistent RocksDB
    /// snapshot, with the applied index it belongs to.
    pub fn state_hash(&self) -> Result<(u64, u32), StorageError> {
        let db = self.db();
        let snap = db.snapshot();
        let applied = snapshot_applied(&snap)?;
        Ok((applied, hash_iter(snap.iterator(IteratorMode::Start))?))
    }

    /// A consistent checkpoint for a backup, outside the snapshot rotation: its metadata, its
    /// directory (remove it with [`Self::remove_backup_checkpoint`] when streamed) and the state
    /// hash of its contents.
    pub fn backup_checkpoint(&self) -> Result<(SnapshotMeta, PathBuf, u32), StorageError> {
        let snaps = self.shared.data_dir.join("snapshots");
        let n = self.shared.snapshot_seq.fetch_add(1, Ordering::Relaxed);
        let dir = snaps.join(format!("backup-{}-{n}", std::process::id()));
        {
            let db = self.db();
            let cp = Checkpoint::new(&db).map_err(StorageError::rocks("checkpoint"))?;
            cp.create_checkpoint(&dir)
                .map_err(StorageError::rocks("create checkpoint"))?;
        }
        let (meta, hash) = checkpoint_meta_and_hash(&dir)?;
        Ok((meta, dir, hash))
    }

    pub fn remove_backup_checkpoint(&self, dir: &Path) {
        let snaps = self.shared.data_dir.join("snapshots");
        if dir.starts_with(&snaps) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// Creates the state machine of an empty `data_dir` from checkpoint files (a backup's base).
    /// Open it afterwards with [`Self::open`].
    pub fn seed_from_checkpoint(
        data_dir: &Path,
        files_dir: &Path,
        skip: &[&str],
    ) -> Result<(), StorageError> {
        let gen_dir = data_dir.join("sm-0");
        std::fs::create_dir_all(&gen_dir).map_err(StorageError::io("create", &gen_dir))?;
        let entries = std::fs::read_dir(files_dir).map_err(StorageError::io("read", files_dir))?;
        for e in entries {
            let e = e.map_err(StorageError::io("read", files_dir))?;
            let name = e.file_name();
            if name == SNAPSHOT_META_FILE || skip.iter().any(|n| name == *n) || !e.path().is_file()
            {
                continue;
            }
            let to = gen_dir.join(&name);
            std::fs::copy(e.path(), &to).map_err(StorageError::io("copy", &to))?;
            std::fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(StorageError::io("fsync", &to))?;
        }
        sync_dir(&gen_dir)?;
        write_current(data_dir, 0)?;
        Ok(())
    }

    /// Applies entries outside Raft (restore's replay of backed-up log records): the same apply
    /// code, so the resulting state equals a replica's at the same index.
    pub async fn apply_entries(
        &mut self,
        entries: Vec<crate::raft_types::Entry>,
    ) -> Result<(), StorageError> {
        let s = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
        self.apply(s).await.map_err(|e| StorageError::Io {
            op: "apply",
            path: self.shared.data_dir.clone(),
            source: e,
        })
    }

    /// Builds a snapshot now (so nodes joining a restored cluster can be sent one).
    pub async fn snapshot_now(&self) -> Result<SnapshotMeta, StorageError> {
        let _g = self.shared.snapshot_lock.lock().await;
        Ok(self.build_checkpoint()?.0)
    }

    /// Moves the recorded applied index forward to `to` without changing any data: a new
    /// lineage skips to its epoch's first index so revisions never go backwards for clients.
    pub fn rebase_applied(&self, to: LogId) -> Result<(), StorageError> {
        // Applies skip the WAL: make everything applied so far durable before moving the mark.
        self.db()
            .flush()
            .map_err(StorageError::rocks("flush state machine"))?;
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db()
            .put_opt(
                keys::SM_META_LAST_APPLIED,
                enc("last applied", &Some(to))?,
                &wo,
            )
            .map_err(StorageError::rocks("rebase applied"))?;
        self.shared.applied_tx.send_replace(to.index);
        Ok(())
    }

    /// The shared lineage cell (see [`Shared::lineage`]).
    pub fn lineage(&self) -> Arc<std::sync::RwLock<String>> {
        self.shared.lineage.clone()
    }

    fn set_lineage(&self, id: &str) {
        let mut g = match self.shared.lineage.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *g = id.to_string();
    }

    /// The cluster lineage id ("" before the first membership entry is applied).
    pub fn cluster_id(&self) -> Result<String, StorageError> {
        Ok(self
            .db()
            .get(keys::SM_META_CLUSTER_ID)
            .map_err(StorageError::rocks("get cluster id"))?
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default())
    }

    /// Starts a new lineage (restore, DR promotion): a fresh random cluster id, synced.
    pub fn new_lineage(&self, seed: &[u8]) -> Result<String, StorageError> {
        let mut material = seed.to_vec();
        material.extend_from_slice(&rand::random::<u64>().to_le_bytes());
        let id = fsm::lineage_id(&material);
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        self.db()
            .put_opt(keys::SM_META_CLUSTER_ID, id.as_bytes(), &wo)
            .map_err(StorageError::rocks("set cluster id"))?;
        self.set_lineage(&id);
        Ok(id)
    }

    pub fn last_applied(&self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        let db = self.db();
        Ok((read_last_applied(&db)?, Self::read_membership(&db)?))
    }

    /// Writes a raw key, bypassing apply: tests build data of earlier layouts with it.
    #[cfg(test)]
    pub(crate) fn put_raw_for_test(&mut self, key: &[u8], value: &[u8]) {
        self.db().put(key, value).expect("raw put");
        self.dedup_filter = None;
    }

    /// Reads a raw key (tests).
    #[cfg(test)]
    pub(crate) fn get_raw_for_test(&self, key: &[u8]) -> Option<Vec<u8>> {
        self.db().get(key).expect("raw get")
    }

    /// What the last apply call found of the first dedup layout (tests).
    #[cfg(test)]
    pub(crate) fn first_layout_dedup_left(&self) -> Option<bool> {
        self.legacy_dedup
    }

    fn read_membership(db: &DB) -> Result<StoredMembership, StorageError> {
        match db
            .get(keys::SM_META_MEMBERSHIP)
            .map_err(StorageError::rocks("get"))?
        {
            None => Ok(StoredMembership::default()),
            Some(b) => dec("membership", &b),
        }
    }
}

fn read_last_applied(db: &DB) -> Result<Option<LogId>, StorageError> {
    match db
        .get(keys::SM_META_LAST_APPLIED)
        .map_err(StorageError::rocks("get"))?
    {
        None => Ok(None),
        Some(b) => dec("last applied", &b),
    }
}

fn write_current(data_dir: &Path, gen: u64) -> Result<(), StorageError> {
    let tmp = data_dir.join(format!("{SM_CURRENT}.tmp"));
    write_file_synced(&tmp, gen.to_string().as_bytes())?;
    let dst = data_dir.join(SM_CURRENT);
    std::fs::rename(&tmp, &dst).map_err(StorageError::io("rename", &dst))?;
    sync_dir(data_dir)
}

pub(crate) fn write_file_synced(path: &Path, data: &[u8]) -> Result<(), StorageError> {
    use std::io::Write;
    let mut f = std::fs::File::create(path).map_err(StorageError::io("create", path))?;
    f.write_all(data).map_err(StorageError::io("write", path))?;
    f.sync_all().map_err(StorageError::io("fsync", path))
}

fn read_file(path: &Path) -> Result<Vec<u8>, StorageError> {
    std::fs::read(path).map_err(StorageError::io("read", path))
}

fn cleanup_dir(dir: &Path, pred: impl Fn(&str) -> bool) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if pred(&e.file_name().to_string_lossy()) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

fn list_snapshots(snaps: &Path) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Ok(rd) = std::fs::read_dir(snaps) {
        for e in rd.flatten() {
            if e.file_name().to_string_lossy().starts_with("snap-") {
                v.push(e.path());
            }
        }
    }
    v
}

impl RaftStateMachine<TypeConfig> for StateMachineStore {
    type SnapshotData = SnapshotDir;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), std::io::Error> {
        let db = self.db();
        Ok((read_last_applied(&db)?, Self::read_membership(&db)?))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), std::io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, std::io::Error>>
            + Unpin
            + OptionalSend,
    {
        let db = self.db();
        let mut staged = Staged::default();
        let mut pending = Vec::new();
        let mut last: Option<LogId> = None;
        let mut dedup = None;
        while let Some(item) = entries.next().await {
            let (entry, responder) = item?;
            let d = match dedup {
                Some(d) => d,
                None => {
                    let d = self.dedup_for(&db, entry.log_id.index)?;
                    dedup = Some(d);
                    d
                }
            };
            let resp = match self.apply_one(&db, &mut staged, &entry, d) {
                Ok(r) => r,
                Err(e) => {
                    tracing::error!(index = entry.log_id.index, error = %e, "apply failed; stopping");
                    // Nothing of this batch was written: forget what apply cached too.
                    self.recent.clear();
                    self.dedup_filter = None;
                    return Err(e.into());
                }
            };
            last = Some(entry.log_id);
            pending.push((responder, resp));
            if pending.len() >= MAX_APPLY_BATCH || staged.bytes >= MAX_APPLY_BATCH_BYTES {
                self.flush_apply(&db, &mut staged, &mut pending, last)?;
            }
        }
        self.flush_apply(&db, &mut staged, &mut pending, last)?;
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotDir,
    ) -> Result<(), std::io::Error> {
        let _g = self.shared.snapshot_lock.lock().await;
        let store = self.clone();
        let m = meta.clone();
        let dir = snapshot.path.clone();
        // The data is replaced: whatever the outcome, apply's cache no longer describes it.
        self.recent.clear();
        self.legacy_dedup = None;
        self.dedup_filter = None;
        tokio::task::spawn_blocking(move || store.install_dir(&m, &dir))
            .await
            .map_err(std::io::Error::other)??;
        self.set_current_snapshot(meta.clone(), snapshot.path);
        tracing::info!(index = ?meta.last_log_id.map(|l| l.index), "snapshot installed");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<
        Option<openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>>,
        std::io::Error,
    > {
        let cur = match self.shared.current_snapshot.lock() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        Ok(cur.map(|(meta, path)| openraft::Snapshot {
            meta,
            snapshot: SnapshotDir { path },
        }))
    }
}
