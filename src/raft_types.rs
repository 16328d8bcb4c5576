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
    pub TypeConfig:
        D = Request,
        R = Response,
        NodeId = NodeId,
        Node = Node,
);

pub type Raft = openraft::Raft<TypeConfig, crate::storage::StateMachineStore>;
pub type Entry = openraft::type_config::alias::EntryOf<TypeConfig>;
pub type LogId = openraft::type_config::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::type_config::alias::VoteOf<TypeConfig>;
pub type StoredMembership = openraft::type_config::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::type_config::alias::SnapshotMetaOf<TypeConfig>;
pub type Membership = openraft::Membership<NodeId, Node>;

/// Encode with bincode 2 (standard config) through serde.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::error::EncodeError> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
}

/// Decode the leading fields of a bincode 2 value (a prefix struct); the rest is ignored.
pub fn decode_prefix<T: serde::de::DeserializeOwned>(
    b: &[u8],
) -> Result<T, bincode::error::DecodeError> {
    Ok(bincode::serde::decode_from_slice(b, bincode::config::standard())?.0)
}

/// Decode bincode 2; trailing bytes are an error.
pub fn decode<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, bincode::error::DecodeError> {
    let (v, n) = bincode::serde::decode_from_slice(b, bincode::config::standard())?;
    if n != b.len() {
        return Err(bincode::error::DecodeError::OtherString(format!(
            "{} trailing bytes",
            b.len() - n
        )));
    }
    Ok(v)
}
