//! Test cluster helper: real `metaraft serve` processes on loopback, each with its own data dir,
//! killed with SIGKILL and restarted like a supervisor would.

#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use metaraft::client::Client;
use metaraft::pb;

/// Cluster tests share two cores: run them one at a time.
pub static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A port for a test node: below the kernel's ephemeral range (32768+), so no outgoing connection
/// can take it as its source port while a killed node is down, and never handed out twice in this
/// process. (Probing with bind(0) gave ephemeral ports; a restart could then fail to bind.)
fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 1000) as u16 * 10,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        assert!(port < 32_000, "ran out of test ports");
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub struct NodeSpec {
    pub id: u64,
    pub client: String,
    pub peer: String,
    pub ops: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub initial: bool,
    /// Extra flags for this node only.
    pub extra: Vec<String>,
}

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub nodes: Vec<NodeSpec>,
    pub procs: Vec<Option<Child>>,
    pub extra_args: Vec<String>,
    /// What the helpers' clients dial with (None: plaintext).
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl TestCluster {
    /// Starts `n` initial members.
    pub fn start(n: usize, extra_args: &[&str]) -> TestCluster {
        Self::start_with(n, extra_args, None)
    }

    /// [`TestCluster::start`] with the helpers' clients dialling over TLS.
    pub fn start_with(
        n: usize,
        extra_args: &[&str],
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> TestCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = TestCluster {
            dir,
            nodes: Vec::new(),
            procs: Vec::new(),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            tls,
        };
        for i in 0..n {
            c.add_spec(i as u64 + 1, true);
        }
        for i in 0..n {
            c.spawn(i);
        }
        c
    }

    /// Reserves ports and directories for a node without starting it (see `spawn`).
    pub fn add_spec(&mut self, id: u64, initial: bool) -> usize {
        let d = self.dir.path().join(format!("node{id}"));
        std::fs::create_dir_all(&d).expect("mkdir");
        self.nodes.push(NodeSpec {
            id,
            client: format!("127.0.0.1:{}", free_port()),
            peer: format!("127.0.0.1:{}", free_port()),
            ops: format!("127.0.0.1:{}", free_port()),
            data: d.join("data"),
            log: d.join("node.log"),
            initial,
            extra: Vec::new(),
        });
        self.procs.push(None);
        self.nodes.len() - 1
    }

    /// Adds a node process that is not an initial member (to be added as a learner).
    pub fn add_node(&mut self) -> usize {
        let id = self.nodes.iter().map(|n| n.id).max().unwrap_or(0) + 1;
        let i = self.add_spec(id, false);
        self.spawn(i);
        i
    }

    pub fn spawn(&mut self, i: usize) {
        let members: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.initial)
            .map(|n| format!("{}={}", n.id, n.peer))
            .collect();
        let n = &self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)
            .expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_metaraft"));
        cmd.arg("serve")
            .args(["--node-id", &n.id.to_string()])
            .args([
                "--client-addr",
                &n.client,
                "--peer-addr",
                &n.peer,
                "--ops-addr",
                &n.ops,
            ])
            .arg("--data-dir")
            .arg(&n.data)
            .args(["--log", "info"])
            .args(&self.extra_args)
            .args(&n.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if n.initial {
            cmd.args(["--initial-members", &members.join(",")]);
        }
        self.procs[i] = Some(cmd.spawn().expect("spawn metaraft"));
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.procs[i].take() {
            let _ = p.kill();
            let _ = p.wait();
        }
    }

    /// Waits up to `timeout` for node `i`'s process to exit by itself; `None` if it still runs.
    pub async fn wait_exit(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Option<std::process::ExitStatus> {
        let child = self.procs[i].as_mut().expect("node not spawned");
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = child.try_wait().expect("wait") {
                return Some(s);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The OS pid of node `i`'s process, while it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.procs[i].as_ref().map(|p| p.id())
    }

    pub fn restart(&mut self, i: usize) {
        self.kill(i);
        self.spawn(i);
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.client.clone()).collect()
    }

    pub fn client(&self) -> Client {
        Client::with_tls(&self.endpoints(), Duration::from_secs(15), self.tls.clone())
            .expect("client")
    }

    /// A client that talks to node `i` only.
    pub fn client_at(&self, i: usize) -> Client {
        Client::with_tls(
            &[self.nodes[i].client.clone()],
            Duration::from_secs(15),
            self.tls.clone(),
        )
        .expect("client")
    }

    pub fn live(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.procs[*i].is_some())
            .collect()
    }

    /// Waits until a live node reports a leader that is live; returns its index in `nodes`.
    pub async fn wait_for_leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            for i in self.live() {
                if let Ok(s) = self.client_at(i).status(false).await {
                    if let Some(l) = s.leader {
                        if let Some(li) = self.nodes.iter().position(|n| n.id == l) {
                            if self.procs[li].is_some() {
                                if let Ok(ls) = self.client_at(li).status(false).await {
                                    if ls.leader == Some(l)
                                        && ls
                                            .members
                                            .iter()
                                            .any(|m| m.node_id == l && m.role == "leader")
                                    {
                                        return li;
                                    }
                                }
                            }
                        }
                    }
                }
            }
            assert!(Instant::now() < deadline, "no leader within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Status of node `i` as it sees itself.
    pub async fn self_status(&self, i: usize, hash: bool) -> pb::MemberStatus {
        let s = self.client_at(i).status(hash).await.expect("status");
        s.members
            .into_iter()
            .find(|m| m.node_id == self.nodes[i].id)
            .expect("self in status")
    }

    /// Waits until every live node applied the same index (and returns it).
    pub async fn wait_converged(&self, timeout: Duration) -> u64 {
        let deadline = Instant::now() + timeout;
        loop {
            let mut applied = Vec::new();
            for i in self.live() {
                match self.client_at(i).status(false).await {
                    Ok(s) => applied.push(
                        s.members
                            .iter()
                            .find(|m| m.node_id == self.nodes[i].id)
                            .map(|m| m.applied_index)
                            .unwrap_or(0),
                    ),
                    Err(_) => applied.push(u64::MAX),
                }
            }
            if applied.windows(2).all(|w| w[0] == w[1]) && applied[0] != u64::MAX && applied[0] > 0
            {
                return applied[0];
            }
            assert!(
                Instant::now() < deadline,
                "nodes did not converge: {applied:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log_text(&self, i: usize) -> String {
        std::fs::read_to_string(&self.nodes[i].log).unwrap_or_default()
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for (i, n) in self.nodes.iter().enumerate() {
                let text = self.log_text(i);
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                eprintln!("---- node {} log tail ----", n.id);
                for l in tail.into_iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
    }
}

pub fn linearizable() -> Option<pb::ReadOptions> {
    Some(pb::ReadOptions {
        consistency: pb::Consistency::Linearizable as i32,
        min_revision: 0,
        max_lag: 0,
    })
}

pub async fn get_value(c: &Client, key: &str) -> Option<Vec<u8>> {
    c.get(pb::GetRequest {
        key: key.as_bytes().to_vec(),
        read: linearizable(),
    })
    .await
    .expect("get")
    .kv
    .map(|kv| kv.value)
}

pub async fn put(c: &Client, key: &str, value: &str) -> u64 {
    c.put(pb::PutRequest {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
        ..Default::default()
    })
    .await
    .expect("put")
    .revision
}
