//! Plans: the original config JSON (`components`: name -> node IPs,
//! `properties`) in typed form, and the current plan in the store.
//!
//! Invariant: secrets (`password`, `root`) are kept in the store as given but
//! never appear in `Debug` output, logs or API answers: readers get
//! [`Plan::redacted`], where they read `"******"`.

//!
//! The folder is the plan domain: `catalog` (component definitions, built-in
//! and the operator's), `render` (templates -> steps for one instance),
//! `validate` (pure validation: JSON in, a `ValidPlan` or every problem out).

pub(crate) mod catalog;
pub(crate) mod render;
pub(crate) mod rollout;
pub(crate) mod validate;

pub use catalog::{Cardinality, Catalogs};
pub(crate) use catalog::{Catalog, CatalogError};
pub(crate) use validate::Problem;
pub use validate::validate_plan;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use rollout::RolloutSpec;

use crate::store::{Store, StoreError, StoreExt, Tree};
use crate::util::rfc3339;

/// What every route that needs the stored plan says when there is none.
pub(crate) const NO_PLAN: &str =
    "no plan has been submitted yet: POST the plan JSON to /deployment-engine/config first";

/// What a secret reads as in every answer; posting it back keeps the stored value.
pub(crate) const REDACTED: &str = "******";

const CURRENT_KEY: &str = "current";

/// A password: stored as given, shown as `******` by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Secret {
        Secret(value.into())
    }

    /// The real value, for templates that need it. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(REDACTED)
    }
}

/// `checkdisk` / `adduser`: 0 or 1 on the wire, as the original sends them.
mod flag {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &bool, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u8(u8::from(*v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
        Ok(u8::deserialize(d)? != 0)
    }
}

/// The plan's `properties`, checked and normalised (numbers are numbers).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Properties {
    /// The cluster's domain; `*.<domain>` resolves to the entry component.
    pub domain: String,
    /// The controller / local package mirror the nodes install from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub home: Option<String>,
    /// The least disk, in GB, every node needs when `checkdisk` is set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disksize: Option<u64>,
    #[serde(with = "flag", default)]
    pub checkdisk: bool,
    #[serde(with = "flag", default)]
    pub adduser: bool,
    /// The user components are installed as (created when `adduser` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// That user's password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<Secret>,
    /// The nodes' root password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub root: Option<Secret>,
    /// The catalog the components come from.
    pub catalog: String,
    /// Properties the catalog declares beyond the standard ones.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// A plan: which component goes on which node, and the cluster's properties.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    /// Component name -> node IPs (canonical text form), in the operator's order.
    pub components: BTreeMap<String, Vec<String>>,
    pub properties: Properties,
    /// Per component, how its instances change, over the catalog's
    /// `[rollout]` (optional; the original's plans have none).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub rollout: BTreeMap<String, RolloutSpec>,
}

impl Plan {
    /// The plan as answers show it: secrets read `******`.
    pub fn redacted(&self) -> Plan {
        let mut p = self.clone();
        let hide = |s: &mut Option<Secret>| {
            if s.is_some() {
                *s = Some(Secret::new(REDACTED));
            }
        };
        hide(&mut p.properties.password);
        hide(&mut p.properties.root);
        p
    }

    /// Every text a secret of this plan can take in a rendered step: each
    /// secret that is not empty as given, and, when it holds a `'`, as the
    /// `sh` filter writes it between its quotes. Answers that show steps
    /// hide these (`StepRecord::redacted`).
    pub fn secret_texts(&self) -> Vec<String> {
        let mut out = Vec::new();
        for s in [&self.properties.password, &self.properties.root]
            .into_iter()
            .flatten()
            .map(Secret::expose)
            .filter(|s| !s.is_empty())
        {
            let quoted = catalog::sh_escape(s);
            if quoted != s {
                out.push(quoted);
            }
            out.push(s.to_owned());
        }
        out
    }

    /// Every (component, IP) pair, components by name, IPs in plan order.
    pub fn instances(&self) -> impl Iterator<Item = (&str, &str)> {
        self.components
            .iter()
            .flat_map(|(c, ips)| ips.iter().map(move |ip| (c.as_str(), ip.as_str())))
    }

    /// The components on node `ip`, by name.
    pub fn components_on(&self, ip: &str) -> Vec<&str> {
        self.components
            .iter()
            .filter(|(_, ips)| ips.iter().any(|i| i == ip))
            .map(|(c, _)| c.as_str())
            .collect()
    }

    /// Distinct node IPs, sorted.
    pub fn node_ips(&self) -> Vec<&str> {
        let mut ips: Vec<&str> = self.instances().map(|(_, ip)| ip).collect();
        ips.sort_unstable();
        ips.dedup();
        ips
    }
}

/// The DNS record the operator must add for a plan: `*.<domain>` -> the entry component's IP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DnsRecord {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub value: String,
    pub component: String,
}

