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

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use de_common::{Lane, OutStream};

use crate::Controller;
use crate::agents::steps::{StepQueue, StepState, StepUpdate};
use crate::store::{StoreError, StoreExt, Tree};
use crate::util::random_hex;
use crate::util::rfc3339;

mod planner;
mod record;
mod view;

pub use record::{
    Applied, AppliedInstance, DeployState, DeployStep, Deployment, PhaseState, TaskKind,
};

use planner::{NewDeployment, plan_deployment};
use view::describe;
pub use view::{DeploymentView, StepView};

/// How many times a failed step is tried in all (1 = no retry).
pub const DEFAULT_STEP_ATTEMPTS: u32 = 3;
/// Deploy steps may wait this long for their node.
const STEP_TTL: Duration = Duration::from_secs(24 * 3600);
const APPLIED_KEY: &str = "applied";

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
        let catalog = ctl
            .catalogs
            .get(&cur.plan.properties.catalog)
            .ok_or_else(|| DeployError::NoCatalog(cur.plan.properties.catalog.clone()))?
            .clone();
        let applied: Applied = ctl
            .store
            .get_json(Tree::Plans, APPLIED_KEY)?
            .unwrap_or_default();
        let nodes = ctl.nodes.list();
        let new = NewDeployment {
            id: format!(
                "d-{}",
                random_hex(6).map_err(|_| DeployError::Render("no randomness".into()))?
            ),
            created_at: rfc3339(SystemTime::now()),
            max_attempts: ctl
                .deployer
                .attempts
                .load(std::sync::atomic::Ordering::Relaxed),
        };
        let d = plan_deployment(&catalog, &cur, &applied, &nodes, new)?;
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
