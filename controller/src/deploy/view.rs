//! The API's views of a deployment: [`DeploymentView`] and [`StepView`] (the
//! JSON of `GET /api/v1/deployments[/{id}]`), the deployment as a readable
//! log, and the short description of a step's action used in both and in the
//! log lines.

use serde::Serialize;

use de_common::StepAction;

use de_common::api::{DeploymentView, RolloutView, StepView, WatchView};

use super::reconcile::{InstanceKey, Phase, canaries, instances, phase, rollout_of};
use super::{Deployment, PhaseState};

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
        if self.paused {
            let _ = writeln!(
                out,
                "paused: the steps in flight finish, no new one starts until it is resumed"
            );
        }
        for r in self.rollout_views() {
            let _ = writeln!(
                out,
                "rollout of {}: canaries {}, max in flight {}, watch {} s{}; {} of {} done{}{}",
                r.component,
                r.canaries,
                r.max_in_flight
                    .map_or_else(|| "all".to_owned(), |n| n.to_string()),
                r.watch_secs,
                if r.serial { "" } else { ", not serial" },
                r.done,
                r.instances,
                if r.in_flight.is_empty() {
                    String::new()
                } else {
                    format!("; in flight: {}", r.in_flight.join(", "))
                },
                if r.watching.is_empty() {
                    String::new()
                } else {
                    format!("; watching: {}", r.watching.join(", "))
                },
            );
        }
        for w in &self.watches {
            let _ = writeln!(
                out,
                "[{}] {} watch {} s: {}, started {}{}",
                w.instance,
                w.ip,
                w.secs,
                word(&w.state),
                w.started_at,
                w.error
                    .as_deref()
                    .map(|e| format!(", {e}"))
                    .unwrap_or_default()
            );
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

    /// Per component with steps, its rollout and where its instances are.
    pub(crate) fn rollout_views(&self) -> Vec<RolloutView> {
        let canary = canaries(self);
        let mut out: Vec<RolloutView> = Vec::new();
        for (k, component) in instances(self) {
            let i = match out.iter().position(|r| r.component == component) {
                Some(i) => i,
                None => {
                    let r = rollout_of(self, &component);
                    out.push(RolloutView {
                        component: component.clone(),
                        canaries: r.canaries,
                        max_in_flight: r.max_in_flight,
                        watch_secs: r.watch_secs,
                        serial: r.serial,
                        canary_instances: Vec::new(),
                        in_flight: Vec::new(),
                        watching: Vec::new(),
                        done: 0,
                        instances: 0,
                    });
                    out.len() - 1
                }
            };
            let r = &mut out[i];
            r.instances += 1;
            if canary.contains(&k) && !r.canary_instances.contains(&k.instance) {
                r.canary_instances.push(k.instance.clone());
            }
            match phase(self, &k, &component) {
                Phase::Done => r.done += 1,
                Phase::InFlight => r.in_flight.push(k.instance.clone()),
                Phase::Waiting => {}
            }
            if self.watches.iter().any(|w| {
                w.state == PhaseState::Running && w.instance == k.instance && w.group == k.group
            }) {
                r.watching.push(k.instance.clone());
            }
        }
        out
    }

    pub fn view(&self, with_steps: bool) -> DeploymentView {
        let canary = canaries(self);
        DeploymentView {
            id: self.id.to_string(),
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
                        node_id: s.node_id.to_string(),
                        kind: s.kind,
                        action: describe(&s.action),
                        state: s.state,
                        attempts: s.attempts,
                        step_id: s.step_id.as_ref().map(ToString::to_string),
                        started_at: s.started_at.clone(),
                        finished_at: s.finished_at.clone(),
                        exit_code: s.exit_code,
                        error: s.error.clone(),
                        output: s.output.clone(),
                        hook: s.hook,
                        canary: canary.contains(&InstanceKey {
                            group: s.group,
                            instance: s.instance.clone(),
                            ip: s.ip.clone(),
                        }),
                    })
                    .collect()
            }),
            paused: self.paused,
            rollout: self.rollout_views(),
            watches: self
                .watches
                .iter()
                .map(|w| WatchView {
                    component: w.component.clone(),
                    instance: w.instance.clone(),
                    ip: w.ip.clone(),
                    node_id: w.node_id.to_string(),
                    secs: w.secs,
                    state: w.state,
                    started_at: w.started_at.clone(),
                    finished_at: w.finished_at.clone(),
                    pid: w.pid,
                    error: w.error.clone(),
                })
                .collect(),
        }
    }
}

pub(crate) fn describe(a: &StepAction) -> String {
    match a {
        StepAction::Script { .. } => "script".into(),
        StepAction::WriteFile { path, .. } => format!("write {path}"),
        StepAction::MonitAdd { name, .. } => format!("monit add {name}"),
        StepAction::MonitRemove { name } => format!("monit remove {name}"),
        StepAction::Monit { name, op } => format!("monit {op:?} {name}").to_lowercase(),
        StepAction::CollectLogs { .. } => "collect logs".into(),
        StepAction::Cancel { .. } => "cancel".into(),
        StepAction::MarkApplied { .. } => "mark applied".into(),
        StepAction::Unmark { .. } => "unmark".into(),
        StepAction::Fetch { artifact, path, .. } => format!("fetch {artifact} to {path}"),
    }
}
