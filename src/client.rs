//! Client library for the Kv, Cluster, Backup and metadata services: several endpoints, fail-over on UNAVAILABLE.
//! Used by the CLI, `metaraft bench` and the cluster tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::pb;
use crate::pb::backup_client::BackupClient;
use crate::pb::cluster_client::ClusterClient;
use crate::pb::identity_client::IdentityClient;
use crate::pb::kv_client::KvClient;
use crate::pb::metadata_client::MetadataClient;
use crate::pb::rbac_client::RbacClient;

/// A fail-over method for one RPC; `write` ones get a request id so retries apply once.
macro_rules! rpc_method {
    ($(#[$m:meta])* $name:ident, $svc:ident, $rpc:ident, $req:ty, $resp:ty, write) => {
        $(#[$m])*
        pub async fn $name(&self, mut req: $req) -> Result<$resp, ClientError> {
            fill_request_id(&mut req.request_id);
            self.with_failover(|ch| {
                let r = req.clone();
                async move { $svc::new(ch).$rpc(r).await }
            })
            .await
        }
    };
    ($(#[$m:meta])* $name:ident, $svc:ident, $rpc:ident, $req:ty, $resp:ty, read) => {
        $(#[$m])*
        pub async fn $name(&self, req: $req) -> Result<$resp, ClientError> {
            self.with_failover(|ch| {
                let r = req.clone();
                async move { $svc::new(ch).$rpc(r).await }
            })
            .await
        }
    };
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no endpoints given")]
    NoEndpoints,
    #[error("bad endpoint {0:?}: {1}")]
    BadEndpoint(String, String),
    #[error("{}: {}{}", .0.code(), .0.message(), root_cause(.0))]
    Status(Box<Status>),
}

/// " (<innermost cause>)" of a status that carries one, else "": a transport failure says only
/// "transport error" on its own, and its cause is what an operator needs (e.g. the TLS alert).
fn root_cause(s: &Status) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    let mut last = None;
    while let Some(c) = cause {
        last = Some(c);
        cause = c.source();
    }
    match last.map(|c| c.to_string()) {
        Some(t) if !t.is_empty() && !s.message().contains(&t) => format!(" ({t})"),
        _ => String::new(),
    }
}

impl From<Status> for ClientError {
    fn from(s: Status) -> Self {
        ClientError::Status(Box::new(s))
    }
}

impl ClientError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ClientError::Status(s) => Some(s.code()),
            _ => None,
        }
    }
}

pub struct Client {
    endpoints: Vec<String>,
    channels: Vec<Channel>,
    next: AtomicUsize,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
}

/// A new request id, so retries of one logical write are recognised: 32 hex digits, the wall
/// clock in nanoseconds then 64 random bits. Ids that grow with time land next to each other in
/// the state machine's request-id records (`keys::dedup_at`), so storing one is an insert at the
/// tail of RocksDB's memtable and of the newest SST files instead of at a random place in all of
/// them (+4-6% writes at 64 in flight; docs/benchmarks.md, eighth session). Any unique string
/// is still a valid id; a clock that steps back only costs that locality.
pub fn new_request_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    format!("{nanos:016x}{:016x}", rand::random::<u64>())
}

fn fill_request_id(id: &mut String) {
    if id.is_empty() {
        *id = new_request_id();
    }
}

/// Whether another endpoint might succeed where this one failed.
fn retryable(s: &Status) -> bool {
    matches!(
        s.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled
    )
}

impl Client {
    /// `endpoints`: `host:port` of client ports. Channels connect lazily.
    pub fn new(endpoints: &[String], timeout: Duration) -> Result<Client, ClientError> {
        Self::with_tls(endpoints, timeout, None)
    }

