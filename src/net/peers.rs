//! The peer transport as consensus uses it: [`Peers`] over the pooled gRPC connections.

use std::time::Duration;

use futures::future::BoxFuture;
use futures::FutureExt;

use super::{NetError, PeerPool};
use crate::consensus::{AdminRequest, Forwarded, MembershipView, PeerError, Peers};
use crate::fsm::{Request, Response};

impl From<NetError> for PeerError {
    fn from(e: NetError) -> PeerError {
        match e {
            NetError::Unreachable { addr, reason } => PeerError::Unreachable { addr, reason },
            NetError::Status {
                addr,
                code,
                message,
            } => PeerError::Refused {
                addr,
                code: format!("{code:?}"),
                message,
            },
            NetError::Codec { addr, reason } => PeerError::Codec { addr, reason },
            NetError::Address { addr, reason } => PeerError::Address { addr, reason },
        }
    }
}

impl Peers for PeerPool {
    fn forward_batch<'a>(
        &'a self,
        addr: &'a str,
        timeout: Duration,
        reqs: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Result<Forwarded<Response>, PeerError>>> {
        async move {
            let results: Vec<Result<Forwarded<Response>, NetError>> =
                PeerPool::forward_batch(self, addr, timeout, &reqs).await;
            results
                .into_iter()
                .map(|r| r.map_err(PeerError::from))
                .collect()
        }
        .boxed()
    }

    fn read_index<'a>(
        &'a self,
        addr: &'a str,
        lease: bool,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Forwarded<u64>, PeerError>> {
        async move {
            let mut c = self.client(addr)?;
            let req = crate::pb::peer::ReadIndexRequest { lease };
            match tokio::time::timeout(timeout, c.read_index(req)).await {
                Err(_) => Err(PeerError::Timeout {
                    addr: addr.into(),
                    after: timeout,
                }),
                Ok(Ok(r)) => Ok(Forwarded::Ok(r.into_inner().index)),
                // The wire's "not the leader" (see `PeerService::read_index`).
                Ok(Err(s)) if s.code() == tonic::Code::FailedPrecondition => {
                    Ok(Forwarded::NotLeader { leader: None })
                }
                Ok(Err(s)) => Err(super::status_to_net(addr, s).into()),
            }
        }
        .boxed()
    }

    fn admin<'a>(
        &'a self,
        addr: &'a str,
        req: AdminRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Forwarded<MembershipView>, PeerError>> {
        async move {
            Ok(self
                .call_blob(
                    addr,
                    timeout,
                    &req,
                    |mut c, b| async move { c.admin(b).await },
                )
                .await?)
        }
        .boxed()
    }

    fn is_dr_replica<'a>(
        &'a self,
        addr: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<bool, PeerError>> {
        async move {
            let mut c = self.client(addr)?;
            let req = crate::pb::peer::NodeStatusRequest { with_hash: false };
            match tokio::time::timeout(timeout, c.node_status(req)).await {
                Err(_) => Err(PeerError::Timeout {
                    addr: addr.into(),
                    after: timeout,
                }),
                Ok(Err(s)) => Err(PeerError::Refused {
                    addr: addr.into(),
                    code: format!("{:?}", s.code()),
                    message: s.message().to_string(),
                }),
                Ok(Ok(r)) => Ok(r.into_inner().dr_replica),
            }
        }
        .boxed()
    }
}
