//! Public gRPC services on the client port: `Kv`, `Cluster`, `Backup` (backup.rs) and the
//! metadata services `Metadata`, `Identity` and `Rbac` (meta.rs).
//!
//! Requests are validated here (sizes, empty keys, unknown enum values), turned into one Raft
//! command per write, and answered with the revision. Errors go through [`status`].

/// Runs an RPC body, records its latency and status code, and turns errors into a `Status`.
/// (Defined before the submodules so `meta.rs` uses the same one.)
macro_rules! rpc {
    ($self:ident, $name:literal, $call:expr) => {{
        let t = std::time::Instant::now();
        let r = $call
            .await
            .map(tonic::Response::new)
            .map_err(tonic::Status::from);
        $self.observe($name, t, &r);
        r
    }};
}

pub mod backup;
pub mod meta;
pub mod status;

use std::sync::Arc;
use std::time::Instant;

use tonic::{Request, Response, Status};

use crate::consensus::{AdminRequest, Consensus, Consistency, DrStatus, MembershipView, Reader};
use crate::fsm::{self, Command};
use crate::pb;
use crate::pb::cluster_server::Cluster;
use crate::pb::kv_server::Kv;
use crate::raft_types::Node;
use status::{code_name, ApiError};

pub struct Api {
    pub node: Arc<Consensus>,
    /// The other members, for the status calls `cluster status` fans out.
    pub peers: Arc<crate::net::PeerPool>,
}

type ApiResult<T> = Result<T, ApiError>;

impl Api {
    fn limits(&self) -> &crate::config::Limits {
        &self.node.config().limits
    }

    fn check_key(&self, key: &[u8]) -> ApiResult<()> {
        if key.is_empty() {
            return Err(ApiError::Invalid("key must not be empty".into()));
        }
        if key.len() > self.limits().max_key_bytes {
            return Err(ApiError::TooLarge(format!(
                "key is {} bytes, limit {}",
                key.len(),
                self.limits().max_key_bytes
            )));
        }
        Ok(())
    }

    fn check_value(&self, v: &[u8]) -> ApiResult<()> {
        if v.len() > self.limits().max_value_bytes {
            return Err(ApiError::TooLarge(format!(
                "value is {} bytes, limit {}",
                v.len(),
                self.limits().max_value_bytes
            )));
        }
        Ok(())
    }

    fn check_request_id(&self, id: &str) -> ApiResult<()> {
        if id.len() > 256 {
            return Err(ApiError::Invalid(format!(
                "request_id is {} bytes, limit 256",
                id.len()
            )));
        }
        Ok(())
    }

    /// Makes the local state fresh enough for `opts`; returns the reader to read it through.
    async fn read(&self, opts: Option<pb::ReadOptions>) -> ApiResult<Reader> {
        let o = opts.unwrap_or_default();
        let c = pb::Consistency::try_from(o.consistency)
            .map_err(|_| ApiError::Invalid(format!("unknown consistency {}", o.consistency)))?;
        let c = match c {
            pb::Consistency::Unspecified | pb::Consistency::Linearizable => {
                Consistency::Linearizable
            }
            pb::Consistency::Session => Consistency::Session {
                min_revision: o.min_revision,
            },
            pb::Consistency::Stale => Consistency::Stale { max_lag: o.max_lag },
            pb::Consistency::Lease => Consistency::Lease,
        };
        Ok(self.node.read(c).await?)
    }

    async fn write(&self, request_id: String, cmd: Command) -> ApiResult<fsm::Response> {
        let resp = self.node.write(fsm::Request::new(request_id, cmd)).await?;
        match resp {
            fsm::Response::RevisionMismatch {
                expected, actual, ..
            } => Err(ApiError::RevisionMismatch { expected, actual }),
            fsm::Response::UnsupportedFormat { version, .. } => Err(ApiError::Internal(format!(
                "command format {version} unsupported"
            ))),
            other => Ok(other),
        }
    }

    fn observe<T>(&self, rpc: &'static str, t: Instant, r: &Result<T, Status>) {
        let code = match r {
            Ok(_) => "ok",
            Err(s) => code_name(s.code()),
        };
        self.node.metrics().observe_rpc(rpc, code, t.elapsed());
    }

