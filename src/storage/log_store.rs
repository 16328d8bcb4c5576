//! The Raft log store on RocksDB with group commit.

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

    pub fn read_entries(&self, start: u64, end_exclusive: u64) -> Result<Vec<Entry>, StorageError> {
        let mut out = Vec::new();
        if start >= end_exclusive {
            return Ok(out);
        }
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
        let mut batch = WriteBatch::default();
        for e in entries {
            batch.put(keys::log_entry(e.log_id.index), enc("log entry", &e)?);
        }
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("append"))?;
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
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("truncate"))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), std::io::Error> {
        let mut batch = WriteBatch::default();
        batch.put(keys::LOG_PURGED, enc("last purged", &log_id)?);
        batch.delete_range(keys::log_entry(0), keys::log_entry(log_id.index + 1));
        self.db()
            .write(batch)
            .map_err(StorageError::rocks("purge"))?;
        Ok(())
    }
}
