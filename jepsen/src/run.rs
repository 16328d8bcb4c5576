//! One test run: cluster up, clients and nemesis, heal, final reads, check, report.
//!
//! Output directory: `history.jsonl`, `timeline.json` (fault windows), `summary.json`,
//! `latency.svg`, and `n<id>/log.txt` (each node's log) beside `n<id>/data`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use metaraft::client::Client;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::Serialize;

use crate::checker::{self, Validity, Workload};
use crate::env::{self, Env, Features, Mode};
use crate::history;
use crate::logscan::LogReport;
use crate::nemesis::{Fault, Nemesis, SETTLE};
use crate::plot;
use crate::workload::{self, ClientCfg, Recorder};

#[derive(Clone, Debug)]
pub struct RunOpts {
    pub workload: Workload,
    pub nodes: usize,
    pub clients: u64,
    /// Target operations per second over all clients.
    pub rate: f64,
    pub time_limit: Duration,
    pub seed: u64,
    pub nemesis: Vec<Fault>,
    /// Apply the faults in order, round-robin, rather than at random.
    pub cycle: bool,
    pub interval: Duration,
    pub hold: Duration,
    pub out: PathBuf,
    pub loopback: bool,
    pub bin: PathBuf,
    pub op_timeout: Duration,
    pub check_budget: Duration,
    /// Run `metaraft backup stream` through the faults, then restore it and compare its state
    /// hash with the replicas'.
    pub with_backup: bool,
}

#[derive(Serialize, Clone, Copy, Debug, Default)]
pub struct Counts {
    pub ok: u64,
    pub fail: u64,
    pub info: u64,
}

#[derive(Serialize, Debug)]
pub struct Summary {
    pub valid: Validity,
    pub workload: Workload,
    pub anomalies: Vec<String>,
    pub counts: BTreeMap<String, Counts>,
    pub mode: String,
    pub nodes: usize,
    pub clients: u64,
    pub seed: u64,
    pub time_limit_s: f64,
    pub nemesis: Vec<String>,
    pub fault_windows: usize,
    /// Nodes that exited on their own (not killed by the nemesis), with their exit status.
    pub exited_by_themselves: Vec<(u64, String)>,
    /// Every replica's state hash equal at one applied index after healing.
    pub replicas_equal: Option<bool>,
    /// With --with-backup: the streamed backup, restored at that index, hashes the same.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_restore_equal: Option<bool>,
    pub recovery_s: f64,
    /// The nodes' logs: panics (any fails the run), warnings and errors by kind.
    pub logs: LogReport,
    pub out: String,
}

