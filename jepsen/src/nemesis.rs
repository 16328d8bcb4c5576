//! Named faults, their schedule, and the timeline of fault windows.
//!
//! The schedule alternates a quiet interval and a fault window; each window applies one fault
//! drawn (by the run's seed) from the enabled list, holds it, then heals it.

use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};
use metaraft::client::Client;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::Serialize;
use tokio::runtime::Handle;

use crate::env::Env;

/// How long a fault aimed at the leader waits for the cluster to have one: several election
/// timeouts, so only a cluster that cannot elect at all makes the fault fail to apply.
const LEADER_WAIT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Nodes split into a minority and a majority.
    PartitionHalves,
    /// The leader cut off from every other node.
    IsolateLeader,
    /// One follower cut off from every other node; on rejoining it must not depose the leader.
    IsolateFollower,
    /// Two sides that each see one bridge node: overlapping majorities.
    Bridge,
    /// 20% of packets into every node dropped (iptables statistic match).
    Loss,
    /// Every node's outgoing bandwidth limited (tc tbf).
    Bandwidth,
    /// 150 ms added to every peer connection in each direction (a delaying TCP proxy in front
    /// of every node's peer port; this kernel has no netem).
    Delay,
    /// kill -9 of a random minority of nodes, restarted at heal.
    Kill,
    /// kill -9 of the leader, restarted at heal.
    KillLeader,
    /// kill -9 of the largest minority at once (two nodes of five), restarted at heal.
    KillMinority,
    /// SIGSTOP of a random node, SIGCONT at heal.
    Pause,
    /// SIGSTOP of the leader.
    PauseLeader,
    /// A follower removed from the voters under load, added back and promoted at heal.
    Membership,
    /// Leadership transferred to another voter every 300 ms.
    TransferStorm,
    /// A random node's filesystem (a private loop-mounted ext4) filled to the last block.
    DiskFull,
    /// Every fsync/fdatasync of a random node fails (libfiu), as a dying disk would.
    FsyncFail,
}

pub const ALL: &[Fault] = &[
    Fault::PartitionHalves,
    Fault::IsolateLeader,
    Fault::IsolateFollower,
    Fault::Bridge,
    Fault::Loss,
    Fault::Bandwidth,
    Fault::Delay,
    Fault::Kill,
    Fault::KillLeader,
    Fault::KillMinority,
    Fault::Pause,
    Fault::PauseLeader,
    Fault::Membership,
    Fault::TransferStorm,
    Fault::DiskFull,
    Fault::FsyncFail,
];

impl Fault {
    pub fn name(self) -> String {
        serde_json::to_value(self)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default()
    }
    pub fn is_network(self) -> bool {
        matches!(
            self,
            Fault::PartitionHalves
                | Fault::IsolateLeader
                | Fault::IsolateFollower
                | Fault::Bridge
                | Fault::Loss
                | Fault::Bandwidth
                | Fault::Delay
        )
    }
}

impl FromStr for Fault {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Fault> {
        ALL.iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| anyhow!("unknown nemesis {s:?}"))
    }
}

/// Parses a comma-separated list of fault names or groups: `partitions` (halves, isolate-leader,
/// isolate-follower, bridge), `kills` (kill, kill-leader, kill-minority), `pauses` (pause,
/// pause-leader), `disks` (disk-full, fsync-fail), `network`, `all`, `none`.
pub fn parse_list(s: &str) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let group: Vec<Fault> = match part {
            "none" => vec![],
            "all" => ALL.to_vec(),
            "partitions" | "partition" => vec![
                Fault::PartitionHalves,
                Fault::IsolateLeader,
                Fault::IsolateFollower,
                Fault::Bridge,
            ],
            "kills" => vec![Fault::Kill, Fault::KillLeader, Fault::KillMinority],
            "pauses" => vec![Fault::Pause, Fault::PauseLeader],
            "network" => ALL.iter().copied().filter(|f| f.is_network()).collect(),
            "disks" => vec![Fault::DiskFull, Fault::FsyncFail],
            name => vec![name.parse()?],
        };
        for f in group {
            if !out.contains(&f) {
                out.push(f);
            }
        }
    }
    Ok(out)
}

