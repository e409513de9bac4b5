//! The controller's keys: its CA (and, during a rotation, the previous one),
//! its QUIC certificate, the step-signing key (and the previous one for the
//! steps it signed), and the API token; created on first start, reused
//! afterwards, rotated on an operator's request.
//!
//! Invariant: private keys and the token are only ever written with mode 0600
//! and never logged; node certificates are built from the controller's own
//! parameters, never from what a CSR asks for. Every rotation writes its new
//! files before the ones that make it current, so a crash between any two
//! writes leaves the old keys working or the new ones complete
//! ([`Pki::load_or_create`] finishes a CA rotation it finds half done).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use crate::util::random_hex;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::ClientCertVerifier;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use serde::{Deserialize, Serialize};

use de_common::{
    CONTROLLER_SERVER_NAME, Lane, NodeId, PreviousStepKey, renewal_due, write_private,
};

/// How long an issued node certificate is valid unless configured otherwise.
pub const DEFAULT_NODE_CERT_DAYS: u32 = 90;
/// How long agents accept a step signed with the previous step key after a
/// rotation: the longest a step lives (24 h) and an hour for clocks.
pub(crate) const PREVIOUS_STEP_KEY_OVERLAP: Duration = Duration::from_secs(25 * 3600);

const CA_PEM: &str = "ca.pem";
const CA_KEY: &str = "ca.key";
/// A CA being made current (a rotation under way); finished at load.
const CA_NEXT_PEM: &str = "ca-next.pem";
const CA_NEXT_KEY: &str = "ca-next.key";
/// The CA before the last rotation, trusted until it is retired.
const CA_PREVIOUS_PEM: &str = "ca-previous.pem";
const SERVER_PEM: &str = "controller.pem";
const SERVER_KEY: &str = "controller.key";
const STEP_KEY: &str = "step-signing.pk8";
const STEP_PREVIOUS: &str = "step-signing.previous.json";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
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
    #[error(
        "{path} is not a valid key or certificate: restore it from backup, or move the data dir aside to start over"
    )]
    Invalid {
        path: PathBuf,
        #[source]
        source: rcgen::Error,
    },
    #[error("{0} is damaged: restore it from backup, or delete it to make a new one")]
    StepKey(PathBuf),
    #[error("certificate generation failed")]
    Generate(#[source] rcgen::Error),
    #[error("the CSR is not valid: {0}")]
    BadCsr(rcgen::Error),
    #[error("no system randomness available")]
    Random,
    #[error("the TLS configuration could not be built from the CA")]
    Tls(#[source] rustls::Error),
    #[error(
        "a CA rotation is under way: retire the old CA first (POST /api/v1/pki/retire-old-ca) once every node renewed"
    )]
    RotationUnderWay,
}

/// A CA this controller issues from.
struct Ca {
    pem: String,
    der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

/// The step key before the last rotation, as stored in `step-signing.previous.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PreviousStep {
    /// Hex of the Ed25519 public key.
    public_key: String,
    /// Unix seconds.
    until: u64,
    /// Per node, per lane, the last sequence number queued before the rotation.
    last_seqs: BTreeMap<String, Vec<(Lane, u64)>>,
}

/// What can change at run time, under one lock.
struct State {
    ca: Ca,
    previous_ca: Option<(String, CertificateDer<'static>)>,
    server_cert: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    certified: Arc<CertifiedKey>,
    /// Accepts client certificates of the current CA and the previous one.
    clients: Arc<dyn ClientCertVerifier>,
    /// Accepts client certificates of the current CA only.
    current_only: Arc<dyn ClientCertVerifier>,
    step_key: Arc<ring::signature::Ed25519KeyPair>,
    previous_step: Option<PreviousStep>,
}

/// Everything secret the controller holds, loaded from its data dir.
pub struct Pki {
    dir: PathBuf,
    state: RwLock<State>,
    node_cert_lifetime: RwLock<Duration>,
    token: String,
    reset_secret: Vec<u8>,
}

impl std::fmt::Debug for Pki {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pki").finish_non_exhaustive()
    }
}

/// What `Pki::load_or_create` did when [`crate::Controller::open`] ran, so
/// the caller can print the token once.
#[derive(Debug)]
pub enum TokenOrigin {
    Created,
    Loaded,
}