    /// [`Client::new`], over TLS when `tls` is given (see `crate::tls::client_config`).
    pub fn with_tls(
        endpoints: &[String],
        timeout: Duration,
        tls: Option<Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        if endpoints.is_empty() {
            return Err(ClientError::NoEndpoints);
        }
        let mut channels = Vec::new();
        for e in endpoints {
            channels.push(channel_tls(e, timeout, tls.clone())?);
        }
        Ok(Client {
            endpoints: endpoints.to_vec(),
            channels,
            next: AtomicUsize::new(0),
            timeout,
            tls,
        })
    }

    /// The TLS configuration this client dials with (None: plaintext), for a client of another
    /// endpoint of the same cluster.
    pub fn tls(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A client pinned to endpoint `i` (no fail-over), for tests and per-node reads.
    pub fn kv_at(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channels[i % self.channels.len()].clone())
    }

    pub fn cluster_at(&self, i: usize) -> ClusterClient<Channel> {
        ClusterClient::new(self.channels[i % self.channels.len()].clone())
    }

    pub fn metadata_at(&self, i: usize) -> MetadataClient<Channel> {
        MetadataClient::new(self.channels[i % self.channels.len()].clone())
    }

    pub fn rbac_at(&self, i: usize) -> RbacClient<Channel> {
        RbacClient::new(self.channels[i % self.channels.len()].clone())
    }

    /// Tries endpoints round-robin until one answers with something other than UNAVAILABLE.
    async fn with_failover<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: Fn(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let n = self.channels.len();
        let mut last = None;
        let deadline = tokio::time::Instant::now() + self.timeout;
        // Two rounds: an election may be in progress during the first.
        for attempt in 0..(2 * n) {
            let ch = self.channels[(start + attempt) % n].clone();
            match f(ch).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(&s) && tokio::time::Instant::now() < deadline => {
                    last = Some(s);
                    if attempt + 1 == n {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                }
                Err(s) => return Err(s.into()),
            }
        }
        Err(last
            .unwrap_or_else(|| Status::unavailable("no endpoint answered"))
            .into())
    }

    /// Puts; a missing request id is filled in so fail-over retries never apply twice.
    pub async fn put(&self, mut req: pb::PutRequest) -> Result<pb::PutResponse, ClientError> {
        fill_request_id(&mut req.request_id);
        self.with_failover(|ch| {
            let r = req.clone();
            async move { KvClient::new(ch).put(r).await }
        })
        .await
    }

    pub async fn get(&self, req: pb::GetRequest) -> Result<pb::GetResponse, ClientError> {
        self.with_failover(|ch| {
            let r = req.clone();
            async move { KvClient::new(ch).get(r).await }
        })
        .await
    }

    pub async fn delete(
        &self,
        mut req: pb::DeleteRequest,
    ) -> Result<pb::DeleteResponse, ClientError> {
        fill_request_id(&mut req.request_id);
        self.with_failover(|ch| {
            let r = req.clone();
            async move { KvClient::new(ch).delete(r).await }
        })
        .await
    }

