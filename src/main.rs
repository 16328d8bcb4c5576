//! The `metaraft` binary: parse the command line, hand over to `cli`, and turn an error into
//! exit code 1 with a hint when the likely cause is TLS.

mod cli;

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
            let text = format!("{e:#}");
            eprintln!("error: {text}");
            if let Some(h) = hint(&text) {
                eprintln!("hint: {h}");
            }
            std::process::ExitCode::from(1)
        }
    }
}

/// A plaintext client that reaches a TLS port sees only an HTTP/2 protocol or transport error,
/// and so, often, does a TLS client the node refuses for want of a client certificate (TLS 1.3
/// sends that refusal after the client's first write); say what is likely wrong.
fn hint(error: &str) -> Option<&'static str> {
    let given = |flag: &str, env: &str| {
        std::env::var_os(env).is_some()
            || std::env::args().any(|a| a == flag || a.starts_with(&format!("{flag}=")))
    };
    let transport = error.contains("h2 protocol error")
        || error.contains("transport error")
        || error.contains("broken pipe")
        || error.contains("connection closed")
        || error.contains("connection reset")
        || error.contains("CertificateRequired");
    if !transport {
        None
    } else if !given("--ca-file", "METARAFT_CA_FILE") {
        Some(
            "if the cluster uses TLS, pass --ca-file (and --cert-file/--key-file when it \
             requires client certificates)",
        )
    } else if !given("--cert-file", "METARAFT_CERT_FILE") {
        Some("if the cluster requires client certificates, pass --cert-file and --key-file")
    } else {
        None
    }
}
