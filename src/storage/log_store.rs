//! The Raft log store on RocksDB with group commit.

use std::collections::VecDeque;
use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Instant;

use openraft::storage::{IOFlushed, LogState, RaftLogStorage};
use openraft::{OptionalSend, RaftLogReader};
use rocksdb::{Direction, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions, DB};

use super::{dec, enc, StorageError};
use crate::keys;
use crate::metrics::Metrics;
use crate::raft_types::{Entry, LogId, TypeConfig, Vote};

struct Inner {
    db: DB,
    /// The persisted vote, cached: openraft reads it twice per replication batch.
    vote: std::sync::Mutex<Option<Vote>>,
    flush_tx: std::sync::Mutex<mpsc::Sender<FlushMsg>>,
    /// Latest committed id handed to `save_committed` in this process (outer None: none yet);
    /// the flusher writes it once per round when `committed_dirty` is set.
    committed: std::sync::Mutex<Option<Option<LogId>>>,
    committed_dirty: std::sync::atomic::AtomicBool,
    /// The newest entries, decoded: replication and apply read what was just appended, and
    /// serving that from memory saves a RocksDB iterator and a decode per entry (11% of the
    /// leader's CPU under write load). Never the only copy: every entry is in RocksDB first.
    cache: std::sync::Mutex<EntryCache>,
}

/// Bounds of [`EntryCache`]: enough for several seconds of replication lag at full write rate,
/// small next to the memtables.
const CACHE_MAX_ENTRIES: usize = 16_384;
const CACHE_MAX_BYTES: usize = 32 << 20;

/// A contiguous run of the log's newest entries: when not empty, its last entry is the log's
/// last entry. Appends extend it, truncation cuts its tail, purge its head, and it sheds its
/// oldest entries to stay within bounds.
struct EntryCache {
    /// (entry, encoded size)
    entries: VecDeque<(Entry, usize)>,
    bytes: usize,
    max_entries: usize,
    max_bytes: usize,
}

impl Default for EntryCache {
    fn default() -> Self {
        EntryCache {
            entries: VecDeque::new(),
            bytes: 0,
            max_entries: CACHE_MAX_ENTRIES,
            max_bytes: CACHE_MAX_BYTES,
        }
    }
}

impl EntryCache {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|(e, _)| e.log_id.index)
    }

    fn push(&mut self, e: Entry, size: usize) {
        let idx = e.log_id.index;
        // An append always follows the log's last entry (openraft truncates first); anything
        // else means the cache no longer mirrors the tail, so start again from here.
        self.truncate_from(idx);
        if self
            .entries
            .back()
            .is_some_and(|(b, _)| b.log_id.index + 1 != idx)
        {
            self.clear();
        }
        self.entries.push_back((e, size));
        self.bytes += size;
        while self.entries.len() > self.max_entries || self.bytes > self.max_bytes {
            match self.entries.pop_front() {
                Some((_, n)) => self.bytes -= n,
                None => break,
            }
        }
    }

    /// Drops entries at `index` and after.
    fn truncate_from(&mut self, index: u64) {
        while let Some((e, n)) = self.entries.back() {
            if e.log_id.index < index {
                break;
            }
            self.bytes -= n;
            self.entries.pop_back();
        }
    }

    /// Drops entries up to and including `index`.
    fn purge_to(&mut self, index: u64) {
        while let Some((e, n)) = self.entries.front() {
            if e.log_id.index > index {
                break;
            }
            self.bytes -= n;
            self.entries.pop_front();
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.bytes = 0;
    }

    /// Entries in `[start, end)` when the cache holds `start` (it then holds everything after
    /// it that exists).
    fn read(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        if start < first {
            return None;
        }
        let skip = usize::try_from(start - first).ok()?;
        let take = usize::try_from(end.saturating_sub(start)).unwrap_or(usize::MAX);
        Some(
            self.entries
                .iter()
                .skip(skip)
                .take(take)
                .map(|(e, _)| e.clone())
                .collect(),
        )
    }
}

/// Cheap to clone: the log reader is a clone of the store.
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Inner>,
}