    pub async fn range(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, ClientError> {
        self.with_failover(|ch| {
            let r = req.clone();
            async move { KvClient::new(ch).range(r).await }
        })
        .await
    }

    pub async fn txn(&self, mut req: pb::TxnRequest) -> Result<pb::TxnResponse, ClientError> {
        fill_request_id(&mut req.request_id);
        self.with_failover(|ch| {
            let r = req.clone();
            async move { KvClient::new(ch).txn(r).await }
        })
        .await
    }

    rpc_method!(
        meta_create,
        MetadataClient,
        create,
        pb::CreateResourceRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        meta_get,
        MetadataClient,
        get,
        pb::GetResourceRequest,
        pb::ResourceResponse,
        read
    );
    rpc_method!(
        meta_update,
        MetadataClient,
        update,
        pb::UpdateResourceRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        meta_delete,
        MetadataClient,
        delete,
        pb::DeleteResourceRequest,
        pb::DeleteResourceResponse,
        write
    );
    rpc_method!(
        meta_list,
        MetadataClient,
        list,
        pb::ListResourcesRequest,
        pb::ListResourcesResponse,
        read
    );
    rpc_method!(
        set_step_status,
        MetadataClient,
        set_step_status,
        pb::SetStatusRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        set_run_status,
        MetadataClient,
        set_run_status,
        pb::SetStatusRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        heartbeat,
        MetadataClient,
        heartbeat,
        pb::HeartbeatRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        promote_model_version,
        MetadataClient,
        promote_model_version,
        pb::PromoteRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        purge_runs,
        MetadataClient,
        purge_runs,
        pb::PurgeRunsRequest,
        pb::PurgeRunsResponse,
        write
    );
    rpc_method!(
        find_step_by_cache_key,
        MetadataClient,
        find_step_by_cache_key,
        pb::CacheKeyRequest,
        pb::ResourceResponse,
        read
    );
    rpc_method!(
        create_api_key,
        IdentityClient,
        create_api_key,
        pb::CreateApiKeyRequest,
        pb::CreateApiKeyResponse,
        write
    );
    rpc_method!(
        revoke_api_key,
        IdentityClient,
        revoke_api_key,
        pb::RevokeApiKeyRequest,
        pb::ResourceResponse,
        write
    );
    rpc_method!(
        verify_api_key,
        IdentityClient,
        verify_api_key,
        pb::VerifyApiKeyRequest,
        pb::VerifyApiKeyResponse,
        read
    );
    rpc_method!(
        check_permissions,
        RbacClient,
        check_permissions,
        pb::CheckPermissionsRequest,
        pb::CheckPermissionsResponse,
        read
    );
    rpc_method!(
        list_allowed,
        RbacClient,
        list_allowed,
        pb::ListAllowedRequest,
        pb::ListAllowedResponse,
        read
    );
    rpc_method!(
        explain,
        RbacClient,
        explain,
        pb::ExplainRequest,
        pb::ExplainResponse,
        read
    );

    pub async fn status(&self, with_hash: bool) -> Result<pb::ClusterStatusResponse, ClientError> {
        self.with_failover(|ch| async move {
            ClusterClient::new(ch)
                .status(pb::ClusterStatusRequest { with_hash })
                .await
        })
        .await
    }

    pub async fn add_learner(
        &self,
        node_id: u64,
        peer_addr: String,
        client_addr: String,
    ) -> Result<pb::MembershipResponse, ClientError> {
        self.with_failover(|ch| {
            let r = pb::AddLearnerRequest {
                node_id,
                peer_addr: peer_addr.clone(),
                client_addr: client_addr.clone(),
            };
            async move { ClusterClient::new(ch).add_learner(r).await }
        })
        .await
    }

    pub async fn promote(&self, node_id: u64) -> Result<pb::MembershipResponse, ClientError> {
        self.with_failover(|ch| async move {
            ClusterClient::new(ch)
                .promote(pb::NodeIdRequest { node_id })
                .await
        })
        .await
    }

    pub async fn remove(&self, node_id: u64) -> Result<pb::MembershipResponse, ClientError> {
        self.with_failover(|ch| async move {
            ClusterClient::new(ch)
                .remove(pb::NodeIdRequest { node_id })
                .await
        })
        .await
    }

    /// A consistent checkpoint of endpoint `i`'s state machine, streamed.
    pub async fn backup_snapshot(
        &self,
        i: usize,
        max_bytes_per_sec: u64,
    ) -> Result<tonic::Streaming<pb::BackupChunk>, ClientError> {
        let ch = self.channels[i % self.channels.len()].clone();
        Ok(BackupClient::new(ch)
            .max_decoding_message_size(8 << 20)
            .snapshot(pb::BackupSnapshotRequest { max_bytes_per_sec })
            .await?
            .into_inner())
    }

    /// Committed log entries of endpoint `i` from `from_index` on, as they commit.
    pub async fn tail_log(
        &self,
        i: usize,
        from_index: u64,
    ) -> Result<tonic::Streaming<pb::LogRecord>, ClientError> {
        let ch = self.channels[i % self.channels.len()].clone();
        Ok(BackupClient::new(ch)
            .max_decoding_message_size(64 << 20)
            .tail_log(pb::TailLogRequest { from_index })
            .await?
            .into_inner())
    }

    pub async fn transfer_leader(
        &self,
        node_id: u64,
    ) -> Result<pb::MembershipResponse, ClientError> {
        self.with_failover(|ch| async move {
            ClusterClient::new(ch)
                .transfer_leader(pb::NodeIdRequest { node_id })
                .await
        })
        .await
    }
}

/// A lazily connected plaintext HTTP/2 channel to `endpoint` (`host:port`); each call times out
/// after `timeout`. Also what `metaraft bench` drives etcd over, so both systems are measured
/// through the same client transport.
pub fn channel(endpoint: &str, timeout: Duration) -> Result<Channel, ClientError> {
    channel_tls(endpoint, timeout, None)
}

/// [`channel`], over TLS when `tls` is given (the endpoint's host must be in the node's
/// certificate). Dialled by [`crate::net::dial::Dialer`], which coalesces small requests.
pub fn channel_tls(
    endpoint: &str,
    timeout: Duration,
    tls: Option<Arc<rustls::ClientConfig>>,
) -> Result<Channel, ClientError> {
    let ep = Endpoint::from_shared(format!("http://{endpoint}"))
        .map_err(|err| ClientError::BadEndpoint(endpoint.to_string(), err.to_string()))?
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout);
    if tls.is_some() {
        // Refuse a host no certificate could name before any call is made.
        let host = ep.uri().host().unwrap_or_default();
        crate::tls::server_name(host)
            .map_err(|err| ClientError::BadEndpoint(endpoint.to_string(), err.to_string()))?;
    }
    Ok(ep.connect_with_connector_lazy(crate::net::dial::Dialer {
        tls: tls.map(crate::tls::Live::new),
        coalesce: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_unique_hex_and_grow_with_time() {
        let ids: Vec<String> = (0..10_000).map(|_| new_request_id()).collect();
        for id in &ids {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        }
        let unique: std::collections::HashSet<&String> = ids.iter().collect();
        assert_eq!(unique.len(), ids.len());
        // The clock part never goes back within one process run (barring a clock step).
        let first = u64::from_str_radix(&ids[0][..16], 16).expect("hex");
        std::thread::sleep(Duration::from_millis(2));
        let later = new_request_id();
        let last = u64::from_str_radix(&later[..16], 16).expect("hex");
        assert!(last > first, "{later} after {}", ids[0]);
        assert!(later > ids[0], "ids sort by time");
    }

    #[test]
    fn status_errors_show_their_root_cause_once() {
        let mut s = Status::unknown("transport error");
        s.set_source(Arc::new(std::io::Error::other(
            "received fatal alert: CertificateRequired",
        )));
        let e = ClientError::from(s).to_string();
        assert!(
            e.ends_with("transport error (received fatal alert: CertificateRequired)"),
            "{e}"
        );
        let plain = ClientError::from(Status::invalid_argument("empty key")).to_string();
        assert!(plain.ends_with(": empty key"), "{plain}");
        // A cause the message already quotes is not repeated.
        let mut s = Status::unavailable("dial failed: connection refused");
        s.set_source(Arc::new(std::io::Error::other("connection refused")));
        let e = ClientError::from(s).to_string();
        assert!(e.ends_with("dial failed: connection refused"), "{e}");
    }

    #[test]
    fn channel_refuses_an_endpoint_that_is_not_host_port() {
        let err = channel("bad host:1", Duration::from_secs(1)).expect_err("refused");
        assert!(
            matches!(&err, ClientError::BadEndpoint(e, _) if e == "bad host:1"),
            "{err}"
        );
    }
}
