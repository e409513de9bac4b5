//! What this node applied, per component instance: the fingerprint the
//! controller gave, and the content hashes of the files and the monit check
//! the instance's install wrote. Kept in `applied.json` in the state dir
//! (mode 0600) and compared with the disk for every inventory, so the
//! controller's next deployment repairs what drifted (a changed or missing
//! file, a deleted check) even when the plan did not change.
//!
//! Invariant: a mark is written only by a signed `MarkApplied` step, after
//! every install step of the instance succeeded on this lane; `Unmark`
//! removes it. Paths are resolved under the node root exactly as the file
//! steps resolve them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use de_common::{InstanceState, write_private};

use crate::monit::Monit;
use crate::steps::under_root;

/// Files larger than this are compared by size only (configs are small;
/// hashing a large binary every heartbeat is not worth it).
const HASH_LIMIT: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Mark {
    fingerprint: String,
    /// Path as the step named it, and its content hash when applied (None: absent then).
    files: Vec<(String, Option<String>)>,
    /// The monit check's name, and its file's hash when applied.
    check: Option<(String, Option<String>)>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Book {
    instances: BTreeMap<String, Mark>,
}

/// Why the book could not be read or saved.
#[derive(Debug, thiserror::Error)]
pub enum AppliedError {
    #[error("could not save {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged ({why}): remove it; the next deployment re-applies every instance")]
    Damaged { path: PathBuf, why: String },
}

/// The marks of this node, persisted.
#[derive(Debug)]
pub(crate) struct Applied {
    path: PathBuf,
    book: Mutex<Book>,
}

/// `sha256:HEX` of a file's content, `size:N` for a large one, None when it cannot be read.
fn hash_of(path: &Path) -> Option<String> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    if meta.len() > HASH_LIMIT {
        return Some(format!("size:{}", meta.len()));
    }
    let bytes = std::fs::read(path).ok()?;
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    Some(format!(
        "sha256:{}",
        d.as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ))
}

impl Applied {
    pub(crate) fn load(state_dir: &Path) -> Result<Applied, AppliedError> {
        let path = state_dir.join("applied.json");
        let book = match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| AppliedError::Damaged {
                path: path.clone(),
                why: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Book::default(),
            Err(e) => {
                return Err(AppliedError::Damaged {
                    path,
                    why: e.to_string(),
                });
            }
        };
        Ok(Applied {
            path,
            book: Mutex::new(book),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn save(&self, book: &Book) -> Result<(), AppliedError> {
        let bytes = serde_json::to_vec_pretty(book).map_err(|e| AppliedError::Damaged {
            path: self.path.clone(),
            why: e.to_string(),
        })?;
        write_private(&self.path, &bytes).map_err(|source| AppliedError::Write {
            path: self.path.clone(),
            source,
        })
    }

    fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
        under_root(root, path).ok()
    }

    /// Records `instance` as applied now, with the hashes its files and check have now.
    pub(crate) fn mark(
        &self,
        root: &Path,
        monit: &Monit,
        instance: &str,
        fingerprint: &str,
        files: &[String],
        check: Option<&str>,
    ) -> Result<String, AppliedError> {
        let mark = Mark {
            fingerprint: fingerprint.to_owned(),
            files: files
                .iter()
                .map(|f| (f.clone(), Self::resolve(root, f).and_then(|p| hash_of(&p))))
                .collect(),
            check: check.map(|name| {
                (
                    name.to_owned(),
                    monit.check_path(name).ok().and_then(|p| hash_of(&p)),
                )
            }),
        };
        let summary = format!(
            "{instance} applied ({fingerprint}): {} file(s){}",
            mark.files.len(),
            check
                .map(|c| format!(", monit check {c}"))
                .unwrap_or_default()
        );
        let mut book = self.lock();
        book.instances.insert(instance.to_owned(), mark);
        self.save(&book)?;
        Ok(summary)
    }

    /// Forgets `instance` (uninstalled).
    pub(crate) fn unmark(&self, instance: &str) -> Result<String, AppliedError> {
        let mut book = self.lock();
        if book.instances.remove(instance).is_some() {
            self.save(&book)?;
            Ok(format!("{instance} forgotten"))
        } else {
            Ok(format!("{instance} was not marked"))
        }
    }

    /// Every marked instance as it stands on disk now.
    pub(crate) fn inventory(&self, root: &Path, monit: &Monit) -> Vec<InstanceState> {
        let book = self.lock().clone();
        book.instances
            .into_iter()
            .map(|(instance, mark)| {
                let mut drift = Vec::new();
                for (f, was) in &mark.files {
                    let now = Self::resolve(root, f).and_then(|p| hash_of(&p));
                    match (was, now) {
                        (Some(_), None) => drift.push(format!("file {f} is missing")),
                        (Some(a), Some(b)) if *a != b => {
                            drift.push(format!("file {f} changed since it was applied"))
                        }
                        _ => {}
                    }
                }
                if let Some((name, was)) = &mark.check {
                    let now = monit.check_path(name).ok().and_then(|p| hash_of(&p));
                    match (was, now) {
                        (Some(_), None) => drift.push(format!("monit check {name} is missing")),
                        (Some(a), Some(b)) if *a != b => {
                            drift.push(format!("monit check {name} changed since it was applied"))
                        }
                        _ => {}
                    }
                }
                InstanceState {
                    instance,
                    fingerprint: mark.fingerprint,
                    drift,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_survive_a_restart_and_report_changed_missing_files_and_checks() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("root");
        let state = dir.path().join("state");
        std::fs::create_dir_all(root.join("etc")).expect("mkdir");
        std::fs::create_dir_all(&state).expect("mkdir");
        let monit = Monit::private(&dir.path().join("monit/monitrc")).expect("monit");
        std::fs::write(root.join("etc/app.conf"), "a=1").expect("write");
        std::fs::write(root.join("etc/other.conf"), "b=1").expect("write");
        let check = monit.check_path("app").expect("path");
        std::fs::write(&check, "check process app with pidfile /x").expect("write");

        let book = Applied::load(&state).expect("load");
        book.mark(
            &root,
            &monit,
            "app_0",
            "fp1",
            &["etc/app.conf".into(), "etc/other.conf".into()],
            Some("app"),
        )
        .expect("mark");
        let clean = book.inventory(&root, &monit);
        assert_eq!(
            clean,
            vec![InstanceState {
                instance: "app_0".into(),
                fingerprint: "fp1".into(),
                drift: vec![]
            }]
        );

        // Reloaded from disk, the same mark; now the node drifts.
        let book = Applied::load(&state).expect("reload");
        std::fs::write(root.join("etc/app.conf"), "a=2").expect("write");
        std::fs::remove_file(root.join("etc/other.conf")).expect("rm");
        std::fs::remove_file(&check).expect("rm");
        let drifted = book.inventory(&root, &monit);
        assert_eq!(
            drifted[0].drift,
            vec![
                "file etc/app.conf changed since it was applied".to_owned(),
                "file etc/other.conf is missing".to_owned(),
                "monit check app is missing".to_owned(),
            ]
        );
        book.unmark("app_0").expect("unmark");
        assert!(book.inventory(&root, &monit).is_empty());
        assert!(
            Applied::load(&state)
                .expect("reload")
                .inventory(&root, &monit)
                .is_empty()
        );
    }

    #[test]
    fn a_damaged_book_is_an_error_that_says_what_to_do() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("applied.json"), "{not json").expect("write");
        let e = Applied::load(dir.path()).expect_err("damaged");
        assert!(e.to_string().contains("remove it"), "{e}");
    }
}
