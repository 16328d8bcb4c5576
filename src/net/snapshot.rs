//! Snapshot streaming: a checkpoint directory sent as a manifest (vote, metadata, file list with
//! sizes and CRC32s) followed by chunks, each with its own CRC32. The receiver writes into a fresh
//! temporary directory, checks every chunk, file size and file CRC, fsyncs, renames, and only
//! then hands the directory to openraft. Memory stays bounded: a few chunks in flight.

use crate::fsutil::read_full;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::NetError;
use crate::codec::{decode, encode};
use crate::pb::peer::{snapshot_chunk, FileChunk, FileEntry, SnapshotChunk, SnapshotManifest};
use crate::raft_types::{SnapshotMeta, TypeConfig, Vote};
use crate::storage::SnapshotDir;

pub const CHUNK_SIZE: usize = 1 << 20;

fn file_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK_SIZE];
    let mut n = 0u64;
    loop {
        let r = f.read(&mut buf)?;
        if r == 0 {
            break;
        }
        h.update(&buf[..r]);
        n += r as u64;
    }
    Ok((n, h.finalize()))
}

/// Lists a snapshot directory as a manifest (sorted by name).
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<(FileEntry, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if !e.file_type()?.is_file() {
            continue;
        }
        let (size, crc32) = file_crc(&e.path())?;
        out.push((
            FileEntry {
                name: e.file_name().to_string_lossy().into_owned(),
                size,
                crc32,
            },
            e.path(),
        ));
    }
    out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
    Ok(out)
}

/// Total size of the files of a snapshot directory (0 if it cannot be read: the transfer then
/// reports the real error).
pub fn dir_bytes(dir: &std::path::Path) -> u64 {
    // Metadata only: the manifest's CRCs are computed once, by the transfer itself.
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(|e| e.ok()?.metadata().ok())
        .filter(|m| m.is_file())
        .map(|m| m.len())
        .sum()
}

/// Streams `snapshot` to a peer and returns its answer.
pub async fn send(
    mut client: super::PeerConn,
    addr: String,
    vote: Vote,
    snapshot: openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>,
    timeout: Duration,
) -> Result<openraft::raft::SnapshotResponse<TypeConfig>, NetError> {
    let dir = snapshot.snapshot.path.clone();
    let header = encode(&(vote, snapshot.meta.clone())).map_err(|e| NetError::Codec {
        addr: addr.clone(),
        reason: e.to_string(),
    })?;
    let (tx, rx) = mpsc::channel::<SnapshotChunk>(4);
    let reader = tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let files = manifest_files(&dir)?;
        let total_bytes = files.iter().map(|f| f.0.size).sum();
        let manifest = SnapshotManifest {
            header,
            files: files.iter().map(|f| f.0.clone()).collect(),
            total_bytes,
        };
        if tx
            .blocking_send(SnapshotChunk {
                kind: Some(snapshot_chunk::Kind::Manifest(manifest)),
            })
            .is_err()
        {
            return Ok(());
        }
        for (i, (_, path)) in files.iter().enumerate() {
            let mut f = std::fs::File::open(path)?;
            let mut offset = 0u64;
            loop {
                let mut buf = vec![0u8; CHUNK_SIZE];
                let n = read_full(&mut f, &mut buf)?;
                if n == 0 {
                    break;
                }
                buf.truncate(n);
                let crc32 = crc32fast::hash(&buf);
                let chunk = FileChunk {
                    file_index: i as u32,
                    offset,
                    data: buf,
                    crc32,
                };
                if tx
                    .blocking_send(SnapshotChunk {
                        kind: Some(snapshot_chunk::Kind::Data(chunk)),
                    })
                    .is_err()
                {
                    return Ok(());
                }
                offset += n as u64;
            }
        }
        Ok(())
    });
    let call = client.install_snapshot(ReceiverStream::new(rx));
    let resp = tokio::time::timeout(timeout, call)
        .await
        .map_err(|_| NetError::Unreachable {
            addr: addr.clone(),
            reason: format!("snapshot timed out after {timeout:?}"),
        })?
        .map_err(|s| super::status_to_net(&addr, s))?;
    match reader.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            return Err(NetError::Codec {
                addr,
                reason: format!("reading snapshot files: {e}"),
            })
        }
        Err(e) => {
            return Err(NetError::Codec {
                addr,
                reason: e.to_string(),
            })
        }
    }
    let r: Result<openraft::raft::SnapshotResponse<TypeConfig>, String> =
        decode(&resp.into_inner().data).map_err(|e| NetError::Codec {
            addr: addr.clone(),
            reason: e.to_string(),
        })?;
    r.map_err(|message| NetError::Status {
        addr,
        code: tonic::Code::Internal,
        message,
    })
}

