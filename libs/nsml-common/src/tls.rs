//! TLS between the platform's processes: the `[tls]` table of a deployment's (and a runner's)
//! configuration, read and checked once at start-up, then handed to every internal server
//! ([`crate::server::Port::open_tls`]) and every internal channel ([`crate::clients`]).
//!
//! A process presents one certificate, as a server and, with mutual TLS, as a client; the CA checks the
//! servers a process calls and, with mutual TLS, the clients that call it. With TLS configured the services'
//! addresses are `https://…`, so a channel made without the configuration fails to connect instead of
//! speaking clear text.

use std::path::{Path, PathBuf};

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use serde::Deserialize;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[cfg(any(test, feature = "test-certs"))]
pub mod testing;

/// The `[tls]` table: where this process's certificate, its key and the deployment's CA are. Relative paths
/// are read from the configuration file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// This process's certificate chain (PEM), the certificate first: every internal port serves it, and with
    /// `mutual` every internal call presents it.
    pub cert: PathBuf,
    /// The certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// The certificate of the CA that issues the deployment's certificates (PEM).
    pub ca: PathBuf,
    /// Mutual TLS: servers accept only callers presenting a certificate issued by `ca`.
    #[serde(default)]
    pub mutual: bool,
    /// The name servers' certificates are checked against, when it is not the host of the services'
    /// addresses (certificates issued for `nsml.internal` while services are reached by IP, say).
    pub server_name: Option<String>,
}

/// Why the `[tls]` files cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(
        "cannot read {key} {path}: {source}; point `{key}` in the [tls] table at a readable PEM file"
    )]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key} {path} holds no {what}: it needs a `-----BEGIN {label}-----` block")]
    NoPem {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
        label: &'static str,
    },
    #[error(
        "tls.key {key} does not match the certificate tls.cert {cert}: give the key the certificate was issued for"
    )]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error(
        "tls.key {path} is not a usable private key ({reason}): give an RSA, ECDSA or Ed25519 key in PEM"
    )]
    BadKey { path: PathBuf, reason: String },
    #[error(
        "tls.ca {path} is not a usable CA certificate ({reason}): give the CA's certificate in PEM"
    )]
    BadCa { path: PathBuf, reason: String },
    #[error(
        "the certificate tls.cert {cert} is not valid under the CA tls.ca {ca} ({reason}): issue it from that CA, and renew it if it expired"
    )]
    NotFromCa {
        cert: PathBuf,
        ca: PathBuf,
        reason: String,
    },
    #[error(
        "the certificate tls.cert {cert} does not name `{host}`, where {what} is reached: issue it for that name or address, or set tls.server_name to a name it holds"
    )]
    Name {
        cert: PathBuf,
        host: String,
        what: String,
    },
    #[error("tls.server_name `{0}` is not a DNS name or an IP address")]
    ServerName(String),
    #[error("the [tls] files were refused: {0}")]
    Refused(String),
}

/// The `[tls]` files, read and checked: what servers and channels are configured with.
#[derive(Clone)]
pub struct Tls {
    server: ServerTlsConfig,
    client: ClientTlsConfig,
    /// The end-entity certificate, to check the names it holds.
    cert: CertificateDer<'static>,
    cert_path: PathBuf,
    server_name: Option<String>,
    mutual: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("cert", &self.cert_path)
            .field("mutual", &self.mutual)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<_> = CertificateDer::pem_slice_iter(pem)
        .filter_map(Result::ok)
        .collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem {
            key,
            path: path.to_path_buf(),
            what: "certificate",
            label: "CERTIFICATE",
        });
    }
    Ok(certs)
}

fn provider() -> CryptoProvider {
    rustls::crypto::ring::default_provider()
}

