//! The reconciler's pure core: one pass over a deployment record. In: the
//! record as saved, what the step queue says about its running steps, a
//! source of step ids and the time. Out: the changed record and the effects
//! the driver must carry out, in order. No store, no clock, no tokio, no
//! randomness: the same input always gives the same output.
//!
//! A pass records the steps that ended (a failure is retried with a new id
//! until `max_attempts`), then, unless a step failed for good, starts in the
//! lowest group with unfinished steps the next step of every instance that is
//! not running one. Once a step failed for good nothing new starts; when
//! nothing runs any more the pending steps are skipped and the deployment
//! fails. When every step is done it succeeds.
//!
//! Effect order: log lines about what ended; the applied plan (on success);
//! `Save`; log lines about what starts; `Queue`; the deployment's last line.
//! A step's id is in a saved record before it is queued, so a controller
//! stopped between the two finds it on restart ([`Seen::NotQueued`]) and
//! queues that same id; the applied plan is recorded before the record that
//! says the deployment succeeded, so a restart in between records it again.

use std::collections::{BTreeSet, HashMap};

use de_common::{NodeId, StepAction, StepId};

use super::record::{Applied, DeployState, DeployStep, Deployment, PhaseState};
use super::view::describe;

/// How much of a step's output the deployment record keeps: enough to say
/// why it failed. The record is rewritten as steps progress, so keeping the
/// step's full 64 KiB tails here would make a large deployment's every update
/// megabytes; they stay in the step (`GET /api/v1/steps/{id}`) and every line
/// is in the instance's log file.
pub(crate) const OUTPUT_KEPT: usize = 2048;

/// Where new step ids come from: random in the driver, a counter in tests.
/// It cannot fail, so neither can a pass.
pub(crate) trait IdSource {
    fn step_id(&mut self) -> StepId;
}

/// What the step queue says about a running step's current attempt (its
/// `step_id`). A running step the driver says nothing about is taken as
/// [`Seen::Waiting`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seen {
    /// Not in the queue: its id was saved, then the controller stopped before queueing it.
    NotQueued,
    /// Queued, or running on its node.
    Waiting,
    /// It ended.
    Finished(Finished),
}

/// How a queue step ended, as far as the deployment cares.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Finished {
    pub(crate) ending: Ending,
    pub(crate) exit_code: Option<i32>,
    /// Why it failed when there is no exit code to say so (the agent's words).
    pub(crate) error: Option<String>,
    /// Why the agent refused to run it.
    pub(crate) refusal: Option<String>,
    pub(crate) stdout_tail: String,
    pub(crate) stderr_tail: String,
}

/// The final state of a queue step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) enum Ending {
    #[default]
    Done,
    Failed,
    /// The agent did not run it (expired, bad signature...): a failure like any other.
    Refused,
    /// The controller withdrew it: the deployment is being cancelled.
    Cancelled,
}

/// One step to queue on its node's deploy lane, under the id the saved record holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct QueueStep {
    pub(crate) id: StepId,
    pub(crate) node: NodeId,
    pub(crate) action: StepAction,
}

/// What the driver must do after a pass, in the order given; if one of them
/// fails (a store write), it does none of the rest and starts over from the
/// saved record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Effect {
    /// A line for the operations log and, with `instance`, that instance's log too.
    Log {
        instance: Option<String>,
        line: String,
    },
    /// Record the deployment's target as the applied plan.
    RecordApplied(Applied),
    /// Store the record as the pass left it.
    Save,
    /// Queue these steps (idempotent on their ids), with one flush.
    Queue(Vec<QueueStep>),
    /// Withdraw these queue steps and have their nodes kill them (idempotent).
    CancelSteps(Vec<StepId>),
}

/// What the log and the record say of a cancelled deployment.
pub(crate) const CANCELLED_BY_OPERATOR: &str = "cancelled by an operator";

