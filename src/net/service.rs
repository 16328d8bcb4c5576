//! The peer gRPC service: Raft RPCs into openraft, snapshot reception, and the calls followers
//! make to the leader (forwarded writes, membership changes, read index, status).

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use crate::codec::{decode, encode};
use crate::consensus::Raft;
use crate::consensus::{AdminRequest, Consensus, ConsensusError, Forwarded};
use crate::pb::peer::peer_server::Peer;
use crate::pb::peer::{
    Blob, NodeStatusRequest, NodeStatusResponse, ReadIndexRequest, ReadIndexResponse, SnapshotChunk,
};
use crate::storage::{SnapshotDir, StateMachineStore};

pub struct PeerService {
    pub node: Arc<Consensus>,
    /// The Raft core the Raft RPCs go into.
    pub raft: Raft,
    /// Where received snapshots are put.
    pub sm: StateMachineStore,
}

fn bad(what: &str, e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("cannot decode {what}: {e}"))
}

// tonic's handlers return `Status` by value; boxing here would only be unboxed again.
#[allow(clippy::result_large_err)]
fn blob<T: serde::Serialize>(v: &T) -> Result<Response<Blob>, Status> {
    encode(v)
        .map(|data| Response::new(Blob { data }))
        .map_err(|e| Status::internal(format!("encode: {e}")))
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn append_entries(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let data = req.into_inner().data;
        let rpc: openraft::raft::AppendEntriesRequest<crate::raft_types::TypeConfig> =
            decode(&data).map_err(|e| bad("append entries", e))?;
        self.node.note_replication(rpc.entries.len(), data.len());
        let r = self
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| e.to_string());
        blob(&r)
    }

    type AppendStreamStream =
        std::pin::Pin<Box<dyn futures::Stream<Item = Result<Blob, Status>> + Send + 'static>>;

    // The stream's items are tonic `Status` by value, as tonic requires.
    #[allow(clippy::result_large_err)]
    async fn append_stream(
        &self,
        req: Request<Streaming<Blob>>,
    ) -> Result<Response<Self::AppendStreamStream>, Status> {
        use futures::StreamExt;
        // Requests are decoded until the first bad one; the stream then ends and the leader
        // falls back to a fresh replication stream.
        let node = self.node.clone();
        let input = req.into_inner().scan((), move |_, item| {
            let r = item.ok().and_then(|b| {
                let r =
                    decode::<openraft::raft::AppendEntriesRequest<crate::raft_types::TypeConfig>>(
                        &b.data,
                    )
                    .ok();
                if let Some(req) = &r {
                    node.note_replication(req.entries.len(), b.data.len());
                }
                r
            });
            futures::future::ready(r)
        });
        let out = self.raft.stream_append(Box::pin(input)).map(|r| {
            let r = r.map_err(|fatal| fatal.to_string());
            encode(&r)
                .map(|data| Blob { data })
                .map_err(|e| Status::internal(format!("encode: {e}")))
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn vote(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(|e| bad("vote", e))?;
        let r = self.raft.vote(rpc).await.map_err(|e| e.to_string());
        blob(&r)
    }

    async fn pre_vote(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(|e| bad("pre-vote", e))?;
        let r = self.raft.pre_vote(rpc).await.map_err(|e| e.to_string());
        blob(&r)
    }

    async fn transfer_leader(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let rpc = decode(&req.into_inner().data).map_err(|e| bad("transfer leader", e))?;
        let r = self
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(|e| e.to_string());
        blob(&r)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Blob>, Status> {
        let sm = self.sm.clone();
        let tmp = sm.new_incoming_dir();
        let (vote, meta, dir) =
            super::snapshot::receive(req.into_inner(), tmp, |idx| sm.received_dir(idx))
                .await
                .map_err(|e| {
                    tracing::warn!(error = %e, "snapshot receive failed");
                    Status::data_loss(e.to_string())
                })?;
        tracing::info!(index = ?meta.last_log_id.map(|l| l.index), "snapshot received");
        self.node
            .metrics()
            .snapshots_received
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let snap = openraft::Snapshot {
            meta,
            snapshot: SnapshotDir { path: dir },
        };
        let r = self
            .raft
            .install_full_snapshot(vote, snap)
            .await
            .map_err(|e| e.to_string());
        blob(&r)
    }

    async fn forward(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let r: crate::fsm::Request =
            decode(&req.into_inner().data).map_err(|e| bad("forwarded write", e))?;
        blob(&self.node.write_local(r).await)
    }

    async fn forward_batch(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let reqs: Vec<crate::fsm::Request> =
            decode(&req.into_inner().data).map_err(|e| bad("forwarded writes", e))?;
        if reqs.len() > crate::consensus::batch::MAX_FORWARD_BATCH {
            return Err(Status::invalid_argument(format!(
                "{} forwarded writes in one batch; at most {}",
                reqs.len(),
                crate::consensus::batch::MAX_FORWARD_BATCH
            )));
        }
        blob(&self.node.write_local_many(reqs).await)
    }

    async fn admin(&self, req: Request<Blob>) -> Result<Response<Blob>, Status> {
        let r: AdminRequest =
            decode(&req.into_inner().data).map_err(|e| bad("admin request", e))?;
        let out: Forwarded<_> = self.node.admin_local(r).await;
        blob(&out)
    }

    async fn read_index(
        &self,
        req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexResponse>, Status> {
        let r = if req.into_inner().lease {
            self.node.lease_index_local().await
        } else {
            self.node.read_index_local().await
        };
        match r {
            Ok(index) => Ok(Response::new(ReadIndexResponse { index })),
            Err(ConsensusError::NoLeader { .. }) => {
                Err(Status::failed_precondition("not the leader"))
            }
            Err(e) => Err(Status::unavailable(e.to_string())),
        }
    }

    async fn node_status(
        &self,
        req: Request<NodeStatusRequest>,
    ) -> Result<Response<NodeStatusResponse>, Status> {
        let with_hash = req.into_inner().with_hash;
        let s = self.node.local_status();
        let mut out = NodeStatusResponse {
            node_id: s.node_id,
            role: s.role.to_string(),
            term: s.term,
            last_log_index: s.last_log_index,
            commit_index: s.commit_index,
            applied_index: s.applied_index,
            state_hash: None,
            hash_index: None,
            client_addr: self.node.config().client_addr.clone(),
            dr_replica: self.node.is_dr_replica(),
            cluster_id: self.node.cluster_id().unwrap_or_default(),
            replicated: s.replication.clone().into_iter().collect(),
        };
        if with_hash {
            let sm = self.sm.clone();
            let (idx, h) = tokio::task::spawn_blocking(move || sm.state_hash())
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| Status::internal(e.to_string()))?;
            out.hash_index = Some(idx);
            out.state_hash = Some(u64::from(h));
        }
        Ok(Response::new(out))
    }
}
