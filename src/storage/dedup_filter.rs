//! An in-memory Bloom filter per request-id bucket (`keys::dedup_at`), so that apply's lookup of
//! a new request id (nearly every write carries one, and nearly none is a retry) is answered
//! without two RocksDB point reads that miss. Those reads probe every memtable and the filter
//! block of every SST file whose key range spans the id, and with them the request-id records
//! cost about 15% of a 3-node cluster's write throughput (docs/benchmarks.md, eighth session).
//!
//! A filter is a superset: every record of a bucket in the database has its bits set (bits of a
//! record that is gone may stay), so "absent" is exact and "maybe" falls through to RocksDB. Only
//! apply's own store instance keeps one; it is built from the database before apply first
//! reads through it and dropped whenever the data is replaced, so it never misses a record.

use std::collections::BTreeMap;

use crate::keys;

/// Probes per id. With about 10 bits per id this keeps false positives near 0.1%.
const PROBES: u64 = 6;
/// Bounds of one bucket's bit array (bits, powers of two): 512 bytes to 16 MiB. A window larger
/// than the top bound only raises the false-positive rate.
const MIN_BITS: u64 = 1 << 12;
const MAX_BITS: u64 = 1 << 27;

pub(crate) struct DedupFilter {
    /// Bits per bucket, a power of two.
    bits: u64,
    buckets: BTreeMap<u64, Vec<u64>>,
}

impl DedupFilter {
    /// An empty filter for buckets of `window` indexes (at most one request id per index).
    pub(crate) fn new(window: u64) -> DedupFilter {
        let bits = window
            .saturating_mul(10)
            .clamp(MIN_BITS, MAX_BITS)
            .next_power_of_two();
        DedupFilter {
            bits,
            buckets: BTreeMap::new(),
        }
    }

    /// The bucket and request id of a record key, if `key` is one.
    pub(crate) fn split(key: &[u8]) -> Option<(u64, &[u8])> {
        if key.first() != Some(&keys::SM_DEDUP_BUCKET) {
            return None;
        }
        let bucket = u64::from_be_bytes(key.get(1..9)?.try_into().ok()?);
        Some((bucket, &key[9..]))
    }

    /// The bit positions of `id` in a bucket of `bits` bits (a power of two).
    fn positions(bits: u64, id: &[u8]) -> impl Iterator<Item = u64> {
        let h = hash(id);
        let (h1, h2) = (h & 0xffff_ffff, (h >> 32) | 1);
        let mask = bits - 1;
        (0..PROBES).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) & mask)
    }

    /// Notes that the database holds a record under `key` (ignored unless it is a record key).
    pub(crate) fn insert(&mut self, key: &[u8]) {
        let Some((bucket, id)) = Self::split(key) else {
            return;
        };
        let words = usize::try_from(self.bits / 64).unwrap_or(usize::MAX);
        let set = self.buckets.entry(bucket).or_insert_with(|| vec![0; words]);
        for p in Self::positions(self.bits, id) {
            if let Some(w) = set.get_mut((p / 64) as usize) {
                *w |= 1 << (p % 64);
            }
        }
    }

    /// False only when the database holds no record under `key` (a record key).
    pub(crate) fn may_contain(&self, key: &[u8]) -> bool {
        let Some((bucket, id)) = Self::split(key) else {
            return true;
        };
        let Some(set) = self.buckets.get(&bucket) else {
            return false;
        };
        Self::positions(self.bits, id).all(|p| {
            set.get((p / 64) as usize)
                .is_some_and(|w| w & (1 << (p % 64)) != 0)
        })
    }

    /// Forgets the buckets that the range delete `[start, end)` removes whole; a bucket it cuts
    /// only in part keeps its bits (a superset is still exact for "absent").
    pub(crate) fn remove_range(&mut self, start: &[u8], end: &[u8]) {
        self.buckets.retain(|&b, _| {
            let (from, to) = keys::dedup_bucket_range(b);
            !(start <= from.as_slice() && to.as_slice() <= end)
        });
    }

    /// Buckets held (tests, metrics of memory).
    #[cfg(test)]
    pub(crate) fn buckets(&self) -> usize {
        self.buckets.len()
    }
}

