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
    mut plain: TcpIncoming,
    cfg: Arc<rustls::ServerConfig>,
    port: &'static str,
    metrics: Arc<Metrics>,
) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<TlsIo>> {
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
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
            let (acceptor, tx, metrics) = (acceptor.clone(), tx.clone(), metrics.clone());
            tokio::spawn(async move {
                let _slot = slot;
                let from = tcp.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(TlsIo(tls))).await;
                    }
                    Ok(Err(e)) => {
                        metrics.tls_handshake_failed(port);
                        tracing::info!(port, from, error = %e, "TLS handshake failed");
                    }
                    Err(_) => {
                        metrics.tls_handshake_failed(port);
                        tracing::info!(port, from, "TLS handshake timed out");
                    }
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