pub fn run(o: &RunOpts) -> Result<Summary> {
    let mode = check_opts(o)?;
    let env = start_nodes(o, mode)?;
    let addrs: Vec<String> = env.nodes.iter().map(|n| n.client_addr.clone()).collect();
    let env = Arc::new(Mutex::new(env));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let _rt_guard = rt.enter();
    let client = Arc::new(Client::new(&addrs, o.op_timeout)?);
    let kvs: Vec<_> = (0..addrs.len()).map(|i| client.kv_at(i)).collect();
    let mds: Vec<_> = (0..addrs.len()).map(|i| client.metadata_at(i)).collect();

    wait_writable(&rt, &client)?;

    let artifact = versions_artifact(o, &rt, &client)?;
    let backup = o
        .with_backup
        .then(|| start_backup_stream(o, &addrs))
        .transpose()?;

    let t0 = Instant::now();
    let file = std::fs::File::create(o.out.join("history.jsonl"))?;
    let rec = Arc::new(Recorder::new(t0, Some(file)));
    let until = t0 + o.time_limit;
    let cfg = Arc::new(ClientCfg {
        workload: o.workload,
        clients: o.clients,
        delay: Duration::from_secs_f64(o.clients as f64 / o.rate),
        op_timeout: o.op_timeout,
        seed: o.seed,
        keys: 5,
        artifact,
    });
    let tasks: Vec<_> = (0..o.clients)
        .map(|i| {
            let (cfg, rec, kvs, mds) = (cfg.clone(), rec.clone(), kvs.clone(), mds.clone());
            rt.spawn(workload::client_loop(cfg, rec, kvs, mds, i, until))
        })
        .collect();
    let mut nemesis = Nemesis::new(
        env.clone(),
        client.clone(),
        rt.handle().clone(),
        // Each workload gets its own fault sequence for one seed.
        StdRng::seed_from_u64(o.seed.wrapping_mul(31).wrapping_add(o.workload as u64)),
        t0,
        o.interval,
        o.hold,
    );
    let windows = nemesis.run(&o.nemesis, o.cycle, until);
    rt.block_on(async {
        for t in tasks {
            let _ = t.await;
        }
    });

    // Heal everything and wait for recovery.
    let heal_start = Instant::now();
    let exited = nemesis.heal_all().context("healing")?;
    let finals_ok = rt.block_on(workload::final_read(
        &cfg,
        &rec,
        &kvs,
        &mds,
        Duration::from_secs(60),
    ));
    let recovery_s = heal_start.elapsed().as_secs_f64();
    let converged = rt.block_on(replicas_converge(
        &client,
        addrs.len(),
        Duration::from_secs(60),
    ));
    let replicas_equal = converged.map(|(eq, _, _)| eq);
    let backup_restore_equal = backup.and_then(|child| backup_verdict(o, child, converged));

    let events = rec.finish()?;
    let mut windows = windows;
    let ops = history::pair(&events)?;
    for w in &mut windows {
        w.stall_after_heal_ms = Some(write_stall_ms(&ops, w.end_ns));
    }
    let timeline = o.out.join("timeline.json");
    std::fs::write(&timeline, serde_json::to_vec_pretty(&windows)?)?;
    let mut verdict = checker::check(o.workload, &events, o.check_budget)?;
    let logs = node_logs(&env);
    amend(
        &mut verdict,
        finals_ok,
        replicas_equal,
        o.with_backup.then_some(backup_restore_equal),
        &logs,
    );
    write_plot(o, &ops, &windows)?;
    let summary = Summary {
        valid: verdict.valid,
        workload: o.workload,
        anomalies: verdict.anomalies,
        counts: counts_by_operation(&ops),
        mode: format!("{mode:?}").to_lowercase(),
        nodes: o.nodes,
        clients: o.clients,
        seed: o.seed,
        time_limit_s: o.time_limit.as_secs_f64(),
        nemesis: o.nemesis.iter().map(|f| f.name()).collect(),
        fault_windows: windows.len(),
        exited_by_themselves: exited,
        replicas_equal,
        backup_restore_equal,
        recovery_s,
        logs,
        out: o.out.display().to_string(),
    };
    std::fs::write(
        o.out.join("summary.json"),
        serde_json::to_vec_pretty(&summary)?,
    )?;
    let mut env = env.lock().unwrap_or_else(|p| p.into_inner());
    env.teardown();
    Ok(summary)
}

/// The versions workload's shared artifact (created once, before the clients start); "" for
/// the other workloads.
fn versions_artifact(
    o: &RunOpts,
    rt: &tokio::runtime::Runtime,
    client: &Arc<Client>,
) -> Result<String> {
    if o.workload != Workload::Versions {
        return Ok(String::new());
    }
    let c = client.clone();
    rt.block_on(async move { workload::setup_versions(&c).await })
        .map_err(|e| anyhow::anyhow!("versions workload setup: {e}"))
}

/// Creates the environment and starts every node.
fn start_nodes(o: &RunOpts, mode: Mode) -> Result<Env> {
    let features = Features {
        fiu: o.nemesis.contains(&Fault::FsyncFail),
        disk_mb: o.nemesis.contains(&Fault::DiskFull).then_some(256),
        delay_proxy: o.nemesis.contains(&Fault::Delay),
    };
    let mut env = Env::create(mode, o.nodes, 0, &o.out, &o.bin, features)?;
    if mode == Mode::Netns {
        // Before any thread exists: every client connection then starts inside the namespaces.
        env::enter_client_ns()?;
    }
    for i in 0..o.nodes {
        env.spawn(i)?;
    }
    Ok(env)
}

/// Whether the streamed backup, restored at the replicas' converged index, hashes like them;
/// None (and the stream stopped) when the replicas did not converge to equal state.
fn backup_verdict(
    o: &RunOpts,
    mut child: std::process::Child,
    converged: Option<(bool, u64, u64)>,
) -> Option<bool> {
    match converged {
        Some((true, idx, hash)) => Some(check_backup(o, child, idx, hash)),
        _ => {
            let _ = child.kill();
            let _ = child.wait();
            None
        }
    }
}

/// ok / fail / info counts per operation.
fn counts_by_operation(ops: &[history::Op]) -> BTreeMap<String, Counts> {
    history::counts(ops)
        .into_iter()
        .map(|(k, c)| {
            (
                k,
                Counts {
                    ok: c[0],
                    fail: c[1],
                    info: c[2],
                },
            )
        })
        .collect()
}

/// latency.svg: every operation's latency over time, fault windows shaded.
fn write_plot(o: &RunOpts, ops: &[history::Op], windows: &[crate::nemesis::Window]) -> Result<()> {
    let title = format!(
        "{} · {} nodes · {} · seed {}",
        o.workload,
        o.nodes,
        o.nemesis
            .iter()
            .map(|f| f.name())
            .collect::<Vec<_>>()
            .join(","),
        o.seed
    );
    std::fs::write(
        o.out.join("latency.svg"),
        plot::latency_svg(ops, windows, &title),
    )?;
    Ok(())
}

