//! TLS material: PEM files in, rustls configurations out. No sockets here: the listeners and
//! the dialer that use these configurations live in `net::tls` and `net::dial`.
//!
//! - Client port: TLS with this node's certificate; client certificates are verified against
//!   the client CA (`tls.client_ca_file`, else `tls.ca_file`) when `tls.client_auth` is set
//!   (and then required).
//! - Peer port: mutual TLS. Every node presents its certificate on both ends of a peer
//!   connection, and each end verifies the other against the CA. A peer is checked against the
//!   host part of the address it is dialled at (a DNS name or an IP address in the certificate's
//!   subject alternative names). With `tls.peer_names`, a peer's certificate must also be
//!   valid for one of those names, on both ends: a connecting peer's, and the one of every
//!   member or learner this node dials. So a CA that signs other services' certificates too
//!   neither makes those services members nor lets a membership change point replication at
//!   them.
//!
//! ring is the one crypto provider, passed explicitly: nothing depends on a process-wide default.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig,
    SignatureScheme,
};

/// What HTTP/2 over TLS is called in ALPN.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {reason}")]
    Read {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("{what} {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("CA file {path}: no usable CA certificate ({reason})")]
    BadCa { path: PathBuf, reason: String },
    #[error("{0}")]
    Config(String),
    #[error("{host:?} cannot be checked against a certificate (not a DNS name or IP address)")]
    ServerName { host: String },
}

/// The PEM files of a node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// Verifies peers.
    pub ca_file: PathBuf,
    /// Verifies client certificates on the client port (the same file as `ca_file` unless
    /// clients have a CA of their own).
    pub client_ca_file: PathBuf,
}

fn read_err(what: &'static str, path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError {
    let path = path.to_path_buf();
    move |e| TlsError::Read {
        what,
        path: path.clone(),
        reason: e.to_string(),
    }
}

/// Every certificate in a PEM file, in order (a chain: leaf first).
pub fn load_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(read_err(what, path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(read_err(what, path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.into(),
        });
    }
    Ok(certs)
}

/// The first private key in a PEM file (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(read_err("key file", path))
}

