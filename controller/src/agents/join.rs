//! Joining a node with one line: the packages the controller serves to nodes
//! (`GET /packages/<file>`: the agent package it was built with, the
//! `install-agent.sh` it carries, and any other `.deb` the operator put in
//! the packages directory for offline nodes), the `join.sh` it renders
//! (`GET /join.sh`) and the command shown with each install code.
//!
//! Invariants: every file is hashed once, when the controller starts, and
//! `join.sh` carries those SHA-256s, so a package changed on disk afterwards
//! is refused by the node, never installed; only names listed at start are
//! served (no path from the request reaches the file system); the values
//! written into the script are checked to be plain (host, port, base64, hex,
//! file names), so nothing in them can break out of its quotes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The script the controller fills in and serves as `/join.sh`.
const TEMPLATE: &str = include_str!("../../../packaging/join.sh");
/// The node-side installer `join.sh` downloads and runs.
pub const INSTALL_AGENT: &str = include_str!("../../../packaging/install-agent.sh");
/// The name `install-agent.sh` is served under, in `/packages/`.
pub const INSTALL_AGENT_NAME: &str = "install-agent.sh";
/// The agent package's file name starts with this.
pub const AGENT_PACKAGE_PREFIX: &str = "deployment-engine-agent_";

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("could not read the packages directory {path}")]
    ReadDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("could not read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One file nodes can download.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Package {
    pub name: String,
    /// Lower-case hex SHA-256, taken when the controller started.
    pub sha256: String,
    pub size: u64,
    /// `None`: served from memory (`install-agent.sh`).
    pub path: Option<PathBuf>,
}

/// What the controller offers nodes, read once at start.
#[derive(Debug, Clone, Default)]
pub struct Packages {
    files: BTreeMap<String, Package>,
    agent: Option<String>,
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// A file name that can be served and written into a shell script as is.
pub fn valid_package_name(name: &str) -> bool {
    name.len() <= 200
        && name.ends_with(".deb")
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'~'))
}

/// The Debian version in an agent package's file name (`NAME_VERSION_ARCH.deb`).
fn version_of(name: &str) -> Option<&str> {
    name.strip_prefix(AGENT_PACKAGE_PREFIX)?
        .strip_suffix(".deb")?
        .rsplit_once('_')
        .map(|(v, _arch)| v)
}

impl Packages {
    /// Reads `dirs` (missing ones add nothing; a later one's file wins over
    /// an earlier one's of the same name): every `.deb` with a plain name,
    /// hashed, plus `install-agent.sh`. The agent package is the one whose
    /// version is this controller's (`0.1.0-1`, `0.1.0-0~dev`, ...), else the
    /// last by name.
    pub fn scan(dirs: &[&Path]) -> Result<Packages, JoinError> {
        let mut files = BTreeMap::new();
        files.insert(
            INSTALL_AGENT_NAME.to_owned(),
            Package {
                name: INSTALL_AGENT_NAME.to_owned(),
                sha256: sha256_hex(INSTALL_AGENT.as_bytes()),
                size: INSTALL_AGENT.len() as u64,
                path: None,
            },
        );
        for dir in dirs {
            Self::scan_dir(dir, &mut files)?;
        }
        let ours = env!("CARGO_PKG_VERSION");
        let agents: Vec<&String> = files.keys().filter(|n| version_of(n).is_some()).collect();
        let agent = agents
            .iter()
            .rev()
            .find(|n| {
                version_of(n).is_some_and(|v| v.split_once('-').map_or(v, |(u, _)| u) == ours)
            })
            .or(agents.last())
            .map(|n| (*n).clone());
        Ok(Packages { files, agent })
    }

    /// Adds `dir`'s packages to `files` (a missing directory adds none).
    fn scan_dir(dir: &Path, files: &mut BTreeMap<String, Package>) -> Result<(), JoinError> {
        let read_dir = |source| JoinError::ReadDir {
            path: dir.to_owned(),
            source,
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(read_dir(e)),
        };
        for entry in entries {
            let entry = entry.map_err(read_dir)?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let path = entry.path();
            if !valid_package_name(&name) || !path.is_file() {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|source| JoinError::Read {
                path: path.clone(),
                source,
            })?;
            files.insert(
                name.clone(),
                Package {
                    name,
                    sha256: sha256_hex(&bytes),
                    size: bytes.len() as u64,
                    path: Some(path),
                },
            );
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<&Package> {
        self.files.get(name)
    }

    /// The agent package nodes install, if the directory holds one.
    pub fn agent(&self) -> Option<&Package> {
        self.agent.as_ref().and_then(|n| self.files.get(n))
    }

    pub fn all(&self) -> impl Iterator<Item = &Package> {
        self.files.values()
    }
}

/// What a node needs to join with one line; present when the API speaks HTTPS.
#[derive(Debug, Clone)]
pub struct Join {
    /// HOST:PORT nodes reach the API on.
    pub api: String,
    /// `sha256//BASE64` of the API certificate's public key.
    pub pin: String,
    pub packages: Packages,
}

/// A host:port, [v6]:port or pin that can sit in single quotes in a script.
fn plain(s: &str) -> bool {
    !s.is_empty()
        && s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(b, b'.' | b'-' | b':' | b'[' | b']' | b'/' | b'+' | b'=')
        })
}

