//! Enrolled nodes: durable records in the store, live link state in memory.
//!
//! Per-node memory on the controller stays small (the last heartbeat and the
//! connection handles), so one controller can hold thousands of agents.
//!
//! Invariants: a node's IPs are set at enrolment and changed only by an
//! operator ([`Nodes::update`]); no IP belongs to two nodes that are not
//! revoked; a link is taken only from one of the node's IPs (or from anywhere
//! when the operator allowed NAT). Every change of a record happens under the
//! `records` write lock and starts from the record as it is then, so a
//! revoke is never overwritten by a stale copy; a connection is registered
//! under the same lock, so a revoke closes every connection that was let in.
//! A link's record is written under the lock but flushed after it (a group
//! commit shared with other writers), before the link is answered. The
//! nodes are indexed by IP, so finding the node of an IP does not scan them.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

pub use de_common::api::NodeView;
use de_common::api::{Claimant, IdentityConflict, resolve};
use de_common::{
    ComponentStatus, Hardware, Hello, InstanceState, Lane, NodeId, Usage, close_codes,
};

use crate::agents::clock::ClockSkews;
use crate::store::{Store, StoreError, StoreExt, Tree, Written};
use crate::util::rfc3339;

/// What the store keeps about a node.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NodeRecord {
    pub id: NodeId,
    pub hostname: String,
    /// Set at enrolment; changed only by an operator.
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
    /// The operator lets the node's links come from other addresses than its IPs.
    #[serde(default)]
    pub allow_nat: bool,
    /// When the node's certificate expires (RFC 3339): as issued, or as
    /// its last link showed it.
    #[serde(default)]
    pub cert_not_after: Option<String>,
    /// SHA-256 of the CA that issued the node's certificate (hex).
    #[serde(default)]
    pub cert_ca: Option<String>,
    /// Two machines claimed this identity; only the holder may link.
    #[serde(default)]
    pub identity_conflict: Option<IdentityConflict>,
}

fn default_root() -> String {
    "/".to_owned()
}

/// Why a node change or a link was refused.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no node {0:?}: GET /api/v1/nodes lists them")]
    Unknown(NodeId),
    #[error("node {0} is revoked: enrol the machine again")]
    Revoked(NodeId),
    #[error(
        "IP {ip} is already node {owner}'s: revoke {owner} or change its IPs first (PUT /api/v1/nodes/{owner})"
    )]
    Taken { ip: String, owner: NodeId },
    #[error("{0:?} is not an IP address")]
    BadIp(String),
    #[error("a node needs at least one IP")]
    NoIps,
    /// The link's address does not fit the node's IPs and NAT is not allowed.
    #[error("{0}")]
    Address(String),
    /// Another machine holds this node's identity.
    #[error("{0}")]
    Conflict(String),
    #[error("the node store could not be updated")]
    Store(#[from] StoreError),
}

/// What the metrics count of the nodes ([`Nodes::census`]).
#[derive(Debug, Default)]
pub(crate) struct Census {
    pub(crate) online: u64,
    pub(crate) offline: u64,
    pub(crate) revoked: u64,
    /// Nodes not revoked by the agent version they reported (at most 64 characters).
    pub(crate) versions: std::collections::BTreeMap<String, u64>,
    /// For each linked node, the time since its last heartbeat (or Hello).
    pub(crate) heartbeat_ages: Vec<Duration>,
}

/// Whether node `rec` is online: linked, and heard from within 3 heartbeat intervals.
fn is_online(rec: &NodeRecord, l: Option<&Live>, now: SystemTime) -> bool {
    l.is_some_and(|l| {
        !l.conns.is_empty()
            && now
                .duration_since(l.last_seen)
                .map(|d| d < l.heartbeat * 3)
                .unwrap_or(true)
    }) && !rec.revoked
}

struct Live {
    /// Every connection of the node that was let in and has not ended.
    conns: Vec<quinn::Connection>,
    /// The machine that holds the link (as its agent said), and from where.
    machine: Option<String>,
    source: IpAddr,
    usage: Usage,
    components: Vec<ComponentStatus>,
    /// When the last heartbeat (which carries `components`) arrived; None
    /// before the first on this link.
    components_at: Option<SystemTime>,
    last_seen: SystemTime,
    heartbeat: Duration,
    /// What the agent reports it applied (None until its first inventory,
    /// and for agents too old to send one).
    inventory: Option<Vec<InstanceState>>,
    /// Each lane's last done sequence as of the last inventory, and the
    /// highest sequence per lane whose result this controller recorded: a
    /// report that does not count a recorded step done may not show what
    /// that step did (a mark just written, a check just added or started).
    reported_done: Vec<(Lane, u64)>,
    finished: Vec<(Lane, u64)>,
}

