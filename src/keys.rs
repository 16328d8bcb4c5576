//! Every key layout of both RocksDB stores, in one place.
//!
//! Log store (`<data>/log`):
//! - `l` + index (u64 big-endian)      -> bincode `Entry`
//! - `v`                               -> bincode `Vote`
//! - `c`                               -> bincode `Option<LogId>` (committed)
//! - `p`                               -> bincode `LogId` (last purged)
//!
//! State-machine store (`<data>/sm-<generation>`):
//! - `d` + user key                    -> bincode `fsm::ValueRecord`
//! - `m` + name                        -> metadata (`last_applied`, `membership`)
//! - `R` + bucket (u64 BE) + request id -> bincode `fsm::DedupRecord` (first response of a request
//!   id applied at index i, in bucket i / dedup_window; a whole bucket is dropped with one range
//!   delete once every record in it has expired)
//! - `r` + request id, `q` + index (u64 BE) -> the first layout of the same records (one record
//!   and one expiry-queue key per request id), still read and expired until none are left
//!
//! Metadata domain (`fsm::meta`), in the same state-machine store; `id` = 16-byte UUID, `kind` =
//! one byte (`fsm::meta::Kind`):
//! - `E` + id                          -> bincode `meta::Record` (the row)
//! - `N` + kind + parent id + uname    -> id (unique names; `uname` = name, or name 0 attempt for steps)
//! - `I` + ix + scope + sort(8) + tie(8) + id -> empty (a secondary index entry; `sort` = inverted
//!   created time and `tie` = inverted create revision, so an ascending scan is newest first;
//!   written in the same batch as the row)
//! - `K` + ix + scope                  -> u64 BE (entries under that index scope: incremental counts)
//! - `C` + project id + cache key      -> id of the latest step run with that cache key
//! - `A` + sha256(api key)             -> service account (user) id
//!
//! In the first layout, at most one request id per log index, so expiring one is a point lookup,
//! never an iterator scan over the tombstones of earlier expiries (which grew without bound).
//!
//! Big-endian indexes keep RocksDB's byte order equal to numeric order.

pub const LOG_ENTRY: u8 = b'l';
pub const LOG_VOTE: &[u8] = b"v";
pub const LOG_COMMITTED: &[u8] = b"c";
pub const LOG_PURGED: &[u8] = b"p";

pub const SM_DATA: u8 = b'd';
pub const SM_META_LAST_APPLIED: &[u8] = b"mlast_applied";
pub const SM_META_MEMBERSHIP: &[u8] = b"mmembership";
/// The cluster's lineage id: set by the first membership entry applied, replaced by restore and
/// DR promotion (which start a new lineage).
pub const SM_META_CLUSTER_ID: &[u8] = b"mcluster_id";
pub const SM_DEDUP: u8 = b'r';
pub const SM_DEDUP_QUEUE: u8 = b'q';
pub const SM_DEDUP_BUCKET: u8 = b'R';

pub const META_ROW: u8 = b'E';
pub const META_NAME: u8 = b'N';
pub const META_INDEX: u8 = b'I';
pub const META_COUNT: u8 = b'K';
pub const META_CACHE: u8 = b'C';
pub const META_API_KEY: u8 = b'A';

pub fn meta_row(id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(17);
    k.push(META_ROW);
    k.extend_from_slice(id);
    k
}

/// Unique-name key of a child of `parent`; `uname` is the name (plus attempt for step runs).
pub fn meta_name(kind: u8, parent: &[u8; 16], uname: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(18 + uname.len());
    k.push(META_NAME);
    k.push(kind);
    k.extend_from_slice(parent);
    k.extend_from_slice(uname);
    k
}

/// Prefix of an index scope: `I` + ix + scope (scope components are fixed-length or 0-terminated).
pub fn meta_index_prefix(ix: u8, scope: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + scope.len() + 24);
    k.push(META_INDEX);
    k.push(ix);
    k.extend_from_slice(scope);
    k
}

