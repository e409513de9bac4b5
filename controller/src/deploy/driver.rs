//! The driver: the [`Deployer`] that starts and resumes deployments, and the
//! task that drives each one. A pass reads the record from the store and
//! what the step queue says about its running steps, hands both to the pure
//! core ([`super::reconcile`]) and carries out the effects it returns in
//! order; then it waits for a step to finish (or 2 s) and starts over.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use tokio::sync::broadcast::error::RecvError;
use tracing::{info, warn};

use de_common::api::PlanDiff;
use de_common::{DeploymentId, Lane, OutStream, StepId};

use super::planner::{NewDeployment, Observed, plan_changes, plan_deployment};
use super::reconcile::{
    CANCELLED_BY_OPERATOR, CheckSeen, Effect, Ending, Finished, IdSource, MonitReport,
    MonitReports, Now, Seen, cancel, reconcile, resumed, set_paused,
};
use super::record::{Applied, DeployState, Deployment, PhaseState};
use super::{DEFAULT_STEP_ATTEMPTS, DeployError};
use crate::Controller;
use crate::agents::NodeView;
use crate::agents::nodes::Report;
use crate::agents::steps::{NewStep, StepQueue, StepRecord, StepState, StepUpdate};
use crate::plan::{Catalog, StoredPlan};
use crate::store::{StoreError, StoreExt, Tree, decode_json, for_each_paged};
use crate::util::{NoRandomness, random_hex, rfc3339};

/// Deploy steps may wait this long for their node.
const STEP_TTL: Duration = Duration::from_secs(24 * 3600);
/// The applied plan's key in the `plans` tree.
const APPLIED_KEY: &str = "applied";
/// How long a pass that could not read or write the store waits to try again.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long a driver waits for a step to finish before it looks again anyway.
const RECHECK_AFTER: Duration = Duration::from_secs(2);

/// The deployment engine: starts deployments and drives running ones.
pub struct Deployer {
    attempts: AtomicU32,
    running: Mutex<Option<DeploymentId>>,
    /// Held for a whole pass (read, reconcile, effects) and by a cancel, so
    /// the two never write the record over each other.
    pass_lock: Mutex<()>,
    /// queue step id -> instance, for routing output to the instance's log.
    instances: Mutex<HashMap<StepId, String>>,
}

impl std::fmt::Debug for Deployer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deployer").finish_non_exhaustive()
    }
}

impl Default for Deployer {
    fn default() -> Self {
        Deployer {
            attempts: AtomicU32::new(DEFAULT_STEP_ATTEMPTS),
            running: Mutex::new(None),
            pass_lock: Mutex::new(()),
            instances: Mutex::new(HashMap::new()),
        }
    }
}

impl Deployer {
    fn lock_running(&self) -> MutexGuard<'_, Option<DeploymentId>> {
        self.running.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_pass(&self) -> MutexGuard<'_, ()> {
        self.pass_lock.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Cancels running deployment `id`: queued steps are withdrawn, running
    /// ones killed on their nodes, pending ones skipped, and it ends
    /// `cancelled`, durably, before this returns; a new deployment is
    /// accepted at once.
    pub fn cancel(ctl: &Controller, id: &DeploymentId) -> Result<Deployment, DeployError> {
        let _pass = ctl.deployer.lock_pass();
        let mut d = Deployer::get(ctl, id)?.ok_or_else(|| DeployError::NotFound(id.clone()))?;
        if d.state != DeployState::Running {
            return Err(DeployError::NotRunning {
                id: id.clone(),
                state: ended(d.state).to_owned(),
                what: "cancelled",
            });
        }
        let effects = cancel(&mut d, CANCELLED_BY_OPERATOR, &rfc3339(SystemTime::now()));
        apply(ctl, &d, effects).map_err(|e| match e {
            PassError::Cancel(e) => DeployError::CancelSteps(e),
            PassError::Save(e)
            | PassError::Read(e)
            | PassError::Steps(e)
            | PassError::Applied(e) => DeployError::Store(e),
            PassError::Random(e) => DeployError::NoRandomness(e),
        })?;
        let mut running = ctl.deployer.lock_running();
        if running.as_ref() == Some(id) {
            *running = None;
        }
        Ok(d)
    }

