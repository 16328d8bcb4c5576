//! The deterministic state machine: commands, responses and `apply`.
//!
//! `apply` is a pure function of (state read through [`StateRead`], log index, request): it returns
//! the mutations to write and the response. No clock, no randomness, no I/O beyond the reads it is
//! given, so every replica that applies the same log ends with byte-identical state. Storage turns
//! the mutations into one atomic RocksDB batch together with `last_applied`.

mod entry;
pub mod meta;

pub use entry::{apply_entry, lineage_id, Applied, Payload, Staging};

use serde::{Deserialize, Serialize};

use crate::keys;

/// Format of commands written to the log. A node that meets a newer one stops instead of diverging.
/// 1: key/value commands. 2: adds `Command::Meta` (meta ops, encoded with their own format).
pub const COMMAND_FORMAT_VERSION: u8 = 2;

/// How many log entries a request id is remembered for (deterministic: counted in log indexes).
pub const DEFAULT_DEDUP_WINDOW: u64 = 1_000_000;

/// One client write: the unit of a Raft log entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub format_version: u8,
    /// Client-chosen idempotency key; empty = none.
    pub request_id: String,
    pub command: Command,
}

impl Request {
    /// A request in the lowest format that carries `command`, so nodes not yet upgraded keep
    /// applying the commands they know during a rolling upgrade.
    pub fn new(request_id: impl Into<String>, command: Command) -> Self {
        Request {
            format_version: command.format_version(),
            request_id: request_id.into(),
            command,
        }
    }
}

impl std::fmt::Display for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys or values: they are the platform's metadata.
        let kind = match &self.command {
            Command::Put { .. } => "put",
            Command::Delete { .. } => "delete",
            Command::Txn { .. } => "txn",
            Command::Meta { .. } => "meta",
        };
        write!(f, "{kind}")
    }
}

/// `Debug` is redacted (lengths only): commands reach openraft's logs, and keys and values are the
/// platform's metadata.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
        expected_revision: Option<u64>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        expected_revision: Option<u64>,
    },
    Txn {
        compares: Vec<Compare>,
        success: Vec<Op>,
        failure: Vec<Op>,
    },
    /// A metadata-domain op (`meta::MetaOp`, bincode-encoded in `op` so a node can refuse a
    /// newer `format` before decoding it). `at_ms` is the leader's clock when it proposed.
    Meta {
        format: u8,
        at_ms: u64,
        #[serde(with = "serde_bytes")]
        op: Vec<u8>,
    },
}

impl Command {
    /// A meta command for `op` (the leader stamps `at_ms` when it proposes).
    pub fn meta(op: &meta::MetaOp) -> Result<Command, FsmError> {
        Ok(Command::Meta {
            format: meta::META_FORMAT_VERSION,
            at_ms: 0,
            op: encode(op)?,
        })
    }

    /// The lowest command format that can carry this command.
    pub fn format_version(&self) -> u8 {
        match self {
            Command::Meta { .. } => 2,
            _ => 1,
        }
    }
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's mod_revision equals this (0 = absent).
    Revision {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        revision: u64,
    },
    /// The key exists with this value.
    Value {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
}

#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

/// Shows a byte string as its length only.
struct Redacted<'a>(&'a [u8]);

impl std::fmt::Debug for Redacted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{} bytes>", self.0.len())
    }
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Put {
                key,
                value,
                expected_revision,
            } => f
                .debug_struct("Put")
                .field("key", &Redacted(key))
                .field("value", &Redacted(value))
                .field("expected_revision", expected_revision)
                .finish(),
            Command::Delete {
                key,
                expected_revision,
            } => f
                .debug_struct("Delete")
                .field("key", &Redacted(key))
                .field("expected_revision", expected_revision)
                .finish(),
            Command::Txn {
                compares,
                success,
                failure,
            } => f
                .debug_struct("Txn")
                .field("compares", compares)
                .field("success", success)
                .field("failure", failure)
                .finish(),
            Command::Meta { format, at_ms, op } => f
                .debug_struct("Meta")
                .field("format", format)
                .field("at_ms", at_ms)
                .field("op", &Redacted(op))
                .finish(),
        }
    }
}