/// The short suite's faults per workload: a partition, a kill and a pause (loopback: no
/// partition, which needs namespaces).
pub fn short_plan(w: crate::checker::Workload, loopback: bool) -> &'static str {
    match (w, loopback) {
        (crate::checker::Workload::Register, false) => "isolate-leader,kill-leader,pause",
        (crate::checker::Workload::Set, false) => "partition-halves,kill,pause-leader",
        (crate::checker::Workload::Session, false) => "bridge,kill-leader,pause",
        (crate::checker::Workload::Idempotent, false) => "isolate-leader,kill,pause-leader",
        (crate::checker::Workload::Versions, false) => "partition-halves,kill-leader,pause",
        (crate::checker::Workload::Register | crate::checker::Workload::Session, true) => {
            "kill-leader,pause,kill"
        }
        (
            crate::checker::Workload::Set
            | crate::checker::Workload::Idempotent
            | crate::checker::Workload::Versions,
            true,
        ) => "kill,pause-leader,kill-leader",
    }
}

/// One fault window on the timeline.
#[derive(Serialize, Clone, Debug)]
pub struct Window {
    pub fault: String,
    pub detail: String,
    pub start_ns: u64,
    pub end_ns: u64,
    /// For the isolation faults: leader changes a node of the majority saw from the fault's
    /// start until [`SETTLE`] after its heal (its `metaraft_leader_changes_total`: each time it
    /// learns of a leader after having none or another).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leader_changes: Option<u64>,
    /// For the isolation faults: that node's term at the start and at the end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub terms: Option<(u64, u64)>,
    /// For isolate-follower: the cut-off node's own term when cut and just before the heal. Equal
    /// means it never raised its term alone (pre-vote), whatever happens after the heal.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub isolated_terms: Option<(u64, u64)>,
    /// The longest time without a completed operation from the heal until [`SETTLE`] after it
    /// (filled in from the history by the run).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stall_after_heal_ms: Option<u64>,
}

/// How long after an isolation heals leader changes are still counted: a rejoining node that
/// deposes the leader does so within an election timeout or two (0.5-1 s each by default).
pub const SETTLE: Duration = Duration::from_secs(3);

pub struct Nemesis {
    pub env: Arc<Mutex<Env>>,
    pub client: Arc<Client>,
    pub rt: Handle,
    pub rng: StdRng,
    pub t0: Instant,
    pub interval: Duration,
    pub hold: Duration,
    /// A voter removed by the membership fault and not yet restored.
    removed: Option<usize>,
    /// The node whose fsync is made to fail.
    fsync_failing: Option<usize>,
    /// During an isolation fault: a node of the majority, with the leader changes it had seen
    /// and its term when the fault started.
    observer: Option<(usize, (u64, u64))>,
    /// During isolate-follower: the cut-off node and its term when cut.
    isolated: Option<(usize, u64)>,
}

fn lock(env: &Mutex<Env>) -> std::sync::MutexGuard<'_, Env> {
    env.lock().unwrap_or_else(|p| p.into_inner())
}