/// Cancels `d`: its running steps are withdrawn and killed on their nodes,
/// its pending ones skipped, and it ends `cancelled`. Effect order: the
/// steps are cancelled in the queue before the record is saved, so a
/// controller stopped in between finds a cancelled step on restart and
/// finishes the cancellation (see [`reconcile`]) instead of retrying it. A
/// record that is not running is left alone.
pub(crate) fn cancel(d: &mut Deployment, why: &str, now: &str) -> Vec<Effect> {
    if d.state != DeployState::Running {
        return Vec::new();
    }
    let mut ids = Vec::new();
    for s in d.steps.iter_mut() {
        match s.state {
            PhaseState::Running => {
                if let Some(id) = &s.step_id {
                    ids.push(id.clone());
                }
                s.state = PhaseState::Cancelled;
                s.finished_at = Some(now.to_owned());
                s.error = Some(why.to_owned());
            }
            PhaseState::Pending => s.state = PhaseState::Skipped,
            _ => {}
        }
    }
    d.state = DeployState::Cancelled;
    d.finished_at = Some(now.to_owned());
    d.error = Some(why.to_owned());
    let mut fx = Vec::new();
    if !ids.is_empty() {
        fx.push(Effect::CancelSteps(ids));
    }
    fx.push(Effect::Save);
    fx.push(log(None, format!("deployment {} cancelled: {why}", d.id)));
    fx
}

/// One pass over `d` (see the module's header). `seen` is keyed by step id;
/// `now` is an RFC 3339 time. A record that is not running is left alone.
pub(crate) fn reconcile(
    d: &mut Deployment,
    seen: &HashMap<StepId, Seen>,
    ids: &mut impl IdSource,
    now: &str,
) -> Vec<Effect> {
    let mut fx = Vec::new();
    if d.state != DeployState::Running {
        return fx;
    }
    // A step the queue holds as cancelled: a cancel was under way when the
    // controller stopped. Finish it rather than retry the step.
    if seen
        .values()
        .any(|s| matches!(s, Seen::Finished(f) if f.ending == Ending::Cancelled))
    {
        return cancel(d, CANCELLED_BY_OPERATOR, now);
    }
    let mut changed = false;
    let mut to_queue: BTreeSet<StepId> = BTreeSet::new();
    // Record what ended; note what never reached the queue.
    for s in d.steps.iter_mut() {
        if s.state != PhaseState::Running {
            continue;
        }
        let Some(id) = &s.step_id else {
            continue;
        };
        match seen.get(id) {
            None | Some(Seen::Waiting) => {}
            Some(Seen::NotQueued) => {
                to_queue.insert(id.clone());
            }
            Some(Seen::Finished(f)) => {
                changed = true;
                if let Some(failure) = record_finished(s, f, d.max_attempts, now, &mut fx) {
                    d.error = Some(failure);
                }
            }
        }
    }
    let mut starting = Vec::new();
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
            d.finished_at = Some(now.to_owned());
            changed = true;
        }
    } else if let Some(group) = lowest_unfinished_group(d) {
        starting = start_next_steps(d, group, ids, now);
        changed |= !starting.is_empty();
        to_queue.extend(starting.iter().filter_map(|&i| d.steps[i].step_id.clone()));
    } else {
        d.state = DeployState::Succeeded;
        d.finished_at = Some(now.to_owned());
        changed = true;
        fx.push(Effect::RecordApplied(d.target.clone()));
    }
    if changed {
        fx.push(Effect::Save);
    }
    fx.extend(starting.iter().map(|&i| announce(&d.steps[i])));
    // In the record's order, which is the order each node's lane runs them in.
    let queue: Vec<QueueStep> = d
        .steps
        .iter()
        .filter(|s| s.state == PhaseState::Running)
        .filter_map(|s| {
            let id = s.step_id.as_ref().filter(|id| to_queue.contains(*id))?;
            Some(QueueStep {
                id: id.clone(),
                node: s.node_id.clone(),
                action: s.action.clone(),
            })
        })
        .collect();
    if !queue.is_empty() {
        fx.push(Effect::Queue(queue));
    }
    match d.state {
        DeployState::Running => {}
        DeployState::Succeeded => fx.push(log(None, format!("deployment {} succeeded", d.id))),
        DeployState::Failed => fx.push(log(
            None,
            format!(
                "deployment {} failed: {}",
                d.id,
                d.error.clone().unwrap_or_default()
            ),
        )),
        DeployState::Cancelled => {}
    }
    fx
}