impl std::fmt::Debug for Compare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compare::Revision { key, revision } => f
                .debug_struct("Revision")
                .field("key", &Redacted(key))
                .field("revision", revision)
                .finish(),
            Compare::Value { key, value } => f
                .debug_struct("Value")
                .field("key", &Redacted(key))
                .field("value", &Redacted(value))
                .finish(),
        }
    }
}

impl std::fmt::Debug for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Op::Put { key, value } => f
                .debug_struct("Put")
                .field("key", &Redacted(key))
                .field("value", &Redacted(value))
                .finish(),
            Op::Delete { key } => f
                .debug_struct("Delete")
                .field("key", &Redacted(key))
                .finish(),
        }
    }
}

/// The result of applying one entry. `revision` is always the entry's log index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Blank and membership entries.
    None {
        revision: u64,
    },
    Put {
        revision: u64,
        prev_revision: u64,
    },
    Delete {
        revision: u64,
        deleted: bool,
    },
    Txn {
        revision: u64,
        succeeded: bool,
    },
    /// A compare-and-set did not hold: nothing was written.
    RevisionMismatch {
        revision: u64,
        expected: u64,
        actual: u64,
    },
    /// Never produced: a newer format stops apply ([`FsmError::UnsupportedFormat`]). Kept
    /// because responses are stored in request-id records, whose encoding numbers the variants.
    UnsupportedFormat {
        revision: u64,
        version: u8,
    },
    Meta {
        revision: u64,
        response: meta::MetaResponse,
    },
}

impl Response {
    pub fn revision(&self) -> u64 {
        match self {
            Response::None { revision }
            | Response::Put { revision, .. }
            | Response::Delete { revision, .. }
            | Response::Txn { revision, .. }
            | Response::RevisionMismatch { revision, .. }
            | Response::UnsupportedFormat { revision, .. }
            | Response::Meta { revision, .. } => *revision,
        }
    }
}

/// A stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValueRecord {
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub create_revision: u64,
    pub mod_revision: u64,
    pub version: u64,
}

/// What a request id maps to: the first result, returned again for retries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DedupRecord {
    pub index: u64,
    pub response: Response,
}

/// A change to the state-machine store, in raw store keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mutation {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Deletes every key in `[start, end)`. Only whole dedup buckets are deleted this way, and no
    /// command reads or scans them with a range, so a store may leave scans unaware of it.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// How request ids are remembered: each id for exactly `window` log entries after the one that
/// applied it (a retry at index n finds a record applied at i when i + window > n).
///
/// Records live in buckets of `window` indexes (`keys::dedup_at`): a lookup at n reads bucket
/// n / window and the one before it, and at the last index of every bucket the bucket before the
/// previous one, all of whose records have expired, goes in one range delete. A put so writes one
/// dedup key instead of four (record and queue key, and their deletes when they expire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dedup {
    pub window: u64,
    /// Whether records of the first layout (`keys::dedup` with `keys::dedup_queue`) may still be
    /// in the store. They are read and expired as before while they are; `false` only skips that
    /// work, so it must only be passed when the store holds no `q` key.
    pub legacy: bool,
}

impl Dedup {
    /// The window only (no first-layout records): for new stores and tests.
    pub fn window(window: u64) -> Dedup {
        Dedup {
            window,
            legacy: false,
        }
    }

    /// The window, at least 1 (config refuses 0; this keeps the arithmetic total anyway).
    fn span(&self) -> u64 {
        self.window.max(1)
    }

