//! Deployments: the plan is diffed against the last applied one and turned
//! into a persisted list of steps, which a reconciler drives through the
//! per-node step queues — components in catalog order, nodes in parallel,
//! one step at a time per instance (and the node's deploy lane runs one at a
//! time per node), failed steps retried, progress on disk after every change.
//!
//! Invariants: a step's queue id is chosen and stored in the deployment
//! record *before* it is queued (queueing is idempotent on that id), so a
//! controller killed at any moment resumes without running a step twice;
//! nothing after a failed step of the same instance, and nothing of a later
//! component, is queued once a step has failed for good.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

/// Deployment and step states and step kinds: the API's words, also what the store keeps.
pub use de_common::api::{DeployState, PhaseState, TaskKind};
use de_common::api::{DeploymentView, StepView};
use de_common::{Lane, MonitOp, OutStream, StepAction};

use crate::Controller;
use crate::agents::NodeView;
use crate::agents::steps::{StepQueue, StepState, StepUpdate};
use crate::plan::Plan;
use crate::plan::render::NodeContext;
use crate::plan::validate::find_node;
use crate::store::{StoreError, StoreExt, Tree};
use crate::util::random_hex;
use crate::util::rfc3339;

/// How many times a failed step is tried in all (1 = no retry).
pub const DEFAULT_STEP_ATTEMPTS: u32 = 3;
/// Deploy steps may wait this long for their node.
const STEP_TTL: Duration = Duration::from_secs(24 * 3600);
const APPLIED_KEY: &str = "applied";

/// One action of one component instance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeployStep {
    pub component: String,
    pub instance: String,
    pub ip: String,
    pub node_id: String,
    pub kind: TaskKind,
    /// Order group: every step of group n finishes before group n+1 starts.
    pub group: usize,
    pub action: StepAction,
    pub state: PhaseState,
    pub attempts: u32,
    /// The queue step of the current attempt (chosen before it is queued).
    pub step_id: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The end of the last attempt's output.
    pub output: Option<String>,
}

/// A deployment as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Deployment {
    pub id: String,
    pub state: DeployState,
    pub plan_revision: u64,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub max_attempts: u32,
    pub steps: Vec<DeployStep>,
    /// What the cluster looks like once this deployment succeeds.
    pub target: Applied,
}

/// The last successfully applied plan: per instance, a fingerprint of its
/// rendered install steps and what uninstalling it takes.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Applied {
    pub revision: u64,
    /// `component@ip` -> instance.
    pub instances: BTreeMap<String, AppliedInstance>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AppliedInstance {
    pub component: String,
    pub ip: String,
    pub instance: String,
    pub fingerprint: String,
    pub monit_name: String,
    pub uninstall: Vec<StepAction>,
}

#[derive(Debug, thiserror::Error)]
pub enum DeployError {
    #[error(
        "no plan has been submitted yet: POST the plan JSON to /deployment-engine/config first"
    )]
    NoPlan,
    #[error("deployment {0} is still running: wait for it to finish")]
    Busy(String),
    #[error(
        "nodes of the plan are offline: {0}; start their agents (or change the plan) and deploy again"
    )]
    Offline(String),
    #[error("the plan's catalog {0:?} is not loaded")]
    NoCatalog(String),
    #[error("{0}")]
    Render(String),
    #[error("cannot read or write deployments in the store")]
    Store(#[from] StoreError),
}