impl Join {
    /// The API address nodes use: the host they dial for QUIC, the API's port.
    pub fn api_addr(agent_addr: &str, api_port: u16) -> String {
        let host = agent_addr.rsplit_once(':').map_or(agent_addr, |(h, _)| h);
        format!("{host}:{api_port}")
    }

    /// `join.sh` for nodes that dial `agent_addr`; `None` when there is no
    /// agent package to offer (the API answers 404 naming the fix).
    pub fn script(&self, agent_addr: &str) -> Option<String> {
        let agent = self.packages.agent()?;
        if !plain(agent_addr) || !plain(&self.api) || !plain(&self.pin) {
            return None;
        }
        let mut files = String::new();
        // install-agent.sh and the agent package first, then the extras.
        let first = [INSTALL_AGENT_NAME, agent.name.as_str()];
        for p in
            first
                .iter()
                .filter_map(|n| self.packages.get(n))
                .chain(self.packages.all().filter(|p| {
                    !first.contains(&p.name.as_str()) && !p.name.starts_with(AGENT_PACKAGE_PREFIX)
                }))
        {
            files.push_str(&format!("{} {}\n", p.name, p.sha256));
        }
        Some(
            TEMPLATE
                .replace("@CONTROLLER@", agent_addr)
                .replace("@API@", &self.api)
                .replace("@PIN@", &self.pin)
                .replace("@AGENT_PACKAGE@", &agent.name)
                .replace("@FILES@", files.trim_end()),
        )
    }

    /// The one line shown with an install code.
    pub fn command(&self, code: &str) -> String {
        format!(
            "curl -fsS --pinnedpubkey '{}' -k https://{}/join.sh | DE_INSTALL_CODE={code} bash",
            self.pin, self.api
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn join(dir: &Path) -> Join {
        Join {
            api: "ctl.example:50000".into(),
            pin: "sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=".into(),
            packages: Packages::scan(&[dir]).expect("scan"),
        }
    }

    #[test]
    fn the_script_names_every_file_with_the_sha256_it_had_at_start() {
        let dir = tempfile::tempdir().expect("tempdir");
        let agent = format!(
            "{AGENT_PACKAGE_PREFIX}{}-1_amd64.deb",
            env!("CARGO_PKG_VERSION")
        );
        std::fs::write(dir.path().join(&agent), b"agent").expect("write");
        std::fs::write(
            dir.path().join("deployment-engine-agent_0.0.1-1_amd64.deb"),
            b"old",
        )
        .expect("write");
        std::fs::write(dir.path().join("monit_5.33.0-1_amd64.deb"), b"monit").expect("write");
        // Not served: not a .deb, a name that could break the script, a directory.
        std::fs::write(dir.path().join("notes.txt"), b"x").expect("write");
        std::fs::write(dir.path().join("a'b.deb"), b"x").expect("write");
        std::fs::create_dir(dir.path().join("d.deb")).expect("mkdir");
        let j = join(dir.path());
        assert_eq!(
            j.packages.agent().map(|p| p.name.as_str()),
            Some(agent.as_str())
        );
        let names: Vec<&str> = j.packages.all().map(|p| p.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "deployment-engine-agent_0.0.1-1_amd64.deb",
                agent.as_str(),
                "install-agent.sh",
                "monit_5.33.0-1_amd64.deb"
            ]
        );
        let script = j.script("ctl.example:50001").expect("script");
        let files = format!(
            "files='install-agent.sh {}\n{agent} {}\nmonit_5.33.0-1_amd64.deb {}'",
            sha256_hex(INSTALL_AGENT.as_bytes()),
            sha256_hex(b"agent"),
            sha256_hex(b"monit")
        );
        assert!(script.contains(&files), "{script}");
        assert!(script.contains("controller='ctl.example:50001'"));
        assert!(!script.contains("'@"), "a placeholder is left: {script}");
        assert_eq!(
            j.command("0427"),
            "curl -fsS --pinnedpubkey 'sha256//AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=' -k https://ctl.example:50000/join.sh | DE_INSTALL_CODE=0427 bash"
        );
    }

    #[test]
    fn without_an_agent_package_or_with_an_odd_address_there_is_no_script() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(join(dir.path()).script("ctl.example:50001").is_none());
        std::fs::write(dir.path().join("deployment-engine-agent_9-1_all.deb"), b"a").expect("w");
        let j = join(dir.path());
        assert!(j.script("ctl.example:50001").is_some());
        assert!(j.script("x';reboot;'").is_none());
        assert_eq!(Join::api_addr("[::1]:50001", 443), "[::1]:443");
        assert_eq!(Join::api_addr("ctl:50001", 50000), "ctl:50000");
    }
}
