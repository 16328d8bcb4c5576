//! # metaraft-jepsen
//!
//! Fault-injection tests of real metaraft clusters. Module map:
//!
//! ```text
//! main.rs       the CLI: run, suite, check (offline), cleanup
//! run.rs        one test run: cluster up, clients + nemesis, heal, final reads, check, report
//! env.rs        where nodes live: network namespaces on a bridge (root) or loopback (fallback);
//!               node processes (spawn, kill -9, SIGSTOP/SIGCONT, restart)
//! nemesis.rs    named faults and their schedule; the timeline of fault windows
//! workload.rs   the client operations of each workload, recorded into the history
//! history.rs    the JSON-lines history (invoke / ok / fail / info) and pairing
//! checker/      one checker per workload; register: a memoised Wing-Gong/Lowe search (linear.rs)
//! logscan.rs    the nodes' logs: panics (a run with one fails), warnings and errors by kind
//! plot.rs       latency over time as SVG, fault windows shaded
//! proxy.rs      a delaying TCP proxy in front of each node's peer port (the delay fault)
//! ```

pub mod checker;
pub mod env;
pub mod history;
pub mod logscan;
pub mod nemesis;
pub mod plot;
pub mod proxy;
pub mod run;
pub mod workload;
