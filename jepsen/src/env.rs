//! Where the nodes live and how their processes and links are broken.
//!
//! `Netns` (root): one network namespace per node (`mrj-n1`..), one for the clients (`mrj-c`),
//! and one holding the bridge (`mrj-br`), joined by veth pairs on 10.77.0.0/24. The host
//! namespace has no interface on that subnet, so test traffic never leaves the namespaces this
//! harness made. Network faults are iptables rules and tc qdiscs inside node namespaces.
//!
//! `Loopback` (no root): nodes on 127.0.0.1; only process-level faults are possible, and asking
//! for a network fault is an error, never a silent pass.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{bail, Context, Result};

pub const PREFIX: &str = "mrj-";
const BRIDGE_NS: &str = "mrj-br";
pub const CLIENT_NS: &str = "mrj-c";
const SUBNET: &str = "10.77.0";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Netns,
    Loopback,
}

pub struct Node {
    pub id: u64,
    pub ip: String,
    pub ns: Option<String>,
    pub client_addr: String,
    /// The peer address members use (in the membership). With the delay proxy, the proxy
    /// listens here and the node behind it on `listen_peer`.
    pub peer_addr: String,
    pub listen_peer: String,
    pub ops_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
    pub paused: bool,
    /// Member of the initial voter set (nodes added later join as learners).
    pub initial: bool,
}

/// Optional fixtures some faults need.
#[derive(Clone, Copy, Debug, Default)]
pub struct Features {
    /// Start nodes with libfiu's POSIX preload so fsync can be made to fail at run time.
    pub fiu: bool,
    /// Put each node's data directory on its own loop-mounted ext4 of this many MiB.
    pub disk_mb: Option<u64>,
    /// Put a delaying TCP proxy in front of each node's peer port (the delay fault).
    pub delay_proxy: bool,
}

const FIU_LIBS: &str = "/usr/lib/fiu/fiu_run_preload.so /usr/lib/fiu/fiu_posix_preload.so";
const FIU_FIFO: &str = "/tmp/fiu-ctrl";

pub struct Env {
    pub mode: Mode,
    pub nodes: Vec<Node>,
    bin: PathBuf,
    features: Features,
    mounted: Vec<PathBuf>,
    proxies: Vec<Child>,
    torn_down: bool,
}

