//! Upgrades: data written by the previous release opens under this one and takes the new
//! metadata commands on top (docs/upgrades.md).

#![allow(clippy::await_holding_lock)]

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use metaraft::client::Client;
use metaraft::pb;

/// The fixture's membership names this peer address.
const PEER: &str = "127.0.0.1:29301";

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("mkdir");
    for e in std::fs::read_dir(from).expect("read fixture") {
        let e = e.expect("entry");
        let dst = to.join(e.file_name());
        if e.file_type().expect("type").is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), &dst).expect("copy");
        }
    }
}

/// Kills the node when dropped, so a failed assertion leaves no process behind.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(data: &Path, client: &str, log: &Path) -> Node {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new(env!("CARGO_BIN_EXE_metaraft"))
        .args([
            "serve",
            "--node-id",
            "1",
            "--client-addr",
            client,
            "--peer-addr",
            PEER,
        ])
        .args(["--ops-addr", "", "--data-dir"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("spawn metaraft");
    Node(child)
}

async fn wait_leader(c: &Client) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(s) = c.status(false).await {
            if s.leader == Some(1) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the upgraded node did not become leader"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn check_old_keys(c: &Client) {
    for i in 0..100 {
        let v = get_value(c, &format!("old/{i}")).await;
        if i == 7 {
            assert_eq!(v, None, "old/7 was deleted by the old release");
        } else {
            assert_eq!(v, Some(format!("v{i}").into_bytes()), "old/{i}");
        }
    }
    assert_eq!(get_value(c, "greeting").await, Some(b"hello".to_vec()));
}

/// The checkout the test runs from. Cargo sets `CARGO_MANIFEST_DIR` when it
/// runs a test, so read it at run time: the compile-time value names the
/// checkout the binary was built in, and a shared target directory reuses a
/// test binary built from another checkout path that may no longer exist.
fn fixture_dir() -> std::path::PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn u01_previous_release_data_opens_and_takes_metadata_commands() {
    let _g = serial();
    if std::net::TcpListener::bind(PEER).is_err() {
        panic!("port {PEER} (named in the fixture's membership) is in use");
    }
    let dir = tempfile::tempdir().expect("tmp");
    let data = dir.path().join("data");
    copy_dir(&fixture_dir().join("tests/fixtures/v1-node/data"), &data);
    let client_addr = "127.0.0.1:29402";
    let log = dir.path().join("node.log");
    let node = spawn(&data, client_addr, &log);
    let c = Client::new(&[client_addr.to_string()], Duration::from_secs(10)).expect("client");
    wait_leader(&c).await;
    eprintln!("--- the old state reads back");
    check_old_keys(&c).await;
    let st = c.status(false).await.expect("status");
    let me = st.members.iter().find(|m| m.node_id == 1).expect("self");
    assert!(
        me.applied_index >= 103,
        "resumed at or after the old log: {}",
        me.applied_index
    );

    eprintln!("--- new commands on top, through a restart");
    let org = c
        .meta_create(pb::CreateResourceRequest {
            resource: Some(pb::Resource {
                name: "acme".into(),
                spec: Some(pb::resource::Spec::Organization(Default::default())),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("create on upgraded data")
        .resource
        .expect("org");
    drop(node);
    let node = spawn(&data, client_addr, &log);
    wait_leader(&c).await;
    check_old_keys(&c).await;
    let roles = c
        .meta_list(pb::ListResourcesRequest {
            kind: pb::ResourceKind::Role as i32,
            parent_id: org.id.clone(),
            order: pb::ListOrder::ByName as i32,
            read: linearizable(),
            ..Default::default()
        })
        .await
        .expect("list roles");
    let names: Vec<&str> = roles.resources.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(names, vec!["admin", "developer", "viewer"]);
    drop(node);
}
