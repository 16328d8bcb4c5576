//! `metaraft kv put|get|delete|list`.

use std::process::ExitCode;

use anyhow::Result;
use clap::Subcommand;

use metaraft::pb;

use super::args::{Conn, ConsistencyArg};
use super::runtime;

#[derive(Subcommand, Debug)]
pub enum KvCmd {
    /// Write a value; prints the revision.
    Put {
        key: String,
        value: String,
        /// Compare-and-set: only if the key is at this revision (0 = must not exist).
        #[arg(long)]
        expected_revision: Option<u64>,
        /// Idempotency key (generated when absent).
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Print a value.
    Get {
        key: String,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
        #[arg(long, default_value_t = 0)]
        min_revision: u64,
        #[arg(long, default_value_t = 0)]
        max_lag: u64,
    },
    /// Delete a key; prints the revision.
    Delete {
        key: String,
        #[arg(long)]
        expected_revision: Option<u64>,
    },
    /// List keys with a prefix, one page.
    List {
        #[arg(default_value = "")]
        prefix: String,
        #[arg(long, default_value_t = 100)]
        limit: u32,
        #[arg(long, default_value = "")]
        start_after: String,
        #[arg(long, value_enum, default_value = "linearizable")]
        consistency: ConsistencyArg,
    },
}

/// Runs one key/value command.
pub fn run(conn: Conn, op: KvCmd) -> Result<ExitCode> {
    runtime::multi_thread()?.block_on(kv(conn, op))
}

async fn kv(conn: Conn, op: KvCmd) -> Result<ExitCode> {
    let c = conn.client()?;
    match op {
        KvCmd::Put {
            key,
            value,
            expected_revision,
            request_id,
        } => {
            let r = c
                .put(pb::PutRequest {
                    key: key.into_bytes(),
                    value: value.into_bytes(),
                    expected_revision,
                    request_id,
                })
                .await?;
            println!("revision {}", r.revision);
        }
        KvCmd::Get {
            key,
            consistency,
            min_revision,
            max_lag,
        } => {
            let r = c
                .get(pb::GetRequest {
                    key: key.into_bytes(),
                    read: consistency.read_opts(min_revision, max_lag),
                })
                .await?;
            match r.kv {
                Some(kv) => println!("{}", String::from_utf8_lossy(&kv.value)),
                None => {
                    eprintln!("not found (applied index {})", r.applied_index);
                    return Ok(ExitCode::from(2));
                }
            }
        }
        KvCmd::Delete {
            key,
            expected_revision,
        } => {
            let r = c
                .delete(pb::DeleteRequest {
                    key: key.into_bytes(),
                    expected_revision,
                    request_id: String::new(),
                })
                .await?;
            println!("revision {} deleted {}", r.revision, r.deleted);
        }
        KvCmd::List {
            prefix,
            limit,
            start_after,
            consistency,
        } => {
            let r = c
                .range(pb::RangeRequest {
                    prefix: prefix.into_bytes(),
                    start_after: start_after.into_bytes(),
                    limit,
                    read: consistency.read_opts(0, 0),
                    keys_only: false,
                })
                .await?;
            for kv in &r.kvs {
                println!(
                    "{}\t{}\trev={}",
                    String::from_utf8_lossy(&kv.key),
                    String::from_utf8_lossy(&kv.value),
                    kv.mod_revision
                );
            }
            if r.more {
                if let Some(last) = r.kvs.last() {
                    eprintln!(
                        "(more: --start-after {})",
                        String::from_utf8_lossy(&last.key)
                    );
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
