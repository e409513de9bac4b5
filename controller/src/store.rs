//! The controller's durable state behind a small trait, with sled as the engine.
//!
//! Invariant: `put` and `remove` return only once the change is flushed to
//! disk, so an API that answers 2xx after them has made the change durable.
//! Values are JSON so records can gain fields (with serde defaults) across
//! versions, and a person can read a dump.

use std::path::Path;

use serde::{Serialize, de::DeserializeOwned};

/// The key spaces of the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tree {
    /// Singletons: the install-code book, schema version.
    Meta,
    /// Enrolled nodes by id.
    Nodes,
    /// Steps by `node/lane/seq` (seq zero-padded, so keys sort by sequence).
    Steps,
    /// Step id -> its key in `Steps`.
    StepIds,
    /// The current plan, under the key `current`; the last applied one under `applied`.
    Plans,
    /// Deployments by id.
    Deployments,
    /// API tokens by name: role and SHA-256, never the token.
    Tokens,
    /// The audit log by sequence (zero-padded, so keys sort in order).
    Audit,
    /// Artifacts by name: their SHA-256, size and upload time.
    Artifacts,
}

impl Tree {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Tree::Meta => "meta",
            Tree::Nodes => "nodes",
            Tree::Steps => "steps",
            Tree::StepIds => "step-ids",
            Tree::Plans => "plans",
            Tree::Deployments => "deployments",
            Tree::Tokens => "tokens",
            Tree::Audit => "audit",
            Tree::Artifacts => "artifacts",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store engine failed on tree {tree}")]
    Engine {
        tree: &'static str,
        #[source]
        source: sled::Error,
    },
    #[error("record {key:?} in tree {tree} is not valid JSON for this version")]
    Corrupt {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode record {key:?} for tree {tree}")]
    Encode {
        tree: &'static str,
        key: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not open the store at {path}: is another de-controller using this data dir?")]
    Open {
        path: String,
        #[source]
        source: sled::Error,
    },
}

/// Durable key/value storage. Implementations must make `put`/`put_many`/`remove` durable before returning.
pub trait Store: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, tree: Tree, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Writes every record in order, then makes them all durable at once:
    /// one flush for the lot, where `put` would flush each.
    fn put_many(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<(), StoreError>;
    fn remove(&self, tree: Tree, key: &str) -> Result<(), StoreError>;
    fn list(&self, tree: Tree) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Records whose key starts with `prefix` and is >= `from`, in key order, at most `limit`.
    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
}

/// Typed JSON access on any [`Store`].
pub(crate) trait StoreExt: Store {
    fn get_json<T: DeserializeOwned>(
        &self,
        tree: Tree,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.get(tree, key)? {
            None => Ok(None),
            Some(bytes) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|source| StoreError::Corrupt {
                        tree: tree.name(),
                        key: key.to_owned(),
                        source,
                    })
            }
        }
    }

    fn put_json<T: Serialize>(&self, tree: Tree, key: &str, value: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(|source| StoreError::Encode {
            tree: tree.name(),
            key: key.to_owned(),
            source,
        })?;
        self.put(tree, key, &bytes)
    }

    fn list_json<T: DeserializeOwned>(&self, tree: Tree) -> Result<Vec<(String, T)>, StoreError> {
        self.list(tree)?
            .into_iter()
            .map(|(key, bytes)| match serde_json::from_slice(&bytes) {
                Ok(v) => Ok((key, v)),
                Err(source) => Err(StoreError::Corrupt {
                    tree: tree.name(),
                    key,
                    source,
                }),
            })
            .collect()
    }
}

impl<S: Store + ?Sized> StoreExt for S {}

/// Typed JSON scan on any [`Store`].
pub(crate) fn scan_json<T: DeserializeOwned>(
    store: &dyn Store,
    tree: Tree,
    prefix: &str,
    from: &str,
    limit: usize,
) -> Result<Vec<(String, T)>, StoreError> {
    store
        .scan(tree, prefix, from, limit)?
        .into_iter()
        .map(|(key, bytes)| match serde_json::from_slice(&bytes) {
            Ok(v) => Ok((key, v)),
            Err(source) => Err(StoreError::Corrupt {
                tree: tree.name(),
                key,
                source,
            }),
        })
        .collect()
}

/// [`Store`] on sled: one sled tree per [`Tree`], flushed on every write.
#[derive(Debug, Clone)]
pub(crate) struct SledStore {
    db: sled::Db,
    /// How long each flush took (`de_store_flush_duration_seconds`).
    flushes: std::sync::Arc<crate::metrics::Histogram>,
}

