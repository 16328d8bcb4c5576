//! openraft's storage conformance suite against our RocksDB stores, plus store-specific tests.

use std::sync::Arc;

use openraft::storage::RaftLogStorageExt;
use openraft::storage::{RaftLogStorage, RaftStateMachine};
use openraft::testing::log::{StoreBuilder, Suite};
use openraft::type_config::TypeConfigExt;
use openraft::RaftSnapshotBuilder;

use super::*;
use crate::metrics::Metrics;
use crate::raft_types::TypeConfig;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachineStore, tempfile::TempDir> for Builder {
    async fn build(
        &self,
    ) -> Result<(tempfile::TempDir, LogStore, StateMachineStore), openraft::StorageError<TypeConfig>>
    {
        let dir = tempfile::tempdir()
            .map_err(|e| openraft::StorageError::read(TypeConfig::err_from_string(e)))?;
        let log = LogStore::open(&dir.path().join("log"), Arc::new(Metrics::default()))
            .map_err(|e| openraft::StorageError::read(TypeConfig::err_from_string(e)))?;
        let sm = StateMachineStore::open(dir.path(), 1000)
            .map_err(|e| openraft::StorageError::read(TypeConfig::err_from_string(e)))?;
        Ok((dir, log, sm))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openraft_storage_conformance_suite() {
    Suite::test_all(Builder)
        .await
        .expect("openraft storage suite");
}

fn entry(index: u64, key: &str, value: &str) -> crate::raft_types::Entry {
    openraft::Entry {
        log_id: openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: openraft::EntryPayload::Normal(std::sync::Arc::new(crate::fsm::Request::new(
            "",
            crate::fsm::Command::Put {
                key: key.into(),
                value: value.into(),
                expected_revision: None,
            },
        ))),
    }
}

async fn build_snapshot(
    sm: &mut StateMachineStore,
) -> openraft::type_config::alias::SnapshotOf<TypeConfig, SnapshotDir> {
    sm.get_snapshot_builder()
        .await
        .build_snapshot()
        .await
        .expect("build snapshot")
}

async fn apply(sm: &mut StateMachineStore, entries: Vec<crate::raft_types::Entry>) {
    let s = futures::stream::iter(entries.into_iter().map(|e| Ok((e, None))));
    sm.apply(s).await.expect("apply");
}

#[tokio::test]
async fn snapshot_install_restores_exact_state_and_survives_reopen() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let mut sa = StateMachineStore::open(a.path(), 1000).expect("open a");
    let mut sb = StateMachineStore::open(b.path(), 1000).expect("open b");
    apply(
        &mut sa,
        (1..=50)
            .map(|i| entry(i, &format!("k{i:03}"), "v"))
            .collect(),
    )
    .await;
    let snap = build_snapshot(&mut sa).await;
    // Writes after the checkpoint do not leak into it.
    apply(&mut sa, vec![entry(51, "late", "x")]).await;
    sb.install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .expect("install");
    assert_eq!(sb.applied_index(), 50);
    assert!(sb.get(b"late").expect("get").0.is_none());
    assert_eq!(sb.range(b"k", b"", 1000).expect("range").0.len(), 50);
    let hash_b = sb.state_hash().expect("hash");
    drop(sb);
    let sb = StateMachineStore::open(b.path(), 1000).expect("reopen b");
    assert_eq!(
        sb.state_hash().expect("hash"),
        hash_b,
        "installed generation survives restart"
    );
    assert_eq!(sb.applied_index(), 50);
}

#[tokio::test]
async fn range_paginates_by_key() {
    let a = tempfile::tempdir().expect("tmp");
    let mut s = StateMachineStore::open(a.path(), 1000).expect("open");
    apply(
        &mut s,
        vec![
            entry(1, "p/a", "1"),
            entry(2, "p/b", "2"),
            entry(3, "p/c", "3"),
            entry(4, "q", "4"),
        ],
    )
    .await;
    let (page, more, applied) = s.range(b"p/", b"", 2).expect("range");
    assert_eq!(
        applied, 4,
        "a range reports the index its snapshot was read at"
    );
    let (one, at) = s.get(b"p/c").expect("get");
    assert_eq!(one.map(|v| v.key), Some(b"p/c".to_vec()));
    assert_eq!(at, 4);
    assert_eq!(
        page.iter().map(|v| v.key.clone()).collect::<Vec<_>>(),
        vec![b"p/a".to_vec(), b"p/b".to_vec()]
    );
    assert!(more);
    let (page, more, _) = s.range(b"p/", b"p/b", 2).expect("range");
    assert_eq!(page.len(), 1);
    assert!(!more);
    let (all, _, _) = s.range(b"", b"", 10).expect("range");
    assert_eq!(all.len(), 4);
}

#[tokio::test]
async fn corrupt_state_machine_pointer_is_a_clear_error() {
    let a = tempfile::tempdir().expect("tmp");
    drop(StateMachineStore::open(a.path(), 1000).expect("open"));
    std::fs::write(a.path().join("SM_CURRENT"), b"garbage").expect("write");
    let err = StateMachineStore::open(a.path(), 1000)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("SM_CURRENT"), "{err}");
}

