//! The tokio runtimes commands run in. A leaf, like args.rs.

use anyhow::Result;

/// tokio's multi-threaded runtime with its default threads: for client commands.
pub fn multi_thread() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// A runtime of `threads` async threads; 1 is tokio's single-threaded scheduler.
pub fn with_threads(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    Ok(b.enable_all().build()?)
}
