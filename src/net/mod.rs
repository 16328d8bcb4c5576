//! Peer transport: Raft RPCs, snapshot streaming and node-to-node calls over gRPC (tonic).
//!
//! - [`PeerPool`]: one long-lived HTTP/2 channel per peer address, shared by Raft replication and
//!   by forwarding (writes, read-index, membership, status).
//! - [`NetworkFactory`]/[`PeerNetwork`]: openraft's `RaftNetworkV2` over that pool.
//! - [`service::PeerService`]: the server side, on the peer port only.
//! - [`snapshot`]: streaming a checkpoint directory in CRC-checked chunks and receiving it into a
//!   temporary directory that is fsync'd and renamed before openraft installs it.

pub mod coalesce;
pub mod dial;
pub mod lost;
mod peers;
pub mod service;
pub mod snapshot;
pub mod tls;

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::RPCOption;
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, TransferLeaderRequest,
    TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{AnyError, RaftNetworkFactory, RaftNetworkV2};
use tonic::transport::{Channel, Endpoint};

use crate::codec::{decode, encode};
use crate::pb::peer::peer_client::PeerClient;
use crate::pb::peer::Blob;
use crate::raft_types::{Node, NodeId, TypeConfig, Vote};
use crate::storage::SnapshotDir;

/// Transport errors, as the consensus layer sees them.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NetError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("peer {addr} answered {code:?}: {message}")]
    Status {
        addr: String,
        code: tonic::Code,
        message: String,
    },
    #[error("bad message from peer {addr}: {reason}")]
    Codec { addr: String, reason: String },
    #[error("bad peer address {addr}: {reason}")]
    Address { addr: String, reason: String },
}

/// Max gRPC message size between peers (append batches can be large).
pub const MAX_PEER_MESSAGE: usize = 64 << 20;

/// How many streams a peer may open and cancel before the server has taken them, per
/// connection. h2's default of 20 guards against the "rapid reset" flood, but a partition
/// produces exactly that pattern honestly: every heartbeat, forward and read-index call made
/// while packets are dropped times out and is cancelled, and at the heal TCP delivers all of
/// them, opened and cancelled, in one burst. Past the limit h2 closes the whole connection
/// (GOAWAY, "remotely-reset pending-accept streams reached limit"), failing every call on it at
/// the moment the peer comes back. The bound stays: a connection that is dead for longer than
/// the keepalive (10 s) is dropped by its client, and 10 s of calls fits well within it.
pub const MAX_PENDING_ACCEPT_RESETS: usize = 4096;

/// The peer port's HTTP/2 server, as the node and the tests run it.
pub fn peer_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_ACCEPT_RESETS))
}

/// One lazily connected channel per peer address.
#[derive(Default)]
pub struct PeerPool {
    channels: Mutex<HashMap<String, Channel>>,
    /// This node's cluster lineage id, stamped on every outgoing peer request (shared with the
    /// state machine, which updates it).
    pub lineage: Lineage,
    /// Mutual TLS towards peers (this node's certificate, the cluster CA); None: plaintext.
    tls: Option<crate::tls::Live<rustls::ClientConfig>>,
}

/// The cluster lineage id cell: empty until the first membership entry is applied.
pub type Lineage = std::sync::Arc<std::sync::RwLock<String>>;

/// gRPC metadata key carrying the sender's lineage on peer requests.
pub const LINEAGE_HEADER: &str = "x-metaraft-cluster";

/// Adds the lineage header to each request.
#[derive(Clone)]
pub struct StampLineage(Lineage);

impl tonic::service::Interceptor for StampLineage {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let id = match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if !id.is_empty() {
            if let Ok(v) = id.parse() {
                req.metadata_mut().insert(LINEAGE_HEADER, v);
            }
        }
        Ok(req)
    }
}

/// Server side: refuses peer requests stamped with another lineage (a node of the old cluster
/// after a DR promotion or a restore). Requests without a stamp (a node that has not yet applied
/// any membership) and nodes without a lineage yet accept.
#[derive(Clone)]
pub struct CheckLineage(pub Lineage);

impl tonic::service::Interceptor for CheckLineage {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        let Some(theirs) = req.metadata().get(LINEAGE_HEADER) else {
            return Ok(req);
        };
        let theirs = theirs.to_str().unwrap_or("");
        let ours = match self.0.read() {
            Ok(g) => g.clone(),
            Err(p) => p.into_inner().clone(),
        };
        if !ours.is_empty() && !theirs.is_empty() && theirs != ours {
            tracing::warn!(theirs, ours = %ours, "refused a peer request from another cluster lineage");
            return Err(tonic::Status::failed_precondition(format!(
                "[MR-LINEAGE] request from cluster {theirs}, but this node belongs to cluster \
                 {ours}: nodes of another lineage (the old primary after a DR promotion or a \
                 restore) are refused"
            )));
        }
        Ok(req)
    }
}

