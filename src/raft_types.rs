//! The openraft type configuration shared by storage, consensus and the network.

use serde::{Deserialize, Serialize};

use crate::fsm::{Request, Response};

pub type NodeId = u64;

/// What the cluster knows about a member: where its peers and its clients reach it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    pub peer_addr: String,
    /// May be empty for members named only by peer address in `initial_members`.
    pub client_addr: String,
}

impl std::fmt::Display for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.peer_addr)
    }
}

openraft::declare_raft_types!(
    /// metaraft's Raft types: our commands and responses, u64 node ids, `Node` addresses.
    ///
    /// A command is shared, not copied: openraft clones every entry it reads from the log (once
    /// per follower it replicates to, once more to apply it), and a clone of a `Request` is three
    /// allocations and a copy of its value. serde encodes an `Arc<T>` exactly as `T`, so the
    /// bytes in the log, on the wire and in backups are unchanged.
    pub TypeConfig:
        D = std::sync::Arc<Request>,
        R = Response,
        NodeId = NodeId,
        Node = Node,
);

pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, Node>;
