//! HTTPS for the API and console: the server certificate (issued from the
//! controller's CA to a key kept in `DATA/api.key`, or the operator's own
//! certificate and key), the public-key pin nodes check when they fetch
//! `/join.sh`, and a listener for `axum::serve` that does TLS handshakes
//! concurrently, so one slow client cannot hold the others back.
//!
//! Invariants: the API key is written only with mode 0600 and reused across
//! restarts, so the pin stays the same; the certificate is issued again at
//! every start (names changed in the config take effect at once) and
//! whenever the controller's CA changes (a CA rotation), so it always
//! chains to the CA clients are told to trust; a
//! handshake that does not finish in [`HANDSHAKE_TIMEOUT`] is dropped, and at
//! most [`MAX_HANDSHAKES`] run at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use crate::agents::pki::{Pki, PkiError};

/// Days an API certificate issued from the controller's CA is valid.
pub const API_CERT_DAYS: i64 = 397;
/// How long a client may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes in progress at once; connections beyond are closed.
pub const MAX_HANDSHAKES: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds no PEM certificate: give the API's certificate chain, leaf first")]
    NoCert { path: PathBuf },
    #[error("{path} holds no PEM private key (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: PathBuf },
    #[error(
        "{path} is not a valid key: restore it, or delete it to make a new one (the pin changes)"
    )]
    BadKey {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("the API certificate could not be issued")]
    Issue(#[from] PkiError),
    #[error("the API certificate and key do not go together, or are not usable for TLS")]
    Config(#[source] rustls::Error),
    #[error("the API certificate is not valid X.509")]
    Parse,
}

/// Where the API's certificate comes from.
#[derive(Debug, Clone)]
pub enum ApiCert {
    /// Issued from the controller's CA for these names (host names and IPs).
    Own {
        data_dir: PathBuf,
        names: Vec<String>,
    },
    /// The operator's certificate chain (leaf first) and key, PEM.
    Files { cert: PathBuf, key: PathBuf },
}

/// The API's TLS configuration, and what clients check it by.
#[derive(Clone)]
pub struct ApiTls {
    config: Arc<rustls::ServerConfig>,
    /// `sha256//BASE64` of the certificate's public key, as curl's
    /// `--pinnedpubkey` takes it.
    pub pin: String,
    /// The names the certificate holds.
    pub names: Vec<String>,
}

impl std::fmt::Debug for ApiTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTls")
            .field("pin", &self.pin)
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Option<Vec<u8>>, TlsError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// `sha256//BASE64` of the SubjectPublicKeyInfo of `cert`.
pub fn pin_of(cert: &CertificateDer<'_>) -> Result<String, TlsError> {
    let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).map_err(|_| TlsError::Parse)?;
    let digest = ring::digest::digest(&ring::digest::SHA256, x.public_key().raw);
    Ok(format!(
        "sha256//{}",
        base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
    ))
}

/// The SHA-256 fingerprint of a certificate, as `AB:CD:...` (what browsers
/// and `openssl x509 -fingerprint -sha256` show).
pub fn fingerprint(cert: &CertificateDer<'_>) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, cert.as_ref());
    d.as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Serves the API certificate issued from the CA the controller issues
/// from now, issuing it again (to the same key) when that CA changed.
struct OwnCert {
    pki: Arc<Pki>,
    key: rcgen::KeyPair,
    names: Vec<String>,
    /// The CA the cached certificate chains to, and the certificate.
    current: std::sync::RwLock<(CertificateDer<'static>, Arc<rustls::sign::CertifiedKey>)>,
}

impl std::fmt::Debug for OwnCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OwnCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl OwnCert {
    fn certified(
        &self,
        ca: &CertificateDer<'static>,
    ) -> Result<Arc<rustls::sign::CertifiedKey>, TlsError> {
        let pem = self
            .pki
            .issue_server_cert(&self.key, &self.names, API_CERT_DAYS)?;
        let leaf = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| TlsError::Parse)?;
        let key = PrivateKeyDer::Pkcs8(self.key.serialize_der().into());
        let signing = rustls::crypto::ring::default_provider()
            .key_provider
            .load_private_key(key)
            .map_err(TlsError::Config)?;
        Ok(Arc::new(rustls::sign::CertifiedKey::new(
            vec![leaf, ca.clone()],
            signing,
        )))
    }
}

impl rustls::server::ResolvesServerCert for OwnCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let ca = self.pki.ca_der();
        {
            let cur = self.current.read().unwrap_or_else(|p| p.into_inner());
            if cur.0 == ca {
                return Some(cur.1.clone());
            }
        }
        match self.certified(&ca) {
            Ok(ck) => {
                let mut cur = self.current.write().unwrap_or_else(|p| p.into_inner());
                *cur = (ca, ck.clone());
                tracing::info!("the CA changed: the API certificate was issued anew from it");
                Some(ck)
            }
            Err(e) => {
                tracing::warn!(
                    "cannot issue the API certificate from the new CA: {}",
                    de_common::ErrorChain(&e)
                );
                Some(
                    self.current
                        .read()
                        .unwrap_or_else(|p| p.into_inner())
                        .1
                        .clone(),
                )
            }
        }
    }
}

