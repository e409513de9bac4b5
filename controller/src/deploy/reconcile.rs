//! The reconciler's pure core: one pass over a deployment record. In: the
//! record as saved, what the step queue says about its running steps, a
//! source of step ids and the time. Out: the changed record and the effects
//! the driver must carry out, in order. No store, no clock, no tokio, no
//! randomness: the same input always gives the same output.
//!
//! A pass records the steps that ended (a failure is retried with a new id
//! until `max_attempts`) and judges the running watches from what the nodes'
//! monit reports, starts a watch for every instance whose steps are done
//! when its component has `watch_secs`, then, unless something failed for
//! good or an operator paused the deployment, starts in the lowest group
//! with unfinished work the next step of the instances its component's
//! rollout lets change: an instance already in flight goes on; a new one
//! starts only while fewer than `max_in_flight` of its component are in
//! flight, and only once the component's canaries are done (the canaries
//! first). Once a step or a watch failed for good nothing new starts; when
//! nothing runs any more the pending steps are skipped and the deployment
//! fails. When every step and watch is done it succeeds.
//!
//! A watch passes once monit on the instance's node reported it RUNNING
//! with one pid, in reports received at least `watch_secs` apart (reports
//! received within a second of the watch's start do not count: they may
//! have been read before the steps ended); it fails when a later report
//! says anything else or another pid, or when no RUNNING report comes
//! within [`WATCH_GRACE_MS`].
//!
//! Effect order: log lines about what ended; the applied plan (on success);
//! `Save`; log lines about what starts; `Queue`; the deployment's last line.
//! A step's id is in a saved record before it is queued, so a controller
//! stopped between the two finds it on restart ([`Seen::NotQueued`]) and
//! queues that same id; the applied plan is recorded before the record that
//! says the deployment succeeded, so a restart in between records it again.

use std::collections::{BTreeSet, HashMap};

use de_common::{MonitOp, NodeId, StepAction, StepId};

use super::record::{
    Applied, DeployState, DeployStep, Deployment, PhaseState, Rollout, TaskKind, Watch,
};
use super::view::describe;

/// How long a watch waits for its instance's first RUNNING report (or for
/// any report from a silent node) before it fails.
pub(crate) const WATCH_GRACE_MS: u64 = 60_000;

/// Reports received this soon after a watch started do not count.
const WATCH_SETTLE_MS: u64 = 1_000;

/// The time of a pass: as the record writes it, and in ms since the epoch
/// (for watches).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Now<'a> {
    pub(crate) text: &'a str,
    pub(crate) ms: u64,
}

/// One monit check as a node's last heartbeat reported it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CheckSeen {
    pub(crate) name: String,
    /// RUNNING, DOWN, STARTING, STOPPING, STOPPED.
    pub(crate) status: String,
    pub(crate) pid: Option<u32>,
}

/// What a node's monit last reported, and when the controller received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct MonitReport {
    pub(crate) at_ms: u64,
    pub(crate) checks: Vec<CheckSeen>,
}

