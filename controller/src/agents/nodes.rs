//! Enrolled nodes: durable records in the store, live link state in memory.
//!
//! Per-node memory on the controller stays small (the last heartbeat and the
//! connection handle), so one controller can hold thousands of agents.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use de_common::api::NodeView;
use de_common::api::resolve;
use de_common::{ComponentStatus, Hardware, Hello, InstanceState, NodeId, Usage, close_codes};

use crate::agents::clock::ClockSkews;
use crate::store::{Store, StoreError, StoreExt, Tree};
use crate::util::rfc3339;

/// What the store keeps about a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub hostname: String,
    pub ips: Vec<String>,
    pub hardware: Hardware,
    pub agent_version: String,
    pub enrolled_at: String,
    #[serde(default)]
    pub revoked: bool,
    #[serde(default)]
    pub last_seen: Option<String>,
    /// The node root its agent reported (`/` on a real node).
    #[serde(default = "default_root")]
    pub root: String,
}

fn default_root() -> String {
    "/".to_owned()
}

struct Live {
    conn: Option<quinn::Connection>,
    usage: Usage,
    components: Vec<ComponentStatus>,
    last_seen: SystemTime,
    heartbeat: Duration,
    /// What the agent reports it applied (None until its first inventory,
    /// and for agents too old to send one).
    inventory: Option<Vec<InstanceState>>,
}

/// Revoked node ids, shared with the TLS client-certificate verifier.
pub(crate) type RevokedSet = Arc<RwLock<HashSet<NodeId>>>;

pub struct Nodes {
    /// When this controller started: a node not heard from since counts as silent from here.
    started: SystemTime,
    store: Arc<dyn Store>,
    records: RwLock<HashMap<NodeId, NodeRecord>>,
    live: Mutex<HashMap<NodeId, Live>>,
    revoked: RevokedSet,
    /// Each node's last reported clock skew, shared with the step queue.
    clocks: ClockSkews,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes").finish_non_exhaustive()
    }
}

impl Nodes {
    pub fn load(store: Arc<dyn Store>) -> Result<Nodes, StoreError> {
        let mut records = HashMap::new();
        let mut revoked = HashSet::new();
        for (id, rec) in store.list_json::<NodeRecord>(Tree::Nodes)? {
            let id = NodeId::from(id);
            if rec.revoked {
                revoked.insert(id.clone());
            }
            records.insert(id, rec);
        }
        Ok(Nodes {
            started: SystemTime::now(),
            store,
            records: RwLock::new(records),
            live: Mutex::new(HashMap::new()),
            revoked: Arc::new(RwLock::new(revoked)),
            clocks: ClockSkews::default(),
        })
    }

    /// Each node's last reported clock skew (the step queue issues steps with it).
    pub(crate) fn clocks(&self) -> &ClockSkews {
        &self.clocks
    }

    pub fn revoked_set(&self) -> RevokedSet {
        self.revoked.clone()
    }

    pub fn is_revoked(&self, id: &NodeId) -> bool {
        self.revoked.read().map(|s| s.contains(id)).unwrap_or(true)
    }

    fn live(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, Live>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records a newly enrolled node; durable when this returns.
    pub fn enrolled(&self, rec: NodeRecord) -> Result<(), StoreError> {
        self.store.put_json(Tree::Nodes, rec.id.as_str(), &rec)?;
        self.records
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rec.id.clone(), rec);
        Ok(())
    }

    pub fn exists(&self, id: &NodeId) -> bool {
        self.records
            .read()
            .map(|r| r.contains_key(id))
            .unwrap_or(false)
    }

    /// An agent said Hello on a new connection: refresh its record and take its link.
    pub fn connected(&self, conn: quinn::Connection, hello: &Hello) -> Result<(), StoreError> {
        let now = SystemTime::now();
        let updated = {
            let records = self.records.read().unwrap_or_else(|p| p.into_inner());
            records.get(&hello.node_id).map(|r| NodeRecord {
                hostname: hello.hostname.clone(),
                ips: hello.ips.clone(),
                hardware: hello.hardware.clone(),
                agent_version: hello.agent_version.clone(),
                last_seen: Some(rfc3339(now)),
                root: hello.root.clone(),
                ..r.clone()
            })
        };
        if let Some(rec) = updated {
            self.enrolled(rec)?;
        }
        let old = self.live().insert(
            hello.node_id.clone(),
            Live {
                conn: Some(conn),
                usage: hello.usage.clone(),
                components: Vec::new(),
                last_seen: now,
                heartbeat: Duration::from_secs(u64::from(hello.heartbeat_secs.max(1))),
                inventory: None,
            },
        );
        if let Some(conn) = old.and_then(|l| l.conn) {
            conn.close(
                close_codes::REPLACED.into(),
                b"replaced by a newer connection",
            );
        }
        Ok(())
    }