#[tokio::test]
async fn log_survives_reopen_and_truncates() {
    let a = tempfile::tempdir().expect("tmp");
    let m = Arc::new(Metrics::default());
    {
        let mut log = LogStore::open(&a.path().join("log"), m.clone()).expect("open");
        log.blocking_append((1..=10).map(|i| entry(i, "k", "v")))
            .await
            .expect("append and flush");
        log.truncate_after(Some(entry(7, "", "").log_id))
            .await
            .expect("truncate");
    }
    let mut log = LogStore::open(&a.path().join("log"), m).expect("reopen");
    let st = log.get_log_state().await.expect("state");
    assert_eq!(st.last_log_id.map(|l| l.index), Some(7));
}

fn entry_with_id(index: u64, key: &str, id: &str) -> crate::raft_types::Entry {
    let mut e = entry(index, key, "v");
    if let openraft::EntryPayload::Normal(r) = &mut e.payload {
        std::sync::Arc::make_mut(r).request_id = id.to_string();
    }
    e
}

#[tokio::test]
async fn batch_boundaries_do_not_change_state() {
    // Request ids expire after 10 entries, so expiry runs inside batches too.
    let entries: Vec<_> = (1..=300)
        .map(|i| entry_with_id(i, &format!("k{}", i % 7), &format!("id{}", i % 50)))
        .collect();
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let mut one_batch = StateMachineStore::open(a.path(), 10).expect("open");
    let mut one_by_one = StateMachineStore::open(b.path(), 10).expect("open");
    apply(&mut one_batch, entries.clone()).await;
    for e in entries {
        apply(&mut one_by_one, vec![e]).await;
    }
    assert_eq!(
        one_batch.state_hash().expect("hash"),
        one_by_one.state_hash().expect("hash")
    );
    assert_eq!(one_batch.applied_index(), 300);
}

fn delete_entry(index: u64, key: &str) -> crate::raft_types::Entry {
    let mut e = entry(index, key, "");
    e.payload = openraft::EntryPayload::Normal(std::sync::Arc::new(crate::fsm::Request::new(
        "",
        crate::fsm::Command::Delete {
            key: key.into(),
            expected_revision: None,
        },
    )));
    e
}

/// Puts and deletes over a few keys, so most writes find the key's previous record.
fn churn(from: u64, to: u64) -> Vec<crate::raft_types::Entry> {
    (from..=to)
        .map(|i| {
            let key = format!("k{}", i % 5);
            if i % 7 == 0 {
                delete_entry(i, &key)
            } else {
                entry(i, &key, &format!("v{i}"))
            }
        })
        .collect()
}

