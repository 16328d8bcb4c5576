//! The one dialer of every outgoing gRPC connection: client channels (CLI, bench, tests) and
//! peer channels. TCP with TCP_NODELAY, then TLS when a client configuration is given; the TLS
//! handshake runs inside the connect future, so the channel's connect timeout bounds it too.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Dials `host:port` URIs (the scheme is ignored: TLS is this dialer's choice, not the URI's).
///
/// `coalesce`: tell h2 the transport does not write vectored. h2 copies a DATA frame into its
/// write buffer only when the payload is under a threshold: 256 bytes on a transport that says it
/// writes vectored, 1,024 bytes on one that does not. Above it, the payload is chained and the
/// frame is written on its own. A put of a 256-byte value is about 300 bytes, so on a plain
/// `TcpStream` every request cost its own `writev` (and its own TCP segment, wake-up and receive
/// on the server): 1.1 syscalls per request at 64 in flight. Saying "not vectored" lets h2 pack
/// every request queued in one poll into one write. Payloads over 1,024 bytes still go out
/// unbuffered, as two writes instead of one `writev`. Client channels coalesce; peer channels,
/// whose messages are mostly batches of entries, do not.
#[derive(Clone, Default)]
pub struct Dialer {
    /// Read at each dial, so a reloaded configuration takes effect on the next connection.
    pub tls: Option<crate::tls::Live<rustls::ClientConfig>>,
    pub coalesce: bool,
}

impl std::fmt::Debug for Dialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dialer")
            .field("tls", &self.tls.is_some())
            .field("coalesce", &self.coalesce)
            .finish()
    }
}

impl tower_service::Service<http::Uri> for Dialer {
    type Response = DialedIo;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<DialedIo>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| std::io::Error::other(format!("endpoint {uri} has no host")))?;
            // IPv6 literals come bracketed in a URI and must not be for a socket address.
            let host = host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(80);
            let stream = TcpStream::connect((host.as_str(), port)).await?;
            stream.set_nodelay(true)?;
            let Some(cfg) = me.tls else {
                return Ok(DialedIo {
                    inner: Inner::Plain(TokioIo::new(stream)),
                    coalesce: me.coalesce,
                });
            };
            let name = crate::tls::server_name(&host).map_err(std::io::Error::other)?;
            let tls = tokio_rustls::TlsConnector::from(cfg.get())
                .connect(name, stream)
                .await
                .map_err(|e| {
                    std::io::Error::new(
                        e.kind(),
                        format!("TLS handshake with {host}:{port} failed: {e}"),
                    )
                })?;
            Ok(DialedIo {
                inner: Inner::Tls(Box::new(TokioIo::new(tls))),
                coalesce: me.coalesce,
            })
        })
    }
}

enum Inner {
    Plain(TokioIo<TcpStream>),
    Tls(Box<TokioIo<TlsStream<TcpStream>>>),
}

/// A dialled connection, plain or TLS (see [`Dialer`]).
pub struct DialedIo {
    inner: Inner,
    coalesce: bool,
}

impl DialedIo {
    /// The TCP socket under the connection.
    pub fn tcp(&self) -> &TcpStream {
        match &self.inner {
            Inner::Plain(s) => s.inner(),
            Inner::Tls(s) => s.inner().get_ref().0,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }
}

impl hyper::rt::Read for DialedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl hyper::rt::Write for DialedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn is_write_vectored(&self) -> bool {
        !self.coalesce
            && match &self.inner {
                Inner::Plain(s) => s.is_write_vectored(),
                Inner::Tls(s) => s.is_write_vectored(),
            }
    }
}

#[cfg(test)]
mod tests {
    use tower_service::Service;

    use super::*;

    #[tokio::test]
    async fn dialer_reaches_ipv4_and_bracketed_ipv6_hosts_and_reports_refusals() {
        let v4 = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = v4.local_addr().expect("addr").port();
        let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
        let mut d = Dialer {
            tls: None,
            coalesce: true,
        };
        let io = d.call(uri.clone()).await.expect("dial ipv4");
        assert!(!hyper::rt::Write::is_write_vectored(&io));
        assert!(!io.is_tls());
        assert!(io.tcp().nodelay().expect("nodelay"));
        let (peer, _) = v4.accept().await.expect("accept");
        assert_eq!(
            peer.peer_addr().expect("peer").port(),
            io.tcp().local_addr().expect("local").port()
        );
        let io = Dialer::default().call(uri).await.expect("dial ipv4");
        assert!(
            hyper::rt::Write::is_write_vectored(&io),
            "peer channels write vectored"
        );
        // Machines without IPv6 loopback skip this half.
        if let Ok(v6) = tokio::net::TcpListener::bind("[::1]:0").await {
            let port = v6.local_addr().expect("addr").port();
            let uri: http::Uri = format!("http://[::1]:{port}").parse().expect("uri");
            d.call(uri).await.expect("dial bracketed ipv6");
        }
        // A port nobody listens on: the dial fails with the OS's refusal, not a panic.
        drop(v4);
        let uri: http::Uri = format!("http://127.0.0.1:{port}").parse().expect("uri");
        let err = d.call(uri).await.err().expect("refused");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionRefused);
    }
}