/// What the controller knows of a node's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CertFacts {
    pub(crate) not_after: SystemTime,
    /// SHA-256 of the CA that issued it (hex).
    pub(crate) ca: String,
    /// Issued by the CA that issues now (not the one being retired).
    pub(crate) current_ca: bool,
    /// Less than a third of its lifetime is left.
    pub(crate) due: bool,
}

/// The controller's keys as an operator sees them (fingerprints, never keys).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PkiSummary {
    pub(crate) ca: String,
    pub(crate) previous_ca: Option<String>,
    pub(crate) step_key: String,
    pub(crate) previous_step_key: Option<(String, u64)>,
}

fn read(path: &Path) -> Result<Option<String>, PkiError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(PkiError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), PkiError> {
    write_private(path, bytes).map_err(|source| PkiError::Write {
        path: path.to_owned(),
        source,
    })
}

fn remove(path: &Path) -> Result<(), PkiError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(PkiError::Write {
            path: path.to_owned(),
            source,
        }),
    }
}

fn key_from_pem(path: &Path, pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|source| PkiError::Invalid {
        path: path.to_owned(),
        source,
    })
}

fn invalid(path: &Path) -> PkiError {
    PkiError::Invalid {
        path: path.to_owned(),
        source: rcgen::Error::CouldNotParseCertificate,
    }
}

/// Every certificate of a PEM bundle.
fn pem_certs(path: &Path, pem: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(path))?;
    if certs.is_empty() {
        return Err(invalid(path));
    }
    Ok(certs)
}

fn der_to_pem(der: &CertificateDer<'_>) -> String {
    use std::fmt::Write as _;
    let b64 = base64_encode(der.as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        let _ = writeln!(out, "{}", String::from_utf8_lossy(chunk));
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(char::from(T[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether `key` is the key of certificate `der`.
fn key_matches(der: &CertificateDer<'_>, key: &KeyPair) -> bool {
    x509_parser::parse_x509_certificate(der.as_ref())
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false)
}

/// SHA-256 of `bytes`, hex.
pub(crate) fn fingerprint(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Random)?;
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A new self-signed CA: (certificate PEM, key).
fn new_ca() -> Result<(String, KeyPair), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut p = CertificateParams::new(vec![]).map_err(PkiError::Generate)?;
    p.distinguished_name
        .push(DnType::CommonName, "Deployment Engine CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(20 * 365);
    p.serial_number = Some(random_serial()?);
    let cert = p.self_signed(&key).map_err(PkiError::Generate)?;
    Ok((cert.pem(), key))
}

/// A server certificate for `de-controller` from `issuer`: (PEM, key).
fn new_server_cert(issuer: &Issuer<'static, KeyPair>) -> Result<(String, KeyPair), PkiError> {
    let now = time::OffsetDateTime::now_utc();
    let key = KeyPair::generate().map_err(PkiError::Generate)?;
    let mut p = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_owned()])
        .map_err(PkiError::Generate)?;
    p.distinguished_name
        .push(DnType::CommonName, CONTROLLER_SERVER_NAME);
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    p.not_before = now - time::Duration::days(1);
    p.not_after = now + time::Duration::days(10 * 365);
    p.serial_number = Some(random_serial()?);
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, issuer).map_err(PkiError::Generate)?;
    Ok((cert.pem(), key))
}

fn client_verifier(
    roots: &[&CertificateDer<'static>],
) -> Result<Arc<dyn ClientCertVerifier>, PkiError> {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).map_err(PkiError::Tls)?;
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider())
        .allow_unauthenticated()
        .build()
        .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))
}

impl State {
    fn build(
        ca: Ca,
        previous_ca: Option<(String, CertificateDer<'static>)>,
        server_cert: CertificateDer<'static>,
        server_key_der: Vec<u8>,
        step_key: Arc<ring::signature::Ed25519KeyPair>,
        previous_step: Option<PreviousStep>,
    ) -> Result<State, PkiError> {
        let mut roots = vec![&ca.der];
        if let Some((_, der)) = &previous_ca {
            roots.push(der);
        }
        let clients = client_verifier(&roots)?;
        let current_only = client_verifier(&[&ca.der])?;
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key_der.clone()));
        let signing = provider()
            .key_provider
            .load_private_key(key)
            .map_err(PkiError::Tls)?;
        let certified = Arc::new(CertifiedKey::new(vec![server_cert.clone()], signing));
        Ok(State {
            ca,
            previous_ca,
            server_cert,
            server_key_der,
            certified,
            clients,
            current_only,
            step_key,
            previous_step,
        })
    }

    fn bundle(&self) -> String {
        let mut pem = self.ca.pem.clone();
        if let Some((prev, _)) = &self.previous_ca {
            if !pem.ends_with('\n') {
                pem.push('\n');
            }
            pem.push_str(prev);
        }
        pem
    }
}

