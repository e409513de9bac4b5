//! The API's views of a deployment: [`DeploymentView`] and [`StepView`] (the
//! JSON of `GET /api/v1/deployments[/{id}]`), the deployment as a readable
//! log, and the short description of a step's action used in both and in the
//! log lines.

use serde::Serialize;

use de_common::StepAction;

use de_common::api::{DeploymentView, StepView};

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
                    })
                    .collect()
            }),
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