impl LogStore {
    pub fn open(path: &Path, metrics: Arc<Metrics>) -> Result<LogStore, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        // Big write buffer: the log is written sequentially and purged from the front.
        opts.set_write_buffer_size(64 << 20);
        let db = DB::open(&opts, path).map_err(StorageError::rocks("open log"))?;
        let vote: Option<Vote> = match db
            .get(keys::LOG_VOTE)
            .map_err(StorageError::rocks("get vote"))?
        {
            None => None,
            Some(b) => Some(dec("vote", &b)?),
        };
        let (tx, rx) = mpsc::channel::<FlushMsg>();
        let inner = Arc::new(Inner {
            db,
            vote: std::sync::Mutex::new(vote),
            committed: std::sync::Mutex::new(None),
            committed_dirty: std::sync::atomic::AtomicBool::new(false),
            flush_tx: std::sync::Mutex::new(tx),
            cache: std::sync::Mutex::new(EntryCache::default()),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name("log-flusher".into())
            .spawn(move || flusher(weak, rx, metrics))
            .map_err(StorageError::io("spawn flusher", path))?;
        Ok(LogStore { inner })
    }

    fn db(&self) -> &DB {
        &self.inner.db
    }

    /// True when this log has never been written: no vote, no entry, nothing purged. A node
    /// whose log is fresh has taken part in no election and holds no entry.
    pub fn is_fresh(&self) -> Result<bool, StorageError> {
        let voted = self
            .inner
            .vote
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        let purged: Option<LogId> = self.get_meta(keys::LOG_PURGED, "last purged")?;
        Ok(!voted && purged.is_none() && self.last_entry_log_id()?.is_none())
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
        what: &str,
    ) -> Result<Option<T>, StorageError> {
        match self.db().get(key).map_err(StorageError::rocks("get"))? {
            None => Ok(None),
            Some(b) => dec(what, &b).map(Some),
        }
    }

    fn last_entry_log_id(&self) -> Result<Option<LogId>, StorageError> {
        let end = [keys::LOG_ENTRY + 1];
        let mut it = self
            .db()
            .iterator(IteratorMode::From(&end, Direction::Reverse));
        match it.next() {
            None => Ok(None),
            Some(r) => {
                let (k, v) = r.map_err(StorageError::rocks("iterate log"))?;
                if keys::log_entry_index(&k).is_none() {
                    return Ok(None);
                }
                let e: Entry = dec("log entry", &v)?;
                Ok(Some(e.log_id))
            }
        }
    }

    /// Starts a new cluster lineage in an empty log directory: the log is purged up to `applied`
    /// (the state machine already holds it), `first` (a membership entry) follows it, and `vote`
    /// is saved. Used by restore and DR promotion. Everything is synced before it returns.
    pub fn bootstrap_lineage(
        path: &Path,
        applied: LogId,
        first: &Entry,
        vote: &Vote,
    ) -> Result<(), StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        let db = DB::open(&opts, path).map_err(StorageError::rocks("open log"))?;
        let mut batch = WriteBatch::default();
        batch.put(keys::LOG_PURGED, enc("last purged", &applied)?);
        batch.delete_range(&keys::log_entry(0)[..], &[keys::LOG_ENTRY + 1][..]);
        batch.put(
            keys::log_entry(first.log_id.index),
            enc("log entry", first)?,
        );
        batch.put(keys::LOG_VOTE, enc("vote", vote)?);
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(batch, &wo)
            .map_err(StorageError::rocks("bootstrap lineage"))?;
        Ok(())
    }

