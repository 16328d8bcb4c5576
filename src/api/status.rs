//! Every internal error mapped to a gRPC status, in one table.
//!
//! Each status message starts with a stable code in brackets (e.g. `[MR-NOLEADER]`) that runbooks
//! can search for.

use tonic::{Code, Status};

use crate::consensus::ConsensusError;
use crate::fsm::meta::query::QueryError;
use crate::fsm::meta::MetaErrorKind;
use crate::storage::StorageError;

/// API-layer errors: request validation plus what the layers below report.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("revision mismatch: expected {expected}, key is at {actual}")]
    RevisionMismatch { expected: u64, actual: u64 },
    #[error(transparent)]
    Consensus(#[from] ConsensusError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("{0}")]
    Internal(String),
    #[error("log entry {from} was already purged (the log now starts at {first}); take a new base backup")]
    Purged { from: u64, first: u64 },
    #[error("{0}")]
    NotDr(String),
    /// A metadata-domain refusal decided by the state machine (or a query).
    #[error("{1}")]
    Meta(MetaErrorKind, String),
}

impl From<crate::fsm::FsmError> for ApiError {
    fn from(e: crate::fsm::FsmError) -> ApiError {
        ApiError::Storage(StorageError::Fsm(e))
    }
}

impl From<QueryError> for ApiError {
    fn from(e: QueryError) -> ApiError {
        match e {
            QueryError::Invalid(m) => ApiError::Invalid(m),
            QueryError::NotFound(m) => ApiError::Meta(MetaErrorKind::NotFound, m),
            QueryError::Fsm(f) => ApiError::Storage(StorageError::Fsm(f)),
        }
    }
}

impl From<ApiError> for Status {
    fn from(e: ApiError) -> Status {
        let (code, tag) = match &e {
            ApiError::Invalid(_) => (Code::InvalidArgument, "MR-INVALID"),
            ApiError::TooLarge(_) => (Code::ResourceExhausted, "MR-TOOLARGE"),
            ApiError::RevisionMismatch { .. } => (Code::FailedPrecondition, "MR-CAS"),
            ApiError::Consensus(c) => match c {
                ConsensusError::NoLeader { .. } => (Code::Unavailable, "MR-NOLEADER"),
                ConsensusError::Timeout(_) => (Code::Unavailable, "MR-TIMEOUT"),
                ConsensusError::Forward(_) => (Code::Unavailable, "MR-FORWARD"),
                ConsensusError::TooStale { .. } => (Code::Unavailable, "MR-STALE"),
                ConsensusError::NotInitialized => (Code::Unavailable, "MR-NOTINIT"),
                ConsensusError::Membership(_) => (Code::FailedPrecondition, "MR-MEMBERSHIP"),
                ConsensusError::Fatal(_) => (Code::Unavailable, "MR-RAFT"),
            },
            ApiError::Storage(_) => (Code::Internal, "MR-STORAGE"),
            ApiError::Internal(_) => (Code::Internal, "MR-INTERNAL"),
            ApiError::Purged { .. } => (Code::FailedPrecondition, "MR-BACKUP-PURGED"),
            ApiError::NotDr(_) => (Code::FailedPrecondition, "MR-NOTDR"),
            ApiError::Meta(k, _) => match k {
                MetaErrorKind::NotFound => (Code::NotFound, "MR-NOTFOUND"),
                MetaErrorKind::AlreadyExists => (Code::AlreadyExists, "MR-EXISTS"),
                MetaErrorKind::FailedPrecondition => (Code::FailedPrecondition, "MR-PRECONDITION"),
                MetaErrorKind::Invalid => (Code::InvalidArgument, "MR-INVALID"),
                MetaErrorKind::RevisionMismatch => (Code::FailedPrecondition, "MR-CAS"),
            },
        };
        Status::new(code, format!("[{tag}] {e}"))
    }
}

/// The name of a status code for metrics labels.
pub fn code_name(c: Code) -> &'static str {
    match c {
        Code::Ok => "ok",
        Code::InvalidArgument => "invalid_argument",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Unavailable => "unavailable",
        Code::Internal => "internal",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_maps_codes() {
        let s: Status = ApiError::Invalid("empty key".into()).into();
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().starts_with("[MR-INVALID]"));
        let s: Status = ApiError::Consensus(ConsensusError::NoLeader { leader: Some(2) }).into();
        assert_eq!(s.code(), Code::Unavailable);
        assert!(s.message().contains("node 2"));
        let s: Status = ApiError::RevisionMismatch {
            expected: 1,
            actual: 2,
        }
        .into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s: Status = ApiError::Meta(MetaErrorKind::AlreadyExists, "taken".into()).into();
        assert_eq!(s.code(), Code::AlreadyExists);
        assert!(s.message().starts_with("[MR-EXISTS] taken"));
        let s: Status =
            ApiError::Meta(MetaErrorKind::FailedPrecondition, "run is failed".into()).into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        let s: Status = ApiError::from(QueryError::NotFound("gone".into())).into();
        assert_eq!(s.code(), Code::NotFound);
    }
}
