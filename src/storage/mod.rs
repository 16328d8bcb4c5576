//! Storage: the only module that names RocksDB.
//!
//! - [`LogStore`]: the Raft log, vote and committed index in `<data>/log`, with group commit: appends
//!   are written unsynced and a flusher thread makes one WAL fsync cover every append that arrived
//!   while the previous fsync ran; openraft hears "flushed" only after that fsync.
//! - [`StateMachineStore`]: the applied state in `<data>/sm-<generation>`; snapshots are RocksDB
//!   checkpoints under `<data>/snapshots/`, installed by opening a new generation.
//!
//! Key layouts live in [`crate::keys`].

mod dedup_filter;
mod lineage;
mod log_store;
mod sm_store;

use std::path::PathBuf;

pub use lineage::{next_epoch_start, start_new_lineage, NewLineage, EPOCH_BITS};
pub use log_store::LogStore;
pub use sm_store::{
    checkpoint_meta_and_hash, SnapshotDir, SnapshotView, StateMachineStore, StoredValue,
    SNAPSHOT_META_FILE,
};

/// Storage-layer errors. They carry what failed and where.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb {op} failed: {source}")]
    Rocks {
        op: &'static str,
        source: rocksdb::Error,
    },
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode {what}: {reason}")]
    Decode { what: String, reason: String },
    #[error("cannot encode {what}: {reason}")]
    Encode { what: &'static str, reason: String },
    #[error("log entry {index} has format version {version}, newer than this binary supports ({supported}); upgrade this node")]
    UnsupportedFormat {
        index: u64,
        version: u8,
        supported: u8,
    },
    #[error("state machine: {0}")]
    Fsm(#[from] crate::fsm::FsmError),
    #[error("snapshot {path}: {reason}")]
    Snapshot { path: PathBuf, reason: String },
    #[error("cannot start a new lineage: {0}")]
    Lineage(String),
}

impl StorageError {
    fn rocks(op: &'static str) -> impl FnOnce(rocksdb::Error) -> StorageError {
        move |source| StorageError::Rocks { op, source }
    }
    fn io(
        op: &'static str,
        path: impl Into<PathBuf>,
    ) -> impl FnOnce(std::io::Error) -> StorageError {
        let path = path.into();
        move |source| StorageError::Io { op, path, source }
    }
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        std::io::Error::other(e.to_string())
    }
}

pub(crate) fn enc<T: serde::Serialize>(what: &'static str, v: &T) -> Result<Vec<u8>, StorageError> {
    crate::codec::encode(v).map_err(|e| StorageError::Encode {
        what,
        reason: e.to_string(),
    })
}

pub(crate) fn dec<T: serde::de::DeserializeOwned>(what: &str, b: &[u8]) -> Result<T, StorageError> {
    crate::codec::decode(b).map_err(|e| StorageError::Decode {
        what: what.to_string(),
        reason: e.to_string(),
    })
}

/// fsync a directory so renames and creations inside it are durable.
pub fn sync_dir(path: &std::path::Path) -> Result<(), StorageError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(StorageError::io("fsync dir", path))
}

#[cfg(test)]
mod tests;
