//! TLS on the client port and mutual TLS on the peer port, with three real nodes: what is
//! served, what is refused, and that refused or broken connections never take a listener down.

// Each test holds a process-wide lock for its whole run so clusters never overlap on two cores;
// every test has its own runtime, so holding it across awaits cannot deadlock.
#![allow(clippy::await_holding_lock)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use metaraft::client::Client;
use metaraft::pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A test PKI: a cluster CA with the node certificate, a CA of the clients with a client
/// certificate, and a rogue CA with a certificate of its own that looks the same as the
/// node's but is signed by the wrong key.
struct Pki {
    _dir: tempfile::TempDir,
    /// The cluster CA, to issue more node certificates.
    ca_cert: rcgen::Certificate,
    ca_key: rcgen::KeyPair,
    ca: PathBuf,
    node_cert: PathBuf,
    node_key: PathBuf,
    clients_ca: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    rogue_ca: PathBuf,
    rogue_cert: PathBuf,
    rogue_key: PathBuf,
}

fn new_ca(name: &str) -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().expect("ca key");
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).expect("ca params");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = p.self_signed(&key).expect("ca cert");
    (cert, key)
}

fn issue(
    ca: &rcgen::Certificate,
    ca_key: &rcgen::KeyPair,
    names: &[&str],
    usages: Vec<rcgen::ExtendedKeyUsagePurpose>,
) -> (String, String) {
    let key = rcgen::KeyPair::generate().expect("key");
    let mut p =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .expect("params");
    p.extended_key_usages = usages;
    let cert = p.signed_by(&key, ca, ca_key).expect("sign");
    (cert.pem(), key.serialize_pem())
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).expect("write pem");
    p
}

impl Pki {
    fn new() -> Pki {
        use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let (ca, ca_key) = new_ca("metaraft test CA");
        // One certificate for every node: all of them listen on 127.0.0.1 here. It is a server
        // certificate on both ports and the client certificate of peer connections.
        let (node, node_key) = issue(
            &ca,
            &ca_key,
            &["127.0.0.1", "localhost"],
            vec![ServerAuth, ClientAuth],
        );
        let (clients_ca, clients_ca_key) = new_ca("metaraft test clients CA");
        let (client, client_key) = issue(
            &clients_ca,
            &clients_ca_key,
            &["platform-service"],
            vec![ClientAuth],
        );
        // Same name as the cluster CA: only the signature tells them apart.
        let (rogue_ca, rogue_ca_key) = new_ca("metaraft test CA");
        let (rogue, rogue_key) = issue(
            &rogue_ca,
            &rogue_ca_key,
            &["127.0.0.1"],
            vec![ServerAuth, ClientAuth],
        );
        Pki {
            ca: write(d, "ca.pem", &ca.pem()),
            node_cert: write(d, "node.pem", &node),
            node_key: write(d, "node.key", &node_key),
            clients_ca: write(d, "clients-ca.pem", &clients_ca.pem()),
            client_cert: write(d, "client.pem", &client),
            client_key: write(d, "client.key", &client_key),
            rogue_ca: write(d, "rogue-ca.pem", &rogue_ca.pem()),
            rogue_cert: write(d, "rogue.pem", &rogue),
            rogue_key: write(d, "rogue.key", &rogue_key),
            ca_cert: ca,
            ca_key,
            _dir: dir,
        }
    }

    fn serve_args(&self) -> Vec<String> {
        vec![
            "--tls-cert-file".into(),
            self.node_cert.display().to_string(),
            "--tls-key-file".into(),
            self.node_key.display().to_string(),
            "--tls-ca-file".into(),
            self.ca.display().to_string(),
            "--tls-client-auth".into(),
            "--tls-client-ca-file".into(),
            self.clients_ca.display().to_string(),
        ]
    }

    /// The CLI flags of a client with this PKI's client certificate.
    fn cli_tls_args(&self) -> Vec<&std::ffi::OsStr> {
        vec![
            "--ca-file".as_ref(),
            self.ca.as_os_str(),
            "--cert-file".as_ref(),
            self.client_cert.as_os_str(),
            "--key-file".as_ref(),
            self.client_key.as_os_str(),
        ]
    }

