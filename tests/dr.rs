//! DR replica: a permanent learner at a "backup site" that the cluster never promotes, promoted
//! on its own after every primary node is killed under write load; acknowledged writes older
//! than the measured lag survive, revisions never go backwards, and the old lineage is refused.

#![allow(clippy::await_holding_lock)]

mod common;

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use metaraft::pb;

fn metaraft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_metaraft"))
}

async fn dr_status(c: &metaraft::client::Client) -> pb::DrStatusResponse {
    c.cluster_at(0)
        .dr_status(pb::DrStatusRequest {})
        .await
        .expect("dr status")
        .into_inner()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d01_dr_replica_promoted_after_losing_the_primary_site() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let dr = c.add_spec(4, false);
    c.nodes[dr].extra = vec!["--dr-replica".into()];
    c.spawn(dr);
    let client = c.client();
    let (peer, cl) = (c.nodes[dr].peer.clone(), c.nodes[dr].client.clone());
    client
        .add_learner(4, peer, cl.clone())
        .await
        .expect("add DR learner");
    // The cluster refuses to make it a voter.
    let e = client
        .promote(4)
        .await
        .expect_err("DR replica must not be promoted");
    assert!(e.to_string().contains("DR replica"), "{e}");
    // A normal node refuses a DR promotion.
    let e = c
        .client_at(0)
        .cluster_at(0)
        .dr_promote(pb::DrPromoteRequest { node_id: 1 })
        .await
        .expect_err("not a DR replica");
    assert!(e.message().contains("MR-NOTDR"), "{e}");

    // Write load: (key, revision, ack time).
    let acked: Arc<Mutex<Vec<(String, u64, Instant)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, acked, stop) = (c.client(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("w{w}/{i}");
                let r = client
                    .put(pb::PutRequest {
                        key: key.clone().into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    })
                    .await;
                if let Ok(r) = r {
                    acked
                        .lock()
                        .unwrap()
                        .push((key, r.revision, Instant::now()));
                }
                i += 1;
            }
        }));
    }
    let drc = c.client_at(dr);
    let mut worst_lag_ms = 0;
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let s = dr_status(&drc).await;
        assert!(s.dr_replica && s.role == "learner", "{s:?}");
        worst_lag_ms = worst_lag_ms.max(s.lag_ms).max(s.last_contact_ms_ago);
    }
    let before = dr_status(&drc).await;

    // The primary site is lost: every voter killed at once, writers still running.
    let loss = Instant::now();
    for i in 0..3 {
        c.kill(i);
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        let _ = w.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "only {} writes acknowledged",
        acked.len()
    );

    let t = Instant::now();
    let out = metaraft()
        .args(["dr", "promote", "--endpoints", &cl, "--node-id", "4"])
        .output()
        .expect("dr promote");
    let rto = t.elapsed();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let after = dr_status(&drc).await;
    assert_ne!(after.cluster_id, before.cluster_id);
    assert!(!after.dr_replica, "a promoted replica is a voter now");

    // RPO: every write acknowledged earlier than the measured lag before the loss is present.
    let window = Duration::from_millis(worst_lag_ms + 500);
    let mut lost_recent = 0;
    let mut max_rev = 0;
    for (key, rev, at) in &acked {
        max_rev = max_rev.max(*rev);
        let present = get_value(&drc, key).await.is_some();
        if !present {
            assert!(
                loss.duration_since(*at) < window,
                "{key} (revision {rev}) acknowledged {:?} before the loss is missing; lag window {window:?}",
                loss.duration_since(*at)
            );
            lost_recent += 1;
        }
    }
    // Revisions never go backwards: new writes land past every revision ever acknowledged.
    let rev = put(&drc, "after-promotion", "1").await;
    assert!(
        rev > max_rev,
        "revision {rev} after promotion, {max_rev} acknowledged before"
    );
    eprintln!(
        "DR: {} writes acknowledged, {lost_recent} lost (all within {window:?} of the loss); \
         lag before loss {} ms (worst seen {worst_lag_ms} ms); promote to first write {:.2}s",
        acked.len(),
        before.lag_ms,
        rto.as_secs_f64()
    );

    // The old primary comes back: it is refused by the promoted node, never merged.
    for i in 0..3 {
        c.restart(i);
    }
    c.wait_for_leader(Duration::from_secs(20)).await;
    put(&c.client_at(0), "old-lineage-write", "x").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !c.log_text(dr).contains("another cluster lineage") {
        assert!(Instant::now() < deadline, "old lineage was never refused");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(get_value(&drc, "old-lineage-write").await.is_none());
    assert_eq!(dr_status(&drc).await.cluster_id, after.cluster_id);
    assert!(get_value(&drc, "after-promotion").await.is_some());
}