impl ApiTls {
    /// Loads (or issues) the API's certificate.
    pub fn load(pki: &Arc<Pki>, source: &ApiCert) -> Result<ApiTls, TlsError> {
        let mut own = None;
        let (chain, key, names) = match source {
            ApiCert::Own { data_dir, names } => {
                let key_path = data_dir.join("api.key");
                let key = match read(&key_path)? {
                    Some(pem) => {
                        let pem = String::from_utf8_lossy(&pem);
                        rcgen::KeyPair::from_pem(&pem).map_err(|source| TlsError::BadKey {
                            path: key_path.clone(),
                            source,
                        })?
                    }
                    None => {
                        let key = rcgen::KeyPair::generate().map_err(PkiError::Generate)?;
                        de_common::write_private(&key_path, key.serialize_pem().as_bytes())
                            .map_err(|source| TlsError::Write {
                                path: key_path.clone(),
                                source,
                            })?;
                        key
                    }
                };
                let cert_pem = pki.issue_server_cert(&key, names, API_CERT_DAYS)?;
                let cert_path = data_dir.join("api.pem");
                de_common::write_private(&cert_path, cert_pem.as_bytes()).map_err(|source| {
                    TlsError::Write {
                        path: cert_path.clone(),
                        source,
                    }
                })?;
                let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes())
                    .map_err(|_| TlsError::Parse)?;
                let key_der = PrivateKeyDer::Pkcs8(key.serialize_der().into());
                let ca = pki.ca_der();
                let chain = vec![leaf, ca.clone()];
                let signing = rustls::crypto::ring::default_provider()
                    .key_provider
                    .load_private_key(key_der.clone_key())
                    .map_err(TlsError::Config)?;
                let certified = Arc::new(rustls::sign::CertifiedKey::new(chain.clone(), signing));
                own = Some(Arc::new(OwnCert {
                    pki: pki.clone(),
                    key,
                    names: names.clone(),
                    current: std::sync::RwLock::new((ca, certified)),
                }));
                (chain, key_der, names.clone())
            }
            ApiCert::Files { cert, key } => {
                let cert_pem =
                    read(cert)?.ok_or_else(|| TlsError::NoCert { path: cert.clone() })?;
                let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
                    .filter_map(Result::ok)
                    .collect();
                if chain.is_empty() {
                    return Err(TlsError::NoCert { path: cert.clone() });
                }
                let key_pem = read(key)?.ok_or_else(|| TlsError::NoKey { path: key.clone() })?;
                let key_der = PrivateKeyDer::from_pem_slice(&key_pem)
                    .map_err(|_| TlsError::NoKey { path: key.clone() })?;
                let names = names_of(&chain[0]);
                (chain, key_der, names)
            }
        };
        let pin = pin_of(&chain[0])?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Config)?
            .with_no_client_auth();
        let mut config = match own {
            Some(resolver) => builder.with_cert_resolver(resolver),
            None => builder
                .with_single_cert(chain, key)
                .map_err(TlsError::Config)?,
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ApiTls {
            config: Arc::new(config),
            pin,
            names,
        })
    }
}

