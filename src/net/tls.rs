//! TLS listeners for the client and peer ports: accepted TCP connections go through a rustls
//! handshake before tonic sees them.
//!
//! The handshakes run here rather than in tonic's `tls` feature because tonic 0.12's accept loop
//! ends the whole server on a handshake error it does not recognise (hyperium/tonic#1989) and
//! never times a handshake out. Here each handshake is its own task with a deadline; a failed,
//! stalled or plaintext client costs a log line and a counter, never the listener.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_stream::StreamExt;
use tonic::transport::server::{Connected, TcpConnectInfo, TcpIncoming};

use crate::metrics::Metrics;

/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// At most one handshake-failure log line per listener per this many milliseconds; the counter
/// still counts every failure, and the next line says how many were not logged.
const LOG_EVERY_MS: u64 = 1000;

/// Rate limit of the failure log lines of one listener (a port scan must not flood the log).
#[derive(Default)]
struct LogLimit {
    last_ms: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

impl LogLimit {
    /// Some(failures not logged since the last line) when this failure may be logged.
    fn admit(&self, now_ms: u64) -> Option<u64> {
        use std::sync::atomic::Ordering::Relaxed;
        let last = self.last_ms.load(Relaxed);
        if now_ms.saturating_sub(last) >= LOG_EVERY_MS
            && self
                .last_ms
                .compare_exchange(last, now_ms, Relaxed, Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Relaxed))
        } else {
            self.suppressed.fetch_add(1, Relaxed);
            None
        }
    }
}

/// Handshakes in progress at once per listener; connections beyond it wait in the kernel's
/// accept queue, so a flood of idle sockets cannot grow tasks without bound.
const MAX_HANDSHAKES: usize = 256;

/// A server-side TLS connection, as tonic wants it.
pub struct TlsIo(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.0.get_ref().0.connect_info()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// The TLS connections of `plain`'s accepted sockets, for `serve_with_incoming`. `port` names
/// the listener in logs and metrics ("client" or "peer"). The stream ends when the server drops
/// it; the accept task then stops.
pub fn incoming(
    plain: TcpIncoming,
    cfg: crate::tls::Live<rustls::ServerConfig>,
    port: &'static str,
    metrics: Arc<Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    incoming_with(plain, cfg, port, metrics, HANDSHAKE_TIMEOUT)
}

fn incoming_with(
    mut plain: TcpIncoming,
    cfg: crate::tls::Live<rustls::ServerConfig>,
    port: &'static str,
    metrics: Arc<Metrics>,
    handshake_timeout: Duration,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let limit = Arc::new(LogLimit::default());
    tokio::spawn(async move {
        loop {
            // Waiting for a free handshake slot must not keep a stopped server's port open.
            let slot = tokio::select! {
                s = slots.clone().acquire_owned() => match s {
                    Ok(s) => s,
                    Err(_) => return,
                },
                _ = tx.closed() => return,
            };
            let next = tokio::select! {
                n = plain.next() => n,
                _ = tx.closed() => return,
            };
            let tcp = match next {
                None => return,
                Some(Ok(tcp)) => tcp,
                Some(Err(e)) => {
                    // EMFILE and friends: back off instead of spinning; the listener stays.
                    tracing::warn!(port, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            // The configuration of the moment: a reload applies from the next connection on.
            let acceptor = tokio_rustls::TlsAcceptor::from(cfg.get());
            let (tx, metrics, limit) = (tx.clone(), metrics.clone(), limit.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                let error =
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send(Ok(TlsIo(tls))).await;
                            return;
                        }
                        Ok(Err(e)) => e.to_string(),
                        Err(_) => "timed out".to_string(),
                    };
                metrics.tls_handshake_failed(port);
                if let Some(not_logged) = limit.admit(crate::metrics::now_unix_ms()) {
                    tracing::info!(port, from, error, not_logged, "TLS handshake failed");
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn failure_lines_are_limited_and_say_how_many_were_not_logged() {
        let l = LogLimit::default();
        assert_eq!(l.admit(10_000), Some(0));
        assert_eq!(l.admit(10_001), None);
        assert_eq!(l.admit(10_999), None);
        assert_eq!(l.admit(11_000), Some(2));
        assert_eq!(l.admit(11_500), None);
        assert_eq!(l.admit(20_000), Some(1));
    }

    #[tokio::test]
    async fn stalled_and_broken_handshakes_are_dropped_and_counted_and_good_ones_served() {
        let (ca, leaf, key) = crate::tls::test_ca_and_leaf();
        let d = tempfile::tempdir().expect("tempdir");
        let w = |n: &str, b: String| {
            let p = d.path().join(n);
            std::fs::write(&p, b).expect("write");
            p
        };
        let files = crate::tls::TlsFiles {
            cert_file: w("n.pem", leaf),
            key_file: w("n.key", key),
            ca_file: w("ca.pem", ca),
            client_ca_file: d.path().join("ca.pem"),
        };
        let node = crate::tls::NodeTls::load(&files, false, &[]).expect("load");

        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let plain = TcpIncoming::from_listener(l, true, None).expect("incoming");
        let metrics = Arc::new(Metrics::default());
        let mut conns = incoming_with(
            plain,
            node.client_port.clone(),
            "client",
            metrics.clone(),
            Duration::from_millis(300),
        );

        // Silent: closed by the server when the deadline passes.
        let mut silent = TcpStream::connect(addr).await.expect("connect");
        // Garbage: refused at once.
        let mut garbage = TcpStream::connect(addr).await.expect("connect");
        garbage
            .write_all(b"\x16\x03\x01\x00\x05hello")
            .await
            .expect("write");
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
            .await
            .expect("the server closes a stalled handshake")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing is sent to a client that never said hello");
        let _ = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf)).await;

        // A real client after both: its connection comes out of the stream.
        let roots = crate::tls::load_roots(&files.ca_file).expect("roots");
        let cfg = crate::tls::client_config(roots, None).expect("client config");
        let dial = tokio::spawn(async move {
            let tcp = TcpStream::connect(addr).await.expect("connect");
            let name = crate::tls::server_name("127.0.0.1").expect("name");
            tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await
                .expect("handshake")
        });
        let served = tokio::time::timeout(Duration::from_secs(5), conns.next())
            .await
            .expect("a good client is served")
            .expect("stream open")
            .expect("no error");
        let _client = dial.await.expect("client");
        assert!(served.connect_info().remote_addr().is_some());
        let text = metrics.render();
        assert!(
            text.contains("metaraft_tls_handshake_failures_total{port=\"client\"} 2"),
            "{text}"
        );
    }
}
