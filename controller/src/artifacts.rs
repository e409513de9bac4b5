//! Artifacts: files the controller holds for nodes (release tarballs,
//! binaries, `.deb`s), uploaded through the API and fetched by agents over
//! their links for `fetch` steps. Stored content-addressed under
//! `DATA/artifacts/sha256/<hex>`; names map to hashes in the store's
//! `artifacts` tree.
//!
//! Invariants: an upload goes to a private temporary file, is hashed as it
//! arrives, synced, checked against the expected SHA-256 when one is given,
//! and only then renamed into place and named in the store (flushed), so a
//! 2xx means the bytes are on disk with the hash they are named by; the same
//! bytes are never kept twice; a file is deleted only when no name refers to
//! it any more. Nothing here trusts a name from outside as a path: names are
//! checked, and paths are built from hashes this module computed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, StoreExt, Tree};

/// The default largest artifact, in MiB (`artifact_max_mb`).
pub const DEFAULT_ARTIFACT_MAX_MB: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactsError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the artifact is larger than the controller accepts ({limit_mb} MiB): raise artifact_max_mb, or upload a smaller file"
    )]
    TooBig { limit_mb: u64 },
    #[error(
        "the upload does not match the SHA-256 it was sent with (expected {expected}, got {got}): nothing was stored; upload the file again"
    )]
    HashMismatch { expected: String, got: String },
    #[error(
        "artifact name {0:?} is not valid: use 1-200 letters, digits, '.', '_', '-', '+' or '~', not starting with '.' or '-'"
    )]
    BadName(String),
    #[error("{0:?} is not a SHA-256: give 64 hex digits")]
    BadHash(String),
    #[error("no artifact named {0:?}; `dectl artifacts list` shows what the controller holds")]
    NotFound(String),
    #[error("the upload was cut short: {0}")]
    Body(String),
    #[error("{name} is not a Debian package dpkg-deb can read ({why}): nothing was stored")]
    BadDeb { name: String, why: String },
}

/// What the store keeps per name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactRecord {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub uploaded_at: String,
    /// For a `.deb`: its control fields as `dpkg-deb -f` prints them, for
    /// the Debian repository the controller gives nodes (`apt_repo` steps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb_control: Option<String>,
}

/// What rendering needs of one artifact.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub sha256: String,
    pub size: u64,
    pub deb_control: Option<String>,
}

/// Name -> what rendering `fetch` and `apt_repo` steps needs.
pub type ArtifactIndex = BTreeMap<String, IndexEntry>;

/// The control fields of the Debian package at `path`, as `dpkg-deb -f`
/// prints them; an error names what is wrong with the file. `Ok(None)`
/// where `dpkg-deb` is not installed (the package is then not offered in
/// the repository).
async fn deb_control(path: &Path) -> Result<Option<String>, String> {
    let out = match tokio::process::Command::new("dpkg-deb")
        .arg("-f")
        .arg(path)
        .output()
        .await
    {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("could not run dpkg-deb: {e}")),
    };
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_owned());
    }
    let text =
        String::from_utf8(out.stdout).map_err(|_| "its control fields are not UTF-8".to_owned())?;
    let has = |f: &str| text.lines().any(|l| l.starts_with(&format!("{f}: ")));
    if !(has("Package") && has("Version") && has("Architecture")) {
        return Err("its control fields lack Package, Version or Architecture".into());
    }
    Ok(Some(text.trim_end().to_owned()))
}

/// A name that can be stored, shown and written in a script as is.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 200
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'~'))
}

/// 64 lower-case hex digits.
pub fn valid_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The controller's artifacts.
pub struct Artifacts {
    dir: PathBuf,
    store: Arc<dyn Store>,
    /// Serialises naming and deleting (the files' fate depends on the names).
    names: Mutex<()>,
}

