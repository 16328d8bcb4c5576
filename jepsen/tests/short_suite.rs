//! The short suite CI runs: every workload against a real 3-node cluster under a partition, a
//! kill and a pause (in network namespaces when root; on loopback with process faults only
//! otherwise), each history checked. Plus the harness's own refusals.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

use metaraft_jepsen::checker::Workload;
use metaraft_jepsen::nemesis::short_plan;

/// One cluster at a time: the runs share namespace names and ports.
static SERIAL: Mutex<()> = Mutex::new(());

fn harness() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_metaraft-jepsen"))
}

fn metaraft() -> PathBuf {
    let bin = harness().with_file_name("metaraft");
    assert!(
        bin.exists(),
        "{} missing: run the workspace tests (cargo test --workspace) so it is built",
        bin.display()
    );
    bin
}

fn root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn run_workload(w: Workload) {
    let loopback = !root();
    // The set and idempotent runs also stream a backup through the faults and restore it.
    let with_backup = matches!(w, Workload::Set | Workload::Idempotent);
    run_plan(w, short_plan(w, loopback), loopback, with_backup);
}

fn run_plan(w: Workload, plan: &str, loopback: bool, with_backup: bool) {
    run_plan_with(w, plan, loopback, with_backup, &["--time-limit", "20"]);
}