/// Raises `lane`'s entry in `marks` to at least `seq`.
fn raise(marks: &mut Vec<(Lane, u64)>, lane: Lane, seq: u64) {
    match marks.iter_mut().find(|(l, _)| *l == lane) {
        Some((_, s)) => *s = (*s).max(seq),
        None => marks.push((lane, seq)),
    }
}

/// Whether a report taken when the lanes stood at `reported` shows every
/// step in `finished` (per lane, the highest sequence whose result was recorded).
fn report_is_fresh(reported: &[(Lane, u64)], finished: &[(Lane, u64)]) -> bool {
    finished
        .iter()
        .all(|(lane, seq)| reported.iter().any(|(l, done)| l == lane && done >= seq))
}

/// What a node reports of what it applied, as the planner may use it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Report {
    /// Not connected, or an agent too old to report.
    Unknown,
    /// It ended a step since its last report: wait for the next one.
    Stale,
    /// Its inventory, sent after everything it has done.
    Fresh(Vec<InstanceState>),
}

/// What a link showed of itself beyond its Hello: the machine its agent
/// says it runs on, and its certificate's end (RFC 3339) and issuing CA.
#[derive(Debug, Clone, Default)]
pub struct LinkFacts {
    pub machine: Option<String>,
    pub cert: Option<(String, String)>,
}

/// Where the node's last link attempt came from, and how it disagreed with the node's IPs.
#[derive(Debug, Clone, Default)]
struct AddressCheck {
    source: Option<IpAddr>,
    mismatch: Option<String>,
}

/// Revoked node ids, shared with the TLS client-certificate verifier.
pub(crate) type RevokedSet = Arc<RwLock<HashSet<NodeId>>>;

pub struct Nodes {
    /// When this controller started: a node not heard from since counts as silent from here.
    started: SystemTime,
    store: Arc<dyn Store>,
    records: RwLock<HashMap<NodeId, NodeRecord>>,
    /// The records by IP; changed only under the `records` write lock.
    by_ip: RwLock<IpIndex>,
    live: Mutex<HashMap<NodeId, Live>>,
    checks: Mutex<HashMap<NodeId, AddressCheck>>,
    revoked: RevokedSet,
    /// Each node's last reported clock skew, shared with the step queue.
    clocks: ClockSkews,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes").finish_non_exhaustive()
    }
}

/// `ip` parsed, with an IPv4 address in IPv6 form taken as the IPv4 one.
pub(crate) fn addr(ip: &str) -> Option<IpAddr> {
    ip.trim().parse::<IpAddr>().ok().map(|a| a.to_canonical())
}

/// The addresses of `ips` (those that parse), sorted and without repeats.
fn addr_set(ips: &[String]) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = ips.iter().filter_map(|i| addr(i)).collect();
    v.sort();
    v.dedup();
    v
}

/// How a link from `source` whose Hello claims `claimed` disagrees with
/// `rec`: (the source is not one of the node's IPs, a sentence for the
/// operator). None when both agree.
fn address_mismatch(
    rec: &NodeRecord,
    source: IpAddr,
    claimed: &[String],
) -> Option<(bool, String)> {
    let known = addr_set(&rec.ips);
    let mut why = Vec::new();
    let foreign_source = !known.contains(&source.to_canonical());
    if foreign_source {
        why.push(format!(
            "the link comes from {source}, which is not one of the node's IPs {:?}",
            rec.ips
        ));
    }
    if addr_set(claimed) != known {
        why.push(format!(
            "the agent claims the IPs {claimed:?} but the node was enrolled with {:?} (not applied)",
            rec.ips
        ));
    }
    if why.is_empty() {
        return None;
    }
    Some((
        foreign_source,
        format!(
            "{}; if the node's address really changed, set it with PUT /api/v1/nodes/{} or `dectl nodes set-ip`{}",
            why.join("; "),
            rec.id,
            if foreign_source && !rec.allow_nat {
                ", or allow NAT for the node"
            } else {
                ""
            }
        ),
    ))
}

/// The nodes that have each address (as [`addr`] reads their IPs), revoked
/// ones included.
#[derive(Debug, Default)]
struct IpIndex(HashMap<IpAddr, Vec<NodeId>>);

