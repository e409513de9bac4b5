//! The node's identity in the agent's state dir: key, certificate, pinned CA,
//! step-signing public key, and where the controller is. Every file is 0600.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use de_common::{NodeId, ensure_private_dir, write_private};

const META: &str = "agent.json";
const KEY: &str = "node.key";
const CERT: &str = "node.pem";
const CA: &str = "ca.pem";
const STEP_KEY: &str = "step-key.pub";

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

impl Identity {
    /// Whether the state dir holds a complete identity.
    pub fn exists(dir: &Path) -> bool {
        dir.join(META).is_file()
    }

    pub fn load(dir: &Path) -> Result<Identity, IdentityError> {
        let meta_path = dir.join(META);
        let meta: IdentityMeta = serde_json::from_slice(&read(meta_path.clone())?)
            .map_err(|_| IdentityError::Damaged { path: meta_path })?;
        Ok(Identity {
            meta,
            key_pem: read_text(dir.join(KEY))?,
            cert_pem: read_text(dir.join(CERT))?,
            ca_pem: read_text(dir.join(CA))?,
            step_public_key: read(dir.join(STEP_KEY))?,
        })
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

    #[test]
    fn identity_round_trips_with_private_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("agent");
        assert!(!Identity::exists(&state));
        let id = Identity {
            meta: IdentityMeta {
                node_id: "n-1".into(),
                controller: "127.0.0.1:50001".into(),
                advertise_ip: Some("127.0.0.2".parse().expect("ip")),
            },
            key_pem: "KEY".into(),
            cert_pem: "CERT".into(),
            ca_pem: "CA".into(),
            step_public_key: vec![1, 2, 3],
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