/// Runs a command and returns its stdout, or an error carrying its stderr.
pub fn sh(args: &[&str]) -> Result<String> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Removes namespaces (and their processes) left by a crashed run.
pub fn cleanup_leftovers() -> Result<()> {
    let list = sh(&["ip", "netns", "list"])?;
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        if !name.starts_with(PREFIX) {
            continue;
        }
        if let Ok(pids) = sh(&["ip", "netns", "pids", name]) {
            let me = std::process::id() as i32;
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
                .filter(|&p| p != me)
            {
                // SAFETY: plain signal delivery to a pid read from the kernel.
                unsafe {
                    libc::kill(pid, libc::SIGCONT);
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        sh(&["ip", "netns", "del", name])?;
    }
    Ok(())
}

/// Moves the calling thread (call it before any other thread exists) into the clients' namespace.
pub fn enter_client_ns() -> Result<()> {
    let path = format!("/run/netns/{CLIENT_NS}");
    let f = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a namespace file descriptor we hold open.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!(
            "setns into {CLIENT_NS}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl Env {
    /// Creates the topology for `n` nodes (plus `spare` nodes that start outside the cluster)
    /// under `dir`. Netns mode needs root.
    pub fn create(
        mode: Mode,
        n: usize,
        spare: usize,
        dir: &Path,
        bin: &Path,
        features: Features,
    ) -> Result<Env> {
        if features.fiu && !Path::new("/usr/lib/fiu/fiu_posix_preload.so").exists() {
            bail!(
                "the fsync-fail fault needs libfiu's preload libraries (apt-get install fiu-utils)"
            );
        }
        if features.delay_proxy && mode != Mode::Netns {
            bail!("the delay fault needs network namespaces (root)");
        }
        if features.disk_mb.is_some() && !is_root() {
            bail!("the disk-full fault needs root (loop-mounted filesystems)");
        }
        if mode == Mode::Netns {
            if !is_root() {
                bail!(
                    "network namespaces need root; run as root, or pass --loopback for \
                     process-level faults only"
                );
            }
            cleanup_leftovers()?;
            for cmd in [
                vec!["ip", "netns", "add", BRIDGE_NS],
                vec![
                    "ip", "-n", BRIDGE_NS, "link", "add", "br0", "type", "bridge",
                ],
                vec!["ip", "-n", BRIDGE_NS, "link", "set", "br0", "up"],
                vec!["ip", "-n", BRIDGE_NS, "link", "set", "lo", "up"],
            ] {
                sh(&cmd)?;
            }
            add_host(CLIENT_NS, "vc", &format!("{SUBNET}.2"))?;
        }
        let mut nodes = Vec::new();
        for i in 0..n + spare {
            let id = i as u64 + 1;
            let (ip, ns, c, p, o) = match mode {
                Mode::Netns => {
                    let ip = format!("{SUBNET}.{}", 10 + id);
                    let ns = format!("{PREFIX}n{id}");
                    add_host(&ns, &format!("vn{id}"), &ip)?;
                    (
                        ip.clone(),
                        Some(ns),
                        format!("{ip}:7001"),
                        format!("{ip}:7101"),
                        format!("{ip}:7201"),
                    )
                }
                Mode::Loopback => {
                    let base = 23000 + i as u16;
                    (
                        "127.0.0.1".to_string(),
                        None,
                        format!("127.0.0.1:{base}"),
                        format!("127.0.0.1:{}", base + 100),
                        format!("127.0.0.1:{}", base + 200),
                    )
                }
            };
            let node_dir = dir.join(format!("n{id}"));
            std::fs::create_dir_all(&node_dir)?;
            nodes.push(Node {
                id,
                ip,
                ns,
                client_addr: c,
                listen_peer: if features.delay_proxy {
                    "127.0.0.1:7101".to_string()
                } else {
                    p.clone()
                },
                peer_addr: p,
                ops_addr: o,
                data_dir: node_dir.join("data"),
                log: node_dir.join("log.txt"),
                child: None,
                paused: false,
                initial: i < n,
            });
        }
        let mut env = Env {
            mode,
            nodes,
            bin: bin.to_path_buf(),
            features,
            mounted: Vec::new(),
            proxies: Vec::new(),
            torn_down: false,
        };
        if features.delay_proxy {
            let me = std::env::current_exe().context("locating the harness binary")?;
            for i in 0..env.nodes.len() {
                let n = &env.nodes[i];
                let ns = n.ns.clone().unwrap_or_default();
                let delay_file = n.data_dir.with_file_name("delay_ms");
                let child = Command::new("ip")
                    .args(["netns", "exec", &ns])
                    .arg(&me)
                    .args(["proxy", "--listen", &n.peer_addr, "--to", &n.listen_peer])
                    .arg("--delay-file")
                    .arg(&delay_file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting a delay proxy")?;
                env.proxies.push(child);
            }
        }
        if let Some(mb) = features.disk_mb {
            for i in 0..env.nodes.len() {
                let data = env.nodes[i].data_dir.clone();
                let img = data.with_file_name("disk.img");
                std::fs::create_dir_all(&data)?;
                let (img_s, data_s) = (img.display().to_string(), data.display().to_string());
                sh(&["truncate", "-s", &format!("{mb}M"), &img_s])?;
                sh(&["mkfs.ext4", "-q", "-F", "-m", "0", &img_s])?;
                sh(&["mount", "-o", "loop", &img_s, &data_s])?;
                env.mounted.push(data);
            }
        }
        Ok(env)
    }

    pub fn initial_members(&self) -> String {
        self.nodes
            .iter()
            .filter(|n| n.initial)
            .map(|n| format!("{}={}", n.id, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn spawn(&mut self, i: usize) -> Result<()> {
        let members = self.initial_members();
        let n = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&n.log)?;
        let mut cmd = match &n.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]);
                c
            }
            None => Command::new("env"),
        };
        if self.features.fiu {
            // Through env(1), which execs: the node keeps the pid we signal and control.
            if n.ns.is_some() {
                cmd.arg("env");
            }
            cmd.arg(format!("LD_PRELOAD={FIU_LIBS}"))
                .arg(format!("FIU_CTRL_FIFO={FIU_FIFO}"))
                .arg("FIU_ENABLE=");
        }
        cmd.arg(&self.bin);
        cmd.arg("serve")
            .args(["--node-id", &n.id.to_string()])
            .args(["--client-addr", &n.client_addr])
            .args(["--peer-addr", &n.peer_addr])
            .args(["--ops-addr", &n.ops_addr])
            .arg("--data-dir")
            .arg(&n.data_dir)
            .args(["--log", "info"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(log));
        if n.initial {
            cmd.args(["--initial-members", &members]);
        }
        if n.listen_peer != n.peer_addr {
            cmd.args(["--peer-listen-addr", &n.listen_peer]);
        }
        n.child = Some(
            cmd.spawn()
                .with_context(|| format!("spawning node {}", n.id))?,
        );
        n.paused = false;
        Ok(())
    }

    pub fn running(&mut self, i: usize) -> bool {
        match self.nodes[i].child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    fn signal(&self, i: usize, sig: i32) -> bool {
        match &self.nodes[i].child {
            Some(c) => {
                // SAFETY: signal delivery to our own child process.
                unsafe { libc::kill(c.id() as i32, sig) == 0 }
            }
            None => false,
        }
    }

    pub fn kill(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        if let Some(mut c) = self.nodes[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.nodes[i].paused = false;
    }

    pub fn pause(&mut self, i: usize) -> bool {
        let ok = self.signal(i, libc::SIGSTOP);
        self.nodes[i].paused = ok;
        ok
    }

    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
        self.nodes[i].paused = false;
    }

    /// Resumes paused nodes and restarts nodes that are down (killed, or exited on their own).
    /// Returns the ids of nodes that had exited by themselves, with their exit status.
    pub fn revive_all(&mut self) -> Result<Vec<(u64, String)>> {
        let mut exited = Vec::new();
        for i in 0..self.nodes.len() {
            if self.nodes[i].paused {
                self.resume(i);
            }
            if let Some(c) = self.nodes[i].child.as_mut() {
                if let Ok(Some(st)) = c.try_wait() {
                    exited.push((self.nodes[i].id, st.to_string()));
                    self.nodes[i].child = None;
                }
            }
            if self.nodes[i].child.is_none()
                && (self.nodes[i].initial || self.nodes[i].data_dir.exists())
            {
                self.spawn(i)?;
            }
        }
        Ok(exited)
    }

    fn node_ns(&self, i: usize) -> Result<&str> {
        match &self.nodes[i].ns {
            Some(ns) => Ok(ns),
            None => bail!("network faults are unsupported in loopback mode"),
        }
    }

    /// Makes every fsync and fdatasync of node `i` fail (EIO-like), or stops doing so.
    pub fn fsync_fail(&self, i: usize, on: bool) -> Result<()> {
        if !self.features.fiu {
            bail!("nodes were not started with libfiu");
        }
        let Some(c) = &self.nodes[i].child else {
            bail!("node {} is not running", self.nodes[i].id);
        };
        let cmd = if on {
            "enable name=posix/io/sync/*"
        } else {
            "disable name=posix/io/sync/*"
        };
        let pid = c.id().to_string();
        sh(&["fiu-ctrl", "-f", FIU_FIFO, "-c", cmd, &pid])?;
        Ok(())
    }

    /// Delays every byte into and out of each node's peer port by `ms` (0 heals).
    pub fn delay(&self, ms: u64) -> Result<()> {
        if !self.features.delay_proxy {
            bail!("nodes were not started behind delay proxies");
        }
        for n in &self.nodes {
            let f = n.data_dir.with_file_name("delay_ms");
            std::fs::write(&f, ms.to_string())
                .with_context(|| format!("writing {}", f.display()))?;
        }
        Ok(())
    }

    /// Fills node `i`'s filesystem to the last block.
    pub fn fill_disk(&self, i: usize) -> Result<()> {
        if self.features.disk_mb.is_none() {
            bail!("nodes have no private filesystems");
        }
        let fill = self.nodes[i].data_dir.join("jepsen-fill");
        // fallocate reports ENOSPC once it has taken every free block: that is the point.
        let _ = sh(&["fallocate", "-l", "100G", &fill.display().to_string()]);
        if !fill.exists() {
            bail!("could not create {}", fill.display());
        }
        Ok(())
    }

    pub fn free_disk(&self, i: usize) {
        let _ = std::fs::remove_file(self.nodes[i].data_dir.join("jepsen-fill"));
    }

    /// Drops all traffic between each pair (both directions), at the receivers.
    pub fn cut(&self, pairs: &[(usize, usize)]) -> Result<()> {
        for &(a, b) in pairs {
            for (from, to) in [(a, b), (b, a)] {
                let ns = self.node_ns(to)?;
                let src = self.nodes[from].ip.clone();
                sh(&[
                    "ip", "netns", "exec", ns, "iptables", "-A", "INPUT", "-s", &src, "-j", "DROP",
                ])?;
            }
        }
        Ok(())
    }

    /// Randomly drops `probability` of packets arriving at every node.
    pub fn loss(&self, probability: f64) -> Result<()> {
        let p = format!("{probability}");
        for i in 0..self.nodes.len() {
            let ns = self.node_ns(i)?;
            sh(&[
                "ip",
                "netns",
                "exec",
                ns,
                "iptables",
                "-A",
                "INPUT",
                "-m",
                "statistic",
                "--mode",
                "random",
                "--probability",
                &p,
                "-j",
                "DROP",
            ])?;
        }
        Ok(())
    }

    /// Limits every node's outgoing bandwidth with a token bucket.
    pub fn bandwidth(&self, rate: &str) -> Result<()> {
        for i in 0..self.nodes.len() {
            let ns = self.node_ns(i)?;
            sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                "rate", rate, "burst", "32kbit", "latency", "400ms",
            ])?;
        }
        Ok(())
    }

    /// Removes every network fault.
    pub fn heal_network(&self) -> Result<()> {
        if self.mode == Mode::Loopback {
            return Ok(());
        }
        if self.features.delay_proxy {
            self.delay(0)?;
        }
        for i in 0..self.nodes.len() {
            let ns = self.node_ns(i)?;
            sh(&["ip", "netns", "exec", ns, "iptables", "-F", "INPUT"])?;
            // No qdisc is not an error worth reporting.
            let _ = sh(&[
                "ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", "eth0", "root",
            ]);
        }
        Ok(())
    }

    pub fn teardown(&mut self) {
        if self.torn_down {
            return;
        }
        self.torn_down = true;
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        for mut p in std::mem::take(&mut self.proxies) {
            let _ = p.kill();
            let _ = p.wait();
        }
        for m in std::mem::take(&mut self.mounted) {
            if let Err(e) = sh(&["umount", &m.display().to_string()]) {
                eprintln!("teardown: {e:#}");
            } else {
                let _ = std::fs::remove_file(m.with_file_name("disk.img"));
            }
        }
        if self.mode == Mode::Netns {
            if let Err(e) = cleanup_leftovers() {
                eprintln!("teardown: {e:#}");
            }
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// A namespace with one veth leg on the bridge and the address `ip`.
fn add_host(ns: &str, leg: &str, ip: &str) -> Result<()> {
    let cidr = format!("{ip}/24");
    for cmd in [
        vec!["ip", "netns", "add", ns],
        vec![
            "ip", "-n", BRIDGE_NS, "link", "add", leg, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        ],
        vec![
            "ip", "-n", BRIDGE_NS, "link", "set", leg, "master", "br0", "up",
        ],
        vec!["ip", "-n", ns, "addr", "add", &cidr, "dev", "eth0"],
        vec!["ip", "-n", ns, "link", "set", "eth0", "up"],
        vec!["ip", "-n", ns, "link", "set", "lo", "up"],
    ] {
        sh(&cmd)?;
    }
    Ok(())
}