/// The CA certificates of a PEM bundle as trust roots; refuses a bundle with none usable.
pub fn load_roots(path: &Path) -> Result<Arc<RootCertStore>, TlsError> {
    let mut roots = RootCertStore::empty();
    for c in load_certs("CA file", path)? {
        roots.add(c).map_err(|e| TlsError::BadCa {
            path: path.into(),
            reason: e.to_string(),
        })?;
    }
    Ok(Arc::new(roots))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn config_err(e: impl std::fmt::Display) -> TlsError {
    TlsError::Config(e.to_string())
}

/// Accepts a client certificate when `inner` does and it is also valid for one of `names`, as
/// a TLS client checks a server's certificate against the name it dialled (subject alternative
/// names, DNS or IP address; a wildcard certificate counts).
#[derive(Debug)]
struct AllowedNames {
    inner: Arc<dyn ClientCertVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for AllowedNames {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)?;
        valid_for_one_of(end_entity, &self.names)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// Whether `cert` is valid for one of `names` (subject alternative names, DNS or IP address; a
/// wildcard certificate counts).
fn valid_for_one_of(
    cert: &CertificateDer<'_>,
    names: &[ServerName<'static>],
) -> Result<(), rustls::Error> {
    let cert = ParsedCertificate::try_from(cert)?;
    if names
        .iter()
        .any(|n| rustls::client::verify_server_name(&cert, n).is_ok())
    {
        Ok(())
    } else {
        Err(rustls::Error::InvalidCertificate(
            rustls::CertificateError::NotValidForName,
        ))
    }
}

/// Accepts the certificate of a dialled member when `inner` does (the CA, the name it was
/// dialled at) and it is also valid for one of `names`: the dialling side of `tls.peer_names`.
#[derive(Debug)]
struct AllowedServerNames {
    inner: Arc<WebPkiServerVerifier>,
    names: Vec<ServerName<'static>>,
}

impl ServerCertVerifier for AllowedServerNames {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified = self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        )?;
        valid_for_one_of(end_entity, &self.names)?;
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The names of `tls.peer_names`, each a DNS name or an IP address.
pub fn peer_names(names: &[String]) -> Result<Vec<ServerName<'static>>, TlsError> {
    names.iter().map(|n| server_name(n)).collect()
}

/// A server configuration for a node's listener. `client_ca`: verify client certificates
/// against these roots and refuse connections without one; `None`: no client certificates.
/// `allowed`: when not empty, a client certificate must also be valid for one of these names.
pub fn server_config(
    files: &TlsFiles,
    client_ca: Option<Arc<RootCertStore>>,
    allowed: &[ServerName<'static>],
) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = load_certs("certificate file", &files.cert_file)?;
    let key = load_key(&files.key_file)?;
    let builder = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(roots) => {
            let webpki = WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .map_err(config_err)?;
            let verifier: Arc<dyn ClientCertVerifier> = if allowed.is_empty() {
                webpki
            } else {
                Arc::new(AllowedNames {
                    inner: webpki,
                    names: allowed.to_vec(),
                })
            };
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder.with_single_cert(certs, key).map_err(|e| {
        TlsError::Config(format!(
            "{} and {} do not make a usable identity: {e}",
            files.cert_file.display(),
            files.key_file.display()
        ))
    })?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration that trusts `roots` and, with `identity` (certificate file, key
/// file), presents that certificate.
pub fn client_config(
    roots: Arc<RootCertStore>,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    dialer_config(roots, identity, &[])
}

/// [`client_config`] whose servers' certificates must also be valid for one of `allowed`
/// (when not empty): the peer dialer with `tls.peer_names`.
fn dialer_config(
    roots: Arc<RootCertStore>,
    identity: Option<(&Path, &Path)>,
    allowed: &[ServerName<'static>],
) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(config_err)?;
    let builder = if allowed.is_empty() {
        builder.with_root_certificates(roots)
    } else {
        let inner = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(config_err)?;
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AllowedServerNames {
                inner,
                names: allowed.to_vec(),
            }))
    };
    let mut cfg = match identity {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(load_certs("certificate file", cert)?, load_key(key)?)
            .map_err(|e| {
                TlsError::Config(format!(
                    "{} and {} do not make a usable identity: {e}",
                    cert.display(),
                    key.display()
                ))
            })?,
    };
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// A configuration that can be replaced while it is in use: each new connection takes the
/// current one; connections already open keep theirs.
pub struct Live<T>(Arc<std::sync::RwLock<Arc<T>>>);

impl<T> Clone for Live<T> {
    fn clone(&self) -> Self {
        Live(self.0.clone())
    }
}

impl<T> Live<T> {
    pub fn new(v: Arc<T>) -> Live<T> {
        Live(Arc::new(std::sync::RwLock::new(v)))
    }

    pub fn get(&self) -> Arc<T> {
        // A writer only swaps an Arc: no half-done state for a panic to leave behind.
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, v: Arc<T>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

/// The TLS configurations of one node: its two listeners and its peer dialer, reloadable.
#[derive(Clone)]
pub struct NodeTls {
    pub client_port: Live<ServerConfig>,
    pub peer_port: Live<ServerConfig>,
    pub peer_dialer: Live<ClientConfig>,
    files: TlsFiles,
    client_auth: bool,
    peer_names: Vec<ServerName<'static>>,
}

type Configs = (Arc<ServerConfig>, Arc<ServerConfig>, Arc<ClientConfig>);

fn build(
    files: &TlsFiles,
    client_auth: bool,
    peer_names: &[ServerName<'static>],
) -> Result<Configs, TlsError> {
    let roots = load_roots(&files.ca_file)?;
    let client_roots = match client_auth {
        false => None,
        true if files.client_ca_file == files.ca_file => Some(roots.clone()),
        true => Some(load_roots(&files.client_ca_file)?),
    };
    Ok((
        server_config(files, client_roots, &[])?,
        server_config(files, Some(roots.clone()), peer_names)?,
        dialer_config(roots, Some((&files.cert_file, &files.key_file)), peer_names)?,
    ))
}

impl NodeTls {
    /// Loads and checks every file once, so a bad file stops the node before it binds anything.
    /// `peer_names` (`tls.peer_names`): when not empty, the peer port accepts, and the peer
    /// dialer trusts, only certificates valid for one of them.
    pub fn load(
        files: &TlsFiles,
        client_auth: bool,
        peer_names: &[String],
    ) -> Result<NodeTls, TlsError> {
        let peer_names = self::peer_names(peer_names)?;
        let (client_port, peer_port, peer_dialer) = build(files, client_auth, &peer_names)?;
        Ok(NodeTls {
            client_port: Live::new(client_port),
            peer_port: Live::new(peer_port),
            peer_dialer: Live::new(peer_dialer),
            files: files.clone(),
            client_auth,
            peer_names,
        })
    }

    /// Reads every file again; when all of them load, new connections (accepted and dialled)
    /// use them. On any error nothing changes and the previous certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let (client_port, peer_port, peer_dialer) =
            build(&self.files, self.client_auth, &self.peer_names)?;
        self.client_port.set(client_port);
        self.peer_port.set(peer_port);
        self.peer_dialer.set(peer_dialer);
        Ok(())
    }
}

/// The name a dialled host's certificate must carry: an IP address or a DNS name.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|_| TlsError::ServerName {
        host: host.to_string(),
    })
}

/// A CA and a leaf for 127.0.0.1 it signed, as PEM (CA, leaf, leaf key): test material.
#[cfg(test)]
pub(crate) fn test_ca_and_leaf() -> (String, String, String) {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("ca");
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])
        .expect("params")
        .signed_by(&key, &ca_cert, &ca_key)
        .expect("leaf");
    (ca_cert.pem(), leaf.pem(), key.serialize_pem())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).expect("write");
        p
    }

    #[test]
    fn a_node_loads_good_files_and_names_the_bad_one() {
        let d = tempfile::tempdir().expect("tempdir");
        let (ca, cert, key) = test_ca_and_leaf();
        let ca_file = write(d.path(), "ca.pem", &ca);
        let files = TlsFiles {
            cert_file: write(d.path(), "node.pem", &cert),
            key_file: write(d.path(), "node.key", &key),
            client_ca_file: ca_file.clone(),
            ca_file,
        };
        let node = NodeTls::load(&files, true, &[]).expect("good files load");
        // A reload that fails changes nothing; one that succeeds swaps every configuration.
        let before = node.client_port.get();
        std::fs::write(&files.cert_file, "garbage\n").expect("write");
        assert!(node.reload().is_err());
        assert!(Arc::ptr_eq(&before, &node.client_port.get()));
        std::fs::write(&files.cert_file, &cert).expect("write");
        node.reload().expect("reload");
        assert!(!Arc::ptr_eq(&before, &node.client_port.get()));

        let missing = TlsFiles {
            ca_file: d.path().join("nope.pem"),
            ..files.clone()
        };
        let e = NodeTls::load(&missing, false, &[])
            .err()
            .expect("missing CA");
        assert!(e.to_string().contains("nope.pem"), "{e}");
        // A client CA of its own is read only when client certificates are asked for.
        let clients = TlsFiles {
            client_ca_file: d.path().join("no-clients.pem"),
            ..files.clone()
        };
        NodeTls::load(&clients, false, &[]).expect("client CA unused");
        let e = NodeTls::load(&clients, true, &[])
            .err()
            .expect("missing client CA");
        assert!(e.to_string().contains("no-clients.pem"), "{e}");

        let garbage = write(d.path(), "garbage.pem", "not a certificate\n");
        let e = NodeTls::load(
            &TlsFiles {
                cert_file: garbage.clone(),
                ..files.clone()
            },
            false,
            &[],
        )
        .err()
        .expect("garbage certificate");
        assert!(e.to_string().contains("garbage.pem"), "{e}");
        assert!(e.to_string().contains("no PEM certificate"), "{e}");

        let e = NodeTls::load(
            &TlsFiles {
                key_file: garbage.clone(),
                ..files.clone()
            },
            false,
            &[],
        )
        .err()
        .expect("garbage key");
        assert!(e.to_string().contains("garbage.pem"), "{e}");

        // A key that is not the certificate's: refused at load, not at the first handshake.
        let (_, _, other_key) = test_ca_and_leaf();
        let e = NodeTls::load(
            &TlsFiles {
                key_file: write(d.path(), "other.key", &other_key),
                ..files.clone()
            },
            false,
            &[],
        )
        .err()
        .expect("mismatched key");
        assert!(e.to_string().contains("usable identity"), "{e}");

        // A truncated PEM block is an error too, not an empty list.
        let cut = &cert[..cert.len() / 2];
        let e = load_certs("certificate file", &write(d.path(), "cut.pem", cut))
            .expect_err("truncated");
        assert!(e.to_string().contains("cut.pem"), "{e}");
    }

    /// A CA, and a certificate it signed for `names` (DER).
    fn ca_and_leaf_for(names: &[&str]) -> (Arc<RootCertStore>, CertificateDer<'static>) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let key = rcgen::KeyPair::generate().expect("key");
        let leaf =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .expect("params")
                .signed_by(&key, &ca_cert, &ca_key)
                .expect("leaf");
        let mut roots = RootCertStore::empty();
        roots.add(ca_cert.der().clone()).expect("root");
        (Arc::new(roots), leaf.der().clone())
    }

    fn verifier(roots: Arc<RootCertStore>, names: &[&str]) -> AllowedNames {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        AllowedNames {
            inner: WebPkiClientVerifier::builder_with_provider(roots, provider())
                .build()
                .expect("verifier"),
            names: peer_names(&names).expect("names"),
        }
    }

    #[test]
    fn peer_names_admit_only_certificates_valid_for_one_of_them() {
        let now = UnixTime::now();
        let (roots, member) = ca_and_leaf_for(&["metaraft-1.metaraft.ns.svc", "10.0.0.7"]);
        let v = verifier(
            roots.clone(),
            &["metaraft-0.metaraft.ns.svc", "metaraft-1.metaraft.ns.svc"],
        );
        v.verify_client_cert(&member, &[], now)
            .expect("a member by DNS name");
        let v = verifier(roots.clone(), &["10.0.0.7"]);
        v.verify_client_cert(&member, &[], now)
            .expect("a member by IP address");

        // Signed by the same CA but for another service: refused, and the error says why.
        let v = verifier(roots, &["metaraft-0.metaraft.ns.svc", "10.0.0.8"]);
        let e = v
            .verify_client_cert(&member, &[], now)
            .expect_err("a certificate for other names");
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        );

        // A wildcard certificate is valid for the names under it, and only those.
        let (roots, wildcard) = ca_and_leaf_for(&["*.metaraft.ns.svc"]);
        verifier(roots.clone(), &["metaraft-2.metaraft.ns.svc"])
            .verify_client_cert(&wildcard, &[], now)
            .expect("under the wildcard");
        assert!(verifier(roots, &["metaraft.ns.svc", "a.b.metaraft.ns.svc"])
            .verify_client_cert(&wildcard, &[], now)
            .is_err());

        // The CA is still checked first: the right name from another CA is refused.
        let (other_roots, _) = ca_and_leaf_for(&["x"]);
        let e = verifier(other_roots, &["metaraft-1.metaraft.ns.svc"])
            .verify_client_cert(&member, &[], now)
            .expect_err("another CA");
        assert_ne!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        );
    }

    #[test]
    fn the_peer_dialer_trusts_only_members_named_in_peer_names() {
        let now = UnixTime::now();
        let (roots, member) = ca_and_leaf_for(&["metaraft-1.metaraft.ns.svc", "10.0.0.7"]);
        let (_, other) = ca_and_leaf_for(&["x"]);
        let dialer = |names: &[&str]| {
            let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
            AllowedServerNames {
                inner: WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
                    .build()
                    .expect("verifier"),
                names: peer_names(&names).expect("names"),
            }
        };
        let at = server_name("10.0.0.7").expect("name");
        dialer(&["metaraft-0.metaraft.ns.svc", "metaraft-1.metaraft.ns.svc"])
            .verify_server_cert(&member, &[], &at, &[], now)
            .expect("a member dialled at an address its certificate carries");
        // Signed by the CA and valid for the address dialled, but named for something else: a
        // learner added at that address is not trusted.
        let e = dialer(&["metaraft-0.metaraft.ns.svc"])
            .verify_server_cert(&member, &[], &at, &[], now)
            .expect_err("not a member name");
        assert_eq!(
            e,
            rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName)
        );
        // The dialled name is still checked, and the CA: another CA's certificate is refused.
        let wrong = server_name("10.0.0.8").expect("name");
        assert!(dialer(&["metaraft-1.metaraft.ns.svc"])
            .verify_server_cert(&member, &[], &wrong, &[], now)
            .is_err());
        assert!(dialer(&["x"])
            .verify_server_cert(&other, &[], &server_name("x").expect("name"), &[], now)
            .is_err());
    }

    #[test]
    fn server_names_accept_ips_and_dns_names_only() {
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("node-1.metaraft.svc").is_ok());
        assert!(server_name("bad host").is_err());
    }
}