/// One index entry: prefix + sort + tie + id (`tie` orders entries with equal `sort`).
pub fn meta_index(prefix: &[u8], sort: u64, tie: u64, id: &[u8; 16]) -> Vec<u8> {
    let mut k = Vec::with_capacity(prefix.len() + 32);
    k.extend_from_slice(prefix);
    k.extend_from_slice(&sort.to_be_bytes());
    k.extend_from_slice(&tie.to_be_bytes());
    k.extend_from_slice(id);
    k
}

/// The count key of an index prefix (`I...` -> `K...`).
pub fn meta_count(index_prefix: &[u8]) -> Vec<u8> {
    let mut k = index_prefix.to_vec();
    if let Some(first) = k.first_mut() {
        *first = META_COUNT;
    }
    k
}

pub fn meta_cache(project: &[u8; 16], cache_key: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(17 + cache_key.len());
    k.push(META_CACHE);
    k.extend_from_slice(project);
    k.extend_from_slice(cache_key.as_bytes());
    k
}

pub fn meta_api_key(hash: &[u8; 32]) -> Vec<u8> {
    let mut k = Vec::with_capacity(33);
    k.push(META_API_KEY);
    k.extend_from_slice(hash);
    k
}

pub fn log_entry(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = LOG_ENTRY;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Parses the index out of a log entry key; `None` for any other key.
pub fn log_entry_index(key: &[u8]) -> Option<u64> {
    if key.len() != 9 || key[0] != LOG_ENTRY {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&key[1..]);
    Some(u64::from_be_bytes(b))
}

pub fn data(user_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + user_key.len());
    k.push(SM_DATA);
    k.extend_from_slice(user_key);
    k
}

/// The user key of a data key, `None` for any other key.
pub fn user_key(key: &[u8]) -> Option<&[u8]> {
    match key.split_first() {
        Some((&SM_DATA, rest)) => Some(rest),
        _ => None,
    }
}

pub fn dedup(request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + request_id.len());
    k.push(SM_DEDUP);
    k.extend_from_slice(request_id.as_bytes());
    k
}

pub fn dedup_queue(index: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = SM_DEDUP_QUEUE;
    k[1..].copy_from_slice(&index.to_be_bytes());
    k
}

pub fn dedup_at(bucket: u64, request_id: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(9 + request_id.len());
    k.push(SM_DEDUP_BUCKET);
    k.extend_from_slice(&bucket.to_be_bytes());
    k.extend_from_slice(request_id.as_bytes());
    k
}

/// `[start, end)` of every record in dedup bucket `bucket`.
pub fn dedup_bucket_range(bucket: u64) -> (Vec<u8>, Vec<u8>) {
    let start = dedup_at(bucket, "");
    let end = match bucket.checked_add(1) {
        Some(next) => dedup_at(next, ""),
        None => vec![SM_DEDUP_BUCKET + 1],
    };
    (start, end)
}

/// The smallest key greater than every key that starts with `prefix` (None when there is none).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_keys_sort_numerically() {
        assert!(log_entry(255) < log_entry(256));
        assert_eq!(log_entry_index(&log_entry(42)), Some(42));
        assert_eq!(log_entry_index(b"v"), None);
    }

    #[test]
    fn dedup_queue_sorts_by_index() {
        assert!(dedup_queue(255) < dedup_queue(256));
        assert_eq!(dedup_queue(1)[0], SM_DEDUP_QUEUE);
    }

    #[test]
    fn dedup_buckets_hold_their_own_ids_only() {
        let (start, end) = dedup_bucket_range(7);
        for id in [
            "",
            "a",
            "\u{10ffff}\u{10ffff}",
            "zzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzzz",
        ] {
            let k = dedup_at(7, id);
            assert!(start <= k && k < end, "{id:?} in its bucket");
            assert!(dedup_at(6, id) < start && dedup_at(8, id) >= end);
        }
        let (_, last_end) = dedup_bucket_range(u64::MAX);
        assert!(dedup_at(u64::MAX, "zz") < last_end);
        assert!(data(b"x") < start || data(b"x") >= last_end);
    }

    #[test]
    fn prefix_end_carries() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
    }

    #[test]
    fn user_key_only_for_data() {
        assert_eq!(user_key(&data(b"x")), Some(&b"x"[..]));
        assert_eq!(user_key(b"mlast_applied"), None);
    }
}
