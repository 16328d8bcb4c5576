//! Applying committed entries: one RocksDB batch per apply call, read through by later entries
//! of the same batch; what the batch wrote is cached for the next ones.

use std::borrow::Cow;
use std::collections::BTreeMap;

use crate::fsm::meta::rbac::{self, RbacIndex};
use openraft::EntryPayload;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch, DB};

use super::*;
use crate::fsm::{self, FsmError, Mutation, Payload, Response, StateRead};
use crate::keys;
use crate::raft_types::{LogId, StoredMembership, TypeConfig};
use crate::storage::dedup_filter::DedupFilter;
use crate::storage::{enc, StorageError};

/// Most entries (and bytes) written to the state machine in one RocksDB batch.
pub(super) const MAX_APPLY_BATCH: usize = 512;
pub(super) const MAX_APPLY_BATCH_BYTES: usize = 8 << 20;

/// A WriteBatch's bytes per record beside its key and value: a type byte and two varint
/// lengths (at most 11), rounded up.
pub(super) const BATCH_RECORD_OVERHEAD: usize = 12;

/// Bound of [`RecentValues`]: it is emptied when its keys and values pass this size.
pub(super) const RECENT_MAX_BYTES: usize = 64 << 20;

/// The key/value records (`keys::data`) written by the last apply batches, exactly as they are
/// in RocksDB (`None`: deleted). Every put reads the key's previous record (create revision,
/// version); for keys written recently this answers without a RocksDB lookup, which was about
/// 9% of a node's CPU under write load. Filled only after a batch is written, emptied when a
/// snapshot replaces the data and when it outgrows its bound, so it never disagrees with the
/// database.
#[derive(Default)]
pub(super) struct RecentValues {
    map: std::collections::HashMap<Vec<u8>, Option<Vec<u8>>>,
    bytes: usize,
}

impl RecentValues {
    pub(super) fn get(&self, key: &[u8]) -> Option<&Option<Vec<u8>>> {
        self.map.get(key)
    }

    /// Takes the key/value records of a batch that was just written.
    pub(super) fn absorb(&mut self, written: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>) {
        for (k, v) in std::mem::take(written) {
            if k.first() != Some(&keys::SM_DATA) {
                continue;
            }
            let (klen, vlen) = (k.len(), v.as_ref().map_or(0, Vec::len));
            match self.map.insert(k, v) {
                Some(old) => self.bytes = self.bytes - old.map_or(0, |o| o.len()) + vlen,
                None => self.bytes += klen + vlen,
            }
        }
        if self.bytes > RECENT_MAX_BYTES {
            self.clear();
        }
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.bytes = 0;
    }
}

impl StateMachineStore {
    /// How this apply call remembers request ids, from `index` (its first entry) on. Checks for
    /// first-layout records while any may be left: one bounded seek per apply call, from the
    /// oldest queue key that can still be live (older ones were expired on time).
    pub(super) fn dedup_for(&mut self, db: &DB, index: u64) -> Result<fsm::Dedup, StorageError> {
        let window = self.shared.dedup_window;
        let legacy = match self.legacy_dedup {
            Some(false) => false,
            _ => {
                let mut ro = ReadOptions::default();
                ro.set_iterate_upper_bound(vec![keys::SM_DEDUP_QUEUE + 1]);
                let from = keys::dedup_queue(index.saturating_sub(window));
                let left = match db
                    .iterator_opt(IteratorMode::From(&from, Direction::Forward), ro)
                    .next()
                {
                    None => false,
                    Some(Ok(_)) => true,
                    Some(Err(e)) => return Err(StorageError::rocks("seek dedup queue")(e)),
                };
                self.legacy_dedup = Some(left);
                left
            }
        };
        if self.dedup_filter.is_none() {
            self.dedup_filter = Some(build_dedup_filter(db, window)?);
        }
        Ok(fsm::Dedup { window, legacy })
    }