/// The nodes' last monit reports, by node.
pub(crate) type MonitReports = HashMap<NodeId, MonitReport>;

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
    for w in d
        .watches
        .iter_mut()
        .filter(|w| w.state == PhaseState::Running)
    {
        w.state = PhaseState::Cancelled;
        w.finished_at = Some(now.to_owned());
        w.error = Some(why.to_owned());
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

/// Pauses (`paused`) or resumes a running deployment: a paused one finishes
/// its steps in flight and starts no new one until it is resumed. A record
/// that is not running, or already so, is left alone.
pub(crate) fn set_paused(d: &mut Deployment, paused: bool) -> Vec<Effect> {
    if d.state != DeployState::Running || d.paused == paused {
        return Vec::new();
    }
    d.paused = paused;
    let line = if paused {
        format!(
            "deployment {} paused by an operator: the steps in flight finish, no new one starts",
            d.id
        )
    } else {
        format!("deployment {} resumed by an operator", d.id)
    };
    vec![Effect::Save, log(None, line)]
}

/// One pass over `d` (see the module's header). `seen` is keyed by step id;
/// `monit` holds the nodes' last monit reports. A record that is not
/// running is left alone.
pub(crate) fn reconcile(
    d: &mut Deployment,
    seen: &HashMap<StepId, Seen>,
    monit: &MonitReports,
    ids: &mut impl IdSource,
    now: Now<'_>,
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
        return cancel(d, CANCELLED_BY_OPERATOR, now.text);
    }
    let canaries = canaries(d);
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
                let canary = canaries.contains(&InstanceKey::of(s));
                if let Some(failure) =
                    record_finished(s, f, d.max_attempts, now.text, canary, &mut fx)
                {
                    d.error = Some(failure);
                }
            }
        }
    }
    // Judge the running watches.
    for w in d
        .watches
        .iter_mut()
        .filter(|w| w.state == PhaseState::Running)
    {
        let canary = canaries.contains(&InstanceKey::of_watch(w));
        if let Some(failure) = judge_watch(w, monit.get(&w.node_id), now, canary, &mut fx) {
            d.error = Some(failure);
        }
        changed |= w.state != PhaseState::Running || w.pid.is_some();
    }
    let failed = d.steps.iter().any(|s| s.state == PhaseState::Failed)
        || d.watches.iter().any(|w| w.state == PhaseState::Failed);
    if !failed {
        changed |= start_watches(d, now, &mut fx);
    }
    let mut starting = Vec::new();
    if failed {
        // Nothing new starts; in-flight steps are left to finish on their nodes.
        if d.steps.iter().all(|s| s.state != PhaseState::Running) {
            for s in d
                .steps
                .iter_mut()
                .filter(|s| s.state == PhaseState::Pending)
            {
                s.state = PhaseState::Skipped;
            }
            for w in d
                .watches
                .iter_mut()
                .filter(|w| w.state == PhaseState::Running)
            {
                w.state = PhaseState::Skipped;
                w.finished_at = Some(now.text.to_owned());
            }
            d.state = DeployState::Failed;
            d.finished_at = Some(now.text.to_owned());
            changed = true;
        }
    } else if let Some(group) = lowest_unfinished_group(d) {
        if !d.paused {
            starting = start_next_steps(d, group, &canaries, ids, now.text);
            changed |= !starting.is_empty();
            to_queue.extend(starting.iter().filter_map(|&i| d.steps[i].step_id.clone()));
        }
    } else {
        d.state = DeployState::Succeeded;
        d.finished_at = Some(now.text.to_owned());
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

/// What a controller does when it picks up a running deployment after a
/// restart: it says so (and that it is paused, if it is), restarts every
/// unfinished watch from `now` (the reports it missed while it was down
/// prove nothing; a pid already seen must still hold), and announces every
/// step it finds running.
pub(crate) fn resumed(d: &mut Deployment, now: Now<'_>) -> Vec<Effect> {
    let paused = if d.paused {
        " (paused: no new step starts until an operator resumes it)"
    } else {
        ""
    };
    let mut fx = vec![log(
        None,
        format!(
            "deployment {} resumed after a controller restart{paused}",
            d.id
        ),
    )];
    let mut restarted = false;
    for w in d
        .watches
        .iter_mut()
        .filter(|w| w.state == PhaseState::Running)
    {
        w.since_ms = now.ms;
        w.started_at = now.text.to_owned();
        w.running_since_ms = None;
        restarted = true;
        fx.push(log(
            Some(&w.instance),
            format!(
                "{} on {}: watch restarted for {} s after the controller restart",
                w.instance, w.ip, w.secs
            ),
        ));
    }
    if restarted {
        fx.push(Effect::Save);
    }
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
    canary: bool,
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
        "{} ({}{}) on {} (node {}): {} failed after {} attempts: {why}; output: {}",
        s.component,
        s.instance,
        if canary { ", a canary" } else { "" },
        s.ip,
        s.node_id,
        describe(&s.action),
        s.attempts,
        s.output.clone().unwrap_or_default().trim()
    );
    fx.push(log(Some(&s.instance), msg.clone()));
    Some(msg)
}

/// The group that may run: the lowest with a step or a watch not done yet.
fn lowest_unfinished_group(d: &Deployment) -> Option<usize> {
    let steps = d
        .steps
        .iter()
        .filter(|s| s.state != PhaseState::Done)
        .map(|s| s.group);
    let watches = d
        .watches
        .iter()
        .filter(|w| w.state != PhaseState::Done)
        .map(|w| w.group);
    steps.chain(watches).min()
}

/// One instance's work in one group.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct InstanceKey {
    pub(crate) group: usize,
    pub(crate) instance: String,
    pub(crate) ip: String,
}

impl InstanceKey {
    fn of(s: &DeployStep) -> InstanceKey {
        InstanceKey {
            group: s.group,
            instance: s.instance.clone(),
            ip: s.ip.clone(),
        }
    }

    fn of_watch(w: &Watch) -> InstanceKey {
        InstanceKey {
            group: w.group,
            instance: w.instance.clone(),
            ip: w.ip.clone(),
        }
    }

    fn holds(&self, s: &DeployStep) -> bool {
        s.group == self.group && s.instance == self.instance && s.ip == self.ip
    }
}

/// Where an instance's work in a group is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Nothing started yet.
    Waiting,
    /// A step started (or ended, with more to go), or its watch runs.
    InFlight,
    /// Every step done, and its watch too when it has one.
    Done,
}

