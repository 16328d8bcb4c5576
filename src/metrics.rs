//! Process metrics, rendered as Prometheus text on the ops port.
//!
//! Plain atomics and fixed-bucket histograms: no registry crate needed for a dozen series.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Upper bounds (seconds) of latency buckets.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];
const BATCH_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

#[derive(Default)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Histogram {
    fn new(n: usize) -> Self {
        Histogram {
            counts: (0..=n).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }
    fn observe(&self, bounds: &[f64], v: f64) {
        let i = bounds.iter().position(|b| v <= *b).unwrap_or(bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
        self.sum_micros
            .fetch_add((v * 1e6) as u64, Ordering::Relaxed);
    }
    fn render(&self, out: &mut String, name: &str, labels: &str, bounds: &[f64]) {
        let mut cum = 0;
        let sep = if labels.is_empty() { "" } else { "," };
        for (i, b) in bounds.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let lb = if labels.is_empty() {
            String::new()
        } else {
            format!("{{{labels}}}")
        };
        let _ = writeln!(out, "{name}_sum{lb} {sum}");
        let _ = writeln!(
            out,
            "{name}_count{lb} {}",
            self.count.load(Ordering::Relaxed)
        );
    }
}

/// All metrics of one node.
pub struct Metrics {
    pub term: AtomicU64,
    pub leader_changes: AtomicU64,
    pub commit_index: AtomicU64,
    pub applied_index: AtomicU64,
    pub last_log_index: AtomicU64,
    pub is_leader: AtomicU64,
    /// Unix ms of the last replication request from a leader (followers, learners, DR replicas).
    pub last_leader_contact_ms: AtomicU64,
    /// Unix ms when applied last caught up with the known commit index.
    pub caught_up_at_ms: AtomicU64,
    /// Leader of more than one voter only: unix ms when a quorum last acknowledged it (0: not
    /// such a leader, or not yet known).
    pub quorum_acked_at_ms: AtomicU64,
    pub snapshots_received: AtomicU64,
    /// Leader: times a member answered that it lacks entries it had acknowledged (net::lost).
    pub lost_data_detections: AtomicU64,
    pub replicated_entries: AtomicU64,
    pub replicated_bytes: AtomicU64,
    /// TLS handshakes that failed or timed out, on the client and the peer port.
    tls_failed_client: AtomicU64,
    tls_failed_peer: AtomicU64,
    fsync_latency: Histogram,
    fsync_batch: Histogram,
    forward_batch: Histogram,
    propose_batch: Histogram,
    rpc_latency: Mutex<BTreeMap<(&'static str, &'static str), Histogram>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            term: AtomicU64::new(0),
            leader_changes: AtomicU64::new(0),
            commit_index: AtomicU64::new(0),
            applied_index: AtomicU64::new(0),
            last_log_index: AtomicU64::new(0),
            is_leader: AtomicU64::new(0),
            last_leader_contact_ms: AtomicU64::new(0),
            caught_up_at_ms: AtomicU64::new(0),
            quorum_acked_at_ms: AtomicU64::new(0),
            snapshots_received: AtomicU64::new(0),
            lost_data_detections: AtomicU64::new(0),
            replicated_entries: AtomicU64::new(0),
            replicated_bytes: AtomicU64::new(0),
            tls_failed_client: AtomicU64::new(0),
            tls_failed_peer: AtomicU64::new(0),
            fsync_latency: Histogram::new(LATENCY_BUCKETS.len()),
            fsync_batch: Histogram::new(BATCH_BUCKETS.len()),
            forward_batch: Histogram::new(BATCH_BUCKETS.len()),
            propose_batch: Histogram::new(BATCH_BUCKETS.len()),
            rpc_latency: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Metrics {
    pub fn observe_fsync(&self, d: Duration, batch: usize) {
        self.fsync_latency
            .observe(&LATENCY_BUCKETS, d.as_secs_f64());
        self.fsync_batch.observe(&BATCH_BUCKETS, batch as f64);
    }

    /// Records one ForwardBatch call this node sent to the leader, of `writes` writes.
    pub fn observe_forward_batch(&self, writes: usize) {
        self.forward_batch.observe(&BATCH_BUCKETS, writes as f64);
    }

    /// Records one proposal this node made to its Raft core, of `writes` writes.
    pub fn observe_propose_batch(&self, writes: usize) {
        self.propose_batch.observe(&BATCH_BUCKETS, writes as f64);
    }

    /// Counts a TLS handshake that failed or timed out on `port` ("client" or "peer").
    pub fn tls_handshake_failed(&self, port: &str) {
        let c = if port == "peer" {
            &self.tls_failed_peer
        } else {
            &self.tls_failed_client
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Records one client RPC: `code` is "ok" or the gRPC code name.
    pub fn observe_rpc(&self, rpc: &'static str, code: &'static str, d: Duration) {
        let mut m = match self.rpc_latency.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        m.entry((rpc, code))
            .or_insert_with(|| Histogram::new(LATENCY_BUCKETS.len()))
            .observe(&LATENCY_BUCKETS, d.as_secs_f64());
    }

    /// Milliseconds at `now` since a leader last replicated to this node; `None` if none has.
    pub fn leader_contact_age_ms(&self, now: u64) -> Option<u64> {
        age(self.last_leader_contact_ms.load(Ordering::Relaxed), now)
    }

    /// Milliseconds at `now` since a quorum last acknowledged this node as leader; `None` when
    /// it is not a leader of more than one voter (or no acknowledgement is known yet).
    pub fn quorum_ack_age_ms(&self, now: u64) -> Option<u64> {
        age(self.quorum_acked_at_ms.load(Ordering::Relaxed), now)
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let gauge = |out: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        let now = now_unix_ms();
        gauge(
            &mut out,
            "metaraft_leader_contact_age_ms",
            "Milliseconds since a leader last replicated to this node (0: never).",
            self.leader_contact_age_ms(now).unwrap_or(0),
        );
        gauge(
            &mut out,
            "metaraft_quorum_ack_age_ms",
            "Leader of more than one voter: milliseconds since a quorum last acknowledged it; \
             rising past the election timeout means it cannot commit (0 elsewhere).",
            self.quorum_ack_age_ms(now).unwrap_or(0),
        );
        gauge(
            &mut out,
            "metaraft_replication_lag_entries",
            "Known commit index minus applied index on this node.",
            self.commit_index
                .load(Ordering::Relaxed)
                .saturating_sub(self.applied_index.load(Ordering::Relaxed)),
        );
        gauge(
            &mut out,
            "metaraft_snapshots_received_total",
            "Snapshots streamed to this node by a leader.",
            self.snapshots_received.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP metaraft_lost_data_detections_total Leader: times a member answered that it \
             lacks log entries it had acknowledged (its data was lost; reported at most every \
             30 s per member).\n# TYPE metaraft_lost_data_detections_total counter\n\
             metaraft_lost_data_detections_total {}",
            self.lost_data_detections.load(Ordering::Relaxed)
        );
        gauge(
            &mut out,
            "metaraft_term",
            "Current Raft term.",
            self.term.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP metaraft_leader_changes_total Leader changes seen by this node.\n# TYPE metaraft_leader_changes_total counter\nmetaraft_leader_changes_total {}",
            self.leader_changes.load(Ordering::Relaxed)
        );
        gauge(
            &mut out,
            "metaraft_is_leader",
            "1 when this node is the leader.",
            self.is_leader.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "metaraft_commit_index",
            "Highest committed log index known.",
            self.commit_index.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "metaraft_applied_index",
            "Highest applied log index.",
            self.applied_index.load(Ordering::Relaxed),
        );
        gauge(
            &mut out,
            "metaraft_last_log_index",
            "Last log index in the local log.",
            self.last_log_index.load(Ordering::Relaxed),
        );
        let _ = writeln!(
            out,
            "# HELP metaraft_tls_handshake_failures_total TLS handshakes that failed or timed out, by port.\n# TYPE metaraft_tls_handshake_failures_total counter\nmetaraft_tls_handshake_failures_total{{port=\"client\"}} {}\nmetaraft_tls_handshake_failures_total{{port=\"peer\"}} {}",
            self.tls_failed_client.load(Ordering::Relaxed),
            self.tls_failed_peer.load(Ordering::Relaxed)
        );
        self.render_histograms(&mut out);
        out
    }

    /// The histograms of [`Metrics::render`].
    fn render_histograms(&self, out: &mut String) {
        let _ = writeln!(out, "# HELP metaraft_log_fsync_seconds Latency of one log WAL fsync.\n# TYPE metaraft_log_fsync_seconds histogram");
        self.fsync_latency
            .render(out, "metaraft_log_fsync_seconds", "", &LATENCY_BUCKETS);
        let _ = writeln!(out, "# HELP metaraft_log_fsync_batch_size Appends covered by one fsync (group commit).\n# TYPE metaraft_log_fsync_batch_size histogram");
        self.fsync_batch
            .render(out, "metaraft_log_fsync_batch_size", "", &BATCH_BUCKETS);
        let _ = writeln!(out, "# HELP metaraft_forward_batch_size Writes per batch this node forwarded to the leader.\n# TYPE metaraft_forward_batch_size histogram");
        self.forward_batch
            .render(out, "metaraft_forward_batch_size", "", &BATCH_BUCKETS);
        let _ = writeln!(out, "# HELP metaraft_propose_batch_size Writes per proposal this node (as leader) handed to the Raft core.\n# TYPE metaraft_propose_batch_size histogram");
        self.propose_batch
            .render(out, "metaraft_propose_batch_size", "", &BATCH_BUCKETS);
        let _ = writeln!(out, "# HELP metaraft_rpc_seconds Client RPC latency by method and result.\n# TYPE metaraft_rpc_seconds histogram");
        let m = match self.rpc_latency.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        for ((rpc, code), h) in m.iter() {
            h.render(
                out,
                "metaraft_rpc_seconds",
                &format!("rpc=\"{rpc}\",code=\"{code}\""),
                &LATENCY_BUCKETS,
            );
        }
    }
}

/// `now - at_ms`, for a unix-ms stamp where 0 means "never".
fn age(at_ms: u64, now: u64) -> Option<u64> {
    (at_ms != 0).then(|| now.saturating_sub(at_ms))
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::default();
        m.observe_fsync(Duration::from_micros(300), 3);
        m.observe_rpc("Put", "ok", Duration::from_millis(2));
        m.observe_forward_batch(20);
        m.observe_propose_batch(3);
        let s = m.render();
        assert!(s.contains("metaraft_propose_batch_size_bucket{le=\"2\"} 0"));
        assert!(s.contains("metaraft_propose_batch_size_bucket{le=\"4\"} 1"));
        assert!(s.contains("metaraft_forward_batch_size_bucket{le=\"16\"} 0"));
        assert!(s.contains("metaraft_forward_batch_size_bucket{le=\"32\"} 1"));
        assert!(s.contains("metaraft_log_fsync_seconds_count 1"));
        assert!(s.contains("metaraft_log_fsync_batch_size_bucket{le=\"4\"} 1"));
        assert!(s.contains("metaraft_rpc_seconds_count{rpc=\"Put\",code=\"ok\"} 1"));
    }
}
