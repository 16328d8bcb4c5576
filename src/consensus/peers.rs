//! What consensus needs from the other members, whatever carries it: the network layer
//! implements [`Peers`] over gRPC (`net::PeerPool`), tests may implement it in memory. Answers
//! are typed: "not the leader" is [`Forwarded::NotLeader`] on every call, never a status code.

use std::time::Duration;

use futures::future::BoxFuture;

use super::{AdminRequest, Forwarded, MembershipView};
use crate::fsm::{Request, Response};

/// A call to a member that did not get an answer of its own: the member could not be reached in
/// time, refused the call, or sent something that does not decode.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    #[error("peer {addr} unreachable: {reason}")]
    Unreachable { addr: String, reason: String },
    #[error("peer {addr} gave no answer within {after:?}")]
    Timeout { addr: String, after: Duration },
    #[error("peer {addr} answered {code}: {message}")]
    Refused {
        addr: String,
        code: String,
        message: String,
    },
    #[error("bad message from peer {addr}: {reason}")]
    Codec { addr: String, reason: String },
    #[error("bad peer address {addr}: {reason}")]
    Address { addr: String, reason: String },
}

/// The calls one member makes to another (by peer address).
pub trait Peers: Send + Sync + 'static {
    /// Sends writes to the leader at `addr` in one call: exactly one result per write, in order.
    fn forward_batch<'a>(
        &'a self,
        addr: &'a str,
        timeout: Duration,
        reqs: Vec<Request>,
    ) -> BoxFuture<'a, Vec<Result<Forwarded<Response>, PeerError>>>;

    /// Asks the leader at `addr` for the index a read must wait for: its read index, or with
    /// `lease` the index its leader lease vouches for.
    fn read_index<'a>(
        &'a self,
        addr: &'a str,
        lease: bool,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Forwarded<u64>, PeerError>>;

    /// Runs a membership change on the leader at `addr`.
    fn admin<'a>(
        &'a self,
        addr: &'a str,
        req: AdminRequest,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<Forwarded<MembershipView>, PeerError>>;

    /// Whether the member at `addr` runs as a DR replica. A status the member answers is
    /// [`PeerError::Refused`] with its message.
    fn is_dr_replica<'a>(
        &'a self,
        addr: &'a str,
        timeout: Duration,
    ) -> BoxFuture<'a, Result<bool, PeerError>>;
}