    /// Pauses (`paused`) or resumes running deployment `id`, durably, before
    /// this returns: a paused one finishes its steps in flight and starts no
    /// new one. Pausing a paused one (or resuming a running one) changes nothing.
    pub fn set_paused(
        ctl: &Controller,
        id: &DeploymentId,
        paused: bool,
    ) -> Result<Deployment, DeployError> {
        let _pass = ctl.deployer.lock_pass();
        let mut d = Deployer::get(ctl, id)?.ok_or_else(|| DeployError::NotFound(id.clone()))?;
        if d.state != DeployState::Running {
            return Err(DeployError::NotRunning {
                id: id.clone(),
                state: ended(d.state).to_owned(),
                what: if paused { "paused" } else { "resumed" },
            });
        }
        let effects = set_paused(&mut d, paused);
        apply(ctl, &d, effects).map_err(|e| match e {
            PassError::Cancel(e) => DeployError::CancelSteps(e),
            PassError::Save(e)
            | PassError::Read(e)
            | PassError::Steps(e)
            | PassError::Applied(e) => DeployError::Store(e),
            PassError::Random(e) => DeployError::NoRandomness(e),
        })?;
        Ok(d)
    }

    fn lock_instances(&self) -> MutexGuard<'_, HashMap<StepId, String>> {
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How many times new deployments try a failing step in all (at least 1).
    pub fn set_attempts(&self, n: u32) {
        self.attempts.store(n.max(1), Ordering::Relaxed);
    }

    pub fn running(&self) -> Option<DeploymentId> {
        self.lock_running().clone()
    }

    /// Plans a deployment of the current plan and starts it in the background.
    pub fn start(ctl: &Arc<Controller>) -> Result<Deployment, DeployError> {
        let mut running = ctl.deployer.lock_running();
        if let Some(id) = running.as_ref() {
            return Err(DeployError::Busy(id.clone()));
        }
        let inputs = PlanInputs::read(ctl)?;
        let new = NewDeployment {
            id: DeploymentId::from(format!(
                "d-{}",
                random_hex(6).map_err(DeployError::NoRandomness)?
            )),
            created_at: rfc3339(SystemTime::now()),
            max_attempts: ctl.deployer.attempts.load(Ordering::Relaxed),
        };
        let d = plan_deployment(
            &inputs.catalog,
            &inputs.plan,
            &inputs.applied,
            &inputs.nodes,
            &inputs.observed,
            new,
        )?;
        ctl.store.put_json(Tree::Deployments, d.id.as_str(), &d)?;
        ctl.metrics.deployments.started();
        *running = Some(d.id.clone());
        drop(running);
        ctl.logs.line(
            None,
            &format!(
                "deployment {} of plan revision {} started: {} steps",
                d.id,
                d.plan_revision,
                d.steps.len()
            ),
        );
        if d.steps.is_empty() {
            ctl.logs.line(
                None,
                &format!(
                    "deployment {}: nothing to do: every instance is as the plan says and runs as it should",
                    d.id
                ),
            );
        }
        let ctl2 = ctl.clone();
        let id = d.id.clone();
        tokio::spawn(async move { drive(ctl2, id).await });
        Ok(d)
    }

