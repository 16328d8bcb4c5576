//! `metaraft cluster ...` (status, membership, leadership) and `metaraft dr ...` (a DR
//! replica's status and promotion).

use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};
use clap::Subcommand;

use metaraft::config::defaults;
use metaraft::pb;

use super::args::{Conn, Output};
use super::runtime;

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Leader, term, and each member's role, log, commit, applied index and lag.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
        /// Include each member's state hash (CRC32 of the state machine at its applied index).
        #[arg(long)]
        hash: bool,
    },
    /// Add a non-voting learner.
    AddLearner {
        node_id: u64,
        peer_addr: String,
        #[arg(long, default_value = "")]
        client_addr: String,
    },
    /// Make a learner a voter.
    Promote { node_id: u64 },
    /// Remove a member (voter or learner).
    Remove { node_id: u64 },
    /// Hand leadership to a voter.
    TransferLeader { node_id: u64 },
}

#[derive(Subcommand, Debug)]
pub enum DrCmd {
    /// Lag of the DR replica at --endpoints: entries, bytes (estimate), time; last contact.
    Status {
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Promote the DR replica at --endpoints (one endpoint) into a new single-voter cluster.
    /// Only after the primary site is lost: the old cluster's nodes are refused afterwards.
    Promote {
        /// The replica's node id, as a guard against promoting the wrong endpoint.
        #[arg(long)]
        node_id: u64,
        /// Seconds to wait for the promoted node to accept writes.
        #[arg(long, default_value_t = defaults::DR_PROMOTE_WAIT_S)]
        wait_s: u64,
    },
}

/// Runs one cluster command.
pub fn run(conn: Conn, op: ClusterCmd) -> Result<ExitCode> {
    runtime::multi_thread()?.block_on(cluster(conn, op))
}

/// Runs one DR command.
pub fn run_dr(conn: Conn, op: DrCmd) -> Result<ExitCode> {
    runtime::multi_thread()?.block_on(dr(conn, op))
}

fn status_json(s: &pb::ClusterStatusResponse) -> serde_json::Value {
    serde_json::json!({
        "leader": s.leader,
        "term": s.term,
        "answered_by": s.answered_by,
        "members": s.members.iter().map(|m| serde_json::json!({
            "node_id": m.node_id,
            "role": m.role,
            "voter": m.voter,
            "peer_addr": m.peer_addr,
            "client_addr": m.client_addr,
            "term": m.term,
            "last_log_index": m.last_log_index,
            "commit_index": m.commit_index,
            "applied_index": m.applied_index,
            "lag": m.lag,
            "state_hash": m.state_hash.map(|h| format!("{h:08x}")),
            "hash_index": m.hash_index,
            "error": if m.error.is_empty() { None } else { Some(&m.error) },
        })).collect::<Vec<_>>(),
    })
}

async fn cluster(conn: Conn, op: ClusterCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    let show = |r: pb::MembershipResponse| {
        println!(
            "ok at revision {}: voters {:?} learners {:?}",
            r.revision, r.voters, r.learners
        )
    };
    match op {
        ClusterCmd::Status { output, hash } => {
            let s = c.status(hash).await?;
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&status_json(&s))?);
            } else {
                match s.leader {
                    Some(l) => println!("leader: node {l}   term: {}", s.term),
                    None => println!("leader: none known   term: {}", s.term),
                }
                println!(
                    "{:<6} {:<12} {:<22} {:>10} {:>10} {:>10} {:>8}  {}",
                    "node",
                    "role",
                    "peer",
                    "last_log",
                    "commit",
                    "applied",
                    "lag",
                    if hash { "hash@index" } else { "" }
                );
                for m in &s.members {
                    let lag = m.lag.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
                    let h = match (m.state_hash, m.hash_index) {
                        (Some(h), Some(i)) => format!("{h:08x}@{i}"),
                        _ => String::new(),
                    };
                    println!(
                        "{:<6} {:<12} {:<22} {:>10} {:>10} {:>10} {:>8}  {}{}",
                        m.node_id,
                        m.role,
                        m.peer_addr,
                        m.last_log_index,
                        m.commit_index,
                        m.applied_index,
                        lag,
                        h,
                        if m.error.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", m.error)
                        }
                    );
                }
            }
        }
        ClusterCmd::AddLearner {
            node_id,
            peer_addr,
            client_addr,
        } => show(c.add_learner(node_id, peer_addr, client_addr).await?),
        ClusterCmd::Promote { node_id } => show(c.promote(node_id).await?),
        ClusterCmd::Remove { node_id } => show(c.remove(node_id).await?),
        ClusterCmd::TransferLeader { node_id } => {
            if node_id == 0 {
                bail!("node_id must be >= 1");
            }
            show(c.transfer_leader(node_id).await?)
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn dr(conn: Conn, op: DrCmd) -> Result<ExitCode> {
    if conn.endpoints.len() != 1 {
        anyhow::bail!("give exactly one endpoint: the DR replica's client address");
    }
    let c = conn.client()?;
    let mut cc = c.cluster_at(0);
    match op {
        DrCmd::Status { output } => {
            let s = cc.dr_status(pb::DrStatusRequest {}).await?.into_inner();
            match output {
                Output::Json => println!(
                    "{}",
                    serde_json::json!({
                        "node_id": s.node_id, "dr_replica": s.dr_replica, "role": s.role,
                        "cluster_id": s.cluster_id, "leader": s.leader, "term": s.term,
                        "known_commit_index": s.known_commit_index,
                        "applied_index": s.applied_index, "lag_entries": s.lag_entries,
                        "lag_bytes": s.lag_bytes, "lag_ms": s.lag_ms,
                        "last_contact_ms_ago": s.last_contact_ms_ago,
                        "snapshots_received": s.snapshots_received,
                    })
                ),
                Output::Text => {
                    println!(
                        "node {} ({}{}), cluster {}, term {}, leader {}",
                        s.node_id,
                        s.role,
                        if s.dr_replica { ", DR replica" } else { "" },
                        s.cluster_id,
                        s.term,
                        s.leader
                            .map(|l| l.to_string())
                            .unwrap_or_else(|| "unknown".into())
                    );
                    println!(
                        "lag: {} entries (~{} bytes), {} ms; applied {} of known commit {}",
                        s.lag_entries, s.lag_bytes, s.lag_ms, s.applied_index, s.known_commit_index
                    );
                    println!(
                        "last contact from a leader: {}; snapshots received: {}",
                        if s.last_contact_ms_ago == 0 && s.leader.is_none() {
                            "never".to_string()
                        } else {
                            format!("{} ms ago", s.last_contact_ms_ago)
                        },
                        s.snapshots_received
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        DrCmd::Promote { node_id, wait_s } => {
            let t = std::time::Instant::now();
            let r = cc
                .dr_promote(pb::DrPromoteRequest { node_id })
                .await?
                .into_inner();
            eprintln!(
                "promoting node {node_id} (state at index {}, leaving cluster {})",
                r.state_index, r.previous_cluster_id
            );
            let deadline = t + Duration::from_secs(wait_s);
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Only once the node reports the new lineage: a write before that would go to
                // the old cluster if any of it were still alive.
                let promoted = match cc.dr_status(pb::DrStatusRequest {}).await {
                    Ok(s) => {
                        let s = s.into_inner();
                        (s.cluster_id != r.previous_cluster_id && !s.cluster_id.is_empty())
                            .then_some(s.cluster_id)
                    }
                    Err(_) => None,
                };
                if let Some(cluster) = promoted {
                    let probe = c
                        .put(pb::PutRequest {
                            key: b"metaraft/dr-promoted-at".to_vec(),
                            value: metaraft::metrics::now_unix_ms().to_string().into_bytes(),
                            ..Default::default()
                        })
                        .await;
                    if let Ok(p) = probe {
                        println!(
                            "promoted: node {node_id} leads new cluster {cluster} (first write at revision {} after {:.2}s)",
                            p.revision,
                            t.elapsed().as_secs_f64()
                        );
                        return Ok(ExitCode::SUCCESS);
                    }
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!("node {node_id} did not accept writes within {wait_s}s");
                }
            }
        }
    }
}