/// Refuses options the run cannot honour, before anything starts; the environment mode.
fn check_opts(o: &RunOpts) -> Result<Mode> {
    let mode = if o.loopback {
        Mode::Loopback
    } else {
        Mode::Netns
    };
    if mode == Mode::Netns && !env::is_root() {
        bail!(
            "network namespaces need root; run as root, or pass --loopback for process-level \
             faults only"
        );
    }
    if mode == Mode::Loopback {
        let net: Vec<String> = o
            .nemesis
            .iter()
            .filter(|f| f.is_network())
            .map(|f| f.name())
            .collect();
        if !net.is_empty() {
            bail!(
                "unsupported in loopback mode (needs root and network namespaces): {}",
                net.join(", ")
            );
        }
    }
    if o.nodes < 3 || o.nodes > 9 {
        bail!("--nodes must be between 3 and 9, got {}", o.nodes);
    }
    if o.clients == 0 || o.rate <= 0.0 {
        bail!("--clients and --rate must be positive");
    }
    if !o.bin.exists() {
        bail!(
            "metaraft binary not found at {} (pass --bin)",
            o.bin.display()
        );
    }
    if o.out.exists() && std::fs::read_dir(&o.out)?.next().is_some() {
        bail!("output directory {} is not empty", o.out.display());
    }
    std::fs::create_dir_all(&o.out)?;
    Ok(mode)
}

/// Waits (up to a minute) until the cluster takes a write.
fn wait_writable(rt: &tokio::runtime::Runtime, client: &Arc<Client>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let c = client.clone();
        let r = rt.block_on(async move {
            c.put(metaraft::pb::PutRequest {
                key: b"jepsen/ready".to_vec(),
                value: b"1".to_vec(),
                expected_revision: None,
                request_id: String::new(),
            })
            .await
        });
        match r {
            Ok(_) => break,
            Err(e) if Instant::now() > deadline => bail!("cluster never became writable: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(300)),
        }
    }
    Ok(())
}

/// What the history checker cannot see: the final read, the replicas' state, the streamed
/// backup (`None` when none was taken) and panics in the node logs.
fn amend(
    verdict: &mut checker::Verdict,
    finals_ok: bool,
    replicas_equal: Option<bool>,
    backup_restore_equal: Option<Option<bool>>,
    logs: &LogReport,
) {
    if !finals_ok {
        verdict
            .anomalies
            .push("final read never succeeded after healing".into());
    }
    match replicas_equal {
        Some(false) => {
            verdict.valid = Validity::Invalid;
            verdict
                .anomalies
                .push("replica state hashes differ at one applied index".into());
        }
        None => {
            verdict.valid = verdict.valid.and(Validity::Unknown);
            verdict
                .anomalies
                .push("replicas did not converge to one applied index".into());
        }
        Some(true) => {}
    }
    match backup_restore_equal {
        Some(Some(false)) => {
            verdict.valid = Validity::Invalid;
            verdict.anomalies.push(
                "the streamed backup, restored at the replicas' index, hashes differently".into(),
            );
        }
        Some(None) => {
            verdict.valid = verdict.valid.and(Validity::Unknown);
            verdict.anomalies.push(
                "the streamed backup could not be checked (see backup.log, restore.log)".into(),
            );
        }
        _ => {}
    }
    if logs.panics > 0 {
        verdict.valid = Validity::Invalid;
        verdict.anomalies.push(format!(
            "{} panics in the node logs, first: {}",
            logs.panics,
            logs.panic_examples.join(" | ")
        ));
    }
}

/// The nodes' logs, scanned.
fn node_logs(env: &Mutex<Env>) -> LogReport {
    let env = env.lock().unwrap_or_else(|p| p.into_inner());
    LogReport::scan_files(
        env.nodes
            .iter()
            .map(|n| (format!("n{}", n.id), n.log.as_path())),
    )
}

