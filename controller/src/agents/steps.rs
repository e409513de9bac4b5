//! Per-node step queues: steps are allocated a sequence number per (node,
//! lane), signed with the step key, stored, and handed to the node's agent
//! when it long-polls; the agent's events update them.
//!
//! Invariants: a step is on disk before any agent can pull it (a pull
//! answers from the in-memory index of open steps, whose entries are added
//! under the allocation and record locks after the store took the write,
//! each with the mark of that write, and waits until that mark is flushed),
//! and its result is on disk before the agent gets its `Ack`. No lock is
//! held while the disk works: writers share group commits. The sequence
//! numbers handed out per (node, lane) only grow (a number whose record a
//! crash lost was never handed out, and may be issued again; numbers are
//! raised to what an agent reports having done, so a controller restored
//! from an older backup resynchronises).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast, mpsc};

use de_common::api::StepRecordView;
/// A step record's state: the API's words, also what the store keeps.
pub(crate) use de_common::api::StepState;
use de_common::{
    DeploymentId, Lane, NodeId, OutStream, SignedStep, Step, StepAction, StepEvent, StepEventKind,
    StepId, StepOutcome, deadline_on_node, sign_step,
};

use crate::agents::clock::ClockSkews;
use crate::agents::handout::{DEFAULT_HANDOUT_WINDOW, HandOuts};
use crate::store::{
    Store, StoreError, StoreExt, Tree, Written, decode_json, for_each_paged, scan_json,
};
use crate::util::random_hex;
use crate::util::rfc3339;

/// How long a step may wait for its node before the agent refuses it as expired.
pub(crate) const DEFAULT_STEP_TTL: Duration = Duration::from_secs(24 * 3600);

/// How long a cancel may wait for its node before it is pointless.
const CANCEL_TTL: Duration = Duration::from_secs(3600);

/// A step and everything known about it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    /// In the store as base64 texts (a third of the record's bytes fewer
    /// than JSON's arrays of numbers); records written as arrays by
    /// earlier versions are read as they are.
    #[serde(with = "signed_text")]
    pub signed: SignedStep,
    pub state: StepState,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub outcome: Option<StepOutcome>,
    /// Why the agent refused it.
    pub refusal: Option<String>,
}

impl StepRecord {
    /// The record as the API shows it: without the signed bytes, with
    /// script environment values (where plans pass passwords) as `******`,
    /// and with every text of `secrets` (the current plan's secrets, as
    /// `Plan::secret_texts` gives them) as `******` wherever it appears in
    /// the action, the output or the refusal; file contents that hold one
    /// are shown as `******` whole. The signed step the agent runs keeps the
    /// real values. Its keys are sorted at every level, as they always were
    /// (the view goes through a `Value`).
    pub fn redacted(&self, secrets: &[String]) -> serde_json::Value {
        let hide = Hide::new(secrets);
        let mut step = self.step.clone();
        hide.action(&mut step.action);
        let mut outcome = self.outcome.clone();
        if let Some(o) = &mut outcome {
            hide.outcome(o);
        }
        let mut refusal = self.refusal.clone();
        if let Some(r) = &mut refusal {
            hide.text(r);
        }
        let view = StepRecordView {
            step,
            state: self.state,
            created_at: self.created_at.clone(),
            started_at: self.started_at.clone(),
            finished_at: self.finished_at.clone(),
            outcome,
            refusal,
        };
        serde_json::to_value(view).unwrap_or_default()
    }
}

/// A [`SignedStep`] in a stored record: `{"body": "<base64>",
/// "signature": "<base64>"}`, read also from arrays of numbers.
mod signed_text {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use de_common::SignedStep;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize)]
    struct Out {
        body: String,
        signature: String,
    }

    #[derive(Deserialize)]
    struct In {
        body: Bytes,
        signature: Bytes,
    }

    /// Bytes as base64 text or as an array of numbers.
    struct Bytes(Vec<u8>);

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
            struct Visit;
            impl<'de> serde::de::Visitor<'de> for Visit {
                type Value = Bytes;
                fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.write_str("base64 text or an array of bytes")
                }
                fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Bytes, E> {
                    STANDARD.decode(v).map(Bytes).map_err(E::custom)
                }
                fn visit_seq<A: serde::de::SeqAccess<'de>>(
                    self,
                    mut seq: A,
                ) -> Result<Bytes, A::Error> {
                    let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(4096));
                    while let Some(b) = seq.next_element::<u8>()? {
                        out.push(b);
                    }
                    Ok(Bytes(out))
                }
            }
            d.deserialize_any(Visit)
        }
    }

    pub(super) fn serialize<S: Serializer>(s: &SignedStep, ser: S) -> Result<S::Ok, S::Error> {
        Out {
            body: STANDARD.encode(&s.body),
            signature: STANDARD.encode(&s.signature),
        }
        .serialize(ser)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SignedStep, D::Error> {
        let In { body, signature } = In::deserialize(d)?;
        Ok(SignedStep {
            body: body.0,
            signature: signature.0,
        })
    }
}

/// What a hidden value reads as.
const HIDDEN: &str = "******";

/// Hides secret texts in what a step record shows.
struct Hide<'a> {
    /// Not empty, longest first: a secret that holds another is hidden
    /// whole, not around the shorter one.
    secrets: Vec<&'a str>,
}

impl<'a> Hide<'a> {
    fn new(secrets: &'a [String]) -> Hide<'a> {
        let mut secrets: Vec<&str> = secrets
            .iter()
            .map(String::as_str)
            .filter(|s| !s.is_empty())
            .collect();
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        Hide { secrets }
    }

    fn text(&self, s: &mut String) {
        for secret in &self.secrets {
            if s.contains(secret) {
                *s = s.replace(secret, HIDDEN);
            }
        }
    }

    /// Bytes that hold a secret are hidden whole: they may be any format,
    /// and a file's other contents say too much around a cut.
    fn bytes(&self, b: &mut Vec<u8>) {
        let holds = |secret: &&str| b.windows(secret.len()).any(|w| w == secret.as_bytes());
        if self.secrets.iter().any(holds) {
            *b = HIDDEN.as_bytes().to_vec();
        }
    }

    /// Every text of the action; no `_` arm, so a new action has to say
    /// what it shows.
    fn action(&self, action: &mut StepAction) {
        match action {
            StepAction::Script {
                script, user, env, ..
            } => {
                self.text(script);
                if let Some(u) = user {
                    self.text(u);
                }
                for (_, v) in env.iter_mut() {
                    *v = HIDDEN.to_owned();
                }
            }
            StepAction::WriteFile {
                path,
                contents,
                owner,
                ..
            } => {
                self.text(path);
                self.bytes(contents);
                if let Some(o) = owner {
                    self.text(o);
                }
            }
            StepAction::MonitAdd { name, check } => {
                self.text(name);
                self.text(check);
            }
            StepAction::MonitRemove { name } | StepAction::Monit { name, .. } => self.text(name),
            StepAction::CollectLogs { paths, .. } => paths.iter_mut().for_each(|p| self.text(p)),
            StepAction::Cancel { .. } => {}
            StepAction::Fetch {
                artifact,
                path,
                owner,
                ..
            } => {
                self.text(artifact);
                self.text(path);
                if let Some(o) = owner {
                    self.text(o);
                }
            }
            StepAction::MarkApplied {
                instance,
                fingerprint,
                files,
                check,
            } => {
                self.text(instance);
                self.text(fingerprint);
                files.iter_mut().for_each(|f| self.text(f));
                if let Some(c) = check {
                    self.text(c);
                }
            }
            StepAction::Unmark { instance } => self.text(instance),
        }
    }

    fn outcome(&self, o: &mut StepOutcome) {
        self.text(&mut o.stdout_tail);
        self.text(&mut o.stderr_tail);
        if let Some(e) = &mut o.error {
            self.text(e);
        }
        for (path, contents) in &mut o.files {
            self.text(path);
            self.bytes(contents);
        }
    }
}

/// What happened, for live watchers (the log WebSocket, exec waiters).
#[derive(Debug, Clone)]
pub enum StepUpdate {
    Started {
        step_id: StepId,
        node_id: NodeId,
    },
    Output {
        step_id: StepId,
        node_id: NodeId,
        stream: OutStream,
        lines: Arc<Vec<String>>,
    },
    Finished {
        step_id: StepId,
        node_id: NodeId,
        state: StepState,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum StepsError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("could not sign the step")]
    Sign(#[from] de_common::SignError),
    #[error("no randomness for a step id")]
    Random,
}

/// Why an agent's report of the steps it has done was not taken.
#[derive(Debug, thiserror::Error)]
pub enum ResyncError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the agent reports step {done} done on lane {lane}, but this controller issued only {issued} there (at most {MAX_RESYNC_AHEAD} more are taken as a restored backup); reset the agent's ledger or enrol the node again"
    )]
    Implausible {
        lane: &'static str,
        done: u64,
        issued: u64,
    },
}

/// How far beyond the steps this controller issued on a lane an agent's
/// report of its last done step is still believed (a controller restored
/// from an older backup); beyond it, the report is refused.
pub(crate) const MAX_RESYNC_AHEAD: u64 = 1_000_000;

/// Steps signed and written together by [`StepQueue::enqueue_many`] before
/// their pulls are woken.
const ENQUEUE_CHUNK: usize = 500;

/// One step for [`StepQueue::enqueue_many`]; `id` None picks a fresh one.
#[derive(Debug, Clone)]
pub struct NewStep {
    pub id: Option<StepId>,
    pub node: NodeId,
    pub lane: Lane,
    pub action: StepAction,
    pub deployment_id: Option<DeploymentId>,
    pub ttl: Duration,
}

fn json<T: Serialize>(tree: Tree, value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|source| StoreError::Encode {
        tree: tree.name(),
        key: "a queued step".into(),
        source,
    })
}

