//! Base backups: the files of a state-machine checkpoint plus `manifest.json`, which records a
//! CRC32 per 1 MiB chunk of every file, each file's CRC32, a CRC32 digest of all data in order,
//! the applied index and term, the membership, the cluster id, the state hash and the time. The
//! manifest carries its own checksum.

use crate::checkpoint_files::{publish, read_full, safe_name, ChunkError, IncomingFile};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{now_unix_ms, BackupError, BACKUP_FORMAT_VERSION};

pub const MANIFEST: &str = "manifest.json";
pub const CHUNK: u64 = 1 << 20;

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct FileManifest {
    pub name: String,
    pub size: u64,
    pub crc32: u32,
    /// CRC32 of each `chunk_size` piece, in order.
    pub chunk_crc32: Vec<u32>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct BaseManifest {
    pub format_version: u32,
    pub cluster_id: String,
    /// The node the checkpoint was taken on.
    pub node_id: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    pub membership: serde_json::Value,
    /// State hash of the checkpoint (equal to `cluster status --hash` of a replica at that index).
    pub state_hash: u32,
    pub created_unix_ms: u64,
    pub chunk_size: u64,
    pub files: Vec<FileManifest>,
    /// CRC32 over every file's bytes, files in manifest order.
    pub digest_crc32: u32,
    /// openraft snapshot metadata (bincode, hex).
    pub snapshot_meta_hex: String,
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    manifest: BaseManifest,
    /// CRC32 of the JSON encoding of `manifest`.
    manifest_crc32: u32,
}

/// What the node says a base holds, before any file data arrives.
#[derive(Clone, Debug)]
pub struct BaseHeader {
    pub cluster_id: String,
    pub node_id: u64,
    pub applied_index: u64,
    pub applied_term: u64,
    pub membership_json: String,
    pub state_hash: u32,
    pub snapshot_meta: Vec<u8>,
    /// (name, size, crc32) in stream order.
    pub files: Vec<(String, u64, u32)>,
}

impl BaseManifest {
    pub fn read(base: &Path) -> Result<BaseManifest, BackupError> {
        let p = base.join(MANIFEST);
        let bytes = std::fs::read(&p).map_err(BackupError::io("read", &p))?;
        let env: Envelope = serde_json::from_slice(&bytes).map_err(|e| BackupError::Damaged {
            path: p.clone(),
            offset: e.column() as u64,
            what: format!("not a manifest: {e}"),
        })?;
        let body = serde_json::to_vec(&env.manifest).map_err(|e| BackupError::Invalid {
            path: p.clone(),
            what: e.to_string(),
        })?;
        if crc32fast::hash(&body) != env.manifest_crc32 {
            return Err(BackupError::Damaged {
                path: p,
                offset: 0,
                what: "manifest checksum mismatch".into(),
            });
        }
        if env.manifest.format_version > BACKUP_FORMAT_VERSION {
            return Err(BackupError::Invalid {
                path: p,
                what: format!(
                    "written by a newer metaraft (format {}, this one reads up to {})",
                    env.manifest.format_version, BACKUP_FORMAT_VERSION
                ),
            });
        }
        Ok(env.manifest)
    }

    fn write(&self, base: &Path) -> Result<(), BackupError> {
        let body = serde_json::to_vec(self).map_err(|e| BackupError::Invalid {
            path: base.to_path_buf(),
            what: e.to_string(),
        })?;
        let env = Envelope {
            manifest: self.clone(),
            manifest_crc32: crc32fast::hash(&body),
        };
        let p = base.join(MANIFEST);
        let text = serde_json::to_vec_pretty(&env).map_err(|e| BackupError::Invalid {
            path: p.clone(),
            what: e.to_string(),
        })?;
        write_synced(&p, &text)
    }

    /// Re-reads every file and checks sizes, chunk CRCs, file CRCs and the digest. Names the file
    /// and byte offset of the first damage found.
    pub fn verify_files(&self, base: &Path) -> Result<(), BackupError> {
        let mut digest = crc32fast::Hasher::new();
        let mut buf = vec![0u8; self.chunk_size.max(1) as usize];
        for f in &self.files {
            let p = base.join(&f.name);
            let mut file = std::fs::File::open(&p).map_err(|e| BackupError::Invalid {
                path: p.clone(),
                what: format!("listed in the manifest but unreadable: {e}"),
            })?;
            let mut whole = crc32fast::Hasher::new();
            let mut offset = 0u64;
            let mut i = 0usize;
            loop {
                let n = read_full(&mut file, &mut buf).map_err(BackupError::io("read", &p))?;
                if n == 0 {
                    break;
                }
                let c = crc32fast::hash(&buf[..n]);
                match f.chunk_crc32.get(i) {
                    Some(want) if *want == c => {}
                    Some(_) => {
                        return Err(BackupError::Damaged {
                            path: p,
                            offset,
                            what: format!("chunk {i} CRC mismatch"),
                        })
                    }
                    None => {
                        return Err(BackupError::Damaged {
                            path: p,
                            offset,
                            what: format!("longer than the manifest's {} bytes", f.size),
                        })
                    }
                }
                whole.update(&buf[..n]);
                digest.update(&buf[..n]);
                offset += n as u64;
                i += 1;
            }
            if offset != f.size {
                return Err(BackupError::Damaged {
                    path: p,
                    offset,
                    what: format!("truncated: {offset} bytes, manifest says {}", f.size),
                });
            }
            if whole.finalize() != f.crc32 {
                return Err(BackupError::Damaged {
                    path: p,
                    offset: 0,
                    what: "file CRC mismatch".into(),
                });
            }
        }
        if digest.finalize() != self.digest_crc32 {
            return Err(BackupError::Damaged {
                path: base.join(MANIFEST),
                offset: 0,
                what: "digest of the whole base does not match".into(),
            });
        }
        Ok(())
    }

    pub fn snapshot_meta(&self) -> Result<Vec<u8>, BackupError> {
        hex_decode(&self.snapshot_meta_hex).ok_or_else(|| BackupError::Invalid {
            path: PathBuf::from(MANIFEST),
            what: "snapshot_meta_hex is not hex".into(),
        })
    }
}

/// Receives a streamed checkpoint into `<root>/.incoming-*`, checking every chunk as it lands,
/// and on [`BaseWriter::finish`] checks every file, writes the manifest, fsyncs and renames it to
/// `<root>/base-<index>`. Dropped unfinished, it removes what it wrote.
pub struct BaseWriter {
    root: PathBuf,
    tmp: PathBuf,
    header: BaseHeader,
    current: Option<(usize, IncomingFile)>,
    next_file: usize,
    /// CRC32 of each fixed-size piece of each file, whatever sizes the stream's chunks had.
    chunk_crcs: Vec<Vec<u32>>,
    piece: crc32fast::Hasher,
    piece_len: u64,
    digest: crc32fast::Hasher,
    finished: bool,
}

/// A refused chunk or file of the stream, named; a local disk error stays one.
fn stream_error(name: &str) -> impl FnOnce(ChunkError) -> BackupError + '_ {
    move |e| match e {
        ChunkError::Io { path, source } => BackupError::Io {
            op: "write",
            path,
            source,
        },
        e => BackupError::Stream(format!("{name}: {e}")),
    }
}

