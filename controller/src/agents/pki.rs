//! The controller's keys: its CA, its QUIC certificate, the step-signing key
//! and the API token, created on first start and reused afterwards.
//!
//! Invariant: private keys and the token are only ever written with mode 0600
//! and never logged; node certificates are built from the controller's own
//! parameters, never from what a CSR asks for.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::util::random_hex;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use de_common::{CONTROLLER_SERVER_NAME, NodeId, write_private};

/// How long an issued node certificate is valid.
pub(crate) const NODE_CERT_DAYS: i64 = 5 * 365;

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
}

/// Everything secret the controller holds, loaded from its data dir.
pub struct Pki {
    ca_pem: String,
    ca_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
    server_cert: CertificateDer<'static>,
    server_key_der: Vec<u8>,
    step_key: Arc<ring::signature::Ed25519KeyPair>,
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

fn key_from_pem(path: &Path, pem: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|source| PkiError::Invalid {
        path: path.to_owned(),
        source,
    })
}

fn pem_to_der(path: &Path, pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    use rustls_pki_types::pem::PemObject;
    CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|_| PkiError::Invalid {
        path: path.to_owned(),
        source: rcgen::Error::CouldNotParseCertificate,
    })
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| PkiError::Random)?;
    b[0] &= 0x7f;
    Ok(SerialNumber::from_slice(&b))
}

impl Pki {
    /// Loads the keys from `dir`, creating whatever is missing.
    pub fn load_or_create(dir: &Path) -> Result<(Pki, TokenOrigin), PkiError> {
        let now = time::OffsetDateTime::now_utc();
        let ca_cert_path = dir.join("ca.pem");
        let ca_key_path = dir.join("ca.key");
        let (ca_pem, ca_key) = match (read(&ca_cert_path)?, read(&ca_key_path)?) {
            (Some(cert), Some(key)) => (cert, key_from_pem(&ca_key_path, &key)?),
            _ => {
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
                write(&ca_key_path, key.serialize_pem().as_bytes())?;
                write(&ca_cert_path, cert.pem().as_bytes())?;
                (cert.pem(), key)
            }
        };
        let ca_der = pem_to_der(&ca_cert_path, &ca_pem)?;
        let issuer =
            Issuer::from_ca_cert_pem(&ca_pem, ca_key).map_err(|source| PkiError::Invalid {
                path: ca_cert_path.clone(),
                source,
            })?;

        let srv_cert_path = dir.join("controller.pem");
        let srv_key_path = dir.join("controller.key");
        let (server_cert, server_key_der) = match (read(&srv_cert_path)?, read(&srv_key_path)?) {
            (Some(cert), Some(key)) => (
                pem_to_der(&srv_cert_path, &cert)?,
                key_from_pem(&srv_key_path, &key)?.serialize_der(),
            ),
            _ => {
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
                let cert = p.signed_by(&key, &issuer).map_err(PkiError::Generate)?;
                write(&srv_key_path, key.serialize_pem().as_bytes())?;
                write(&srv_cert_path, cert.pem().as_bytes())?;
                (cert.der().clone(), key.serialize_der())
            }
        };

        let step_path = dir.join("step-signing.pk8");
        let step_der = match std::fs::read(&step_path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(
                    &ring::rand::SystemRandom::new(),
                )
                .map_err(|_| PkiError::Random)?;
                write(&step_path, doc.as_ref())?;
                doc.as_ref().to_vec()
            }
            Err(source) => {
                return Err(PkiError::Read {
                    path: step_path,
                    source,
                });
            }
        };
        let step_key = ring::signature::Ed25519KeyPair::from_pkcs8(&step_der)
            .map_err(|_| PkiError::StepKey(step_path.clone()))?;

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

        Ok((
            Pki {
                ca_pem,
                ca_der,
                issuer,
                server_cert,
                server_key_der,
                step_key: Arc::new(step_key),
                token,
                reset_secret,
            },
            origin,
        ))
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn ca_der(&self) -> &CertificateDer<'static> {
        &self.ca_der
    }

    pub fn server_cert(&self) -> &CertificateDer<'static> {
        &self.server_cert
    }

    pub fn server_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.server_key_der.clone()))
    }

    pub fn step_public_key(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.step_key.public_key().as_ref().to_vec()
    }

    pub fn step_key(&self) -> Arc<ring::signature::Ed25519KeyPair> {
        self.step_key.clone()
    }

    /// Secret keying the QUIC stateless-reset tokens; stable across restarts.
    pub fn reset_secret(&self) -> &[u8] {
        &self.reset_secret
    }

    /// The API token. Never log it.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Issues a client certificate for `node_id` to the public key of `csr_pem`.
    /// Only the key is taken from the CSR (after its signature is checked);
    /// subject, SAN, EKU, CA flag and validity are the controller's.
    pub fn issue_node_cert(&self, node_id: &NodeId, csr_pem: &str) -> Result<String, PkiError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(PkiError::BadCsr)?;
        let now = time::OffsetDateTime::now_utc();
        let mut p =
            CertificateParams::new(vec![node_id.to_string()]).map_err(PkiError::Generate)?;
        p.distinguished_name
            .push(DnType::CommonName, node_id.as_str());
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.not_before = now - time::Duration::hours(1);
        p.not_after = now + time::Duration::days(NODE_CERT_DAYS);
        p.serial_number = Some(random_serial()?);
        p.use_authority_key_identifier_extension = true;
        let cert = p
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(PkiError::Generate)?;
        Ok(cert.pem())
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
        let cert = p.signed_by(key, &self.issuer).map_err(PkiError::Generate)?;
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
        let der = pem_to_der(Path::new("x"), &pem).expect("der");
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
}