/// Loads the CA from `dir`, finishing a rotation found half done, or
/// creates one: (current CA, previous CA).
#[allow(clippy::type_complexity)]
fn load_ca(dir: &Path) -> Result<(Ca, Option<(String, CertificateDer<'static>)>), PkiError> {
    let (pem_path, key_path) = (dir.join(CA_PEM), dir.join(CA_KEY));
    let (next_pem, next_key) = (dir.join(CA_NEXT_PEM), dir.join(CA_NEXT_KEY));
    let prev_path = dir.join(CA_PREVIOUS_PEM);
    // A rotation whose new CA is complete is finished; one that is not never
    // was shown to anyone and is dropped.
    if let (Some(cert), Some(key)) = (read(&next_pem)?, read(&next_key)?)
        && let (Ok(der), Ok(k)) = (pem_certs(&next_pem, &cert), key_from_pem(&next_key, &key))
        && key_matches(&der[0], &k)
    {
        let old = read(&pem_path)?.unwrap_or_default();
        let old_key = read(&key_path)?.and_then(|k| KeyPair::from_pem(&k).ok());
        let old_current = pem_certs(&pem_path, &old)
            .ok()
            .and_then(|certs| {
                certs
                    .into_iter()
                    .find(|c| old_key.as_ref().is_some_and(|k| key_matches(c, k)))
            })
            .filter(|c| *c != der[0]);
        if let Some(old_ca) = old_current {
            write(&prev_path, der_to_pem(&old_ca).as_bytes())?;
        }
        let prev = read(&prev_path)?.unwrap_or_default();
        write(
            &pem_path,
            format!("{}{prev}", der_to_pem(&der[0])).as_bytes(),
        )?;
        write(&key_path, key.as_bytes())?;
    }
    remove(&next_pem)?;
    remove(&next_key)?;
    let (ca_pem, ca_key) = match (read(&pem_path)?, read(&key_path)?) {
        (Some(cert), Some(key)) => (cert, key_from_pem(&key_path, &key)?),
        _ => {
            let (pem, key) = new_ca()?;
            let pem = der_to_pem(&pem_certs(&pem_path, &pem)?[0]);
            write(&key_path, key.serialize_pem().as_bytes())?;
            write(&pem_path, pem.as_bytes())?;
            remove(&prev_path)?;
            (pem, key)
        }
    };
    let certs = pem_certs(&pem_path, &ca_pem)?;
    let current = certs
        .iter()
        .find(|c| key_matches(c, &ca_key))
        .cloned()
        .ok_or_else(|| invalid(&pem_path))?;
    let previous = match read(&prev_path)? {
        Some(pem) => pem_certs(&prev_path, &pem)?
            .into_iter()
            .find(|c| *c != current)
            .map(|der| (der_to_pem(&der), der)),
        None => None,
    };
    let issuer =
        Issuer::from_ca_cert_der(&current, ca_key).map_err(|source| PkiError::Invalid {
            path: pem_path.clone(),
            source,
        })?;
    Ok((
        Ca {
            pem: der_to_pem(&current),
            der: current,
            issuer,
        },
        previous,
    ))
}

/// The server certificate in `dir`, made anew from `ca` when missing or
/// when its key does not match it (a crash while it was replaced).
fn load_server(dir: &Path, ca: &Ca) -> Result<(CertificateDer<'static>, Vec<u8>), PkiError> {
    let (cert_path, key_path) = (dir.join(SERVER_PEM), dir.join(SERVER_KEY));
    if let (Some(cert), Some(key)) = (read(&cert_path)?, read(&key_path)?) {
        let der = pem_certs(&cert_path, &cert)?.remove(0);
        let key = key_from_pem(&key_path, &key)?;
        if key_matches(&der, &key) {
            return Ok((der, key.serialize_der()));
        }
    }
    write_server(dir, ca)
}

fn write_server(dir: &Path, ca: &Ca) -> Result<(CertificateDer<'static>, Vec<u8>), PkiError> {
    let (cert_path, key_path) = (dir.join(SERVER_PEM), dir.join(SERVER_KEY));
    let (pem, key) = new_server_cert(&ca.issuer)?;
    write(&key_path, key.serialize_pem().as_bytes())?;
    write(&cert_path, pem.as_bytes())?;
    let der = pem_certs(&cert_path, &pem)?.remove(0);
    Ok((der, key.serialize_der()))
}

fn new_step_key(path: &Path) -> Result<Vec<u8>, PkiError> {
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
        .map_err(|_| PkiError::Random)?;
    write(path, doc.as_ref())?;
    Ok(doc.as_ref().to_vec())
}

impl Pki {
    /// Loads the keys from `dir`, creating whatever is missing.
    pub fn load_or_create(dir: &Path) -> Result<(Pki, TokenOrigin), PkiError> {
        let (ca, previous_ca) = load_ca(dir)?;
        let (server_cert, server_key_der) = load_server(dir, &ca)?;

        let step_path = dir.join(STEP_KEY);
        let step_der = match std::fs::read(&step_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => new_step_key(&step_path)?,
            Err(source) => {
                return Err(PkiError::Read {
                    path: step_path,
                    source,
                });
            }
        };
        let step_key = ring::signature::Ed25519KeyPair::from_pkcs8(&step_der)
            .map_err(|_| PkiError::StepKey(step_path.clone()))?;
        let previous_step = {
            use ring::signature::KeyPair as _;
            let current = hex(step_key.public_key().as_ref());
            read(&dir.join(STEP_PREVIOUS))?
                .and_then(|t| serde_json::from_str::<PreviousStep>(&t).ok())
                // Written before the new key: equal means the rotation never finished.
                .filter(|p| p.public_key != current && p.until >= unix(SystemTime::now()))
        };

        let token_path = dir.join("admin.token");
        let (token, origin) = match read(&token_path)? {
            Some(t) if !t.trim().is_empty() => (t.trim().to_owned(), TokenOrigin::Loaded),
            _ => {
                let t = random_hex(32).map_err(|_| PkiError::Random)?;
                write(&token_path, format!("{t}\n").as_bytes())?;
                (t, TokenOrigin::Created)
            }
        };

        // Keyed stateless resets: a restarted controller can tell agents at once
        // that their old connection is gone, instead of leaving them to time out.
        let reset_path = dir.join("quic-reset.key");
        let reset_secret = match std::fs::read(&reset_path) {
            Ok(b) if b.len() == 32 => b,
            Ok(_) => return Err(PkiError::StepKey(reset_path)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut b = vec![0u8; 32];
                ring::rand::SystemRandom::new()
                    .fill(&mut b)
                    .map_err(|_| PkiError::Random)?;
                write(&reset_path, &b)?;
                b
            }
            Err(source) => {
                return Err(PkiError::Read {
                    path: reset_path,
                    source,
                });
            }
        };

        let state = State::build(
            ca,
            previous_ca,
            server_cert,
            server_key_der,
            Arc::new(step_key),
            previous_step,
        )?;
        Ok((
            Pki {
                dir: dir.to_owned(),
                state: RwLock::new(state),
                node_cert_lifetime: RwLock::new(Duration::from_secs(
                    u64::from(DEFAULT_NODE_CERT_DAYS) * 86_400,
                )),
                token,
                reset_secret,
            },
            origin,
        ))
    }

    fn state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn state_mut(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// The CAs a client should trust, as one PEM bundle: the current CA,
    /// and during a rotation the previous one (what `DATA/ca.pem` holds).
    pub fn ca_pem(&self) -> String {
        self.state().bundle()
    }

    /// The CA certificates issue from now (the API's chain ends with it).
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.state().ca.der.clone()
    }

    pub fn server_cert(&self) -> CertificateDer<'static> {
        self.state().server_cert.clone()
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            self.state().server_key_der.clone(),
        ))
    }

    /// The QUIC server's certificate and key, as rustls serves them.
    pub(crate) fn certified_key(&self) -> Arc<CertifiedKey> {
        self.state().certified.clone()
    }

    /// Checks client certificates: the current CA's and, during a
    /// rotation, the previous one's.
    pub(crate) fn client_verifier(&self) -> Arc<dyn ClientCertVerifier> {
        self.state().clients.clone()
    }

    pub fn step_public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.state().step_key.public_key().as_ref().to_vec()
    }

    pub fn step_key(&self) -> Arc<ring::signature::Ed25519KeyPair> {
        self.state().step_key.clone()
    }

    /// The previous step key as node `node` may still use it: its public
    /// key, until when, and that node's last sequences queued with it.
    pub(crate) fn previous_step_key_for(&self, node: &NodeId) -> Option<PreviousStepKey> {
        let state = self.state();
        let p = state.previous_step.as_ref()?;
        let last_seqs = p.last_seqs.get(node.as_str())?.clone();
        Some(PreviousStepKey {
            public_key: unhex(&p.public_key)?,
            until: p.until,
            last_seqs,
        })
    }

    /// Secret keying the QUIC stateless-reset tokens; stable across restarts.
    pub fn reset_secret(&self) -> &[u8] {
        &self.reset_secret
    }

    /// The API token. Never log it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// How long node certificates issued from now on are valid.
    pub fn set_node_cert_lifetime(&self, lifetime: Duration) {
        *self
            .node_cert_lifetime
            .write()
            .unwrap_or_else(|p| p.into_inner()) = lifetime.max(Duration::from_secs(1));
    }

    fn node_cert_lifetime(&self) -> Duration {
        *self
            .node_cert_lifetime
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a client certificate for `node_id` to the public key of `csr_pem`,
    /// from the current CA. Only the key is taken from the CSR (after its
    /// signature is checked); subject, SAN, EKU, CA flag and validity are the
    /// controller's.
    pub fn issue_node_cert(&self, node_id: &NodeId, csr_pem: &str) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let now = time::OffsetDateTime::now_utc();
        let lifetime = self.node_cert_lifetime();
        // Backdated for clocks a little off, by less than the lifetime
        // itself, so that a short test lifetime is not spent at once.
        let backdate = (lifetime / 4).min(Duration::from_secs(3600));
        let mut p =
            CertificateParams::new(vec![node_id.to_string()]).map_err(PkiError::Generate)?;
        p.distinguished_name
            .push(DnType::CommonName, node_id.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - backdate;
        p.not_after = now + lifetime;
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&csr.public_key, &self.state().ca.issuer)
            .map_err(PkiError::Generate)?;
        Ok(cert.pem())
    }

    /// When `cert` expires, whether the current CA issued it, and whether
    /// it is due for renewal (less than a third of its lifetime left, or
    /// from a CA being retired). None when it does not parse.
    pub(crate) fn facts(&self, cert: &CertificateDer<'_>) -> Option<CertFacts> {
        let (_, x) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        let from = u64::try_from(x.validity().not_before.timestamp()).ok()?;
        let to = u64::try_from(x.validity().not_after.timestamp()).ok()?;
        let state = self.state();
        let current_ca = state
            .current_only
            .verify_client_cert(cert, &[], UnixTime::now())
            .is_ok();
        let ca = match (&state.previous_ca, current_ca) {
            (Some((_, prev)), false) => fingerprint(prev.as_ref()),
            _ => fingerprint(state.ca.der.as_ref()),
        };
        drop(state);
        Some(CertFacts {
            not_after: SystemTime::UNIX_EPOCH + Duration::from_secs(to),
            ca,
            current_ca,
            due: !current_ca || renewal_due(from, to, unix(SystemTime::now())),
        })
    }

    /// Fingerprints of the keys, for the operator.
    pub(crate) fn summary(&self) -> PkiSummary {
        use ring::signature::KeyPair as _;
        let s = self.state();
        PkiSummary {
            ca: fingerprint(s.ca.der.as_ref()),
            previous_ca: s.previous_ca.as_ref().map(|(_, d)| fingerprint(d.as_ref())),
            step_key: hex(s.step_key.public_key().as_ref()),
            previous_step_key: s
                .previous_step
                .as_ref()
                .map(|p| (p.public_key.clone(), p.until)),
        }
    }

    /// Makes a new step key current. `last_seqs` is, per node, the last
    /// sequence number queued on each lane with the key being replaced (the
    /// caller holds the step queue's allocation lock, so no step is signed
    /// in between); agents accept that key for those steps for
    /// [`PREVIOUS_STEP_KEY_OVERLAP`]. A key older than the replaced one is
    /// retired at once. Returns the new key, for the step queue.
    pub(crate) fn rotate_step_key(
        &self,
        last_seqs: BTreeMap<String, Vec<(Lane, u64)>>,
    ) -> Result<Arc<ring::signature::Ed25519KeyPair>, PkiError> {
        use ring::signature::KeyPair as _;
        let mut state = self.state_mut();
        let previous = PreviousStep {
            public_key: hex(state.step_key.public_key().as_ref()),
            until: unix(SystemTime::now() + PREVIOUS_STEP_KEY_OVERLAP),
            last_seqs,
        };
        let text = serde_json::to_vec_pretty(&previous).map_err(|_| PkiError::Random)?;
        // The previous key's record first: a crash before the new key is
        // written leaves it naming the current key, which load ignores.
        write(&self.dir.join(STEP_PREVIOUS), &text)?;
        let step_path = self.dir.join(STEP_KEY);
        let tmp = self.dir.join("step-signing.next.pk8");
        let der = new_step_key(&tmp)?;
        let key = ring::signature::Ed25519KeyPair::from_pkcs8(&der)
            .map_err(|_| PkiError::StepKey(tmp.clone()))?;
        std::fs::rename(&tmp, &step_path).map_err(|source| PkiError::Write {
            path: step_path,
            source,
        })?;
        let key = Arc::new(key);
        state.step_key = key.clone();
        state.previous_step = Some(previous);
        Ok(key)
    }

    /// Makes a new CA current: it issues every node certificate from now
    /// on, while the previous one stays trusted (client certificates, and
    /// the QUIC server certificate it issued) until [`Pki::retire_previous_ca`].
    pub(crate) fn rotate_ca(&self) -> Result<(), PkiError> {
        let mut state = self.state_mut();
        if state.previous_ca.is_some() {
            return Err(PkiError::RotationUnderWay);
        }
        let (pem, key) = new_ca()?;
        // The new CA complete on disk first; `load_ca` finishes from here.
        write(&self.dir.join(CA_NEXT_KEY), key.serialize_pem().as_bytes())?;
        write(&self.dir.join(CA_NEXT_PEM), pem.as_bytes())?;
        write(
            &self.dir.join(CA_PREVIOUS_PEM),
            der_to_pem(&state.ca.der).as_bytes(),
        )?;
        let (ca, previous) = load_ca(&self.dir)?;
        let next = State::build(
            ca,
            previous,
            state.server_cert.clone(),
            state.server_key_der.clone(),
            state.step_key.clone(),
            state.previous_step.clone(),
        )?;
        *state = next;
        Ok(())
    }

    /// Stops trusting the previous CA: the QUIC server certificate is
    /// issued anew from the current CA and `ca.pem` holds the current CA
    /// only. False when no rotation is under way.
    pub(crate) fn retire_previous_ca(&self) -> Result<bool, PkiError> {
        let mut state = self.state_mut();
        if state.previous_ca.is_none() {
            return Ok(false);
        }
        let (server_cert, server_key_der) = write_server(&self.dir, &state.ca)?;
        write(&self.dir.join(CA_PEM), state.ca.pem.as_bytes())?;
        remove(&self.dir.join(CA_PREVIOUS_PEM))?;
        let (ca, previous) = load_ca(&self.dir)?;
        let next = State::build(
            ca,
            previous,
            server_cert,
            server_key_der,
            state.step_key.clone(),
            state.previous_step.clone(),
        )?;
        *state = next;
        Ok(true)
    }
}