impl SledStore {
    pub(crate) fn open(path: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        Ok(SledStore {
            db,
            flushes: std::sync::Arc::new(crate::metrics::Histogram::new(
                crate::metrics::FLUSH_BOUNDS,
            )),
        })
    }

    /// The histogram of this store's flush times, for the metrics.
    pub(crate) fn flush_times(&self) -> std::sync::Arc<crate::metrics::Histogram> {
        self.flushes.clone()
    }

    fn tree(&self, tree: Tree) -> Result<sled::Tree, StoreError> {
        self.db
            .open_tree(tree.name())
            .map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })
    }

    fn flush(&self, tree: Tree) -> Result<(), StoreError> {
        let started = std::time::Instant::now();
        let flushed = self.db.flush();
        self.flushes.observe(started.elapsed());
        flushed.map(|_| ()).map_err(|source| StoreError::Engine {
            tree: tree.name(),
            source,
        })
    }
}

impl Store for SledStore {
    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.tree(tree)?
            .get(key.as_bytes())
            .map(|v| v.map(|iv| iv.to_vec()))
            .map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })
    }

    fn put(&self, tree: Tree, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.tree(tree)?
            .insert(key.as_bytes(), value)
            .map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })?;
        self.flush(tree)
    }

    fn put_many(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<(), StoreError> {
        let Some((first, _, _)) = records.first() else {
            return Ok(());
        };
        for (tree, key, value) in records {
            self.tree(*tree)?
                .insert(key.as_bytes(), value.as_slice())
                .map_err(|source| StoreError::Engine {
                    tree: tree.name(),
                    source,
                })?;
        }
        self.flush(*first)
    }

    fn remove(&self, tree: Tree, key: &str) -> Result<(), StoreError> {
        self.tree(tree)?
            .remove(key.as_bytes())
            .map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })?;
        self.flush(tree)
    }

    fn list(&self, tree: Tree) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.tree(tree)?;
        let mut out = Vec::new();
        for item in t.iter() {
            let (k, v) = item.map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })?;
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let t = self.tree(tree)?;
        let start = if from > prefix { from } else { prefix };
        let mut out = Vec::new();
        for item in t.range(start.as_bytes()..) {
            let (k, v) = item.map_err(|source| StoreError::Engine {
                tree: tree.name(),
                source,
            })?;
            if !k.starts_with(prefix.as_bytes()) || out.len() >= limit {
                break;
            }
            out.push((String::from_utf8_lossy(&k).into_owned(), v.to_vec()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_reopening_the_store() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            s.put_json(Tree::Nodes, "n1", &vec!["a", "b"]).expect("put");
            s.put_json(Tree::Nodes, "n2", &vec!["c"]).expect("put");
            s.remove(Tree::Nodes, "n2").expect("remove");
        }
        let s = crate::testkit::reopen(|| SledStore::open(dir.path()));
        let got: Option<Vec<String>> = s.get_json(Tree::Nodes, "n1").expect("get");
        assert_eq!(got, Some(vec!["a".to_owned(), "b".to_owned()]));
        let all: Vec<(String, Vec<String>)> = s.list_json(Tree::Nodes).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(s.get(Tree::Meta, "n1").expect("get"), None);
    }

    #[test]
    fn scans_stay_inside_the_prefix_in_key_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path()).expect("open");
        for k in ["a/1", "a/2", "a/3", "ab/1", "b/1"] {
            s.put(Tree::Steps, k, b"1").expect("put");
        }
        let keys = |prefix: &str, from: &str, limit: usize| -> Vec<String> {
            s.scan(Tree::Steps, prefix, from, limit)
                .expect("scan")
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys("a/", "", 10), ["a/1", "a/2", "a/3"]);
        assert_eq!(keys("a/", "a/2", 10), ["a/2", "a/3"]);
        assert_eq!(keys("a/", "a/2", 1), ["a/2"]);
        assert!(keys("c/", "", 10).is_empty());
    }

    #[test]
    fn a_corrupt_record_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = SledStore::open(dir.path()).expect("open");
        s.put(Tree::Nodes, "bad", b"{not json").expect("put");
        let err = s
            .get_json::<Vec<String>>(Tree::Nodes, "bad")
            .expect_err("corrupt");
        assert!(err.to_string().contains("\"bad\""), "{err}");
    }
}
