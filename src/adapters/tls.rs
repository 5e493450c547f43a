//! TLS for the native server (rustls with the aws-lc-rs provider, as the outbound client):
//! a certificate chain and key from PEM files, HTTP/2 or HTTP/1.1 offered by ALPN, and the pair
//! loaded again, without a restart, when either file changes (checked every
//! [`RELOAD_CHECK`]) or on SIGHUP. Connections open keep the certificate they started with; new
//! ones get the new pair. A pair that cannot be used is an error at start; on a reload, the old
//! pair stays and the failure is logged (a renewal tool may write the certificate before the
//! key: the next check, once both are written, succeeds).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio_rustls::TlsAcceptor;

/// How often the certificate files are checked for changes.
pub const RELOAD_CHECK: Duration = Duration::from_secs(2);

/// ALPN protocols offered, in the server's order of preference.
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The certificate and key files, and the pair loaded from them.
pub struct Tls {
    cert: PathBuf,
    key: PathBuf,
    current: Arc<Current>,
    acceptor: TlsAcceptor,
    /// What the files looked like when last loaded (or last failed to load, so that a broken
    /// pair is reported once, not at every check).
    seen: Mutex<Option<Stamp>>,
}

/// Modification time and length of both files.
type Stamp = [(Option<SystemTime>, u64); 2];

#[derive(Debug)]
struct Current(RwLock<Arc<CertifiedKey>>);

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

impl Tls {
    /// Loads the pair; an error says which file and what is wrong with it.
    pub fn load(cert: &Path, key: &Path) -> Result<Tls, String> {
        let stamp = stamp(cert, key);
        let pair = load_pair(cert, key)?;
        let current = Arc::new(Current(RwLock::new(Arc::new(pair))));
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
        Ok(Tls {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current,
            acceptor: TlsAcceptor::from(Arc::new(config)),
            seen: Mutex::new(Some(stamp)),
        })
    }

    pub fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }

    /// Loads the pair again if the files changed since they were last looked at (or always,
    /// with `force`). `Ok(true)`: a new pair is in use.
    pub fn reload(&self, force: bool) -> Result<bool, String> {
        let now = stamp(&self.cert, &self.key);
        {
            let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
            if !force && seen.as_ref() == Some(&now) {
                return Ok(false);
            }
            *seen = Some(now);
        }
        let pair = load_pair(&self.cert, &self.key)?;
        *self.current.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(pair);
        Ok(true)
    }

    /// Reloads on file changes and on SIGHUP, forever; `reloaded` is called after each reload.
    pub async fn watch(self: Arc<Self>, reloaded: impl Fn() + Send + 'static) {
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut tick = tokio::time::interval(RELOAD_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let force = tokio::select! {
                _ = tick.tick() => false,
                Some(()) = async {
                    match hup.as_mut() {
                        Some(h) => h.recv().await,
                        None => std::future::pending().await,
                    }
                } => true,
            };
            #[cfg(not(unix))]
            let force = {
                tick.tick().await;
                false
            };
            match self.reload(force) {
                Ok(false) => {}
                Ok(true) => {
                    tracing::info!("TLS: loaded the certificate {} again", self.cert.display());
                    reloaded();
                }
                Err(e) => tracing::error!("TLS: keeping the certificate in use: {e}"),
            }
        }
    }
}

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let one = |p: &Path| std::fs::metadata(p).map_or((None, 0), |m| (m.modified().ok(), m.len()));
    [one(cert), one(key)]
}

/// Reads a PEM certificate chain (leaf first) and a PEM private key (PKCS#8, PKCS#1 or SEC1)
/// and checks that the key is the certificate's.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let (c, k) = (cert.display(), key.display());
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("cannot read the TLS certificate {c}: {}", pem_error(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("cannot read the TLS certificate {c}: {}", pem_error(e)))?;
    if chain.is_empty() {
        return Err(format!(
            "the TLS certificate file {c} holds no PEM certificate"
        ));
    }
    let der = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| format!("cannot read the TLS key {k}: {}", pem_error(e)))?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    CertifiedKey::from_der(chain, der, &provider).map_err(|e| match e {
        rustls::Error::InconsistentKeys(_) => {
            format!("the TLS key {k} is not the key of the certificate {c}")
        }
        e => format!("cannot use the TLS key {k} with the certificate {c}: {e}"),
    })
}

fn pem_error(e: rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "no PEM item of the expected kind".into(),
        e => format!("{e:?}"),
    }
}
