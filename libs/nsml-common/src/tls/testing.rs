//! Certificates made when a test runs (feature `test-certs`): a CA of its own, and certificates it issues
//! for the names a test's servers are reached at, usable both as server and as client certificates.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

use super::TlsSection;

/// A certificate authority made for one test.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA's certificate (PEM).
    pub cert_pem: String,
}

/// A certificate the CA issued, with its key (PEM).
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TestCa {
    /// Makes a CA named `name`.
    pub fn new(name: &str) -> Result<Self, rcgen::Error> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            issuer: Issuer::new(params, key),
            cert_pem: cert.pem(),
        })
    }

    /// Issues a certificate for `names` (DNS names or IP addresses), for servers and clients alike.
    pub fn issue(&self, names: &[&str]) -> Result<Issued, rcgen::Error> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names)?;
        params
            .distinguished_name
            .push(DnType::CommonName, "nsml test process");
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Writes `ca.pem`, and `cert.pem` and `key.pem` issued for `names`, into `dir`; returns the `[tls]` table
    /// naming them (mutual TLS on).
    pub fn write(&self, dir: &Path, names: &[&str]) -> std::io::Result<TlsSection> {
        let issued = self.issue(names).map_err(std::io::Error::other)?;
        let path = |f: &str| -> PathBuf { dir.join(f) };
        std::fs::write(path("ca.pem"), &self.cert_pem)?;
        std::fs::write(path("cert.pem"), &issued.cert_pem)?;
        std::fs::write(path("key.pem"), &issued.key_pem)?;
        Ok(TlsSection {
            cert: path("cert.pem"),
            key: path("key.pem"),
            ca: path("ca.pem"),
            mutual: true,
            server_name: None,
        })
    }
}
