//! Operator intent: the instances an operator stopped through the API
//! (`PUT /deployment-engine/stop`, `dectl stop`, the console). A deployment
//! leaves them stopped, as BOSH's `stop` does, until they are started or
//! restarted through the API. Kept in the `plans` tree under `stopped`, as
//! `component@ip` keys; every change is on disk before the API answers.

use std::collections::BTreeSet;

use crate::store::{Store, StoreError, StoreExt, Tree};

const STOPPED_KEY: &str = "stopped";

/// `component@ip`: how the applied plan and the operator's stops name an instance.
pub(crate) fn key(component: &str, ip: &str) -> String {
    format!("{component}@{ip}")
}

/// The instances (`component@ip`) an operator stopped.
pub(crate) fn stopped(store: &dyn Store) -> Result<BTreeSet<String>, StoreError> {
    Ok(store
        .get_json(Tree::Plans, STOPPED_KEY)?
        .unwrap_or_default())
}

/// Records that an operator stopped (`stop` true) or started or restarted
/// (`stop` false) these instances; durable when this returns.
pub(crate) fn set_stopped(
    store: &dyn Store,
    instances: &[String],
    stop: bool,
) -> Result<(), StoreError> {
    let mut set = stopped(store)?;
    let before = set.clone();
    for k in instances {
        if stop {
            set.insert(k.clone());
        } else {
            set.remove(k);
        }
    }
    if set != before {
        store.put_json(Tree::Plans, STOPPED_KEY, &set)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    #[test]
    fn stops_are_kept_until_a_start_and_survive_a_reopen() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = SledStore::open(dir.path()).expect("open");
            assert!(stopped(&store).expect("read").is_empty());
            set_stopped(
                &store,
                &["nginx@10.0.0.2".into(), "nats@10.0.0.3".into()],
                true,
            )
            .expect("stop");
            set_stopped(&store, &["nats@10.0.0.3".into()], false).expect("start");
        }
        let store = crate::testkit::reopen(|| SledStore::open(dir.path()));
        let got: Vec<String> = stopped(&store).expect("read").into_iter().collect();
        assert_eq!(got, ["nginx@10.0.0.2"]);
    }
}
