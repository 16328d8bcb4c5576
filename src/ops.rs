//! The HTTP ops port: `/healthz`, `/readyz`, `/metrics`.
//!
//! A deliberately tiny HTTP/1.1 responder (GET only, one request per connection): load balancers
//! and Prometheus need nothing more, and it keeps a web framework out of the binary.

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::consensus::Consensus;

/// Lag (entries between commit and apply) above which /readyz says not ready.
pub const READY_MAX_LAG: u64 = 1000;

/// How long a leader may go without a majority acknowledging it, or a follower or learner
/// without hearing from a leader, before /readyz says not ready: twice the longest election
/// timeout (2 s by default). Healthy, both stay under one heartbeat interval; past this a leader
/// cannot commit (it keeps calling itself leader: openraft has no check-quorum step-down) and a
/// follower is cut off (with pre-vote it keeps its old leader while no election can succeed).
pub fn ready_max_silence_ms(c: &crate::config::Config) -> u64 {
    c.raft.election_timeout_max_ms.saturating_mul(2)
}

/// Readiness: member of a cluster with a known leader that is in touch (see
/// [`ready_max_silence_ms`]), and applied within READY_MAX_LAG of commit. The ages are the ones
/// `/metrics` shows as `metaraft_quorum_ack_age_ms` and `metaraft_leader_contact_age_ms`.
pub fn readiness(node: &Consensus) -> Result<String, String> {
    let s = node.local_status();
    let Some(leader) = s.leader else {
        return Err("no known leader".into());
    };
    if !s.members.contains_key(&node.id()) {
        return Err("not a member of the cluster".into());
    }
    let max = ready_max_silence_ms(node.config());
    let now = crate::metrics::now_unix_ms();
    if leader == node.id() {
        // None: a lone voter, which is its own majority.
        if let Some(age) = node.metrics().quorum_ack_age_ms(now).filter(|&a| a > max) {
            return Err(format!(
                "leader without a quorum: no majority has acknowledged it for {age} ms"
            ));
        }
    } else {
        match node.metrics().leader_contact_age_ms(now) {
            None => {
                return Err(format!(
                    "leader {leader} has not replicated to this node yet"
                ))
            }
            Some(age) if age > max => {
                return Err(format!("no contact from leader {leader} for {age} ms"))
            }
            Some(_) => {}
        }
    }
    let lag = s.commit_index.saturating_sub(s.applied_index);
    if lag > READY_MAX_LAG {
        return Err(format!("applied index lags commit by {lag}"));
    }
    Ok(format!(
        "ready: leader {leader}, applied {}",
        s.applied_index
    ))
}

pub async fn serve(
    listener: TcpListener,
    node: Arc<Consensus>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
            _ = shutdown.changed() => return,
        };
        let node = node.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let n =
                match tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
                    .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
            let req = String::from_utf8_lossy(&buf[..n]);
            let mut parts = req.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) = if method != "GET" {
                (
                    "405 Method Not Allowed",
                    "text/plain",
                    "only GET\n".to_string(),
                )
            } else {
                match path {
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_string()),
                    "/readyz" => match readiness(&node) {
                        Ok(m) => ("200 OK", "text/plain", m + "\n"),
                        Err(m) => ("503 Service Unavailable", "text/plain", m + "\n"),
                    },
                    "/metrics" => (
                        "200 OK",
                        "text/plain; version=0.0.4",
                        node.metrics().render(),
                    ),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
                }
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