    async fn put_inner(&self, r: pb::PutRequest) -> ApiResult<pb::PutResponse> {
        self.check_key(&r.key)?;
        self.check_value(&r.value)?;
        self.check_request_id(&r.request_id)?;
        let cmd = Command::Put {
            key: r.key,
            value: r.value,
            expected_revision: r.expected_revision,
        };
        match self.write(r.request_id, cmd).await? {
            fsm::Response::Put {
                revision,
                prev_revision,
            } => Ok(pb::PutResponse {
                revision,
                prev_revision,
            }),
            other => Err(ApiError::Internal(format!(
                "unexpected response to put: {other:?}"
            ))),
        }
    }

    async fn delete_inner(&self, r: pb::DeleteRequest) -> ApiResult<pb::DeleteResponse> {
        self.check_key(&r.key)?;
        self.check_request_id(&r.request_id)?;
        let cmd = Command::Delete {
            key: r.key,
            expected_revision: r.expected_revision,
        };
        match self.write(r.request_id, cmd).await? {
            fsm::Response::Delete { revision, deleted } => {
                Ok(pb::DeleteResponse { revision, deleted })
            }
            other => Err(ApiError::Internal(format!(
                "unexpected response to delete: {other:?}"
            ))),
        }
    }

    async fn get_inner(&self, r: pb::GetRequest) -> ApiResult<pb::GetResponse> {
        self.check_key(&r.key)?;
        let (value, applied) = self.read(r.read).await?.get(&r.key)?;
        Ok(pb::GetResponse {
            kv: value.map(to_kv),
            applied_index: applied,
        })
    }

    async fn range_inner(&self, r: pb::RangeRequest) -> ApiResult<pb::RangeResponse> {
        let max = self.limits().max_range_limit;
        if r.limit > max {
            return Err(ApiError::TooLarge(format!(
                "limit {} exceeds max_range_limit {max}",
                r.limit
            )));
        }
        if r.prefix.len() > self.limits().max_key_bytes
            || r.start_after.len() > self.limits().max_key_bytes
        {
            return Err(ApiError::TooLarge(
                "prefix or start_after longer than max_key_bytes".into(),
            ));
        }
        let limit = if r.limit == 0 { max } else { r.limit } as usize;
        let reader = self.read(r.read).await?;
        let (prefix, after) = (r.prefix, r.start_after);
        let (vals, more, applied) =
            tokio::task::spawn_blocking(move || reader.range(&prefix, &after, limit))
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))??;
        let kvs = vals
            .into_iter()
            .map(|v| {
                let mut kv = to_kv(v);
                if r.keys_only {
                    kv.value.clear();
                }
                kv
            })
            .collect();
        Ok(pb::RangeResponse {
            kvs,
            more,
            applied_index: applied,
        })
    }

    async fn txn_inner(&self, r: pb::TxnRequest) -> ApiResult<pb::TxnResponse> {
        self.check_request_id(&r.request_id)?;
        let n = r.compares.len() + r.success.len() + r.failure.len();
        if n > self.limits().max_txn_ops {
            return Err(ApiError::TooLarge(format!(
                "txn has {n} compares and ops, limit {}",
                self.limits().max_txn_ops
            )));
        }
        let mut compares = Vec::with_capacity(r.compares.len());
        for c in r.compares {
            self.check_key(&c.key)?;
            compares.push(match c.target {
                Some(pb::compare::Target::ModRevision(revision)) => fsm::Compare::Revision {
                    key: c.key,
                    revision,
                },
                Some(pb::compare::Target::Value(value)) => {
                    fsm::Compare::Value { key: c.key, value }
                }
                None => {
                    return Err(ApiError::Invalid(
                        "compare without a target (mod_revision or value)".into(),
                    ))
                }
            });
        }
        let success = self.ops(r.success)?;
        let failure = self.ops(r.failure)?;
        match self
            .write(
                r.request_id,
                Command::Txn {
                    compares,
                    success,
                    failure,
                },
            )
            .await?
        {
            fsm::Response::Txn {
                revision,
                succeeded,
            } => Ok(pb::TxnResponse {
                succeeded,
                revision,
            }),
            other => Err(ApiError::Internal(format!(
                "unexpected response to txn: {other:?}"
            ))),
        }
    }

    fn ops(&self, ops: Vec<pb::TxnOp>) -> ApiResult<Vec<fsm::Op>> {
        ops.into_iter()
            .map(|o| match o.op {
                Some(pb::txn_op::Op::Put(p)) => {
                    self.check_key(&p.key)?;
                    self.check_value(&p.value)?;
                    Ok(fsm::Op::Put {
                        key: p.key,
                        value: p.value,
                    })
                }
                Some(pb::txn_op::Op::Delete(d)) => {
                    self.check_key(&d.key)?;
                    Ok(fsm::Op::Delete { key: d.key })
                }
                None => Err(ApiError::Invalid("txn op without put or delete".into())),
            })
            .collect()
    }
}

