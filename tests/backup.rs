//! Backup and restore against real clusters: continuous backup under write load, point-in-time
//! restores whose state hashes equal a replica's at the same index, damaged backups refused with
//! the file and offset named, resume without gap, a new base when the log was purged, and a
//! restored node that starts a new cluster lineage which other nodes join.

#![allow(clippy::await_holding_lock)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

fn metaraft() -> Command {
    Command::new(env!("CARGO_BIN_EXE_metaraft"))
}

fn run(args: &[&str]) -> Output {
    metaraft().args(args).output().expect("run metaraft")
}

fn ok(args: &[&str]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "metaraft {args:?} failed: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails(args: &[&str], want: &str) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "metaraft {args:?} should fail");
    assert!(
        err.contains(want),
        "metaraft {args:?}: wanted {want:?} in: {err}"
    );
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// The index and state hash every live replica reports once converged.
async fn cluster_hash(c: &TestCluster) -> (u64, u32) {
    let idx = c.wait_converged(Duration::from_secs(20)).await;
    let mut seen = Vec::new();
    for i in c.live() {
        let s = c.self_status(i, true).await;
        seen.push((
            s.hash_index.expect("hash index"),
            s.state_hash.expect("hash") as u32,
        ));
    }
    assert!(
        seen.iter().all(|x| *x == seen[0]),
        "replicas differ: {seen:?}"
    );
    assert_eq!(seen[0].0, idx);
    seen[0]
}

fn start_stream(endpoints: &str, out: &Path, extra: &[&str]) -> Child {
    metaraft()
        .args([
            "backup",
            "stream",
            "--endpoints",
            endpoints,
            "--out",
            p(out),
        ])
        .args(["--fsync-interval-ms", "100"])
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn backup stream")
}

fn stop(child: Child) -> String {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let o = child.wait_with_output().expect("wait");
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until the backup can restore up to `index`.
fn wait_restorable(dir: &Path, index: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = run(&["backup", "list", p(dir), "--output", "json"]);
        if o.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("json");
            let to = v["restorable"]
                .as_array()
                .and_then(|a| a.iter().filter_map(|r| r["to_index"].as_u64()).max())
                .unwrap_or(0);
            if to >= index {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "backup never reached index {index}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn restore_json(from: &Path, data: &Path, extra: &[&str]) -> serde_json::Value {
    let mut args = vec![
        "restore",
        "--from",
        p(from),
        "--data-dir",
        p(data),
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    serde_json::from_str(&ok(&args)).expect("restore json")
}

async fn write_batch(c: &TestCluster, prefix: &str, n: usize) {
    let mut tasks = Vec::new();
    for w in 0..4 {
        let client = c.client();
        let prefix = prefix.to_string();
        tasks.push(tokio::spawn(async move {
            for i in 0..n / 4 {
                put(&client, &format!("{prefix}/{w}/{i}"), &format!("v{i}")).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b01_streamed_backup_restores_any_index_to_the_replicas_hash() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let eps = c.endpoints().join(",");
    let bk = c.dir.path().join("backup");
    write_batch(&c, "pre", 40).await;
    ok(&["backup", "create", "--endpoints", &eps, "--out", p(&bk)]);
    let stream = start_stream(&eps, &bk, &[]);

    // Three points in time, each with the index and hash every replica agrees on.
    let mut points = Vec::new();
    for round in 0..3 {
        write_batch(&c, &format!("r{round}"), 120).await;
        let client = c.client();
        // Overwrites and deletes too, not only inserts.
        for i in 0..10 {
            put(&client, &format!("pre/0/{i}"), &format!("round{round}")).await;
        }
        client
            .delete(metaraft::pb::DeleteRequest {
                key: format!("pre/1/{round}").into_bytes(),
                ..Default::default()
            })
            .await
            .expect("delete");
        points.push(cluster_hash(&c).await);
    }
    let last = points.last().expect("points").0;
    wait_restorable(&bk, last);
    let log = stop(stream);
    ok(&["backup", "verify", p(&bk)]);

    for (idx, hash) in &points {
        let data = c.dir.path().join(format!("restore-{idx}"));
        let r = restore_json(&bk, &data, &["--to-index", &idx.to_string()]);
        assert_eq!(r["restored_index"], *idx, "{r}");
        assert_eq!(
            r["state_hash"].as_u64(),
            Some(*hash as u64),
            "restore to {idx} differs from the replicas' hash; stream log: {log}"
        );
    }
    // The latest restorable state (no target) is the last point.
    let r = restore_json(&bk, &c.dir.path().join("restore-latest"), &[]);
    assert_eq!(r["restored_index"], last);
    // By time: now resolves to the last entry received; before the first base, nothing.
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        .to_string();
    let r = restore_json(
        &bk,
        &c.dir.path().join("restore-now"),
        &["--to-time", &now_ms],
    );
    assert_eq!(r["restored_index"], last);
    fails(
        &[
            "restore",
            "--from",
            p(&bk),
            "--data-dir",
            p(&c.dir.path().join("restore-past")),
            "--to-time",
            "2000-01-01T00:00:00Z",
        ],
        "nothing in the backup is as old",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b02_damaged_backups_are_named_and_nothing_is_restored() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let eps = c.endpoints().join(",");
    let good = c.dir.path().join("good");
    write_batch(&c, "a", 40).await;
    ok(&["backup", "create", "--endpoints", &eps, "--out", p(&good)]);
    let stream = start_stream(&eps, &good, &["--segment-kb", "8"]);
    write_batch(&c, "b", 200).await;
    let (idx, _) = cluster_hash(&c).await;
    wait_restorable(&good, idx);
    stop(stream);
    ok(&["backup", "verify", p(&good)]);

    let copy = |name: &str| -> PathBuf {
        let d = c.dir.path().join(name);
        assert!(Command::new("cp")
            .arg("-r")
            .arg(&good)
            .arg(&d)
            .status()
            .unwrap()
            .success());
        d
    };
    let base_of = |d: &Path| -> PathBuf {
        std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| {
                p.file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with("base-")
            })
            .expect("a base")
    };
    let segment_of = |d: &Path| -> PathBuf {
        let mut s: Vec<PathBuf> = std::fs::read_dir(d.join("segments"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        s.sort();
        s[0].clone()
    };
    let refused = |d: &Path, want: &str| {
        let err = fails(&["backup", "verify", p(d)], want);
        let data = d.with_extension("restored");
        fails(&["restore", "--from", p(d), "--data-dir", p(&data)], want);
        let empty = std::fs::read_dir(&data)
            .map(|mut r| r.next().is_none())
            .unwrap_or(true);
        assert!(empty, "restore left data behind after: {err}");
    };

    // A flipped byte in a base file: the file and offset are named.
    let d = copy("flip-base");
    let f = std::fs::read_dir(base_of(&d))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().map(|e| e == "sst").unwrap_or(false))
        .expect("an sst file");
    let mut b = std::fs::read(&f).unwrap();
    b[10] ^= 0x40;
    std::fs::write(&f, &b).unwrap();
    refused(&d, "offset 0: chunk 0 CRC mismatch");

    // A flipped byte in a segment record.
    let d = copy("flip-seg");
    let s = segment_of(&d);
    let mut b = std::fs::read(&s).unwrap();
    b[60] ^= 1;
    std::fs::write(&s, &b).unwrap();
    refused(&d, "record CRC mismatch");

    // A truncated segment that is not the last: damage, not a torn tail.
    let d = copy("trunc-seg");
    let s = segment_of(&d);
    let n = std::fs::metadata(&s).unwrap().len();
    let segs = std::fs::read_dir(d.join("segments")).unwrap().count();
    assert!(segs >= 2, "want several segments, got {segs}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&s)
        .unwrap()
        .set_len(n - 7)
        .unwrap();
    refused(&d, "truncated record");

    // A missing segment in the middle: a gap in the chain.
    let d = copy("missing-seg");
    let mut all: Vec<PathBuf> = std::fs::read_dir(d.join("segments"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    all.sort();
    std::fs::remove_file(&all[all.len() / 2]).unwrap();
    refused(&d, "a segment is missing");

    // A damaged manifest.
    let d = copy("flip-manifest");
    let m = base_of(&d).join("manifest.json");
    let t = std::fs::read_to_string(&m).unwrap().replacen(
        "\"applied_term\": ",
        "\"applied_term\": 9",
        1,
    );
    std::fs::write(&m, t).unwrap();
    refused(&d, "manifest checksum mismatch");

    // A base of another cluster next to this one's segments.
    let d = copy("wrong-cluster");
    let m = base_of(&d).join("manifest.json");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    let mut man: metaraft::backup::BaseManifest =
        serde_json::from_value(v["manifest"].clone()).unwrap();
    man.cluster_id = "0123456789abcdef".into();
    let crc = crc32fast::hash(&serde_json::to_vec(&man).unwrap());
    let env = serde_json::json!({"manifest": man, "manifest_crc32": crc});
    std::fs::write(&m, serde_json::to_vec_pretty(&env).unwrap()).unwrap();
    refused(&d, "belongs to cluster");

    // Restore into a non-empty data directory is refused and leaves it untouched.
    let busy = c.dir.path().join("busy");
    std::fs::create_dir_all(&busy).unwrap();
    std::fs::write(busy.join("keep.txt"), "mine").unwrap();
    fails(
        &["restore", "--from", p(&good), "--data-dir", p(&busy)],
        "not empty",
    );
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    // An index the backup cannot reach.
    fails(
        &[
            "restore",
            "--from",
            p(&good),
            "--data-dir",
            p(&c.dir.path().join("x")),
            "--to-index",
            "999999",
        ],
        "cannot be restored",
    );
    // The Backup service refuses a tail from index 0.
    let mut bc =
        metaraft::pb::backup_client::BackupClient::connect(format!("http://{}", c.nodes[0].client))
            .await
            .expect("connect");
    let e = bc
        .tail_log(metaraft::pb::TailLogRequest { from_index: 0 })
        .await
        .expect_err("from_index 0");
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e}");
    // Not a backup at all.
    fails(&["backup", "verify", p(&busy)], "no base backup");
    fails(
        &[
            "restore",
            "--from",
            "/nonexistent",
            "--data-dir",
            p(&c.dir.path().join("y")),
        ],
        "not a backup directory",
    );
    fails(
        &[
            "restore",
            "--from",
            p(&good),
            "--data-dir",
            p(&c.dir.path().join("z")),
            "--to-time",
            "yesterday",
        ],
        "--to-time",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b03_stream_resumes_without_gap_and_rebases_when_the_log_was_purged() {
    let _g = serial();
    let c = TestCluster::start(
        3,
        &[
            "--snapshot-logs-since-last",
            "200",
            "--max-in-snapshot-log-to-keep",
            "0",
        ],
    );
    c.wait_for_leader(Duration::from_secs(20)).await;
    let eps = c.endpoints().join(",");
    let bk = c.dir.path().join("backup");
    // Interrupted by kill -9 twice under load, then resumed: no gap, no duplicate.
    let mut s = start_stream(&eps, &bk, &[]);
    for round in 0..2 {
        write_batch(&c, &format!("k{round}"), 80).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        s.kill().unwrap();
        s.wait().unwrap();
        write_batch(&c, &format!("m{round}"), 20).await;
        s = start_stream(&eps, &bk, &[]);
    }
    let (idx, hash) = cluster_hash(&c).await;
    wait_restorable(&bk, idx);
    let log = stop(s);
    ok(&["backup", "verify", p(&bk)]);
    let r = restore_json(&bk, &c.dir.path().join("r1"), &[]);
    assert_eq!(
        (r["restored_index"].as_u64(), r["state_hash"].as_u64()),
        (Some(idx), Some(hash as u64)),
        "{log}"
    );

    // Stream stopped while the cluster writes far past its snapshot threshold: the entries it
    // needs are purged, so on restart it says so and takes a new base.
    write_batch(&c, "purge", 800).await;
    let (idx, hash) = cluster_hash(&c).await;
    let s = start_stream(&eps, &bk, &[]);
    wait_restorable(&bk, idx);
    let log = stop(s);
    assert!(log.contains("taking a new base backup"), "{log}");
    let r = restore_json(&bk, &c.dir.path().join("r2"), &[]);
    assert_eq!(
        (r["restored_index"].as_u64(), r["state_hash"].as_u64()),
        (Some(idx), Some(hash as u64))
    );
    ok(&["backup", "verify", p(&bk)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b04_restored_node_starts_a_new_lineage_that_others_join() {
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let eps = c.endpoints().join(",");
    let bk = c.dir.path().join("backup");
    write_batch(&c, "x", 100).await;
    let (idx, hash) = cluster_hash(&c).await;
    ok(&["backup", "create", "--endpoints", &eps, "--out", p(&bk)]);

    let mut n = TestCluster::start(0, &[]);
    let a = n.add_spec(7, false);
    let r = restore_json(
        &bk,
        &n.nodes[a].data,
        &[
            "--node-id",
            "7",
            "--peer-addr",
            &n.nodes[a].peer,
            "--client-addr",
            &n.nodes[a].client,
        ],
    );
    assert_eq!(
        (r["restored_index"].as_u64(), r["state_hash"].as_u64()),
        (Some(idx), Some(hash as u64))
    );
    assert_ne!(r["cluster_id"], r["previous_cluster_id"]);
    n.spawn(a);
    n.wait_for_leader(Duration::from_secs(20)).await;
    let client = n.client();
    assert_eq!(
        get_value(&client, "x/3/7").await.as_deref(),
        Some(&b"v7"[..])
    );
    // Revisions continue past the restored index: they never go backwards for clients.
    let rev = put(&client, "after-restore", "1").await;
    assert!(rev > idx, "revision {rev} after restoring {idx}");
    // A fresh node joins the new lineage (by snapshot) and agrees on the state.
    let b = n.add_node();
    let (peer, cl) = (n.nodes[b].peer.clone(), n.nodes[b].client.clone());
    client
        .add_learner(n.nodes[b].id, peer, cl)
        .await
        .expect("add learner");
    client.promote(n.nodes[b].id).await.expect("promote");
    put(&client, "after-join", "2").await;
    let (i2, _) = cluster_hash(&n).await;
    assert!(i2 > rev);
    assert_eq!(
        get_value(&n.client_at(b), "after-join").await.as_deref(),
        Some(&b"2"[..])
    );
}

async fn meta_create(
    c: &metaraft::client::Client,
    parent: &str,
    name: &str,
    spec: metaraft::pb::resource::Spec,
) -> String {
    c.meta_create(metaraft::pb::CreateResourceRequest {
        resource: Some(metaraft::pb::Resource {
            parent_id: parent.into(),
            name: name.into(),
            spec: Some(spec),
            ..Default::default()
        }),
        request_id: String::new(),
    })
    .await
    .unwrap_or_else(|e| panic!("create {name}: {e}"))
    .resource
    .expect("resource")
    .id
}

async fn may_read(
    c: &metaraft::client::Client,
    subject: &str,
    id: &str,
    min_revision: u64,
) -> bool {
    c.check_permissions(metaraft::pb::CheckPermissionsRequest {
        subject_id: subject.into(),
        action: "read".into(),
        resource_type: String::new(),
        resource_ids: vec![id.into()],
        read: Some(metaraft::pb::ReadOptions {
            consistency: metaraft::pb::Consistency::Session as i32,
            min_revision,
            max_lag: 0,
        }),
    })
    .await
    .expect("check")
    .allowed
        == vec![true]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn b05_metadata_and_permissions_survive_backup_restore_and_snapshot_join() {
    use metaraft::pb::resource::Spec as S;
    let _g = serial();
    let c = TestCluster::start(3, &[]);
    c.wait_for_leader(Duration::from_secs(20)).await;
    let client = c.client();
    let org = meta_create(&client, "", "acme", S::Organization(Default::default())).await;
    let bob = meta_create(
        &client,
        &org,
        "bob",
        S::User(metaraft::pb::UserSpec {
            active: true,
            ..Default::default()
        }),
    )
    .await;
    let ws = meta_create(&client, &org, "ml", S::Workspace(Default::default())).await;
    let project = meta_create(&client, &ws, "vision", S::Project(Default::default())).await;
    let art = meta_create(
        &client,
        &project,
        "dataset",
        S::Artifact(Default::default()),
    )
    .await;
    for _ in 0..3 {
        meta_create(&client, &art, "", S::ArtifactVersion(Default::default())).await;
    }
    let viewer = client
        .meta_get(metaraft::pb::GetResourceRequest {
            key: Some(metaraft::pb::get_resource_request::Key::ByName(
                metaraft::pb::ByName {
                    kind: metaraft::pb::ResourceKind::Role as i32,
                    parent_id: org.clone(),
                    name: "viewer".into(),
                    attempt: 0,
                },
            )),
            read: linearizable(),
        })
        .await
        .expect("viewer")
        .resource
        .expect("role")
        .id;
    meta_create(
        &client,
        &org,
        "",
        S::RoleBinding(metaraft::pb::RoleBindingSpec {
            subject_id: bob.clone(),
            role_id: viewer,
            scope_id: ws.clone(),
        }),
    )
    .await;
    let (idx, hash) = cluster_hash(&c).await;
    let eps = c.endpoints().join(",");
    let bk = c.dir.path().join("backup");
    ok(&["backup", "create", "--endpoints", &eps, "--out", p(&bk)]);

    eprintln!("--- restore into a new lineage: records, counters and the RBAC index come back");
    let mut n = TestCluster::start(0, &[]);
    let a = n.add_spec(7, false);
    let r = restore_json(
        &bk,
        &n.nodes[a].data,
        &[
            "--node-id",
            "7",
            "--peer-addr",
            &n.nodes[a].peer,
            "--client-addr",
            &n.nodes[a].client,
        ],
    );
    assert_eq!(
        (r["restored_index"].as_u64(), r["state_hash"].as_u64()),
        (Some(idx), Some(hash as u64))
    );
    n.spawn(a);
    n.wait_for_leader(Duration::from_secs(20)).await;
    let nc = n.client();
    assert!(
        may_read(&nc, &bob, &art, 0).await,
        "the binding was restored into the RBAC index"
    );
    let v4 = nc
        .meta_create(metaraft::pb::CreateResourceRequest {
            resource: Some(metaraft::pb::Resource {
                parent_id: art.clone(),
                spec: Some(S::ArtifactVersion(Default::default())),
                ..Default::default()
            }),
            request_id: String::new(),
        })
        .await
        .expect("version after restore");
    let Some(S::ArtifactVersion(s)) = v4.resource.and_then(|r| r.spec) else {
        panic!("spec")
    };
    assert_eq!(s.number, 4, "version numbering continues after a restore");

    eprintln!("--- a node that joins by snapshot answers the same checks");
    let b = n.add_node();
    let (peer, cl) = (n.nodes[b].peer.clone(), n.nodes[b].client.clone());
    nc.add_learner(n.nodes[b].id, peer, cl)
        .await
        .expect("add learner");
    nc.promote(n.nodes[b].id).await.expect("promote");
    assert!(
        may_read(&n.client_at(b), &bob, &art, v4.revision).await,
        "RBAC index loaded from the installed snapshot"
    );
    let stranger = meta_create(
        &nc,
        &org,
        "eve",
        S::User(metaraft::pb::UserSpec {
            active: true,
            ..Default::default()
        }),
    )
    .await;
    assert!(!may_read(&n.client_at(b), &stranger, &art, v4.revision + 1).await);
}
