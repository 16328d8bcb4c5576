//! `metaraft-jepsen`: run fault-injection tests against real metaraft clusters, or check a saved
//! history offline. See jepsen/README.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use metaraft_jepsen::checker::{self, Validity, Workload};
use metaraft_jepsen::nemesis;
use metaraft_jepsen::run::{self, RunOpts};
use metaraft_jepsen::{env, history};

#[derive(Parser)]
#[command(name = "metaraft-jepsen", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Clone)]
struct Common {
    /// Cluster size (3 or 5 usually).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Concurrent clients.
    #[arg(long, default_value_t = 6)]
    clients: u64,
    /// Target operations per second over all clients.
    #[arg(long, default_value_t = 150.0)]
    rate: f64,
    /// Seconds of client load and faults per run.
    #[arg(long, default_value_t = 30)]
    time_limit: u64,
    /// Seconds of calm between fault windows.
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Seconds each fault is held.
    #[arg(long, default_value_t = 4)]
    hold: u64,
    /// Per-operation timeout in milliseconds (an expired write is recorded as `info`).
    #[arg(long, default_value_t = 2000)]
    op_timeout_ms: u64,
    /// Bound on the linearizability search per key, in seconds (past it: `unknown`).
    #[arg(long, default_value_t = 60)]
    check_budget_s: u64,
    /// Apply the nemesis faults in the order given, round-robin (default: drawn by the seed).
    #[arg(long)]
    cycle: bool,
    /// Also run `metaraft backup stream` through the faults; at the end, restore it at the
    /// replicas' index and require the same state hash.
    #[arg(long)]
    with_backup: bool,
    /// Nodes on 127.0.0.1 with process-level faults only (for machines without root).
    #[arg(long)]
    loopback: bool,
    /// The metaraft binary (default: beside this one).
    #[arg(long)]
    bin: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Cmd {
    /// One run: a workload under a nemesis schedule, then the check. Exit 0 valid, 1 invalid,
    /// 2 unknown, 3 the harness failed.
    Run {
        #[arg(long, value_enum)]
        workload: Workload,
        /// Comma-separated faults or groups: partitions, kills, pauses, network, all, none, or names
        /// (partition-halves, isolate-leader, bridge, loss, bandwidth, kill, kill-leader, pause,
        /// pause-leader, membership, transfer-storm).
        #[arg(long, default_value = "partitions,kills,pauses")]
        nemesis: String,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output directory (must not exist or be empty).
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Every workload under partition, kill and pause nemeses, for each seed. `--short` is what
    /// CI runs.
    Suite {
        /// 20-second runs, one seed.
        #[arg(long)]
        short: bool,
        #[arg(long, default_value_t = 1)]
        seeds: u64,
        #[arg(long, default_value_t = 1)]
        first_seed: u64,
        #[arg(long, default_value = "partitions,kills,pauses")]
        nemesis: String,
        #[arg(long)]
        out: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// Check a saved history offline.
    Check {
        history: PathBuf,
        #[arg(long, value_enum)]
        workload: Workload,
        #[arg(long, default_value_t = 60)]
        check_budget_s: u64,
    },
    /// Times the register checker on one key's generated history: a simulated register with
    /// concurrent clients, a share of unknown outcomes. Exit 0 when the verdict is the right one
    /// (linearizable; with --corrupt, not), 1 when wrong, 2 when undecided within the budget.
    CheckBench {
        #[arg(long, default_value_t = 100_000)]
        ops: usize,
        /// Share of operations whose outcome is unknown (`info`).
        #[arg(long, default_value_t = 0.1)]
        info: f64,
        /// Concurrent clients of the simulated register.
        #[arg(long, default_value_t = 10)]
        procs: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Make the history certainly not linearizable first.
        #[arg(long)]
        corrupt: bool,
        #[arg(long, default_value_t = 60)]
        check_budget_s: u64,
    },
    /// Remove network namespaces left by a crashed run.
    Cleanup,
    /// (internal) The delaying TCP proxy the harness runs in each node's namespace.
    #[command(hide = true)]
    Proxy {
        #[arg(long)]
        listen: String,
        #[arg(long)]
        to: String,
        #[arg(long)]
        delay_file: PathBuf,
    },
}

fn default_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("metaraft")))
        .unwrap_or_else(|| PathBuf::from("metaraft"))
}

fn default_out(tag: &str) -> PathBuf {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from("jepsen-runs").join(format!("{secs}-{tag}"))
}

fn opts(c: &Common, workload: Workload, nemesis: &str, seed: u64, out: PathBuf) -> Result<RunOpts> {
    Ok(RunOpts {
        workload,
        nodes: c.nodes,
        clients: c.clients,
        rate: c.rate,
        time_limit: Duration::from_secs(c.time_limit),
        seed,
        nemesis: nemesis::parse_list(nemesis)?,
        cycle: c.cycle,
        interval: Duration::from_secs(c.interval),
        hold: Duration::from_secs(c.hold),
        out,
        loopback: c.loopback,
        bin: c.bin.clone().unwrap_or_else(default_bin),
        op_timeout: Duration::from_millis(c.op_timeout_ms),
        check_budget: Duration::from_secs(c.check_budget_s),
        with_backup: c.with_backup,
    })
}

fn exit_for(v: Validity) -> ExitCode {
    match v {
        Validity::Valid => ExitCode::SUCCESS,
        Validity::Invalid => ExitCode::from(1),
        Validity::Unknown => ExitCode::from(2),
    }
}

fn main() -> ExitCode {
    match real_main() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("metaraft-jepsen: {e:#}");
            ExitCode::from(3)
        }
    }
}