    /// The first index still in the log (entries before it were purged), if any entry exists.
    pub fn first_index(&self) -> Result<Option<u64>, StorageError> {
        let mut it = self
            .db()
            .iterator(IteratorMode::From(&keys::log_entry(0), Direction::Forward));
        match it.next() {
            None => Ok(None),
            Some(r) => {
                let (k, _) = r.map_err(StorageError::rocks("iterate log"))?;
                Ok(keys::log_entry_index(&k))
            }
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EntryCache> {
        // The cache holds no invariant a panic elsewhere could break half-way.
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn read_entries(&self, start: u64, end_exclusive: u64) -> Result<Vec<Entry>, StorageError> {
        if start >= end_exclusive {
            return Ok(Vec::new());
        }
        if let Some(hit) = self.cache().read(start, end_exclusive) {
            return Ok(hit);
        }
        self.read_entries_from_disk(start, end_exclusive)
    }

    fn read_entries_from_disk(
        &self,
        start: u64,
        end_exclusive: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(keys::log_entry(end_exclusive).to_vec());
        let from = keys::log_entry(start);
        for r in self
            .db()
            .iterator_opt(IteratorMode::From(&from, Direction::Forward), ro)
        {
            let (k, v) = r.map_err(StorageError::rocks("iterate log"))?;
            let Some(idx) = keys::log_entry_index(&k) else {
                break;
            };
            let e: Entry = dec(&format!("log entry {idx}"), &v)?;
            out.push(e);
        }
        Ok(out)
    }
}

enum FlushMsg {
    /// Entries were written: complete this callback after the next WAL fsync.
    Appended(IOFlushed<TypeConfig>),
    /// A new committed id is waiting in `Inner::committed`.
    Committed,
}

/// Group commit: one WAL fsync covers every append queued while the previous one ran. The
/// committed id is written here too, once per round instead of once per commit.
fn flusher(inner: std::sync::Weak<Inner>, rx: mpsc::Receiver<FlushMsg>, metrics: Arc<Metrics>) {
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut msgs = vec![first];
        while let Ok(more) = rx.try_recv() {
            msgs.push(more);
        }
        for m in msgs {
            if let FlushMsg::Appended(cb) = m {
                batch.push(cb);
            }
        }
        let Some(inner) = inner.upgrade() else { return };
        let committed = if inner
            .committed_dirty
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            inner.committed.lock().ok().and_then(|c| *c)
        } else {
            None
        };
        if let Some(c) = committed {
            match enc("committed", &c) {
                Ok(b) => {
                    if let Err(e) = inner.db.put(keys::LOG_COMMITTED, b) {
                        tracing::warn!(error = %e, "cannot save committed index");
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot encode committed index"),
            }
        }
        if batch.is_empty() {
            continue;
        }
        let t = Instant::now();
        let res = inner.db.flush_wal(true);
        metrics.observe_fsync(t.elapsed(), batch.len());
        drop(inner);
        match res {
            Ok(()) => batch.into_iter().for_each(|cb| cb.io_completed(Ok(()))),
            Err(e) => {
                tracing::error!(error = %e, "log fsync failed; this node can no longer acknowledge writes");
                for cb in batch {
                    cb.io_completed(Err(std::io::Error::other(format!("log fsync failed: {e}"))));
                }
            }
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, std::io::Error> {
        let start = match range.start_bound() {
            Bound::Included(x) => *x,
            Bound::Excluded(x) => x.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(x) => x.saturating_add(1),
            Bound::Excluded(x) => *x,
            Bound::Unbounded => u64::MAX,
        };
        Ok(self.read_entries(start, end)?)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, std::io::Error> {
        let v = self
            .inner
            .vote
            .lock()
            .map_err(|_| std::io::Error::other("vote lock poisoned"))?;
        Ok(*v)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, std::io::Error> {
        let last_purged: Option<LogId> = self.get_meta(keys::LOG_PURGED, "last purged")?;
        let last = self.last_entry_log_id()?.or(last_purged);
        Ok(LogState {
            last_purged_log_id: last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), std::io::Error> {
        let mut wo = WriteOptions::default();
        wo.set_sync(true);
        let b = enc("vote", vote)?;
        // Hold the cache lock across the write: readers never see a vote that is not yet durable.
        let mut cached = self
            .inner
            .vote
            .lock()
            .map_err(|_| std::io::Error::other("vote lock poisoned"))?;
        self.db()
            .put_opt(keys::LOG_VOTE, b, &wo)
            .map_err(StorageError::rocks("save vote"))?;
        *cached = Some(*vote);
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), std::io::Error> {
        // Written by the flusher, once per group-commit round, and never synced on its own: it
        // rides on the next WAL fsync. Losing it only makes a restarted node re-learn the commit
        // index from the leader (any older committed id is still a correct one).
        {
            let mut c = self
                .inner
                .committed
                .lock()
                .map_err(|_| std::io::Error::other("committed lock poisoned"))?;
            *c = Some(committed);
        }
        self.inner
            .committed_dirty
            .store(true, std::sync::atomic::Ordering::Release);
        let tx = self
            .inner
            .flush_tx
            .lock()
            .map_err(|_| std::io::Error::other("flusher lock poisoned"))?;
        tx.send(FlushMsg::Committed)
            .map_err(|_| std::io::Error::other("log flusher stopped"))?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, std::io::Error> {
        if let Some(c) = *self
            .inner
            .committed
            .lock()
            .map_err(|_| std::io::Error::other("committed lock poisoned"))?
        {
            return Ok(c);
        }
        let c: Option<Option<LogId>> = self.get_meta(keys::LOG_COMMITTED, "committed")?;
        Ok(c.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), std::io::Error>
    where
        I: IntoIterator<Item = Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut encoded = Vec::new();
        let mut bytes = 64;
        for e in entries {
            let b = enc("log entry", &e)?;
            bytes += b.len() + 32;
            encoded.push((e, b));
        }
        // Sized once: grown from empty, its buffer was copied several times per append.
        let mut batch = WriteBatch::with_capacity_bytes(bytes);
        let mut appended = Vec::with_capacity(encoded.len());
        for (e, b) in encoded {
            batch.put(keys::log_entry(e.log_id.index), &b);
            appended.push((e, b.len()));
        }
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("append"))?;
        {
            let mut cache = self.cache();
            for (e, n) in appended {
                cache.push(e, n);
            }
        }
        let tx = self
            .inner
            .flush_tx
            .lock()
            .map_err(|_| std::io::Error::other("flusher lock poisoned"))?;
        tx.send(FlushMsg::Appended(callback))
            .map_err(|_| std::io::Error::other("log flusher stopped"))?;
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), std::io::Error> {
        let from = last_log_id.map(|l| l.index + 1).unwrap_or(0);
        let mut batch = WriteBatch::default();
        batch.delete_range(&keys::log_entry(from)[..], &[keys::LOG_ENTRY + 1][..]);
        // Cut the cache before the disk: a reader never gets an entry the log no longer has.
        self.cache().truncate_from(from);
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("truncate"))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let mut batch = WriteBatch::default();
        batch.put(keys::LOG_PURGED, enc("last purged", &log_id)?);
        batch.delete_range(keys::log_entry(0), keys::log_entry(log_id.index + 1));
        self.cache().purge_to(log_id.index);
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("purge"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use openraft::storage::RaftLogStorageExt;
    use proptest::prelude::*;

    use super::*;

    fn entry(term: u64, index: u64) -> Entry {
        openraft::Entry {
            log_id: openraft::LogId::new(
                openraft::impls::leader_id_adv::LeaderId { term, node_id: 1 },
                index,
            ),
            payload: openraft::EntryPayload::Normal(std::sync::Arc::new(crate::fsm::Request::new(
                "",
                crate::fsm::Command::Put {
                    key: format!("k{index}").into_bytes(),
                    value: vec![b'v'; (index % 7) as usize * 10],
                    expected_revision: None,
                },
            ))),
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Append(u64),
        Truncate(u64),
        Purge(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1u64..20).prop_map(Op::Append),
            1 => (0u64..40).prop_map(Op::Truncate),
            1 => (0u64..40).prop_map(Op::Purge),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Whatever the sequence of appends, truncations and purges, and however small the
        /// cache, every range read answers exactly what the log on disk holds.
        #[test]
        fn cached_reads_equal_disk_reads(ops in proptest::collection::vec(op(), 1..30), max_entries in 1usize..12) {
            let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
            let dir = tempfile::tempdir().expect("tmp");
            let mut log = LogStore::open(&dir.path().join("log"), Arc::new(Metrics::default())).expect("open");
            {
                let mut c = log.cache();
                c.max_entries = max_entries;
                c.max_bytes = 2_000;
            }
            let (mut first, mut last, mut term) = (1u64, 0u64, 1u64);
            for op in ops {
                rt.block_on(async {
                    match op {
                        Op::Append(n) => {
                            let es: Vec<Entry> = (last + 1..=last + n).map(|i| entry(term, i)).collect();
                            log.blocking_append(es).await.expect("append");
                            last += n;
                        }
                        Op::Truncate(at) if at >= first && at <= last => {
                            let keep = (at > first).then(|| entry(term, at - 1).log_id);
                            log.truncate_after(keep).await.expect("truncate");
                            last = at.saturating_sub(1);
                            // Entries after a truncation come from a newer leader.
                            term += 1;
                        }
                        Op::Purge(to) if to >= first && to <= last => {
                            log.purge(entry(term, to).log_id).await.expect("purge");
                            first = to + 1;
                        }
                        _ => {}
                    }
                });
                for start in first..=last + 1 {
                    for end in start..=last + 2 {
                        let got = log.read_entries(start, end).expect("read");
                        let disk = log.read_entries_from_disk(start, end).expect("disk");
                        prop_assert_eq!(&got, &disk, "range [{}, {})", start, end);
                    }
                }
            }
        }
    }
}
