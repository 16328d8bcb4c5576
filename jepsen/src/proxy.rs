//! A TCP proxy that delays every byte by an adjustable time: real network delay for the `delay`
//! fault on a kernel without netem. One runs in each node's namespace in front of its peer port;
//! the delay is read from a file (milliseconds; missing or unreadable = 0) every 100 ms.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

pub async fn run(listen: String, to: String, delay_file: PathBuf) -> Result<()> {
    let delay = Arc::new(AtomicU64::new(0));
    {
        let delay = delay.clone();
        tokio::spawn(async move {
            loop {
                let ms = std::fs::read_to_string(&delay_file)
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .unwrap_or(0);
                delay.store(ms, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    let l = TcpListener::bind(&listen)
        .await
        .with_context(|| format!("proxy cannot listen on {listen}"))?;
    loop {
        let (inbound, _) = l.accept().await?;
        let (to, delay) = (to.clone(), delay.clone());
        tokio::spawn(async move {
            let Ok(outbound) = TcpStream::connect(&to).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (ri, wi) = inbound.into_split();
            let (ro, wo) = outbound.into_split();
            tokio::spawn(pump(ri, wo, delay.clone()));
            tokio::spawn(pump(ro, wi, delay));
        });
    }
}

/// Copies one direction, holding each chunk until its due time (order preserved).
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    delay: Arc<AtomicU64>,
) {
    let (tx, mut rx) = mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        while let Some((due, data)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if w.write_all(&data).await.is_err() {
                return;
            }
        }
        let _ = w.shutdown().await;
    });
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let due = Instant::now() + Duration::from_millis(delay.load(Ordering::Relaxed));
                if tx.send((due, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        }
    }
    drop(tx);
    let _ = writer.await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn delays_and_forwards_in_order() {
        let echo = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let echo_addr = echo.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = echo.accept().await.unwrap();
            let mut b = [0u8; 1024];
            loop {
                let n = s.read(&mut b).await.unwrap();
                if n == 0 {
                    return;
                }
                s.write_all(&b[..n]).await.unwrap();
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("delay");
        std::fs::write(&f, "150").unwrap();
        let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let listen = probe.local_addr().unwrap().to_string();
        drop(probe);
        tokio::spawn(run(listen.clone(), echo_addr, f.clone()));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut c = TcpStream::connect(&listen).await.unwrap();
        let t = std::time::Instant::now();
        c.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        // Delayed on the way in and on the way back.
        assert!(
            t.elapsed() >= Duration::from_millis(300),
            "{:?}",
            t.elapsed()
        );
        std::fs::write(&f, "0").unwrap();
        tokio::time::sleep(Duration::from_millis(250)).await;
        let t = std::time::Instant::now();
        c.write_all(b"again").await.unwrap();
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"again");
        assert!(
            t.elapsed() < Duration::from_millis(100),
            "{:?}",
            t.elapsed()
        );
    }
}
