//! The original API's operations on a running plan: `GET /deployment-engine/status`
//! (one row per component instance, as the original), and `PUT /restart` and
//! `PUT /stop` through each node's monit, as signed ad-hoc steps.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::{Extension, Router};

use de_common::api::{AuditAction, NodeView, OperateRequest, OperateRow, StatusRow};
use de_common::{Lane, MonitOp, StepAction, StepId};

use super::auth::audit;
use super::error::{ApiError, parse_json};
use crate::Controller;
use crate::access::Caller;
use crate::agents::steps::StepState;
use crate::plan::StoredPlan;
use crate::plan::validate::NodeIndex;

type Ctl = State<Arc<Controller>>;

/// How long restart/stop wait for the agents' answers.
const OPERATE_WAIT: Duration = Duration::from_secs(30);

pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/status", get(status))
        .route("/restart", put(restart))
        .route("/stop", put(stop))
        .route("/start", put(start))
}

fn pct(v: f32) -> String {
    let r = (f64::from(v) * 100.0).round() / 100.0;
    format!("{r}%")
}

fn row(comp: &str, ip: &str, node: Option<&NodeView>) -> StatusRow {
    let Some(n) = node else {
        return StatusRow {
            comp: comp.to_owned(),
            ip: ip.to_owned(),
            cpu: String::new(),
            mem: String::new(),
            disk: String::new(),
            status: "UNKNOWN (no enrolled node has this IP)".to_owned(),
        };
    };
    let status = if !n.online {
        "OFFLINE (the agent is not connected)".to_owned()
    } else {
        n.components
            .iter()
            .find(|c| c.name == comp)
            .map(|c| c.status.clone())
            .unwrap_or_else(|| "NOT_INSTALLED".to_owned())
    };
    StatusRow {
        comp: comp.to_owned(),
        ip: ip.to_owned(),
        cpu: pct(n.usage.cpu_pct),
        mem: pct(n.usage.mem_pct),
        disk: pct(n.usage.disk_pct),
        status,
    }
}

#[utoipa::path(
    get, path = "/deployment-engine/status", tag = "original",
    responses((status = 200, description = "One row per component instance of the plan.", body = Vec<StatusRow>))
)]
async fn status(State(ctl): Ctl) -> Result<axum::Json<Vec<StatusRow>>, ApiError> {
    let plan = ctl.plans.current().ok_or_else(ApiError::no_plan)?;
    let nodes = ctl.nodes.list();
    let index = NodeIndex::new(&nodes);
    Ok(axum::Json(
        plan.plan
            .instances()
            .map(|(c, ip)| row(c, ip, index.find(ip)))
            .collect(),
    ))
}

/// A `PUT /restart`, `/stop` or `/start` body, and the instances it names in `plan`.
pub(crate) fn parse_targets(
    plan: &StoredPlan,
    body: &[u8],
) -> Result<(OperateRequest, Vec<(String, String)>), ApiError> {
    let target: OperateRequest = parse_json(
        body,
        r#"{"name": "<component>", "ip": "<node IP>"} ("all" / "0.0.0.0" for everything)"#,
    )?;
    let picked = targets(plan, &target)?;
    Ok((target, picked))
}

fn targets(plan: &StoredPlan, t: &OperateRequest) -> Result<Vec<(String, String)>, ApiError> {
    let name = t.name.trim();
    let ip = t.ip.trim();
    let all_names = name == "all";
    let all_ips = ip == "0.0.0.0";
    let picked: Vec<(String, String)> = plan
        .plan
        .instances()
        .filter(|(c, i)| (all_names || *c == name) && (all_ips || *i == ip))
        .map(|(c, i)| (c.to_owned(), i.to_owned()))
        .collect();
    if picked.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{name:?} on {ip:?} is not in the plan: give a component and one of its IPs, or \"all\" / \"0.0.0.0\" (GET /deployment-engine/config shows the plan)"
        )));
    }
    Ok(picked)
}

