//! Cluster tests with three real `metaraft serve` processes.

// Each test holds a process-wide lock for its whole run so clusters never overlap on two cores;
// every test has its own runtime, so holding it across awaits cannot deadlock.
#![allow(clippy::await_holding_lock)]

#[path = "../common/mod.rs"]
mod common;
mod failover;
mod input;
mod reads;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use metaraft::pb;
use tonic::Code;

fn tracing_log(s: &str) {
    eprintln!("{s}");
}

async fn futures_hashes(c: &TestCluster) -> BTreeSet<(Option<u64>, Option<u64>)> {
    let mut out = BTreeSet::new();
    for i in c.live() {
        let s = c.self_status(i, true).await;
        out.insert((s.hash_index, s.state_hash));
    }
    out
}

async fn http_get(addr: &str, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect ops");
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut out = String::new();
    s.read_to_string(&mut out).await.expect("read");
    out
}

/// The value of an unlabelled gauge on a node's ops port.
async fn gauge(ops: &str, name: &str) -> u64 {
    let text = http_get(ops, "/metrics").await;
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {text}"))
}

/// User plus system CPU seconds of process `pid` so far (Linux, 100 ticks a second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .expect("stat format")
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}