    fn bucket(&self, index: u64) -> u64 {
        index / self.span()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FsmError {
    #[error("state read failed: {0}")]
    Read(String),
    #[error("corrupt record at key {key:?}: {reason}")]
    Corrupt { key: Vec<u8>, reason: String },
    #[error("encode failed: {0}")]
    Encode(String),
    #[error("log entry {index} has format version {version}, newer than this binary supports ({supported}); upgrade this node")]
    UnsupportedFormat {
        index: u64,
        version: u8,
        supported: u8,
    },
}

/// Raw (key, value) pairs of a scan.
pub type KvPairs = Vec<(Vec<u8>, Vec<u8>)>;

/// Pending writes over a state (`None`: deleted), read through by apply before they are written.
pub type Overlay = std::collections::BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// Keys in `[start, end)` of `overlay` laid over the state below it, ascending, at most `limit`.
/// `below(n)` scans that state for up to `n` keys of the same range: `limit` plus as many as the
/// overlay could delete.
pub fn scan_with_overlay(
    overlay: &Overlay,
    start: &[u8],
    end: &[u8],
    limit: usize,
    below: impl FnOnce(usize) -> Result<KvPairs, FsmError>,
) -> Result<KvPairs, FsmError> {
    if start >= end {
        return Ok(Vec::new());
    }
    let local: Vec<_> = overlay.range(start.to_vec()..end.to_vec()).collect();
    let mut merged: std::collections::BTreeMap<Vec<u8>, Vec<u8>> =
        below(limit.saturating_add(local.len()))?
            .into_iter()
            .collect();
    for (k, v) in local {
        match v {
            Some(v) => merged.insert(k.clone(), v.clone()),
            None => merged.remove(k),
        };
    }
    Ok(merged.into_iter().take(limit).collect())
}

/// Read access to the current state, as of the last applied entry.
pub trait StateRead {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError>;
    /// [`Self::get_raw`], borrowed where the state holds the bytes in memory already (apply's
    /// pending batch and record cache), so reading a record costs no copy.
    fn get_raw_ref(&self, key: &[u8]) -> Result<Option<std::borrow::Cow<'_, [u8]>>, FsmError> {
        Ok(self.get_raw(key)?.map(std::borrow::Cow::Owned))
    }
    /// Raw keys and values in `[start, end)`, ascending, at most `limit`.
    fn scan(&self, start: &[u8], end: &[u8], limit: usize)
        -> Result<crate::fsm::KvPairs, FsmError>;
}

impl<T: StateRead + ?Sized> StateRead for &T {
    fn get_raw(&self, key: &[u8]) -> Result<Option<Vec<u8>>, FsmError> {
        (**self).get_raw(key)
    }
    fn get_raw_ref(&self, key: &[u8]) -> Result<Option<std::borrow::Cow<'_, [u8]>>, FsmError> {
        (**self).get_raw_ref(key)
    }
    fn scan(&self, start: &[u8], end: &[u8], limit: usize) -> Result<KvPairs, FsmError> {
        (**self).scan(start, end, limit)
    }
}

fn get_value(state: &dyn StateRead, user_key: &[u8]) -> Result<Option<ValueRecord>, FsmError> {
    let key = keys::data(user_key);
    match state.get_raw_ref(&key)? {
        None => Ok(None),
        Some(raw) => crate::codec::decode(&raw)
            .map(Some)
            .map_err(|e| FsmError::Corrupt {
                key,
                reason: e.to_string(),
            }),
    }
}

/// The revisions of a stored value: all that a put, a delete or a revision compare needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Revisions {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

/// A [`ValueRecord`] decoded in place: the value is skipped, not copied.
#[derive(Deserialize)]
struct RecordHead<'a> {
    #[serde(borrow, with = "serde_bytes")]
    _value: &'a [u8],
    create_revision: u64,
    mod_revision: u64,
    version: u64,
}