/// The component's rollout in `d` (the default when the record has none).
pub(crate) fn rollout_of(d: &Deployment, component: &str) -> Rollout {
    d.rollout.get(component).cloned().unwrap_or_default()
}

/// Every instance of `d` with work in a group, in the record's order, with
/// its component.
pub(crate) fn instances(d: &Deployment) -> Vec<(InstanceKey, String)> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in &d.steps {
        let k = InstanceKey::of(s);
        if seen.insert(k.clone()) {
            out.push((k, s.component.clone()));
        }
    }
    out
}

/// The canaries of `d`: per group and component, the first `canaries` instances.
pub(crate) fn canaries(d: &Deployment) -> BTreeSet<InstanceKey> {
    let mut counted: HashMap<(usize, String), usize> = HashMap::new();
    let mut out = BTreeSet::new();
    for (k, component) in instances(d) {
        let n = counted.entry((k.group, component.clone())).or_default();
        if *n < rollout_of(d, &component).canaries {
            out.insert(k);
        }
        *n += 1;
    }
    out
}

/// Whether the instance gets a watch once its steps are done: its
/// component has `watch_secs` and the steps start it.
fn needs_watch(d: &Deployment, key: &InstanceKey, component: &str) -> bool {
    rollout_of(d, component).watch_secs > 0
        && d.steps.iter().filter(|s| key.holds(s)).any(|s| {
            s.kind != TaskKind::Uninstall
                && matches!(
                    s.action,
                    StepAction::Monit {
                        op: MonitOp::Start | MonitOp::Restart,
                        ..
                    }
                )
        })
}

/// Where instance `key` (of `component`) is.
pub(crate) fn phase(d: &Deployment, key: &InstanceKey, component: &str) -> Phase {
    let mut steps = d.steps.iter().filter(|s| key.holds(s)).peekable();
    if steps.peek().is_none() {
        return Phase::Done;
    }
    let (mut all_done, mut started) = (true, false);
    for s in steps {
        all_done &= s.state == PhaseState::Done;
        started |= s.state != PhaseState::Pending || s.attempts > 0;
    }
    if all_done {
        let watch = d.watches.iter().find(|w| InstanceKey::of_watch(w) == *key);
        return match watch {
            Some(w) if w.state == PhaseState::Done => Phase::Done,
            Some(_) => Phase::InFlight,
            None if needs_watch(d, key, component) => Phase::InFlight,
            None => Phase::Done,
        };
    }
    if started {
        Phase::InFlight
    } else {
        Phase::Waiting
    }
}

/// Starts a watch for every instance whose steps are all done and whose
/// component watches (see [`needs_watch`]); true when one started.
fn start_watches(d: &mut Deployment, now: Now<'_>, fx: &mut Vec<Effect>) -> bool {
    let mut new = Vec::new();
    for (k, component) in instances(d) {
        let done = d
            .steps
            .iter()
            .filter(|s| k.holds(s))
            .all(|s| s.state == PhaseState::Done);
        if !done
            || d.watches.iter().any(|w| InstanceKey::of_watch(w) == k)
            || !needs_watch(d, &k, &component)
        {
            continue;
        }
        let Some(first) = d.steps.iter().find(|s| k.holds(s)) else {
            continue;
        };
        let secs = rollout_of(d, &component).watch_secs;
        fx.push(log(
            Some(&k.instance),
            format!(
                "{} on {}: steps done; watching it for {secs} s: monit must report it RUNNING, with one pid",
                k.instance, k.ip
            ),
        ));
        new.push(Watch {
            component,
            instance: k.instance.clone(),
            ip: k.ip.clone(),
            node_id: first.node_id.clone(),
            group: k.group,
            secs,
            state: PhaseState::Running,
            started_at: now.text.to_owned(),
            since_ms: now.ms,
            running_since_ms: None,
            pid: None,
            finished_at: None,
            error: None,
        });
    }
    let started = !new.is_empty();
    d.watches.extend(new);
    started
}

