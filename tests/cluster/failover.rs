//! Leader and node failures, lost data, lost quorum, shutdown and a node down.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t01_leader_killed_under_write_load_loses_no_acknowledged_write() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    tracing_log("--- start writers");
    let acked = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..4 {
        let (client, acked, stop) = (c.client(), acked.clone(), stop.clone());
        writers.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("load/{w}/{i}");
                let r = client
                    .put(pb::PutRequest {
                        key: key.clone().into_bytes(),
                        value: b"v".to_vec(),
                        ..Default::default()
                    })
                    .await;
                if r.is_ok() {
                    acked.lock().expect("lock").insert(key);
                }
                i += 1;
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = acked.lock().expect("lock").len();
    assert!(before > 10, "writes flowed before the kill ({before})");
    tracing_log("--- kill the leader");
    let killed_at = Instant::now();
    c.kill(leader);
    let new_leader = c.wait_for_leader(Duration::from_secs(15)).await;
    let failover = killed_at.elapsed();
    assert_ne!(new_leader, leader);
    // Election timeouts are 0.5-1 s: a new leader within a few of them.
    assert!(
        failover < Duration::from_secs(6),
        "failover took {failover:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().expect("lock").clone();
    assert!(acked.len() > before, "writes continued after failover");
    tracing_log("--- restart the old leader and check every acknowledged write");
    c.spawn(leader);
    let client = c.client();
    for key in &acked {
        assert_eq!(
            get_value(&client, key).await.as_deref(),
            Some(&b"v"[..]),
            "acknowledged write {key} lost"
        );
    }
    let idx = c.wait_converged(Duration::from_secs(30)).await;
    assert!(idx > 0);
    eprintln!(
        "failover {failover:?}, {} acknowledged writes verified",
        acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t02_all_nodes_killed_and_restarted_keep_every_write_and_equal_hashes() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    for i in 0..200 {
        put(&client, &format!("k/{i:04}"), &format!("v{i}")).await;
    }
    tracing_log("--- kill -9 every node, then restart");
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    for i in 0..200 {
        assert_eq!(
            get_value(&client, &format!("k/{i:04}")).await,
            Some(format!("v{i}").into_bytes())
        );
    }
    let idx = c.wait_converged(Duration::from_secs(30)).await;
    let mut hashes = BTreeSet::new();
    for i in 0..3 {
        let s = c.self_status(i, true).await;
        assert_eq!(s.hash_index, Some(idx));
        hashes.insert(s.state_hash.expect("hash"));
    }
    assert_eq!(hashes.len(), 1, "state hashes differ: {hashes:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t03_follower_that_missed_purged_log_catches_up_by_snapshot() {
    let _g = serial();
    let mut c = TestCluster::start(
        3,
        &[
            "--snapshot-logs-since-last",
            "50",
            "--max-in-snapshot-log-to-keep",
            "0",
        ],
    );
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let follower = (leader + 1) % 3;
    tracing_log("--- stop a follower, write past several snapshots");
    c.kill(follower);
    let client = c.client();
    for i in 0..400 {
        put(&client, &format!("s/{i:04}"), "x").await;
    }
    // Let the leader snapshot and purge.
    tokio::time::sleep(Duration::from_secs(2)).await;
    tracing_log("--- restart the follower");
    c.spawn(follower);
    c.wait_converged(Duration::from_secs(60)).await;
    let flog = c.log_text(follower);
    assert!(
        flog.contains("snapshot installed"),
        "follower caught up without a snapshot; its log ({} bytes at {})",
        flog.len(),
        c.nodes[follower].log.display()
    );
    let fc = c.client_at(follower);
    let r = fc
        .range(pb::RangeRequest {
            prefix: b"s/".to_vec(),
            limit: 1000,
            read: linearizable(),
            ..Default::default()
        })
        .await
        .expect("range on follower");
    assert_eq!(r.kvs.len(), 400);
    let idx = c.wait_converged(Duration::from_secs(30)).await;
    let h: BTreeSet<_> = futures_hashes(&c).await;
    assert_eq!(h.len(), 1, "hashes differ at {idx}: {h:?}");
}

/// An initial member that starts late, with an empty data directory, joins and catches up; one
/// whose data directory was wiped after it had taken part is refused at start (the leader has
/// replicated to it), names the way back, and never disturbs the cluster; the way back (remove,
/// a new id, add as learner, promote) works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t12_a_member_that_lost_its_data_is_refused_and_replaced_under_a_new_id() {
    let _g = serial();
    let mut c = TestCluster::start(0, &[]);
    for id in 1..=3 {
        c.add_spec(id, true);
    }
    c.spawn(0);
    c.spawn(1);
    c.wait_for_leader(Duration::from_secs(20)).await;
    for i in 0..20 {
        put(&c.client_at(0), &format!("early/{i}"), "v").await;
    }
    tracing_log("--- the third initial member starts late, never having taken part: it joins");
    c.spawn(2);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let late = c.client_at(2);
        let read = late.get(pb::GetRequest {
            key: b"early/19".to_vec(),
            read: linearizable(),
        });
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), read).await {
            if r.kv.is_some() {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the late member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        c.wait_exit(2, Duration::ZERO).await.is_none(),
        "the late member must keep running"
    );

    tracing_log("--- a follower loses its data directory and is started again under its old id");
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let wiped = (leader + 1) % 3;
    c.kill(wiped);
    std::fs::remove_dir_all(&c.nodes[wiped].data).expect("wipe");
    c.spawn(wiped);
    let status = c
        .wait_exit(wiped, Duration::from_secs(20))
        .await
        .expect("a node with lost data kept running");
    assert!(!status.success());
    let log = c.log_text(wiped);
    let id = c.nodes[wiped].id;
    assert!(log.contains("is empty, but leader"), "{log}");
    assert!(
        log.contains(&format!("metaraft cluster remove {id}")),
        "{log}"
    );
    // The others serve on, and a write through the leader still commits.
    put(&c.client_at(leader), "after-wipe", "v").await;

    tracing_log("--- the way back: remove the old id, add the machine as a new node");
    let r = c.client_at(leader).remove(id).await.expect("remove");
    assert!(!r.voters.contains(&id));
    let n = c.add_node();
    let (new_id, peer, client) = (
        c.nodes[n].id,
        c.nodes[n].peer.clone(),
        c.nodes[n].client.clone(),
    );
    // The new process may still be opening its stores: retry until the leader can reach it.
    let deadline = Instant::now() + Duration::from_secs(20);
    let r = loop {
        let admin = c.client_at(leader);
        let added = admin
            .add_learner(new_id, peer.clone(), client.clone())
            .await;
        match added {
            Ok(_) => match admin.promote(new_id).await {
                Ok(r) => break r,
                Err(e) => assert!(Instant::now() < deadline, "promote: {e}"),
            },
            Err(e) => assert!(Instant::now() < deadline, "add learner: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(r.voters.contains(&new_id));
    assert_eq!(
        get_value(&c.client_at(n), "after-wipe").await,
        Some(b"v".to_vec())
    );
    assert_eq!(
        get_value(&c.client_at(n), "early/0").await,
        Some(b"v".to_vec())
    );

    tracing_log("--- a member added with add-learner (no initial members) loses its data");
    // It cannot be refused at start (it knows no peers): the leader notices instead. Before,
    // openraft stopped replicating to it without a word, and it stayed a voter holding nothing.
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    assert_ne!(
        leader, n,
        "a new voter fresh from a snapshot does not lead yet"
    );
    c.kill(n);
    std::fs::remove_dir_all(&c.nodes[n].data).expect("wipe");
    c.spawn(n);
    put(&c.client_at(leader), "after-second-wipe", "v").await;
    let ops = c.nodes[leader].ops.clone();
    let deadline = Instant::now() + Duration::from_secs(20);
    while gauge(&ops, "metaraft_lost_data_detections_total").await == 0 {
        assert!(
            Instant::now() < deadline,
            "the leader did not notice node {new_id}'s lost data"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let log = c.log_text(leader);
    assert!(
        log.contains(&format!(
            "node {new_id} lost log entries it had acknowledged"
        )) && log.contains(&format!("metaraft cluster remove {new_id}")),
        "{log}"
    );
    // Reported once, not once per heartbeat.
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(gauge(&ops, "metaraft_lost_data_detections_total").await, 1);
    let ready = http_get(&c.nodes[n].ops, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    put(&c.client_at(leader), "still-commits", "v").await;
}

/// A leader that lost its quorum keeps calling itself leader (`metaraft_is_leader` 1) but
/// cannot commit: `metaraft_quorum_ack_age_ms` says so, for an alert to fire on, and `/readyz`
/// turns not ready, so a load balancer stops sending it requests. Both recover with a majority,
/// and a follower left without a leader is not ready either.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t13_a_leader_without_a_quorum_shows_it_and_is_not_ready() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    put(&c.client_at(leader), "k", "v").await;
    let ops = c.nodes[leader].ops.clone();
    let healthy = gauge(&ops, "metaraft_quorum_ack_age_ms").await;
    assert!(
        healthy < 2_000,
        "a healthy leader's quorum ack age: {healthy}"
    );
    // Idle for longer than the readiness limit (2 s): heartbeats keep every node ready.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    for n in &c.nodes {
        let ready = http_get(&n.ops, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    }
    let followers: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    for &i in &followers {
        assert_eq!(
            gauge(&c.nodes[i].ops, "metaraft_quorum_ack_age_ms").await,
            0
        );
        c.kill(i);
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let age = gauge(&ops, "metaraft_quorum_ack_age_ms").await;
        if age >= 3_000 {
            assert_eq!(gauge(&ops, "metaraft_is_leader").await, 1);
            break;
        }
        assert!(Instant::now() < deadline, "quorum ack age stayed at {age}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let ready = http_get(&ops, "/readyz").await;
    assert!(
        ready.starts_with("HTTP/1.1 503") && ready.contains("leader without a quorum"),
        "{ready}"
    );
    // A majority again: a leader (the old one or a new one) and ready once more.
    c.restart(followers[0]);
    let deadline = Instant::now() + Duration::from_secs(20);
    let now_leader = loop {
        let l = c.wait_for_leader(Duration::from_secs(20)).await;
        if http_get(&c.nodes[l].ops, "/readyz")
            .await
            .starts_with("HTTP/1.1 200")
        {
            break l;
        }
        assert!(
            Instant::now() < deadline,
            "no ready leader after the restart"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    put(&c.client_at(now_leader), "k2", "v2").await;
    // Its one follower, left alone, is not ready: no leader, or none in touch.
    let lone = if now_leader == leader {
        followers[0]
    } else {
        leader
    };
    c.kill(now_leader);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ready = http_get(&c.nodes[lone].ops, "/readyz").await;
        if ready.starts_with("HTTP/1.1 503") {
            assert!(
                ready.contains("no known leader") || ready.contains("no contact from leader"),
                "{ready}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a follower alone stayed ready: {ready}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// SIGTERM stops every node cleanly and soon: a follower too, which always has the leader's
/// replication stream open into it (before, its graceful shutdown waited for that stream
/// forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t14_sigterm_stops_followers_and_the_leader_within_the_grace_period() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    put(&c.client_at(leader), "k", "v").await;
    let follower = (leader + 1) % 3;
    for i in [follower, leader] {
        let pid = c.procs[i].as_ref().expect("running").id();
        let ok = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -TERM");
        let id = c.nodes[i].id;
        let status = c
            .wait_exit(i, Duration::from_secs(10))
            .await
            .unwrap_or_else(|| panic!("node {id} still running 10 s after SIGTERM"));
        assert!(
            status.success(),
            "node {} exited with {status}",
            c.nodes[i].id
        );
        assert!(c.log_text(i).contains("node stopped"));
    }
}

/// With a follower down, the leader retries it at the backoff's pace. Before, the replication
/// stream failed before taking a request, which is where openraft applies its backoff: the
/// leader retried at once, forever, at 98% of a core and about 135,000 log lines a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t15_a_follower_down_costs_the_leader_little() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    put(&c.client_at(leader), "k", "v").await;
    let down = (leader + 1) % 3;
    let peer = c.nodes[down].peer.clone();
    c.kill(down);
    put(&c.client_at(leader), "k2", "v2").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = c.pid(leader).expect("leader runs");
    let lines = |c: &TestCluster| {
        c.log_text(leader)
            .lines()
            .filter(|l| l.contains(&peer))
            .count()
    };
    let (lines0, cpu0, t0) = (lines(&c), cpu_seconds(pid), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (lines1, cpu1) = (lines(&c), cpu_seconds(pid));
    let busy = (cpu1 - cpu0) / t0.elapsed().as_secs_f64();
    assert!(
        lines1 - lines0 < 300,
        "{} log lines about the down follower in 3 s",
        lines1 - lines0
    );
    assert!(
        busy < 0.5,
        "an idle leader used {:.0}% of a core",
        busy * 100.0
    );
    // It still commits with the other follower, and the down one catches up when back.
    put(&c.client_at(leader), "k3", "v3").await;
    c.spawn(down);
    c.wait_converged(Duration::from_secs(20)).await;
}