pub struct StepQueue {
    store: Arc<dyn Store>,
    /// Signs every step queued; replaced by a rotation ([`StepQueue::rotate_key`]).
    key: std::sync::RwLock<Arc<ring::signature::Ed25519KeyPair>>,
    /// The allocation lock, over each queue's last sequence number issued
    /// as far as read or written since the start (the store's records and
    /// counters are the truth; this spares reading them for every step
    /// queued). Held by a whole [`StepQueue::enqueue_many`], so that the
    /// steps of a lane appear in the open index in the order of their
    /// numbers.
    alloc: Mutex<LastSeqs>,
    /// The record lock: every read-modify-write of a step record, and the
    /// write and publishing of a chunk of new steps, hold it. Taken after
    /// the allocation lock, never before it, and only for a short while:
    /// an agent's events for the first chunks of a large fan-out go on
    /// while its later chunks are signed.
    records: Mutex<()>,
    /// The steps handed out and not answered yet, at most `handout_window`
    /// of them (`handout.rs`).
    handouts: HandOuts,
    /// Per node and lane, the pulls waiting for a step.
    wakers: Mutex<HashMap<(NodeId, Lane), Arc<Notify>>>,
    /// Per node and lane, its steps not final yet with their records,
    /// changed only under the record lock and after the store: a pull
    /// answers from here, so the long-polls of 10,000 idle agents cost no
    /// store reads however long the steps' history grows, and an agent's
    /// events change these records without reading them back.
    open_seqs: Mutex<HashMap<(NodeId, Lane), OpenSteps>>,
    /// The callers of [`StepQueue::wait_all`], per step they wait for: each
    /// is handed the record once the step's end is on disk.
    waiters: Mutex<HashMap<StepId, Vec<mpsc::UnboundedSender<Arc<StepRecord>>>>>,
    updates: broadcast::Sender<StepUpdate>,
    /// Every step not final yet, for the watchdog (`watchdog.rs`): small,
    /// and rebuilt from the store at start.
    active: Mutex<HashMap<StepId, ActiveStep>>,
    /// Each node's clock skew: a step's `not_after` is on its node's clock.
    clocks: ClockSkews,
    /// Steps ended, per lane and state, and their run times.
    pub(crate) metrics: crate::metrics::StepMetrics,
}

/// What the watchdog needs of a step that has not ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ActiveStep {
    pub(crate) id: StepId,
    pub(crate) node: NodeId,
    pub(crate) lane: Lane,
    /// When this controller learnt that it started (a restarted controller
    /// counts from its start).
    pub(crate) started: Option<Instant>,
    /// How long the step may run on its node: a script's timeout, or
    /// [`OTHER_ACTION_BUDGET`].
    pub(crate) budget: Duration,
    /// The artifact a `Fetch` step lets its node download.
    pub(crate) fetch: Option<String>,
}

/// One queue's steps not final yet, by sequence number.
type OpenSteps = BTreeMap<u64, OpenStep>;

/// A step not final yet, as the store holds it.
#[derive(Debug, Clone)]
struct OpenStep {
    /// The record as last written: events change it without reading the
    /// store.
    record: Arc<StepRecord>,
    /// The mark of the write that queued it: a pull hands it out once that
    /// is on disk, and waits for no other write.
    queued: Written,
}

/// Per node and lane, the last sequence number issued.
type LastSeqs = HashMap<(NodeId, Lane), u64>;

/// The last sequence number issued on (`node`, `lane`): from `known`,
/// else from the store (then kept in `known`): the highest of the lane's
/// last step record and its counter. The counter is written only when a
/// resync raises it past every record; a queued step is one write, its
/// record (with the id index), and a number whose record a crash lost was
/// never handed out (a pull waits for the flush), so issuing it again is
/// safe.
fn last_seq(
    store: &dyn Store,
    known: &mut LastSeqs,
    node: &NodeId,
    lane: Lane,
) -> Result<u64, StoreError> {
    if let Some(last) = known.get(&(node.clone(), lane)) {
        return Ok(*last);
    }
    let counter: u64 = store
        .get_json(Tree::Meta, &seq_key(node, lane))?
        .unwrap_or(0);
    let prefix = prefix_of(node, lane);
    let recorded = match store.last_key(Tree::Steps, &prefix)? {
        None => 0,
        Some(key) => key
            .strip_prefix(&prefix)
            .and_then(|seq| seq.parse::<u64>().ok())
            .ok_or_else(|| StoreError::BadKey {
                tree: Tree::Steps.name(),
                key: key.clone(),
            })?,
    };
    let last = counter.max(recorded);
    known.insert((node.clone(), lane), last);
    Ok(last)
}

fn fetch_of(action: &StepAction) -> Option<String> {
    match action {
        StepAction::Fetch { sha256, .. } => Some(sha256.clone()),
        _ => None,
    }
}

/// How long an action without a timeout of its own (monit, files, logs) may take.
pub(crate) const OTHER_ACTION_BUDGET: Duration = Duration::from_secs(120);

fn budget_of(action: &StepAction) -> Duration {
    match action {
        StepAction::Script { timeout_secs, .. } => {
            Duration::from_secs(u64::from((*timeout_secs).max(1)))
        }
        // A transfer at 1 MiB/s or better, on top of the usual budget.
        StepAction::Fetch { size, .. } => OTHER_ACTION_BUDGET + Duration::from_secs(size >> 20),
        _ => OTHER_ACTION_BUDGET,
    }
}

impl std::fmt::Debug for StepQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StepQueue").finish_non_exhaustive()
    }
}

/// The news that the step of `r` ended.
fn finished_update(r: &StepRecord) -> StepUpdate {
    StepUpdate::Finished {
        step_id: r.step.id.clone(),
        node_id: r.step.node_id.clone(),
        state: r.state,
    }
}

/// Changes `r` as the event `kind` from `node` says, unless the step is
/// another node's or already final.
fn apply_event(r: &mut StepRecord, node: &NodeId, kind: &StepEventKind, now: &str) {
    if r.step.node_id != *node || r.state.is_final() {
        return;
    }
    match kind {
        StepEventKind::Started => {
            r.state = StepState::Running;
            r.started_at = Some(now.to_owned());
        }
        StepEventKind::Output { .. } => {}
        StepEventKind::Finished(outcome) => {
            r.state = if outcome.succeeded() {
                StepState::Done
            } else {
                StepState::Failed
            };
            r.finished_at = Some(now.to_owned());
            r.outcome = Some(outcome.clone());
        }
        StepEventKind::Refused(why) => {
            r.state = StepState::Refused;
            r.finished_at = Some(now.to_owned());
            r.refusal = Some(why.to_string());
        }
    }
}

/// What [`StepQueue::on_events`] did with a batch of an agent's events.
#[derive(Debug, Default)]
pub struct EventsApplied {
    /// The results and refusals now on disk, to acknowledge, in order;
    /// with the lane and number of each result (`Finished`).
    pub acks: Vec<(StepId, Option<(Lane, u64)>)>,
    /// Why the events from the one named on were not applied (the agent
    /// sends its results again after reconnecting).
    pub error: Option<(StepId, StoreError)>,
}

fn key_of(node: &NodeId, lane: Lane, seq: u64) -> String {
    format!("{node}/{}/{seq:020}", lane.as_str())
}

fn prefix_of(node: &NodeId, lane: Lane) -> String {
    format!("{node}/{}/", lane.as_str())
}