    /// Applies one entry into `staged`: later entries of the same batch read its mutations there,
    /// and [`Self::flush_apply`] writes them. Returns the entry's response.
    pub(super) fn apply_one(
        &self,
        db: &DB,
        staged: &mut Staged,
        entry: &crate::raft_types::Entry,
        dedup: fsm::Dedup,
    ) -> Result<Response, StorageError> {
        let index = entry.log_id.index;
        let mut stage = StagedState {
            db,
            staged,
            recent: &self.recent,
            dedup_filter: self.dedup_filter.as_ref(),
        };
        let applied = match &entry.payload {
            EntryPayload::Blank => fsm::apply_entry::<()>(&mut stage, index, Payload::Blank, dedup),
            EntryPayload::Normal(req) => {
                fsm::apply_entry::<()>(&mut stage, index, Payload::Normal(req), dedup)
            }
            EntryPayload::Membership(m) => {
                let sm = StoredMembership::new(Some(entry.log_id), m.clone());
                fsm::apply_entry(&mut stage, index, Payload::Membership(&sm), dedup)
            }
        }
        .map_err(|e| match e {
            FsmError::UnsupportedFormat {
                index,
                version,
                supported,
            } => StorageError::UnsupportedFormat {
                index,
                version,
                supported,
            },
            e => StorageError::Fsm(e),
        })?;
        if let Some(id) = &applied.cluster_id {
            self.set_lineage(id);
        }
        Ok(applied.response)
    }

    /// Writes the pending batch, then answers its clients and publishes the applied index.
    pub(super) fn flush_apply(
        &mut self,
        db: &DB,
        staged: &mut Staged,
        pending: &mut Vec<(
            Option<openraft::storage::ApplyResponder<TypeConfig>>,
            Response,
        )>,
        last: Option<LogId>,
    ) -> Result<(), StorageError> {
        let Some(last) = last else { return Ok(()) };
        if pending.is_empty() {
            return Ok(());
        }
        self.write_batch(db, staged, last)?;
        // At once: the records are in the database now, whatever fails below.
        if let Some(f) = self.dedup_filter.as_mut() {
            for (start, end) in &staged.ranges {
                f.remove_range(start, end);
            }
            for (k, v) in &staged.writes {
                if v.is_some() {
                    f.insert(k);
                }
            }
        }
        rbac::observe_batch(&self.shared.rbac, &staged.writes)?;
        self.recent.absorb(&mut staged.writes);
        staged.ranges.clear();
        staged.bytes = 0;
        for (responder, resp) in pending.drain(..) {
            if let Some(r) = responder {
                r.send(resp);
            }
        }
        self.shared.applied_tx.send_replace(last.index);
        Ok(())
    }

    /// Writes one apply batch. No WAL: the Raft log is the durable record. After a crash the state
    /// machine reopens at its last memtable flush (a consistent batch boundary, never older than
    /// the last snapshot, whose checkpoint flushed it) and openraft re-applies the log after it.
    ///
    /// Keys go in in order, each once: RocksDB then finds each memtable position by walking on from
    /// the previous one instead of searching the skip list from the top (its inserts were about 7%
    /// of a 3-node cluster's CPU under write load).
    pub(super) fn write_batch(
        &self,
        db: &DB,
        staged: &Staged,
        last: LogId,
    ) -> Result<(), StorageError> {
        // Sized once: grown from empty, its buffer was copied about eight times per batch.
        let records = staged.writes.len() + staged.ranges.len() + 1;
        let mut batch =
            WriteBatch::with_capacity_bytes(staged.bytes + records * BATCH_RECORD_OVERHEAD + 64);
        // Range deletes first: a key written after one in the same batch is in `writes` (and one
        // written before it was dropped from there), so this order is the entries' order.
        for (start, end) in &staged.ranges {
            batch.delete_range(start, end);
        }
        for (k, v) in &staged.writes {
            match v {
                Some(v) => batch.put(k, v),
                None => batch.delete(k),
            }
        }
        batch.put(
            keys::SM_META_LAST_APPLIED,
            enc("last applied", &Some(last))?,
        );
        let mut wo = rocksdb::WriteOptions::default();
        wo.disable_wal(true);
        db.write_opt(batch, &wo)
            .map_err(StorageError::rocks("apply"))
    }
}

/// The unwritten mutations of the current apply batch, by key (`None`: deleted); the last
/// mutation of a key wins, as it would in a RocksDB batch.
#[derive(Default)]
pub(super) struct Staged {
    pub(super) writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// `[start, end)` range deletes of this batch, written before `writes`.
    pub(super) ranges: Vec<(Vec<u8>, Vec<u8>)>,
    /// Bytes of keys and values staged (bounds the batch).
    pub(super) bytes: usize,
}