/// Runs `plan` in order and checks the run (see the assertions below); returns the timeline.
fn run_plan_with(
    w: Workload,
    plan: &str,
    loopback: bool,
    with_backup: bool,
    extra: &[&str],
) -> Vec<serde_json::Value> {
    let _g = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let mut cmd = Command::new(harness());
    cmd.arg("run")
        .args(["--workload", &w.to_string(), "--nemesis", plan, "--cycle"])
        .args(["--seed", "7"])
        .args(extra)
        .arg("--bin")
        .arg(metaraft())
        .arg("--out")
        .arg(&out);
    if loopback {
        cmd.arg("--loopback");
    }
    if with_backup {
        cmd.arg("--with-backup");
    }
    let o = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    println!("{stdout}");
    let summary: serde_json::Value = match std::fs::read(out.join("summary.json")) {
        Ok(b) => serde_json::from_slice(&b).unwrap(),
        Err(e) => panic!("no summary ({e}); stdout: {stdout}\nstderr: {stderr}"),
    };
    let keep = || {
        // Leave the evidence where a human can find it.
        let kept = std::env::temp_dir().join(format!("metaraft-jepsen-failed-{w}"));
        let _ = std::fs::remove_dir_all(&kept);
        let _ = Command::new("cp").arg("-r").arg(&out).arg(&kept).status();
        kept
    };
    if !o.status.success() || summary["valid"] != "true" {
        panic!(
            "{w}: {summary:#}\nstderr: {stderr}\nrun kept in {}",
            keep().display()
        );
    }
    // The faults really happened, in the planned order.
    let timeline: Vec<serde_json::Value> =
        serde_json::from_slice(&std::fs::read(out.join("timeline.json")).unwrap()).unwrap();
    let names: Vec<&str> = timeline
        .iter()
        .filter_map(|w| w["fault"].as_str())
        .collect();
    // In the order given, round-robin (a name listed twice counts once).
    let mut planned: Vec<&str> = Vec::new();
    for p in plan.split(',') {
        if !planned.contains(&p) {
            planned.push(p);
        }
    }
    assert!(names.len() >= planned.len(), "{timeline:#?}");
    let cycled: Vec<&str> = planned.iter().copied().cycle().take(names.len()).collect();
    assert_eq!(names, cycled, "{timeline:#?}");
    for win in &timeline {
        let d = win["detail"].as_str().unwrap_or("");
        assert!(!d.contains("could not"), "a fault did not apply: {d}");
    }
    // The clients did real work, and the replicas agree.
    let ok: u64 = summary["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c["ok"].as_u64().unwrap())
        .sum();
    assert!(ok > 200, "only {ok} operations succeeded: {summary:#}");
    assert_eq!(summary["replicas_equal"], true);
    if with_backup {
        assert_eq!(summary["backup_restore_equal"], true, "{summary:#}");
    }
    for f in ["history.jsonl", "latency.svg", "n1/log.txt"] {
        assert!(out.join(f).exists(), "{f} missing");
    }
    // The saved history re-checks offline to the same verdict.
    let c = Command::new(harness())
        .arg("check")
        .arg(out.join("history.jsonl"))
        .args(["--workload", &w.to_string()])
        .output()
        .unwrap();
    assert!(c.status.success(), "{}", String::from_utf8_lossy(&c.stdout));
    // No node panicked, not even in a task that does not stop the process.
    assert_eq!(summary["logs"]["panics"], 0, "{summary:#}");
    timeline
}

#[test]
fn register_under_partition_kill_pause() {
    run_workload(Workload::Register);
}

#[test]
fn set_under_partition_kill_pause() {
    run_workload(Workload::Set);
}

#[test]
fn session_under_partition_kill_pause() {
    run_workload(Workload::Session);
}

#[test]
fn idempotent_under_partition_kill_pause() {
    run_workload(Workload::Idempotent);
}

#[test]
fn versions_under_partition_kill_pause() {
    run_workload(Workload::Versions);
}

#[test]
fn network_faults_are_refused_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    let o = Command::new(harness())
        .args([
            "run",
            "--workload",
            "set",
            "--nemesis",
            "partition",
            "--loopback",
        ])
        .arg("--out")
        .arg(dir.path().join("x"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("unsupported in loopback mode"), "{e}");
}

#[test]
fn unknown_nemeses_are_refused() {
    let o = Command::new(harness())
        .args(["run", "--workload", "set", "--nemesis", "kill,flood"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("unknown nemesis \"flood\""), "{e}");
}

/// The checker benchmark refuses nonsense options and judges both kinds of history right.
#[test]
fn check_bench_refuses_bad_options_and_judges_both_verdicts() {
    for bad in [["--info", "2"], ["--info", "nan"], ["--procs", "0"]] {
        let o = Command::new(harness())
            .arg("check-bench")
            .args(bad)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(3), "{bad:?}");
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(e.contains("--info must be within"), "{e}");
    }
    for extra in [&[][..], &["--corrupt"][..]] {
        let o = Command::new(harness())
            .args(["check-bench", "--ops", "20000"])
            .args(extra)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{extra:?}: {out}");
        let want = if extra.is_empty() {
            ": linearizable"
        } else {
            ": not linearizable"
        };
        assert!(out.contains(want), "{out}");
    }
}

/// Real delay (150 ms each way on every peer link, through the harness's delaying proxies),
/// then a partition while delayed: reads and CAS stay linearizable.
#[test]
fn register_under_delay() {
    if !root() {
        eprintln!("skipped: the delay proxies live in network namespaces (root)");
        return;
    }
    run_plan(
        Workload::Register,
        "delay,partition-halves,delay",
        false,
        false,
    );
}

/// A follower cut off for a few seconds rejoins without a leader change (pre-vote: it never
/// raised its term while alone), at least twice under load; an isolated leader is replaced exactly
/// once, twice, and its return changes nothing more. The hold (5 s) leaves a loaded machine
/// time to elect (a 1 s lease, then a 0.5-1 s election timeout) before the heal.
#[test]
fn register_isolations_change_the_leader_only_when_it_is_cut_off() {
    if !root() {
        eprintln!("skipped: isolation needs network namespaces (root)");
        return;
    }
    let timeline = run_plan_with(
        Workload::Register,
        "isolate-follower,isolate-leader",
        false,
        false,
        &["--time-limit", "44", "--hold", "5"],
    );
    for w in &timeline {
        let changes = w["leader_changes"].as_u64();
        println!(
            "{}: {} leader changes {:?}, terms {}, longest write stall after heal {} ms",
            w["fault"], w["detail"], changes, w["terms"], w["stall_after_heal_ms"]
        );
        let expected = if w["fault"] == "isolate-leader" { 1 } else { 0 };
        assert_eq!(changes, Some(expected), "{w:#}");
        if w["fault"] == "isolate-follower" {
            // The leader's term did not move either (a deposed leader re-elected would), and the
            // cut-off follower never raised its own: nothing left to depose anyone later.
            assert_eq!(w["terms"][0], w["terms"][1], "{w:#}");
            assert!(w["isolated_terms"].is_array(), "{w:#}");
            assert_eq!(w["isolated_terms"][0], w["isolated_terms"][1], "{w:#}");
        }
    }
}

/// Five nodes, two of them killed at once (the largest minority), twice.
#[test]
fn register_five_nodes_two_killed_at_once() {
    if !root() {
        eprintln!("skipped: runs in network namespaces (root)");
        return;
    }
    run_plan_with(
        Workload::Register,
        "kill-minority,isolate-follower,kill-minority",
        false,
        false,
        &["--time-limit", "24", "--nodes", "5"],
    );
}

/// A node whose disk fills or whose fsync fails must stop acknowledging or exit, never
/// acknowledge what it did not persist: no acknowledged add may be lost.
#[test]
fn set_under_full_disk_and_failing_fsync() {
    if !root() {
        eprintln!("skipped: loop-mounted filesystems need root");
        return;
    }
    run_plan(
        Workload::Set,
        "disk-full,fsync-fail,disk-full",
        false,
        false,
    );
}

#[test]
fn namespaces_need_root() {
    if !root() {
        return run_as_nonroot_check(Command::new(harness()));
    }
    // As root, drop to nobody to see the refusal.
    let mut c = Command::new("setpriv");
    c.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(harness());
    run_as_nonroot_check(c);
}

fn run_as_nonroot_check(mut c: Command) {
    let o = c
        .args(["run", "--workload", "set", "--out", "/nonexistent-dir/x"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("need root"), "{e}");
}
