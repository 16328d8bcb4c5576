//! Cluster tests with three real `metaraft serve` processes.

// Each test holds a process-wide lock for its whole run so clusters never overlap on two cores;
// every test has its own runtime, so holding it across awaits cannot deadlock.
#![allow(clippy::await_holding_lock)]

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use metaraft::pb;
use tonic::Code;

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

fn tracing_log(s: &str) {
    eprintln!("{s}");
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

async fn futures_hashes(c: &TestCluster) -> BTreeSet<(Option<u64>, Option<u64>)> {
    let mut out = BTreeSet::new();
    for i in c.live() {
        let s = c.self_status(i, true).await;
        out.insert((s.hash_index, s.state_hash));
    }
    out
}

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
async fn t07_bad_input_on_every_rpc_is_a_clear_error() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let mut kv = c.client().kv_at(1);
    let code = |r: Result<tonic::Response<_>, tonic::Status>| -> Code {
        match r {
            Ok(_) => Code::Ok,
            Err(s) => {
                assert!(
                    s.message().starts_with("[MR-"),
                    "status message carries a code: {}",
                    s.message()
                );
                s.code()
            }
        }
    };
    assert_eq!(
        code(
            kv.put(pb::PutRequest {
                key: vec![],
                value: b"v".to_vec(),
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            kv.put(pb::PutRequest {
                key: vec![b'k'; 5000],
                value: b"v".to_vec(),
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(
            kv.put(pb::PutRequest {
                key: b"k".to_vec(),
                value: vec![0; (1 << 20) + 1],
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(
            kv.put(pb::PutRequest {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
                request_id: "x".repeat(300),
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    let bad_read = Some(pb::ReadOptions {
        consistency: 99,
        min_revision: 0,
        max_lag: 0,
    });
    assert_eq!(
        code(
            kv.get(pb::GetRequest {
                key: b"k".to_vec(),
                read: bad_read
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            kv.get(pb::GetRequest {
                key: vec![],
                read: None
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            kv.range(pb::RangeRequest {
                limit: 1_000_000,
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::ResourceExhausted
    );
    assert_eq!(
        code(
            kv.range(pb::RangeRequest {
                read: bad_read,
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            kv.delete(pb::DeleteRequest {
                key: vec![],
                ..Default::default()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    let no_target = pb::TxnRequest {
        compares: vec![pb::Compare {
            key: b"k".to_vec(),
            target: None,
        }],
        ..Default::default()
    };
    assert_eq!(
        code(kv.txn(no_target).await.map(|_| tonic::Response::new(()))),
        Code::InvalidArgument
    );
    let empty_op = pb::TxnRequest {
        success: vec![pb::TxnOp { op: None }],
        ..Default::default()
    };
    assert_eq!(
        code(kv.txn(empty_op).await.map(|_| tonic::Response::new(()))),
        Code::InvalidArgument
    );
    let too_many = pb::TxnRequest {
        success: (0..200)
            .map(|i| pb::TxnOp {
                op: Some(pb::txn_op::Op::Delete(pb::DeleteOp {
                    key: format!("k{i}").into_bytes(),
                })),
            })
            .collect(),
        ..Default::default()
    };
    assert_eq!(
        code(kv.txn(too_many).await.map(|_| tonic::Response::new(()))),
        Code::ResourceExhausted
    );
    // Compare-and-set mismatch.
    let rev = put(&c.client(), "cas", "1").await;
    let r = kv
        .put(pb::PutRequest {
            key: b"cas".to_vec(),
            value: b"2".to_vec(),
            expected_revision: Some(rev + 1),
            ..Default::default()
        })
        .await;
    let e = r.expect_err("mismatch");
    assert_eq!(e.code(), Code::FailedPrecondition);
    assert!(e.message().contains(&rev.to_string()), "{}", e.message());
    // Cluster admin.
    let mut cl = c.client().cluster_at(0);
    assert_eq!(
        code(
            cl.add_learner(pb::AddLearnerRequest {
                node_id: 0,
                peer_addr: "127.0.0.1:1".into(),
                client_addr: String::new()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            cl.add_learner(pb::AddLearnerRequest {
                node_id: 9,
                peer_addr: "not-an-address".into(),
                client_addr: String::new()
            })
            .await
            .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            cl.promote(pb::NodeIdRequest { node_id: 0 })
                .await
                .map(|_| tonic::Response::new(()))
        ),
        Code::InvalidArgument
    );
    assert_eq!(
        code(
            cl.transfer_leader(pb::NodeIdRequest { node_id: 77 })
                .await
                .map(|_| tonic::Response::new(()))
        ),
        Code::FailedPrecondition
    );
    // The peer port: forwarded writes and (pre-)votes that do not decode, or too many writes in
    // one batch, are refused.
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.nodes[0].peer))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to peer port");
    let mut peer = metaraft::pb::peer::peer_client::PeerClient::new(ch);
    let garbage = || metaraft::pb::peer::Blob {
        data: b"garbage".to_vec(),
    };
    for r in [
        peer.forward(garbage()).await,
        peer.forward_batch(garbage()).await,
        peer.vote(garbage()).await,
        peer.pre_vote(garbage()).await,
    ] {
        let s = r.expect_err("garbage is refused");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("cannot decode"), "{}", s.message());
    }
    let too_many: Vec<metaraft::fsm::Request> = (0..=metaraft::consensus::batch::MAX_FORWARD_BATCH)
        .map(|i| {
            metaraft::fsm::Request::new(
                "",
                metaraft::fsm::Command::Put {
                    key: format!("k{i}").into_bytes(),
                    value: b"v".to_vec(),
                    expected_revision: None,
                },
            )
        })
        .collect();
    let s = peer
        .forward_batch(metaraft::pb::peer::Blob {
            data: metaraft::codec::encode(&too_many).expect("encode"),
        })
        .await
        .expect_err("an oversized batch is refused");
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("at most"), "{}", s.message());
    // Nothing above was written.
    assert_eq!(get_value(&c.client(), "k").await, None);
    assert_eq!(get_value(&c.client(), "k0").await, None);
    // The Txn happy path, atomically.
    let ok = pb::TxnRequest {
        compares: vec![pb::Compare {
            key: b"cas".to_vec(),
            target: Some(pb::compare::Target::ModRevision(rev)),
        }],
        success: vec![pb::TxnOp {
            op: Some(pb::txn_op::Op::Put(pb::PutOp {
                key: b"t1".to_vec(),
                value: b"a".to_vec(),
            })),
        }],
        failure: vec![],
        request_id: String::new(),
    };
    assert!(c.client().txn(ok).await.expect("txn").succeeded);
    assert_eq!(get_value(&c.client(), "t1").await, Some(b"a".to_vec()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t08_cli_status_json_ops_port_and_bad_cli_input() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let bin = env!("CARGO_BIN_EXE_metaraft");
    let eps = c.endpoints().join(",");
    let out = std::process::Command::new(bin)
        .args(["kv", "put", "cli-key", "cli-value", "--endpoints", &eps])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["kv", "get", "cli-key", "--endpoints", &eps])
        .output()
        .expect("run");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "cli-value");
    let out = std::process::Command::new(bin)
        .args([
            "cluster",
            "status",
            "--output",
            "json",
            "--hash",
            "--endpoints",
            &eps,
        ])
        .output()
        .expect("run");
    assert!(out.status.success());
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(v["leader"].as_u64(), Some(c.nodes[leader].id));
    assert_eq!(v["members"].as_array().map(|a| a.len()), Some(3));
    // Missing key: exit code 2, message on stderr.
    let out = std::process::Command::new(bin)
        .args(["kv", "get", "nope", "--endpoints", &eps])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2));
    // Bad CLI input: clear errors, non-zero exit.
    let out = std::process::Command::new(bin)
        .args([
            "kv",
            "get",
            "k",
            "--endpoints",
            "127.0.0.1:1",
            "--timeout-ms",
            "1000",
        ])
        .output()
        .expect("run");
    assert!(!out.status.success());
    let out = std::process::Command::new(bin)
        .args(["serve", "--node-id", "0"])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node_id"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = c.dir.path().join("bad.toml");
    std::fs::write(&bad, "node_id = 1\nclient_adr = \"x\"\n").expect("write");
    let out = std::process::Command::new(bin)
        .args(["serve", "--config"])
        .arg(&bad)
        .output()
        .expect("run");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("client_adr"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["serve", "--node-id", "1", "--initial-members", "1=oops"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&out.stderr).contains("initial_members"));
    // Runtime threads: a flag past the bound, and a negative or non-numeric value.
    let data = c.dir.path().join("never-created");
    let out = std::process::Command::new(bin)
        .args([
            "serve",
            "--node-id",
            "1",
            "--runtime-threads",
            "5000",
            "--data-dir",
        ])
        .arg(&data)
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("runtime_threads"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !data.exists(),
        "a refused config must not touch the data directory"
    );
    for bad in ["-1", "two"] {
        let out = std::process::Command::new(bin)
            .args(["serve", "--node-id", "1", "--runtime-threads", bad])
            .output()
            .expect("run");
        assert!(!out.status.success(), "--runtime-threads {bad} accepted");
        // clap names the offending value ("-1" reads as an unknown flag, "two" as a bad number).
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(&format!("'{bad}'")),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = std::process::Command::new(bin)
        .args(["bench", "--threads", "5000", "--endpoints", &eps])
        .output()
        .expect("run");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--threads must be at most 1024"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A bench where no request succeeds (nobody listens there) prints its figures, then fails
    // naming why, for either target.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr").to_string();
    drop(dead);
    for target in ["metaraft", "etcd"] {
        let out = std::process::Command::new(bin)
            .args(["bench", "--target", target, "--endpoints", &dead_addr])
            .args(["--duration", "1", "--concurrency", "2"])
            .output()
            .expect("run");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success(),
            "{target}: a run with no success passed"
        );
        assert!(
            err.contains("no request succeeded") && err.contains("first failure"),
            "{target}: {err}"
        );
    }
    // Ops port.
    let body = http_get(&c.nodes[leader].ops, "/metrics").await;
    assert!(
        body.contains("metaraft_log_fsync_seconds_count") && body.contains("metaraft_term"),
        "{body}"
    );
    assert!(http_get(&c.nodes[0].ops, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));
    assert!(http_get(&c.nodes[0].ops, "/healthz")
        .await
        .starts_with("HTTP/1.1 200"));
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect ops");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t09_transfer_leader_via_cli_and_readyz_of_a_lone_node() {
    let _g = serial();
    let mut c = TestCluster::start(3, &[]);
    let leader = c.wait_for_leader(Duration::from_secs(20)).await;
    let target = (leader + 1) % 3;
    let bin = env!("CARGO_BIN_EXE_metaraft");
    let eps = c.endpoints().join(",");
    let out = std::process::Command::new(bin)
        .args([
            "cluster",
            "transfer-leader",
            &c.nodes[target].id.to_string(),
            "--endpoints",
            &eps,
        ])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let now = c.wait_for_leader(Duration::from_secs(10)).await;
    assert_eq!(now, target, "leadership moved to the requested node");
    put(&c.client(), "after-transfer", "ok").await;
    // Lag is reported for every member, from any node.
    let s = c.client_at(leader).status(false).await.expect("status");
    assert!(s.members.iter().all(|m| m.lag.is_some()), "{s:?}");
    // A node that is not in any cluster is alive but not ready.
    let lone = c.add_node();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ops = c.nodes[lone].ops.clone();
    while tokio::net::TcpStream::connect(&ops).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "lone node's ops port never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready = http_get(&ops, "/readyz").await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(http_get(&ops, "/healthz").await.starts_with("HTTP/1.1 200"));
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

/// The value of an unlabelled gauge on a node's ops port.
async fn gauge(ops: &str, name: &str) -> u64 {
    let text = http_get(ops, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
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

/// User plus system CPU seconds of process `pid` so far (Linux, 100 ticks a second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
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