fn seq_key(node: &NodeId, lane: Lane) -> String {
    format!("seq/{node}/{}", lane.as_str())
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The records of the steps in `store` not final yet. Pages through the
/// tree and reads only each record's state until one is open: the tree
/// keeps every step ever run (hundreds of thousands after a few scale
/// runs), and decoding all of them at once left their memory to the
/// controller's RSS for good.
fn open_steps(store: &dyn Store) -> Result<Vec<StepRecord>, StoreError> {
    #[derive(Deserialize)]
    struct State {
        state: StepState,
    }
    let mut open = Vec::new();
    for_each_paged(store, Tree::Steps, 1024, |key, bytes| {
        let State { state } = decode_json(Tree::Steps, &key, &bytes)?;
        if !state.is_final() {
            open.push(decode_json(Tree::Steps, &key, &bytes)?);
        }
        Ok(())
    })?;
    Ok(open)
}

impl StepQueue {
    /// The queues in `store`, with the index of the steps not final yet
    /// rebuilt from it (one scan of the steps tree).
    pub(crate) fn open(
        store: Arc<dyn Store>,
        key: Arc<ring::signature::Ed25519KeyPair>,
        clocks: ClockSkews,
    ) -> Result<StepQueue, StoreError> {
        let (updates, _) = broadcast::channel(4096);
        let now = Instant::now();
        let mut active = HashMap::new();
        let mut open_seqs: HashMap<(NodeId, Lane), OpenSteps> = HashMap::new();
        // What the store holds at opening: on disk, or at the first flush.
        let opened = store.mark();
        for r in open_steps(&*store)? {
            open_seqs
                .entry((r.step.node_id.clone(), r.step.lane))
                .or_default()
                .insert(
                    r.step.seq,
                    OpenStep {
                        record: Arc::new(r.clone()),
                        queued: opened,
                    },
                );
            if matches!(r.step.action, StepAction::Cancel { .. }) {
                // A notice, not work to wait for: the watchdog does not track it.
                continue;
            }
            active.insert(
                r.step.id.clone(),
                ActiveStep {
                    id: r.step.id.clone(),
                    node: r.step.node_id.clone(),
                    lane: r.step.lane,
                    started: (r.state == StepState::Running).then_some(now),
                    budget: budget_of(&r.step.action),
                    fetch: fetch_of(&r.step.action),
                },
            );
        }
        Ok(StepQueue {
            store,
            key: std::sync::RwLock::new(key),
            alloc: Mutex::new(LastSeqs::default()),
            records: Mutex::new(()),
            handouts: HandOuts::new(DEFAULT_HANDOUT_WINDOW),
            wakers: Mutex::new(HashMap::new()),
            open_seqs: Mutex::new(open_seqs),
            waiters: Mutex::new(HashMap::new()),
            updates,
            active: Mutex::new(active),
            clocks,
            metrics: Default::default(),
        })
    }

    /// At most `limit` steps handed out and not answered yet
    /// (`handout_window`); set once, before the agents link.
    pub fn set_handout_window(&mut self, limit: usize) {
        self.handouts = HandOuts::new(limit);
    }

    fn signing_key(&self) -> Arc<ring::signature::Ed25519KeyPair> {
        self.key.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the step key with the one `rotate` makes, under the
    /// allocation lock, so that every step queued before is signed with the
    /// old key and every one after with the new. `rotate` is given, per
    /// node, the last sequence number queued on each lane so far: the steps
    /// the old key signed.
    pub(crate) fn rotate_key<E>(
        &self,
        rotate: impl FnOnce(
            std::collections::BTreeMap<String, Vec<(Lane, u64)>>,
        ) -> Result<Arc<ring::signature::Ed25519KeyPair>, E>,
    ) -> Result<(), E>
    where
        E: From<StoreError>,
    {
        let mut known = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
        let mut last: std::collections::BTreeMap<String, Vec<(Lane, u64)>> = Default::default();
        for (node, lane) in self.queues_in_store()? {
            let seq = last_seq(&*self.store, &mut known, &node, lane)?;
            last.entry(node.to_string()).or_default().push((lane, seq));
        }
        let key = rotate(last)?;
        *self.key.write().unwrap_or_else(|p| p.into_inner()) = key;
        Ok(())
    }

    /// Every (node, lane) with a step record or a counter in the store:
    /// the counters, and one skip through the steps tree per queue (its
    /// first key, then on past its prefix), not a read of every step.
    fn queues_in_store(&self) -> Result<BTreeSet<(NodeId, Lane)>, StoreError> {
        let lane_of = |name: &str| Lane::ALL.into_iter().find(|l| l.as_str() == name);
        let mut queues = BTreeSet::new();
        for (key, _) in self.store.list(Tree::Meta)? {
            if let Some((node, lane)) = key
                .strip_prefix("seq/")
                .and_then(|rest| rest.rsplit_once('/'))
                && let Some(lane) = lane_of(lane)
            {
                queues.insert((NodeId::from(node.to_owned()), lane));
            }
        }
        let mut from = String::new();
        while let Some((key, _)) = self.store.scan(Tree::Steps, "", &from, 1)?.pop() {
            // Keys are `node/lane/seq`; node ids hold no '/'.
            let mut parts = key.splitn(3, '/');
            let (Some(node), Some(lane)) = (parts.next(), parts.next()) else {
                return Err(StoreError::BadKey {
                    tree: Tree::Steps.name(),
                    key,
                });
            };
            let Some(lane) = lane_of(lane) else {
                return Err(StoreError::BadKey {
                    tree: Tree::Steps.name(),
                    key,
                });
            };
            // The first key past the prefix `node/lane/`: '0' follows '/'.
            from = format!("{node}/{}0", lane.as_str());
            queues.insert((NodeId::from(node.to_owned()), lane));
        }
        Ok(queues)
    }

    fn active_index(&self) -> std::sync::MutexGuard<'_, HashMap<StepId, ActiveStep>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `node` has a `Fetch` step for the artifact `sha256` that is
    /// not final yet: the only reason it may download it.
    pub(crate) fn may_fetch(&self, node: &NodeId, sha256: &str) -> bool {
        self.active_index()
            .values()
            .any(|a| a.node == *node && a.fetch.as_deref() == Some(sha256))
    }

    /// The steps not final yet, for the watchdog.
    pub(crate) fn active(&self) -> Vec<ActiveStep> {
        self.active_index().values().cloned().collect()
    }

    /// Per lane, how many steps the watchdog tracks are queued and running
    /// (for the metrics; a cancel notice is not tracked).
    pub(crate) fn open_counts(&self) -> [(Lane, u64, u64); 3] {
        let mut out = Lane::ALL.map(|l| (l, 0, 0));
        for a in self.active_index().values() {
            if let Some((_, queued, running)) = out.iter_mut().find(|(l, _, _)| *l == a.lane) {
                if a.started.is_some() {
                    *running += 1;
                } else {
                    *queued += 1;
                }
            }
        }
        out
    }

    /// Ends a step that is not final yet as failed, with `reason` as its
    /// error (the node went silent, was revoked, or never answered); a step
    /// already final is left as it is. Durable when this returns; the
    /// agent's own result, if it comes later, is acknowledged and ignored.
    pub fn fail(&self, step_id: &StepId, reason: &str) -> Result<Option<StepRecord>, StoreError> {
        let now = rfc3339(SystemTime::now());
        let mut changed = false;
        let r = self.update(step_id, |r| {
            if !r.state.is_final() {
                r.state = StepState::Failed;
                r.finished_at = Some(now);
                r.outcome = Some(StepOutcome {
                    error: Some(reason.to_owned()),
                    ..StepOutcome::default()
                });
                changed = true;
            }
        })?;
        self.active_index().remove(step_id);
        if changed && let Some(r) = &r {
            self.announce_end(&Arc::new(r.clone()));
        }
        Ok(r)
    }

    /// Fails every step of `node` not final yet with `reason` (the node was
    /// revoked). Returns how many it failed.
    pub fn fail_node(&self, node: &NodeId, reason: &str) -> Result<usize, StoreError> {
        let ids: Vec<StepId> = self
            .active_index()
            .values()
            .filter(|a| a.node == *node)
            .map(|a| a.id.clone())
            .collect();
        let mut failed = 0;
        for id in ids {
            if self.fail(&id, reason)?.is_some() {
                failed += 1;
            }
        }
        Ok(failed)
    }

    /// Live updates of every step.
    pub fn subscribe(&self) -> broadcast::Receiver<StepUpdate> {
        self.updates.subscribe()
    }

    fn waker(&self, node: &NodeId, lane: Lane) -> Arc<Notify> {
        self.wakers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((node.clone(), lane))
            .or_default()
            .clone()
    }

    fn open_seqs(&self) -> std::sync::MutexGuard<'_, HashMap<(NodeId, Lane), OpenSteps>> {
        self.open_seqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records that step `seq` of (`node`, `lane`) is final: pulls no
    /// longer look for it. Called under the record lock.
    fn closed(&self, node: &NodeId, lane: Lane, seq: u64) {
        let mut open = self.open_seqs();
        let key = (node.clone(), lane);
        if let Some(seqs) = open.get_mut(&key) {
            seqs.remove(&seq);
            if seqs.is_empty() {
                open.remove(&key);
            }
        }
    }

    /// The open step `step_id`'s record, from the index: at `at` when
    /// given, else wherever the active index places it. `None` when it is
    /// not open (or not there).
    fn open_record(
        &self,
        step_id: &StepId,
        at: Option<(&NodeId, Lane, u64)>,
    ) -> Option<Arc<StepRecord>> {
        let (queue, seq) = match at {
            Some((node, lane, seq)) => ((node.clone(), lane), Some(seq)),
            None => {
                let active = self.active_index();
                let a = active.get(step_id)?;
                ((a.node.clone(), a.lane), None)
            }
        };
        let open = self.open_seqs();
        let seqs = open.get(&queue)?;
        match seq {
            Some(seq) => seqs.get(&seq).filter(|o| o.record.step.id == *step_id),
            None => seqs.values().find(|o| o.record.step.id == *step_id),
        }
        .map(|o| o.record.clone())
    }

    /// Tells that the step of `r` ended, once that is on disk: on the
    /// updates, and to the callers waiting for it.
    fn announce_end(&self, r: &Arc<StepRecord>) {
        let _ = self.updates.send(finished_update(r));
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if waiters.is_empty() {
            return;
        }
        if let Some(list) = waiters.get_mut(&r.step.id) {
            list.retain(|tx| tx.send(r.clone()).is_ok());
            if list.is_empty() {
                waiters.remove(&r.step.id);
            }
        }
    }

    /// A fresh step id.
    pub fn new_id() -> Result<StepId, StepsError> {
        Ok(StepId::from(format!(
            "s-{}",
            random_hex(8).map_err(|_| StepsError::Random)?
        )))
    }

    /// Queues `action` for `node` on `lane`; durable (and pullable) when this returns.
    pub fn enqueue(
        &self,
        node: &NodeId,
        lane: Lane,
        action: StepAction,
        deployment_id: Option<DeploymentId>,
        ttl: Duration,
    ) -> Result<StepRecord, StepsError> {
        self.enqueue_with_id(StepQueue::new_id()?, node, lane, action, deployment_id, ttl)
    }

    /// Like [`StepQueue::enqueue`] with an id chosen (and recorded) by the
    /// caller beforehand; idempotent: if a step with `id` exists it is
    /// returned as it is, so a caller that crashed after queueing does not
    /// queue the same work twice.
    pub fn enqueue_with_id(
        &self,
        id: StepId,
        node: &NodeId,
        lane: Lane,
        action: StepAction,
        deployment_id: Option<DeploymentId>,
        ttl: Duration,
    ) -> Result<StepRecord, StepsError> {
        let mut records = self.enqueue_many(vec![NewStep {
            id: Some(id),
            node: node.clone(),
            lane,
            action,
            deployment_id,
            ttl,
        }])?;
        match records.pop() {
            Some(r) => Ok(r),
            None => unreachable!("enqueue_many answers one record per step given"),
        }
    }

    /// Queues several steps (an exec's fan-out, a deployment's next steps)
    /// with one flush of the store for all of them instead of one each; the
    /// records come back in the order given. Durable when this returns; each
    /// step is pullable once its own write is on disk, which for a large
    /// batch is before the whole batch is written: the steps are signed and
    /// written [`ENQUEUE_CHUNK`] at a time, and the pulls of one chunk are
    /// woken while the next is signed, so that the agents start on a
    /// fan-out to 10,000 nodes without waiting for all of it. As
    /// [`StepQueue::enqueue_with_id`], a step whose id exists already is
    /// returned as it is, not queued again.
    pub fn enqueue_many(&self, steps: Vec<NewStep>) -> Result<Vec<StepRecord>, StepsError> {
        let now = SystemTime::now();
        let mut records: Vec<StepRecord> = Vec::with_capacity(steps.len());
        let mut last = None;
        {
            // The allocation lock, held until every chunk is applied and in
            // the open index: batches queue their numbers one after another.
            let mut known = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            let mut batch: HashMap<StepId, usize> = HashMap::new();
            let mut steps = steps.into_iter().peekable();
            while steps.peek().is_some() {
                let chunk: Vec<NewStep> = steps.by_ref().take(ENQUEUE_CHUNK).collect();
                let first = records.len();
                let queued = self.enqueue_chunk(chunk, now, &mut known, &mut batch, &mut records);
                let (written, queues) = match queued {
                    Ok(q) => q,
                    Err(e) => {
                        // Some of the chunk may be in the store: its
                        // queues' numbers are read from there again.
                        for r in &records[first..] {
                            known.remove(&(r.step.node_id.clone(), r.step.lane));
                        }
                        return Err(e);
                    }
                };
                for (node, lane) in &queues {
                    self.waker(node, *lane).notify_waiters();
                }
                last = Some(written);
            }
        }
        if let Some(written) = last {
            self.store.sync(written)?;
        }
        Ok(records)
    }

    /// Signs and writes one chunk of [`StepQueue::enqueue_many`] under the
    /// allocation lock (`known`), then puts its steps in the open index
    /// with the mark of their write; answers that mark and the queues that
    /// got steps. `batch` holds the ids queued by the earlier chunks.
    fn enqueue_chunk(
        &self,
        steps: Vec<NewStep>,
        now: SystemTime,
        known: &mut LastSeqs,
        batch: &mut HashMap<StepId, usize>,
        records: &mut Vec<StepRecord>,
    ) -> Result<(Written, HashSet<(NodeId, Lane)>), StepsError> {
        let mut writes: Vec<(Tree, String, Vec<u8>)> = Vec::with_capacity(2 * steps.len());
        let mut queues: HashSet<(NodeId, Lane)> = HashSet::new();
        let mut fresh: Vec<usize> = Vec::with_capacity(steps.len());
        for new in steps {
            // Only a given id is looked up: a fresh one (64 random bits)
            // is new, and finding an unrelated step under it would be
            // no answer either.
            let id = match new.id {
                Some(id) => {
                    if let Some(i) = batch.get(&id) {
                        let again: StepRecord = records[*i].clone();
                        records.push(again);
                        continue;
                    }
                    if let Some((_, existing)) = self.by_id(&id)? {
                        records.push(existing);
                        continue;
                    }
                    id
                }
                None => StepQueue::new_id()?,
            };
            let NewStep {
                node,
                lane,
                action,
                deployment_id,
                ttl,
                ..
            } = new;
            let seq = last_seq(&*self.store, known, &node, lane)? + 1;
            known.insert((node.clone(), lane), seq);
            let step = Step {
                id: id.clone(),
                deployment_id,
                node_id: node.clone(),
                lane,
                seq,
                issued_at: unix(now),
                // The agent checks it with its own clock: give the step
                // its whole TTL there (a skew measured later does not
                // change a step already signed).
                not_after: deadline_on_node(
                    unix(now),
                    ttl.as_secs(),
                    self.clocks.of(&node).unwrap_or(0),
                ),
                action,
            };
            let signed = sign_step(&step, &self.signing_key())?;
            let record = StepRecord {
                step,
                signed,
                state: StepState::Queued,
                created_at: rfc3339(now),
                started_at: None,
                finished_at: None,
                outcome: None,
                refusal: None,
            };
            let key = key_of(&node, lane, seq);
            // The id index first, the step itself next: the store keeps
            // its writes in order through a crash, so an index entry
            // may outlive its record (lookups check the record's id), but
            // a record never lacks its index entry (a deployment that
            // queues the same id again finds it instead of queueing the
            // work twice).
            writes.push((Tree::StepIds, id.to_string(), json(Tree::StepIds, &key)?));
            writes.push((Tree::Steps, key, json(Tree::Steps, &record)?));
            batch.insert(id, records.len());
            fresh.push(records.len());
            records.push(record);
            queues.insert((node, lane));
        }
        let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
        let written = self.store.apply(&writes)?;
        // After the store: a pull that finds a step here finds its record,
        // and waits for the flush of `written` before handing it out.
        let mut active = self.active_index();
        let mut open = self.open_seqs();
        for i in fresh {
            let r = &records[i];
            active.insert(
                r.step.id.clone(),
                ActiveStep {
                    id: r.step.id.clone(),
                    node: r.step.node_id.clone(),
                    lane: r.step.lane,
                    started: None,
                    budget: budget_of(&r.step.action),
                    fetch: fetch_of(&r.step.action),
                },
            );
            open.entry((r.step.node_id.clone(), r.step.lane))
                .or_default()
                .insert(
                    r.step.seq,
                    OpenStep {
                        record: Arc::new(r.clone()),
                        queued: written,
                    },
                );
        }
        Ok((written, queues))
    }

    pub fn get(&self, step_id: &StepId) -> Result<Option<StepRecord>, StoreError> {
        Ok(self.by_id(step_id)?.map(|(_, r)| r))
    }

    /// What a pull of (`node`, `lane`) after `after_seq` would be handed,
    /// without the write mark (for the tests).
    #[cfg(test)]
    fn next_for(&self, node: &NodeId, lane: Lane, after_seq: u64) -> Option<(u64, SignedStep)> {
        self.next_open(node, lane, after_seq)
            .map(|(seq, signed, _)| (seq, signed))
    }

    /// The next step of (`node`, `lane`) after `after_seq` still to run,
    /// with its sequence number and the mark of the write that queued it,
    /// from the index of open steps (no store read). Durable only once that
    /// mark is synced: [`StepQueue::pull`] waits for that.
    fn next_open(
        &self,
        node: &NodeId,
        lane: Lane,
        after_seq: u64,
    ) -> Option<(u64, SignedStep, Written)> {
        self.open_seqs()
            .get(&(node.clone(), lane))?
            .range(after_seq.saturating_add(1)..)
            .next()
            .map(|(seq, open)| (*seq, open.record.signed.clone(), open.queued))
    }

    /// Whether (`node`, `lane`) has a step after `after_seq` still to run.
    fn has_open(&self, node: &NodeId, lane: Lane, after_seq: u64) -> bool {
        self.open_seqs()
            .get(&(node.clone(), lane))
            .is_some_and(|open| open.range(after_seq.saturating_add(1)..).next().is_some())
    }

    /// Long-poll: waits up to `window` for a step of (`node`, `lane`) after `after_seq`.
    pub async fn pull(
        &self,
        node: &NodeId,
        lane: Lane,
        after_seq: u64,
        window: Duration,
    ) -> Result<Option<SignedStep>, StoreError> {
        let waker = self.waker(node, lane);
        let deadline = tokio::time::Instant::now() + window;
        loop {
            let notified = waker.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.has_open(node, lane, after_seq) {
                // Room in the hand-out window first; until the end of this
                // long-poll at most, then the agent is told Idle and pulls
                // again.
                let Some(place) = self.handouts.place(deadline).await else {
                    return Ok(None);
                };
                // Read again: the step may have been cancelled meanwhile.
                let Some((_, signed, written)) = self.next_open(node, lane, after_seq) else {
                    continue;
                };
                // Handed out only once the write that queued it is on disk
                // (usually already: the queueing waited for it).
                self.store.synced(written).await?;
                self.handouts.handed(node, lane, place);
                return Ok(Some(signed));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(None);
            }
        }
    }

    /// Changes step `step_id`'s record with `f` under the record lock;
    /// durable once the mark is synced.
    fn apply_update(
        &self,
        step_id: &StepId,
        f: impl FnOnce(&mut StepRecord),
    ) -> Result<Option<(StepRecord, Written)>, StoreError> {
        self.apply_update_at(step_id, None, f)
    }

    /// [`StepQueue::apply_update`], reading the record where `at` (node,
    /// lane, sequence number, as an agent's event names them) says it is,
    /// without the id index, when it is there; by its id otherwise.
    fn apply_update_at(
        &self,
        step_id: &StepId,
        at: Option<(&NodeId, Lane, u64)>,
        f: impl FnOnce(&mut StepRecord),
    ) -> Result<Option<(StepRecord, Written)>, StoreError> {
        let _guard = self.records.lock().unwrap_or_else(|p| p.into_inner());
        // An open step's record is in memory, as last written.
        let found = match self.open_record(step_id, at) {
            Some(r) => {
                let (node, lane, seq) = (&r.step.node_id, r.step.lane, r.step.seq);
                Some((key_of(node, lane, seq), StepRecord::clone(&r)))
            }
            None => self.find(step_id, at)?,
        };
        let Some((key, mut r)) = found else {
            return Ok(None);
        };
        let was = r.state;
        f(&mut r);
        let written = self.store.apply_json(Tree::Steps, &key, &r)?;
        let (node, lane, seq) = (&r.step.node_id, r.step.lane, r.step.seq);
        if r.state.is_final() {
            self.closed(node, lane, seq);
        } else if let Some(open) = self
            .open_seqs()
            .get_mut(&(node.clone(), lane))
            .and_then(|seqs| seqs.get_mut(&seq))
        {
            open.record = Arc::new(r.clone());
        }
        self.metrics.moved(&r, was);
        Ok(Some((r, written)))
    }

    /// Step `step_id`'s key and record: read where `at` says when the
    /// record there is that step's, else through the id index.
    fn find(
        &self,
        step_id: &StepId,
        at: Option<(&NodeId, Lane, u64)>,
    ) -> Result<Option<(String, StepRecord)>, StoreError> {
        if let Some((node, lane, seq)) = at {
            let key = key_of(node, lane, seq);
            if let Some(r) = self.store.get_json::<StepRecord>(Tree::Steps, &key)?
                && r.step.id == *step_id
            {
                return Ok(Some((key, r)));
            }
        }
        self.by_id(step_id)
    }

    /// Step `step_id`'s key and record through the id index. The record
    /// found must carry that id: an index entry can outlive a step record
    /// lost with the writes after the last flush (a crash), and the
    /// sequence number it named is then issued again to another step.
    fn by_id(&self, step_id: &StepId) -> Result<Option<(String, StepRecord)>, StoreError> {
        let Some(key) = self
            .store
            .get_json::<String>(Tree::StepIds, step_id.as_str())?
        else {
            return Ok(None);
        };
        Ok(self
            .store
            .get_json::<StepRecord>(Tree::Steps, &key)?
            .filter(|r| r.step.id == *step_id)
            .map(|r| (key, r)))
    }

    /// [`StepQueue::apply_update`], durable when this returns.
    fn update(
        &self,
        step_id: &StepId,
        f: impl FnOnce(&mut StepRecord),
    ) -> Result<Option<StepRecord>, StoreError> {
        let Some((r, written)) = self.apply_update(step_id, f)? else {
            return Ok(None);
        };
        self.store.sync(written)?;
        Ok(Some(r))
    }

    /// Applies one of an agent's events ([`StepQueue::on_events`]).
    /// Returns whether it must be acknowledged (Finished/Refused, once
    /// durable: it returns only then).
    pub async fn on_event(&self, node: &NodeId, ev: StepEvent) -> Result<bool, StoreError> {
        let applied = self.on_events(node, vec![ev]).await;
        match applied.error {
            Some((_, e)) => Err(e),
            None => Ok(!applied.acks.is_empty()),
        }
    }

    /// Applies a batch of an agent's events, in order, with one wait for
    /// the disk for them all: what a link reads at once (a quick step's
    /// `Started` and `Finished` come together, and a start followed by its
    /// end in one batch is one write). News of each goes out once the
    /// batch is durable; results and refusals are then acknowledged
    /// ([`EventsApplied::acks`]), even for a step this controller does not
    /// know (the agent may drop it). A store error stops the batch there:
    /// what came before it still goes out and is acknowledged.
    pub async fn on_events(&self, node: &NodeId, events: Vec<StepEvent>) -> EventsApplied {
        self.handouts.answered(node, events.iter().map(|e| e.lane));
        let now = rfc3339(SystemTime::now());
        let mut out = EventsApplied::default();
        let mut applied: Vec<(StepEvent, Option<Arc<StepRecord>>)> =
            Vec::with_capacity(events.len());
        let mut last: Option<Written> = None;
        let mut events = events.into_iter().peekable();
        while let Some(ev) = events.next() {
            if matches!(ev.kind, StepEventKind::Output { .. }) {
                applied.push((ev, None));
                continue;
            }
            let end = match events.peek() {
                Some(next)
                    if matches!(ev.kind, StepEventKind::Started)
                        && next.step_id == ev.step_id
                        && matches!(
                            next.kind,
                            StepEventKind::Finished(_) | StepEventKind::Refused(_)
                        ) =>
                {
                    events.next()
                }
                _ => None,
            };
            let change = self.apply_update_at(&ev.step_id, Some((node, ev.lane, ev.seq)), |r| {
                apply_event(r, node, &ev.kind, &now);
                if let Some(end) = &end {
                    apply_event(r, node, &end.kind, &now);
                }
            });
            match change {
                Ok(r) => {
                    let r = r.map(|(r, written)| {
                        last = last.max(Some(written));
                        Arc::new(r)
                    });
                    if let Some(end) = end {
                        applied.push((ev, r.clone()));
                        applied.push((end, r));
                    } else {
                        applied.push((ev, r));
                    }
                }
                Err(e) => {
                    out.error = Some((ev.step_id, e));
                    break;
                }
            }
        }
        if let Some(written) = last
            && let Err(e) = self.store.synced(written).await
        {
            // Nothing of the batch is known to be on disk: no news, no acks.
            let first = applied
                .into_iter()
                .next()
                .map(|(ev, _)| ev.step_id)
                .unwrap_or_else(|| StepId::from(String::new()));
            out.error = Some((first, e));
            return out;
        }
        for (ev, r) in applied {
            match ev.kind {
                StepEventKind::Started => {
                    if let Some(a) = self.active_index().get_mut(&ev.step_id) {
                        a.started.get_or_insert_with(Instant::now);
                    }
                    if r.is_some() {
                        let _ = self.updates.send(StepUpdate::Started {
                            step_id: ev.step_id,
                            node_id: node.clone(),
                        });
                    }
                }
                StepEventKind::Output { stream, lines } => {
                    let _ = self.updates.send(StepUpdate::Output {
                        step_id: ev.step_id,
                        node_id: node.clone(),
                        stream,
                        lines: Arc::new(lines),
                    });
                }
                StepEventKind::Finished(_) | StepEventKind::Refused(_) => {
                    self.forget_if_final(&ev.step_id, r.as_deref());
                    if let StepEventKind::Refused(why) = &ev.kind {
                        tracing::warn!(node = node.as_str(), step = %ev.step_id, reason = %why, "agent refused a step");
                    }
                    // Only a step that did end: an agent's result for
                    // another node's step changes nothing and says nothing.
                    if let Some(r) = r.as_ref().filter(|r| r.state.is_final()) {
                        self.announce_end(r);
                    }
                    let result =
                        matches!(ev.kind, StepEventKind::Finished(_)).then_some((ev.lane, ev.seq));
                    out.acks.push((ev.step_id, result));
                }
            }
        }
        out
    }

    /// Cancels the steps `ids` that are not final yet: each is marked
    /// `cancelled` (durably, so no agent is handed it again), and each node
    /// that may hold one (pulled, running) gets a signed `Cancel` on its
    /// control lane, which kills a running step's process group and makes
    /// one not started yet end without running. Returns the records of the
    /// steps it cancelled.
    pub fn cancel(&self, ids: &[StepId]) -> Result<Vec<StepRecord>, StepsError> {
        let now = rfc3339(SystemTime::now());
        let mut cancelled = Vec::new();
        let mut per_node: Vec<(NodeId, Vec<StepId>)> = Vec::new();
        let mut changes = Vec::new();
        let mut last = None;
        for id in ids {
            let mut changed = false;
            let r = self.apply_update(id, |r| {
                if !r.state.is_final() {
                    r.state = StepState::Cancelled;
                    r.finished_at = Some(now.clone());
                    changed = true;
                }
            })?;
            if let Some((r, written)) = r {
                last = last.max(Some(written));
                changes.push((id, r, changed));
            }
            self.active_index().remove(id);
        }
        // One flush for them all, before anyone hears of them.
        if let Some(written) = last {
            self.store.sync(written)?;
        }
        for (id, r, changed) in changes {
            if !changed {
                continue;
            }
            match per_node.iter_mut().find(|(n, _)| *n == r.step.node_id) {
                Some((_, v)) => v.push(id.clone()),
                None => per_node.push((r.step.node_id.clone(), vec![id.clone()])),
            }
            self.announce_end(&Arc::new(r.clone()));
            cancelled.push(r);
        }
        let notices = per_node
            .into_iter()
            .map(|(node, step_ids)| NewStep {
                id: None,
                node,
                lane: Lane::Control,
                action: StepAction::Cancel { step_ids },
                deployment_id: None,
                ttl: CANCEL_TTL,
            })
            .collect::<Vec<_>>();
        if !notices.is_empty() {
            let queued = self.enqueue_many(notices)?;
            // A cancel is a notice, not work to wait for: the watchdog does not track it.
            let mut active = self.active_index();
            for r in &queued {
                active.remove(&r.step.id);
            }
        }
        Ok(cancelled)
    }

    fn forget_if_final(&self, step_id: &StepId, r: Option<&StepRecord>) {
        if r.is_none_or(|r| r.state.is_final()) {
            self.active_index().remove(step_id);
        }
    }

    /// Aligns the controller's sequence counters with what an agent reports it has done.
    ///
    /// Only when the agent is *ahead* of this controller (the store was
    /// restored from an older backup) are queued steps with numbers the agent
    /// has already used failed: the agent will never take them. When the
    /// counters agree, a queued step at or below the agent's mark is one it
    /// ran whose `Started` never got stored; its result is still in the
    /// agent's ledger and arrives on the events stream, so it is left alone.
    ///
    /// A report more than [`MAX_RESYNC_AHEAD`] beyond what this controller
    /// issued on any lane is refused as a whole, and nothing changes.
    pub fn resync(&self, node: &NodeId, last_done: &[(Lane, u64)]) -> Result<(), ResyncError> {
        for (lane, done) in last_done {
            let issued = {
                let mut known = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
                last_seq(&*self.store, &mut known, node, *lane)?
            };
            if *done > issued.saturating_add(MAX_RESYNC_AHEAD) {
                return Err(ResyncError::Implausible {
                    lane: lane.as_str(),
                    done: *done,
                    issued,
                });
            }
        }
        for (lane, done) in last_done {
            let mut known = self.alloc.lock().unwrap_or_else(|p| p.into_inner());
            let last = last_seq(&*self.store, &mut known, node, *lane)?;
            if *done <= last {
                continue;
            }
            tracing::warn!(
                node = node.as_str(),
                lane = lane.as_str(),
                agent = done,
                controller = last,
                "agent has done more steps than this controller issued (restored from backup?); resynchronising"
            );
            self.store
                .put_json(Tree::Meta, &seq_key(node, *lane), done)?;
            known.insert((node.clone(), *lane), *done);
            // Every step this controller knows on the lane has seq <= last < done.
            let stale: Vec<(String, StepRecord)> = scan_json(
                &*self.store,
                Tree::Steps,
                &prefix_of(node, *lane),
                "",
                usize::MAX,
            )?;
            let _records = self.records.lock().unwrap_or_else(|p| p.into_inner());
            for (key, mut r) in stale {
                if r.state == StepState::Queued {
                    self.active_index().remove(&r.step.id);
                    r.state = StepState::Failed;
                    r.refusal = Some(format!(
                        "the agent already used sequence {} on lane {} (the controller was restored from an older backup); queue the work again",
                        r.step.seq,
                        lane.as_str()
                    ));
                    self.store.put_json(Tree::Steps, &key, &r)?;
                    self.closed(node, *lane, r.step.seq);
                    self.metrics.moved(&r, StepState::Queued);
                    self.announce_end(&Arc::new(r.clone()));
                }
            }
        }
        Ok(())
    }

    /// Waits until every step in `ids` is final or `deadline` passes;
    /// returns the records as they are then, in the order of `ids` (`None`
    /// for an id this queue does not know).
    ///
    /// Linear in `ids`, and no store read for a step that ends while it
    /// waits: it registers for the ids, and each step's record is handed
    /// to it once its end is on disk. Only the steps already ended when it
    /// began, and those still open at the deadline, are read from the
    /// store. (Re-reading every record on every update made an exec to
    /// 10,000 nodes quadratic; reading each once at the end still cost a
    /// tenth of the controller's CPU in one.)
    pub async fn wait_all(
        &self,
        ids: &[StepId],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Option<StepRecord>>, StoreError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let _registered = Waiting::register(self, ids, tx);
        // Registered first: a step that ends from here on is either gone
        // from the active index below or handed over on `rx`.
        let mut open: HashSet<&StepId> = {
            let active = self.active_index();
            ids.iter().filter(|id| active.contains_key(*id)).collect()
        };
        let mut ended: HashMap<StepId, Arc<StepRecord>> = HashMap::new();
        while !open.is_empty() {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(r)) => {
                    open.remove(&r.step.id);
                    ended.insert(r.step.id.clone(), r);
                }
                Ok(None) | Err(_) => break,
            }
        }
        ids.iter()
            .map(|id| match ended.get(id) {
                Some(r) => Ok(Some(StepRecord::clone(r))),
                None => self.get(id),
            })
            .collect()
    }
}

