//! The node's identity in the agent's state dir: key, certificate, pinned CA
//! bundle, step-signing public key (and the previous one after a rotation),
//! where the controller is, and the nonce that tells this machine from a
//! clone. Every file is 0600.
//!
//! Invariant: a renewal never leaves the node without a working pair. The
//! new key and certificate are written as `node.next.key`/`node.next.pem`,
//! then renamed over the old ones; [`Identity::load`] takes whichever pair
//! on disk matches and lasts longest, and finishes a renewal it finds half
//! done.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use de_common::{NodeId, PreviousStepKey, Trust, ensure_private_dir, write_private};

const META: &str = "agent.json";
const KEY: &str = "node.key";
const CERT: &str = "node.pem";
const CA: &str = "ca.pem";
const STEP_KEY: &str = "step-key.pub";
const STEP_KEY_PREVIOUS: &str = "step-key.previous";
const NEXT_KEY: &str = "node.next.key";
const NEXT_CERT: &str = "node.next.pem";
const NONCE: &str = "machine.nonce";

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
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
    #[error("{path} is damaged: remove the state dir and enrol again with a new code")]
    Damaged { path: PathBuf },
}

/// What `agent.json` records (written last, so its presence means the identity is complete).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityMeta {
    pub node_id: NodeId,
    /// The controller's QUIC address as given at enrolment (HOST:PORT).
    pub controller: String,
    #[serde(default)]
    pub advertise_ip: Option<IpAddr>,
}

/// A complete node identity.
#[derive(Clone)]
pub struct Identity {
    pub meta: IdentityMeta,
    pub key_pem: String,
    pub cert_pem: String,
    pub ca_pem: String,
    pub step_public_key: Vec<u8>,
    /// The step key before the controller's last rotation, for the steps it signed.
    pub previous_step_key: Option<PreviousStepKey>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("meta", &self.meta)
            .finish_non_exhaustive()
    }
}

fn read(path: PathBuf) -> Result<Vec<u8>, IdentityError> {
    std::fs::read(&path).map_err(|source| IdentityError::Read { path, source })
}

fn read_text(path: PathBuf) -> Result<String, IdentityError> {
    let bytes = read(path.clone())?;
    String::from_utf8(bytes).map_err(|_| IdentityError::Damaged { path })
}

/// The public key of a key PEM (PKCS#8), as a certificate holds it.
fn key_public(key_pem: &str) -> Option<Vec<u8>> {
    rcgen::KeyPair::from_pem(key_pem)
        .ok()
        .map(|k| k.public_key_raw().to_vec())
}

/// A certificate PEM's validity (unix seconds) and public key.
pub(crate) fn cert_facts(cert_pem: &str) -> Option<(u64, u64, Vec<u8>)> {
    use rustls_pki_types::pem::PemObject;
    let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let (_, x) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    Some((
        u64::try_from(x.validity().not_before.timestamp()).ok()?,
        u64::try_from(x.validity().not_after.timestamp()).ok()?,
        x.public_key().subject_public_key.data.to_vec(),
    ))
}

