//! The `metaraft` binary: parse the command line and hand over to `cli`.

mod backup_cmd;
mod bench;
mod bench_meta;
mod cli;
mod meta_cmd;

use clap::Parser;

/// mimalloc instead of glibc malloc: the request path allocates small buffers on every thread,
/// where glibc's arenas and consolidation cost a tenth of the CPU (see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
