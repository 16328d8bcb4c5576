//! Backup files on disk: base backups (checkpoint files + a checksummed manifest), log segments
//! (checksummed records of committed entries), verification, listing, and restore.
//!
//! Layout of a backup directory:
//!
//! ```text
//! DIR/base-<applied index, 20 digits>/manifest.json   what the base holds, CRC32 per 1 MiB chunk
//! DIR/base-<index>/<checkpoint files>                 RocksDB checkpoint of the state machine
//! DIR/segments/seg-<first index, 20 digits>.log       committed log entries from that index on
//! ```
//!
//! This module knows nothing of gRPC: the CLI feeds it what the `Backup` service streams.

pub mod base;
pub mod restore;
pub mod segment;

use std::path::{Path, PathBuf};

pub use base::{BaseManifest, BaseWriter};
pub use segment::{SegmentRecord, SegmentWriter};

/// Format version of manifests and segment headers written by this code.
pub const BACKUP_FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: damaged at byte offset {offset}: {what}")]
    Damaged {
        path: PathBuf,
        offset: u64,
        what: String,
    },
    #[error("{path}: {what}")]
    Invalid { path: PathBuf, what: String },
    #[error("backup chain broken: {0}")]
    Chain(String),
    #[error("{0}")]
    Refused(String),
    #[error("stream from the node: {0}")]
    Stream(String),
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl BackupError {
    pub fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BackupError {
        let path = path.to_path_buf();
        move |source| BackupError::Io { op, path, source }
    }
}

pub fn segments_dir(dir: &Path) -> PathBuf {
    dir.join("segments")
}

pub fn base_dir(dir: &Path, index: u64) -> PathBuf {
    dir.join(format!("base-{index:020}"))
}

/// Parses `<prefix><20 digits><suffix>` file names.
fn index_in_name(name: &str, prefix: &str, suffix: &str) -> Option<u64> {
    let mid = name.strip_prefix(prefix)?.strip_suffix(suffix)?;
    if mid.len() != 20 || !mid.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    mid.parse().ok()
}

/// Base backups present in `dir`, oldest first: (index, directory).
pub fn list_bases(dir: &Path) -> Result<Vec<(u64, PathBuf)>, BackupError> {
    let mut out = Vec::new();
    let rd = match std::fs::read_dir(dir) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(BackupError::io("read", dir)(e)),
    };
    for e in rd {
        let e = e.map_err(BackupError::io("read", dir))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(i) = index_in_name(&name, "base-", "") {
            out.push((i, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// What a backup directory can restore.
#[derive(Debug, serde::Serialize)]
pub struct Catalog {
    pub cluster_id: String,
    pub bases: Vec<BaseSummary>,
    pub segments: Vec<segment::SegmentInfo>,
    /// Contiguous restorable index ranges: from a base's index to the end of the segments that
    /// follow it without a gap.
    pub restorable: Vec<Restorable>,
}

#[derive(Debug, serde::Serialize)]
pub struct BaseSummary {
    pub index: u64,
    pub term: u64,
    pub created_unix_ms: u64,
    pub bytes: u64,
    pub state_hash: u32,
    pub path: PathBuf,
}

#[derive(Debug, serde::Serialize, Clone, Copy)]
pub struct Restorable {
    pub base_index: u64,
    pub from_index: u64,
    pub to_index: u64,
    pub from_unix_ms: u64,
    pub to_unix_ms: u64,
}

/// Reads and checks everything in `dir`: every base (manifest checksum, every chunk and file
/// CRC, the whole digest), every segment record, the chain of segments and the cluster ids.
/// `deep = false` skips re-reading base data files (manifests and segments are still checked).
pub fn verify(dir: &Path, deep: bool) -> Result<Catalog, BackupError> {
    if !dir.is_dir() {
        return Err(BackupError::Invalid {
            path: dir.to_path_buf(),
            what: "not a backup directory".into(),
        });
    }
    let mut bases = Vec::new();
    let mut cluster_id = String::new();
    for (index, path) in list_bases(dir)? {
        let m = BaseManifest::read(&path)?;
        if m.applied_index != index {
            return Err(BackupError::Invalid {
                path: path.clone(),
                what: format!(
                    "directory name says index {index}, manifest says {}",
                    m.applied_index
                ),
            });
        }
        if deep {
            m.verify_files(&path)?;
        }
        if cluster_id.is_empty() {
            cluster_id = m.cluster_id.clone();
        } else if m.cluster_id != cluster_id {
            return Err(BackupError::Chain(format!(
                "{} belongs to cluster {}, earlier bases to {cluster_id}",
                path.display(),
                m.cluster_id
            )));
        }
        bases.push(BaseSummary {
            index,
            term: m.applied_term,
            created_unix_ms: m.created_unix_ms,
            bytes: m.files.iter().map(|f| f.size).sum(),
            state_hash: m.state_hash,
            path,
        });
    }
    let segments = segment::scan_all(&segments_dir(dir), &cluster_id, false)?;
    let base_idx: Vec<u64> = bases.iter().map(|b| b.index).collect();
    segment::check_chain(&segments, &base_idx)?;
    if cluster_id.is_empty() && bases.is_empty() && segments.is_empty() {
        return Err(BackupError::Invalid {
            path: dir.to_path_buf(),
            what: "no base backup and no segments here".into(),
        });
    }
    let mut restorable = Vec::new();
    for b in &bases {
        let mut to = b.index;
        let mut to_ms = b.created_unix_ms;
        for s in &segments {
            if s.first <= to + 1 && s.last > to {
                to = s.last;
                to_ms = s.last_unix_ms;
            }
        }
        restorable.push(Restorable {
            base_index: b.index,
            from_index: b.index,
            to_index: to,
            from_unix_ms: b.created_unix_ms,
            to_unix_ms: to_ms,
        });
    }
    Ok(Catalog {
        cluster_id,
        bases,
        segments,
        restorable,
    })
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Fsyncs a directory so renames and new files in it are durable.
pub fn sync_dir(path: &Path) -> Result<(), BackupError> {
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(BackupError::io("fsync", path))
}

/// Prunes old bases beyond the newest `keep`, and segments wholly before the oldest kept base.
/// Returns what was removed.
pub fn prune(dir: &Path, keep: usize) -> Result<Vec<PathBuf>, BackupError> {
    let mut removed = Vec::new();
    let bases = list_bases(dir)?;
    if keep == 0 || bases.len() <= keep {
        return Ok(removed);
    }
    let (old, kept) = bases.split_at(bases.len() - keep);
    let oldest_kept = kept[0].0;
    for (_, p) in old {
        std::fs::remove_dir_all(p).map_err(BackupError::io("remove", p))?;
        removed.push(p.clone());
    }
    for s in segment::scan_all(&segments_dir(dir), "", true)? {
        if s.last < oldest_kept {
            std::fs::remove_file(&s.path).map_err(BackupError::io("remove", &s.path))?;
            removed.push(s.path);
        }
    }
    Ok(removed)
}
