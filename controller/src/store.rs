//! The controller's durable state behind a small trait, with sled as the engine.
//!
//! Invariant: `put` and `remove` return only once the change is flushed to
//! disk, so an API that answers 2xx after them has made the change durable.
//! `apply` writes without waiting, and its caller waits for the mark it got
//! (`sync`, or `synced` on the runtime) before it answers anyone: the
//! flushes are group commits on the store's flusher thread
//! (`group_commit.rs`), one for every writer waiting at that moment.
//! Values are JSON so records can gain fields (with serde defaults) across
//! versions, and a person can read a dump.

use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use serde::{Serialize, de::DeserializeOwned};

use crate::group_commit::GroupCommit;
pub(crate) use crate::group_commit::Written;

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
    const ALL: [Tree; 9] = [
        Tree::Meta,
        Tree::Nodes,
        Tree::Steps,
        Tree::StepIds,
        Tree::Plans,
        Tree::Deployments,
        Tree::Tokens,
        Tree::Audit,
        Tree::Artifacts,
    ];

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
    #[error("key {key:?} in tree {tree} is not of the form this version writes")]
    BadKey { tree: &'static str, key: String },
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
    #[error("could not flush the store's writes to disk")]
    Flush {
        #[source]
        source: Arc<sled::Error>,
    },
    #[error("could not start the store's flusher thread")]
    Flusher(#[source] std::io::Error),
}

/// A wait for the disk that holds no thread.
pub(crate) type Synced<'a> = Pin<Box<dyn Future<Output = Result<(), StoreError>> + Send + 'a>>;

/// Durable key/value storage. Implementations must make `put`/`put_many`/`remove` durable before returning.
pub trait Store: Send + Sync + 'static {
    fn get(&self, tree: Tree, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put(&self, tree: Tree, key: &str, value: &[u8]) -> Result<(), StoreError>;
    /// Writes every record in order, then makes them all durable at once:
    /// one flush for the lot, where `put` would flush each.
    fn put_many(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<(), StoreError>;
    fn remove(&self, tree: Tree, key: &str) -> Result<(), StoreError>;
    /// Removes every record in order, then makes that durable at once: one
    /// flush for the lot, where `remove` would flush each.
    fn remove_many(&self, keys: &[(Tree, String)]) -> Result<(), StoreError>;
    /// Writes every record in order without waiting for the disk; durable
    /// once the mark it answers is synced ([`Store::sync`], [`Store::synced`]).
    /// Others may read the records at once.
    fn apply(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<Written, StoreError>;
    /// The mark of every write applied so far.
    fn mark(&self) -> Written;
    /// Blocks until every write up to `upto` is on disk.
    fn sync(&self, upto: Written) -> Result<(), StoreError>;
    /// Waits, without holding a thread, until every write up to `upto` is on disk.
    fn synced(&self, upto: Written) -> Synced<'_>;
    fn list(&self, tree: Tree) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Records whose key starts with `prefix` and is >= `from`, in key order, at most `limit`.
    fn scan(
        &self,
        tree: Tree,
        prefix: &str,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The last key of `tree` that starts with `prefix`, if any.
    fn last_key(&self, tree: Tree, prefix: &str) -> Result<Option<String>, StoreError>;
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
        self.put(tree, key, &encode(tree, key, value)?)
    }

    /// [`Store::apply`] of one record: written, durable once its mark is synced.
    fn apply_json<T: Serialize>(
        &self,
        tree: Tree,
        key: &str,
        value: &T,
    ) -> Result<Written, StoreError> {
        self.apply(&[(tree, key.to_owned(), encode(tree, key, value)?)])
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

fn encode<T: Serialize>(tree: Tree, key: &str, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        tree: tree.name(),
        key: key.to_owned(),
        source,
    })
}

/// Calls `f` with each record of `tree` in key order, read `page` at a
/// time: for a tree too large to hold at once (every step ever run).
pub(crate) fn for_each_paged(
    store: &dyn Store,
    tree: Tree,
    page: usize,
    mut f: impl FnMut(String, Vec<u8>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut from = String::new();
    loop {
        let records = store.scan(tree, "", &from, page)?;
        let Some((last, _)) = records.last() else {
            return Ok(());
        };
        from = format!("{last}\u{0}");
        for (key, bytes) in records {
            f(key, bytes)?;
        }
    }
}

/// `bytes`, the record `key` of `tree`, decoded as JSON.
pub(crate) fn decode_json<T: DeserializeOwned>(
    tree: Tree,
    key: &str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|source| StoreError::Corrupt {
        tree: tree.name(),
        key: key.to_owned(),
        source,
    })
}

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
        .map(|(key, bytes)| decode_json(tree, &key, &bytes).map(|v| (key, v)))
        .collect()
}

/// [`Store`] on sled: one sled tree per [`Tree`]; writers wait for a
/// group commit on the flusher thread.
#[derive(Debug, Clone)]
pub(crate) struct SledStore {
    inner: Arc<SledInner>,
}

#[derive(Debug)]
struct SledInner {
    /// In the order of [`Tree::ALL`].
    trees: Vec<sled::Tree>,
    /// Holds its own handle of the engine; stopped (after a last flush) when
    /// the store is dropped.
    commit: GroupCommit,
    /// How long each flush took (`de_store_flush_duration_seconds`).
    flush_times: Arc<crate::metrics::Histogram>,
}

/// The engine's page cache. sled's default (1 GiB) let the controller's
/// RSS follow the store's size: 941 MiB idle under 10,000 agents with a
/// 570 MB store of past steps, against 608 MiB with a new one. 128 MiB
/// saved no memory over 256 (979 against 1,000 MiB on that store: sled
/// counts pages by their encoded size) and cost CPU, each agent's pull
/// then reading its lane's page from the log again.
const CACHE_BYTES: u64 = 256 << 20;

impl SledStore {
    pub(crate) fn open(path: &Path) -> Result<SledStore, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(CACHE_BYTES)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let mut trees = Vec::with_capacity(Tree::ALL.len());
        for tree in Tree::ALL {
            trees.push(
                db.open_tree(tree.name())
                    .map_err(|source| StoreError::Engine {
                        tree: tree.name(),
                        source,
                    })?,
            );
        }
        let flush_times = Arc::new(crate::metrics::Histogram::new(crate::metrics::FLUSH_BOUNDS));
        let timed = flush_times.clone();
        let commit = GroupCommit::start(move || {
            let started = std::time::Instant::now();
            let flushed = db.flush().map(|_| ());
            timed.observe(started.elapsed());
            flushed
        })
        .map_err(StoreError::Flusher)?;
        Ok(SledStore {
            inner: Arc::new(SledInner {
                trees,
                commit,
                flush_times,
            }),
        })
    }

    /// The histogram of this store's flush times (one per group commit), for
    /// the metrics.
    pub(crate) fn flush_times(&self) -> Arc<crate::metrics::Histogram> {
        self.inner.flush_times.clone()
    }

    fn tree(&self, tree: Tree) -> Result<&sled::Tree, StoreError> {
        Tree::ALL
            .iter()
            .position(|t| *t == tree)
            .and_then(|i| self.inner.trees.get(i))
            .ok_or(StoreError::Engine {
                tree: tree.name(),
                source: sled::Error::ReportableBug(format!("tree {} not open", tree.name())),
            })
    }

    #[cfg(test)]
    pub(crate) fn flushes(&self) -> u64 {
        self.inner.commit.flushes()
    }
}

fn flush_failed(source: Arc<sled::Error>) -> StoreError {
    StoreError::Flush { source }
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
        self.sync(self.apply(&[(tree, key.to_owned(), value.to_vec())])?)
    }

    fn put_many(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<(), StoreError> {
        if records.is_empty() {
            return Ok(());
        }
        self.sync(self.apply(records)?)
    }

    fn remove(&self, tree: Tree, key: &str) -> Result<(), StoreError> {
        self.remove_many(&[(tree, key.to_owned())])
    }

    fn remove_many(&self, keys: &[(Tree, String)]) -> Result<(), StoreError> {
        if keys.is_empty() {
            return Ok(());
        }
        for (tree, key) in keys {
            self.tree(*tree)?
                .remove(key.as_bytes())
                .map_err(|source| StoreError::Engine {
                    tree: tree.name(),
                    source,
                })?;
        }
        self.sync(self.inner.commit.applied())
    }

    fn apply(&self, records: &[(Tree, String, Vec<u8>)]) -> Result<Written, StoreError> {
        if records.is_empty() {
            return Ok(self.mark());
        }
        for (tree, key, value) in records {
            self.tree(*tree)?
                .insert(key.as_bytes(), value.as_slice())
                .map_err(|source| StoreError::Engine {
                    tree: tree.name(),
                    source,
                })?;
        }
        Ok(self.inner.commit.applied())
    }

    fn mark(&self) -> Written {
        self.inner.commit.mark()
    }

    fn sync(&self, upto: Written) -> Result<(), StoreError> {
        self.inner.commit.sync(upto).map_err(flush_failed)
    }

    fn synced(&self, upto: Written) -> Synced<'_> {
        Box::pin(async move { self.inner.commit.synced(upto).await.map_err(flush_failed) })
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

    fn last_key(&self, tree: Tree, prefix: &str) -> Result<Option<String>, StoreError> {
        match self.tree(tree)?.scan_prefix(prefix.as_bytes()).next_back() {
            None => Ok(None),
            Some(item) => {
                let (k, _) = item.map_err(|source| StoreError::Engine {
                    tree: tree.name(),
                    source,
                })?;
                Ok(Some(String::from_utf8_lossy(&k).into_owned()))
            }
        }
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
            s.put_json(Tree::Nodes, "n3", &vec!["d"]).expect("put");
            s.put_json(Tree::Steps, "n3/x", &vec!["e"]).expect("put");
            s.remove_many(&[(Tree::Nodes, "n3".into()), (Tree::Steps, "n3/x".into())])
                .expect("remove_many");
        }
        let s = crate::testkit::reopen(|| SledStore::open(dir.path()));
        let got: Option<Vec<String>> = s.get_json(Tree::Nodes, "n1").expect("get");
        assert_eq!(got, Some(vec!["a".to_owned(), "b".to_owned()]));
        let all: Vec<(String, Vec<String>)> = s.list_json(Tree::Nodes).expect("list");
        assert_eq!(all.len(), 1);
        assert_eq!(s.get(Tree::Meta, "n1").expect("get"), None);
        assert_eq!(s.get(Tree::Steps, "n3/x").expect("get"), None);
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
    fn concurrent_writers_share_flushes_and_every_write_survives() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            std::thread::scope(|scope| {
                for i in 0..16 {
                    let s = &s;
                    scope.spawn(move || {
                        for j in 0..8 {
                            s.put(Tree::Nodes, &format!("n{i:02}-{j}"), b"1")
                                .expect("put");
                        }
                    });
                }
            });
            assert!(
                s.flushes() < 128,
                "128 writes by 16 writers took {} flushes",
                s.flushes()
            );
        }
        let s = crate::testkit::reopen(|| SledStore::open(dir.path()));
        assert_eq!(s.list(Tree::Nodes).expect("list").len(), 128);
    }

    #[tokio::test]
    async fn an_applied_write_is_read_at_once_and_durable_once_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = SledStore::open(dir.path()).expect("open");
            let w = s.apply_json(Tree::Steps, "a/1", &"queued").expect("apply");
            assert_eq!(
                s.get(Tree::Steps, "a/1").expect("get"),
                Some(b"\"queued\"".to_vec())
            );
            assert!(s.mark() >= w);
            s.synced(w).await.expect("synced");
        }
        let s = crate::testkit::reopen(|| SledStore::open(dir.path()));
        let got: Option<String> = s.get_json(Tree::Steps, "a/1").expect("get");
        assert_eq!(got.as_deref(), Some("queued"));
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