#[tokio::test]
async fn apply_cache_never_changes_results() {
    // `warm` keeps its apply cache across batches; `cold` is reopened (an empty cache) before
    // every batch. Versions and create revisions come from each key's previous record, so a
    // stale cache would show in the hash.
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let mut warm = StateMachineStore::open(a.path(), 1000).expect("open");
    let mut from = 1;
    for size in [1u64, 3, 2, 17, 1, 40, 5] {
        apply(&mut warm, churn(from, from + size - 1)).await;
        let mut cold = StateMachineStore::open(b.path(), 1000).expect("open");
        apply(&mut cold, churn(from, from + size - 1)).await;
        assert_eq!(
            warm.state_hash().expect("hash"),
            cold.state_hash().expect("hash"),
            "after entries up to {}",
            from + size - 1
        );
        from += size;
    }
}

#[tokio::test]
async fn snapshot_install_empties_the_apply_cache() {
    // `behind` stops at 30 and builds a snapshot; `ahead` applies to 60 (its cache now holds
    // the keys' records at 60), installs the snapshot at 30, and applies 31..=60 again. Both
    // must end equal: the cached records from before the install must not be used.
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let mut behind = StateMachineStore::open(a.path(), 1000).expect("open");
    let mut ahead = StateMachineStore::open(b.path(), 1000).expect("open");
    apply(&mut behind, churn(1, 30)).await;
    apply(&mut ahead, churn(1, 60)).await;
    let snap = build_snapshot(&mut behind).await;
    ahead
        .install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .expect("install");
    apply(&mut behind, churn(31, 60)).await;
    apply(&mut ahead, churn(31, 60)).await;
    assert_eq!(
        ahead.state_hash().expect("hash"),
        behind.state_hash().expect("hash")
    );
}

/// A store written by the first dedup layout (`r` + id, `q` + index) upgrades in place: its ids
/// are still answered within the window and expired on time, the new layout is written, and once
/// no queue key is left apply stops looking for them. Batch boundaries change nothing.
#[tokio::test]
async fn first_layout_request_ids_are_honoured_and_expired_after_upgrade() {
    let window = 5;
    for per_call in [1usize, 3, 100] {
        let dir = tempfile::tempdir().expect("tmp");
        let mut sm = StateMachineStore::open(dir.path(), window).expect("open");
        // As the previous release left it: "old" applied at index 2 (a put of k-old).
        apply(
            &mut sm,
            vec![entry(1, "k0", "v"), entry(2, "k-old", "first")],
        )
        .await;
        let rec = crate::fsm::DedupRecord {
            index: 2,
            response: crate::fsm::Response::Put {
                revision: 2,
                prev_revision: 0,
            },
        };
        sm.put_raw_for_test(
            &crate::keys::dedup("old"),
            &enc("dedup", &rec).expect("encode"),
        );
        sm.put_raw_for_test(&crate::keys::dedup_queue(2), b"old");
        // The upgraded binary opens it.
        drop(sm);
        let mut sm = StateMachineStore::open(dir.path(), window).expect("reopen");
        let mut entries = Vec::new();
        for i in 3..=20u64 {
            entries.push(match i {
                // A retry inside the window (2 + 5 > 6): answered, not applied.
                6 => entry_with_id(6, "k-old", "old"),
                // Past it: applied anew.
                7 => entry_with_id(7, "k-new", "old"),
                // A new-layout id and its retry inside the window.
                8 | 12 => entry_with_id(i, &format!("k{i}"), "fresh"),
                _ => entry(i, "filler", "x"),
            });
        }
        for chunk in entries.chunks(per_call) {
            apply(&mut sm, chunk.to_vec()).await;
        }
        let value = |k: &str| {
            sm.get(k.as_bytes())
                .expect("get")
                .0
                .map(|v| (v.record.value, v.record.mod_revision))
        };
        assert_eq!(
            value("k-old"),
            Some((b"first".to_vec(), 2)),
            "retry at 6 not applied"
        );
        assert_eq!(
            value("k-new").map(|v| v.1),
            Some(7),
            "expired id applied at 7"
        );
        assert_eq!(value("k8").map(|v| v.1), Some(8));
        assert_eq!(value("k12"), None, "retry of fresh at 12 not applied");
        assert_eq!(
            sm.get_raw_for_test(&crate::keys::dedup("old")),
            None,
            "old record expired"
        );
        assert_eq!(
            sm.get_raw_for_test(&crate::keys::dedup_queue(2)),
            None,
            "its queue key too"
        );
        // Index 7's record is in bucket 1 (5..=9), which is dropped at 2 * 5 + 5 - 1 = 14.
        assert_eq!(sm.get_raw_for_test(&crate::keys::dedup_at(1, "old")), None);
        assert_eq!(
            sm.get_raw_for_test(&crate::keys::dedup_at(1, "fresh")),
            None
        );
        // Checked at the start of each apply call.
        apply(&mut sm, vec![entry(21, "filler", "y")]).await;
        assert_eq!(
            sm.first_layout_dedup_left(),
            Some(false),
            "per_call {per_call}"
        );
    }
}