fn to_kv(v: crate::storage::StoredValue) -> pb::KeyValue {
    pb::KeyValue {
        key: v.key,
        value: v.record.value,
        create_revision: v.record.create_revision,
        mod_revision: v.record.mod_revision,
        version: v.record.version,
    }
}

#[tonic::async_trait]
impl Kv for Api {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        rpc!(self, "Put", self.put_inner(req.into_inner()))
    }
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        rpc!(self, "Get", self.get_inner(req.into_inner()))
    }
    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        rpc!(self, "Delete", self.delete_inner(req.into_inner()))
    }
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        rpc!(self, "Range", self.range_inner(req.into_inner()))
    }
    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        rpc!(self, "Txn", self.txn_inner(req.into_inner()))
    }
}

fn membership_response(v: MembershipView) -> pb::MembershipResponse {
    pb::MembershipResponse {
        revision: v.revision,
        voters: v.voters,
        learners: v.learners,
    }
}

impl Api {
    async fn status_inner(
        &self,
        r: pb::ClusterStatusRequest,
    ) -> ApiResult<pb::ClusterStatusResponse> {
        let local = self.node.local_status();
        let leader_last = local.replication.clone();
        let mut members = Vec::new();
        let mut calls = Vec::new();
        for (id, (node, voter)) in &local.members {
            let pool = self.peers.clone();
            let addr = node.peer_addr.clone();
            let (id, voter, node) = (*id, *voter, node.clone());
            let with_hash = r.with_hash;
            calls.push(async move {
                let res = pool
                    .node_status(&addr, with_hash, std::time::Duration::from_secs(3))
                    .await;
                (id, voter, node, res)
            });
        }
        let results = futures::future::join_all(calls).await;
        // Lag: entries behind the leader's last log index. The leader's own view (replication
        // progress) is used when we are the leader; otherwise the leader's NodeStatus answer.
        let leader_last_log = if local.role == "leader" {
            Some(local.last_log_index)
        } else {
            results.iter().find_map(|(id, _, _, r)| match r {
                Ok(s) if Some(*id) == local.leader => Some(s.last_log_index),
                _ => None,
            })
        };
        for (id, voter, node, res) in results {
            let mut m = pb::MemberStatus {
                node_id: id,
                peer_addr: node.peer_addr.clone(),
                client_addr: node.client_addr.clone(),
                voter,
                ..Default::default()
            };
            match res {
                Ok(s) => {
                    m.role = if s.role == "learner" || voter {
                        s.role
                    } else {
                        "learner".into()
                    };
                    m.term = s.term;
                    m.last_log_index = s.last_log_index;
                    m.commit_index = s.commit_index;
                    m.applied_index = s.applied_index;
                    m.state_hash = s.state_hash;
                    m.hash_index = s.hash_index;
                    if m.client_addr.is_empty() {
                        m.client_addr = s.client_addr;
                    }
                    m.lag = match (leader_last_log, leader_last.get(&id)) {
                        (Some(last), Some(matched))
                            if local.role == "leader" && id != local.node_id =>
                        {
                            Some(last.saturating_sub(*matched))
                        }
                        (Some(last), _) => Some(last.saturating_sub(m.last_log_index)),
                        _ => None,
                    };
                }
                Err(e) => {
                    m.role = "unreachable".into();
                    m.error = e.to_string();
                }
            }
            members.push(m);
        }
        Ok(pb::ClusterStatusResponse {
            leader: local.leader,
            term: local.term,
            members,
            answered_by: local.node_id,
        })
    }