pub type PeerConn =
    PeerClient<tonic::service::interceptor::InterceptedService<Channel, StampLineage>>;

impl PeerPool {
    pub fn new(lineage: Lineage, tls: Option<crate::tls::Live<rustls::ClientConfig>>) -> PeerPool {
        PeerPool {
            channels: Mutex::default(),
            lineage,
            tls,
        }
    }

    pub fn channel(&self, addr: &str) -> Result<Channel, NetError> {
        let mut m = match self.channels.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        if let Some(c) = m.get(addr) {
            return Ok(c.clone());
        }
        let ep = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| NetError::Address {
                addr: addr.to_string(),
                reason: e.to_string(),
            })?
            // Bounds the TCP connect and the TLS handshake (the dialer sets TCP_NODELAY).
            .connect_timeout(Duration::from_millis(500))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .initial_connection_window_size(Some(8 << 20))
            .initial_stream_window_size(Some(4 << 20));
        let ch = ep.connect_with_connector_lazy(dial::Dialer {
            tls: self.tls.clone(),
            coalesce: false,
        });
        m.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    pub fn client(&self, addr: &str) -> Result<PeerConn, NetError> {
        Ok(
            PeerClient::with_interceptor(self.channel(addr)?, StampLineage(self.lineage.clone()))
                .max_decoding_message_size(MAX_PEER_MESSAGE)
                .max_encoding_message_size(MAX_PEER_MESSAGE),
        )
    }

    /// Sends a bincode-encoded request as a `Blob` and decodes the answer.
    pub async fn call_blob<Req, Resp, F, Fut>(
        &self,
        addr: &str,
        timeout: Duration,
        req: &Req,
        f: F,
    ) -> Result<Resp, NetError>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(PeerConn, Blob) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Blob>, tonic::Status>>,
    {
        let data = encode(req).map_err(|e| NetError::Codec {
            addr: addr.into(),
            reason: e.to_string(),
        })?;
        let client = self.client(addr)?;
        let resp = tokio::time::timeout(timeout, f(client, Blob { data }))
            .await
            .map_err(|_| NetError::Unreachable {
                addr: addr.into(),
                reason: format!("timed out after {timeout:?}"),
            })?
            .map_err(|s| status_to_net(addr, s))?;
        decode(&resp.into_inner().data).map_err(|e| NetError::Codec {
            addr: addr.into(),
            reason: e.to_string(),
        })
    }
}

impl PeerPool {
    /// Sends several bincode-encoded writes in one ForwardBatch call; one answer per write, in
    /// order, always exactly `reqs.len()` of them. A leader from before ForwardBatch answers
    /// UNIMPLEMENTED: the writes then go one Forward call each (rolling upgrades).
    pub async fn forward_batch<Req, Resp>(
        &self,
        addr: &str,
        timeout: Duration,
        reqs: &[Req],
    ) -> Vec<Result<Resp, NetError>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
    {
        let r: Result<Vec<Resp>, NetError> = self
            .call_blob(addr, timeout, &reqs, |mut c, b| async move {
                c.forward_batch(b).await
            })
            .await;
        match r {
            Ok(results) if results.len() == reqs.len() => results.into_iter().map(Ok).collect(),
            Ok(results) => {
                let e = NetError::Codec {
                    addr: addr.into(),
                    reason: format!(
                        "{} answers for {} forwarded writes",
                        results.len(),
                        reqs.len()
                    ),
                };
                reqs.iter().map(|_| Err(e.clone())).collect()
            }
            Err(NetError::Status {
                code: tonic::Code::Unimplemented,
                ..
            }) => {
                let calls = reqs.iter().map(|req| {
                    self.call_blob(
                        addr,
                        timeout,
                        req,
                        |mut c, b| async move { c.forward(b).await },
                    )
                });
                futures::future::join_all(calls).await
            }
            Err(e) => reqs.iter().map(|_| Err(e.clone())).collect(),
        }
    }
}