/// A caller of [`StepQueue::wait_all`] registered for its steps' ends,
/// until it is dropped.
struct Waiting<'a> {
    queue: &'a StepQueue,
    ids: &'a [StepId],
    tx: mpsc::UnboundedSender<Arc<StepRecord>>,
}

impl<'a> Waiting<'a> {
    fn register(
        queue: &'a StepQueue,
        ids: &'a [StepId],
        tx: mpsc::UnboundedSender<Arc<StepRecord>>,
    ) -> Waiting<'a> {
        let mut waiters = queue.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for id in ids {
            waiters.entry(id.clone()).or_default().push(tx.clone());
        }
        drop(waiters);
        Waiting { queue, ids, tx }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiters = self.queue.waiters.lock().unwrap_or_else(|p| p.into_inner());
        for id in self.ids {
            if let Some(list) = waiters.get_mut(id) {
                list.retain(|tx| !tx.same_channel(&self.tx));
                if list.is_empty() {
                    waiters.remove(id);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::SledStore;
    use ring::signature::KeyPair;

    fn queue() -> (tempfile::TempDir, StepQueue, Vec<u8>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (q, pk) = queue_on(dir.path());
        (dir, q, pk)
    }

    /// A queue on the store in `dir` (reopened if this process just closed
    /// it), with a fresh step key; the key's public half.
    fn queue_on(dir: &std::path::Path) -> (StepQueue, Vec<u8>) {
        queue_with(dir, ClockSkews::default())
    }

    /// [`queue_on`], issuing steps with the node clock skews in `clocks`.
    fn queue_with(dir: &std::path::Path, clocks: ClockSkews) -> (StepQueue, Vec<u8>) {
        let store: Arc<dyn Store> = Arc::new(crate::testkit::reopen(|| SledStore::open(dir)));
        let key = new_key();
        let pk = key.public_key().as_ref().to_vec();
        (
            StepQueue::open(store, Arc::new(key), clocks).expect("open"),
            pk,
        )
    }

    fn new_key() -> ring::signature::Ed25519KeyPair {
        let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new())
            .expect("gen");
        ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key")
    }

    fn n1() -> NodeId {
        NodeId::from("n1")
    }

    fn n2() -> NodeId {
        NodeId::from("n2")
    }

    fn echo() -> StepAction {
        StepAction::Script {
            script: "echo".into(),
            user: None,
            env: vec![],
            timeout_secs: 5,
        }
    }

    fn finished(step: &StepRecord) -> StepEvent {
        StepEvent {
            step_id: step.step.id.clone(),
            lane: step.step.lane,
            seq: step.step.seq,
            kind: StepEventKind::Finished(StepOutcome {
                exit_code: Some(0),
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn wait_all_answers_in_the_order_asked_once_all_are_final_or_time_is_up() {
        let (_d, q, _) = queue();
        let q = Arc::new(q);
        let [a, b, c] = [n1(), n2(), n1()].map(|n| {
            q.enqueue(&n, Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
                .expect("enqueue")
        });
        // `a` ends before the wait; `b` while it waits (or just before it
        // subscribes: either way it must be seen).
        q.on_event(&n1(), finished(&a)).await.expect("a");
        let ended = {
            let (q, b) = (q.clone(), b.clone());
            tokio::spawn(async move {
                tokio::task::yield_now().await;
                q.on_event(&n2(), finished(&b)).await.expect("b")
            })
        };
        let unknown = StepId::from("s-unknown");
        let ids = [b.step.id.clone(), unknown.clone(), a.step.id.clone()];
        let far = tokio::time::Instant::now() + Duration::from_secs(30);
        let got = q.wait_all(&ids, far).await.expect("wait");
        assert!(ended.await.expect("join"), "the result was acknowledged");
        let states: Vec<Option<(StepId, StepState)>> = got
            .iter()
            .map(|r| r.as_ref().map(|r| (r.step.id.clone(), r.state)))
            .collect();
        assert_eq!(
            states,
            vec![
                Some((b.step.id.clone(), StepState::Done)),
                None,
                Some((a.step.id.clone(), StepState::Done)),
            ]
        );
        // `c` never ends: the deadline answers with it as it is.
        let soon = tokio::time::Instant::now() + Duration::from_millis(100);
        let got = q
            .wait_all(&[a.step.id.clone(), c.step.id.clone()], soon)
            .await
            .expect("wait");
        assert_eq!(
            got.iter()
                .map(|r| r.as_ref().map(|r| r.state))
                .collect::<Vec<_>>(),
            vec![Some(StepState::Done), Some(StepState::Queued)]
        );
        assert!(
            tokio::time::Instant::now() >= soon,
            "it waited for the deadline"
        );
        // Two callers waiting for one step both get its end; neither
        // stays registered.
        let both = {
            let (q1, q2) = (q.clone(), q.clone());
            let (id1, id2) = (c.step.id.clone(), c.step.id.clone());
            let far = tokio::time::Instant::now() + Duration::from_secs(30);
            (
                tokio::spawn(async move { q1.wait_all(&[id1], far).await }),
                tokio::spawn(async move { q2.wait_all(&[id2], far).await }),
            )
        };
        wait_for_waiters(&q, 1, 2).await;
        q.on_event(&n1(), finished(&c)).await.expect("c");
        for h in [both.0, both.1] {
            let got = h.await.expect("join").expect("wait");
            assert_eq!(got[0].as_ref().map(|r| r.state), Some(StepState::Done));
        }
        assert!(q.waiters.lock().expect("lock").is_empty());
    }

    /// Waits (bounded) until `steps` steps have `callers` registered callers each.
    async fn wait_for_waiters(q: &StepQueue, steps: usize, callers: usize) {
        for _ in 0..1000 {
            {
                let w = q.waiters.lock().expect("lock");
                if w.len() == steps && w.values().all(|l| l.len() == callers) {
                    return;
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("the callers never registered");
    }

    /// A queued step is one record (with its id index entry), no counter:
    /// after a reopen the numbers go on from the lane's last record; a
    /// record lost in a crash frees its number, and its id index entry,
    /// which outlived it, answers neither for the step that gets the
    /// number next nor for a queueing of its own id again.
    #[tokio::test]
    async fn numbers_go_on_from_the_records_and_an_index_entry_without_its_record_answers_nothing()
    {
        let dir = tempfile::tempdir().expect("tempdir");
        let lost = StepId::from("s-lost".to_owned());
        {
            let (q, _) = queue_on(dir.path());
            for _ in 0..3 {
                q.enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
                    .expect("queue");
            }
            let r = q
                .enqueue_with_id(
                    lost.clone(),
                    &n1(),
                    Lane::Adhoc,
                    echo(),
                    None,
                    DEFAULT_STEP_TTL,
                )
                .expect("queue");
            assert_eq!(r.step.seq, 4);
            assert!(
                q.store
                    .get(Tree::Meta, &seq_key(&n1(), Lane::Adhoc))
                    .expect("read")
                    .is_none()
            );
            // The crash: the record is gone, its index entry stays.
            q.store
                .remove(Tree::Steps, &key_of(&n1(), Lane::Adhoc, 4))
                .expect("remove");
        }
        let (q, _) = queue_on(dir.path());
        let other = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("queue");
        assert_eq!(other.step.seq, 4, "the lost number is issued again");
        assert!(
            q.get(&lost).expect("read").is_none(),
            "the old id names nothing"
        );
        let again = q
            .enqueue_with_id(
                lost.clone(),
                &n1(),
                Lane::Adhoc,
                echo(),
                None,
                DEFAULT_STEP_TTL,
            )
            .expect("queue");
        assert_eq!((again.step.id.clone(), again.step.seq), (lost.clone(), 5));
        assert_eq!(q.get(&lost).expect("read").map(|r| r.step.seq), Some(5));
        assert_eq!(
            q.get(&other.step.id).expect("read").map(|r| r.step.seq),
            Some(4)
        );
        // A rotation hands the old key the last numbers from the records.
        q.rotate_key(|last| {
            assert_eq!(last.get(n1().as_str()), Some(&vec![(Lane::Adhoc, 5)]));
            Ok::<_, StoreError>(Arc::new(new_key()))
        })
        .expect("rotate");
    }

    /// The signed bytes are stored as base64 texts; a record an earlier
    /// version wrote with arrays of numbers reads the same.
    #[tokio::test]
    async fn a_record_stores_its_signed_bytes_as_text_and_reads_the_older_arrays() {
        let (_d, q, _) = queue();
        let r = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("queue");
        let stored: serde_json::Value = serde_json::from_slice(
            &q.store
                .get(Tree::Steps, &key_of(&n1(), Lane::Adhoc, 1))
                .expect("read")
                .expect("there"),
        )
        .expect("json");
        assert!(stored["signed"]["body"].is_string(), "{stored}");
        assert!(stored["signed"]["signature"].is_string(), "{stored}");
        let mut older = stored.clone();
        older["signed"] = serde_json::json!({
            "body": r.signed.body,
            "signature": r.signed.signature,
        });
        assert!(older["signed"]["body"].is_array());
        let read: StepRecord = serde_json::from_value(older).expect("older form");
        assert_eq!(read.signed, r.signed);
        let read: StepRecord = serde_json::from_value(stored).expect("this form");
        assert_eq!(read.signed, r.signed);
    }

    #[tokio::test]
    async fn lanes_have_their_own_sequences_and_steps_come_in_order() {
        let (_d, q, pk) = queue();
        let a = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("a");
        let b = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("b");
        let c = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("c");
        let d = q
            .enqueue(&n2(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("d");
        assert_eq!(
            (a.step.seq, b.step.seq, c.step.seq, d.step.seq),
            (1, 2, 1, 1)
        );
        let first = q
            .pull(&n1(), Lane::Deploy, 0, Duration::from_millis(10))
            .await
            .expect("pull")
            .expect("step");
        let step =
            de_common::check_step(&first, &pk, &n1(), 0, unix(SystemTime::now())).expect("valid");
        assert_eq!(step.id, a.step.id);
        // Finishing the first makes the second next; a pull past everything waits and times out.
        q.on_event(
            &n1(),
            StepEvent {
                step_id: a.step.id.clone(),
                lane: Lane::Deploy,
                seq: 1,
                kind: StepEventKind::Finished(StepOutcome {
                    exit_code: Some(0),
                    ..Default::default()
                }),
            },
        )
        .await
        .expect("event");
        let second = q
            .pull(&n1(), Lane::Deploy, 1, Duration::from_millis(10))
            .await
            .expect("pull")
            .expect("step");
        assert_eq!(second, b.signed);
        assert!(
            q.pull(&n1(), Lane::Deploy, 2, Duration::from_millis(20))
                .await
                .expect("pull")
                .is_none()
        );
        assert_eq!(
            q.get(&a.step.id).expect("get").expect("rec").state,
            StepState::Done
        );
    }

    #[tokio::test]
    async fn a_batch_continues_each_queue_in_order_and_is_idempotent_on_ids() {
        let (dir, q, pk) = queue();
        let before = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("before");
        let new = |id: Option<&str>, node: &str, lane| NewStep {
            id: id.map(StepId::from),
            node: node.into(),
            lane,
            action: echo(),
            deployment_id: None,
            ttl: DEFAULT_STEP_TTL,
        };
        let got = q
            .enqueue_many(vec![
                new(Some("s-a"), "n1", Lane::Adhoc),
                new(Some("s-b"), "n2", Lane::Adhoc),
                new(Some("s-c"), "n1", Lane::Adhoc),
                new(Some("s-a"), "n1", Lane::Adhoc),
                new(Some(before.step.id.as_str()), "n1", Lane::Adhoc),
                new(None, "n1", Lane::Deploy),
            ])
            .expect("batch");
        let seqs: Vec<(&str, u64)> = got
            .iter()
            .map(|r| (r.step.node_id.as_str(), r.step.seq))
            .collect();
        assert_eq!(
            seqs,
            [
                ("n1", 2),
                ("n2", 1),
                ("n1", 3),
                ("n1", 2),
                ("n1", 1),
                ("n1", 1)
            ],
            "per-queue sequences go on; a repeated id is the step already queued"
        );
        assert_eq!(got[3].signed, got[0].signed);
        assert_eq!(got[4].step.id, before.step.id);
        // Each is signed, findable by id, and pullable in order.
        for r in &got {
            let stored = q.get(&r.step.id).expect("get").expect("stored");
            assert_eq!(stored.signed, r.signed);
            de_common::check_step(&r.signed, &pk, &r.step.node_id, 0, unix(SystemTime::now()))
                .expect("valid");
        }
        let next = q
            .pull(&n1(), Lane::Adhoc, 1, Duration::from_millis(10))
            .await
            .expect("pull")
            .expect("step");
        assert_eq!(next, got[0].signed);
        // And all of it is on disk: a reopened queue continues the sequences.
        drop(q);
        let (q, _) = queue_on(dir.path());
        assert_eq!(
            q.get(&"s-c".into()).expect("get").map(|r| r.step.seq),
            Some(3)
        );
        let after = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("after");
        assert_eq!(after.step.seq, 4);
    }

    /// A batch of events as a link reads them: a start and its end become
    /// one record change, news goes out in the order of the events, each
    /// result is acknowledged (a step this queue does not know too), an
    /// event naming the wrong place is still found by its id, and another
    /// node's step is left alone.
    #[tokio::test]
    async fn a_batch_of_events_is_applied_in_order_and_each_result_acknowledged() {
        let (_d, q, _) = queue();
        let [a, b] = [0, 1].map(|_| {
            q.enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
                .expect("enqueue")
        });
        let theirs = q
            .enqueue(&n2(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        let mut rx = q.subscribe();
        let started = |r: &StepRecord| StepEvent {
            kind: StepEventKind::Started,
            ..finished(r)
        };
        // `b` names the wrong sequence number; `theirs` is n2's step.
        let misplaced = StepEvent {
            seq: 99,
            ..finished(&b)
        };
        let unknown = StepEvent {
            step_id: StepId::from("s-unknown"),
            ..finished(&a)
        };
        let applied = q
            .on_events(
                &n1(),
                vec![
                    started(&a),
                    finished(&a),
                    misplaced,
                    finished(&theirs),
                    unknown,
                ],
            )
            .await;
        assert!(applied.error.is_none(), "{:?}", applied.error);
        let acked: Vec<StepId> = applied.acks.iter().map(|(id, _)| id.clone()).collect();
        assert_eq!(
            acked,
            vec![
                a.step.id.clone(),
                b.step.id.clone(),
                theirs.step.id.clone(),
                StepId::from("s-unknown")
            ]
        );
        assert_eq!(applied.acks[0].1, Some((Lane::Adhoc, 1)));
        let a_now = q.get(&a.step.id).expect("get").expect("a");
        assert_eq!(a_now.state, StepState::Done);
        assert!(a_now.started_at.is_some() && a_now.finished_at.is_some());
        assert_eq!(
            q.get(&b.step.id).expect("get").map(|r| r.state),
            Some(StepState::Done)
        );
        assert_eq!(
            q.get(&theirs.step.id).expect("get").map(|r| r.state),
            Some(StepState::Queued),
            "another node's result changes nothing"
        );
        let mut news = Vec::new();
        while let Ok(u) = rx.try_recv() {
            news.push(match u {
                StepUpdate::Started { step_id, .. } => format!("started {step_id}"),
                StepUpdate::Finished { step_id, state, .. } => format!("{state:?} {step_id}"),
                StepUpdate::Output { step_id, .. } => format!("output {step_id}"),
            });
        }
        assert_eq!(
            news,
            vec![
                format!("started {}", a.step.id),
                format!("Done {}", a.step.id),
                format!("Done {}", b.step.id),
            ],
            "another node's step is not announced as ended"
        );
    }

    /// Pulls look in the index of open steps, not the store's history: a
    /// step that ended is skipped wherever it lies, the index is rebuilt
    /// from the store on reopening (cancel notices included), and a pull
    /// on one lane is not answered with another lane's step.
    #[tokio::test]
    async fn pulls_hand_out_exactly_the_open_steps_before_and_after_a_reopen() {
        let (dir, q, _) = queue();
        let steps: Vec<StepRecord> = (0..5)
            .map(|_| {
                q.enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
                    .expect("enqueue")
            })
            .collect();
        // Steps 1, 2 and 4 end (done, failed, cancelled); 3 and 5 stay open.
        q.on_event(&n1(), finished(&steps[0])).await.expect("done");
        q.fail(&steps[1].step.id, "node silent").expect("fail");
        let notices = q.cancel(&[steps[3].step.id.clone()]).expect("cancel");
        assert_eq!(notices.len(), 1);
        let next = |q: &StepQueue, lane, after| q.next_for(&n1(), lane, after).map(|(seq, _)| seq);
        let expect_open = |q: &StepQueue| {
            assert_eq!(next(q, Lane::Deploy, 0), Some(3));
            assert_eq!(next(q, Lane::Deploy, 3), Some(5));
            assert_eq!(next(q, Lane::Deploy, 5), None);
            assert_eq!(next(q, Lane::Adhoc, 0), None, "no step on that lane");
            // The cancel notice for step 4 waits on the control lane.
            assert_eq!(next(q, Lane::Control, 0), Some(1));
        };
        expect_open(&q);
        drop(q);
        let (q, _) = queue_on(dir.path());
        expect_open(&q);
        // Ending the rest leaves nothing to hand out, and the watchdog
        // tracks no cancel notice.
        for s in [&steps[2], &steps[4]] {
            q.on_event(&n1(), finished(s)).await.expect("done");
        }
        assert_eq!(next(&q, Lane::Deploy, 0), None);
        assert!(
            q.active().iter().all(|a| a.lane != Lane::Control),
            "{:?}",
            q.active()
        );
    }

    #[tokio::test]
    async fn a_waiting_pull_wakes_as_soon_as_a_step_is_queued() {
        let (_d, q, _) = queue();
        let q = Arc::new(q);
        let waiter = {
            let q = q.clone();
            tokio::spawn(
                async move { q.pull(&n1(), Lane::Adhoc, 0, Duration::from_secs(20)).await },
            )
        };
        tokio::task::yield_now().await;
        let started = std::time::Instant::now();
        let r = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        let got = waiter.await.expect("join").expect("pull").expect("step");
        assert_eq!(got, r.signed);
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    /// The case: a node whose clock is 75 s fast refused every
    /// default exec (timeout 60 s + 15 s grace). Issued with its measured
    /// skew, the step lives its whole TTL on the node's clock.
    #[test]
    fn a_step_lives_its_whole_ttl_on_a_node_whose_clock_is_off() {
        let dir = tempfile::tempdir().expect("tempdir");
        let clocks = ClockSkews::default();
        clocks.record(&n1(), 75);
        let (q, pk) = queue_with(dir.path(), clocks.clone());
        let ttl = Duration::from_secs(75);
        let fast = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, ttl)
            .expect("enqueue");
        assert_eq!(fast.step.not_after, fast.step.issued_at + 75 + 75);
        let issued = fast.step.issued_at;
        // n1's clock reads 75 s more than the controller's, from the issue
        // to the end of the TTL.
        for node_now in [issued + 75, issued + 75 + 75] {
            de_common::check_step(&fast.signed, &pk, &n1(), 0, node_now)
                .expect("good on the node's clock");
        }
        assert!(matches!(
            de_common::check_step(&fast.signed, &pk, &n1(), 0, issued + 75 + 76),
            Err(de_common::StepRefusal::Expired { .. })
        ));
        // A node whose clock is behind; one whose skew is not known.
        clocks.record(&n2(), -40);
        let slow = q
            .enqueue(&n2(), Lane::Adhoc, echo(), None, ttl)
            .expect("slow");
        assert_eq!(slow.step.not_after, slow.step.issued_at + 75 - 40);
        let unknown = q
            .enqueue(&"n3".into(), Lane::Adhoc, echo(), None, ttl)
            .expect("unknown");
        assert_eq!(unknown.step.not_after, unknown.step.issued_at + 75);
    }

    #[test]
    fn the_api_view_hides_script_environment_values_and_signed_bytes() {
        let (_d, q, _) = queue();
        let action = StepAction::Script {
            script: "useradd vcap".into(),
            user: None,
            env: vec![("DE_PASSWORD".into(), "s3cret".into())],
            timeout_secs: 5,
        };
        let r = q
            .enqueue(&n1(), Lane::Deploy, action, None, DEFAULT_STEP_TTL)
            .expect("enqueue");
        let shown = r.redacted(&[]).to_string();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(
            shown.contains("DE_PASSWORD") && shown.contains("******"),
            "{shown}"
        );
        assert!(!shown.contains("\"signed\""), "{shown}");
    }

    /// The plan's secrets are hidden in every text the API shows of a step
    /// (script, file contents, output), while the signed step the agent
    /// pulls carries them as rendered.
    #[tokio::test]
    async fn the_api_view_hides_plan_secrets_the_signed_step_keeps_them() {
        let (_d, q, pk) = queue();
        let secrets = [
            "s3cret".to_owned(),
            "r00t".to_owned(),
            "s3cret-r00t".to_owned(),
        ];
        let script = StepAction::Script {
            script: "echo 'vcap:s3cret' | chpasswd; echo root:r00t | chpasswd".into(),
            user: None,
            env: vec![],
            timeout_secs: 5,
        };
        let file = StepAction::WriteFile {
            path: "etc/app.yml".into(),
            contents: b"user: vcap\npassword: s3cret-r00t\n".to_vec(),
            mode: 0o600,
            owner: Some("vcap".into()),
        };
        let plain = StepAction::WriteFile {
            path: "etc/motd".into(),
            contents: b"welcome\n".to_vec(),
            mode: 0o644,
            owner: None,
        };
        let s = q
            .enqueue(&n1(), Lane::Deploy, script.clone(), None, DEFAULT_STEP_TTL)
            .expect("script");
        let f = q
            .enqueue(&n1(), Lane::Deploy, file.clone(), None, DEFAULT_STEP_TTL)
            .expect("file");
        let p = q
            .enqueue(&n1(), Lane::Deploy, plain.clone(), None, DEFAULT_STEP_TTL)
            .expect("plain");
        // What the agent pulls is the step as rendered, signed.
        for (r, action) in [(&s, &script), (&f, &file)] {
            let pulled = q
                .pull(
                    &n1(),
                    Lane::Deploy,
                    r.step.seq - 1,
                    Duration::from_millis(10),
                )
                .await
                .expect("pull")
                .expect("step");
            let step = de_common::check_step(&pulled, &pk, &n1(), 0, unix(SystemTime::now()))
                .expect("valid");
            assert_eq!(&step.action, action);
        }
        q.on_event(
            &n1(),
            StepEvent {
                step_id: s.step.id.clone(),
                lane: Lane::Deploy,
                seq: 1,
                kind: StepEventKind::Finished(StepOutcome {
                    exit_code: Some(1),
                    stderr_tail: "+ echo vcap:s3cret\nchpasswd: failed\n".into(),
                    ..Default::default()
                }),
            },
        )
        .await
        .expect("event");
        let s = q.get(&s.step.id).expect("get").expect("stored");

        let shown = s.redacted(&secrets);
        assert_eq!(
            shown["step"]["action"]["Script"]["script"],
            "echo 'vcap:******' | chpasswd; echo root:****** | chpasswd"
        );
        assert_eq!(
            shown["outcome"]["stderr_tail"],
            "+ echo vcap:******\nchpasswd: failed\n"
        );
        let shown_file = f.redacted(&secrets);
        assert_eq!(
            shown_file["step"]["action"]["WriteFile"]["contents"],
            serde_json::json!(b"******".to_vec()),
            "a file holding a secret is hidden whole"
        );
        assert_eq!(
            shown_file["step"]["action"]["WriteFile"]["path"],
            "etc/app.yml"
        );
        for text in [shown.to_string(), shown_file.to_string()] {
            assert!(!text.contains("s3cret") && !text.contains("r00t"), "{text}");
        }
        let shown_plain = p.redacted(&secrets);
        assert_eq!(
            shown_plain["step"]["action"]["WriteFile"]["contents"],
            serde_json::json!(b"welcome\n".to_vec()),
            "a file without a secret is shown as it is"
        );
    }

    #[tokio::test]
    async fn a_failed_step_is_never_handed_out_and_a_late_result_is_acknowledged_and_ignored() {
        let (dir, q, _pk) = queue();
        let a = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("a");
        let b = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("b");
        let ids = |q: &StepQueue| {
            let mut v: Vec<StepId> = q.active().into_iter().map(|s| s.id).collect();
            v.sort();
            v
        };
        let mut both = vec![a.step.id.clone(), b.step.id.clone()];
        both.sort();
        assert_eq!(ids(&q), both);
        let mut rx = q.subscribe();
        let r = q
            .fail(&a.step.id, "node n1 is gone")
            .expect("fail")
            .expect("rec");
        assert_eq!(r.state, StepState::Failed);
        assert_eq!(
            r.outcome.and_then(|o| o.error).as_deref(),
            Some("node n1 is gone")
        );
        assert!(matches!(
            rx.try_recv(),
            Ok(StepUpdate::Finished {
                state: StepState::Failed,
                ..
            })
        ));
        assert_eq!(ids(&q), vec![b.step.id.clone()]);
        // The agent never gets the failed step: the next pull skips to b.
        let next = q
            .pull(&n1(), Lane::Deploy, 0, Duration::from_millis(10))
            .await
            .expect("pull")
            .expect("step");
        assert_eq!(next, b.signed);
        // Its result, if the node ran it after all, is acknowledged and changes nothing.
        let ack = q
            .on_event(
                &n1(),
                StepEvent {
                    step_id: a.step.id.clone(),
                    lane: Lane::Deploy,
                    seq: 1,
                    kind: StepEventKind::Finished(StepOutcome {
                        exit_code: Some(0),
                        ..Default::default()
                    }),
                },
            )
            .await
            .expect("event");
        assert!(ack);
        assert_eq!(
            q.get(&a.step.id).expect("get").expect("rec").state,
            StepState::Failed
        );
        // Failing again, or a final step, changes nothing either.
        q.fail(&a.step.id, "again").expect("fail");
        assert_eq!(
            q.get(&a.step.id)
                .expect("get")
                .expect("rec")
                .outcome
                .and_then(|o| o.error)
                .as_deref(),
            Some("node n1 is gone")
        );
        // A reopened queue knows which steps are still open.
        drop(q);
        let (q, _) = queue_on(dir.path());
        assert_eq!(ids(&q), vec![b.step.id.clone()]);
    }

    #[tokio::test]
    async fn cancelled_steps_are_never_handed_out_and_their_nodes_are_told() {
        let (_d, q, pk) = queue();
        let a = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("a");
        let b = q
            .enqueue(&n2(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("b");
        let done = q
            .enqueue(&n1(), Lane::Adhoc, echo(), None, DEFAULT_STEP_TTL)
            .expect("done");
        q.fail(&done.step.id, "already over").expect("fail");
        let got = q
            .cancel(&[a.step.id.clone(), b.step.id.clone(), done.step.id.clone()])
            .expect("cancel");
        let ids: Vec<&str> = got.iter().map(|r| r.step.id.as_str()).collect();
        assert_eq!(
            ids,
            [a.step.id.as_str(), b.step.id.as_str()],
            "a final step stays as it was"
        );
        for id in [&a.step.id, &b.step.id] {
            assert_eq!(
                q.get(id).expect("get").expect("rec").state,
                StepState::Cancelled
            );
        }
        assert!(q.active().is_empty(), "{:?}", q.active());
        assert!(
            q.pull(&n1(), Lane::Deploy, 0, Duration::from_millis(10))
                .await
                .expect("pull")
                .is_none(),
            "a cancelled step is not handed out"
        );
        // Each node gets one signed Cancel naming its own steps, on the control lane.
        for (node, id) in [(n1(), &a.step.id), (n2(), &b.step.id)] {
            let notice = q
                .pull(&node, Lane::Control, 0, Duration::from_millis(10))
                .await
                .expect("pull")
                .expect("a cancel notice");
            let step = de_common::check_step(&notice, &pk, &node, 0, unix(SystemTime::now()))
                .expect("signed for the node");
            assert_eq!(
                step.action,
                StepAction::Cancel {
                    step_ids: vec![id.clone()]
                }
            );
        }
        assert!(
            q.cancel(std::slice::from_ref(&a.step.id))
                .expect("again")
                .is_empty()
        );
    }

    /// An agent's claim to have done absurdly many steps (a modified agent
    /// sending `u64::MAX`) is refused with the reason, and changes nothing.
    #[tokio::test]
    async fn resync_refuses_an_implausible_report_and_keeps_counting() {
        let (_d, q, _) = queue();
        let first = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("first");
        for absurd in [u64::MAX, 1 + 1 + MAX_RESYNC_AHEAD] {
            let e = q
                .resync(&n1(), &[(Lane::Adhoc, 0), (Lane::Deploy, absurd)])
                .expect_err("refused");
            assert!(
                matches!(e, ResyncError::Implausible { done, issued: 1, .. } if done == absurd),
                "{e}"
            );
            assert!(e.to_string().contains("issued only 1"), "{e}");
        }
        assert_eq!(
            q.get(&first.step.id).expect("get").expect("rec").state,
            StepState::Queued
        );
        let next = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("next");
        assert_eq!(next.step.seq, 2);
        // At the bound it is still believed (a restored backup).
        q.resync(&n1(), &[(Lane::Deploy, 2 + MAX_RESYNC_AHEAD)])
            .expect("resync");
    }

    /// Revoking a node fails its steps not final yet, and only its.
    #[tokio::test]
    async fn fail_node_fails_only_that_nodes_open_steps() {
        let (_d, q, _) = queue();
        let mine = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("mine");
        let other = q
            .enqueue(&"n-2".into(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("other");
        assert_eq!(q.fail_node(&n1(), "the node was revoked").expect("fail"), 1);
        let r = q.get(&mine.step.id).expect("get").expect("rec");
        assert_eq!(r.state, StepState::Failed);
        assert_eq!(
            r.outcome.and_then(|o| o.error).as_deref(),
            Some("the node was revoked")
        );
        assert_eq!(q.next_for(&n1(), Lane::Deploy, 0).map(|(seq, _)| seq), None);
        assert_eq!(
            q.get(&other.step.id).expect("get").expect("rec").state,
            StepState::Queued
        );
    }

    #[tokio::test]
    async fn resync_raises_sequences_and_fails_unreachable_steps() {
        let (_d, q, _) = queue();
        let old = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("old");
        q.resync(&n1(), &[(Lane::Deploy, 5)]).expect("resync");
        assert_eq!(
            q.get(&old.step.id).expect("get").expect("rec").state,
            StepState::Failed
        );
        let new = q
            .enqueue(&n1(), Lane::Deploy, echo(), None, DEFAULT_STEP_TTL)
            .expect("new");
        assert_eq!(new.step.seq, 6);
        // An agent that is not ahead changes nothing: a queued step it ran
        // keeps waiting for the result the agent still holds.
        q.resync(&n1(), &[(Lane::Deploy, 6)]).expect("resync");
        assert_eq!(
            q.get(&new.step.id).expect("get").expect("rec").state,
            StepState::Queued
        );
    }
}