fn fingerprint(actions: &[StepAction]) -> String {
    let bytes = serde_json::to_vec(actions).unwrap_or_default();
    let d = ring::digest::digest(&ring::digest::SHA256, &bytes);
    d.as_ref()
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn key(component: &str, ip: &str) -> String {
    format!("{component}@{ip}")
}

/// The deployment engine: starts deployments and drives running ones.
pub struct Deployer {
    attempts: std::sync::atomic::AtomicU32,
    running: Mutex<Option<String>>,
    /// queue step id -> instance, for routing output to the instance's log.
    instances: Mutex<HashMap<String, String>>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

impl Default for Deployer {
    fn default() -> Self {
        Deployer {
            attempts: std::sync::atomic::AtomicU32::new(DEFAULT_STEP_ATTEMPTS),
            running: Mutex::new(None),
            instances: Mutex::new(HashMap::new()),
        }
    }
}

/// Writes one log line for `instance` (or the controller) — the operations log and the instance's log.
pub(crate) fn log_line(ctl: &Controller, instance: Option<&str>, text: &str) {
    ctl.logs.line(instance, text);
}

impl Deployer {
    fn lock_running(&self) -> std::sync::MutexGuard<'_, Option<String>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times new deployments try a failing step in all (at least 1).
    pub fn set_attempts(&self, n: u32) {
        self.attempts
            .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
    }

    pub fn running(&self) -> Option<String> {
        self.lock_running().clone()
    }

    /// Plans a deployment of the current plan and starts it in the background.
    pub fn start(ctl: &Arc<Controller>) -> Result<Deployment, DeployError> {
        let mut running = ctl.deployer.lock_running();
        if let Some(id) = running.as_ref() {
            return Err(DeployError::Busy(id.clone()));
        }
        let cur = ctl.plans.current().ok_or(DeployError::NoPlan)?;
        let applied: Applied = ctl
            .store
            .get_json(Tree::Plans, APPLIED_KEY)?
            .unwrap_or_default();
        let nodes = ctl.nodes.list();
        let d = plan_deployment(ctl, &cur.plan, cur.revision, &applied, &nodes)?;
        ctl.store.put_json(Tree::Deployments, &d.id, &d)?;
        *running = Some(d.id.clone());
        drop(running);
        log_line(
            ctl,
            None,
            &format!(
                "deployment {} of plan revision {} started: {} steps",
                d.id,
                d.plan_revision,
                d.steps.len()
            ),
        );
        let ctl2 = ctl.clone();
        let id = d.id.clone();
        tokio::spawn(async move { drive(ctl2, id).await });
        Ok(d)
    }

    /// Resumes deployments that were running when the controller stopped.
    pub fn resume(ctl: &Arc<Controller>) -> Result<(), StoreError> {
        for (id, d) in ctl.store.list_json::<Deployment>(Tree::Deployments)? {
            if d.state == DeployState::Running {
                info!(deployment = %id, "resuming deployment");
                log_line(
                    ctl,
                    None,
                    &format!("deployment {id} resumed after a controller restart"),
                );
                *ctl.deployer.lock_running() = Some(id.clone());
                let ctl2 = ctl.clone();
                tokio::spawn(async move { drive(ctl2, id).await });
            }
        }
        let ctl2 = ctl.clone();
        tokio::spawn(async move { forward_output(ctl2).await });
        Ok(())
    }

    pub fn list(ctl: &Controller) -> Result<Vec<Deployment>, StoreError> {
        let mut all: Vec<Deployment> = ctl
            .store
            .list_json::<Deployment>(Tree::Deployments)?
            .into_iter()
            .map(|(_, d)| d)
            .collect();
        all.sort_by(|a, b| b.created_at.cmp(&a.created_at).then(b.id.cmp(&a.id)));
        Ok(all)
    }

    pub fn get(ctl: &Controller, id: &str) -> Result<Option<Deployment>, StoreError> {
        ctl.store.get_json(Tree::Deployments, id)
    }
}

/// Turns the diff between `applied` and `plan` into an ordered list of steps.
fn plan_deployment(
    ctl: &Controller,
    plan: &Plan,
    revision: u64,
    applied: &Applied,
    nodes: &[NodeView],
) -> Result<Deployment, DeployError> {
    let catalog = ctl
        .catalogs
        .get(&plan.properties.catalog)
        .ok_or_else(|| DeployError::NoCatalog(plan.properties.catalog.clone()))?
        .clone();
    // Every node that will be touched must be online.
    let mut offline = Vec::new();
    let mut node_of = |ip: &str| -> Option<NodeView> {
        match find_node(nodes, ip) {
            Some(n) if n.online => Some(n.clone()),
            Some(n) => {
                offline.push(format!("{ip} ({})", n.id));
                None
            }
            None => {
                offline.push(format!("{ip} (no enrolled node)"));
                None
            }
        }
    };
    let renderer = catalog.for_plan(plan);
    let mut target = Applied {
        revision,
        instances: BTreeMap::new(),
    };
    let mut steps = Vec::new();
    // Uninstalls first (group 0, reverse catalog order does not matter: they are independent).
    let mut resolved: Vec<(String, String, NodeView)> = Vec::new();
    for (c, ip) in plan.instances() {
        if let Some(n) = node_of(ip) {
            resolved.push((c.to_owned(), ip.to_owned(), n));
        }
    }
    let removed: Vec<&AppliedInstance> = applied
        .instances
        .iter()
        .filter(|(k, _)| !plan.instances().any(|(c, ip)| key(c, ip) == **k))
        .map(|(_, v)| v)
        .collect();
    let mut removed_nodes = Vec::new();
    for r in &removed {
        if let Some(n) = node_of(&r.ip) {
            removed_nodes.push(((*r).clone(), n));
        }
    }
    if !offline.is_empty() {
        offline.sort();
        offline.dedup();
        return Err(DeployError::Offline(offline.join(", ")));
    }
    let step =
        |component: &str, instance: &str, ip: &str, node: &str, kind, group, action| DeployStep {
            component: component.to_owned(),
            instance: instance.to_owned(),
            ip: ip.to_owned(),
            node_id: node.to_owned(),
            kind,
            group,
            action,
            state: PhaseState::Pending,
            attempts: 0,
            step_id: None,
            started_at: None,
            finished_at: None,
            exit_code: None,
            error: None,
            output: None,
        };
    for (r, n) in &removed_nodes {
        // The catalog's uninstall steps (stop, clean up) first, then the check goes.
        for a in &r.uninstall {
            steps.push(step(
                &r.component,
                &r.instance,
                &r.ip,
                &n.id,
                TaskKind::Uninstall,
                0,
                a.clone(),
            ));
        }
        steps.push(step(
            &r.component,
            &r.instance,
            &r.ip,
            &n.id,
            TaskKind::Uninstall,
            0,
            StepAction::MonitRemove {
                name: r.monit_name.clone(),
            },
        ));
    }
    for (g, component) in catalog.install_order().iter().enumerate() {
        for (c, ip, n) in resolved.iter().filter(|(c, _, _)| c == component) {
            let rendered = renderer
                .render(c, &NodeContext::from_view(n, ip))
                .map_err(|e| DeployError::Render(e.to_string()))?;
            let fp = fingerprint(&rendered.install);
            let prev = applied.instances.get(&key(c, ip));
            let kind = match prev {
                None => Some(TaskKind::Install),
                Some(p) if p.fingerprint != fp => Some(TaskKind::Reconfigure),
                Some(_) => None,
            };
            if let Some(kind) = kind {
                for a in &rendered.install {
                    steps.push(step(
                        c,
                        &rendered.instance,
                        ip,
                        &n.id,
                        kind,
                        g + 1,
                        a.clone(),
                    ));
                }
                let supervised = rendered
                    .install
                    .iter()
                    .any(|a| matches!(a, StepAction::MonitAdd { .. }));
                if kind == TaskKind::Reconfigure && supervised {
                    steps.push(step(
                        c,
                        &rendered.instance,
                        ip,
                        &n.id,
                        kind,
                        g + 1,
                        StepAction::Monit {
                            name: rendered.monit_name.clone(),
                            op: MonitOp::Restart,
                        },
                    ));
                }
            }
            target.instances.insert(
                key(c, ip),
                AppliedInstance {
                    component: c.clone(),
                    ip: ip.clone(),
                    instance: rendered.instance.clone(),
                    fingerprint: fp,
                    monit_name: rendered.monit_name.clone(),
                    uninstall: rendered.uninstall.clone(),
                },
            );
        }
    }
    Ok(Deployment {
        id: format!(
            "d-{}",
            random_hex(6).map_err(|_| DeployError::Render("no randomness".into()))?
        ),
        state: DeployState::Running,
        plan_revision: revision,
        created_at: rfc3339(SystemTime::now()),
        finished_at: None,
        error: None,
        max_attempts: ctl
            .deployer
            .attempts
            .load(std::sync::atomic::Ordering::Relaxed),
        steps,
        target,
    })
}

fn describe(a: &StepAction) -> String {
    match a {
        StepAction::Script { .. } => "script".into(),
        StepAction::WriteFile { path, .. } => format!("write {path}"),
        StepAction::MonitAdd { name, .. } => format!("monit add {name}"),
        StepAction::MonitRemove { name } => format!("monit remove {name}"),
        StepAction::Monit { name, op } => format!("monit {op:?} {name}").to_lowercase(),
        StepAction::CollectLogs { .. } => "collect logs".into(),
    }
}

/// One pass over a deployment: queue what may start, record what finished.
/// Returns true when the deployment record changed.
fn reconcile(ctl: &Controller, d: &mut Deployment) -> Result<bool, StoreError> {
    let mut changed = false;
    let now = || rfc3339(SystemTime::now());
    // Record finished steps first.
    for i in 0..d.steps.len() {
        let s = &d.steps[i];
        if s.state != PhaseState::Running {
            continue;
        }
        let Some(id) = s.step_id.clone() else {
            continue;
        };
        let Some(rec) = ctl.steps.get(&id)? else {
            // Chosen but not queued before a crash: queue it now (idempotent on the id).
            continue;
        };
        if !rec.state.is_final() {
            continue;
        }
        let o = rec.outcome.clone().unwrap_or_default();
        let s = &mut d.steps[i];
        s.exit_code = o.exit_code;
        s.output = Some(output_tail(&o.stdout_tail, &o.stderr_tail));
        changed = true;
        if rec.state == StepState::Done {
            s.state = PhaseState::Done;
            s.finished_at = Some(now());
            s.error = None;
            log_line(
                ctl,
                Some(&s.instance),
                &format!("{} on {}: {} done", s.instance, s.ip, describe(&s.action)),
            );
        } else {
            let why =
                o.error
                    .clone()
                    .or(rec.refusal.clone())
                    .unwrap_or_else(|| match o.exit_code {
                        Some(code) => format!("exit code {code}"),
                        None => "ended without an exit code (killed by a signal)".to_owned(),
                    });
            s.error = Some(why.clone());
            if s.attempts < d.max_attempts {
                log_line(
                    ctl,
                    Some(&s.instance),
                    &format!(
                        "{} on {}: {} failed ({why}); retrying (attempt {} of {})",
                        s.instance,
                        s.ip,
                        describe(&s.action),
                        s.attempts + 1,
                        d.max_attempts
                    ),
                );
                s.state = PhaseState::Pending;
            } else {
                s.state = PhaseState::Failed;
                s.finished_at = Some(now());
                let msg = format!(
                    "{} ({}) on {} (node {}): {} failed after {} attempts: {why}; output: {}",
                    s.component,
                    s.instance,
                    s.ip,
                    s.node_id,
                    describe(&s.action),
                    s.attempts,
                    s.output.clone().unwrap_or_default().trim()
                );
                log_line(ctl, Some(&s.instance), &msg);
                d.error = Some(msg);
            }
        }
    }
    if d.steps.iter().any(|s| s.state == PhaseState::Failed) {
        // Nothing new starts; in-flight steps are left to finish on their nodes.
        if d.steps.iter().all(|s| s.state != PhaseState::Running) {
            for s in d
                .steps
                .iter_mut()
                .filter(|s| s.state == PhaseState::Pending)
            {
                s.state = PhaseState::Skipped;
            }
            d.state = DeployState::Failed;
            d.finished_at = Some(now());
            changed = true;
        }
        return Ok(changed);
    }
    // The lowest group with unfinished steps is the one that may run.
    let Some(group) = d
        .steps
        .iter()
        .filter(|s| s.state != PhaseState::Done)
        .map(|s| s.group)
        .min()
    else {
        d.state = DeployState::Succeeded;
        d.finished_at = Some(now());
        return Ok(true);
    };
    // Within it, the first unfinished step of each instance.
    let mut seen: Vec<String> = Vec::new();
    for i in 0..d.steps.len() {
        let s = &d.steps[i];
        if s.group != group || s.state == PhaseState::Done {
            continue;
        }
        let inst = format!("{}@{}", s.instance, s.ip);
        if seen.contains(&inst) {
            continue;
        }
        seen.push(inst);
        if s.state == PhaseState::Pending {
            let s = &mut d.steps[i];
            s.attempts += 1;
            s.state = PhaseState::Running;
            s.started_at.get_or_insert_with(now);
            s.step_id = Some(StepQueue::new_id().map_err(|_| StoreError::Encode {
                tree: "deployments",
                key: "step id".into(),
                source: serde_json::Error::io(std::io::Error::other("no randomness")),
            })?);
            changed = true;
        }
    }
    Ok(changed)
}

/// Queues every chosen-but-not-queued step (after the record holding their
/// ids is on disk), all with one flush; those already queued are left as
/// they are (queueing is idempotent on the id).
fn queue_chosen(ctl: &Controller, d: &Deployment) {
    let mut steps = Vec::new();
    for s in d.steps.iter().filter(|s| s.state == PhaseState::Running) {
        let Some(id) = &s.step_id else { continue };
        ctl.deployer
            .instances
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.clone(), s.instance.clone());
        steps.push(crate::agents::steps::NewStep {
            id: Some(id.clone()),
            node: s.node_id.clone(),
            lane: Lane::Deploy,
            action: s.action.clone(),
            deployment_id: Some(d.id.clone()),
            ttl: STEP_TTL,
        });
    }
    if steps.is_empty() {
        return;
    }
    let count = steps.len();
    if let Err(e) = ctl.steps.enqueue_many(steps) {
        warn!(deployment = %d.id, steps = count, error = %e, "could not queue deployment steps");
    }
}

async fn drive(ctl: Arc<Controller>, id: String) {
    let mut updates = ctl.steps.subscribe();
    let mut announced: Vec<String> = Vec::new();
    loop {
        let mut d = match Deployer::get(&ctl, &id) {
            Ok(Some(d)) => d,
            Ok(None) => break,
            Err(e) => {
                warn!(deployment = %id, error = %e, "cannot read the deployment; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        match reconcile(&ctl, &mut d) {
            Ok(true) => {
                if let Err(e) = ctl.store.put_json(Tree::Deployments, &d.id, &d) {
                    warn!(deployment = %id, error = %e, "cannot save the deployment; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            Ok(false) => {}
            Err(e) => {
                warn!(deployment = %id, error = %e, "cannot read step results; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        for s in d.steps.iter().filter(|s| s.state == PhaseState::Running) {
            if let Some(sid) = &s.step_id
                && !announced.contains(sid)
            {
                announced.push(sid.clone());
                log_line(
                    &ctl,
                    Some(&s.instance),
                    &format!(
                        "{} on {}: {} (attempt {})",
                        s.instance,
                        s.ip,
                        describe(&s.action),
                        s.attempts
                    ),
                );
            }
        }
        queue_chosen(&ctl, &d);
        if d.state != DeployState::Running {
            if d.state == DeployState::Succeeded {
                if let Err(e) = ctl.store.put_json(Tree::Plans, APPLIED_KEY, &d.target) {
                    warn!(deployment = %id, error = %e, "cannot record the applied plan");
                }
                log_line(&ctl, None, &format!("deployment {id} succeeded"));
            } else {
                log_line(
                    &ctl,
                    None,
                    &format!(
                        "deployment {id} failed: {}",
                        d.error.clone().unwrap_or_default()
                    ),
                );
            }
            break;
        }
        // Wait for a step to finish (or a periodic re-check).
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match updates.recv().await {
                    Ok(StepUpdate::Finished { .. }) => return,
                    Ok(_) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => return,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        std::future::pending::<()>().await
                    }
                }
            }
        })
        .await;
    }
    let mut running = ctl.deployer.lock_running();
    if running.as_deref() == Some(id.as_str()) {
        *running = None;
    }
}

/// How much of a step's output the deployment record keeps: enough to say
/// why it failed. The record is rewritten as steps progress, so keeping the
/// step's full 64 KiB tails here would make a large deployment's every update
/// megabytes; they stay in the step (`GET /api/v1/steps/{id}`) and every line
/// is in the instance's log file.
pub(crate) const OUTPUT_KEPT: usize = 2048;

/// The last [`OUTPUT_KEPT`] bytes of stdout then stderr (cut at a character
/// boundary); stderr, usually the reason, is kept first.
fn output_tail(stdout: &str, stderr: &str) -> String {
    let last = |s: &str, max: usize| -> String {
        let mut from = s.len().saturating_sub(max);
        while !s.is_char_boundary(from) {
            from += 1;
        }
        s[from..].to_owned()
    };
    let err = last(stderr, OUTPUT_KEPT);
    let out = last(stdout, OUTPUT_KEPT - err.len());
    format!("{out}{err}")
}

/// Sends deployment steps' output lines to their instance's log.
async fn forward_output(ctl: Arc<Controller>) {
    let mut updates = ctl.steps.subscribe();
    loop {
        match updates.recv().await {
            Ok(StepUpdate::Output {
                step_id,
                stream,
                lines,
                ..
            }) => {
                let inst = ctl
                    .deployer
                    .instances
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&step_id)
                    .cloned();
                if let Some(inst) = inst {
                    let tag = if stream == OutStream::Stderr {
                        "stderr"
                    } else {
                        "stdout"
                    };
                    let tagged: Vec<String> = lines.iter().map(|l| format!("{tag}| {l}")).collect();
                    ctl.logs.lines(Some(&inst), &tagged);
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                log_line(
                    &ctl,
                    None,
                    &format!("{n} step updates were missed by the log forwarder"),
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

impl Deployment {
    /// The deployment as a readable log: a header, then every step in order
    /// with its state, attempts and the end of its output; states and kinds
    /// are the API's words (`failed`, `install`).
    pub fn log_text(&self) -> String {
        fn word<T: Serialize>(v: &T) -> String {
            match serde_json::to_value(v) {
                Ok(serde_json::Value::String(s)) => s,
                _ => "-".to_owned(),
            }
        }
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "deployment {} of plan revision {}: {}, created {}, finished {}",
            self.id,
            self.plan_revision,
            word(&self.state),
            self.created_at,
            self.finished_at.as_deref().unwrap_or("-")
        );
        if let Some(e) = &self.error {
            let _ = writeln!(out, "error: {e}");
        }
        for s in &self.steps {
            let _ = writeln!(
                out,
                "[{}] {} {} {}: {}, attempts {}, exit {}{}",
                s.instance,
                s.ip,
                word(&s.kind),
                describe(&s.action),
                word(&s.state),
                s.attempts,
                s.exit_code
                    .map_or_else(|| "-".to_owned(), |c| c.to_string()),
                s.error
                    .as_deref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            );
            if let Some(o) = s.output.as_deref().filter(|o| !o.trim().is_empty()) {
                for l in o.lines() {
                    let _ = writeln!(out, "    {l}");
                }
            }
        }
        out
    }

    pub fn view(&self, with_steps: bool) -> DeploymentView {
        DeploymentView {
            id: self.id.clone(),
            state: self.state,
            plan_revision: self.plan_revision,
            created_at: self.created_at.clone(),
            finished_at: self.finished_at.clone(),
            error: self.error.clone(),
            steps_total: self.steps.len(),
            steps_done: self
                .steps
                .iter()
                .filter(|s| s.state == PhaseState::Done)
                .count(),
            steps: with_steps.then(|| {
                self.steps
                    .iter()
                    .map(|s| StepView {
                        component: s.component.clone(),
                        instance: s.instance.clone(),
                        ip: s.ip.clone(),
                        node_id: s.node_id.clone(),
                        kind: s.kind,
                        action: describe(&s.action),
                        state: s.state,
                        attempts: s.attempts,
                        step_id: s.step_id.clone(),
                        started_at: s.started_at.clone(),
                        finished_at: s.finished_at.clone(),
                        exit_code: s.exit_code,
                        error: s.error.clone(),
                        output: s.output.clone(),
                    })
                    .collect()
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_records_output_is_its_last_bytes_with_stderr_kept_first() {
        assert_eq!(output_tail("out\n", "err\n"), "out\nerr\n");
        let long_out = "o".repeat(10_000);
        let got = output_tail(&long_out, "the reason\n");
        assert_eq!(got.len(), OUTPUT_KEPT);
        assert!(
            got.ends_with("ooo\nthe reason\n") || got.ends_with("othe reason\n"),
            "{got}"
        );
        let long_err = "é".repeat(5_000);
        let got = output_tail("lost", &long_err);
        assert!(
            got.len() <= OUTPUT_KEPT && got.chars().all(|c| c == 'é'),
            "cut at a char boundary"
        );
    }
}