impl TlsSection {
    /// Reads and checks the files, relative paths taken from `base` (the configuration file's directory): the
    /// key must match the certificate, and the certificate must be valid under the CA now.
    pub fn load(&self, base: Option<&Path>) -> Result<Tls, TlsError> {
        let at = |p: &Path| match base {
            Some(dir) if p.is_relative() => dir.join(p),
            _ => p.to_path_buf(),
        };
        let (cert_path, key_path, ca_path) = (at(&self.cert), at(&self.key), at(&self.ca));
        let cert_pem = read("tls.cert", &cert_path)?;
        let key_pem = read("tls.key", &key_path)?;
        let ca_pem = read("tls.ca", &ca_path)?;

        let chain = certificates("tls.cert", &cert_path, &cert_pem)?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoPem {
            key: "tls.key",
            path: key_path.clone(),
            what: "private key",
            label: "PRIVATE KEY",
        })?;
        let provider = provider();
        rustls::sign::CertifiedKey::from_der(chain.clone(), key, &provider).map_err(
            |e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => {
                    TlsError::KeyMismatch {
                        key: key_path.clone(),
                        cert: cert_path.clone(),
                    }
                }
                other => TlsError::BadKey {
                    path: key_path.clone(),
                    reason: other.to_string(),
                },
            },
        )?;

        let mut roots = RootCertStore::empty();
        for ca in certificates("tls.ca", &ca_path, &ca_pem)? {
            roots.add(ca).map_err(|e| TlsError::BadCa {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
        }
        let not_from_ca = |reason: String| TlsError::NotFromCa {
            cert: cert_path.clone(),
            ca: ca_path.clone(),
            reason,
        };
        let end_entity =
            ParsedCertificate::try_from(&chain[0]).map_err(|e| not_from_ca(e.to_string()))?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &end_entity,
            &roots,
            &chain[1..],
            UnixTime::now(),
            provider.signature_verification_algorithms.all,
        )
        .map_err(|e| not_from_ca(e.to_string()))?;
        if let Some(name) = &self.server_name {
            ServerName::try_from(name.as_str()).map_err(|_| TlsError::ServerName(name.clone()))?;
        }

        let identity = Identity::from_pem(&cert_pem, &key_pem);
        let ca = Certificate::from_pem(&ca_pem);
        let mut server = ServerTlsConfig::new().identity(identity.clone());
        let mut client = ClientTlsConfig::new().ca_certificate(ca.clone());
        if self.mutual {
            server = server.client_ca_root(ca);
            client = client.identity(identity);
        }
        if let Some(name) = &self.server_name {
            client = client.domain_name(name.clone());
        }
        // Whatever else tonic would refuse is refused now, naming the configuration, not at the first call.
        tonic::transport::Server::builder()
            .tls_config(server.clone())
            .map_err(|e| TlsError::Refused(e.to_string()))?;
        tonic::transport::Endpoint::from_static("https://127.0.0.1")
            .tls_config(client.clone())
            .map_err(|e| TlsError::Refused(e.to_string()))?;
        Ok(Tls {
            server,
            client,
            cert: chain[0].clone(),
            cert_path,
            server_name: self.server_name.clone(),
            mutual: self.mutual,
        })
    }
}

impl Tls {
    /// How internal servers accept connections.
    pub fn server_config(&self) -> ServerTlsConfig {
        self.server.clone()
    }

    /// How internal channels connect.
    pub fn client_config(&self) -> ClientTlsConfig {
        self.client.clone()
    }

    /// Whether servers require a client certificate.
    pub fn mutual(&self) -> bool {
        self.mutual
    }

    /// Checks that this certificate names `host`, where `what` (a service) is reached, so that callers will
    /// accept it; with `tls.server_name` set, callers check that name instead.
    pub fn check_serves(&self, host: &str, what: &str) -> Result<(), TlsError> {
        let host = self.server_name.as_deref().unwrap_or(host);
        let name_error = || TlsError::Name {
            cert: self.cert_path.clone(),
            host: host.to_string(),
            what: what.to_string(),
        };
        let name = ServerName::try_from(host).map_err(|_| name_error())?;
        let cert = ParsedCertificate::try_from(&self.cert).map_err(|_| name_error())?;
        rustls::client::verify_server_name(&cert, &name).map_err(|_| name_error())
    }
}