impl BaseWriter {
    pub fn begin(root: &Path, header: BaseHeader) -> Result<BaseWriter, BackupError> {
        for (n, _, _) in &header.files {
            if !safe_name(n) || n == MANIFEST {
                return Err(BackupError::Stream(format!("refusing file name {n:?}")));
            }
        }
        std::fs::create_dir_all(root).map_err(BackupError::io("create", root))?;
        let tmp = root.join(format!(
            ".incoming-base-{}-{}",
            std::process::id(),
            now_unix_ms()
        ));
        std::fs::create_dir(&tmp).map_err(BackupError::io("create", &tmp))?;
        let n = header.files.len();
        Ok(BaseWriter {
            root: root.to_path_buf(),
            tmp,
            header,
            current: None,
            next_file: 0,
            chunk_crcs: vec![Vec::new(); n],
            piece: crc32fast::Hasher::new(),
            piece_len: 0,
            digest: crc32fast::Hasher::new(),
            finished: false,
        })
    }

    fn close_current(&mut self) -> Result<(), BackupError> {
        if let Some((i, file)) = self.current.take() {
            if self.piece_len > 0 {
                let piece = std::mem::replace(&mut self.piece, crc32fast::Hasher::new());
                self.chunk_crcs[i].push(piece.finalize());
                self.piece_len = 0;
            }
            file.finish()
                .map_err(stream_error(&self.header.files[i].0))?;
        }
        Ok(())
    }