/// The revisions of `user_key`'s value, read without copying the value.
fn get_revisions(state: &dyn StateRead, user_key: &[u8]) -> Result<Option<Revisions>, FsmError> {
    let key = keys::data(user_key);
    let Some(raw) = state.get_raw_ref(&key)? else {
        return Ok(None);
    };
    let head: RecordHead<'_> =
        crate::codec::decode_borrowed(&raw).map_err(|e| FsmError::Corrupt {
            key: key.clone(),
            reason: e.to_string(),
        })?;
    Ok(Some(Revisions {
        create_revision: head.create_revision,
        mod_revision: head.mod_revision,
        version: head.version,
    }))
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, FsmError> {
    crate::codec::encode(v).map_err(|e| FsmError::Encode(e.to_string()))
}

/// Forgets what expires at `index`: called for every log entry, whatever its payload, so every
/// replica forgets the same ids at the same index. In the bucketed layout that is a whole bucket
/// at the last index of each bucket; in the first layout, the id applied `window` entries before.
pub(crate) fn expire(
    state: &dyn StateRead,
    index: u64,
    dedup: Dedup,
) -> Result<Vec<Mutation>, FsmError> {
    let w = dedup.span();
    let mut muts = Vec::new();
    // Bucket b holds indexes up to (b + 1)w - 1, each remembered until w entries later: from
    // index (b + 2)w - 1 on, nothing in it can answer a retry.
    if let Some(next) = index.checked_add(1) {
        if next % w == 0 && next / w >= 2 {
            let (start, end) = keys::dedup_bucket_range(next / w - 2);
            muts.push(Mutation::DeleteRange(start, end));
        }
    }
    if dedup.legacy && index > w {
        let qk = keys::dedup_queue(index - w);
        if let Some(id) = state.get_raw(&qk)? {
            let id = String::from_utf8(id).map_err(|e| FsmError::Corrupt {
                key: qk.to_vec(),
                reason: e.to_string(),
            })?;
            muts.push(Mutation::Delete(keys::dedup(&id)));
            muts.push(Mutation::Delete(qk.to_vec()));
        }
    }
    Ok(muts)
}

/// The first result of `request_id` if it is remembered at `index` (see [`Dedup`]).
fn remembered(
    state: &dyn StateRead,
    index: u64,
    request_id: &str,
    dedup: Dedup,
) -> Result<Option<DedupRecord>, FsmError> {
    let cur = dedup.bucket(index);
    let mut keys = vec![keys::dedup_at(cur, request_id)];
    if let Some(prev) = cur.checked_sub(1) {
        keys.push(keys::dedup_at(prev, request_id));
    }
    if dedup.legacy {
        // Expired exactly on time by `expire`: present means remembered.
        keys.push(keys::dedup(request_id));
    }
    for k in keys {
        if let Some(raw) = state.get_raw(&k)? {
            let rec: DedupRecord = crate::codec::decode(&raw).map_err(|e| FsmError::Corrupt {
                key: k.clone(),
                reason: e.to_string(),
            })?;
            if rec.index.saturating_add(dedup.span()) > index {
                return Ok(Some(rec));
            }
        }
    }
    Ok(None)
}

/// Applies a client request at `index`. Returns the mutations (to write atomically with
/// `last_applied = index`) and the response. Only [`apply_entry`] calls it, after [`expire`]
/// and the format check.
pub(crate) fn apply(
    state: &dyn StateRead,
    index: u64,
    req: &Request,
    dedup: Dedup,
) -> Result<(Vec<Mutation>, Response), FsmError> {
    let mut muts = Vec::new();

    if !req.request_id.is_empty() {
        if let Some(rec) = remembered(state, index, &req.request_id, dedup)? {
            // A retry: the first result, nothing applied again.
            return Ok((muts, rec.response));
        }
    }

    let resp = apply_command(state, index, &req.command, &mut muts)?;

    if !req.request_id.is_empty() {
        let rec = DedupRecord {
            index,
            response: resp.clone(),
        };
        muts.push(Mutation::Put(
            keys::dedup_at(dedup.bucket(index), &req.request_id),
            encode(&rec)?,
        ));
    }
    Ok((muts, resp))
}

fn put_mutation(
    state: &dyn StateRead,
    index: u64,
    key: &[u8],
    value: &[u8],
    overlay: &mut Vec<(Vec<u8>, Option<Revisions>)>,
) -> Result<(Mutation, u64), FsmError> {
    let prev = lookup(state, key, overlay)?;
    let rec = match &prev {
        Some(p) => ValueRecord {
            value: value.to_vec(),
            create_revision: p.create_revision,
            mod_revision: index,
            version: p.version + 1,
        },
        None => ValueRecord {
            value: value.to_vec(),
            create_revision: index,
            mod_revision: index,
            version: 1,
        },
    };
    let prev_rev = prev.map(|p| p.mod_revision).unwrap_or(0);
    let m = Mutation::Put(keys::data(key), encode(&rec)?);
    let revs = Revisions {
        create_revision: rec.create_revision,
        mod_revision: rec.mod_revision,
        version: rec.version,
    };
    overlay.push((key.to_vec(), Some(revs)));
    Ok((m, prev_rev))
}

/// Reads a key's revisions, seeing earlier ops of the same transaction first.
fn lookup(
    state: &dyn StateRead,
    key: &[u8],
    overlay: &[(Vec<u8>, Option<Revisions>)],
) -> Result<Option<Revisions>, FsmError> {
    if let Some((_, v)) = overlay.iter().rev().find(|(k, _)| k == key) {
        return Ok(*v);
    }
    get_revisions(state, key)
}

fn apply_command(
    state: &dyn StateRead,
    index: u64,
    cmd: &Command,
    muts: &mut Vec<Mutation>,
) -> Result<Response, FsmError> {
    let mut overlay = Vec::new();
    match cmd {
        Command::Put {
            key,
            value,
            expected_revision,
        } => {
            if let Some(expected) = expected_revision {
                let actual = get_revisions(state, key)?
                    .map(|r| r.mod_revision)
                    .unwrap_or(0);
                if actual != *expected {
                    return Ok(Response::RevisionMismatch {
                        revision: index,
                        expected: *expected,
                        actual,
                    });
                }
            }
            let (m, prev_revision) = put_mutation(state, index, key, value, &mut overlay)?;
            muts.push(m);
            Ok(Response::Put {
                revision: index,
                prev_revision,
            })
        }
        Command::Delete {
            key,
            expected_revision,
        } => {
            let cur = get_revisions(state, key)?;
            let actual = cur.map(|r| r.mod_revision).unwrap_or(0);
            if let Some(expected) = expected_revision {
                if actual != *expected {
                    return Ok(Response::RevisionMismatch {
                        revision: index,
                        expected: *expected,
                        actual,
                    });
                }
            }
            if cur.is_some() {
                muts.push(Mutation::Delete(keys::data(key)));
            }
            Ok(Response::Delete {
                revision: index,
                deleted: cur.is_some(),
            })
        }
        Command::Txn {
            compares,
            success,
            failure,
        } => apply_txn(state, index, compares, success, failure, muts),
        Command::Meta { at_ms, op, .. } => {
            let op: meta::MetaOp = match crate::codec::decode(op) {
                Ok(op) => op,
                // Every replica decodes the same bytes the same way: answer with an error and
                // write nothing. A stop here would stop every replica at this entry, and again
                // after every restart (the entry stays in the log). An op only a newer binary
                // decodes carries a newer format, which `apply_entry` stops at instead.
                Err(e) => {
                    return Ok(Response::Meta {
                        revision: index,
                        response: meta::MetaResponse::Error {
                            kind: meta::MetaErrorKind::Invalid,
                            message: format!("the metadata operation does not decode: {e}"),
                        },
                    })
                }
            };
            let (m, response) = meta::apply::apply_meta(state, index, *at_ms, &op)?;
            muts.extend(m);
            Ok(Response::Meta {
                revision: index,
                response,
            })
        }
    }
}

/// A transaction: every compare holds -> `success`, else `failure`; its ops read each other's
/// writes.
fn apply_txn(
    state: &dyn StateRead,
    index: u64,
    compares: &[Compare],
    success: &[Op],
    failure: &[Op],
    muts: &mut Vec<Mutation>,
) -> Result<Response, FsmError> {
    let mut ok = true;
    for c in compares {
        let holds = match c {
            Compare::Revision { key, revision } => {
                get_revisions(state, key)?
                    .map(|r| r.mod_revision)
                    .unwrap_or(0)
                    == *revision
            }
            Compare::Value { key, value } => get_value(state, key)?
                .map(|r| r.value == *value)
                .unwrap_or(false),
        };
        if !holds {
            ok = false;
            break;
        }
    }
    let mut overlay = Vec::new();
    let ops = if ok { success } else { failure };
    for op in ops {
        match op {
            Op::Put { key, value } => {
                let (m, _) = put_mutation(state, index, key, value, &mut overlay)?;
                muts.push(m);
            }
            Op::Delete { key } => {
                if lookup(state, key, &overlay)?.is_some() {
                    muts.push(Mutation::Delete(keys::data(key)));
                }
                overlay.push((key.clone(), None));
            }
        }
    }
    Ok(Response::Txn {
        revision: index,
        succeeded: ok,
    })
}

#[cfg(test)]
mod tests;