    fn client_tls(&self, ca: &Path, identity: Option<(&Path, &Path)>) -> Arc<rustls::ClientConfig> {
        let roots = metaraft::tls::load_roots(ca).expect("roots");
        metaraft::tls::client_config(roots, identity).expect("client config")
    }
}

fn put_req(key: &str, value: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    }
}

/// Puts through `c` and returns the error text, or "ok".
async fn try_put(c: &Client, key: &str) -> String {
    match tokio::time::timeout(Duration::from_secs(20), c.put(put_req(key, "v"))).await {
        Err(_) => panic!("a refused client must fail fast, not hang"),
        Ok(Ok(_)) => "ok".into(),
        Ok(Err(e)) => format!("{e:?}"),
    }
}

async fn metric(ops: &str, name: &str) -> u64 {
    let mut s = tokio::net::TcpStream::connect(ops).await.expect("ops port");
    s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
        .await
        .expect("request");
    let mut text = String::new();
    s.read_to_string(&mut text).await.expect("metrics");
    text.lines()
        .find_map(|l| {
            l.strip_prefix(name)
                .map(|v| v.trim().parse::<u64>().unwrap_or(0))
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t01_tls_cluster_serves_forwards_and_refuses_bad_clients_without_losing_a_listener() {
    let _g = serial();
    let pki = Pki::new();
    let good = pki.client_tls(&pki.ca, Some((&pki.client_cert, &pki.client_key)));
    let args = pki.serve_args();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = TestCluster::start_with(3, &args, Some(good.clone()));
    let leader = c.wait_for_leader(Duration::from_secs(30)).await;

    // Writes through every node: two of the three are forwarded to the leader over mutual TLS.
    for i in 0..3 {
        let rev = put(&c.client_at(i), &format!("k{i}"), &format!("v{i}")).await;
        assert!(rev > 0);
    }
    let follower = (leader + 1) % 3;
    assert_eq!(
        get_value(&c.client_at(follower), "k0").await.as_deref(),
        Some(&b"v0"[..]),
        "a linearizable read on a follower (read index from the leader over mTLS)"
    );
    // Status gathers every member over the peer port.
    let s = c.client_at(follower).status(true).await.expect("status");
    assert_eq!(s.members.len(), 3);
    for m in &s.members {
        assert!(
            m.error.is_empty(),
            "member {} unreachable: {}",
            m.node_id,
            m.error
        );
    }

    let ep = vec![c.nodes[follower].client.clone()];
    let t = Duration::from_secs(5);
    // Plaintext against a TLS port.
    let plain = Client::new(&ep, t).expect("client");
    let e = try_put(&plain, "plain").await;
    assert_ne!(e, "ok", "a plaintext client was served");
    // A client that trusts another CA refuses the node's certificate.
    let wrong_ca =
        Client::with_tls(&ep, t, Some(pki.client_tls(&pki.rogue_ca, None))).expect("client");
    let e = try_put(&wrong_ca, "wrong-ca").await;
    assert!(
        e.contains("UnknownIssuer") || e.contains("certificate"),
        "{e}"
    );
    // tls.client_auth: no certificate, or one from another CA, is refused.
    let anonymous = Client::with_tls(&ep, t, Some(pki.client_tls(&pki.ca, None))).expect("client");
    assert_ne!(try_put(&anonymous, "anonymous").await, "ok");
    let rogue = Client::with_tls(
        &ep,
        t,
        Some(pki.client_tls(&pki.ca, Some((&pki.rogue_cert, &pki.rogue_key)))),
    )
    .expect("client");
    assert_ne!(try_put(&rogue, "rogue").await, "ok");

    // The peer port is mutual TLS: a caller without the cluster's certificate is refused, the
    // node's own identity is served.
    let peer_addr = c.nodes[follower].peer.clone();
    let status_via = |tls: Arc<rustls::ClientConfig>| {
        let addr = peer_addr.clone();
        async move { peer_status(&addr, tls).await }
    };
    assert!(status_via(pki.client_tls(&pki.ca, None)).await.is_err());
    // A client's certificate is for the client port only: the peer port trusts the members' CA.
    assert!(
        status_via(pki.client_tls(&pki.ca, Some((&pki.client_cert, &pki.client_key))))
            .await
            .is_err()
    );
    assert!(
        status_via(pki.client_tls(&pki.ca, Some((&pki.rogue_cert, &pki.rogue_key))))
            .await
            .is_err()
    );
    let ok = status_via(pki.client_tls(&pki.ca, Some((&pki.node_cert, &pki.node_key))))
        .await
        .expect("a peer with the cluster's certificate is served");
    assert_eq!(ok.into_inner().node_id, c.nodes[follower].id);

    // Broken connections on both ports: garbage, an immediate close, and a handshake that
    // never finishes (held open while the cluster keeps serving).
    let mut stalled = Vec::new();
    for addr in [&c.nodes[follower].client, &c.nodes[follower].peer] {
        let mut s = tokio::net::TcpStream::connect(addr.as_str())
            .await
            .expect("connect");
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("garbage");
        let mut buf = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
        drop(
            tokio::net::TcpStream::connect(addr.as_str())
                .await
                .expect("connect"),
        );
        stalled.push(
            tokio::net::TcpStream::connect(addr.as_str())
                .await
                .expect("connect"),
        );
    }
    let rev = put(&c.client_at(follower), "after-garbage", "still-served").await;
    assert!(rev > 0);
    assert_eq!(
        get_value(&c.client(), "after-garbage").await.as_deref(),
        Some(&b"still-served"[..])
    );
    let ops = &c.nodes[follower].ops;
    let client_failures = metric(
        ops,
        "metaraft_tls_handshake_failures_total{port=\"client\"}",
    )
    .await;
    let peer_failures = metric(ops, "metaraft_tls_handshake_failures_total{port=\"peer\"}").await;
    assert!(
        client_failures >= 4,
        "client port failures counted: {client_failures}"
    );
    assert!(
        peer_failures >= 3,
        "peer port failures counted: {peer_failures}"
    );
    drop(stalled);

    // The CLI: with the CA and a client certificate it is served; without them it says so.
    let bin = env!("CARGO_BIN_EXE_metaraft");
    let endpoints = c.endpoints().join(",");
    let out = std::process::Command::new(bin)
        .args([
            "kv",
            "put",
            "cli-key",
            "cli-value",
            "--endpoints",
            &endpoints,
        ])
        .args(pki.cli_tls_args())
        .output()
        .expect("run cli");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args([
            "kv",
            "get",
            "cli-key",
            "--endpoints",
            &endpoints,
            "--timeout-ms",
            "3000",
        ])
        .output()
        .expect("run cli");
    assert!(!out.status.success(), "a plaintext CLI was served");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("hint: if the cluster uses TLS, pass --ca-file"),
        "{err}"
    );
    // TLS but no client certificate: the error says what the node refused.
    let out = std::process::Command::new(bin)
        .args(["kv", "get", "cli-key", "--endpoints", &endpoints])
        .arg("--ca-file")
        .arg(&pki.ca)
        .output()
        .expect("run cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served without a client certificate");
    // The refusal reaches the client either as the TLS alert or as a closed connection,
    // depending on timing (TLS 1.3 refuses after the client's first write).
    assert!(
        err.contains("CertificateRequired")
            || err.contains("hint: if the cluster requires client certificates, pass --cert-file"),
        "{err}"
    );
    let out = std::process::Command::new(bin)
        .args(["kv", "get", "cli-key", "--endpoints", &endpoints])
        .arg("--ca-file")
        .arg(pki.rogue_ca.with_extension("missing"))
        .output()
        .expect("run cli");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("rogue-ca.missing"), "{err}");

    // A backup over TLS: it reads from a follower it finds through the status call, over the
    // same TLS settings, and the result verifies.
    let bk = pki._dir.path().join("backup");
    let out = std::process::Command::new(bin)
        .args(["backup", "create", "--endpoints", &endpoints, "--out"])
        .arg(&bk)
        .args(pki.cli_tls_args())
        .output()
        .expect("run backup");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(bin)
        .args(["backup", "verify"])
        .arg(&bk)
        .output()
        .expect("run verify");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The leader killed: the others elect a new one over mTLS, take writes, and the old leader
    // rejoins (new handshakes both ways) and catches up.
    let old = c.wait_for_leader(Duration::from_secs(20)).await;
    c.kill(old);
    let new = c.wait_for_leader(Duration::from_secs(30)).await;
    assert_ne!(new, old);
    put(&c.client_at(new), "after-failover", "v").await;
    c.spawn(old);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The restarted process needs a moment to listen and to catch up.
        let r = c
            .client_at(old)
            .get(pb::GetRequest {
                key: b"after-failover".to_vec(),
                read: linearizable(),
            })
            .await;
        if let Ok(r) = r {
            assert_eq!(r.kv.map(|kv| kv.value).as_deref(), Some(&b"v"[..]));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted node never served the write made while it was down: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Every node still has every acknowledged write, and the replicas agree.
    c.wait_converged(Duration::from_secs(20)).await;
    let hashes: std::collections::BTreeSet<_> = {
        let mut h = std::collections::BTreeSet::new();
        for i in 0..3 {
            let m = c.self_status(i, true).await;
            h.insert((m.hash_index, m.state_hash.expect("hash")));
        }
        h
    };
    assert_eq!(hashes.len(), 1, "replica hashes differ: {hashes:?}");
}

#[test]
fn t02_bad_tls_files_stop_a_node_before_it_listens_and_name_the_file() {
    let _g = serial();
    let pki = Pki::new();
    let d = tempfile::tempdir().expect("tempdir");
    let bin = env!("CARGO_BIN_EXE_metaraft");
    let serve = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(bin)
            .args([
                "serve",
                "--node-id",
                "1",
                "--client-addr",
                "127.0.0.1:29901",
                "--peer-addr",
                "127.0.0.1:29902",
                "--ops-addr",
                "",
                "--initial-members",
                "1=127.0.0.1:29902",
            ])
            .arg("--data-dir")
            .arg(d.path().join("data"))
            .args(extra)
            .output()
            .expect("run serve")
    };
    let missing = d.path().join("no-such-ca.pem");
    // (cert, key, CA, what the error must name). The ports are never bound: every case stops
    // before the node listens.
    type Case<'a> = (
        Option<&'a Path>,
        Option<&'a Path>,
        Option<&'a Path>,
        &'a str,
    );
    let cases: [Case; 3] = [
        // A missing CA file.
        (
            Some(&pki.node_cert),
            Some(&pki.node_key),
            Some(&missing),
            "no-such-ca.pem",
        ),
        // A key that is not the certificate's.
        (
            Some(&pki.node_cert),
            Some(&pki.rogue_key),
            Some(&pki.ca),
            "usable identity",
        ),
        // A certificate without its key: the config names the missing key.
        (Some(&pki.node_cert), None, Some(&pki.ca), "tls.key_file"),
    ];
    for (cert, key, ca, expect) in cases {
        let mut extra: Vec<std::ffi::OsString> = Vec::new();
        for (flag, file) in [
            ("--tls-cert-file", cert),
            ("--tls-key-file", key),
            ("--tls-ca-file", ca),
        ] {
            if let Some(f) = file {
                extra.push(flag.into());
                extra.push(f.as_os_str().to_owned());
            }
        }
        let extra: Vec<&std::ffi::OsStr> = extra.iter().map(|s| s.as_os_str()).collect();
        let out = serve(&extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "started with {expect:?} wrong");
        assert!(err.contains(expect), "{err}");
    }
    // A peer name that no certificate could carry, and peer names without TLS.
    let good: Vec<&std::ffi::OsStr> = vec![
        "--tls-cert-file".as_ref(),
        pki.node_cert.as_os_str(),
        "--tls-key-file".as_ref(),
        pki.node_key.as_os_str(),
        "--tls-ca-file".as_ref(),
        pki.ca.as_os_str(),
    ];
    let out = serve(
        &[
            &good[..],
            &["--tls-peer-names".as_ref(), "127.0.0.1,bad host".as_ref()],
        ]
        .concat(),
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with a bad peer name");
    assert!(
        err.contains("tls.peer_names") && err.contains("\"bad host\""),
        "{err}"
    );
    let out = serve(&["--tls-peer-names".as_ref(), "127.0.0.1".as_ref()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with peer names and no TLS");
    assert!(err.contains("tls.peer_names"), "{err}");
    // Client flags: each wrong combination or file is refused before anything is dialled.
    let junk = write(d.path(), "junk.pem", "not a certificate\n");
    let junk = junk.to_str().expect("utf-8 path");
    for (flags, expect) in [
        (vec!["--cert-file", "a.pem"], "--key-file"),
        (
            vec!["--cert-file", "a.pem", "--key-file", "a.key"],
            "--cert-file needs --ca-file",
        ),
        (vec!["--ca-file", junk], "holds no PEM certificate"),
    ] {
        let out = std::process::Command::new(bin)
            .args(["kv", "get", "k", "--endpoints", "127.0.0.1:1"])
            .args(&flags)
            .output()
            .expect("run cli");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flags:?} accepted");
        assert!(err.contains(expect), "{flags:?}: {err}");
    }
    // Nothing was created: the node stopped before opening its stores.
    assert!(!d.path().join("data").join("log").exists());
}

/// The leaf certificate node `addr` presents to a new TLS connection on its client port.
async fn presented(addr: &str, tls: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let name = metaraft::tls::server_name("127.0.0.1").expect("name");
    let s = tokio_rustls::TlsConnector::from(tls)
        .connect(name, tcp)
        .await
        .expect("handshake");
    s.get_ref().1.peer_certificates().expect("certificates")[0].to_vec()
}

fn first_cert(path: &Path) -> Vec<u8> {
    metaraft::tls::load_certs("certificate", path).expect("load")[0].to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t03_sighup_reloads_certificates_for_new_connections_and_keeps_them_on_a_bad_file() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let _g = serial();
    let pki = Pki::new();
    let live = tempfile::tempdir().expect("tempdir");
    let (cert, key) = (live.path().join("node.pem"), live.path().join("node.key"));
    std::fs::copy(&pki.node_cert, &cert).expect("copy");
    std::fs::copy(&pki.node_key, &key).expect("copy");
    let args: Vec<String> = vec![
        "--tls-cert-file".into(),
        cert.display().to_string(),
        "--tls-key-file".into(),
        key.display().to_string(),
        "--tls-ca-file".into(),
        pki.ca.display().to_string(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let tls = pki.client_tls(&pki.ca, None);
    let mut c = TestCluster::start_with(1, &args, Some(tls.clone()));
    c.wait_for_leader(Duration::from_secs(30)).await;
    let addr = c.nodes[0].client.clone();
    assert_eq!(
        presented(&addr, tls.clone()).await,
        first_cert(&pki.node_cert)
    );
    let pid = c.procs[0].as_ref().expect("running").id().to_string();
    let hup = || {
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .expect("kill")
            .success();
        assert!(ok, "kill -HUP");
    };

    // A new certificate from the same CA, swapped in by rename as an operator would.
    let (new_cert, new_key) = issue(
        &pki.ca_cert,
        &pki.ca_key,
        &["127.0.0.1", "localhost"],
        vec![ServerAuth, ClientAuth],
    );
    let tmp = write(live.path(), "next.pem", &new_cert);
    let tmpk = write(live.path(), "next.key", &new_key);
    std::fs::rename(&tmpk, &key).expect("rename key");
    std::fs::rename(&tmp, &cert).expect("rename cert");
    let want = first_cert(&cert);
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while presented(&addr, tls.clone()).await != want {
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put(&c.client(), "after-reload", "v").await;

    // A broken file: the reload is refused, the node keeps the certificate it had and serves.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\ngarbage\n").expect("write");
    hup();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !c.log_text(0).contains("TLS reload failed") {
        assert!(
            std::time::Instant::now() < deadline,
            "no reload error logged"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(presented(&addr, tls.clone()).await, want);
    put(&c.client(), "after-bad-reload", "v").await;
    assert!(c.procs[0]
        .as_mut()
        .expect("running")
        .try_wait()
        .expect("wait")
        .is_none());
}

/// `NodeStatus` on a peer port, as a member would ask it, with `tls` as the caller's TLS.
async fn peer_status(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
) -> Result<tonic::Response<pb::peer::NodeStatusResponse>, tonic::Status> {
    let pool =
        metaraft::net::PeerPool::new(Default::default(), Some(metaraft::tls::Live::new(tls)));
    let mut pc = pool.client(addr).expect("peer client");
    tokio::time::timeout(
        Duration::from_secs(20),
        pc.node_status(pb::peer::NodeStatusRequest { with_hash: false }),
    )
    .await
    .expect("a refused peer must fail fast")
}

/// One CA for members and platform services alike (an organisation-wide CA): with
/// `--tls-peer-names`, the members still form a cluster and forward writes over mutual TLS, a
/// service's certificate from that CA is served on the client port and refused on the peer port.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn t04_peer_names_keep_other_certificates_of_the_same_ca_off_the_peer_port() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let _g = serial();
    let pki = Pki::new();
    let d = tempfile::tempdir().expect("tempdir");
    // A platform service's certificate, signed by the members' own CA.
    let (service, service_key) = issue(
        &pki.ca_cert,
        &pki.ca_key,
        &["platform-service", "127.0.0.2"],
        vec![ServerAuth, ClientAuth],
    );
    let service_cert = write(d.path(), "service.pem", &service);
    let service_key = write(d.path(), "service.key", &service_key);
    let service_tls = pki.client_tls(&pki.ca, Some((&service_cert, &service_key)));

    let args = [
        "--tls-cert-file",
        pki.node_cert.to_str().expect("utf-8 path"),
        "--tls-key-file",
        pki.node_key.to_str().expect("utf-8 path"),
        "--tls-ca-file",
        pki.ca.to_str().expect("utf-8 path"),
        "--tls-client-auth",
        // Every member listens on 127.0.0.1 here; its certificate carries that address.
        "--tls-peer-names",
        "10.9.9.9,127.0.0.1",
    ];
    let mut c = TestCluster::start_with(3, &args, Some(service_tls.clone()));
    let leader = c.wait_for_leader(Duration::from_secs(30)).await;
    // Writes through every node: two of them forwarded to the leader over mutual TLS.
    for i in 0..3 {
        assert!(put(&c.client_at(i), &format!("k{i}"), &format!("v{i}")).await > 0);
    }
    let follower = (leader + 1) % 3;
    assert_eq!(
        get_value(&c.client_at(follower), "k2").await.as_deref(),
        Some(&b"v2"[..])
    );

    let peer = c.nodes[follower].peer.clone();
    // Handshake failures are logged at most once a second per port: let any earlier one (a
    // peer dialling while this node was still starting) fall out of the window first.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let e = peer_status(&peer, service_tls)
        .await
        .expect_err("a service's certificate on the peer port");
    assert!(!e.message().is_empty(), "{e:?}");
    let member = peer_status(
        &peer,
        pki.client_tls(&pki.ca, Some((&pki.node_cert, &pki.node_key))),
    )
    .await
    .expect("a member's certificate on the peer port");
    assert_eq!(member.into_inner().node_id, c.nodes[follower].id);
    let failures = metric(
        &c.nodes[follower].ops,
        "metaraft_tls_handshake_failures_total{port=\"peer\"}",
    )
    .await;
    assert!(
        failures >= 1,
        "the refused handshake was counted: {failures}"
    );
    // The node's log says why: the certificate is the CA's, but for none of the peer names.
    let log = c.log_text(follower);
    assert!(log.contains("NotValidForName"), "{log}");

    // A member that restarts rejoins through the same checks and catches up.
    c.kill(follower);
    put(&c.client_at(leader), "while-down", "x").await;
    c.restart(follower);
    // A linearizable read there: the read index comes from the leader over mutual TLS, and the
    // member must have the write it missed.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let at = c.client_at(follower);
        let read = at.get(pb::GetRequest {
            key: b"while-down".to_vec(),
            read: linearizable(),
        });
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), read).await {
            if let Some(kv) = r.kv {
                assert_eq!(kv.value, b"x");
                break;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the restarted member did not catch up"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