impl DnsRecord {
    /// The record for `plan`, when its catalog has an entry component and the plan places it.
    pub fn for_plan(plan: &Plan, catalog: &Catalog) -> Option<DnsRecord> {
        let entry = catalog.entry()?;
        let ip = plan.components.get(entry)?.first()?;
        let kind = if ip.contains(':') { "AAAA" } else { "A" };
        Some(DnsRecord {
            name: format!("*.{}", plan.properties.domain),
            kind,
            value: ip.clone(),
            component: entry.to_owned(),
        })
    }

    /// What the operator should do, in one sentence.
    pub fn instruction(&self) -> String {
        format!(
            "add the DNS record {} {} {} (the {} node) to your DNS server",
            self.name, self.kind, self.value, self.component
        )
    }
}

/// The current plan as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredPlan {
    /// 1 for the first plan, +1 for every plan stored after it.
    pub revision: u64,
    /// RFC 3339, UTC.
    pub stored_at: String,
    pub plan: Plan,
}

/// The current plan: durable in the store, cached in memory.
pub struct Plans {
    store: Arc<dyn Store>,
    current: RwLock<Option<Arc<StoredPlan>>>,
    write: Mutex<()>,
}

impl std::fmt::Debug for Plans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Plans").finish_non_exhaustive()
    }
}

impl Plans {
    pub fn load(store: Arc<dyn Store>) -> Result<Plans, StoreError> {
        let current = store
            .get_json::<StoredPlan>(Tree::Plans, CURRENT_KEY)?
            .map(Arc::new);
        Ok(Plans {
            store,
            current: RwLock::new(current),
            write: Mutex::new(()),
        })
    }

    /// The current plan, if one was ever stored.
    pub fn current(&self) -> Option<Arc<StoredPlan>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Stores `plan` as the current one; durable when this returns.
    pub fn store(&self, plan: Plan) -> Result<Arc<StoredPlan>, StoreError> {
        let _one_writer = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let revision = self.current().map_or(1, |c| c.revision + 1);
        let stored = StoredPlan {
            revision,
            stored_at: rfc3339(SystemTime::now()),
            plan,
        };
        self.store.put_json(Tree::Plans, CURRENT_KEY, &stored)?;
        let stored = Arc::new(stored);
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(stored.clone());
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;

    fn sample() -> Plan {
        Plan {
            components: BTreeMap::from([("nats".to_owned(), vec!["10.0.0.1".to_owned()])]),
            properties: Properties {
                domain: "cf.local".into(),
                home: Some("10.0.0.9".into()),
                disksize: Some(15),
                checkdisk: true,
                adduser: false,
                user: Some("vcap".into()),
                password: Some(Secret::new("s3cret")),
                root: Some(Secret::new("r00t")),
                catalog: "cf-v170".into(),
                extra: BTreeMap::new(),
            },
            rollout: BTreeMap::new(),
        }
    }

    #[test]
    fn secrets_never_show_in_debug_or_redacted_json() {
        let plan = sample();
        let dbg = format!("{plan:?}");
        assert!(!dbg.contains("s3cret") && !dbg.contains("r00t"), "{dbg}");
        let json = serde_json::to_value(plan.redacted()).expect("json");
        assert_eq!(json["properties"]["password"], REDACTED);
        assert_eq!(json["properties"]["root"], REDACTED);
        assert_eq!(json["properties"]["checkdisk"], 1);
        assert_eq!(json["properties"]["disksize"], 15);
    }

    #[test]
    fn secret_texts_are_the_secrets_as_given_and_as_sh_quotes_them() {
        let mut plan = sample();
        assert_eq!(plan.secret_texts(), ["s3cret", "r00t"]);
        plan.properties.password = Some(Secret::new("it's"));
        plan.properties.root = Some(Secret::new(""));
        assert_eq!(plan.secret_texts(), [r#"it'\''s"#, "it's"]);
        plan.properties.password = None;
        assert!(plan.secret_texts().is_empty());
    }

    #[test]
    fn the_stored_plan_survives_a_reopen_with_its_secrets() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store: Arc<dyn Store> = Arc::new(SledStore::open(dir.path()).expect("open"));
            let plans = Plans::load(store).expect("load");
            assert!(plans.current().is_none());
            assert_eq!(plans.store(sample()).expect("store").revision, 1);
            assert_eq!(plans.store(sample()).expect("store").revision, 2);
        }
        let store: Arc<dyn Store> =
            Arc::new(crate::testkit::reopen(|| SledStore::open(dir.path())));
        let plans = Plans::load(store).expect("load");
        let cur = plans.current().expect("current");
        assert_eq!(cur.revision, 2);
        assert_eq!(cur.plan, sample());
        assert_eq!(
            cur.plan.properties.password.as_ref().map(Secret::expose),
            Some("s3cret")
        );
    }
}