impl IpIndex {
    fn add(&mut self, rec: &NodeRecord) {
        for a in addr_set(&rec.ips) {
            let ids = self.0.entry(a).or_default();
            if !ids.contains(&rec.id) {
                ids.push(rec.id.clone());
            }
        }
    }

    fn remove(&mut self, rec: &NodeRecord) {
        for a in addr_set(&rec.ips) {
            if let Some(ids) = self.0.get_mut(&a) {
                ids.retain(|id| *id != rec.id);
                if ids.is_empty() {
                    self.0.remove(&a);
                }
            }
        }
    }

    fn with(&self, a: &IpAddr) -> &[NodeId] {
        self.0.get(a).map_or(&[], Vec::as_slice)
    }
}

/// The owner of the first of `ips` that a live node other than `except` has
/// (of several, the lowest id).
fn taken_by(
    records: &HashMap<NodeId, NodeRecord>,
    index: &IpIndex,
    ips: &[IpAddr],
    except: Option<&NodeId>,
) -> Option<(IpAddr, NodeId)> {
    for ip in ips {
        let owner = index
            .with(ip)
            .iter()
            .filter_map(|id| records.get(id))
            .filter(|r| !r.revoked && Some(&r.id) != except)
            .map(|r| &r.id)
            .min();
        if let Some(owner) = owner {
            return Some((*ip, owner.clone()));
        }
    }
    None
}

