//! Snapshot streaming: a checkpoint directory sent as a manifest (vote, metadata, file list with
//! sizes and CRC32s) followed by chunks, each with its own CRC32. The receiver writes into a fresh
//! temporary directory, checks every chunk, file size and file CRC, fsyncs, renames, and only
//! then hands the directory to openraft. Memory stays bounded: a few chunks in flight.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::NetError;
use crate::checkpoint_files::{
    list_files, publish, read_chunks, safe_name, ChunkError, IncomingFile,
};
use crate::codec::{decode, encode};
use crate::pb::peer::{snapshot_chunk, FileChunk, FileEntry, SnapshotChunk, SnapshotManifest};
use crate::raft_types::{SnapshotMeta, TypeConfig, Vote};
use crate::storage::SnapshotDir;

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
        let files = list_files(&dir)?;
        let total_bytes = files.iter().map(|f| f.size).sum();
        let manifest = SnapshotManifest {
            header,
            files: files
                .iter()
                .map(|f| FileEntry {
                    name: f.name.clone(),
                    size: f.size,
                    crc32: f.crc32,
                })
                .collect(),
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
        read_chunks(&files, |c| {
            let chunk = FileChunk {
                file_index: c.file_index,
                offset: c.offset,
                data: c.data,
                crc32: c.crc32,
            };
            tx.blocking_send(SnapshotChunk {
                kind: Some(snapshot_chunk::Kind::Data(chunk)),
            })
            .is_ok()
        })
        .map_err(|(path, e)| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
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
            if !safe_name(&f.name) {
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
        let integrity = |name: &str| {
            let file = name.to_string();
            move |e: ChunkError| match e {
                ChunkError::Io { path, source } => ReceiveError::Io { path, source },
                e => ReceiveError::Integrity {
                    file,
                    reason: e.to_string(),
                },
            }
        };
        let mut files = Vec::with_capacity(m.files.len());
        for f in &m.files {
            let created = IncomingFile::create(tmp.join(&f.name), f.size, f.crc32);
            files.push(Some(created.map_err(integrity(&f.name))?));
        }
        while let Some(msg) = stream.next().await {
            let msg = msg.map_err(|s| ReceiveError::Protocol(s.to_string()))?;
            let Some(snapshot_chunk::Kind::Data(c)) = msg.kind else {
                return Err(ReceiveError::Protocol(
                    "second manifest in one stream".into(),
                ));
            };
            let i = c.file_index as usize;
            let (Some(entry), Some(Some(file))) = (m.files.get(i), files.get_mut(i)) else {
                return Err(ReceiveError::Protocol(format!(
                    "file index {i} out of range"
                )));
            };
            file.write(c.offset, &c.data, c.crc32)
                .map_err(integrity(&entry.name))?;
        }
        for (f, file) in m.files.iter().zip(files.iter_mut()) {
            if let Some(file) = file.take() {
                file.finish().map_err(integrity(&f.name))?;
            }
        }
        let index = meta.last_log_id.map(|l| l.index).unwrap_or(0);
        let fin = final_dir(index);
        publish(&tmp, &fin).map_err(|(path, source)| ReceiveError::Io { path, source })?;
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
    use std::path::Path;

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