/// A fast 64-bit hash of an id: 8 bytes at a time, then murmur3's finaliser. The filter is
/// in memory only and ids come from clients, so this needs speed more than strength: SipHash
/// was 1.4% of a node's CPU under write load. Ids crafted to collide only make lookups fall
/// through to RocksDB.
fn hash(id: &[u8]) -> u64 {
    let mut h: u64 = 0x9e37_79b9_7f4a_7c15 ^ id.len() as u64;
    let mut chunks = id.chunks_exact(8);
    for c in chunks.by_ref() {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        h = (h.rotate_left(29) ^ u64::from_le_bytes(w)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    }
    let mut w = [0u8; 8];
    w[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
    h = (h.rotate_left(29) ^ u64::from_le_bytes(w)).wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> String {
        format!("{n:032x}")
    }

    #[test]
    fn every_inserted_id_is_found_and_few_others_are() {
        let mut f = DedupFilter::new(10_000);
        for n in 0..10_000 {
            f.insert(&keys::dedup_at(n / 5_000, &id(n)));
        }
        for n in 0..10_000 {
            assert!(f.may_contain(&keys::dedup_at(n / 5_000, &id(n))), "id {n}");
        }
        let false_hits = (10_000..110_000)
            .filter(|&n| f.may_contain(&keys::dedup_at(n % 2, &id(n))))
            .count();
        assert!(false_hits < 500, "{false_hits} false positives in 100000");
        // A bucket never written holds nothing.
        assert!(!f.may_contain(&keys::dedup_at(7, &id(1))));
    }

    #[test]
    fn ids_that_share_a_clock_prefix_spread_over_the_bits() {
        // Real ids: 16 hex digits of clock (nearly equal), then 16 random ones.
        let mut f = DedupFilter::new(10_000);
        let base = 0x1880_0000_0000_0000u64;
        for n in 0..10_000u64 {
            f.insert(&keys::dedup_at(
                0,
                &format!("{:016x}{:016x}", base + n, n * 7919),
            ));
        }
        let false_hits = (0..100_000u64)
            .filter(|&n| {
                let id = format!("{:016x}{:016x}", base + n, n * 104_729 + 1);
                f.may_contain(&keys::dedup_at(0, &id))
            })
            .count();
        assert!(false_hits < 500, "{false_hits} false positives in 100000");
    }

    #[test]
    fn a_whole_bucket_range_delete_forgets_only_that_bucket() {
        let mut f = DedupFilter::new(100);
        for b in 0..3 {
            f.insert(&keys::dedup_at(b, "x"));
        }
        let (start, end) = keys::dedup_bucket_range(1);
        f.remove_range(&start, &end);
        assert!(f.may_contain(&keys::dedup_at(0, "x")));
        assert!(!f.may_contain(&keys::dedup_at(1, "x")));
        assert!(f.may_contain(&keys::dedup_at(2, "x")));
        // A range that cuts a bucket in part leaves its bits.
        f.remove_range(&keys::dedup_at(2, "a"), &keys::dedup_at(3, ""));
        assert!(f.may_contain(&keys::dedup_at(2, "x")));
        assert_eq!(f.buckets(), 2);
    }

    #[test]
    fn other_keys_are_never_filtered() {
        let mut f = DedupFilter::new(100);
        f.insert(b"dkey");
        assert!(f.may_contain(b"dkey"));
        assert!(f.may_contain(b"R"));
        assert!(f.may_contain(&keys::dedup(&id(1))));
        assert_eq!(f.buckets(), 0);
    }

    #[test]
    fn sizes_stay_within_bounds() {
        assert_eq!(DedupFilter::new(1).bits, MIN_BITS);
        assert_eq!(DedupFilter::new(u64::MAX).bits, MAX_BITS);
        assert!(DedupFilter::new(1_000_000).bits >= 10_000_000);
    }
}