impl Nodes {
    pub fn load(store: Arc<dyn Store>) -> Result<Nodes, StoreError> {
        let mut records = HashMap::new();
        let mut revoked = HashSet::new();
        let mut by_ip = IpIndex::default();
        for (id, rec) in store.list_json::<NodeRecord>(Tree::Nodes)? {
            let id = NodeId::from(id);
            if rec.revoked {
                revoked.insert(id.clone());
            }
            by_ip.add(&rec);
            records.insert(id, rec);
        }
        Ok(Nodes {
            started: SystemTime::now(),
            store,
            records: RwLock::new(records),
            by_ip: RwLock::new(by_ip),
            live: Mutex::new(HashMap::new()),
            checks: Mutex::new(HashMap::new()),
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

    fn checks(&self) -> std::sync::MutexGuard<'_, HashMap<NodeId, AddressCheck>> {
        self.checks.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn records_mut(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<NodeId, NodeRecord>> {
        self.records.write().unwrap_or_else(|p| p.into_inner())
    }

    fn by_ip(&self) -> std::sync::RwLockReadGuard<'_, IpIndex> {
        self.by_ip.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores `rec` and keeps it, durable when this returns; the caller
    /// holds the `records` write lock.
    fn put(
        &self,
        records: &mut HashMap<NodeId, NodeRecord>,
        rec: NodeRecord,
    ) -> Result<(), StoreError> {
        let written = self.apply(records, rec)?;
        self.store.sync(written)
    }

    /// Writes `rec` and keeps it, durable once the mark is synced; the
    /// caller holds the `records` write lock (and need not hold it while it
    /// waits for the disk).
    fn apply(
        &self,
        records: &mut HashMap<NodeId, NodeRecord>,
        rec: NodeRecord,
    ) -> Result<Written, StoreError> {
        let written = self.store.apply_json(Tree::Nodes, rec.id.as_str(), &rec)?;
        let mut by_ip = self.by_ip.write().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = records.get(&rec.id) {
            by_ip.remove(old);
        }
        by_ip.add(&rec);
        records.insert(rec.id.clone(), rec);
        Ok(written)
    }

    /// Records a newly enrolled node, with the IPs it enrolled with; durable
    /// when this returns. Refused when an IP is not an address or is
    /// already another live node's.
    pub fn enrolled(&self, rec: NodeRecord) -> Result<(), NodeError> {
        let ips = addr_set(&rec.ips);
        if let Some(bad) = rec.ips.iter().find(|i| addr(i).is_none()) {
            return Err(NodeError::BadIp(bad.clone()));
        }
        let written = {
            let mut records = self.records_mut();
            if let Some((ip, owner)) = taken_by(&records, &self.by_ip(), &ips, Some(&rec.id)) {
                return Err(NodeError::Taken {
                    ip: ip.to_string(),
                    owner,
                });
            }
            self.apply(&mut records, rec)?
        };
        self.store.sync(written)?;
        Ok(())
    }

    /// Stores `rec` without the IP checks, as controllers before them did
    /// (stores may still hold two live nodes with one IP).
    #[cfg(test)]
    pub(crate) fn enrolled_unchecked(&self, rec: NodeRecord) -> Result<(), StoreError> {
        let mut records = self.records_mut();
        self.put(&mut records, rec)
    }

    pub fn exists(&self, id: &NodeId) -> bool {
        self.records
            .read()
            .map(|r| r.contains_key(id))
            .unwrap_or(false)
    }

    /// An agent said Hello on a new connection from `source`: checks its
    /// addresses against the node's IPs, refreshes what the agent reports
    /// (never the IPs, never `revoked`) and takes its link, durably when
    /// this returns. Refused for a revoked or unknown node, and for a link
    /// from an address that is not the node's when NAT is not allowed for
    /// it. The records lock is not held while the record goes to disk.
    pub async fn connected(
        &self,
        conn: quinn::Connection,
        source: IpAddr,
        hello: &Hello,
        link: &LinkFacts,
    ) -> Result<(), NodeError> {
        let (written, taken) = self.take_link(conn.clone(), source, hello, link)?;
        if let Err(e) = self.store.synced(written).await {
            self.disconnected(&hello.node_id, &conn);
            return Err(e.into());
        }
        taken
    }

    /// [`Nodes::connected`] up to the flush: the record written (the mark
    /// to sync before answering), and whether the link was taken.
    #[allow(clippy::type_complexity)]
    fn take_link(
        &self,
        conn: quinn::Connection,
        source: IpAddr,
        hello: &Hello,
        link: &LinkFacts,
    ) -> Result<(Written, Result<(), NodeError>), NodeError> {
        let now = SystemTime::now();
        let id = &hello.node_id;
        let mut records = self.records_mut();
        let Some(current) = records.get(id) else {
            return Err(NodeError::Unknown(id.clone()));
        };
        if current.revoked || self.is_revoked(id) {
            return Err(NodeError::Revoked(id.clone()));
        }
        let mismatch = address_mismatch(current, source, &hello.ips);
        self.checks().insert(
            id.clone(),
            AddressCheck {
                source: Some(source),
                mismatch: mismatch.as_ref().map(|(_, why)| why.clone()),
            },
        );
        if let Some((foreign_source, why)) = &mismatch {
            tracing::warn!(node = %id, %source, claimed = ?hello.ips, ips = ?current.ips, allow_nat = current.allow_nat, "{why}");
            if *foreign_source && !current.allow_nat {
                return Err(NodeError::Address(format!("node {id} refused: {why}")));
            }
        }
        let mut rec = NodeRecord {
            hostname: hello.hostname.clone(),
            hardware: hello.hardware.clone(),
            agent_version: hello.agent_version.clone(),
            last_seen: Some(rfc3339(now)),
            root: hello.root.clone(),
            ..current.clone()
        };
        if let Some(refused) = self.claim_conflict(&mut rec, source, link.machine.as_deref(), now) {
            return Ok((self.apply(&mut records, rec)?, Err(refused)));
        }
        if let Some((not_after, ca)) = &link.cert {
            rec.cert_not_after = Some(not_after.clone());
            rec.cert_ca = Some(ca.clone());
        }
        let written = self.apply(&mut records, rec)?;
        // Registered while `records` is held: a revoke after this closes it.
        let old = self.live().insert(
            id.clone(),
            Live {
                conns: vec![conn],
                machine: link.machine.clone(),
                source,
                usage: hello.usage.clone(),
                components: Vec::new(),
                components_at: None,
                last_seen: now,
                heartbeat: Duration::from_secs(u64::from(hello.heartbeat_secs.max(1))),
                inventory: None,
                reported_done: Vec::new(),
                finished: Vec::new(),
            },
        );
        drop(records);
        for conn in old.map(|l| l.conns).unwrap_or_default() {
            conn.close(
                close_codes::REPLACED.into(),
                b"replaced by a newer connection",
            );
        }
        Ok((written, Ok(())))
    }

    /// Whether a link from `source` by `machine` may take node `rec`'s
    /// identity: not when another machine holds a live link to it (a
    /// cloned image), nor, once that was seen, when it is not the holder
    /// (so the two never take the link in turn). Records the conflict in
    /// `rec`; the caller stores it. None: the link may go ahead.
    fn claim_conflict(
        &self,
        rec: &mut NodeRecord,
        source: IpAddr,
        machine: Option<&str>,
        now: SystemTime,
    ) -> Option<NodeError> {
        let claimant = Claimant {
            address: source.to_string(),
            machine: machine.unwrap_or("unknown").to_owned(),
        };
        let fix = format!(
            "two machines present node {}'s certificate (a cloned image?): on the machine that should not be {0}, stop de-agent, remove its state dir and enrol it again with a new install code; the controller shows both on the node; revoking {0} ends the conflict",
            rec.id
        );
        if let Some(conflict) = &mut rec.identity_conflict {
            if machine == Some(conflict.holder.machine.as_str()) {
                return None;
            }
            conflict.refused = claimant;
            return Some(NodeError::Conflict(format!(
                "refused: this machine is not the one holding the identity; {fix}"
            )));
        }
        let live = self.live();
        let holder = live.get(&rec.id).filter(|l| {
            l.conns.iter().any(|c| c.close_reason().is_none())
                && l.machine.is_some()
                && machine.is_some()
                && l.machine.as_deref() != machine
        })?;
        tracing::warn!(node = %rec.id, holder = %holder.source, claimant = %source, "{fix}");
        rec.identity_conflict = Some(IdentityConflict {
            since: rfc3339(now),
            holder: Claimant {
                address: holder.source.to_string(),
                machine: holder.machine.clone().unwrap_or_default(),
            },
            refused: claimant,
        });
        Some(NodeError::Conflict(format!(
            "refused: another machine holds the link; {fix}"
        )))
    }

    /// Node `id` holds a new certificate (a renewal): recorded, durable when
    /// this returns. Refused for a revoked or unknown node.
    pub fn renewed(&self, id: &NodeId, not_after: String, ca: String) -> Result<(), NodeError> {
        let mut records = self.records_mut();
        let Some(current) = records.get(id) else {
            return Err(NodeError::Unknown(id.clone()));
        };
        if current.revoked || self.is_revoked(id) {
            return Err(NodeError::Revoked(id.clone()));
        }
        let rec = NodeRecord {
            cert_not_after: Some(not_after),
            cert_ca: Some(ca),
            ..current.clone()
        };
        self.put(&mut records, rec)?;
        Ok(())
    }

    /// The nodes not revoked whose certificate is not known to be from the CA `ca`.
    pub fn not_on_ca(&self, ca: &str) -> Vec<NodeId> {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<NodeId> = records
            .values()
            .filter(|r| !r.revoked && r.cert_ca.as_deref() != Some(ca))
            .map(|r| r.id.clone())
            .collect();
        out.sort();
        out
    }

    /// Closes every live link with `why`: the agents connect again at once
    /// and learn the controller's new keys.
    pub fn reconnect_all(&self, why: &'static [u8]) {
        let conns: Vec<quinn::Connection> = self
            .live()
            .values_mut()
            .flat_map(|l| std::mem::take(&mut l.conns))
            .collect();
        for c in conns {
            c.close(close_codes::REKEYED.into(), why);
        }
    }

    pub fn heartbeat(&self, id: &NodeId, usage: Usage, components: Vec<ComponentStatus>) {
        if let Some(l) = self.live().get_mut(id) {
            l.usage = usage;
            l.components = components;
            l.last_seen = SystemTime::now();
            l.components_at = Some(l.last_seen);
        }
    }

    /// What node `id`'s monit said in the last heartbeat on its current
    /// link, and when that heartbeat arrived (None before the first).
    pub fn monit_of(&self, id: &NodeId) -> Option<(SystemTime, Vec<ComponentStatus>)> {
        let live = self.live();
        let l = live.get(id)?;
        Some((l.components_at?, l.components.clone()))
    }

    /// The agent's report of what it applied and how it drifted.
    pub fn inventory(&self, id: &NodeId, last_done: &[(Lane, u64)], instances: Vec<InstanceState>) {
        if let Some(l) = self.live().get_mut(id) {
            l.inventory = Some(instances);
            l.reported_done = last_done.to_vec();
        }
    }

    /// Node `id` finished step `seq` of `lane` (its result was recorded).
    pub fn step_ended(&self, id: &NodeId, lane: Lane, seq: u64) {
        if let Some(l) = self.live().get_mut(id) {
            raise(&mut l.finished, lane, seq);
        }
    }

    /// What node `id` last reported it applied, and whether that report
    /// counts done every step whose result this controller recorded.
    pub fn report_of(&self, id: &NodeId) -> Report {
        let live = self.live();
        let Some(l) = live.get(id) else {
            return Report::Unknown;
        };
        let Some(inventory) = &l.inventory else {
            return Report::Unknown;
        };
        if report_is_fresh(&l.reported_done, &l.finished) {
            Report::Fresh(inventory.clone())
        } else {
            Report::Stale
        }
    }

    /// The link `conn` of node `id` ended: the connection is closed (its
    /// pull and event streams end with it) and no longer counts.
    pub fn disconnected(&self, id: &NodeId, conn: &quinn::Connection) {
        if let Some(l) = self.live().get_mut(id) {
            l.conns.retain(|c| c.stable_id() != conn.stable_id());
        }
        conn.close(close_codes::SHUTDOWN.into(), b"link ended");
    }

    /// Revokes a node in one change under the records lock: it is marked
    /// revoked on disk, its certificate is refused from now on, and every
    /// connection it has is closed. Returns false when there is no such node.
    pub fn revoke(&self, id: &NodeId) -> Result<bool, StoreError> {
        let mut records = self.records_mut();
        let Some(current) = records.get(id) else {
            return Ok(false);
        };
        let rec = NodeRecord {
            revoked: true,
            ..current.clone()
        };
        self.put(&mut records, rec)?;
        self.revoked
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone());
        let conns = self
            .live()
            .get_mut(id)
            .map(|l| std::mem::take(&mut l.conns))
            .unwrap_or_default();
        drop(records);
        for conn in conns {
            conn.close(close_codes::REVOKED.into(), b"node revoked by an operator");
        }
        Ok(true)
    }

    /// An operator's change of node `id`: its IPs (none another live node
    /// has) and whether its links may come from other addresses (NAT). A
    /// link that no longer fits is closed; the agent reconnects and is
    /// checked again.
    pub fn update(
        &self,
        id: &NodeId,
        ips: Option<Vec<String>>,
        allow_nat: Option<bool>,
    ) -> Result<NodeView, NodeError> {
        let mut records = self.records_mut();
        let Some(current) = records.get(id) else {
            return Err(NodeError::Unknown(id.clone()));
        };
        if current.revoked {
            return Err(NodeError::Revoked(id.clone()));
        }
        let mut rec = current.clone();
        if let Some(ips) = ips {
            let ips: Vec<String> = ips.iter().map(|i| i.trim().to_owned()).collect();
            if let Some(bad) = ips.iter().find(|i| addr(i).is_none()) {
                return Err(NodeError::BadIp(bad.clone()));
            }
            let set = addr_set(&ips);
            if set.is_empty() {
                return Err(NodeError::NoIps);
            }
            if let Some((ip, owner)) = taken_by(&records, &self.by_ip(), &set, Some(id)) {
                return Err(NodeError::Taken {
                    ip: ip.to_string(),
                    owner,
                });
            }
            rec.ips = ips;
        }
        if let Some(nat) = allow_nat {
            rec.allow_nat = nat;
        }
        tracing::info!(node = %id, ips = ?rec.ips, allow_nat = rec.allow_nat, "node changed by an operator");
        let mut stale = Vec::new();
        if let Some(l) = self.live().get_mut(id) {
            l.conns.retain(|c| {
                let fits = rec.allow_nat
                    || addr_set(&rec.ips).contains(&c.remote_address().ip().to_canonical());
                if !fits {
                    stale.push(c.clone());
                }
                fits
            });
        }
        {
            let mut checks = self.checks();
            if let Some(c) = checks.get_mut(id) {
                c.mismatch = None;
            }
        }
        self.put(&mut records, rec.clone())?;
        let view = {
            let live = self.live();
            self.view(&rec, &live, SystemTime::now())
        };
        drop(records);
        for conn in stale {
            conn.close(
                close_codes::PROTOCOL.into(),
                b"the node's IPs changed: connect again",
            );
        }
        Ok(view)
    }

    fn view(&self, rec: &NodeRecord, live: &HashMap<NodeId, Live>, now: SystemTime) -> NodeView {
        let l = live.get(&rec.id);
        let check = self.checks().get(&rec.id).cloned().unwrap_or_default();
        let online = is_online(rec, l, now);
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
            allow_nat: rec.allow_nat,
            source_ip: check.source.map(|a| a.to_string()),
            ip_mismatch: check.mismatch,
            cert_not_after: rec.cert_not_after.clone(),
            identity_conflict: rec.identity_conflict.clone(),
        }
    }

    /// The nodes counted for the metrics, under one read of the records:
    /// without building a view of each, so a scrape stays cheap with
    /// thousands of nodes.
    pub(crate) fn census(&self, now: SystemTime) -> Census {
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live();
        let mut c = Census::default();
        for rec in records.values() {
            let l = live.get(&rec.id);
            if rec.revoked {
                c.revoked += 1;
                continue;
            }
            if is_online(rec, l, now) {
                c.online += 1;
            } else {
                c.offline += 1;
            }
            let v = &rec.agent_version;
            let v = v
                .char_indices()
                .nth(64)
                .map_or(v.as_str(), |(i, _)| &v[..i]);
            match c.versions.get_mut(v) {
                Some(n) => *n += 1,
                None => {
                    c.versions.insert(v.to_owned(), 1);
                }
            }
            if let Some(l) = l.filter(|l| !l.conns.is_empty()) {
                c.heartbeat_ages
                    .push(now.duration_since(l.last_seen).unwrap_or_default());
            }
        }
        c
    }

    /// The nodes online now, sorted by id, each with its first IP: what an
    /// exec to every node needs, read under one lock without building a
    /// view of each (a view clones hardware, usage and components: at
    /// 10,000 nodes that was two fifths of an exec request's CPU).
    pub fn online(&self) -> Vec<(NodeId, String)> {
        let now = SystemTime::now();
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let live = self.live();
        let mut out: Vec<(NodeId, String)> = records
            .values()
            .filter(|r| is_online(r, live.get(&r.id), now))
            .map(|r| (r.id.clone(), r.ips.first().cloned().unwrap_or_default()))
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
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
    /// several live ones have it. Looks only at the nodes the index names.
    pub fn find(&self, target: &str) -> Option<NodeView> {
        let now = SystemTime::now();
        let records = self.records.read().unwrap_or_else(|p| p.into_inner());
        let mut ids: Vec<&NodeId> = records
            .get_key_value(target)
            .map(|(id, _)| id)
            .into_iter()
            .collect();
        let by_ip = self.by_ip();
        if let Some(a) = addr(target) {
            ids.extend(by_ip.with(&a));
        }
        ids.sort();
        ids.dedup();
        let live = self.live();
        let named: Vec<NodeView> = ids
            .into_iter()
            .filter_map(|id| records.get(id))
            .map(|r| self.view(r, &live, now))
            .collect();
        resolve(&named, target).node().cloned()
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

    /// What the step watchdog needs of node `id` at `now`: whether it is
    /// revoked, its first IP, and [`Nodes::silence`]; without building the
    /// node's whole view (the watchdog asks once per open step each second).
    pub(crate) fn watch(
        &self,
        id: &NodeId,
        now: SystemTime,
    ) -> Option<(bool, Option<String>, Duration, Duration)> {
        let (revoked, ip) = {
            let records = self.records.read().unwrap_or_else(|p| p.into_inner());
            let r = records.get(id)?;
            (r.revoked, r.ips.first().cloned())
        };
        let (silent, heartbeat) = self.silence(id, now)?;
        Some((revoked, ip, silent, heartbeat))
    }

    /// Closes every live link (controller shutdown).
    pub fn close_all(&self) {
        for l in self.live().values_mut() {
            for c in l.conns.drain(..) {
                c.close(close_codes::SHUTDOWN.into(), b"controller shutting down");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::record;

    fn nodes(dir: &std::path::Path) -> Nodes {
        let store: Arc<dyn Store> = Arc::new(crate::store::SledStore::open(dir).expect("store"));
        Nodes::load(store).expect("load")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn a_report_is_fresh_once_it_counts_every_recorded_step_done() {
        let finished = vec![(Lane::Deploy, 7), (Lane::Adhoc, 2)];
        assert!(report_is_fresh(
            &[(Lane::Deploy, 7), (Lane::Adhoc, 3)],
            &finished
        ));
        assert!(!report_is_fresh(
            &[(Lane::Deploy, 6), (Lane::Adhoc, 3)],
            &finished
        ));
        assert!(
            !report_is_fresh(&[(Lane::Deploy, 9)], &finished),
            "adhoc unknown"
        );
        assert!(report_is_fresh(&[], &[]), "nothing recorded yet");
        let mut marks = Vec::new();
        raise(&mut marks, Lane::Deploy, 3);
        raise(&mut marks, Lane::Deploy, 2);
        raise(&mut marks, Lane::Control, 1);
        assert_eq!(marks, [(Lane::Deploy, 3), (Lane::Control, 1)]);
    }

    #[test]
    fn a_link_must_come_from_the_nodes_ips_and_claim_them() {
        let rec = record("n-a", "10.0.0.1", 1, 1, 1);
        let own = vec!["10.0.0.1".to_owned()];
        assert_eq!(address_mismatch(&rec, ip("10.0.0.1"), &own), None);
        // The same address in IPv6-mapped form is the same address.
        assert_eq!(address_mismatch(&rec, ip("::ffff:10.0.0.1"), &own), None);
        let (foreign, why) =
            address_mismatch(&rec, ip("10.0.0.2"), &["10.0.0.2".to_owned()]).expect("mismatch");
        assert!(foreign);
        assert!(why.contains("comes from 10.0.0.2"), "{why}");
        assert!(why.contains("claims the IPs [\"10.0.0.2\"]"), "{why}");
        assert!(why.contains("allow NAT"), "{why}");
        // A claim alone is not applied but the link is not foreign.
        let (foreign, why) =
            address_mismatch(&rec, ip("10.0.0.1"), &["10.0.0.9".to_owned()]).expect("claim");
        assert!(!foreign, "{why}");
    }

    #[test]
    fn a_revoked_node_cannot_record_a_renewed_certificate() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = nodes(dir.path());
        n.enrolled(record("n-a", "10.0.0.1", 1, 1, 1)).expect("a");
        n.renewed(&"n-a".into(), "2030-01-01T00:00:00Z".into(), "ca1".into())
            .expect("renewed");
        assert_eq!(
            n.get(&"n-a".into()).expect("a").cert_not_after.as_deref(),
            Some("2030-01-01T00:00:00Z")
        );
        assert_eq!(n.not_on_ca("ca2"), vec![NodeId::from("n-a")]);
        assert!(n.not_on_ca("ca1").is_empty());
        assert!(n.revoke(&"n-a".into()).expect("revoke"));
        assert!(matches!(
            n.renewed(&"n-a".into(), "2031-01-01T00:00:00Z".into(), "ca2".into()),
            Err(NodeError::Revoked(_))
        ));
        assert!(n.not_on_ca("ca2").is_empty(), "revoked nodes do not count");
    }

    #[test]
    fn the_census_counts_nodes_by_state_and_version_without_a_link() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = nodes(dir.path());
        let mut long = record("n-b", "10.0.0.2", 1, 1, 1);
        long.agent_version = "9".repeat(100);
        for r in [
            record("n-a", "10.0.0.1", 1, 1, 1),
            long,
            record("n-c", "10.0.0.3", 1, 1, 1),
        ] {
            n.enrolled(r).expect("enrol");
        }
        assert!(n.revoke(&"n-c".into()).expect("revoke"));
        let c = n.census(SystemTime::now());
        assert_eq!((c.online, c.offline, c.revoked), (0, 2, 1));
        let want: std::collections::BTreeMap<String, u64> =
            [("9".repeat(64), 1), ("test".to_owned(), 1)].into();
        assert_eq!(c.versions, want, "a revoked node's version is not counted");
        assert!(c.heartbeat_ages.is_empty(), "no node is linked");
    }

    #[test]
    fn an_ip_is_never_given_to_two_live_nodes() {
        let dir = tempfile::tempdir().expect("tmp");
        let n = nodes(dir.path());
        n.enrolled(record("n-a", "10.0.0.1", 1, 1, 1)).expect("a");
        n.enrolled(record("n-b", "10.0.0.2", 1, 1, 1)).expect("b");
        let e = n
            .enrolled(record("n-c", "10.0.0.1", 1, 1, 1))
            .expect_err("taken");
        assert!(e.to_string().contains("already node n-a's"), "{e}");
        let e = n
            .update(&"n-b".into(), Some(vec!["10.0.0.1".into()]), None)
            .expect_err("taken");
        assert!(
            matches!(e, NodeError::Taken { ref owner, .. } if owner.as_str() == "n-a"),
            "{e}"
        );
        for bad in [vec![], vec!["ten".to_owned()]] {
            assert!(n.update(&"n-b".into(), Some(bad), None).is_err());
        }
        // Once n-a is revoked its IP is free, and the change is durable.
        assert!(n.revoke(&"n-a".into()).expect("revoke"));
        let view = n
            .update(&"n-b".into(), Some(vec!["10.0.0.1".into()]), Some(true))
            .expect("update");
        assert_eq!(
            (view.ips.clone(), view.allow_nat),
            (vec!["10.0.0.1".to_owned()], true)
        );
        drop(n);
        let n = nodes(dir.path());
        let b = n.get(&"n-b".into()).expect("b");
        assert_eq!((b.ips, b.allow_nat), (vec!["10.0.0.1".to_owned()], true));
        assert!(n.get(&"n-a".into()).expect("a").revoked);
        assert!(n.is_revoked(&"n-a".into()));
        assert!(matches!(
            n.update(&"n-a".into(), None, Some(true)),
            Err(NodeError::Revoked(_))
        ));
    }
}
