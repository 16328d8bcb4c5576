//! The `metaraft` binary: parse the command line and hand over to `cli`.

mod backup_cmd;
mod bench;
mod bench_meta;
mod cli;
mod meta_cmd;

use clap::Parser;

fn main() -> std::process::ExitCode {
    let args = cli::Cli::parse();
    match cli::run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::from(1)
        }
    }
}
