//! Metadata benchmarks on a real RocksDB state machine, each printing its ratio against a
//! baseline measured in the same run:
//!
//! - RBAC: single permission checks per second through the in-memory index (a fresh snapshot per
//!   check, as one CheckPermissions call of one resource does) against the naive evaluator that
//!   walks every binding. Target: at least 100,000 checks/s.
//! - Keyset pagination: a page deep into a project's runs (page 2,000 of 20, or as deep as the
//!   data allows) against page 1. Target: the same cost (ratio near 1).
//!
//!   . scripts/env.sh && META_BENCH_RUNS=1000000 cargo bench --bench meta
//!
//! META_BENCH_RUNS (default 100,000) runs are created through `apply`, as a cluster would.

use std::time::{Duration, Instant};

use criterion::{criterion_group, Criterion};
use metaraft::fsm::meta::query::{self, ListQuery};
use metaraft::fsm::meta::rbac::{self, RbacIndex};
use metaraft::fsm::meta::{Id, Kind, MetaOp, RunStatus, Spec, NIL};
use metaraft::fsm::{Command, Request};
use metaraft::raft_types::Entry;
use metaraft::storage::StateMachineStore;

struct Fixture {
    _dir: tempfile::TempDir,
    sm: StateMachineStore,
    users: Vec<Id>,
    runs: Vec<Id>,
    project: Id,
}

fn id(n: u64) -> Id {
    let mut id = [0u8; 16];
    id[0] = 0x5E;
    id[8..].copy_from_slice(&n.to_be_bytes());
    id
}

fn entry(index: u64, at_ms: u64, op: &MetaOp) -> Entry {
    let Command::Meta { format, op, .. } = Command::meta(op).expect("encode") else {
        unreachable!()
    };
    openraft::Entry {
        log_id: openraft::LogId::new(
            openraft::impls::leader_id_adv::LeaderId {
                term: 1,
                node_id: 1,
            },
            index,
        ),
        payload: openraft::EntryPayload::Normal(std::sync::Arc::new(Request::new(
            "",
            Command::Meta { format, at_ms, op },
        ))),
    }
}

fn create(idn: u64, parent: Id, name: String, owner: Id, spec: Spec) -> MetaOp {
    MetaOp::Create {
        id: id(idn),
        parent,
        name,
        owner,
        tags: vec![],
        spec,
    }
}

fn user(active: bool) -> Spec {
    Spec::User {
        email: String::new(),
        external_id: String::new(),
        active,
        service_account: false,
        api_keys: vec![],
    }
}