async fn operate(
    ctl: Arc<Controller>,
    caller: Caller,
    body: Bytes,
    op: MonitOp,
) -> Result<Response, ApiError> {
    let plan = ctl.plans.current().ok_or_else(ApiError::no_plan)?;
    let (target, picked) = parse_targets(&plan, &body)?;
    // Operator intent, on disk before anything is asked: a stopped instance
    // stays stopped across deployments until it is started or restarted here.
    let keys: Vec<String> = picked
        .iter()
        .map(|(c, ip)| crate::deploy::intent::key(c, ip))
        .collect();
    crate::deploy::intent::set_stopped(&*ctl.store, &keys, op == MonitOp::Stop)?;
    let nodes = ctl.nodes.list();
    let index = NodeIndex::new(&nodes);
    let verb = match op {
        MonitOp::Restart => "restart",
        MonitOp::Stop => "stop",
        MonitOp::Start => "start",
    };
    let mut rows = Vec::new();
    // (row, step) for the instances whose node is asked; queued together below.
    let mut asked: Vec<(usize, crate::agents::steps::NewStep)> = Vec::new();
    for (comp, ip) in picked {
        let node = index.find(&ip);
        match node {
            Some(n) if n.online => {
                asked.push((
                    rows.len(),
                    crate::agents::steps::NewStep {
                        id: None,
                        node: n.node_id(),
                        lane: Lane::Adhoc,
                        action: StepAction::Monit {
                            name: comp.clone(),
                            op,
                        },
                        deployment_id: None,
                        ttl: OPERATE_WAIT * 2,
                    },
                ));
                rows.push(OperateRow {
                    comp,
                    ip,
                    result: String::new(),
                });
            }
            Some(_) => rows.push(OperateRow {
                comp,
                ip,
                result: format!("not done: the node is offline, so it was not asked to {verb}"),
            }),
            None => rows.push(OperateRow {
                comp,
                ip,
                result: "not done: no enrolled node has this IP".to_owned(),
            }),
        }
    }
    let (indexes, steps): (Vec<usize>, Vec<_>) = asked.into_iter().unzip();
    let action = match op {
        MonitOp::Restart => AuditAction::Restart,
        MonitOp::Stop => AuditAction::Stop,
        MonitOp::Start => AuditAction::Start,
    };
    let mut targets: Vec<String> = Vec::new();
    for s in &steps {
        let id = s.node.to_string();
        if !targets.contains(&id) {
            targets.push(id);
        }
    }
    audit(
        &ctl,
        &caller,
        action,
        targets,
        &format!("{} on {}", target.name.trim(), target.ip.trim()),
    )?;
    // Off the runtime's threads, as an exec's fan-out (http/native.rs).
    let c = ctl.clone();
    let queued = tokio::task::spawn_blocking(move || c.steps.enqueue_many(steps))
        .await
        .map_err(|e| ApiError::internal("queueing the steps did not finish", &e))??;
    let waiting: Vec<(usize, StepId)> = indexes
        .into_iter()
        .zip(queued)
        .map(|(i, r)| (i, r.step.id))
        .collect();
    ctl.logs.record(&format!(
        "{verb} {} on {}: {} instance(s)",
        target.name.trim(),
        target.ip.trim(),
        rows.len()
    ));
    let ids: Vec<StepId> = waiting.iter().map(|(_, id)| id.clone()).collect();
    let records = ctl
        .steps
        .wait_all(&ids, tokio::time::Instant::now() + OPERATE_WAIT)
        .await?;
    for ((i, _), rec) in waiting.into_iter().zip(records) {
        let result = match rec {
            Some(r) if r.state == StepState::Done => "ok".to_owned(),
            Some(r) if r.state.is_final() => {
                let o = r.outcome.clone().unwrap_or_default();
                format!(
                    "failed: {}",
                    o.error
                        .or(r.refusal.clone())
                        .unwrap_or_else(|| o.stderr_tail.trim().to_owned())
                )
            }
            _ => format!(
                "no answer from the agent within {} s",
                OPERATE_WAIT.as_secs()
            ),
        };
        rows[i].result = result;
    }
    Ok(axum::Json(rows).into_response())
}

#[utoipa::path(
    put, path = "/deployment-engine/restart", tag = "original",
    request_body(content = OperateRequest, description = "A component and one of its IPs; `all` / `0.0.0.0` match everything."),
    responses((status = 200, description = "One row per instance named.", body = Vec<OperateRow>))
)]
async fn restart(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    operate(ctl, caller, body, MonitOp::Restart).await
}

#[utoipa::path(
    put, path = "/deployment-engine/stop", tag = "original",
    request_body(content = OperateRequest, description = "A component and one of its IPs; `all` / `0.0.0.0` match everything."),
    responses((status = 200, description = "One row per instance named.", body = Vec<OperateRow>))
)]
async fn stop(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    operate(ctl, caller, body, MonitOp::Stop).await
}

/// Starts what `stop` stopped (and ends the operator's stop, so deployments
/// run it again).
#[utoipa::path(
    put, path = "/deployment-engine/start", tag = "original",
    request_body(content = OperateRequest, description = "A component and one of its IPs; `all` / `0.0.0.0` match everything."),
    responses((status = 200, description = "One row per instance named.", body = Vec<OperateRow>))
)]
async fn start(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    operate(ctl, caller, body, MonitOp::Start).await
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(status, restart, stop, start))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_is_shown_as_the_original_percent_strings() {
        assert_eq!(pct(8.0), "8%");
        assert_eq!(pct(81.744), "81.74%");
        assert_eq!(pct(1.18844), "1.19%");
    }
}
