//! Reads at every consistency level, learners, retries and batching.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t04_learner_serves_linearizable_reads() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let l = c.add_node();
    let client = c.client();
    let (id, peer, cl) = (
        c.nodes[l].id,
        c.nodes[l].peer.clone(),
        c.nodes[l].client.clone(),
    );
    let r = client.add_learner(id, peer, cl).await.expect("add learner");
    assert!(r.learners.contains(&id));
    let learner = c.client_at(l);
    let writer = c.client_at(0);
    for i in 0..50 {
        let v = format!("v{i}");
        put(&writer, "lin/key", &v).await;
        // Written through node 1, read immediately on the learner: must see it.
        assert_eq!(get_value(&learner, "lin/key").await, Some(v.into_bytes()));
    }
    let s = c.self_status(l, false).await;
    assert_eq!(s.role, "learner");
    // Promote and remove work through any node.
    let r = c.client_at(1).promote(id).await.expect("promote");
    assert!(r.voters.contains(&id));
    let r = c.client_at(2).remove(id).await.expect("remove");
    assert!(!r.voters.contains(&id) && !r.learners.contains(&id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t05_retried_request_id_applies_once() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let req = pb::PutRequest {
        key: b"idem".to_vec(),
        value: b"first".to_vec(),
        expected_revision: None,
        request_id: "req-42".into(),
    };
    let first = c.client_at(0).put(req.clone()).await.expect("put");
    put(&c.client(), "idem", "second").await;
    // The retry arrives at another node, long after: same answer, nothing written.
    let retry = c.client_at(2).put(req.clone()).await.expect("retry");
    assert_eq!(first.revision, retry.revision);
    assert_eq!(
        get_value(&c.client(), "idem").await,
        Some(b"second".to_vec())
    );
    // Compare-and-set with a retried id also answers once.
    let cas = pb::PutRequest {
        key: b"cas".to_vec(),
        value: b"1".to_vec(),
        expected_revision: Some(0),
        request_id: "cas-1".into(),
    };
    let a = c.client_at(1).put(cas.clone()).await.expect("cas");
    let b = c
        .client_at(0)
        .put(cas)
        .await
        .expect("cas retry is not a mismatch");
    assert_eq!(a.revision, b.revision);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t06_session_and_stale_reads() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let rev = put(&c.client_at(0), "sess", "1").await;
    for i in 0..3 {
        let r = c
            .client_at(i)
            .get(pb::GetRequest {
                key: b"sess".to_vec(),
                read: Some(pb::ReadOptions {
                    consistency: pb::Consistency::Session as i32,
                    min_revision: rev,
                    max_lag: 0,
                }),
            })
            .await
            .expect("session read");
        assert!(r.applied_index >= rev);
        assert_eq!(r.kv.expect("value").value, b"1");
        let r = c
            .client_at(i)
            .get(pb::GetRequest {
                key: b"sess".to_vec(),
                read: Some(pb::ReadOptions {
                    consistency: pb::Consistency::Stale as i32,
                    min_revision: 0,
                    max_lag: 0,
                }),
            })
            .await
            .expect("stale read");
        assert!(r.applied_index > 0);
    }
    // A session revision far in the future times out cleanly.
    let e = c
        .client_at(0)
        .get(pb::GetRequest {
            key: b"sess".to_vec(),
            read: Some(pb::ReadOptions {
                consistency: pb::Consistency::Session as i32,
                min_revision: rev + 1_000_000,
                max_lag: 0,
            }),
        })
        .await
        .expect_err("future revision");
    assert_eq!(e.code(), Some(Code::Unavailable));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t10_lease_reads_on_every_node_see_acknowledged_writes() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let lease = Some(pb::ReadOptions {
        consistency: pb::Consistency::Lease as i32,
        min_revision: 0,
        max_lag: 0,
    });
    for round in 0..20 {
        // Written through one node, read right after the acknowledgement through each node.
        let writer = c.client_at(round % 3);
        let rev = put(&writer, "lease/k", &format!("v{round}")).await;
        for node in 0..3 {
            let r = c
                .client_at(node)
                .get(pb::GetRequest {
                    key: b"lease/k".to_vec(),
                    read: lease,
                })
                .await
                .expect("lease read");
            let kv = r.kv.expect("present");
            assert_eq!(
                kv.value,
                format!("v{round}").into_bytes(),
                "node {node} round {round}"
            );
            assert!(
                r.applied_index >= rev,
                "served at {} < write {rev}",
                r.applied_index
            );
        }
    }
    // After a leader change, lease reads on the new leader and the old one still see the
    // latest write.
    let target = (leader + 1) % 3;
    c.client()
        .transfer_leader(c.nodes[target].id)
        .await
        .expect("transfer");
    let now = c.wait_for_leader(Duration::from_secs(10)).await;
    let rev = put(&c.client_at(now), "lease/k", "after").await;
    for node in [leader, now] {
        let r = c
            .client_at(node)
            .get(pb::GetRequest {
                key: b"lease/k".to_vec(),
                read: lease,
            })
            .await
            .expect("lease read after transfer");
        assert_eq!(r.kv.map(|k| k.value), Some(b"after".to_vec()));
        assert!(r.applied_index >= rev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t11_concurrent_writes_on_the_leader_are_proposed_in_batches_and_each_answered() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    tracing::info!("--- 300 writes at once on the leader, one request id sent twice");
    let kv = c.client_at(leader).kv_at(0);
    let mut tasks = Vec::new();
    for i in 0..300u32 {
        let mut kv = kv.clone();
        // Writes 0 and 1 carry the same request id: whichever is proposed second, even in the
        // same batch, must get the first one's answer and write nothing.
        let request_id = if i < 2 {
            "dup-in-burst".into()
        } else {
            format!("burst-{i}")
        };
        tasks.push(tokio::spawn(async move {
            kv.put(pb::PutRequest {
                key: format!("burst/{i:03}").into_bytes(),
                value: format!("v{i}").into_bytes(),
                expected_revision: None,
                request_id,
            })
            .await
            .expect("put")
            .into_inner()
            .revision
        }));
    }
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.expect("task"));
    }
    assert_eq!(
        revs[0], revs[1],
        "a retried id answers with the first revision"
    );
    let mut distinct = revs[1..].to_vec();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(
        distinct.len(),
        299,
        "every other write has its own revision"
    );
    // Exactly one of the two duplicate writes landed.
    let v0 = get_value(&c.client(), "burst/000").await;
    let v1 = get_value(&c.client(), "burst/001").await;
    assert!(
        v0.is_some() != v1.is_some(),
        "one of the duplicate writes applied: {v0:?} {v1:?}"
    );
    for i in 2..300u32 {
        assert_eq!(
            get_value(&c.client(), &format!("burst/{i:03}")).await,
            Some(format!("v{i}").into_bytes()),
            "write {i}"
        );
    }
    tracing::info!("--- the leader proposed them in fewer calls than writes");
    let body = http_get(&c.nodes[leader].ops, "/metrics").await;
    let metric = |name: &str| -> f64 {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing: {body}"))
    };
    let (sum, count) = (
        metric("metaraft_propose_batch_size_sum "),
        metric("metaraft_propose_batch_size_count "),
    );
    assert!(sum >= 300.0, "every write went through the proposer: {sum}");
    assert!(
        count < sum,
        "some proposals carried several writes: {count} for {sum}"
    );
    let converged = c.wait_converged(Duration::from_secs(20)).await;
    assert!(converged >= *distinct.last().expect("revisions"));
}
