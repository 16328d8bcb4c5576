//! Command line: `serve`, `dev`, `kv`, `cluster`, `meta`, `rbac`, `bench`, `backup`, `restore`, `dr`.
//!
//! This module holds the top-level parser and the dispatch only. Each command lives in its own
//! module, and the flag types they share (`Conn`, `ClientTlsArgs`, `ConsistencyArg`, `Output`) in
//! `args`, which imports no command: commands import from `args` and `runtime`, this module
//! imports the commands, and nothing imports back up. A new command is a module here, a variant
//! of [`Cmd`] and one line of [`run`]; flag defaults shared with the node's configuration come
//! from `metaraft::config::defaults`.
//!
//! | module      | commands                                              |
//! |-------------|-------------------------------------------------------|
//! | `serve`     | `serve` (one node), `dev` (a local 3-node cluster)    |
//! | `kv`        | `kv put/get/delete/list`                              |
//! | `cluster`   | `cluster ...` (status, membership), `dr ...`          |
//! | `meta`      | `meta ...` (resources), `rbac ...`                    |
//! | `backup`    | `backup create/stream/verify/list`, `restore`         |
//! | `bench`     | `bench` (kv load; `bench::meta`: metadata workloads)  |

mod args;
mod backup;
mod bench;
mod cluster;
mod kv;
mod meta;
mod runtime;
mod serve;

use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};

use args::Conn;

#[derive(Parser, Debug)]
#[command(name = "metaraft", version, about = "Raft-replicated metadata service")]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Run one node.
    Serve(serve::ServeArgs),
    /// Run a local 3-node cluster on loopback until Ctrl-C (data kept for the next run).
    Dev(serve::DevArgs),
    /// Key/value operations.
    Kv {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: kv::KvCmd,
    },
    /// Cluster status and membership.
    Cluster {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: cluster::ClusterCmd,
    },
    /// Load generator: throughput and latency percentiles.
    Bench(bench::BenchArgs),
    /// Backups: create, stream (continuous), verify, list.
    Backup {
        #[command(subcommand)]
        op: backup::BackupCmd,
    },
    /// Rebuild a node's data directory from a backup, to any restorable index or time, as the
    /// first node of a new cluster lineage.
    Restore(backup::RestoreArgs),
    /// Metadata resources: create, get, list, delete, run/step status, model stages, API keys.
    Meta {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: meta::MetaCmd,
    },
    /// Roles, bindings, permission checks and `explain`.
    Rbac {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: meta::RbacCmd,
    },
    /// DR replica: status (lag, last contact, snapshots) and promotion after losing the primary.
    Dr {
        #[command(flatten)]
        conn: Conn,
        #[command(subcommand)]
        op: cluster::DrCmd,
    },
}

/// Runs the command; the exit code is the command's (errors: 1, by the caller).
pub fn run(cli: Cli) -> Result<ExitCode> {
    match cli.cmd {
        Cmd::Serve(a) => serve::serve(a),
        Cmd::Dev(a) => serve::dev(a),
        Cmd::Kv { conn, op } => kv::run(conn, op),
        Cmd::Cluster { conn, op } => cluster::run(conn, op),
        Cmd::Bench(a) => bench::run(a),
        Cmd::Backup { op } => backup::run(op),
        Cmd::Restore(a) => backup::restore(a),
        Cmd::Dr { conn, op } => cluster::run_dr(conn, op),
        Cmd::Meta { conn, op } => meta::run_meta(conn, op),
        Cmd::Rbac { conn, op } => meta::run_rbac(conn, op),
    }
}

#[cfg(test)]
mod tests {
    /// clap's own consistency checks of every subcommand and flag (names, defaults, requires).
    #[test]
    fn command_line_is_consistent() {
        <super::Cli as clap::CommandFactory>::command().debug_assert();
    }
}