/// The URL scheme of internal addresses: `https` with TLS, else `http`.
pub fn scheme(tls: Option<&Tls>) -> &'static str {
    if tls.is_some() { "https" } else { "http" }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails by panicking

    use super::testing::TestCa;
    use super::*;

    fn section(dir: &Path) -> TlsSection {
        TlsSection {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            ca: dir.join("ca.pem"),
            mutual: true,
            server_name: None,
        }
    }

    #[test]
    fn a_certificate_issued_by_the_ca_loads_and_names_its_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("nsml test CA").unwrap();
        ca.write(dir.path(), &["127.0.0.1", "localhost"]).unwrap();
        let tls = section(dir.path()).load(None).unwrap();
        assert!(tls.mutual());
        tls.check_serves("127.0.0.1", "the auth service").unwrap();
        tls.check_serves("localhost", "the auth service").unwrap();
        let err = tls
            .check_serves("10.1.2.3", "the auth service")
            .unwrap_err()
            .to_string();
        assert!(err.contains("does not name `10.1.2.3`"), "{err}");
        assert!(err.contains("tls.server_name"), "{err}");
    }

    #[test]
    fn relative_paths_are_read_from_the_configuration_directory() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["127.0.0.1"])
            .unwrap();
        let rel = TlsSection {
            cert: "cert.pem".into(),
            key: "key.pem".into(),
            ca: "ca.pem".into(),
            mutual: false,
            server_name: None,
        };
        rel.load(Some(dir.path())).unwrap();
        let err = rel.load(Some(Path::new("/nonexistent"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn a_missing_file_is_named_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["127.0.0.1"])
            .unwrap();
        for (file, key) in [
            ("cert.pem", "tls.cert"),
            ("key.pem", "tls.key"),
            ("ca.pem", "tls.ca"),
        ] {
            let mut s = section(dir.path());
            let missing = dir.path().join(format!("missing-{file}"));
            match file {
                "cert.pem" => s.cert = missing.clone(),
                "key.pem" => s.key = missing.clone(),
                _ => s.ca = missing.clone(),
            }
            let err = s.load(None).unwrap_err().to_string();
            assert!(err.contains(key), "{err}");
            assert!(err.contains(&missing.display().to_string()), "{err}");
            assert!(err.contains("point `"), "{err}");
        }
    }

    #[test]
    fn a_key_of_another_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let ca = TestCa::new("nsml test CA").unwrap();
        ca.write(dir.path(), &["127.0.0.1"]).unwrap();
        ca.write(other.path(), &["127.0.0.1"]).unwrap();
        let mut s = section(dir.path());
        s.key = other.path().join("key.pem");
        let err = s.load(None).unwrap_err();
        assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn a_ca_file_without_a_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["127.0.0.1"])
            .unwrap();
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let err = section(dir.path()).load(None).unwrap_err();
        assert!(
            matches!(err, TlsError::NoPem { key: "tls.ca", .. }),
            "{err}"
        );
        assert!(err.to_string().contains("BEGIN CERTIFICATE"), "{err}");
    }

    #[test]
    fn a_certificate_from_another_ca_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["127.0.0.1"])
            .unwrap();
        TestCa::new("another CA")
            .unwrap()
            .write(other.path(), &["127.0.0.1"])
            .unwrap();
        let mut s = section(dir.path());
        s.ca = other.path().join("ca.pem");
        let err = s.load(None).unwrap_err();
        assert!(matches!(err, TlsError::NotFromCa { .. }), "{err}");
    }

    #[test]
    fn a_file_without_a_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        TestCa::new("nsml test CA")
            .unwrap()
            .write(dir.path(), &["127.0.0.1"])
            .unwrap();
        std::fs::write(dir.path().join("key.pem"), "not a key\n").unwrap();
        let err = section(dir.path()).load(None).unwrap_err();
        assert!(
            matches!(err, TlsError::NoPem { key: "tls.key", .. }),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_in_the_table_are_refused() {
        let err = serde_json::from_str::<TlsSection>(
            r#"{"cert": "c", "key": "k", "ca": "a", "mutal": true}"#,
        )
        .unwrap_err();
        assert!(err.to_string().contains("mutal"), "{err}");
    }
}