/// Judges a running watch from its node's last monit report: it passes,
/// fails (the deployment's error message is returned), notes the first
/// RUNNING report, or waits.
fn judge_watch(
    w: &mut Watch,
    report: Option<&MonitReport>,
    now: Now<'_>,
    canary: bool,
    fx: &mut Vec<Effect>,
) -> Option<String> {
    let window = w.secs.saturating_mul(1000);
    let fresh = report.filter(|r| r.at_ms >= w.since_ms.saturating_add(WATCH_SETTLE_MS));
    let check = fresh.map(|r| (r.at_ms, r.checks.iter().find(|c| c.name == w.component)));
    let late = now.ms > w.since_ms.saturating_add(WATCH_GRACE_MS);
    // Seen RUNNING before: in this watch, or before a controller restart
    // restarted it (the pid is kept).
    let was_running = w.running_since_ms.is_some() || w.pid.is_some();
    let why = match (check, w.running_since_ms) {
        (None, _) if late => Some(format!(
            "node {} sent no monit report for {} s",
            w.node_id,
            WATCH_GRACE_MS / 1000
        )),
        (None, _) => None,
        (Some((_, None)), _) => Some(format!(
            "monit on node {} has no check {}",
            w.node_id, w.component
        )),
        (Some((at, Some(c))), running_since) if c.status == "RUNNING" => {
            match (w.pid, c.pid, running_since) {
                (Some(old), Some(new), _) if old != new => {
                    Some(format!("its pid changed from {old} to {new}: it restarted"))
                }
                (_, _, None) => {
                    w.running_since_ms = Some(at);
                    w.pid = c.pid;
                    None
                }
                (_, _, Some(since)) if at >= since.saturating_add(window) => {
                    w.state = PhaseState::Done;
                    w.finished_at = Some(now.text.to_owned());
                    fx.push(log(
                        Some(&w.instance),
                        format!(
                            "{} on {}: watched for {} s: monit reported it RUNNING throughout{}",
                            w.instance,
                            w.ip,
                            w.secs,
                            w.pid.map(|p| format!(" (pid {p})")).unwrap_or_default()
                        ),
                    ));
                    None
                }
                _ => None,
            }
        }
        (Some((_, Some(c))), _) if was_running => Some(format!(
            "monit reports it {} after it was RUNNING{}",
            c.status,
            w.pid.map(|p| format!(" as pid {p}")).unwrap_or_default()
        )),
        (Some((_, Some(c))), _) if late => Some(format!(
            "monit never reported it RUNNING within {} s (last: {})",
            WATCH_GRACE_MS / 1000,
            c.status
        )),
        (Some(_), _) => None,
    };
    let why = why?;
    w.state = PhaseState::Failed;
    w.finished_at = Some(now.text.to_owned());
    w.error = Some(why.clone());
    let msg = format!(
        "{} ({}{}) on {} (node {}): watch failed: {why}",
        w.component,
        w.instance,
        if canary { ", a canary" } else { "" },
        w.ip,
        w.node_id
    );
    fx.push(log(Some(&w.instance), msg.clone()));
    Some(msg)
}

/// Starts, in `group`, the next step of every instance its component's
/// rollout lets change: one already in flight goes on with its first
/// unfinished step when that is pending (a new attempt under a new id); a
/// waiting one starts only while fewer than `max_in_flight` of its
/// component are in flight, and only once the component's canaries are
/// done, unless it is one. Returns the indexes of the steps started.
fn start_next_steps(
    d: &mut Deployment,
    group: usize,
    canaries: &BTreeSet<InstanceKey>,
    ids: &mut impl IdSource,
    now: &str,
) -> Vec<usize> {
    let list: Vec<(InstanceKey, String)> = instances(d)
        .into_iter()
        .filter(|(k, _)| k.group == group)
        .collect();
    let mut components: Vec<&str> = Vec::new();
    for (_, c) in &list {
        if !components.contains(&c.as_str()) {
            components.push(c);
        }
    }
    let mut go: Vec<InstanceKey> = Vec::new();
    for component in components {
        let mine: Vec<(&InstanceKey, Phase)> = list
            .iter()
            .filter(|(_, c)| c == component)
            .map(|(k, c)| (k, phase(d, k, c)))
            .collect();
        let max = rollout_of(d, component).max_in_flight.unwrap_or(usize::MAX);
        let canaries_done = mine
            .iter()
            .filter(|(k, _)| canaries.contains(*k))
            .all(|(_, p)| *p == Phase::Done);
        let mut in_flight = mine.iter().filter(|(_, p)| *p == Phase::InFlight).count();
        for (k, p) in &mine {
            match p {
                Phase::Done => {}
                Phase::InFlight => go.push((*k).clone()),
                Phase::Waiting => {
                    if (canaries_done || canaries.contains(*k)) && in_flight < max {
                        in_flight += 1;
                        go.push((*k).clone());
                    }
                }
            }
        }
    }
    let mut started = Vec::new();
    for k in go {
        let Some(i) = d
            .steps
            .iter()
            .position(|s| k.holds(s) && s.state != PhaseState::Done)
        else {
            continue;
        };
        let s = &mut d.steps[i];
        if s.state == PhaseState::Pending {
            s.attempts += 1;
            s.state = PhaseState::Running;
            s.started_at.get_or_insert_with(|| now.to_owned());
            s.step_id = Some(ids.step_id());
            started.push(i);
        }
    }
    started.sort_unstable();
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
