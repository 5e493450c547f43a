//! A test certificate authority, made fresh in each test (`rcgen`), and server certificates it
//! signs, written as the PEM files `dockside serve --tls-cert/--tls-key` reads.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};

/// Names every test server certificate carries: the loopback address the test servers listen
/// on, `localhost`, and `dockside.test`, a name that does not look like loopback to docker.
pub const SERVER_NAMES: [&str; 3] = ["127.0.0.1", "localhost", "dockside.test"];

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl TestCa {
    /// A new self-signed CA called `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("a CA key");
        let cert = params.self_signed(&key).expect("a self-signed CA");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// The CA certificate, PEM.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// Writes the CA certificate to `path` (for clients that read a file).
    pub fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).expect("write the CA certificate");
        path.to_owned()
    }

    /// A server certificate for [`SERVER_NAMES`], signed by this CA: (certificate PEM, key PEM).
    pub fn issue(&self) -> (String, String) {
        let names: Vec<String> = SERVER_NAMES.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("server parameters");
        params
            .distinguished_name
            .push(DnType::CommonName, "dockside test server");
        let key = KeyPair::generate().expect("a server key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        (cert.pem(), key.serialize_pem())
    }

    /// Writes a fresh server certificate and key into `dir` (`server.crt`, `server.key`),
    /// replacing what is there (each by a rename, as certificate tools do); returns the paths.
    pub fn issue_into(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue();
        let (c, k) = (dir.join("server.crt"), dir.join("server.key"));
        for (path, text) in [(&k, key), (&c, cert)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).expect("write a PEM file");
            std::fs::rename(&tmp, path).expect("rename a PEM file into place");
        }
        (c, k)
    }

    /// A reqwest client that trusts only this CA (no system roots); `http1_only` to refuse
    /// HTTP/2.
    pub fn client(&self, http1_only: bool) -> reqwest::Client {
        let cert = reqwest::Certificate::from_pem(self.pem.as_bytes()).expect("the CA as PEM");
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .tls_certs_only([cert])
            .timeout(std::time::Duration::from_secs(120));
        if http1_only {
            b = b.http1_only();
        }
        b.build().expect("a TLS client")
    }
}