fn build(runs: u64) -> Fixture {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tmp");
    let mut sm = StateMachineStore::open(dir.path(), 1_000_000).expect("open");
    let mut ops = Vec::new();
    let org = id(1);
    ops.push(create(
        1,
        NIL,
        "acme".into(),
        NIL,
        Spec::Organization {
            display_name: String::new(),
        },
    ));
    let users: Vec<Id> = (0..200).map(|u| id(100 + u)).collect();
    for (u, uid) in users.iter().enumerate() {
        ops.push(create(
            100 + u as u64,
            org,
            format!("user{u}"),
            NIL,
            user(true),
        ));
        let _ = uid;
    }
    let mut projects = Vec::new();
    for w in 0..5u64 {
        ops.push(create(
            1000 + w,
            org,
            format!("ws{w}"),
            NIL,
            Spec::Workspace {
                display_name: String::new(),
            },
        ));
        for p in 0..4u64 {
            let pid = 2000 + w * 10 + p;
            ops.push(create(
                pid,
                id(1000 + w),
                format!("p{p}"),
                users[0],
                Spec::Project {
                    display_name: String::new(),
                    description: String::new(),
                },
            ));
            projects.push(id(pid));
        }
    }
    // Teams of 20 users; bindings at org, workspace and project scope.
    for t in 0..10u64 {
        let members = users[(t as usize * 20)..(t as usize * 20 + 20)].to_vec();
        ops.push(create(
            3000 + t,
            org,
            format!("team{t}"),
            NIL,
            Spec::Team { members },
        ));
        let role = metaraft::fsm::meta::apply::builtin_role_id(
            &org,
            if t % 2 == 0 { "developer" } else { "viewer" },
        );
        ops.push(create(
            3100 + t,
            org,
            String::new(),
            NIL,
            Spec::RoleBinding {
                subject: id(3000 + t),
                role,
                scope: id(1000 + t % 5),
            },
        ));
    }
    for u in 0..100u64 {
        let role = metaraft::fsm::meta::apply::builtin_role_id(&org, "viewer");
        ops.push(create(
            3200 + u,
            org,
            String::new(),
            NIL,
            Spec::RoleBinding {
                subject: users[u as usize],
                role,
                scope: projects[(u % 20) as usize],
            },
        ));
    }
    let project = projects[0];
    ops.push(create(
        4000,
        project,
        "train".into(),
        users[1],
        Spec::Pipeline {
            description: String::new(),
            run_count: 0,
        },
    ));
    let mut counts = [0u32; 9];
    counts[0] = 8;
    let mut run_ids = Vec::new();
    for r in 0..runs {
        let rid = 10_000_000 + r;
        run_ids.push(id(rid));
        ops.push(create(
            rid,
            project,
            format!("run-{r:08}"),
            users[(r % 200) as usize],
            Spec::PipelineRun {
                pipeline: id(4000),
                orchestrator_run_id: String::new(),
                parent_run: NIL,
                status: RunStatus::Initializing,
                start_ms: 0,
                end_ms: 0,
                step_counts: counts,
                index: 0,
            },
        ));
    }
    let t = Instant::now();
    let mut index = 1u64;
    for chunk in ops.chunks(2000) {
        let entries: Vec<Entry> = chunk
            .iter()
            .map(|op| {
                index += 1;
                entry(index, 1_700_000_000_000 + index, op)
            })
            .collect();
        rt.block_on(sm.apply_entries(entries)).expect("apply");
    }
    eprintln!(
        "fixture: {} ops applied in {:.1}s ({:.0} creates/s)",
        ops.len(),
        t.elapsed().as_secs_f64(),
        ops.len() as f64 / t.elapsed().as_secs_f64()
    );
    Fixture {
        _dir: dir,
        sm,
        users,
        runs: run_ids,
        project,
    }
}

fn per_sec(n: u64, d: Duration) -> f64 {
    n as f64 / d.as_secs_f64()
}

fn rbac_checks(f: &Fixture, c: &mut Criterion) {
    let n = 200_000u64;
    let subject = |i: u64| f.users[(i % f.users.len() as u64) as usize];
    // Uniform over every run (mostly cache misses: a RocksDB read per check).
    let target = |i: u64| f.runs[(i.wrapping_mul(2_654_435_761) % f.runs.len() as u64) as usize];
    // Dashboards check the newest runs: the last 10,000.
    let hot = f.runs.len().min(10_000) as u64;
    let recent = |i: u64| f.runs[f.runs.len() - 1 - (i.wrapping_mul(2_654_435_761) % hot) as usize];
    let timed = |pick: &dyn Fn(u64) -> Id| {
        let t = Instant::now();
        for i in 0..n {
            f.sm.with_rbac(|ix, v| {
                ix.check_at(v, v.applied, &subject(i), rbac::A_READ, None, &pick(i))
            })
            .expect("view")
            .expect("check");
        }
        per_sec(n, t.elapsed())
    };
    let _warm = timed(&recent);
    let recent_rate = timed(&recent);
    // The index: one snapshot and one check per call, as a single-resource RPC.
    let mut allowed = 0u64;
    let t = Instant::now();
    for i in 0..n {
        let ok =
            f.sm.with_rbac(|ix: &RbacIndex, v| {
                ix.check_at(v, v.applied, &subject(i), rbac::A_READ, None, &target(i))
            })
            .expect("view")
            .expect("check")
            .allowed();
        allowed += ok as u64;
    }
    let fast = t.elapsed();
    // Baseline: the naive evaluator (walks every binding), on fewer checks.
    let m = 2_000u64;
    let t = Instant::now();
    let mut agree = 0u64;
    for i in 0..m {
        let slow =
            f.sm.read_view(|v| rbac::naive_check(v, &subject(i), rbac::A_READ, None, &target(i)))
                .expect("view")
                .expect("naive");
        let fast =
            f.sm.with_rbac(|ix, v| {
                ix.check_at(v, v.applied, &subject(i), rbac::A_READ, None, &target(i))
            })
            .expect("view")
            .expect("check")
            .allowed();
        agree += (slow == fast) as u64;
    }
    let slow = t.elapsed();
    let verdict = |r: f64| if r >= 100_000.0 { "met" } else { "MISSED" };
    println!(
        "rbac ({} runs): index {:.0} checks/s uniform over all runs ({} of {n} allowed), {:.0} checks/s over the newest {hot}; naive {:.0} checks/s; ratio {:.1}x / {:.1}x; target 100000 checks/s: {} / {}",
        f.runs.len(),
        per_sec(n, fast),
        allowed,
        recent_rate,
        per_sec(m, slow),
        per_sec(n, fast) / per_sec(m, slow),
        recent_rate / per_sec(m, slow),
        verdict(per_sec(n, fast)),
        verdict(recent_rate),
    );
    assert_eq!(agree, m, "index and naive evaluator disagree");
    let mut g = c.benchmark_group("rbac");
    let mut i = 0u64;
    g.bench_function("check_one_resource", |b| {
        b.iter(|| {
            i += 1;
            f.sm.with_rbac(|ix, v| {
                ix.check_at(v, v.applied, &subject(i), rbac::A_READ, None, &target(i))
            })
            .expect("view")
            .expect("check")
        })
    });
    g.finish();
}