fn real_main() -> Result<ExitCode> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Run {
            workload,
            nemesis,
            seed,
            out,
            common,
        } => {
            let out = out.unwrap_or_else(|| default_out(&format!("{workload}-{seed}")));
            let s = run::run(&opts(&common, workload, &nemesis, seed, out)?)?;
            println!("{}", run::row(&s));
            for a in &s.anomalies {
                println!("  {a}");
            }
            for line in run::top_log_kinds(&s, 5) {
                println!("  {line}");
            }
            println!("results in {}", s.out);
            Ok(exit_for(s.valid))
        }
        Cmd::Suite {
            short,
            seeds,
            first_seed,
            nemesis,
            out,
            mut common,
        } => {
            if short {
                common.time_limit = common.time_limit.min(20);
            }
            let root = out.unwrap_or_else(|| default_out("suite"));
            // Every run re-enters a fresh client namespace, so each is its own process.
            let me = std::env::current_exe().context("locating own binary")?;
            let mut worst = Validity::Valid;
            for seed in first_seed..first_seed + seeds {
                for w in [
                    Workload::Register,
                    Workload::Set,
                    Workload::Session,
                    Workload::Idempotent,
                    Workload::Versions,
                ] {
                    // The short suite gives each workload one partition, one kill and one pause,
                    // in a fixed order and varied across workloads.
                    let nemesis = if short {
                        nemesis::short_plan(w, common.loopback).to_string()
                    } else {
                        nemesis.clone()
                    };
                    let dir = root.join(format!("{w}-{seed}"));
                    let mut cmd = std::process::Command::new(&me);
                    cmd.arg("run")
                        .args(["--workload", &w.to_string()])
                        .args(["--nemesis", &nemesis])
                        .args(["--seed", &seed.to_string()])
                        .arg("--out")
                        .arg(&dir)
                        .args(["--nodes", &common.nodes.to_string()])
                        .args(["--clients", &common.clients.to_string()])
                        .args(["--rate", &common.rate.to_string()])
                        .args(["--time-limit", &common.time_limit.to_string()])
                        .args(["--interval", &common.interval.to_string()])
                        .args(["--hold", &common.hold.to_string()])
                        .args(["--op-timeout-ms", &common.op_timeout_ms.to_string()])
                        .args(["--check-budget-s", &common.check_budget_s.to_string()]);
                    if common.loopback {
                        cmd.arg("--loopback");
                    }
                    if common.cycle || short {
                        cmd.arg("--cycle");
                    }
                    if common.with_backup {
                        cmd.arg("--with-backup");
                    }
                    if let Some(b) = &common.bin {
                        cmd.arg("--bin").arg(b);
                    }
                    let st = cmd.status().context("running a suite member")?;
                    let v = match st.code() {
                        Some(0) => Validity::Valid,
                        Some(1) => Validity::Invalid,
                        Some(2) => Validity::Unknown,
                        _ => anyhow::bail!(
                            "run {w} seed {seed} failed ({st}); see {}",
                            dir.display()
                        ),
                    };
                    worst = worst.and(v);
                }
            }
            println!("suite: valid={worst} ({})", root.display());
            Ok(exit_for(worst))
        }
        Cmd::Check {
            history,
            workload,
            check_budget_s,
        } => {
            let events = history::read_jsonl(&history)?;
            let v = checker::check(workload, &events, Duration::from_secs(check_budget_s))?;
            let ops = history::pair(&events)?;
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({
                    "valid": v.valid,
                    "anomalies": v.anomalies,
                    "counts": history::counts(&ops),
                }))?
            );
            Ok(exit_for(v.valid))
        }
        Cmd::CheckBench {
            ops,
            info,
            procs,
            seed,
            corrupt,
            check_budget_s,
        } => check_bench(ops, info, procs, seed, corrupt, check_budget_s),
        Cmd::Cleanup => {
            env::cleanup_leftovers()?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Proxy {
            listen,
            to,
            delay_file,
        } => {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(metaraft_jepsen::proxy::run(listen, to, delay_file))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn check_bench(
    ops: usize,
    info: f64,
    procs: usize,
    seed: u64,
    corrupt: bool,
    budget_s: u64,
) -> Result<ExitCode> {
    use checker::linear::{self, Outcome};
    if !(0.0..=1.0).contains(&info) || procs == 0 {
        anyhow::bail!("--info must be within 0..=1 and --procs positive");
    }
    let mut h = linear::generate(seed, ops, procs, info);
    if corrupt {
        linear::corrupt(&mut h, seed);
    }
    let unknown = h.iter().filter(|(_, end, _)| *end == u64::MAX).count();
    let start = std::time::Instant::now();
    let outcome = linear::check(&h, start + Duration::from_secs(budget_s));
    let took = start.elapsed().as_secs_f64();
    let (verdict, right) = match &outcome {
        Outcome::Linearizable => ("linearizable".to_string(), Some(!corrupt)),
        Outcome::NotLinearizable(why) => (format!("not linearizable ({why})"), Some(corrupt)),
        Outcome::Unknown => (format!("undecided within {budget_s} s"), None),
    };
    println!(
        "{} operations ({unknown} unknown) on one key, {procs} clients, seed {seed}{}: {verdict} in {took:.2} s",
        h.len(),
        if corrupt { ", corrupted" } else { "" },
    );
    Ok(match right {
        Some(true) => ExitCode::SUCCESS,
        Some(false) => ExitCode::from(1),
        None => ExitCode::from(2),
    })
}
