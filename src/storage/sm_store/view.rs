//! Consistent read views over one RocksDB snapshot.

use rocksdb::{Direction, IteratorMode, ReadOptions, DB};

use crate::fsm::{FsmError, StateRead};
use crate::keys;
use crate::raft_types::LogId;
use crate::storage::{dec, StorageError};

/// A consistent read view: one RocksDB snapshot, with the applied index it holds.
pub struct SnapshotView<'a> {
    pub(super) db: &'a DB,
    pub(super) snap: rocksdb::Snapshot<'a>,
    pub applied: u64,
}

impl StateRead for SnapshotView<'_> {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        self.snap
            .get(key)
            .map_err(|e| FsmError::Read(e.to_string()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::fsm::KvPairs, FsmError> {
        scan_db(self.db, Some(&self.snap), start, end, limit)
    }
}

pub(super) fn scan_db(
    db: &DB,
    snap: Option<&rocksdb::Snapshot<'_>>,
    start: &[u8],
    end: &[u8],
    limit: usize,
) -> Result<crate::fsm::KvPairs, FsmError> {
    let mut out = Vec::new();
    if limit == 0 || start >= end {
        return Ok(out);
    }
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(end.to_vec());
    if let Some(s) = snap {
        ro.set_snapshot(s);
    }
    for r in db.iterator_opt(IteratorMode::From(start, Direction::Forward), ro) {
        let (k, v) = r.map_err(|e| FsmError::Read(e.to_string()))?;
        out.push((k.to_vec(), v.to_vec()));
        if out.len() >= limit {
            break;
        }
    }
    Ok(out)
}

/// The applied index recorded in a snapshot (0 before any entry).
pub(super) fn snapshot_applied(snap: &rocksdb::Snapshot<'_>) -> Result<u64, StorageError> {
    match snap
        .get(keys::SM_META_LAST_APPLIED)
        .map_err(StorageError::rocks("get"))?
    {
        None => Ok(0),
        Some(b) => Ok(dec::<Option<LogId>>("last applied", &b)?
            .map(|l| l.index)
            .unwrap_or(0)),
    }
}