    /// Resumes deployments that were running when the controller stopped.
    /// Reads each record's state alone first, a page at a time: a
    /// deployment of 1,000 nodes is megabytes, and only a running one is
    /// needed whole.
    pub fn resume(ctl: &Arc<Controller>) -> Result<(), StoreError> {
        #[derive(serde::Deserialize)]
        struct State {
            state: DeployState,
        }
        for_each_paged(&*ctl.store, Tree::Deployments, 16, |id, bytes| {
            let State { state } = decode_json(Tree::Deployments, &id, &bytes)?;
            ctl.metrics.deployments.loaded(state);
            if state != DeployState::Running {
                return Ok(());
            }
            let mut d: Deployment = decode_json(Tree::Deployments, &id, &bytes)?;
            let id = DeploymentId::from(id);
            info!(deployment = %id, "resuming deployment");
            let (text, ms) = now();
            let effects = resumed(&mut d, Now { text: &text, ms });
            // A save that fails leaves the watches to restart from their
            // old start: the next pass still judges them from fresh reports.
            if let Err(e) = apply(ctl, &d, effects) {
                warn!(deployment = %id, error = %de_common::ErrorChain(&e), "could not record the resumed deployment");
            }
            *ctl.deployer.lock_running() = Some(id.clone());
            let ctl2 = ctl.clone();
            tokio::spawn(async move { drive(ctl2, id).await });
            Ok(())
        })?;
        let ctl2 = ctl.clone();
        tokio::spawn(async move { forward_output(ctl2).await });
        Ok(())
    }

    /// What a deployment started now would do, per instance, with why.
    pub fn diff(ctl: &Controller) -> Result<PlanDiff, DeployError> {
        let i = PlanInputs::read(ctl)?;
        let planned = plan_changes(&i.catalog, &i.plan, &i.applied, &i.nodes, &i.observed)?;
        Ok(PlanDiff {
            plan_revision: i.plan.revision,
            applied_revision: i.applied.revision,
            instances: planned.changes,
            steps: planned.steps.len(),
            offline: planned.offline,
        })
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

    pub fn get(ctl: &Controller, id: &DeploymentId) -> Result<Option<Deployment>, StoreError> {
        ctl.store.get_json(Tree::Deployments, id.as_str())
    }
}

/// What a deployment in `state` did, in words ("it failed").
fn ended(state: DeployState) -> &'static str {
    match state {
        DeployState::Running => "is running",
        DeployState::Succeeded => "succeeded",
        DeployState::Failed => "failed",
        DeployState::Cancelled => "was cancelled",
    }
}

/// Everything the planner reads: the current plan, its catalog, the applied
/// plan, the nodes and what they report. One read for a deployment and for
/// the diff, so the two cannot disagree.
struct PlanInputs {
    plan: Arc<StoredPlan>,
    catalog: Arc<Catalog>,
    applied: Applied,
    nodes: Vec<NodeView>,
    observed: Observed,
}

impl PlanInputs {
    fn read(ctl: &Controller) -> Result<PlanInputs, DeployError> {
        let plan = ctl.plans.current().ok_or(DeployError::NoPlan)?;
        let catalog = ctl
            .catalogs
            .get(&plan.plan.properties.catalog)
            .ok_or_else(|| DeployError::NoCatalog(plan.plan.properties.catalog.clone()))?
            .clone();
        let applied: Applied = ctl
            .store
            .get_json(Tree::Plans, APPLIED_KEY)?
            .unwrap_or_default();
        let nodes = ctl.nodes.list();
        let observed = observe_nodes(ctl, &nodes)?;
        Ok(PlanInputs {
            plan,
            catalog,
            applied,
            nodes,
            observed,
        })
    }
}

/// What the nodes report and what the operator stopped, for the planner.
fn observe_nodes(ctl: &Controller, nodes: &[NodeView]) -> Result<Observed, StoreError> {
    let mut observed = Observed {
        stopped: super::intent::stopped(&*ctl.store)?,
        artifacts: ctl.artifacts.index()?,
        ..Observed::default()
    };
    for n in nodes {
        let id = n.node_id();
        match ctl.nodes.report_of(&id) {
            Report::Unknown => {}
            Report::Stale => {
                observed.stale.insert(id);
            }
            Report::Fresh(i) => {
                observed.inventory.insert(id, i);
            }
        }
    }
    Ok(observed)
}