impl std::fmt::Debug for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Artifacts")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Artifacts {
    /// Opens `DATA/artifacts` (created, mode 0700), dropping uploads a crash
    /// left unfinished.
    pub fn open(data_dir: &Path, store: Arc<dyn Store>) -> Result<Artifacts, ArtifactsError> {
        let dir = data_dir.join("artifacts");
        for d in [dir.clone(), dir.join("sha256"), dir.join("tmp")] {
            de_common::ensure_private_dir(&d).map_err(|source| ArtifactsError::Io {
                what: "cannot create",
                path: d.clone(),
                source,
            })?;
        }
        if let Ok(entries) = std::fs::read_dir(dir.join("tmp")) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        Ok(Artifacts {
            dir,
            store,
            names: Mutex::new(()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Where the bytes of `sha256` are, if the controller holds them.
    pub fn path_of(&self, sha256: &str) -> Option<PathBuf> {
        if !valid_sha256(sha256) {
            return None;
        }
        let p = self.dir.join("sha256").join(sha256);
        p.is_file().then_some(p)
    }

    /// Every artifact, by name.
    pub fn list(&self) -> Result<Vec<ArtifactRecord>, StoreError> {
        let mut out = Vec::new();
        for (_, bytes) in self.store.list(Tree::Artifacts)? {
            if let Ok(r) = serde_json::from_slice::<ArtifactRecord>(&bytes) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Name -> (SHA-256, size) of every artifact whose bytes are here.
    pub fn index(&self) -> Result<ArtifactIndex, StoreError> {
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| self.path_of(&r.sha256).is_some())
            .map(|r| {
                (
                    r.name,
                    IndexEntry {
                        sha256: r.sha256,
                        size: r.size,
                        deb_control: r.deb_control,
                    },
                )
            })
            .collect())
    }

    pub fn get(&self, name: &str) -> Result<Option<ArtifactRecord>, ArtifactsError> {
        if !valid_name(name) {
            return Err(ArtifactsError::BadName(name.to_owned()));
        }
        Ok(self.store.get_json(Tree::Artifacts, name)?)
    }

    /// Stores the bytes of `body` under `name` (replacing what the name
    /// meant before), checked against `expected` when given, at most
    /// `limit` bytes. Returns once the bytes are on disk and the name is
    /// flushed.
    pub async fn put<S, E>(
        &self,
        name: &str,
        expected: Option<&str>,
        mut body: S,
        limit: u64,
    ) -> Result<ArtifactRecord, ArtifactsError>
    where
        S: futures_util::Stream<Item = Result<bytes::Bytes, E>> + Unpin,
        E: std::fmt::Display,
    {
        use futures_util::StreamExt as _;
        use tokio::io::AsyncWriteExt as _;
        if !valid_name(name) {
            return Err(ArtifactsError::BadName(name.to_owned()));
        }
        let expected = match expected {
            Some(e) => {
                let e = e.trim().to_ascii_lowercase();
                if !valid_sha256(&e) {
                    return Err(ArtifactsError::BadHash(e));
                }
                Some(e)
            }
            None => None,
        };
        let tmp = self.dir.join("tmp").join(format!(
            "{}.part",
            crate::util::random_hex(16).map_err(|_| ArtifactsError::Body(
                "no system randomness for a temporary name".into()
            ))?
        ));
        let io = |what, path: &Path| {
            let path = path.to_owned();
            move |source| ArtifactsError::Io { what, path, source }
        };
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .await
            .map_err(io("cannot create", &tmp))?;
        let result: Result<(String, u64), ArtifactsError> = async {
            let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
            let mut size = 0u64;
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| ArtifactsError::Body(e.to_string()))?;
                size += chunk.len() as u64;
                if size > limit {
                    return Err(ArtifactsError::TooBig {
                        limit_mb: limit >> 20,
                    });
                }
                hash.update(&chunk);
                file.write_all(&chunk)
                    .await
                    .map_err(io("cannot write", &tmp))?;
            }
            file.sync_all().await.map_err(io("cannot write", &tmp))?;
            Ok((hex(hash.finish().as_ref()), size))
        }
        .await;
        drop(file);
        let (sha256, size) = match result {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        if let Some(expected) = expected
            && expected != sha256
        {
            let _ = std::fs::remove_file(&tmp);
            return Err(ArtifactsError::HashMismatch {
                expected,
                got: sha256,
            });
        }
        let deb_control = if name.ends_with(".deb") {
            match deb_control(&tmp).await {
                Ok(c) => c,
                Err(why) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(ArtifactsError::BadDeb {
                        name: name.to_owned(),
                        why,
                    });
                }
            }
        } else {
            None
        };
        let record = ArtifactRecord {
            name: name.to_owned(),
            sha256: sha256.clone(),
            size,
            uploaded_at: crate::util::rfc3339(std::time::SystemTime::now()),
            deb_control,
        };
        let _names = self.lock();
        let dest = self.dir.join("sha256").join(&sha256);
        if dest.is_file() {
            // The same bytes are here already: never kept twice.
            let _ = std::fs::remove_file(&tmp);
        } else {
            std::fs::rename(&tmp, &dest).map_err(io("cannot store", &dest))?;
            if let Ok(d) = std::fs::File::open(self.dir.join("sha256")) {
                let _ = d.sync_all();
            }
        }
        let previous: Option<ArtifactRecord> = self.store.get_json(Tree::Artifacts, name)?;
        self.store.put_json(Tree::Artifacts, name, &record)?;
        if let Some(p) = previous
            && p.sha256 != sha256
        {
            self.drop_unnamed(&p.sha256)?;
        }
        Ok(record)
    }

    /// Forgets `name`; its bytes go when no other name refers to them.
    pub fn delete(&self, name: &str) -> Result<ArtifactRecord, ArtifactsError> {
        let _names = self.lock();
        let record = self
            .get(name)?
            .ok_or_else(|| ArtifactsError::NotFound(name.to_owned()))?;
        self.store.remove(Tree::Artifacts, name)?;
        self.drop_unnamed(&record.sha256)?;
        Ok(record)
    }

    /// Deletes the bytes of `sha256` if no name refers to them (names locked).
    fn drop_unnamed(&self, sha256: &str) -> Result<(), ArtifactsError> {
        if self.list()?.iter().any(|r| r.sha256 == sha256) {
            return Ok(());
        }
        if let Some(p) = self.path_of(sha256) {
            let _ = std::fs::remove_file(p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(
        parts: &[&[u8]],
    ) -> impl futures_util::Stream<Item = Result<bytes::Bytes, String>> + Unpin {
        futures_util::stream::iter(
            parts
                .iter()
                .map(|p| Ok(bytes::Bytes::copy_from_slice(p)))
                .collect::<Vec<_>>(),
        )
    }

    fn sha(b: &[u8]) -> String {
        hex(ring::digest::digest(&ring::digest::SHA256, b).as_ref())
    }

    fn open(dir: &Path) -> Artifacts {
        let store: Arc<dyn Store> =
            Arc::new(crate::store::SledStore::open(&dir.join("store")).expect("store"));
        Artifacts::open(dir, store).expect("open")
    }

    #[tokio::test]
    async fn an_upload_is_stored_by_its_hash_once_and_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = open(dir.path());
        let r = a
            .put("app.tgz", None, stream(&[b"hello ", b"world"]), 1 << 20)
            .await
            .expect("put");
        assert_eq!(
            (r.sha256.as_str(), r.size),
            (sha(b"hello world").as_str(), 11)
        );
        assert_eq!(
            std::fs::read(a.path_of(&r.sha256).expect("path")).expect("read"),
            b"hello world"
        );
        // The same bytes under another name: one file.
        a.put(
            "copy.tgz",
            Some(&r.sha256),
            stream(&[b"hello world"]),
            1 << 20,
        )
        .await
        .expect("copy");
        let files = std::fs::read_dir(dir.path().join("artifacts/sha256"))
            .expect("dir")
            .count();
        assert_eq!(files, 1);
        // Deleting one name keeps the bytes for the other; the last one takes them.
        a.delete("app.tgz").expect("delete");
        assert!(a.path_of(&r.sha256).is_some());
        a.delete("copy.tgz").expect("delete");
        assert!(a.path_of(&r.sha256).is_none());
        assert!(matches!(
            a.delete("copy.tgz"),
            Err(ArtifactsError::NotFound(_))
        ));
    }

    #[tokio::test]
    async fn a_wrong_hash_a_big_body_and_a_bad_name_store_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let a = open(dir.path());
        let wrong = "0".repeat(64);
        let e = a
            .put("x", Some(&wrong), stream(&[b"data"]), 1 << 20)
            .await
            .expect_err("mismatch");
        assert!(matches!(e, ArtifactsError::HashMismatch { .. }), "{e}");
        let e = a
            .put("x", None, stream(&[&[0u8; 600], &[0u8; 600]]), 1000)
            .await
            .expect_err("big");
        assert!(matches!(e, ArtifactsError::TooBig { .. }), "{e}");
        for bad in ["", "../x", "a/b", ".hidden", "-x", "a b"] {
            assert!(
                a.put(bad, None, stream(&[b"d"]), 10).await.is_err(),
                "{bad:?}"
            );
        }
        assert!(a.list().expect("list").is_empty());
        let leftovers = std::fs::read_dir(dir.path().join("artifacts/tmp"))
            .expect("dir")
            .count()
            + std::fs::read_dir(dir.path().join("artifacts/sha256"))
                .expect("dir")
                .count();
        assert_eq!(leftovers, 0);
    }
}