impl PeerPool {
    /// The status of the node at `addr` (its peer port), or why there is none within `timeout`.
    pub async fn node_status(
        &self,
        addr: &str,
        with_hash: bool,
        timeout: Duration,
    ) -> Result<crate::pb::peer::NodeStatusResponse, NetError> {
        let mut c = self.client(addr)?;
        let req = crate::pb::peer::NodeStatusRequest { with_hash };
        match tokio::time::timeout(timeout, c.node_status(req)).await {
            Err(_) => Err(NetError::Unreachable {
                addr: addr.into(),
                reason: "timeout".into(),
            }),
            Ok(Err(s)) => Err(status_to_net(addr, s)),
            Ok(Ok(r)) => Ok(r.into_inner()),
        }
    }
}

pub(crate) fn status_to_net(addr: &str, s: tonic::Status) -> NetError {
    match s.code() {
        tonic::Code::Unavailable
        | tonic::Code::Unknown
        | tonic::Code::Cancelled
        | tonic::Code::DeadlineExceeded => NetError::Unreachable {
            addr: addr.into(),
            reason: s.message().to_string(),
        },
        code => NetError::Status {
            addr: addr.into(),
            code,
            message: s.message().to_string(),
        },
    }
}

/// Creates openraft network clients over the shared pool.
#[derive(Clone)]
pub struct NetworkFactory {
    pub self_id: NodeId,
    pub pool: Arc<PeerPool>,
    /// Bytes per second a snapshot transfer may be as slow as (sets its timeout with its size).
    pub snapshot_min_bytes_per_sec: u64,
    /// Members found to have lost acknowledged entries (see [`lost`]).
    pub lost: Arc<lost::LostMembers>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

impl RaftNetworkFactory<TypeConfig> for NetworkFactory {
    type Network = PeerNetwork;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerNetwork {
        PeerNetwork {
            target,
            self_id: self.self_id,
            addr: node.peer_addr.clone(),
            pool: self.pool.clone(),
            snapshot_min_bytes_per_sec: self.snapshot_min_bytes_per_sec,
            guard: lost::ReversionGuard::new(target, self.lost.clone(), self.metrics.clone()),
        }
    }
}

pub struct PeerNetwork {
    target: NodeId,
    self_id: NodeId,
    addr: String,
    pool: Arc<PeerPool>,
    snapshot_min_bytes_per_sec: u64,
    guard: lost::ReversionGuard,
}

/// The timeout of one snapshot transfer: the configured floor, or long enough to move `bytes`
/// at `min_bytes_per_sec` plus 30 s, whichever is longer.
pub fn snapshot_timeout(floor: Duration, bytes: u64, min_bytes_per_sec: u64) -> Duration {
    let transfer = Duration::from_secs_f64(bytes as f64 / min_bytes_per_sec.max(1) as f64);
    floor.max(transfer + Duration::from_secs(30))
}

fn net_err<E: std::fmt::Display>(e: E) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::new(&AnyError::error(e.to_string())))
}

fn to_rpc_err(e: NetError) -> RPCError<TypeConfig> {
    match e {
        NetError::Unreachable { .. } => {
            RPCError::Unreachable(Unreachable::new(&AnyError::error(e.to_string())))
        }
        other => net_err(other),
    }
}

impl PeerNetwork {
    fn guard_self(&self) -> Result<(), RPCError<TypeConfig>> {
        if self.target == self.self_id {
            return Err(net_err(format!(
                "refusing to connect node {} to itself",
                self.self_id
            )));
        }
        Ok(())
    }

    async fn call<Req, Resp, F, Fut>(
        &self,
        option: &RPCOption,
        req: &Req,
        f: F,
    ) -> Result<Resp, RPCError<TypeConfig>>
    where
        Req: serde::Serialize,
        Resp: serde::de::DeserializeOwned,
        F: FnOnce(PeerConn, Blob) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Blob>, tonic::Status>>,
    {
        self.guard_self()?;
        let r: Result<Resp, String> = self
            .pool
            .call_blob(&self.addr, option.hard_ttl(), req, f)
            .await
            .map_err(to_rpc_err)?;
        r.map_err(net_err)
    }
}

