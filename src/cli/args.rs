//! Flag types shared by the commands: where the cluster is (`Conn`, `ClientTlsArgs`), how to
//! read (`ConsistencyArg`) and how to print (`Output`). A leaf: it imports no command module, so
//! every command imports from here and nothing imports back.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, ValueEnum};

use metaraft::client::Client;
use metaraft::config::defaults;
use metaraft::pb;

/// Which nodes to talk to, how long to wait, and TLS.
#[derive(Args, Debug, Clone)]
pub struct Conn {
    /// Client endpoints, host:port, comma separated (any node).
    #[arg(
        long,
        global = true,
        value_delimiter = ',',
        default_value = defaults::CLIENT_ENDPOINTS
    )]
    pub endpoints: Vec<String>,
    /// Per-request timeout in milliseconds.
    #[arg(long, global = true, default_value_t = defaults::CLIENT_TIMEOUT_MS)]
    pub timeout_ms: u64,
    #[command(flatten)]
    pub tls: ClientTlsArgs,
}

impl Conn {
    /// A client of these endpoints; call it inside the runtime (its channels need one).
    pub fn client(&self) -> Result<Client> {
        Ok(Client::with_tls(
            &self.endpoints,
            Duration::from_millis(self.timeout_ms),
            self.tls.config()?,
        )?)
    }
}

/// TLS towards the client port. Given a CA, connections are TLS and the nodes' certificates
/// must carry the endpoint's host name or IP address.
#[derive(Args, Debug, Clone, Default)]
pub struct ClientTlsArgs {
    /// PEM CA bundle that signed the nodes' certificates: turns TLS on.
    #[arg(long, global = true, env = "METARAFT_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for clusters that require one (tls.client_auth); needs --key-file.
    #[arg(long, global = true, env = "METARAFT_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of --cert-file.
    #[arg(long, global = true, env = "METARAFT_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
}

impl ClientTlsArgs {
    /// The rustls client configuration these flags ask for; None for plaintext.
    pub fn config(&self) -> Result<Option<std::sync::Arc<rustls::ClientConfig>>> {
        let Some(ca) = &self.ca_file else {
            if self.cert_file.is_some() {
                anyhow::bail!(
                    "--cert-file needs --ca-file (the CA that signed the nodes' certificates)"
                );
            }
            return Ok(None);
        };
        let roots = metaraft::tls::load_roots(ca)?;
        let identity = match (&self.cert_file, &self.key_file) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        Ok(Some(metaraft::tls::client_config(roots, identity)?))
    }
}

/// `--consistency` of reads.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum ConsistencyArg {
    Linearizable,
    Session,
    Stale,
    Lease,
}

impl ConsistencyArg {
    pub fn to_pb(self) -> pb::Consistency {
        match self {
            ConsistencyArg::Linearizable => pb::Consistency::Linearizable,
            ConsistencyArg::Session => pb::Consistency::Session,
            ConsistencyArg::Stale => pb::Consistency::Stale,
            ConsistencyArg::Lease => pb::Consistency::Lease,
        }
    }

    /// The read options of a request at this consistency.
    pub fn read_opts(self, min_revision: u64, max_lag: u64) -> Option<pb::ReadOptions> {
        Some(pb::ReadOptions {
            consistency: self.to_pb() as i32,
            min_revision,
            max_lag,
        })
    }
}

/// `--output`: for people or for scripts.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
pub enum Output {
    Text,
    Json,
}
