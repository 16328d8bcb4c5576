//! Bad input on every RPC and the CLI, status output, the ops port, leadership transfer.

use super::*;

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
    // The poison entry of issue 24: a Request (format 2, no request id) carrying a meta op of
    // format 1 whose bytes do not decode, handed to the leader's Forward. It is committed and
    // answered with an error on every replica; before, every replica stopped at it for good.
    let leader = c.wait_for_leader(Duration::from_secs(10)).await;
    let ch = tonic::transport::Endpoint::from_shared(format!("http://{}", c.nodes[leader].peer))
        .expect("endpoint")
        .connect()
        .await
        .expect("connect to the leader's peer port");
    let poison = vec![0x02, 0x00, 0x03, 0x01, 0x00, 0x02, 0xff, 0xff];
    let answer = metaraft::pb::peer::peer_client::PeerClient::new(ch)
        .forward(metaraft::pb::peer::Blob { data: poison })
        .await
        .expect("the leader takes the forwarded write");
    let answer: metaraft::consensus::Forwarded<metaraft::fsm::Response> =
        metaraft::codec::decode(&answer.into_inner().data).expect("decode the answer");
    assert!(
        matches!(
            &answer,
            metaraft::consensus::Forwarded::Ok(metaraft::fsm::Response::Meta {
                response: metaraft::fsm::meta::MetaResponse::Error { .. },
                ..
            })
        ),
        "{answer:?}"
    );
    assert!(put(&c.client(), "after-poison", "1").await > 0);
    c.wait_converged(Duration::from_secs(20)).await;
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