fn read_opt(path: PathBuf) -> Result<Option<String>, IdentityError> {
    match std::fs::read(&path) {
        Ok(b) => Ok(String::from_utf8(b).ok()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(IdentityError::Read { path, source }),
    }
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), IdentityError> {
    let path = dir.join(name);
    write_private(&path, bytes).map_err(|source| IdentityError::Write { path, source })
}

fn rename(dir: &Path, from: &str, to: &str) -> Result<(), IdentityError> {
    std::fs::rename(dir.join(from), dir.join(to)).map_err(|source| IdentityError::Write {
        path: dir.join(to),
        source,
    })
}

/// The key and certificate to use: of the pairs on disk (the current one,
/// a renewal's new one, or a mix left by a crash between the two renames),
/// the one whose key matches its certificate and that lasts longest. The
/// files are then put in place, so `node.key`/`node.pem` hold it.
fn load_pair(dir: &Path) -> Result<(String, String), IdentityError> {
    let keys = [read_opt(dir.join(KEY))?, read_opt(dir.join(NEXT_KEY))?];
    let certs = [read_opt(dir.join(CERT))?, read_opt(dir.join(NEXT_CERT))?];
    let mut best: Option<(u64, usize, usize)> = None;
    for (ki, key) in keys.iter().enumerate() {
        let Some(public) = key.as_deref().and_then(key_public) else {
            continue;
        };
        for (ci, cert) in certs.iter().enumerate() {
            if let Some((_, not_after, cert_public)) = cert.as_deref().and_then(cert_facts)
                && cert_public == public
                && best.is_none_or(|(b, _, _)| not_after > b)
            {
                best = Some((not_after, ki, ci));
            }
        }
    }
    let Some((_, ki, ci)) = best else {
        return Err(IdentityError::Damaged {
            path: dir.join(CERT),
        });
    };
    let (Some(key), Some(cert)) = (keys[ki].clone(), certs[ci].clone()) else {
        return Err(IdentityError::Damaged {
            path: dir.join(CERT),
        });
    };
    if ci == 1 {
        rename(dir, NEXT_CERT, CERT)?;
    }
    if ki == 1 {
        rename(dir, NEXT_KEY, KEY)?;
    }
    for leftover in [NEXT_KEY, NEXT_CERT] {
        let _ = std::fs::remove_file(dir.join(leftover));
    }
    Ok((key, cert))
}

impl Identity {
    /// Whether the state dir holds a complete identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(META).is_file()
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let meta_path = dir.join(META);
        let meta: IdentityMeta = serde_json::from_slice(&read(meta_path.clone())?)
            .map_err(|_| IdentityError::Damaged { path: meta_path })?;
        let (key_pem, cert_pem) = load_pair(dir)?;
        let step_public_key = read(dir.join(STEP_KEY))?;
        let previous_step_key = read_opt(dir.join(STEP_KEY_PREVIOUS))?
            .and_then(|t| serde_json::from_str::<PreviousStepKey>(&t).ok())
            .filter(|p| p.public_key != step_public_key);
        Ok(Identity {
            meta,
            key_pem,
            cert_pem,
            ca_pem: read_text(dir.join(CA))?,
            step_public_key,
            previous_step_key,
        })
    }

    /// Puts a renewed key and certificate in place: both written in full
    /// under new names, then renamed over the old pair, so a crash between
    /// any two writes leaves a pair that [`Identity::load`] takes.
    pub(crate) fn save_renewed(
        &mut self,
        dir: &Path,
        key_pem: String,
        cert_pem: String,
    ) -> Result<(), IdentityError> {
        write(dir, NEXT_KEY, key_pem.as_bytes())?;
        write(dir, NEXT_CERT, cert_pem.as_bytes())?;
        rename(dir, NEXT_CERT, CERT)?;
        rename(dir, NEXT_KEY, KEY)?;
        self.key_pem = key_pem;
        self.cert_pem = cert_pem;
        Ok(())
    }

    /// Stores what the controller says to trust, when it changed: the CA
    /// bundle, the previous step key (before the current one, so a crash
    /// between leaves the current key with a stale previous, which load
    /// drops), then the current step key. True when anything changed.
    pub fn save_trust(&mut self, dir: &Path, trust: &Trust) -> Result<bool, IdentityError> {
        let mut changed = false;
        if trust.ca_pem != self.ca_pem {
            write(dir, CA, trust.ca_pem.as_bytes())?;
            self.ca_pem = trust.ca_pem.clone();
            changed = true;
        }
        if trust.previous_step_key != self.previous_step_key {
            match &trust.previous_step_key {
                Some(p) => {
                    let text = serde_json::to_vec(p).map_err(|_| IdentityError::Damaged {
                        path: dir.join(STEP_KEY_PREVIOUS),
                    })?;
                    write(dir, STEP_KEY_PREVIOUS, &text)?;
                }
                None => {
                    let _ = std::fs::remove_file(dir.join(STEP_KEY_PREVIOUS));
                }
            }
            self.previous_step_key = trust.previous_step_key.clone();
            changed = true;
        }
        if trust.step_public_key != self.step_public_key {
            write(dir, STEP_KEY, &trust.step_public_key)?;
            self.step_public_key = trust.step_public_key.clone();
            changed = true;
        }
        Ok(changed)
    }

    /// What tells this machine from a clone of its disk: a hash of a nonce
    /// made once in the state dir, the system's machine id and `ip`, this
    /// node's address toward the controller (a clone copies the first two,
    /// rarely the last).
    pub fn machine_id(dir: &Path, ip: IpAddr) -> Result<String, IdentityError> {
        let nonce = match read_opt(dir.join(NONCE))? {
            Some(n) if !n.trim().is_empty() => n,
            _ => {
                let mut b = [0u8; 16];
                ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b).map_err(
                    |_| IdentityError::Damaged {
                        path: dir.join(NONCE),
                    },
                )?;
                let n: String = b.iter().map(|x| format!("{x:02x}")).collect();
                write(dir, NONCE, n.as_bytes())?;
                n
            }
        };
        let system = std::fs::read_to_string("/etc/machine-id").unwrap_or_default();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in [nonce.trim(), system.trim(), &ip.to_string()] {
            ctx.update(part.as_bytes());
            ctx.update(b"\0");
        }
        Ok(ctx
            .finish()
            .as_ref()
            .iter()
            .take(16)
            .map(|x| format!("{x:02x}"))
            .collect())
    }

    /// Writes every file with mode 0600; `agent.json` last.
    pub fn save(&self, dir: &Path) -> Result<(), IdentityError> {
        let w = |name: &str, bytes: &[u8]| {
            let path = dir.join(name);
            write_private(&path, bytes).map_err(|source| IdentityError::Write { path, source })
        };
        ensure_private_dir(dir).map_err(|source| IdentityError::Write {
            path: dir.to_owned(),
            source,
        })?;
        w(KEY, self.key_pem.as_bytes())?;
        w(CERT, self.cert_pem.as_bytes())?;
        w(CA, self.ca_pem.as_bytes())?;
        w(STEP_KEY, &self.step_public_key)?;
        let meta = serde_json::to_vec_pretty(&self.meta).map_err(|_| IdentityError::Damaged {
            path: dir.join(META),
        })?;
        w(META, &meta)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A self-signed key and certificate valid from a minute ago for `secs` more.
    fn pair(secs: u64) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut p = rcgen::CertificateParams::new(vec!["n-1".to_owned()]).expect("params");
        let now = rcgen::date_time_ymd(1970, 1, 1)
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock");
        p.not_before = now - std::time::Duration::from_secs(60);
        p.not_after = now + std::time::Duration::from_secs(secs);
        let cert = p.self_signed(&key).expect("cert");
        (key.serialize_pem(), cert.pem())
    }

    #[test]
    fn a_renewal_cut_short_anywhere_leaves_a_working_pair() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent");
        let (old_key, old_cert) = pair(3600);
        let (new_key, new_cert) = pair(7200);
        let id = Identity {
            meta: IdentityMeta {
                node_id: "n-1".into(),
                controller: "127.0.0.1:50001".into(),
                advertise_ip: None,
            },
            key_pem: old_key.clone(),
            cert_pem: old_cert.clone(),
            ca_pem: "CA".into(),
            step_public_key: vec![1],
            previous_step_key: None,
        };
        // Each state a crash can leave, in the order `save_renewed` writes.
        let steps: [&[(&str, &str)]; 4] = [
            &[(NEXT_KEY, &new_key)],
            &[(NEXT_KEY, &new_key), (NEXT_CERT, &new_cert)],
            &[(NEXT_KEY, &new_key), (CERT, &new_cert)],
            &[(KEY, &new_key), (CERT, &new_cert)],
        ];
        for (i, files) in steps.iter().enumerate() {
            id.save(&state).expect("save");
            for (name, text) in *files {
                write(&state, name, text.as_bytes()).expect("write");
            }
            let back = Identity::load(&state).expect("load");
            let want = if i == 0 { &old_cert } else { &new_cert };
            assert_eq!(&back.cert_pem, want, "state {i}");
            assert_eq!(key_public(&back.key_pem), cert_facts(want).map(|f| f.2));
            // Loading put the pair in place and removed the leftovers.
            assert_eq!(&read_text(state.join(CERT)).expect("cert"), want);
            assert!(!state.join(NEXT_KEY).exists() && !state.join(NEXT_CERT).exists());
        }
        let mut id = Identity::load(&state).expect("load");
        id.save_renewed(&state, old_key, old_cert.clone())
            .expect("renew");
        assert_eq!(Identity::load(&state).expect("load").cert_pem, old_cert);
    }

    #[test]
    fn the_machine_id_is_stable_here_and_differs_with_the_nonce_or_the_address() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ip: IpAddr = "10.0.0.1".parse().expect("ip");
        ensure_private_dir(dir.path()).expect("dir");
        let a = Identity::machine_id(dir.path(), ip).expect("id");
        assert_eq!(a, Identity::machine_id(dir.path(), ip).expect("id"));
        assert_ne!(
            a,
            Identity::machine_id(dir.path(), "10.0.0.2".parse().expect("ip")).expect("id")
        );
        std::fs::remove_file(dir.path().join(NONCE)).expect("rm");
        assert_ne!(a, Identity::machine_id(dir.path(), ip).expect("id"));
    }

    #[test]
    fn identity_round_trips_with_private_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent");
        assert!(!Identity::exists(&state));
        let (key_pem, cert_pem) = pair(3600);
        let id = Identity {
            meta: IdentityMeta {
                node_id: "n-1".into(),
                controller: "127.0.0.1:50001".into(),
                advertise_ip: Some("127.0.0.2".parse().expect("ip")),
            },
            key_pem,
            cert_pem,
            ca_pem: "CA".into(),
            step_public_key: vec![1, 2, 3],
            previous_step_key: None,
        };
        id.save(&state).expect("save");
        assert!(Identity::exists(&state));
        let back = Identity::load(&state).expect("load");
        assert_eq!(back.meta, id.meta);
        assert_eq!(back.step_public_key, vec![1, 2, 3]);
        for f in [META, KEY, CERT, CA, STEP_KEY] {
            let mode = std::fs::metadata(state.join(f))
                .expect(f)
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
    }
}