impl Staged {
    pub(super) fn add(&mut self, muts: Vec<Mutation>) {
        for m in muts {
            let (k, v) = match m {
                Mutation::Put(k, v) => (k, Some(v)),
                Mutation::Delete(k) => (k, None),
                Mutation::DeleteRange(start, end) => {
                    // What this batch wrote in the range goes too (once per window: rare).
                    self.writes.retain(|k, _| k < &start || k >= &end);
                    self.bytes += start.len() + end.len();
                    self.ranges.push((start, end));
                    continue;
                }
            };
            self.bytes += k.len() + v.as_ref().map_or(0, Vec::len);
            self.writes.insert(k, v);
        }
    }
}

/// The state as of the previous entry: the DB plus the unwritten mutations of the current batch.
/// It must read exactly what sequential per-entry writes would, whatever the batch boundaries.
pub(super) struct DbState<'a> {
    db: &'a DB,
    overlay: &'a BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Range deletes of the batch (only dedup buckets, which nothing scans: see
    /// [`Mutation::DeleteRange`]); point reads honour them.
    deleted: &'a [(Vec<u8>, Vec<u8>)],
    /// Records written by earlier batches, when the caller is apply.
    recent: Option<&'a RecentValues>,
    /// Which request-id records exist, when the caller is apply.
    dedup_filter: Option<&'a DedupFilter>,
}

impl StateRead for DbState<'_> {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        Ok(self.get_raw_ref(key)?.map(Cow::into_owned))
    }

    fn get_raw_ref(&self, key: &[u8]) -> Result<Option<Cow<'_, [u8]>>, FsmError> {
        if let Some(v) = self.overlay.get(key) {
            return Ok(v.as_deref().map(Cow::Borrowed));
        }
        if self
            .deleted
            .iter()
            .any(|(start, end)| start.as_slice() <= key && key < end.as_slice())
        {
            return Ok(None);
        }
        if let Some(v) = self.recent.and_then(|r| r.get(key)) {
            return Ok(v.as_deref().map(Cow::Borrowed));
        }
        if self.dedup_filter.is_some_and(|f| !f.may_contain(key)) {
            return Ok(None);
        }
        self.db
            .get(key)
            .map(|v| v.map(Cow::Owned))
            .map_err(|e| FsmError::Read(e.to_string()))
    }

    fn scan(
        &self,
        start: &[u8],
        end: &[u8],
        limit: usize,
    ) -> Result<crate::fsm::KvPairs, FsmError> {
        fsm::scan_with_overlay(self.overlay, start, end, limit, |n| {
            scan_db(self.db, None, start, end, n)
        })
    }
}

/// The batch being applied, as the state machine stages into it and reads through it.
pub(super) struct StagedState<'a> {
    db: &'a DB,
    staged: &'a mut Staged,
    recent: &'a RecentValues,
    dedup_filter: Option<&'a DedupFilter>,
}

impl fsm::Staging for StagedState<'_> {
    fn state(&self) -> impl StateRead + '_ {
        DbState {
            db: self.db,
            overlay: &self.staged.writes,
            deleted: &self.staged.ranges,
            recent: Some(self.recent),
            dedup_filter: self.dedup_filter,
        }
    }

    fn stage(&mut self, mutations: Vec<Mutation>) {
        self.staged.add(mutations);
    }
}

/// A filter holding every request-id record `db` has (one key scan of the live buckets).
pub(super) fn build_dedup_filter(db: &DB, window: u64) -> Result<DedupFilter, StorageError> {
    let mut f = DedupFilter::new(window);
    let mut ro = ReadOptions::default();
    ro.set_iterate_upper_bound(vec![keys::SM_DEDUP_BUCKET + 1]);
    let mut it = db.raw_iterator_opt(ro);
    it.seek([keys::SM_DEDUP_BUCKET]);
    while let Some(k) = it.key() {
        f.insert(k);
        it.next();
    }
    it.status()
        .map_err(StorageError::rocks("scan request-id records"))?;
    Ok(f)
}

/// The permission index as the database `db` holds it (at open and after a snapshot install).
pub(super) fn load_rbac(db: &DB) -> Result<RbacIndex, StorageError> {
    Ok(RbacIndex::load(&DbState {
        db,
        overlay: &BTreeMap::new(),
        deleted: &[],
        recent: None,
        dedup_filter: None,
    })?)
}
