//! The audit log: one entry for every action a token asked for (which
//! token, what, on which nodes), kept in the store, newest last, at most
//! [`AUDIT_KEEP`] entries.
//!
//! Invariants: an entry is durable before the action it records is queued
//! or answered; entries hold names and summaries, never tokens or plan
//! secrets.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use de_common::api::{AuditAction, AuditEntry};

use super::Caller;
use crate::store::{Store, StoreError, StoreExt, Tree, scan_json};
use crate::util::rfc3339;

/// How many entries are kept; the oldest go first.
pub(crate) const AUDIT_KEEP: u64 = 10_000;

/// The longest `detail` kept, in characters.
const MAX_DETAIL: usize = 200;

fn key(seq: u64) -> String {
    format!("{seq:020}")
}

/// The audit log, appended under a lock that gives each entry its sequence.
#[derive(Debug)]
pub(crate) struct Audit {
    store: Arc<dyn Store>,
    /// The sequence of the newest entry (0: none yet).
    last: Mutex<u64>,
}

impl Audit {
    pub(crate) fn open(store: Arc<dyn Store>) -> Result<Audit, StoreError> {
        let last = store
            .list(Tree::Audit)?
            .last()
            .and_then(|(k, _)| k.parse().ok())
            .unwrap_or(0);
        Ok(Audit {
            store,
            last: Mutex::new(last),
        })
    }

    /// Appends an entry and returns it once it is on disk. `detail` is cut
    /// to its first line and 200 characters.
    pub(crate) fn record(
        &self,
        caller: &Caller,
        action: AuditAction,
        targets: Vec<String>,
        detail: &str,
    ) -> Result<AuditEntry, StoreError> {
        let first_line = detail.lines().next().unwrap_or_default();
        let cut = first_line.chars().count() > MAX_DETAIL || detail.lines().nth(1).is_some();
        let mut detail: String = first_line.chars().take(MAX_DETAIL).collect();
        if cut {
            detail.push('…');
        }
        let entry = AuditEntry {
            at: rfc3339(SystemTime::now()),
            token: caller.name.clone(),
            action,
            targets,
            detail,
        };
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        let seq = *last + 1;
        self.store.put_json(Tree::Audit, &key(seq), &entry)?;
        *last = seq;
        if seq > AUDIT_KEEP {
            self.store.remove(Tree::Audit, &key(seq - AUDIT_KEEP))?;
        }
        Ok(entry)
    }

    /// The newest `limit` entries, newest first.
    pub(crate) fn newest(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let last = *self.last.lock().unwrap_or_else(|e| e.into_inner());
        let from = last.saturating_sub(limit as u64).saturating_add(1);
        let mut entries: Vec<AuditEntry> =
            scan_json(&*self.store, Tree::Audit, "", &key(from), limit)?
                .into_iter()
                .map(|(_, e)| e)
                .collect();
        entries.reverse();
        Ok(entries)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use de_common::api::Role;

    fn caller(name: &str) -> Caller {
        Caller {
            name: name.to_owned(),
            role: Role::Operator,
        }
    }

    #[test]
    fn entries_come_back_newest_first_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store"));
            let a = Audit::open(store).expect("open");
            a.record(
                &caller("ci"),
                AuditAction::Exec,
                vec!["n-1".into()],
                "uptime",
            )
            .expect("record");
            a.record(
                &caller("ops"),
                AuditAction::Restart,
                vec!["n-2".into()],
                "nats",
            )
            .expect("record");
        }
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let a = Audit::open(store).expect("open");
        a.record(&caller("ci"), AuditAction::Deploy, Vec::new(), "d-1")
            .expect("record");
        let all = a.newest(10).expect("newest");
        let seen: Vec<(&str, AuditAction)> =
            all.iter().map(|e| (e.token.as_str(), e.action)).collect();
        assert_eq!(
            seen,
            [
                ("ci", AuditAction::Deploy),
                ("ops", AuditAction::Restart),
                ("ci", AuditAction::Exec)
            ]
        );
        assert_eq!(all[2].targets, ["n-1"]);
        let two = a.newest(2).expect("newest");
        assert_eq!(two.len(), 2);
        assert_eq!(two[0].action, AuditAction::Deploy);
    }

    #[test]
    fn a_long_or_multiline_detail_is_cut() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("store"));
        let a = Audit::open(store).expect("open");
        let e = a
            .record(
                &caller("ci"),
                AuditAction::Exec,
                Vec::new(),
                "echo a\necho b",
            )
            .expect("record");
        assert_eq!(e.detail, "echo a…");
        let e = a
            .record(
                &caller("ci"),
                AuditAction::Exec,
                Vec::new(),
                &"x".repeat(300),
            )
            .expect("record");
        assert_eq!(e.detail.chars().count(), MAX_DETAIL + 1);
        let e = a
            .record(&caller("ci"), AuditAction::Exec, Vec::new(), "uptime")
            .expect("record");
        assert_eq!(e.detail, "uptime");
    }
}