impl Pki {
    /// Issues a TLS server certificate from the CA for the HTTPS API, to
    /// `key`, naming `sans` (host names and IP addresses), valid `days`.
    pub fn issue_server_cert(
        &self,
        key: &KeyPair,
        sans: &[String],
        days: i64,
    ) -> Result<String, PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let mut p = CertificateParams::new(sans.to_vec()).map_err(PkiError::Generate)?;
        let cn = sans.first().map_or("de-controller-api", String::as_str);
        p.distinguished_name.push(DnType::CommonName, cn);
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(days);
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(key, &self.state().ca.issuer)
            .map_err(PkiError::Generate)?;
        Ok(cert.pem())
    }
}

/// The node id a client certificate names (its subject CN), if any.
pub(crate) fn node_id_of(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let (_, x509) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = x509.subject().iter_common_name().next()?;
    cn.as_str().ok().map(NodeId::from)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der(pem: &str) -> CertificateDer<'static> {
        pem_certs(Path::new("x"), pem).expect("der").remove(0)
    }

    fn csr() -> String {
        let key = KeyPair::generate().expect("key");
        let p = CertificateParams::new(vec![]).expect("p");
        p.serialize_request(&key).expect("csr").pem().expect("pem")
    }

    #[test]
    fn keys_are_created_once_and_reused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (a, origin) = Pki::load_or_create(dir.path()).expect("create");
        assert!(matches!(origin, TokenOrigin::Created));
        let (b, origin) = Pki::load_or_create(dir.path()).expect("load");
        assert!(matches!(origin, TokenOrigin::Loaded));
        assert_eq!(a.token(), b.token());
        assert_eq!(a.ca_pem(), b.ca_pem());
        assert_eq!(a.server_cert(), b.server_cert());
        assert_eq!(a.step_public_key(), b.step_public_key());
        assert_eq!(a.reset_secret(), b.reset_secret());
        use std::os::unix::fs::PermissionsExt;
        for f in [
            "ca.key",
            "controller.key",
            "step-signing.pk8",
            "admin.token",
        ] {
            let mode = std::fs::metadata(dir.path().join(f))
                .expect(f)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }

    #[test]
    fn node_certs_ignore_what_the_csr_asks_for() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        // A greedy CSR: asks to be a CA, a server, and named de-controller.
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_owned()]).expect("p");
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        p.distinguished_name.push(DnType::CommonName, "evil");
        let csr = p.serialize_request(&key).expect("csr").pem().expect("pem");
        let pem = pki.issue_node_cert(&"n-0123".into(), &csr).expect("issue");
        let der = der(&pem);
        let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).expect("parse");
        assert_eq!(node_id_of(&der), Some("n-0123".into()));
        assert!(!x.is_ca());
        let eku = x.extended_key_usage().expect("eku").expect("present").value;
        assert!(eku.client_auth && !eku.server_auth);
        let san = x
            .subject_alternative_name()
            .expect("san")
            .expect("present")
            .value;
        assert_eq!(format!("{:?}", san.general_names), "[DNSName(\"n-0123\")]");
        assert!(pki.issue_node_cert(&"n-1".into(), "not a csr").is_err());
    }

    #[test]
    fn node_certs_last_the_configured_lifetime_and_are_due_in_their_last_third() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        let now = SystemTime::now();
        let facts = pki
            .facts(&der(&pki
                .issue_node_cert(&"n-1".into(), &csr())
                .expect("c")))
            .expect("facts");
        let days = facts
            .not_after
            .duration_since(now)
            .expect("future")
            .as_secs()
            / 86_400;
        assert_eq!(days, 89, "90 days by default, less the seconds since");
        assert!(facts.current_ca && !facts.due);
        pki.set_node_cert_lifetime(Duration::from_secs(2 * 86_400));
        let facts = pki
            .facts(&der(&pki
                .issue_node_cert(&"n-1".into(), &csr())
                .expect("c")))
            .expect("facts");
        assert!(facts.not_after < now + Duration::from_secs(2 * 86_400 + 60));
        assert!(!renewal_due(0, 90, 59) && renewal_due(0, 90, 61));
    }

    #[test]
    fn a_ca_rotation_trusts_both_until_the_old_one_is_retired() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        let old_server = pki.server_cert();
        let old_cert = der(&pki.issue_node_cert(&"n-1".into(), &csr()).expect("c"));
        pki.rotate_ca().expect("rotate");
        assert!(matches!(pki.rotate_ca(), Err(PkiError::RotationUnderWay)));
        // ca.pem is the bundle of both; the server certificate is still the old CA's.
        let bundle = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        assert_eq!(bundle, pki.ca_pem());
        assert_eq!(pem_certs(Path::new("x"), &bundle).expect("certs").len(), 2);
        assert_eq!(pki.server_cert(), old_server);
        let verify = |c: &CertificateDer<'_>| {
            pki.client_verifier()
                .verify_client_cert(c, &[], UnixTime::now())
                .is_ok()
        };
        let new_cert = der(&pki.issue_node_cert(&"n-1".into(), &csr()).expect("c"));
        assert!(verify(&old_cert) && verify(&new_cert));
        assert!(pki.facts(&old_cert).expect("f").due);
        assert!(!pki.facts(&new_cert).expect("f").due);
        // A restart in the overlap keeps both.
        let (again, _) = Pki::load_or_create(dir.path()).expect("reload");
        assert_eq!(again.ca_pem(), pki.ca_pem());
        assert!(pki.retire_previous_ca().expect("retire"));
        assert!(!pki.retire_previous_ca().expect("nothing to retire"));
        assert!(!verify(&old_cert) && verify(&new_cert));
        assert_ne!(pki.server_cert(), old_server);
        let bundle = std::fs::read_to_string(dir.path().join("ca.pem")).expect("ca.pem");
        assert_eq!(pem_certs(Path::new("x"), &bundle).expect("certs").len(), 1);
        let (again, _) = Pki::load_or_create(dir.path()).expect("reload");
        assert_eq!(again.ca_pem(), pki.ca_pem());
        assert_eq!(again.server_cert(), pki.server_cert());
    }

    #[test]
    fn a_ca_rotation_cut_short_is_finished_at_load() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        let old_cert = der(&pki.issue_node_cert(&"n-1".into(), &csr()).expect("c"));
        // The crash came right after the new CA was written.
        let (pem, key) = new_ca().expect("ca");
        write(
            &dir.path().join(CA_NEXT_KEY),
            key.serialize_pem().as_bytes(),
        )
        .expect("k");
        write(&dir.path().join(CA_NEXT_PEM), pem.as_bytes()).expect("p");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("reload");
        assert!(pki.summary().previous_ca.is_some());
        assert!(
            pki.facts(&old_cert).expect("f").due,
            "old CA no longer current"
        );
        let verify = pki
            .client_verifier()
            .verify_client_cert(&old_cert, &[], UnixTime::now());
        assert!(verify.is_ok(), "old CA still trusted");
        // Only half a key: dropped, nothing changes.
        write(&dir.path().join(CA_NEXT_KEY), b"garbage").expect("k");
        let before = pki.ca_pem();
        let (pki, _) = Pki::load_or_create(dir.path()).expect("reload");
        assert_eq!(pki.ca_pem(), before);
        assert!(!dir.path().join(CA_NEXT_KEY).exists());
    }

    #[test]
    fn a_step_key_rotation_keeps_the_previous_key_for_its_steps_only() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        let old = pki.step_public_key();
        let mut seqs = BTreeMap::new();
        seqs.insert("n-1".to_owned(), vec![(Lane::Deploy, 7)]);
        pki.rotate_step_key(seqs).expect("rotate");
        assert_ne!(pki.step_public_key(), old);
        let prev = pki.previous_step_key_for(&"n-1".into()).expect("prev");
        assert_eq!(prev.public_key, old);
        let now = unix(SystemTime::now());
        assert!(prev.covers(Lane::Deploy, 7, now));
        assert!(!prev.covers(Lane::Deploy, 8, now));
        assert!(!prev.covers(Lane::Adhoc, 1, now));
        assert!(!prev.covers(Lane::Deploy, 7, prev.until + 1));
        assert!(pki.previous_step_key_for(&"n-2".into()).is_none());
        let (again, _) = Pki::load_or_create(dir.path()).expect("reload");
        assert_eq!(again.step_public_key(), pki.step_public_key());
        assert_eq!(again.previous_step_key_for(&"n-1".into()), Some(prev));
        // A second rotation retires the first key.
        pki.rotate_step_key(BTreeMap::new()).expect("rotate");
        assert!(pki.previous_step_key_for(&"n-1".into()).is_none());
    }

    #[test]
    fn base64_matches_the_pem_rustls_reads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pki, _) = Pki::load_or_create(dir.path()).expect("create");
        let d = pki.server_cert();
        assert_eq!(der(&der_to_pem(&d)), d);
        assert_eq!(base64_encode(b"ab"), "YWI=");
        assert_eq!(base64_encode(b"a"), "YQ==");
        assert_eq!(base64_encode(b"abc"), "YWJj");
    }
}