    pub fn heartbeat(&self, id: &NodeId, usage: Usage, components: Vec<ComponentStatus>) {
        if let Some(l) = self.live().get_mut(id) {
            l.usage = usage;
            l.components = components;
            l.last_seen = SystemTime::now();
        }
    }

    /// The agent's report of what it applied and how it drifted.
    pub fn inventory(&self, id: &NodeId, instances: Vec<InstanceState>) {
        if let Some(l) = self.live().get_mut(id) {
            l.inventory = Some(instances);
        }
    }

    /// What node `id` last reported it applied, if it is connected and has reported.
    pub fn inventory_of(&self, id: &NodeId) -> Option<Vec<InstanceState>> {
        self.live().get(id).and_then(|l| l.inventory.clone())
    }

    /// The link `conn` of node `id` ended (only if it is still that node's current link).
    pub fn disconnected(&self, id: &NodeId, conn: &quinn::Connection) {
        if let Some(l) = self.live().get_mut(id)
            && l.conn.as_ref().map(quinn::Connection::stable_id) == Some(conn.stable_id())
        {
            l.conn = None;
        }
    }

    /// Revokes a node: its link is dropped and its certificate refused from now on.
    /// Returns false when there is no such node.
    pub fn revoke(&self, id: &NodeId) -> Result<bool, StoreError> {
        let rec = {
            let records = self.records.read().unwrap_or_else(|p| p.into_inner());
            match records.get(id) {
                None => return Ok(false),
                Some(r) => NodeRecord {
                    revoked: true,
                    ..r.clone()
                },
            }
        };
        self.enrolled(rec)?;
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        if let Some(conn) = self.live().get_mut(id).and_then(|l| l.conn.take()) {
            conn.close(close_codes::REVOKED.into(), b"node revoked by an operator");
        }
        Ok(true)
    }

    fn view(&self, rec: &NodeRecord, live: &HashMap<NodeId, Live>, now: SystemTime) -> NodeView {
        let l = live.get(&rec.id);
        let online = l.is_some_and(|l| {
            l.conn.is_some()
                && now
                    .duration_since(l.last_seen)
                    .map(|d| d < l.heartbeat * 3)
                    .unwrap_or(true)
        }) && !rec.revoked;
        NodeView {
            id: rec.id.to_string(),
            hostname: rec.hostname.clone(),
            ips: rec.ips.clone(),
            hardware: rec.hardware.clone(),
            usage: l.map(|l| l.usage.clone()).unwrap_or_default(),
            online,
            last_seen: l.map(|l| rfc3339(l.last_seen)).or(rec.last_seen.clone()),
            agent_version: rec.agent_version.clone(),
            enrolled_at: rec.enrolled_at.clone(),
            revoked: rec.revoked,
            root: rec.root.clone(),
            components: l.map(|l| l.components.clone()).unwrap_or_default(),
            clock_skew_secs: self.clocks.of(&rec.id),
        }
    }

    /// Every node, sorted by id.
    pub fn list(&self) -> Vec<NodeView> {
        let now = SystemTime::now();
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live();
        let mut out: Vec<NodeView> = records.values().map(|r| self.view(r, &live, now)).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out
    }

    pub fn get(&self, id: &NodeId) -> Option<NodeView> {
        let now = SystemTime::now();
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live();
        records.get(id).map(|r| self.view(r, &live, now))
    }

    /// The one live node `target` (its id or one of its IPs) names, by the
    /// API's rule ([`resolve`]); None when no node, only revoked ones, or
    /// several live ones have it.
    pub fn find(&self, target: &str) -> Option<NodeView> {
        resolve(&self.list(), target).node().cloned()
    }

    /// How long node `id` has been silent at `now`: since its last
    /// heartbeat or Hello, or since this controller started when it has not
    /// been heard from since. `None` for a node this controller does not know.
    pub fn silent_for(&self, id: &NodeId, now: SystemTime) -> Option<Duration> {
        self.silence(id, now).map(|(silent, _)| silent)
    }

    /// [`Nodes::silent_for`], and the heartbeat interval the node's agent
    /// announced (none known yet: zero), so that a node with a long
    /// interval is not taken for silent between two heartbeats.
    pub fn silence(&self, id: &NodeId, now: SystemTime) -> Option<(Duration, Duration)> {
        if !self.exists(id) {
            return None;
        }
        let live = self.live();
        let l = live.get(id);
        let since = l.map_or(self.started, |l| l.last_seen.max(self.started));
        let heartbeat = l.map(|l| l.heartbeat).unwrap_or_default();
        Some((now.duration_since(since).unwrap_or_default(), heartbeat))
    }

    /// Closes every live link (controller shutdown).
    pub fn close_all(&self) {
        for l in self.live().values_mut() {
            if let Some(c) = l.conn.take() {
                c.close(close_codes::SHUTDOWN.into(), b"controller shutting down");
            }
        }
    }
}