    /// Opens files up to and including `index` (empty files have no chunks).
    fn advance_to(&mut self, index: usize) -> Result<(), BackupError> {
        if let Some((cur, ..)) = &self.current {
            if *cur == index {
                return Ok(());
            }
        }
        if index < self.next_file {
            return Err(BackupError::Stream(format!(
                "chunk for file {index} after later files"
            )));
        }
        self.close_current()?;
        while self.next_file <= index {
            let i = self.next_file;
            self.next_file += 1;
            let (name, size, crc) = &self.header.files[i];
            let f = IncomingFile::create(self.tmp.join(name), *size, *crc)
                .map_err(stream_error(name))?;
            self.current = Some((i, f));
            if i < index {
                self.close_current()?;
            }
        }
        Ok(())
    }

    pub fn chunk(
        &mut self,
        file_index: u32,
        offset: u64,
        data: &[u8],
        crc: u32,
    ) -> Result<(), BackupError> {
        let i = file_index as usize;
        if i >= self.header.files.len() {
            return Err(BackupError::Stream(format!("chunk for unknown file {i}")));
        }
        self.advance_to(i)?;
        let Some((_, f)) = self.current.as_mut() else {
            return Err(BackupError::Stream("no open file".into()));
        };
        f.write(offset, data, crc)
            .map_err(stream_error(&self.header.files[i].0))?;
        self.digest.update(data);
        let mut rest = data;
        while !rest.is_empty() {
            let take = ((CHUNK - self.piece_len) as usize).min(rest.len());
            self.piece.update(&rest[..take]);
            self.piece_len += take as u64;
            rest = &rest[take..];
            if self.piece_len == CHUNK {
                let piece = std::mem::replace(&mut self.piece, crc32fast::Hasher::new());
                self.chunk_crcs[i].push(piece.finalize());
                self.piece_len = 0;
            }
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<(PathBuf, BaseManifest), BackupError> {
        let n = self.header.files.len();
        if n > 0 {
            self.advance_to(n - 1)?;
        }
        self.close_current()?;
        let h = &self.header;
        let manifest = BaseManifest {
            format_version: BACKUP_FORMAT_VERSION,
            cluster_id: h.cluster_id.clone(),
            node_id: h.node_id,
            applied_index: h.applied_index,
            applied_term: h.applied_term,
            membership: serde_json::from_str(&h.membership_json).unwrap_or(serde_json::Value::Null),
            state_hash: h.state_hash,
            created_unix_ms: now_unix_ms(),
            chunk_size: CHUNK,
            files: h
                .files
                .iter()
                .zip(&self.chunk_crcs)
                .map(|((name, size, crc), chunks)| FileManifest {
                    name: name.clone(),
                    size: *size,
                    crc32: *crc,
                    chunk_crc32: chunks.clone(),
                })
                .collect(),
            digest_crc32: self.digest.clone().finalize(),
            snapshot_meta_hex: hex_encode(&h.snapshot_meta),
        };
        manifest.write(&self.tmp)?;
        let fin = super::base_dir(&self.root, h.applied_index);
        if fin.exists() {
            return Err(BackupError::Refused(format!(
                "{} already exists: a base at this index was taken before",
                fin.display()
            )));
        }
        publish(&self.tmp, &fin).map_err(|(path, source)| BackupError::Io {
            op: "publish",
            path,
            source,
        })?;
        self.finished = true;
        Ok((fin, manifest))
    }
}

impl Drop for BaseWriter {
    fn drop(&mut self) {
        if !self.finished {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn write_synced(p: &Path, data: &[u8]) -> Result<(), BackupError> {
    let mut f = std::fs::File::create(p).map_err(BackupError::io("create", p))?;
    f.write_all(data).map_err(BackupError::io("write", p))?;
    f.sync_all().map_err(BackupError::io("fsync", p))
}

fn hex_encode(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(files: &[(&str, &[u8])]) -> BaseHeader {
        BaseHeader {
            cluster_id: "c".into(),
            node_id: 1,
            applied_index: 7,
            applied_term: 2,
            membership_json: "{}".into(),
            state_hash: 9,
            snapshot_meta: vec![1, 2, 255],
            files: files
                .iter()
                .map(|(n, d)| (n.to_string(), d.len() as u64, crc32fast::hash(d)))
                .collect(),
        }
    }

    #[test]
    fn a_stream_lands_as_a_verified_base() {
        let d = tempfile::tempdir().unwrap();
        let files: &[(&str, &[u8])] = &[("a.sst", b"hello"), ("empty", b""), ("z", b"world!")];
        let mut w = BaseWriter::begin(d.path(), header(files)).unwrap();
        w.chunk(0, 0, b"hel", crc32fast::hash(b"hel")).unwrap();
        w.chunk(0, 3, b"lo", crc32fast::hash(b"lo")).unwrap();
        w.chunk(2, 0, b"world!", crc32fast::hash(b"world!"))
            .unwrap();
        let (p, m) = w.finish().unwrap();
        assert_eq!(p, crate::backup::base_dir(d.path(), 7));
        let back = BaseManifest::read(&p).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.files[0].chunk_crc32, vec![crc32fast::hash(b"hello")]);
        assert!(back.files[1].chunk_crc32.is_empty());
        assert_eq!(back.snapshot_meta().unwrap(), vec![1, 2, 255]);
        back.verify_files(&p).unwrap();
        assert_eq!(std::fs::read(p.join("empty")).unwrap(), b"");
    }

    #[test]
    fn bad_streams_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().unwrap();
        let files: &[(&str, &[u8])] = &[("a", b"abcd")];
        type Case = Box<dyn Fn(&mut BaseWriter) -> Result<(), BackupError>>;
        let cases: Vec<(&str, Case)> = vec![
            ("bad CRC", Box::new(|w| w.chunk(0, 0, b"abcd", 1))),
            (
                "expected 0",
                Box::new(|w| w.chunk(0, 2, b"cd", crc32fast::hash(b"cd"))),
            ),
            (
                "unknown file",
                Box::new(|w| w.chunk(3, 0, b"x", crc32fast::hash(b"x"))),
            ),
        ];
        for (want, f) in cases {
            let mut w = BaseWriter::begin(d.path(), header(files)).unwrap();
            let e = f(&mut w).unwrap_err().to_string();
            assert!(e.contains(want), "{want}: {e}");
            drop(w);
        }
        // Short file: caught at finish.
        let mut w = BaseWriter::begin(d.path(), header(files)).unwrap();
        w.chunk(0, 0, b"ab", crc32fast::hash(b"ab")).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("received 2 bytes"), "{e}");
        for evil in ["../x", "/etc/passwd", "", "manifest.json"] {
            let e = BaseWriter::begin(d.path(), header(&[(evil, b"1")]))
                .err()
                .expect(evil);
            assert!(e.to_string().contains("refusing file name"), "{e}");
        }
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().collect();
        assert!(left.is_empty(), "left behind: {left:?}");
    }
}