impl RaftNetworkV2<TypeConfig> for PeerNetwork {
    type SnapshotData = SnapshotDir;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        // openraft calls this only from its default `stream_append`, which is overridden
        // below; replication and heartbeats both go through `stream_append`.
        self.call(&option, &rpc, |mut c, b| async move {
            c.append_entries(b).await
        })
        .await
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        _option: RPCOption,
    ) -> openraft::base::BoxFuture<
        's,
        Result<
            openraft::base::BoxStream<
                's,
                Result<openraft::raft::StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>,
            >,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: futures::Stream<Item = AppendEntriesRequest<TypeConfig>>
            + openraft::OptionalSend
            + Unpin
            + 'static,
    {
        use futures::StreamExt;
        Box::pin(async move {
            self.guard_self()?;
            // The first request is taken before connecting. openraft applies its replication
            // backoff while it produces a request, so a transport that failed before taking one
            // (a peer refusing connections) was retried at once: with one follower down the
            // leader spun a core and logged about 135,000 warnings a second. Taking it first
            // spaces the attempts by `Config::backoff` (200 ms, doubling to 1 s).
            let mut input = input;
            let Some(first) = input.next().await else {
                // Nothing to send (replication closed): what the peer would answer to it.
                let none: openraft::base::BoxStream<'s, _> = Box::pin(futures::stream::empty());
                return Ok(none);
            };
            let mut client = self.pool.client(&self.addr).map_err(to_rpc_err)?;
            let addr = self.addr.clone();
            let (sent, answered) = (self.guard.clone(), self.guard.clone());
            // An encode failure sends an empty message, which the receiver rejects: never a gap.
            let input = futures::stream::iter(Some(first)).chain(input);
            let out = coalesce::fold_commit_only(input, coalesce::COMMIT_HOLD).map(move |req| {
                sent.sending(&req.vote);
                Blob {
                    data: encode(&req).unwrap_or_default(),
                }
            });
            let resp = client
                .append_stream(out)
                .await
                .map_err(|s| to_rpc_err(status_to_net(&addr, s)))?;
            let strm = resp.into_inner().map(move |item| {
                let blob = item.map_err(|s| to_rpc_err(status_to_net(&addr, s)))?;
                let r: Result<openraft::raft::StreamAppendResult<TypeConfig>, String> =
                    decode(&blob.data).map_err(net_err)?;
                let r = r.map_err(net_err)?;
                match &r {
                    Ok(Some(matching)) => answered.acknowledged(matching.index),
                    Err(openraft::raft::StreamAppendError::Conflict(c)) => {
                        answered.conflict(c.index);
                    }
                    _ => {}
                }
                Ok(r)
            });
            let boxed: openraft::base::BoxStream<'s, _> = Box::pin(strm);
            Ok(boxed)
        })
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&option, &rpc, |mut c, b| async move { c.vote(b).await })
            .await
    }

    /// A real Pre-Vote round trip. openraft's default answers "granted" without asking, so an
    /// isolated follower won the pre-vote on its own, raised its term at every election timeout
    /// and, on rejoining, deposed the healthy leader with it.
    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.guard_self()?;
        let r: Result<Result<VoteResponse<TypeConfig>, String>, NetError> = self
            .pool
            .call_blob(&self.addr, option.hard_ttl(), &rpc, |mut c, b| async move {
                c.pre_vote(b).await
            })
            .await;
        match r {
            Ok(answer) => answer.map_err(net_err),
            Err(NetError::Status {
                code: tonic::Code::Unimplemented,
                ..
            }) => Ok(VoteResponse::new(rpc.vote, None, true)),
            Err(e) => Err(to_rpc_err(e)),
        }
    }

    async fn full_snapshot(
        &mut self,
        vote: Vote,
        snapshot: openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir>,
        cancel: impl Future<Output = ReplicationClosed> + openraft::OptionalSend + 'static,
        option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        if self.target == self.self_id {
            return Err(StreamingError::Network(NetworkError::new(
                &AnyError::error("snapshot to self"),
            )));
        }
        let client = self.pool.client(&self.addr).map_err(|e| {
            StreamingError::Network(NetworkError::new(&AnyError::error(e.to_string())))
        })?;
        let dir = snapshot.snapshot.path.clone();
        let bytes = tokio::task::spawn_blocking(move || crate::checkpoint_files::dir_bytes(&dir))
            .await
            .unwrap_or(0);
        let timeout = snapshot_timeout(option.hard_ttl(), bytes, self.snapshot_min_bytes_per_sec);
        let send = snapshot::send(client, self.addr.clone(), vote, snapshot, timeout);
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            r = send => r.map_err(|e| match e {
                NetError::Unreachable { .. } => StreamingError::Unreachable(Unreachable::new(&AnyError::error(e.to_string()))),
                other => StreamingError::Network(NetworkError::new(&AnyError::error(other.to_string()))),
            }),
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        self.call(&option, &req, |mut c, b| async move {
            c.transfer_leader(b).await
        })
        .await
    }
}

#[cfg(test)]
mod tests;