fn pages(f: &Fixture, c: &mut Criterion) {
    let size = 20usize;
    let q = |token: String| ListQuery {
        kind: Some(Kind::PipelineRun),
        parent: f.project,
        page_size: size,
        page_token: token,
        ..Default::default()
    };
    // Tokens of pages 1, 20, 200, 2000 (as deep as the data allows), walked with large pages
    // (a token is a position; the page size is not in it).
    let max_page = f.runs.len() / size;
    let mut tokens = vec![(1usize, String::new())];
    let (mut token, mut skipped) = (String::new(), 0usize);
    for want in [20usize, 200, 2000, 20_000] {
        if want > max_page {
            break;
        }
        while skipped < (want - 1) * size {
            let take = ((want - 1) * size - skipped).min(1000);
            let mut big = q(token.clone());
            big.page_size = take;
            let p =
                f.sm.read_view(|v| query::list(v, &big))
                    .expect("view")
                    .expect("list");
            token = p.next_page_token;
            skipped += take;
        }
        tokens.push((want, token.clone()));
    }
    let time = |tok: &str, n: u32| {
        let t = Instant::now();
        for _ in 0..n {
            let p =
                f.sm.read_view(|v| query::list(v, &q(tok.to_string())))
                    .expect("view")
                    .expect("list");
            assert_eq!(p.records.len(), size);
        }
        t.elapsed() / n
    };
    let first = time("", 2000);
    let mut line = format!(
        "pagination ({} runs, {size} per page): page 1 {:.1} us",
        f.runs.len(),
        first.as_secs_f64() * 1e6
    );
    for (page, tok) in &tokens[1..] {
        let d = time(tok, 2000);
        line.push_str(&format!(
            ", page {page} {:.1} us ({:.2}x)",
            d.as_secs_f64() * 1e6,
            d.as_secs_f64() / first.as_secs_f64()
        ));
    }
    println!("{line}");
    let token = tokens.last().map(|t| t.1.clone()).unwrap_or_default();
    let mut g = c.benchmark_group("list_runs");
    g.bench_function("page_1", |b| {
        b.iter(|| {
            f.sm.read_view(|v| query::list(v, &q(String::new())))
                .expect("view")
        })
    });
    g.bench_function("deep_page", |b| {
        b.iter(|| {
            f.sm.read_view(|v| query::list(v, &q(token.clone())))
                .expect("view")
        })
    });
    g.finish();
}

fn benches(c: &mut Criterion) {
    let runs = std::env::var("META_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000u64);
    let f = build(runs);
    rbac_checks(&f, c);
    pages(&f, c);
}

criterion_group! {
    name = meta;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}

fn main() {
    meta();
    Criterion::default().configure_from_args().final_summary();
}
