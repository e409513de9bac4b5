//! Named API tokens with roles, kept in the store as SHA-256 hashes.
//!
//! Invariants: a token is shown once, when it is created, and never stored,
//! logged or listed; a presented token is hashed and compared with every
//! stored hash in constant time. The first admin token is the controller's
//! `admin.token` file, stored under the name `admin` at the first start
//! (and re-read at each start while that record stands, so replacing the
//! file still replaces the token); once revoked it is never re-admitted.
//! The last admin token cannot be revoked, so the API cannot lock out its
//! operator.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use de_common::api::{Role, TokenCreated, TokenView};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError, StoreExt, Tree};
use crate::util::{NoRandomness, random_hex, rfc3339};

/// The name of the first admin token (the `admin.token` file).
const FIRST_ADMIN: &str = "admin";
/// `created_by` of the first admin token: no token created it.
const NOBODY: &str = "-";
/// The Meta key saying the first admin token was stored once.
const SEEDED_KEY: &str = "tokens-seeded";
/// The longest token name.
const MAX_NAME: usize = 64;

/// The token that made a request, as the token check found it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Caller {
    pub(crate) name: String,
    pub(crate) role: Role,
}

/// Why a token could not be created or revoked.
#[derive(Debug, thiserror::Error)]
pub(crate) enum TokensError {
    #[error(
        "token name {0:?} is not usable: use 1 to 64 of A-Z a-z 0-9 . _ - (not starting with a dot)"
    )]
    InvalidName(String),
    #[error("a token named {0:?} exists: revoke it first or pick another name")]
    Exists(String),
    #[error("no token named {0:?}: GET /api/v1/tokens lists them")]
    NotFound(String),
    #[error("{0:?} is the last admin token: create another admin token before revoking this one")]
    LastAdmin(String),
    #[error(transparent)]
    NoRandomness(#[from] NoRandomness),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One stored token: its hash, never the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    name: String,
    role: Role,
    /// Lowercase hex SHA-256 of the token.
    sha256: String,
    created_at: String,
    created_by: String,
}

impl Stored {
    fn view(&self) -> TokenView {
        TokenView {
            name: self.name.clone(),
            role: self.role,
            created_at: self.created_at.clone(),
            created_by: self.created_by.clone(),
        }
    }
}