/// `metaraft backup stream` into `<out>/backup`, from the clients' namespace.
fn start_backup_stream(o: &RunOpts, addrs: &[String]) -> Result<std::process::Child> {
    let log = std::fs::File::create(o.out.join("backup.log"))?;
    std::process::Command::new(&o.bin)
        .args(["backup", "stream", "--endpoints", &addrs.join(",")])
        .arg("--out")
        .arg(o.out.join("backup"))
        .args(["--fsync-interval-ms", "200", "--max-rate-mb", "0"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .context("starting backup stream")
}

/// Waits for the stream to reach `index`, stops it, restores at `index` and compares the hash.
fn check_backup(o: &RunOpts, mut child: std::process::Child, index: u64, hash: u64) -> bool {
    let dir = o.out.join("backup");
    let deadline = Instant::now() + Duration::from_secs(60);
    let reached = loop {
        let out = std::process::Command::new(&o.bin)
            .args(["backup", "list", "--output", "json"])
            .arg(&dir)
            .output();
        let to = out
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| {
                v["restorable"]
                    .as_array()
                    .and_then(|a| a.iter().filter_map(|r| r["to_index"].as_u64()).max())
            })
            .unwrap_or(0);
        if to >= index {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    if !reached {
        return false;
    }
    let out = std::process::Command::new(&o.bin)
        .args([
            "restore",
            "--output",
            "json",
            "--to-index",
            &index.to_string(),
        ])
        .arg("--from")
        .arg(&dir)
        .arg("--data-dir")
        .arg(o.out.join("restore-check"))
        .output();
    let Ok(out) = out else { return false };
    let _ = std::fs::write(
        o.out.join("restore.log"),
        [&out.stdout[..], &out.stderr[..]].concat(),
    );
    let _ = std::fs::remove_dir_all(o.out.join("restore-check"));
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v["state_hash"].as_u64())
        == Some(hash)
}

/// Waits until every member reports the same applied index, then compares their state hashes:
/// (all equal, the index, the first member's hash). None: they never settled within `patience`.
async fn replicas_converge(
    client: &Client,
    n: usize,
    patience: Duration,
) -> Option<(bool, u64, u64)> {
    let deadline = Instant::now() + patience;
    while Instant::now() < deadline {
        if let Ok(s) = client.status(true).await {
            let seen: Vec<(u64, u64)> = s
                .members
                .iter()
                .filter_map(|m| Some((m.hash_index?, m.state_hash?)))
                .collect();
            if seen.len() == n && seen.iter().all(|(idx, _)| *idx == seen[0].0) {
                let equal = seen.iter().all(|(_, h)| *h == seen[0].1);
                return Some((equal, seen[0].0, seen[0].1));
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    None
}

/// The verdict as a one-line table row for the console.
pub fn row(s: &Summary) -> String {
    let c: Vec<String> = s
        .counts
        .iter()
        .map(|(k, c)| format!("{k} {}/{}/{}", c.ok, c.fail, c.info))
        .collect();
    format!(
        "{:<11} valid={:<7} windows={:<3} replicas_equal={:<5} panics={} warnings={} errors={} \
         ops(ok/fail/info): {}",
        s.workload.to_string(),
        s.valid.to_string(),
        s.fault_windows,
        s.replicas_equal
            .map(|b| b.to_string())
            .unwrap_or("?".into()),
        s.logs.panics,
        s.logs.warning_total(),
        s.logs.error_total(),
        c.join(", ")
    )
}

/// The `n` most frequent warning and error kinds of the nodes' logs, most frequent first.
pub fn top_log_kinds(s: &Summary, n: usize) -> Vec<String> {
    let mut all: Vec<(u64, String)> = s
        .logs
        .errors
        .iter()
        .map(|(k, c)| (*c, format!("ERROR {k}")))
        .chain(
            s.logs
                .warnings
                .iter()
                .map(|(k, c)| (*c, format!("WARN  {k}"))),
        )
        .collect();
    all.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    all.into_iter()
        .take(n)
        .map(|(c, k)| format!("{c:>7} x {k}"))
        .collect()
}

/// The longest time, from `heal_ns` until [`SETTLE`] after it, in which no write completed
/// successfully (ms). Under the harness's steady load writes complete every few milliseconds,
/// so this is how long writes waited at the heal (for a needless election, most of all).
pub fn write_stall_ms(ops: &[history::Op], heal_ns: u64) -> u64 {
    use history::{Kind, F};
    let until = heal_ns + SETTLE.as_nanos() as u64;
    let last_event = ops
        .iter()
        .filter_map(|o| o.complete.map(|c| c.time_ns))
        .max()
        .unwrap_or(heal_ns);
    let until = until.min(last_event.max(heal_ns));
    let mut done: Vec<u64> = ops
        .iter()
        .filter(|o| o.kind() == Kind::Ok)
        .filter(|o| {
            matches!(
                o.f(),
                F::Write | F::Cas | F::Add | F::IdemWrite | F::AddVersion
            )
        })
        .filter_map(|o| o.complete.map(|c| c.time_ns))
        .filter(|t| (heal_ns..=until).contains(t))
        .collect();
    done.sort_unstable();
    let mut prev = heal_ns;
    let mut worst = 0;
    for t in done.into_iter().chain(std::iter::once(until)) {
        worst = worst.max(t - prev);
        prev = t;
    }
    worst / 1_000_000
}