/// The DNS names and IPs a certificate's subject alternative names hold.
fn names_of(cert: &CertificateDer<'_>) -> Vec<String> {
    use x509_parser::extensions::GeneralName;
    let Ok((_, x)) = x509_parser::parse_x509_certificate(cert.as_ref()) else {
        return Vec::new();
    };
    let Ok(Some(san)) = x.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::DNSName(d) => Some((*d).to_owned()),
            GeneralName::IPAddress(b) => match b.len() {
                4 => <[u8; 4]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                16 => <[u8; 16]>::try_from(*b)
                    .ok()
                    .map(|a| std::net::IpAddr::from(a).to_string()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// A TCP listener whose connections come out of `accept` with their TLS
/// handshake done. Handshakes run in their own tasks.
#[derive(Debug)]
pub struct TlsListener {
    rx: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; the accept task ends when this listener is dropped.
    pub fn new(tcp: TcpListener, tls: &ApiTls) -> std::io::Result<TlsListener> {
        let local = tcp.local_addr()?;
        let (tx, rx) = mpsc::channel(64);
        let acceptor = TlsAcceptor::from(tls.config.clone());
        let slots = Arc::new(Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    r = tcp.accept() => r,
                    () = tx.closed() => return,
                };
                let (sock, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of file descriptors and the like: back off a little.
                        warn!("HTTPS accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "too many TLS handshakes in progress: connection closed");
                    continue;
                };
                let _ = sock.set_nodelay(true);
                let acceptor = acceptor.clone();
                let tx = tx.clone();
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(sock)).await {
                        Ok(Ok(stream)) => {
                            let _ = tx.send((stream, peer)).await;
                        }
                        Ok(Err(e)) => debug!(%peer, "TLS handshake failed: {e}"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { rx, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.rx.recv().await {
            Some(conn) => conn,
            // The accept task only ends once this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_api_key_and_so_the_pin_survive_a_restart_and_the_names_are_in_the_cert() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Arc::new(Pki::load_or_create(dir.path()).expect("pki").0);
        let own = ApiCert::Own {
            data_dir: dir.path().to_owned(),
            names: vec!["ctl.example".into(), "192.0.2.7".into()],
        };
        let a = ApiTls::load(&pki, &own).expect("first");
        let b = ApiTls::load(&pki, &own).expect("second");
        assert_eq!(a.pin, b.pin);
        assert!(
            a.pin.starts_with("sha256//") && a.pin.len() == 8 + 44,
            "{}",
            a.pin
        );
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("api.key"))
            .expect("api.key")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = std::fs::read(dir.path().join("api.pem")).expect("api.pem");
        let leaf = CertificateDer::from_pem_slice(&pem).expect("pem");
        assert_eq!(names_of(&leaf), ["ctl.example", "192.0.2.7"]);
        assert_eq!(pin_of(&leaf).expect("pin"), a.pin);
    }

    #[test]
    fn an_operator_cert_is_used_as_given_and_a_missing_key_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Arc::new(Pki::load_or_create(dir.path()).expect("pki").0);
        let key = rcgen::KeyPair::generate().expect("key");
        let pem = pki
            .issue_server_cert(&key, &["op.example".into()], 30)
            .expect("issue");
        let cert = dir.path().join("op.pem");
        let key_path = dir.path().join("op.key");
        std::fs::write(&cert, pem).expect("write");
        std::fs::write(&key_path, key.serialize_pem()).expect("write");
        let tls = ApiTls::load(
            &pki,
            &ApiCert::Files {
                cert: cert.clone(),
                key: key_path,
            },
        )
        .expect("operator's");
        assert_eq!(tls.names, ["op.example"]);
        let missing = dir.path().join("nope.key");
        let e = ApiTls::load(
            &pki,
            &ApiCert::Files {
                cert,
                key: missing.clone(),
            },
        )
        .expect_err("no key");
        assert!(
            e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
    }
}
