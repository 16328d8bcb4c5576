//! The `Backup` service: consistent checkpoints and a tail of committed log entries, streamed to
//! `metaraft backup` (and the DR tooling). Both run off the apply path and never hold a lock
//! that writes or heartbeats need: a checkpoint is RocksDB hard links, and the tail reads the log.

use std::sync::Arc;

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use super::status::ApiError;
use crate::checkpoint_files::ListedFile;
use crate::codec::encode;
use crate::consensus::Consensus;
use crate::pb;
use crate::raft_types::SnapshotMeta;
use crate::storage::{LogStore, StateMachineStore};

/// Log entries read per round while tailing.
const TAIL_BATCH: u64 = 256;

pub struct BackupApi {
    pub node: Arc<Consensus>,
    /// The stores a backup copies: this node's state machine and log.
    pub sm: StateMachineStore,
    pub log: LogStore,
}

fn internal(e: impl std::fmt::Display) -> Status {
    ApiError::Internal(e.to_string()).into()
}

impl BackupApi {
    /// What a base backup holds, announced before its files: the checkpoint's index, term,
    /// membership, state hash and cluster id, and its files with their sizes and CRC32s.
    async fn backup_header(
        &self,
        meta: &SnapshotMeta,
        dir: &std::path::Path,
        hash: u32,
    ) -> Result<(pb::BackupHeader, Vec<ListedFile>), Status> {
        let cluster_id = self.sm.cluster_id().map_err(ApiError::from)?;
        let d = dir.to_path_buf();
        let files = tokio::task::spawn_blocking(move || crate::checkpoint_files::list_files(&d))
            .await
            .map_err(internal)?
            .map_err(|e| internal(format!("listing checkpoint: {e}")))?;
        let last = meta.last_log_id;
        let header = pb::BackupHeader {
            applied_index: last.map(|l| l.index).unwrap_or(0),
            applied_term: last.map(|l| l.leader_id.term).unwrap_or(0),
            membership_json: serde_json::to_string(&meta.last_membership).unwrap_or_default(),
            node_id: self.node.id(),
            state_hash: hash,
            total_bytes: files.iter().map(|f| f.size).sum(),
            files: files
                .iter()
                .map(|f| pb::BackupFile {
                    name: f.name.clone(),
                    size: f.size,
                    crc32: f.crc32,
                })
                .collect(),
            snapshot_meta: encode(meta).map_err(internal)?,
            cluster_id,
        };
        Ok((header, files))
    }
}

#[tonic::async_trait]
impl pb::backup_server::Backup for BackupApi {
    type SnapshotStream = ReceiverStream<Result<pb::BackupChunk, Status>>;

    async fn snapshot(
        &self,
        req: Request<pb::BackupSnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let rate = req.into_inner().max_bytes_per_sec;
        let sm = self.sm.clone();
        let (meta, dir, hash) = tokio::task::spawn_blocking(move || sm.backup_checkpoint())
            .await
            .map_err(internal)?
            .map_err(ApiError::from)?;
        let sm = self.sm.clone();
        let (header, files) = match self.backup_header(&meta, &dir, hash).await {
            Ok(v) => v,
            Err(e) => {
                sm.remove_backup_checkpoint(&dir);
                return Err(e);
            }
        };
        tracing::info!(
            index = header.applied_index,
            files = files.len(),
            "backup checkpoint streaming"
        );
        // A few chunks in flight: memory stays bounded whatever the state size.
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let send = |m: Result<pb::BackupChunk, Status>| tx.blocking_send(m).is_ok();
            let started = std::time::Instant::now();
            let mut sent = 0u64;
            let pace = |sent: u64| {
                if rate > 0 {
                    let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
                    if let Some(wait) = due.checked_sub(started.elapsed()) {
                        std::thread::sleep(wait);
                    }
                }
            };
            let ok = send(Ok(pb::BackupChunk {
                kind: Some(pb::backup_chunk::Kind::Header(header)),
            }));
            if ok {
                let read = crate::checkpoint_files::read_chunks(&files, |c| {
                    sent += c.data.len() as u64;
                    pace(sent);
                    send(Ok(pb::BackupChunk {
                        kind: Some(pb::backup_chunk::Kind::Data(pb::BackupFileChunk {
                            file_index: c.file_index,
                            offset: c.offset,
                            crc32: c.crc32,
                            data: c.data,
                        })),
                    }))
                });
                if let Err((path, e)) = read {
                    send(Err(internal(format!("{}: {e}", path.display()))));
                }
            }
            sm.remove_backup_checkpoint(&dir);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    type TailLogStream = ReceiverStream<Result<pb::LogRecord, Status>>;

    async fn tail_log(
        &self,
        req: Request<pb::TailLogRequest>,
    ) -> Result<Response<Self::TailLogStream>, Status> {
        let from = req.into_inner().from_index;
        if from == 0 {
            return Err(ApiError::Invalid("from_index must be at least 1".into()).into());
        }
        let log = self.log.clone();
        let mut applied_rx = self.sm.subscribe_applied();
        let (tx, rx) = mpsc::channel(TAIL_BATCH as usize);
        tokio::spawn(async move {
            let mut next = from;
            loop {
                // Applied entries are committed: never stream an entry that could be truncated.
                let applied = *applied_rx.borrow_and_update();
                while next <= applied {
                    let end = applied.min(next + TAIL_BATCH - 1) + 1;
                    let l = log.clone();
                    let read = tokio::task::spawn_blocking(move || {
                        let entries = l.read_entries(next, end)?;
                        let first = l.first_index()?;
                        Ok::<_, crate::storage::StorageError>((entries, first))
                    })
                    .await;
                    let (entries, first) = match read {
                        Ok(Ok(r)) => r,
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(ApiError::from(e).into())).await;
                            return;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(internal(e))).await;
                            return;
                        }
                    };
                    if entries.first().map(|e| e.log_id.index) != Some(next) {
                        let _ = tx
                            .send(Err(ApiError::Purged {
                                from: next,
                                first: first.unwrap_or(0),
                            }
                            .into()))
                            .await;
                        return;
                    }
                    for e in entries {
                        let rec = match encode(&e) {
                            Ok(b) => pb::LogRecord {
                                index: e.log_id.index,
                                term: e.log_id.leader_id.term,
                                entry: b,
                            },
                            Err(err) => {
                                let _ = tx.send(Err(internal(err))).await;
                                return;
                            }
                        };
                        next = e.log_id.index + 1;
                        if tx.send(Ok(rec)).await.is_err() {
                            return;
                        }
                    }
                }
                tokio::select! {
                    r = applied_rx.changed() => if r.is_err() { return },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