impl Nemesis {
    pub fn new(
        env: Arc<Mutex<Env>>,
        client: Arc<Client>,
        rt: Handle,
        rng: StdRng,
        t0: Instant,
        interval: Duration,
        hold: Duration,
    ) -> Nemesis {
        Nemesis {
            env,
            client,
            rt,
            rng,
            t0,
            interval,
            hold,
            removed: None,
            fsync_failing: None,
            observer: None,
            isolated: None,
        }
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn n(&self) -> usize {
        lock(&self.env).nodes.len()
    }

    /// The index of the node the cluster currently reports as leader (highest term wins).
    pub fn leader(&self) -> Option<usize> {
        let n = self.n();
        let mut best: Option<(u64, u64)> = None;
        for i in 0..n {
            let mut c = self.client.cluster_at(i);
            let r = self.rt.block_on(async move {
                tokio::time::timeout(
                    Duration::from_millis(700),
                    c.status(metaraft::pb::ClusterStatusRequest { with_hash: false }),
                )
                .await
            });
            if let Ok(Ok(resp)) = r {
                let s = resp.into_inner();
                if let Some(l) = s.leader {
                    if best.map(|(t, _)| s.term > t).unwrap_or(true) {
                        best = Some((s.term, l));
                    }
                }
            }
        }
        let id = best?.1;
        lock(&self.env).nodes.iter().position(|n| n.id == id)
    }

    /// The leader, waiting for one while the cluster elects: a fault aimed at the leader often
    /// starts right after the previous fault healed, when no node knows a leader yet.
    fn wait_leader(&self) -> Result<usize> {
        let deadline = Instant::now() + LEADER_WAIT;
        loop {
            if let Some(l) = self.leader() {
                return Ok(l);
            }
            if Instant::now() >= deadline {
                return Err(anyhow!("no leader within {LEADER_WAIT:?}"));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs the schedule until `until`, returning the fault windows. `cycle`: apply the faults
    /// in the order given, round-robin, instead of drawing them at random.
    pub fn run(&mut self, faults: &[Fault], cycle: bool, until: Instant) -> Vec<Window> {
        let mut windows = Vec::new();
        if faults.is_empty() {
            return windows;
        }
        // Time already spent calm after the last heal (the settle of an isolation fault).
        let mut calm = Duration::ZERO;
        while Instant::now() + self.interval.saturating_sub(calm) + self.hold < until {
            std::thread::sleep(self.interval.saturating_sub(calm));
            calm = Duration::ZERO;
            let f = if cycle {
                faults[windows.len() % faults.len()]
            } else {
                faults[self.rng.gen_range(0..faults.len())]
            };
            let start_ns = self.now_ns();
            self.observer = None;
            let detail = match self.start(f) {
                Ok(d) => d,
                Err(e) => format!("could not start: {e:#}"),
            };
            let hold_until = Instant::now() + self.hold;
            while Instant::now() < hold_until {
                if f == Fault::TransferStorm {
                    self.transfer_once();
                    std::thread::sleep(Duration::from_millis(300));
                } else {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
            let isolated_terms = self
                .isolated
                .take()
                .and_then(|(i, t0)| self.leader_metrics(i).ok().map(|(_, t1)| (t0, t1)));
            let healed = self.heal(f);
            let end_ns = self.now_ns();
            let mut observed = None;
            if let Some((o, (changes0, term0))) = self.observer.take() {
                std::thread::sleep(SETTLE);
                calm = SETTLE;
                observed = self
                    .leader_metrics(o)
                    .ok()
                    .map(|(changes, term)| (changes.saturating_sub(changes0), (term0, term)));
            }
            let detail = match healed {
                Ok(note) => detail + &note,
                Err(e) => format!("{detail}; heal: {e:#}"),
            };
            windows.push(Window {
                fault: f.name(),
                detail,
                start_ns,
                end_ns,
                leader_changes: observed.map(|(c, _)| c),
                terms: observed.map(|(_, t)| t),
                isolated_terms,
                stall_after_heal_ms: None,
            });
        }
        windows
    }

    /// (leader changes this node has seen, its term), from its ops port's /metrics; a few
    /// tries, since the node may be busy electing.
    fn leader_metrics(&self, i: usize) -> Result<(u64, u64)> {
        let addr = lock(&self.env).nodes[i].ops_addr.clone();
        let mut tries = 0;
        let body = loop {
            match http_get(&addr, "/metrics", Duration::from_secs(2)) {
                Ok(b) => break b,
                Err(e) if tries >= 2 => return Err(e.context(format!("GET {addr}/metrics"))),
                Err(_) => tries += 1,
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let value = |name: &str| {
            body.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
                .ok_or_else(|| anyhow!("{addr}/metrics has no {name}"))
        };
        Ok((
            value("metaraft_leader_changes_total")?,
            value("metaraft_term")?,
        ))
    }

    /// Watches node `i` through an isolation fault: its leader changes and term now. A node
    /// that does not answer leaves the window without a count; the fault still applies.
    fn observe(&mut self, i: usize) {
        self.observer = self.leader_metrics(i).ok().map(|m| (i, m));
    }

    fn ids(&self, idx: &[usize]) -> Vec<u64> {
        let env = lock(&self.env);
        idx.iter().map(|&i| env.nodes[i].id).collect()
    }

    fn start(&mut self, f: Fault) -> Result<String> {
        let n = self.n();
        let mut all: Vec<usize> = (0..n).collect();
        all.shuffle(&mut self.rng);
        match f {
            Fault::PartitionHalves => {
                let (a, b) = all.split_at(n / 2);
                lock(&self.env).cut(&cross(a, b))?;
                Ok(format!("{:?} | {:?}", self.ids(a), self.ids(b)))
            }
            Fault::IsolateLeader => {
                let l = self.wait_leader()?;
                let others: Vec<usize> = (0..n).filter(|&i| i != l).collect();
                self.observe(others[0]);
                lock(&self.env).cut(&cross(&[l], &others))?;
                Ok(format!("leader {:?} isolated", self.ids(&[l])))
            }
            Fault::IsolateFollower => {
                let l = self.wait_leader()?;
                let f = follower(&all, l)?;
                let others: Vec<usize> = (0..n).filter(|&i| i != f).collect();
                // The leader itself watches: it is in the majority, and its own view of who
                // leads changes the moment it is deposed.
                self.observe(l);
                self.isolated = self.leader_metrics(f).ok().map(|(_, term)| (f, term));
                lock(&self.env).cut(&cross(&[f], &others))?;
                Ok(format!(
                    "follower {:?} isolated (leader {:?})",
                    self.ids(&[f]),
                    self.ids(&[l])
                ))
            }
            Fault::Bridge => {
                let bridge = all[0];
                let rest = &all[1..];
                let (a, b) = rest.split_at(rest.len() / 2);
                lock(&self.env).cut(&cross(a, b))?;
                Ok(format!(
                    "{:?} | {:?} bridged by {:?}",
                    self.ids(a),
                    self.ids(b),
                    self.ids(&[bridge])
                ))
            }
            Fault::Loss => {
                lock(&self.env).loss(0.2)?;
                Ok("20% loss into every node".into())
            }
            Fault::Bandwidth => {
                lock(&self.env).bandwidth("256kbit")?;
                Ok("256 kbit/s out of every node".into())
            }
            Fault::Delay => {
                lock(&self.env).delay(150)?;
                Ok("150 ms each way on every peer link".into())
            }
            Fault::Kill => {
                let k = self.rng.gen_range(1..=((n - 1) / 2).max(1));
                let victims = &all[..k];
                let mut env = lock(&self.env);
                for &v in victims {
                    env.kill(v);
                }
                drop(env);
                Ok(format!("killed {:?}", self.ids(victims)))
            }
            Fault::KillLeader => {
                let l = self.wait_leader()?;
                lock(&self.env).kill(l);
                Ok(format!("killed leader {:?}", self.ids(&[l])))
            }
            Fault::KillMinority => {
                let victims = &all[..(n - 1) / 2];
                let mut env = lock(&self.env);
                for &v in victims {
                    env.kill(v);
                }
                drop(env);
                Ok(format!("killed {:?} at once", self.ids(victims)))
            }
            Fault::Pause => {
                let v = all[0];
                lock(&self.env).pause(v);
                Ok(format!("paused {:?}", self.ids(&[v])))
            }
            Fault::PauseLeader => {
                let l = self.wait_leader()?;
                lock(&self.env).pause(l);
                Ok(format!("paused leader {:?}", self.ids(&[l])))
            }
            Fault::Membership => {
                let l = self.wait_leader()?;
                let v = follower(&all, l)?;
                let id = self.ids(&[v])[0];
                let c = self.client.clone();
                self.rt.block_on(async move { c.remove(id).await })?;
                self.removed = Some(v);
                Ok(format!("removed voter {id}"))
            }
            Fault::TransferStorm => Ok("leader transferred every 300 ms".into()),
            Fault::DiskFull => {
                let v = all[0];
                lock(&self.env).fill_disk(v)?;
                Ok(format!("filled the disk of {:?}", self.ids(&[v])))
            }
            Fault::FsyncFail => {
                let v = all[0];
                lock(&self.env).fsync_fail(v, true)?;
                self.fsync_failing = Some(v);
                Ok(format!("fsync fails on {:?}", self.ids(&[v])))
            }
        }
    }

    fn transfer_once(&mut self) {
        let Some(l) = self.leader() else { return };
        let n = self.n();
        let others: Vec<usize> = (0..n)
            .filter(|&i| i != l && Some(i) != self.removed)
            .collect();
        if let Some(&t) = others.choose(&mut self.rng) {
            let id = self.ids(&[t])[0];
            let c = self.client.clone();
            let _ = self.rt.block_on(async move { c.transfer_leader(id).await });
        }
    }

    /// Heals one fault. Returns what the heal found worth noting (nodes that had exited).
    fn heal(&mut self, f: Fault) -> Result<String> {
        match f {
            Fault::Kill
            | Fault::KillLeader
            | Fault::KillMinority
            | Fault::Pause
            | Fault::PauseLeader => {
                lock(&self.env).revive_all()?;
                Ok(String::new())
            }
            Fault::DiskFull | Fault::FsyncFail => {
                let mut env = lock(&self.env);
                if let Some(v) = self.fsync_failing.take() {
                    // The node may have exited, as it should; then there is nothing to disable.
                    let _ = env.fsync_fail(v, false);
                }
                for i in 0..env.nodes.len() {
                    env.free_disk(i);
                }
                let exited = env.revive_all()?;
                Ok(exited
                    .iter()
                    .map(|(id, st)| format!("; node {id} had exited ({st}) and was restarted"))
                    .collect())
            }
            Fault::Membership => self
                .restore_membership(Duration::from_secs(5))
                .map(|()| String::new()),
            _ => lock(&self.env).heal_network().map(|()| String::new()),
        }
    }

    /// Adds a removed voter back (as learner, then promoted), retrying until `patience` passes.
    pub fn restore_membership(&mut self, patience: Duration) -> Result<()> {
        let Some(v) = self.removed else {
            return Ok(());
        };
        let (id, peer, client_addr) = {
            let env = lock(&self.env);
            let n = &env.nodes[v];
            (n.id, n.peer_addr.clone(), n.client_addr.clone())
        };
        let deadline = Instant::now() + patience;
        loop {
            let c = self.client.clone();
            let (p, ca) = (peer.clone(), client_addr.clone());
            let r = self.rt.block_on(async move {
                c.add_learner(id, p, ca).await?;
                c.promote(id).await
            });
            match r {
                Ok(_) => {
                    self.removed = None;
                    return Ok(());
                }
                Err(e) if Instant::now() > deadline => {
                    return Err(anyhow!("re-adding voter {id}: {e}"))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(300)),
            }
        }
    }

    /// Heals every fault: network, processes, membership.
    pub fn heal_all(&mut self) -> Result<Vec<(u64, String)>> {
        let mut env = lock(&self.env);
        env.heal_network()?;
        if let Some(v) = self.fsync_failing.take() {
            let _ = env.fsync_fail(v, false);
        }
        for i in 0..env.nodes.len() {
            env.free_disk(i);
        }
        let exited = env.revive_all()?;
        drop(env);
        self.restore_membership(Duration::from_secs(30))?;
        Ok(exited)
    }
}

/// A plain HTTP/1.0 GET (the ops port speaks HTTP/1), returning the body.
fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let sock: std::net::SocketAddr = addr.parse()?;
    let mut s = std::net::TcpStream::connect_timeout(&sock, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("no HTTP answer from {addr}"))?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return Err(anyhow!(
            "{addr}{path}: {}",
            head.lines().next().unwrap_or("")
        ));
    }
    Ok(body.to_string())
}

/// The first node of `shuffled` that is not the leader `l`.
fn follower(shuffled: &[usize], l: usize) -> Result<usize> {
    shuffled
        .iter()
        .copied()
        .find(|&i| i != l)
        .ok_or_else(|| anyhow!("no follower besides the leader"))
}

fn cross(a: &[usize], b: &[usize]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for &x in a {
        for &y in b {
            out.push((x, y));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_with_groups_and_refuse_unknowns() {
        let l = parse_list("partitions,kills,pauses").unwrap();
        assert_eq!(l.len(), 9);
        assert_eq!(
            parse_list("kill,pause").unwrap(),
            vec![Fault::Kill, Fault::Pause]
        );
        assert_eq!(parse_list("all").unwrap().len(), ALL.len());
        assert!(parse_list("none").unwrap().is_empty());
        assert_eq!(parse_list("loss,loss").unwrap(), vec![Fault::Loss]);
        let e = parse_list("partition,flood").unwrap_err().to_string();
        assert!(e.contains("flood"), "{e}");
        assert_eq!(
            parse_list("disks").unwrap(),
            vec![Fault::DiskFull, Fault::FsyncFail]
        );
        for f in ALL {
            assert_eq!(f.name().parse::<Fault>().unwrap(), *f);
        }
    }
}