/// The lines a controller writes when it picks up a running deployment after
/// a restart: that it resumed, and every step it finds running.
pub(crate) fn resumed(d: &Deployment) -> Vec<Effect> {
    let mut fx = vec![log(
        None,
        format!("deployment {} resumed after a controller restart", d.id),
    )];
    fx.extend(
        d.steps
            .iter()
            .filter(|s| s.state == PhaseState::Running && s.step_id.is_some())
            .map(announce),
    );
    fx
}

/// Records how step `s`'s attempt ended: done, pending for a retry, or
/// failed for good (then the deployment's error message is returned).
fn record_finished(
    s: &mut DeployStep,
    f: &Finished,
    max_attempts: u32,
    now: &str,
    fx: &mut Vec<Effect>,
) -> Option<String> {
    s.exit_code = f.exit_code;
    s.output = Some(output_tail(&f.stdout_tail, &f.stderr_tail));
    if f.ending == Ending::Done {
        s.state = PhaseState::Done;
        s.finished_at = Some(now.to_owned());
        s.error = None;
        fx.push(log(
            Some(&s.instance),
            format!("{} on {}: {} done", s.instance, s.ip, describe(&s.action)),
        ));
        return None;
    }
    let why = f
        .error
        .clone()
        .or(f.refusal.clone())
        .unwrap_or_else(|| match f.exit_code {
            Some(code) => format!("exit code {code}"),
            None => "ended without an exit code (killed by a signal)".to_owned(),
        });
    s.error = Some(why.clone());
    if s.attempts < max_attempts {
        fx.push(log(
            Some(&s.instance),
            format!(
                "{} on {}: {} failed ({why}); retrying (attempt {} of {})",
                s.instance,
                s.ip,
                describe(&s.action),
                s.attempts + 1,
                max_attempts
            ),
        ));
        s.state = PhaseState::Pending;
        return None;
    }
    s.state = PhaseState::Failed;
    s.finished_at = Some(now.to_owned());
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
    fx.push(log(Some(&s.instance), msg.clone()));
    Some(msg)
}

/// The group that may run: the lowest with a step not done yet.
fn lowest_unfinished_group(d: &Deployment) -> Option<usize> {
    d.steps
        .iter()
        .filter(|s| s.state != PhaseState::Done)
        .map(|s| s.group)
        .min()
}

/// Starts, in `group`, the first unfinished step of every instance when it
/// is pending (not already running): a new attempt under a new id. Returns
/// the indexes of the steps started.
fn start_next_steps(
    d: &mut Deployment,
    group: usize,
    ids: &mut impl IdSource,
    now: &str,
) -> Vec<usize> {
    let mut started = Vec::new();
    let mut instances: BTreeSet<(String, String)> = BTreeSet::new();
    for (i, s) in d.steps.iter_mut().enumerate() {
        if s.group != group || s.state == PhaseState::Done {
            continue;
        }
        if !instances.insert((s.instance.clone(), s.ip.clone())) {
            continue;
        }
        if s.state == PhaseState::Pending {
            s.attempts += 1;
            s.state = PhaseState::Running;
            s.started_at.get_or_insert_with(|| now.to_owned());
            s.step_id = Some(ids.step_id());
            started.push(i);
        }
    }
    started
}

/// "`instance` on `ip`: `action` (attempt n)", when a step starts.
fn announce(s: &DeployStep) -> Effect {
    log(
        Some(&s.instance),
        format!(
            "{} on {}: {} (attempt {})",
            s.instance,
            s.ip,
            describe(&s.action),
            s.attempts
        ),
    )
}

fn log(instance: Option<&str>, line: String) -> Effect {
    Effect::Log {
        instance: instance.map(str::to_owned),
        line,
    }
}

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

#[cfg(test)]
mod tests;