    fn check_node_id(id: u64) -> ApiResult<()> {
        if id == 0 {
            return Err(ApiError::Invalid("node_id must be >= 1".into()));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Cluster for Api {
    async fn status(
        &self,
        req: Request<pb::ClusterStatusRequest>,
    ) -> Result<Response<pb::ClusterStatusResponse>, Status> {
        rpc!(self, "Status", self.status_inner(req.into_inner()))
    }

    async fn add_learner(
        &self,
        req: Request<pb::AddLearnerRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let r = req.into_inner();
        rpc!(self, "AddLearner", async {
            Self::check_node_id(r.node_id)?;
            for (k, a) in [("peer_addr", &r.peer_addr), ("client_addr", &r.client_addr)] {
                if k == "client_addr" && a.is_empty() {
                    continue;
                }
                a.parse::<std::net::SocketAddr>()
                    .map_err(|e| ApiError::Invalid(format!("{k} {a:?} is not host:port: {e}")))?;
            }
            let node = Node {
                peer_addr: r.peer_addr,
                client_addr: r.client_addr,
            };
            Ok::<_, ApiError>(membership_response(
                self.node
                    .admin(AdminRequest::AddLearner {
                        id: r.node_id,
                        node,
                    })
                    .await?,
            ))
        })
    }

    async fn promote(
        &self,
        req: Request<pb::NodeIdRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = req.into_inner().node_id;
        rpc!(self, "Promote", async {
            Self::check_node_id(id)?;
            Ok::<_, ApiError>(membership_response(
                self.node.admin(AdminRequest::Promote { id }).await?,
            ))
        })
    }

    async fn remove(
        &self,
        req: Request<pb::NodeIdRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = req.into_inner().node_id;
        rpc!(self, "Remove", async {
            Self::check_node_id(id)?;
            Ok::<_, ApiError>(membership_response(
                self.node.admin(AdminRequest::Remove { id }).await?,
            ))
        })
    }

    async fn transfer_leader(
        &self,
        req: Request<pb::NodeIdRequest>,
    ) -> Result<Response<pb::MembershipResponse>, Status> {
        let id = req.into_inner().node_id;
        rpc!(self, "TransferLeader", async {
            Self::check_node_id(id)?;
            Ok::<_, ApiError>(membership_response(
                self.node.admin(AdminRequest::TransferLeader { id }).await?,
            ))
        })
    }

    async fn dr_status(
        &self,
        _req: Request<pb::DrStatusRequest>,
    ) -> Result<Response<pb::DrStatusResponse>, Status> {
        rpc!(self, "DrStatus", async {
            Ok::<_, ApiError>(dr_status_to_pb(self.node.dr_status()))
        })
    }

    async fn dr_promote(
        &self,
        req: Request<pb::DrPromoteRequest>,
    ) -> Result<Response<pb::DrPromoteResponse>, Status> {
        let id = req.into_inner().node_id;
        rpc!(self, "DrPromote", async {
            if !self.node.is_dr_replica() {
                return Err(ApiError::NotDr(format!(
                    "node {} is not a DR replica (serve --dr-replica); refusing to promote it",
                    self.node.id()
                )));
            }
            if id != self.node.id() {
                return Err(ApiError::Invalid(format!(
                    "node_id {id} given, but this endpoint is node {}",
                    self.node.id()
                )));
            }
            let previous = self.node.cluster_id()?;
            let state_index = self.node.applied_index();
            tracing::warn!(node = self.node.id(), state_index, "DR promotion requested");
            let node = self.node.clone();
            tokio::spawn(async move {
                // Let the answer reach the caller before the node restarts.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                node.request_promotion();
            });
            Ok(pb::DrPromoteResponse {
                previous_cluster_id: previous,
                state_index,
            })
        })
    }
}

fn dr_status_to_pb(s: DrStatus) -> pb::DrStatusResponse {
    pb::DrStatusResponse {
        node_id: s.node_id,
        dr_replica: s.dr_replica,
        cluster_id: s.cluster_id,
        leader: s.leader,
        term: s.term,
        known_commit_index: s.known_commit_index,
        applied_index: s.applied_index,
        lag_entries: s.lag_entries,
        lag_bytes: s.lag_bytes,
        lag_ms: s.lag_ms,
        last_contact_ms_ago: s.last_contact_ms_ago,
        snapshots_received: s.snapshots_received,
        role: s.role.to_string(),
    }
}