/// Errors receiving a snapshot; the temporary directory is removed on any of them.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("snapshot stream: {0}")]
    Protocol(String),
    #[error("snapshot file {file}: {reason}")]
    Integrity { file: String, reason: String },
    #[error("snapshot io {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Receives one snapshot stream into `tmp`, verified and fsync'd; renames it to `final_dir(index)`.
/// Returns (vote, meta, directory).
pub async fn receive<S>(
    mut stream: S,
    tmp: PathBuf,
    final_dir: impl FnOnce(u64) -> PathBuf,
) -> Result<(Vote, SnapshotMeta, PathBuf), ReceiveError>
where
    S: futures::Stream<Item = Result<SnapshotChunk, tonic::Status>> + Unpin,
{
    use futures::StreamExt;
    let res = async {
        let first = stream
            .next()
            .await
            .ok_or_else(|| ReceiveError::Protocol("empty stream".into()))?
            .map_err(|s| ReceiveError::Protocol(s.to_string()))?;
        let Some(snapshot_chunk::Kind::Manifest(m)) = first.kind else {
            return Err(ReceiveError::Protocol(
                "first message must be the manifest".into(),
            ));
        };
        let (vote, meta): (Vote, SnapshotMeta) = decode(&m.header)
            .map_err(|e| ReceiveError::Protocol(format!("bad manifest header: {e}")))?;
        for f in &m.files {
            if f.name.is_empty()
                || f.name.contains('/')
                || f.name.contains('\\')
                || f.name == "."
                || f.name == ".."
            {
                return Err(ReceiveError::Protocol(format!(
                    "illegal file name {:?}",
                    f.name
                )));
            }
        }
        if !m
            .files
            .iter()
            .any(|f| f.name == crate::storage::SNAPSHOT_META_FILE)
        {
            return Err(ReceiveError::Protocol(
                "manifest lacks snapshot.meta".into(),
            ));
        }
        std::fs::create_dir_all(&tmp).map_err(|source| ReceiveError::Io {
            path: tmp.clone(),
            source,
        })?;
        let mut written = vec![0u64; m.files.len()];
        let mut hashers: Vec<crc32fast::Hasher> =
            m.files.iter().map(|_| crc32fast::Hasher::new()).collect();
        let mut handles: Vec<Option<std::fs::File>> = Vec::with_capacity(m.files.len());
        for f in &m.files {
            let p = tmp.join(&f.name);
            handles.push(Some(
                std::fs::File::create(&p).map_err(|source| ReceiveError::Io { path: p, source })?,
            ));
        }
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| ReceiveError::Protocol(s.to_string()))?;
            let Some(snapshot_chunk::Kind::Data(c)) = msg.kind else {
                return Err(ReceiveError::Protocol(
                    "second manifest in one stream".into(),
                ));
            };
            let i = c.file_index as usize;
            let entry = m
                .files
                .get(i)
                .ok_or_else(|| ReceiveError::Protocol(format!("file index {i} out of range")))?;
            if crc32fast::hash(&c.data) != c.crc32 {
                return Err(ReceiveError::Integrity {
                    file: entry.name.clone(),
                    reason: format!("chunk at offset {} fails its CRC32", c.offset),
                });
            }
            if c.offset != written[i] {
                return Err(ReceiveError::Integrity {
                    file: entry.name.clone(),
                    reason: format!("chunk at offset {}, expected {}", c.offset, written[i]),
                });
            }
            if written[i] + c.data.len() as u64 > entry.size {
                return Err(ReceiveError::Integrity {
                    file: entry.name.clone(),
                    reason: "more data than the manifest's size".into(),
                });
            }
            let p = tmp.join(&entry.name);
            let fh = handles[i]
                .as_mut()
                .ok_or_else(|| ReceiveError::Protocol("file closed".into()))?;
            fh.write_all(&c.data)
                .map_err(|source| ReceiveError::Io { path: p, source })?;
            hashers[i].update(&c.data);
            written[i] += c.data.len() as u64;
        }
        for (i, f) in m.files.iter().enumerate() {
            if written[i] != f.size {
                return Err(ReceiveError::Integrity {
                    file: f.name.clone(),
                    reason: format!("got {} bytes, manifest says {}", written[i], f.size),
                });
            }
            let h = std::mem::replace(&mut hashers[i], crc32fast::Hasher::new()).finalize();
            if h != f.crc32 {
                return Err(ReceiveError::Integrity {
                    file: f.name.clone(),
                    reason: "whole-file CRC32 mismatch".into(),
                });
            }
            let p = tmp.join(&f.name);
            if let Some(fh) = handles[i].take() {
                fh.sync_all()
                    .map_err(|source| ReceiveError::Io { path: p, source })?;
            }
        }
        crate::storage::sync_dir(&tmp).map_err(|e| ReceiveError::Protocol(e.to_string()))?;
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let fin = final_dir(index);
        std::fs::rename(&tmp, &fin).map_err(|source| ReceiveError::Io {
            path: fin.clone(),
            source,
        })?;
        if let Some(parent) = fin.parent() {
            crate::storage::sync_dir(parent).map_err(|e| ReceiveError::Protocol(e.to_string()))?;
        }
        Ok((vote, meta, fin))
    }
    .await;
    if res.is_err() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> Vec<u8> {
        let vote = Vote::new(1, 1);
        let meta = SnapshotMeta::default();
        encode(&(vote, meta)).expect("encode")
    }

    fn manifest(files: Vec<FileEntry>) -> SnapshotChunk {
        let total_bytes = files.iter().map(|f| f.size).sum();
        SnapshotChunk {
            kind: Some(snapshot_chunk::Kind::Manifest(SnapshotManifest {
                header: header(),
                files,
                total_bytes,
            })),
        }
    }

    fn chunk(file_index: u32, offset: u64, data: &[u8], crc32: u32) -> SnapshotChunk {
        SnapshotChunk {
            kind: Some(snapshot_chunk::Kind::Data(FileChunk {
                file_index,
                offset,
                data: data.to_vec(),
                crc32,
            })),
        }
    }

    fn meta_file(data: &[u8]) -> FileEntry {
        FileEntry {
            name: crate::storage::SNAPSHOT_META_FILE.into(),
            size: data.len() as u64,
            crc32: crc32fast::hash(data),
        }
    }

    async fn run(msgs: Vec<SnapshotChunk>, root: &Path) -> Result<PathBuf, ReceiveError> {
        let tmp = root.join("incoming");
        let fin = root.join("final");
        let s = futures::stream::iter(msgs.into_iter().map(Ok::<_, tonic::Status>));
        let r = receive(s, tmp.clone(), |_| fin.clone())
            .await
            .map(|(_, _, p)| p);
        if r.is_err() {
            assert!(!tmp.exists(), "temporary directory removed on failure");
            assert!(!fin.exists(), "nothing installed on failure");
        }
        r
    }

    #[tokio::test]
    async fn good_stream_is_written_and_renamed() {
        let d = tempfile::tempdir().expect("tmp");
        let data = b"hello snapshot";
        let p = run(
            vec![
                manifest(vec![meta_file(data)]),
                chunk(0, 0, data, crc32fast::hash(data)),
            ],
            d.path(),
        )
        .await
        .expect("receive");
        assert_eq!(
            std::fs::read(p.join(crate::storage::SNAPSHOT_META_FILE)).expect("read"),
            data
        );
    }

    #[tokio::test]
    async fn damaged_streams_are_refused_and_leave_nothing() {
        let d = tempfile::tempdir().expect("tmp");
        let data = b"hello snapshot";
        let good = crc32fast::hash(data);
        let cases: Vec<(&str, Vec<SnapshotChunk>)> = vec![
            ("empty stream", vec![]),
            ("data before manifest", vec![chunk(0, 0, data, good)]),
            (
                "flipped chunk CRC",
                vec![manifest(vec![meta_file(data)]), chunk(0, 0, data, good ^ 1)],
            ),
            (
                "short file",
                vec![
                    manifest(vec![meta_file(data)]),
                    chunk(0, 0, &data[..4], crc32fast::hash(&data[..4])),
                ],
            ),
            (
                "offset gap",
                vec![manifest(vec![meta_file(data)]), chunk(0, 3, data, good)],
            ),
            (
                "file index out of range",
                vec![manifest(vec![meta_file(data)]), chunk(7, 0, data, good)],
            ),
            (
                "path traversal",
                vec![manifest(vec![
                    meta_file(data),
                    FileEntry {
                        name: "../evil".into(),
                        size: 1,
                        crc32: 0,
                    },
                ])],
            ),
            (
                "no meta file",
                vec![manifest(vec![FileEntry {
                    name: "x.sst".into(),
                    size: 0,
                    crc32: 0,
                }])],
            ),
            (
                "whole-file CRC mismatch",
                vec![
                    manifest(vec![FileEntry {
                        crc32: good ^ 1,
                        ..meta_file(data)
                    }]),
                    chunk(0, 0, data, good),
                ],
            ),
        ];
        for (name, msgs) in cases {
            let sub = d.path().join(name.replace(' ', "_"));
            std::fs::create_dir_all(&sub).expect("mkdir");
            let e = run(msgs, &sub).await.expect_err(name);
            assert!(!e.to_string().is_empty(), "{name}");
        }
    }
}