/// Why a pass stopped short; the driver logs it and tries again.
#[derive(Debug, thiserror::Error)]
enum PassError {
    #[error("cannot read the deployment")]
    Read(#[source] StoreError),
    #[error("cannot read step results")]
    Steps(#[source] StoreError),
    #[error("no randomness for step ids")]
    Random(#[source] NoRandomness),
    #[error("cannot record the applied plan")]
    Applied(#[source] StoreError),
    #[error("cannot save the deployment")]
    Save(#[source] StoreError),
    #[error("cannot cancel the deployment's steps")]
    Cancel(#[source] crate::agents::StepsError),
}

/// Step ids for one pass: `s-` and 16 hex digits, like the queue's own,
/// derived from one random seed so that drawing them cannot fail.
struct RandomIds {
    seed: String,
    next: u64,
}

impl RandomIds {
    fn new() -> Result<RandomIds, NoRandomness> {
        Ok(RandomIds {
            seed: random_hex(16)?,
            next: 0,
        })
    }
}

impl IdSource for RandomIds {
    fn step_id(&mut self) -> StepId {
        self.next += 1;
        let input = format!("{}/{}", self.seed, self.next);
        let d = ring::digest::digest(&ring::digest::SHA256, input.as_bytes());
        let hex: String = d.as_ref()[..8].iter().map(|b| format!("{b:02x}")).collect();
        StepId::from(format!("s-{hex}"))
    }
}

/// How a queue step ended, or None while it has not.
fn finished(rec: &StepRecord) -> Option<Finished> {
    let ending = match rec.state {
        StepState::Queued | StepState::Running => return None,
        StepState::Done => Ending::Done,
        StepState::Failed => Ending::Failed,
        StepState::Refused => Ending::Refused,
        StepState::Cancelled => Ending::Cancelled,
    };
    let o = rec.outcome.clone().unwrap_or_default();
    Some(Finished {
        ending,
        exit_code: o.exit_code,
        error: o.error,
        refusal: rec.refusal.clone(),
        stdout_tail: o.stdout_tail,
        stderr_tail: o.stderr_tail,
    })
}

/// What the queue says about every running step of `d`.
fn observe(steps: &StepQueue, d: &Deployment) -> Result<HashMap<StepId, Seen>, StoreError> {
    let mut seen = HashMap::new();
    for s in d.steps.iter().filter(|s| s.state == PhaseState::Running) {
        let Some(id) = &s.step_id else { continue };
        let state = match steps.get(id)? {
            None => Seen::NotQueued,
            Some(rec) => finished(&rec).map_or(Seen::Waiting, Seen::Finished),
        };
        seen.insert(id.clone(), state);
    }
    Ok(seen)
}

/// The time now, as records write it and in ms since the epoch.
fn now() -> (String, u64) {
    let t = SystemTime::now();
    (rfc3339(t), ms_since_epoch(t))
}

fn ms_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The last monit report of every node `d` watches an instance on.
fn monit_reports(ctl: &Controller, d: &Deployment) -> MonitReports {
    let mut out = MonitReports::new();
    for w in d.watches.iter().filter(|w| w.state == PhaseState::Running) {
        if out.contains_key(&w.node_id) {
            continue;
        }
        if let Some((at, checks)) = ctl.nodes.monit_of(&w.node_id) {
            let checks = checks
                .into_iter()
                .map(|c| CheckSeen {
                    name: c.name,
                    status: c.status,
                    pid: c.pid,
                })
                .collect();
            out.insert(
                w.node_id.clone(),
                MonitReport {
                    at_ms: ms_since_epoch(at),
                    checks,
                },
            );
        }
    }
    out
}

/// One pass: read, reconcile, carry out the effects. Returns the state the
/// deployment is in afterwards (None once it is gone from the store).
fn pass(ctl: &Controller, id: &DeploymentId) -> Result<Option<DeployState>, PassError> {
    let _pass = ctl.deployer.lock_pass();
    let Some(mut d) = Deployer::get(ctl, id).map_err(PassError::Read)? else {
        return Ok(None);
    };
    if d.state != DeployState::Running {
        return Ok(Some(d.state));
    }
    let seen = observe(&ctl.steps, &d).map_err(PassError::Steps)?;
    let monit = monit_reports(ctl, &d);
    let mut ids = RandomIds::new().map_err(PassError::Random)?;
    let (text, ms) = now();
    let effects = reconcile(&mut d, &seen, &monit, &mut ids, Now { text: &text, ms });
    // Output of a running step goes to its instance's log, also after a restart.
    {
        let mut routes = ctl.deployer.lock_instances();
        for s in d.steps.iter().filter(|s| s.state == PhaseState::Running) {
            if let Some(sid) = &s.step_id {
                routes.insert(sid.clone(), s.instance.clone());
            }
        }
    }
    apply(ctl, &d, effects)?;
    Ok(Some(d.state))
}

/// Carries out `effects` in order for `d` (as the core left it); stops at
/// the first store write that fails.
fn apply(ctl: &Controller, d: &Deployment, effects: Vec<Effect>) -> Result<(), PassError> {
    for e in effects {
        match e {
            Effect::Log { instance, line } => ctl.logs.line(instance.as_deref(), &line),
            Effect::RecordApplied(target) => ctl
                .store
                .put_json(Tree::Plans, APPLIED_KEY, &target)
                .map_err(PassError::Applied)?,
            Effect::Save => {
                ctl.store
                    .put_json(Tree::Deployments, d.id.as_str(), &d)
                    .map_err(PassError::Save)?;
                // Only a running record is ever applied: a saved end is its one transition.
                let ended = d.finished_at.as_deref();
                ctl.metrics.deployments.ended(d.state, &d.created_at, ended);
            }
            Effect::Queue(steps) => {
                let count = steps.len();
                let steps = steps
                    .into_iter()
                    .map(|s| NewStep {
                        id: Some(s.id),
                        node: s.node,
                        lane: Lane::Deploy,
                        action: s.action,
                        deployment_id: Some(d.id.clone()),
                        ttl: STEP_TTL,
                    })
                    .collect();
                // Not fatal: the next pass finds them not queued and queues them.
                if let Err(e) = ctl.steps.enqueue_many(steps) {
                    warn!(deployment = %d.id, steps = count, error = %de_common::ErrorChain(&e), "could not queue deployment steps");
                }
            }
            Effect::CancelSteps(ids) => {
                ctl.steps.cancel(&ids).map_err(PassError::Cancel)?;
            }
        }
    }
    Ok(())
}

async fn drive(ctl: Arc<Controller>, id: DeploymentId) {
    let mut updates = ctl.steps.subscribe();
    loop {
        // Off the runtime's threads: a pass reads and writes the store and
        // waits for the disk, which would starve the agents' links.
        let passed = {
            let (ctl, id) = (ctl.clone(), id.clone());
            tokio::task::spawn_blocking(move || pass(&ctl, &id)).await
        };
        match passed {
            Ok(Ok(Some(DeployState::Running))) => {}
            Ok(Ok(_)) => break,
            Ok(Err(e)) => {
                warn!(deployment = %id, error = %de_common::ErrorChain(&e), "deployment pass failed; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
            Err(e) => {
                warn!(deployment = %id, error = %e, "deployment pass did not finish; retrying");
                tokio::time::sleep(RETRY_AFTER).await;
                continue;
            }
        }
        // Wait for a step to finish (or a periodic re-check).
        let _ = tokio::time::timeout(RECHECK_AFTER, async {
            loop {
                match updates.recv().await {
                    Ok(StepUpdate::Finished { .. }) => return,
                    Ok(_) => continue,
                    Err(RecvError::Lagged(_)) => return,
                    Err(RecvError::Closed) => std::future::pending::<()>().await,
                }
            }
        })
        .await;
    }
    let mut running = ctl.deployer.lock_running();
    if running.as_ref() == Some(&id) {
        *running = None;
    }
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
                let inst = ctl.deployer.lock_instances().get(&step_id).cloned();
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
            Err(RecvError::Lagged(n)) => {
                ctl.logs.line(
                    None,
                    &format!("{n} step updates were missed by the log forwarder"),
                );
            }
            Err(RecvError::Closed) => return,
        }
    }
}