/// A DR replica that falls behind past the leader's purged log catches up by a streamed
/// snapshot, and `dr status` shows the lag while it is down and the snapshot once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn d02_dr_replica_catches_up_by_snapshot_and_reports_it() {
    let _g = serial();
    let mut c = TestCluster::start(
        3,
        &[
            "--snapshot-logs-since-last",
            "200",
            "--max-in-snapshot-log-to-keep",
            "0",
        ],
    );
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let dr = c.add_spec(4, false);
    c.nodes[dr].extra = vec!["--dr-replica".into()];
    c.spawn(dr);
    let client = c.client();
    let (peer, cl) = (c.nodes[dr].peer.clone(), c.nodes[dr].client.clone());
    client
        .add_learner(4, peer, cl)
        .await
        .expect("add DR learner");
    put(&client, "first", "1").await;
    c.wait_converged(Duration::from_secs(20)).await;
    c.kill(dr);
    for i in 0..600 {
        put(&client, &format!("while-down/{i}"), "x").await;
    }
    // The leader purges its log between two attempts to reach the replica (openraft keeps what
    // an attempt in flight may send, and attempts are spaced by the replication backoff): wait
    // for a purge past what the replica holds, so that it can only catch up by snapshot.
    let deadline = Instant::now() + Duration::from_secs(20);
    while purged_up_to(&c.log_text(leader)) < 400 {
        assert!(Instant::now() < deadline, "the leader never purged its log");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    c.restart(dr);
    let drc = c.client_at(dr);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = drc.cluster_at(0).dr_status(pb::DrStatusRequest {}).await {
            let s = s.into_inner();
            if s.lag_entries == 0 && s.applied_index > 600 && s.snapshots_received > 0 {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "DR replica never caught up by snapshot"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // STALE reads on the replica see the data it was sent.
    let r = drc
        .get(pb::GetRequest {
            key: b"while-down/599".to_vec(),
            read: Some(pb::ReadOptions {
                consistency: pb::Consistency::Stale as i32,
                ..Default::default()
            }),
        })
        .await
        .expect("stale read");
    assert!(r.kv.is_some());
    let out = metaraft()
        .args([
            "dr",
            "status",
            "--endpoints",
            &c.nodes[dr].client,
            "--output",
            "json",
        ])
        .output()
        .expect("dr status");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["dr_replica"], true);
    assert!(v["snapshots_received"].as_u64() >= Some(1), "{v}");

    // Bad input to the DR entry points: the wrong node id, several endpoints. Nothing changes.
    let e = drc
        .cluster_at(0)
        .dr_promote(pb::DrPromoteRequest { node_id: 2 })
        .await
        .expect_err("wrong node id");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    assert!(e.message().contains("this endpoint is node 4"), "{e}");
    let eps = format!("{},{}", c.nodes[dr].client, c.nodes[0].client);
    let out = metaraft()
        .args(["dr", "promote", "--endpoints", &eps, "--node-id", "4"])
        .output()
        .expect("dr promote");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("exactly one endpoint"));
    let s = dr_status(&drc).await;
    assert!(s.dr_replica && s.role == "learner", "{s:?}");
}

/// The highest index openraft logged a purge up to (its info line `purge log, ..., purge_upto:
/// T1-N3.599`), 0 if none.
fn purged_up_to(log: &str) -> u64 {
    log.lines()
        .filter(|l| l.contains("purge log"))
        .filter_map(|l| {
            l.rsplit_once("purge_upto: ")?
                .1
                .rsplit_once('.')?
                .1
                .trim()
                .parse()
                .ok()
        })
        .max()
        .unwrap_or(0)
}