/// Apply answers a new request id from an in-memory filter instead of RocksDB. Retries must
/// still be found whatever the filter saw: in the same batch, in a later apply call, after a
/// reopen (the filter is rebuilt from the records on disk) and after a snapshot install (the
/// filter built before it describes other data).
#[tokio::test]
async fn request_ids_are_remembered_across_batches_reopen_and_snapshot_install() {
    let a = tempfile::tempdir().expect("tmp");
    let b = tempfile::tempdir().expect("tmp");
    let applied = |sm: &StateMachineStore, k: &str| sm.get(k.as_bytes()).expect("get").0.is_some();
    let mut sa = StateMachineStore::open(a.path(), 1000).expect("open");
    let first: Vec<_> = (1..=10)
        .map(|i| entry_with_id(i, &format!("k{i}"), &format!("id{i}")))
        .collect();
    apply(&mut sa, first).await;
    // The same batch, then a later call.
    let with_ids = |list: &[(u64, &str, &str)]| -> Vec<_> {
        list.iter()
            .map(|&(i, key, id)| entry_with_id(i, key, id))
            .collect()
    };
    apply(
        &mut sa,
        with_ids(&[(11, "same-1", "same"), (12, "same-2", "same")]),
    )
    .await;
    apply(&mut sa, with_ids(&[(13, "later", "id2")])).await;
    assert!(applied(&sa, "same-1"));
    assert!(!applied(&sa, "same-2"), "retry in the same batch");
    assert!(!applied(&sa, "later"), "retry in a later call");

    drop(sa);
    let mut sa = StateMachineStore::open(a.path(), 1000).expect("reopen");
    apply(&mut sa, vec![entry_with_id(14, "after-reopen", "id3")]).await;
    assert!(!applied(&sa, "after-reopen"), "retry after reopen");
    let snap = build_snapshot(&mut sa).await;

    // `sb` builds its filter from its own data first, then has that data replaced.
    let mut sb = StateMachineStore::open(b.path(), 1000).expect("open");
    apply(&mut sb, vec![entry_with_id(1, "other", "other")]).await;
    sb.install_snapshot(&snap.meta, snap.snapshot.clone())
        .await
        .expect("install");
    let tail = with_ids(&[(15, "after-install", "id5"), (16, "new-id", "fresh")]);
    apply(&mut sb, tail.clone()).await;
    assert!(!applied(&sb, "after-install"), "retry after install");
    assert!(applied(&sb, "new-id"), "a new id is applied");
    for e in tail {
        apply(&mut sa, vec![e]).await;
    }
    assert_eq!(
        sa.state_hash().expect("hash"),
        sb.state_hash().expect("hash")
    );
}