fn sha256_hex(token: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, token.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The API tokens: a copy in memory for the check on every request, written
/// through to the store (durable before a change is answered).
#[derive(Debug)]
pub(crate) struct Tokens {
    store: Arc<dyn Store>,
    known: RwLock<BTreeMap<String, Stored>>,
}

impl Tokens {
    /// Loads the stored tokens; stores `first_admin` (the `admin.token`
    /// file) as `admin` at the first start, and refreshes its hash while
    /// that record stands.
    pub(crate) fn load(store: Arc<dyn Store>, first_admin: &str) -> Result<Tokens, StoreError> {
        let mut known: BTreeMap<String, Stored> = store
            .list_json::<Stored>(Tree::Tokens)?
            .into_iter()
            .collect();
        let seeded = store
            .get_json::<bool>(Tree::Meta, SEEDED_KEY)?
            .unwrap_or(false);
        let sha256 = sha256_hex(first_admin);
        let first = match known.get(FIRST_ADMIN) {
            None if !seeded => Some(Stored {
                name: FIRST_ADMIN.to_owned(),
                role: Role::Admin,
                sha256,
                created_at: rfc3339(SystemTime::now()),
                created_by: NOBODY.to_owned(),
            }),
            Some(s) if s.created_by == NOBODY && s.sha256 != sha256 => Some(Stored {
                sha256,
                ..s.clone()
            }),
            _ => None,
        };
        if let Some(first) = first {
            store.put_json(Tree::Tokens, FIRST_ADMIN, &first)?;
            known.insert(FIRST_ADMIN.to_owned(), first);
        }
        if !seeded {
            store.put_json(Tree::Meta, SEEDED_KEY, &true)?;
        }
        Ok(Tokens {
            store,
            known: RwLock::new(known),
        })
    }

    /// The token `presented` names, if it is a stored one. Every stored
    /// hash is compared, in constant time.
    pub(crate) fn check(&self, presented: &str) -> Option<Caller> {
        let hash = sha256_hex(presented);
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        let mut found = None;
        for s in known.values() {
            if constant_time_eq(hash.as_bytes(), s.sha256.as_bytes()) {
                found = Some(Caller {
                    name: s.name.clone(),
                    role: s.role,
                });
            }
        }
        found
    }

    /// Creates a token named `name` with `role`, on behalf of `by`; the
    /// answer holds the token, which is not kept.
    pub(crate) fn create(
        &self,
        name: &str,
        role: Role,
        by: &str,
    ) -> Result<TokenCreated, TokensError> {
        if !valid_name(name) {
            return Err(TokensError::InvalidName(name.to_owned()));
        }
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        if known.contains_key(name) {
            return Err(TokensError::Exists(name.to_owned()));
        }
        let token = random_hex(32)?;
        let stored = Stored {
            name: name.to_owned(),
            role,
            sha256: sha256_hex(&token),
            created_at: rfc3339(SystemTime::now()),
            created_by: by.to_owned(),
        };
        self.store.put_json(Tree::Tokens, name, &stored)?;
        let created = TokenCreated {
            name: name.to_owned(),
            role,
            token,
            created_at: stored.created_at.clone(),
        };
        known.insert(name.to_owned(), stored);
        Ok(created)
    }

    /// Every token, by name.
    pub(crate) fn list(&self) -> Vec<TokenView> {
        let known = self.known.read().unwrap_or_else(|e| e.into_inner());
        known.values().map(Stored::view).collect()
    }

    /// Revokes `name`: from the answer on, the token is refused (401).
    pub(crate) fn revoke(&self, name: &str) -> Result<TokenView, TokensError> {
        let mut known = self.known.write().unwrap_or_else(|e| e.into_inner());
        let Some(gone) = known.get(name).cloned() else {
            return Err(TokensError::NotFound(name.to_owned()));
        };
        let admins = known.values().filter(|s| s.role == Role::Admin).count();
        if gone.role == Role::Admin && admins == 1 {
            return Err(TokensError::LastAdmin(name.to_owned()));
        }
        self.store.remove(Tree::Tokens, name)?;
        known.remove(name);
        Ok(gone.view())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn open(dir: &std::path::Path, first: &str) -> Tokens {
        let store: Arc<dyn Store> = Arc::new(SledStore::open(dir).expect("store"));
        Tokens::load(store, first).expect("load")
    }

    #[test]
    fn the_first_admin_token_is_admin_and_others_get_their_role() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = open(dir.path(), "file-token");
        let admin = Caller {
            name: "admin".into(),
            role: Role::Admin,
        };
        assert_eq!(t.check("file-token"), Some(admin));
        assert_eq!(t.check("file-token "), None);
        assert_eq!(t.check(""), None);
        let viewer = t.create("viewer", Role::ReadOnly, "admin").expect("create");
        assert_eq!(viewer.token.len(), 64);
        assert_eq!(
            t.check(&viewer.token).map(|c| (c.name, c.role)),
            Some(("viewer".into(), Role::ReadOnly))
        );
        let names: Vec<(String, String)> = t
            .list()
            .into_iter()
            .map(|v| (v.name, v.created_by))
            .collect();
        assert_eq!(
            names,
            [
                ("admin".into(), "-".into()),
                ("viewer".into(), "admin".into())
            ]
        );
    }

    #[test]
    fn tokens_are_stored_hashed_and_survive_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let token = {
            let t = open(dir.path(), "file-token");
            t.create("ci", Role::Operator, "admin")
                .expect("create")
                .token
        };
        let store = SledStore::open(dir.path()).expect("store");
        for (name, bytes) in store.list(Tree::Tokens).expect("list") {
            let text = String::from_utf8_lossy(&bytes);
            assert!(
                !text.contains(&token) && !text.contains("file-token"),
                "{name}: {text}"
            );
        }
        drop(store);
        let t = open(dir.path(), "file-token");
        assert_eq!(t.check(&token).map(|c| c.role), Some(Role::Operator));
    }

    #[test]
    fn a_revoked_token_is_refused_and_the_first_one_stays_revoked() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let t = open(dir.path(), "file-token");
            assert!(matches!(
                t.revoke("admin"),
                Err(TokensError::LastAdmin(n)) if n == "admin"
            ));
            let other = t.create("root2", Role::Admin, "admin").expect("create");
            t.revoke("admin").expect("revoke");
            assert_eq!(t.check("file-token"), None);
            assert!(t.check(&other.token).is_some());
            assert!(matches!(t.revoke("admin"), Err(TokensError::NotFound(_))));
        }
        let t = open(dir.path(), "file-token");
        assert_eq!(t.check("file-token"), None, "revoked before the restart");
    }

    #[test]
    fn replacing_the_file_replaces_the_first_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        drop(open(dir.path(), "old"));
        let t = open(dir.path(), "new");
        assert_eq!(t.check("old"), None);
        assert_eq!(t.check("new").map(|c| c.name), Some("admin".into()));
    }

    #[test]
    fn names_are_checked_and_unique() {
        let dir = tempfile::tempdir().expect("tempdir");
        let t = open(dir.path(), "file-token");
        for bad in ["", ".hidden", "a/b", "with space", &"x".repeat(65)] {
            assert!(
                matches!(
                    t.create(bad, Role::ReadOnly, "admin"),
                    Err(TokensError::InvalidName(_))
                ),
                "{bad:?}"
            );
        }
        assert!(matches!(
            t.create("admin", Role::ReadOnly, "admin"),
            Err(TokensError::Exists(_))
        ));
        assert!(t.create("ci-1.prod_x", Role::ReadOnly, "admin").is_ok());
    }
}
