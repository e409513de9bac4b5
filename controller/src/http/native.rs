//! The native `/api/v1` routes for install codes, nodes, ad-hoc commands,
//! raw steps and deployments (plans and catalogs are in `plan.rs`, logs in
//! `logs.rs`).

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Router};

use de_common::api::{
    AuditAction, CodeView, DeploymentView, ExecRequest, ExecResult, FailedCodeAttempt,
    InstallCodeState, NewCode, NodeUpdate, NodeView, StepRecordView, StepRequest,
};

use de_common::{DeploymentId, NodeId, StepId};

use super::auth::audit;
use super::error::{ApiError, ErrorCode, parse_json, parse_optional_json};
use crate::Controller;
use crate::access::Caller;
use crate::agents::nodes::NodeError;
use crate::agents::{StepRecord, StepState};
use crate::util::rfc3339;

type Ctl = State<Arc<Controller>>;

/// The longest an install code may live.
pub(crate) const MAX_CODE_TTL_SECS: u64 = 7 * 24 * 3600;
/// The default install-code lifetime (the COS guide's hour).
pub(crate) const DEFAULT_CODE_TTL_SECS: u64 = 3600;

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route(
            "/install-codes",
            get(get_code).post(post_code).delete(delete_code),
        )
        .route("/nodes", get(list_nodes))
        .route(
            "/nodes/{id}",
            get(get_node).put(put_node).delete(delete_node),
        )
        .route("/nodes/{id}/steps", post(post_step))
        .route("/steps/{id}", get(get_step))
        .route("/exec", post(exec))
        .route("/deployments", get(list_deployments))
        .route("/deployments/{id}", get(get_deployment))
        .route("/deployments/{id}/log", get(get_deployment_log))
        .route("/deployments/{id}/cancel", post(cancel_deployment))
        .route("/deployments/{id}/pause", post(pause_deployment))
        .route("/deployments/{id}/resume", post(resume_deployment))
}

/// The most nodes one install code may be made for.
pub(crate) const MAX_CODE_NODES: u32 = 100_000;

/// A code as the API shows it, with the install command, the time left,
/// the guesses that failed (and where from) and the nodes it admitted.
fn code_view(ctl: &Controller, status: &de_install_codes::CodeStatus) -> CodeView {
    use de_install_codes::CodeState;
    CodeView {
        code: status.code.as_str().to_owned(),
        expires_at: rfc3339(status.expires_at),
        agent_command: crate::agents::agent_command(
            &ctl.agent_addr,
            ctl.join.as_ref(),
            status.code.as_str(),
        ),
        expires_in_secs: status
            .expires_at
            .duration_since(std::time::SystemTime::now())
            .map(|d| d.as_secs())
            .unwrap_or(0),
        state: match status.state {
            CodeState::Burned => InstallCodeState::Burned,
            CodeState::Used => InstallCodeState::Used,
            _ => InstallCodeState::Open,
        },
        failed_attempts: status
            .failed
            .iter()
            .map(|a| FailedCodeAttempt {
                source: a.source.to_canonical().to_string(),
                at: rfc3339(a.at),
                in_progress: a.in_progress(),
            })
            .collect(),
        nodes: status.nodes,
        nodes_admitted: status.admitted,
        nodes_left: status.nodes.map(|n| n.saturating_sub(status.admitted)),
    }
}

#[utoipa::path(
    post, path = "/api/v1/install-codes", tag = "install codes",
    request_body(content = Option<NewCode>, description = "Optional: how long the code lives (1 s to 7 days, 1 h when absent) and how many nodes it admits."),
    responses((status = 201, description = "The new install code (it replaces the previous one).", body = CodeView))
)]
async fn post_code(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NewCode = parse_optional_json(&body, r#"no body, or {"ttl_secs": N, "nodes": N}"#)?
        .unwrap_or_default();
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_CODE_TTL_SECS);
    if ttl == 0 || ttl > MAX_CODE_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be between 1 and {MAX_CODE_TTL_SECS} (7 days), got {ttl}"
        )));
    }
    if let Some(n) = req.nodes.filter(|n| !(1..=MAX_CODE_NODES).contains(n)) {
        return Err(ApiError::bad_request(format!(
            "nodes must be between 1 and {MAX_CODE_NODES} (or absent for any number), got {n}"
        )));
    }
    ctl.codes.issue(Duration::from_secs(ttl), req.nodes)?;
    let detail = match req.nodes {
        Some(n) => format!("ttl {ttl} s, {n} node(s)"),
        None => format!("ttl {ttl} s"),
    };
    audit(&ctl, &caller, AuditAction::Code, Vec::new(), &detail)?;
    let status = ctl.codes.status().ok_or_else(|| {
        ApiError::not_found("no install code is active: create one with POST /api/v1/install-codes")
    })?;
    let view = code_view(&ctl, &status);
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

/// The open code, or a burned or used-up one (so the operator sees where the
/// guesses came from); 404 when none was issued, or it was ended or expired.
#[utoipa::path(
    get, path = "/api/v1/install-codes", tag = "install codes",
    responses((status = 200, description = "The open code, or a burned or used-up one.", body = CodeView))
)]
async fn get_code(State(ctl): Ctl) -> Result<axum::Json<CodeView>, ApiError> {
    use de_install_codes::CodeState;
    let status = ctl
        .codes
        .status()
        .filter(|s| {
            matches!(
                s.state,
                CodeState::Open | CodeState::Burned | CodeState::Used
            )
        })
        .ok_or_else(|| {
            ApiError::not_found(
                "no install code is active: create one with POST /api/v1/install-codes",
            )
        })?;
    Ok(axum::Json(code_view(&ctl, &status)))
}

#[utoipa::path(
    delete, path = "/api/v1/install-codes", tag = "install codes",
    responses((status = 204, description = "The code is ended."))
)]
async fn delete_code(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
) -> Result<StatusCode, ApiError> {
    ctl.codes.end()?;
    audit(&ctl, &caller, AuditAction::EndCode, Vec::new(), "")?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(
    get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, description = "Every enrolled node, revoked ones too.", body = Vec<NodeView>))
)]
async fn list_nodes(State(ctl): Ctl) -> axum::Json<Vec<NodeView>> {
    axum::Json(ctl.nodes.list())
}

#[utoipa::path(
    get, path = "/api/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The node's id.")),
    responses((status = 200, description = "The node.", body = NodeView))
)]
async fn get_node(
    State(ctl): Ctl,
    Path(id): Path<NodeId>,
) -> Result<axum::Json<NodeView>, ApiError> {
    ctl.nodes
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {id:?}: GET /api/v1/nodes lists them")))
}

/// An operator's change of a node's IPs or NAT allowance.
#[utoipa::path(
    put, path = "/api/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The node's id.")),
    request_body = NodeUpdate,
    responses((status = 200, description = "The node as changed.", body = NodeView))
)]
async fn put_node(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<NodeId>,
    body: Bytes,
) -> Result<axum::Json<NodeView>, ApiError> {
    let req: NodeUpdate = parse_json(&body, r#"{"ips": ["10.0.0.5"], "allow_nat": false}"#)?;
    if req.ips.is_none() && req.allow_nat.is_none() {
        return Err(ApiError::bad_request(
            r#"nothing to change: give "ips", "allow_nat" or both"#,
        ));
    }
    let detail = format!("ips {:?}, allow_nat {:?}", req.ips, req.allow_nat);
    match ctl.nodes.update(&id, req.ips, req.allow_nat) {
        Ok(view) => {
            audit(
                &ctl,
                &caller,
                AuditAction::NodeUpdate,
                vec![id.to_string()],
                &detail,
            )?;
            Ok(axum::Json(view))
        }
        Err(e @ NodeError::Unknown(_)) => Err(ApiError::not_found(e.to_string())),
        Err(e @ (NodeError::Revoked(_) | NodeError::Taken { .. })) => {
            Err(ApiError::new(ErrorCode::Conflict, e.to_string()))
        }
        Err(NodeError::Store(e)) => Err(e.into()),
        Err(e) => Err(ApiError::bad_request(e.to_string())),
    }
}

#[utoipa::path(
    delete, path = "/api/v1/nodes/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The node's id.")),
    responses((status = 204, description = "The node is revoked: its certificate is refused from now on."))
)]
async fn delete_node(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<NodeId>,
) -> Result<StatusCode, ApiError> {
    if ctl.nodes.revoke(&id)? {
        audit(&ctl, &caller, AuditAction::Revoke, vec![id.to_string()], "")?;
        // The revoke stands either way; steps not failed here are failed by the watchdog.
        match ctl.steps.fail_node(&id, "the node was revoked") {
            Ok(failed) => tracing::info!(node = %id, failed_steps = failed, "node revoked"),
            Err(e) => tracing::warn!(
                node = %id,
                error = %de_common::ErrorChain(&e),
                "node revoked; its open steps could not be failed yet (the watchdog will)"
            ),
        }
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!(
            "no node {id:?}: GET /api/v1/nodes lists them"
        )))
    }
}

/// The default and largest `timeout_secs` of an ad-hoc command.
const DEFAULT_EXEC_TIMEOUT: u64 = 60;
const MAX_EXEC_TIMEOUT: u64 = 3600;
/// How long past its own timeout a command's result is waited for (delivery, reporting).
const EXEC_GRACE: Duration = Duration::from_secs(15);

fn exec_result(
    (node, ip): &(NodeId, String),
    rec: Option<&StepRecord>,
    step_id: &StepId,
    waited: u64,
    online: impl FnOnce() -> bool,
) -> ExecResult {
    let base = ExecResult {
        node_id: node.to_string(),
        ip: ip.clone(),
        exit_code: None,
        stdout: String::new(),
        stderr: String::new(),
        duration_ms: 0,
        timed_out: false,
        error: None,
        step_id: step_id.to_string(),
    };
    match rec {
        Some(r) if r.state == StepState::Refused => ExecResult {
            error: Some(format!(
                "the agent refused the command: {}",
                r.refusal.clone().unwrap_or_default()
            )),
            ..base
        },
        Some(r) if r.state.is_final() => {
            let o = r.outcome.clone().unwrap_or_default();
            ExecResult {
                exit_code: o.exit_code,
                stdout: o.stdout_tail,
                stderr: o.stderr_tail,
                duration_ms: o.duration_ms,
                timed_out: o.timed_out,
                error: o.error.or(r.refusal.clone()),
                ..base
            }
        }
        _ => ExecResult {
            timed_out: true,
            error: Some(format!(
                "no result within {waited} s{}",
                if online() {
                    ""
                } else {
                    ": the node is offline"
                }
            )),
            ..base
        },
    }
}

#[utoipa::path(
    post, path = "/api/v1/exec", tag = "nodes",
    request_body = ExecRequest,
    responses((status = 200, description = "One result per target node, in the order of the targets.", body = Vec<ExecResult>))
)]
async fn exec(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<axum::Json<Vec<ExecResult>>, ApiError> {
    let req: ExecRequest = parse_json(
        &body,
        r#"{"script": "...", "targets": ["IP or node id", ...], "timeout_secs": N}"#,
    )?;
    if req.script.trim().is_empty() {
        return Err(ApiError::bad_request(
            "script is empty: give the shell command to run",
        ));
    }
    let timeout = req.timeout_secs.unwrap_or(DEFAULT_EXEC_TIMEOUT);
    if timeout == 0 || timeout > MAX_EXEC_TIMEOUT {
        return Err(ApiError::bad_request(format!(
            "timeout_secs must be between 1 and {MAX_EXEC_TIMEOUT}, got {timeout}"
        )));
    }
    let nodes: Vec<(NodeId, String)> = match &req.targets {
        None => ctl.nodes.online(),
        Some(targets) => {
            let mut found = Vec::new();
            let mut unknown = Vec::new();
            for t in targets {
                match ctl.nodes.find(t) {
                    Some(n) if !n.revoked => {
                        let ip = n.ips.first().cloned().unwrap_or_default();
                        found.push((n.node_id(), ip));
                    }
                    _ => unknown.push(t.clone()),
                }
            }
            if !unknown.is_empty() {
                return Err(ApiError::bad_request(format!(
                    "no enrolled node for target(s) {}: GET /api/v1/nodes lists them",
                    unknown.join(", ")
                )));
            }
            found
        }
    };
    if nodes.is_empty() {
        return Err(ApiError::new(
            ErrorCode::NoTargets,
            "no node is online to run the command: enrol agents, or name targets",
        ));
    }
    let grace = EXEC_GRACE;
    let ttl = Duration::from_secs(timeout) + grace;
    let steps = nodes
        .iter()
        .map(|n| crate::agents::steps::NewStep {
            id: None,
            node: n.0.clone(),
            lane: de_common::Lane::Adhoc,
            action: de_common::StepAction::Script {
                script: req.script.clone(),
                user: req.user.clone(),
                env: Vec::new(),
                timeout_secs: u32::try_from(timeout).unwrap_or(u32::MAX),
            },
            deployment_id: None,
            ttl,
        })
        .collect();
    audit(
        &ctl,
        &caller,
        AuditAction::Exec,
        nodes.iter().map(|n| n.0.to_string()).collect(),
        &req.script,
    )?;
    // Queued in chunks that agents pull as each is on disk; all of it is
    // on disk when this returns. Off the runtime's threads: signing and
    // writing 10,000 steps takes most of a second, and the QUIC endpoint's
    // receive task, polled late, lets the socket's buffer overflow with the
    // answers to the chunks already out.
    let c = ctl.clone();
    let ids: Vec<StepId> = tokio::task::spawn_blocking(move || c.steps.enqueue_many(steps))
        .await
        .map_err(|e| ApiError::internal("queueing the command did not finish", &e))??
        .into_iter()
        .map(|r| r.step.id)
        .collect();
    tracing::info!(targets = nodes.len(), "exec queued");
    let deadline = tokio::time::Instant::now() + ttl;
    let records = ctl.steps.wait_all(&ids, deadline).await?;
    let out = nodes
        .iter()
        .zip(&ids)
        .zip(&records)
        .map(|((n, id), rec)| {
            // Whether the node is online now, asked only of one that gave no result.
            let online = || ctl.nodes.get(&n.0).is_some_and(|v| v.online);
            exec_result(n, rec.as_ref(), id, ttl.as_secs(), online)
        })
        .collect();
    Ok(axum::Json(out))
}

#[utoipa::path(
    get, path = "/api/v1/deployments", tag = "deployments",
    responses((status = 200, description = "Every deployment, without its steps (`steps` is null).", body = Vec<DeploymentView>))
)]
async fn list_deployments(State(ctl): Ctl) -> Result<axum::Json<Vec<DeploymentView>>, ApiError> {
    let all = crate::Deployer::list(&ctl)?;
    Ok(axum::Json(all.iter().map(|d| d.view(false)).collect()))
}

#[utoipa::path(
    get, path = "/api/v1/deployments/{id}", tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id.")),
    responses((status = 200, description = "The deployment with its steps.", body = DeploymentView))
)]
async fn get_deployment(
    State(ctl): Ctl,
    Path(id): Path<DeploymentId>,
) -> Result<axum::Json<DeploymentView>, ApiError> {
    crate::Deployer::get(&ctl, &id)?
        .map(|d| axum::Json(d.view(true)))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "no deployment {id:?}: GET /api/v1/deployments lists them"
            ))
        })
}

/// The deployment's log as text: every step in order with its state and the end of its output.
#[utoipa::path(
    get, path = "/api/v1/deployments/{id}/log", tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id.")),
    responses((status = 200, description = "The deployment's log.", body = String, content_type = "text/plain"))
)]
async fn get_deployment_log(
    State(ctl): Ctl,
    Path(id): Path<DeploymentId>,
) -> Result<Response, ApiError> {
    let d = crate::Deployer::get(&ctl, &id)?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no deployment {id:?}: GET /api/v1/deployments lists them"
        ))
    })?;
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        d.log_text(),
    )
        .into_response())
}

/// Cancels a running deployment: 200 with the deployment as it ended
/// (`cancelled`), durable when answered; 404 for no such deployment, 409 for
/// one that is not running.
#[utoipa::path(
    post, path = "/api/v1/deployments/{id}/cancel", tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id.")),
    responses((status = 200, description = "The deployment as it ended (`cancelled`).", body = DeploymentView))
)]
async fn cancel_deployment(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<DeploymentId>,
) -> Result<axum::Json<DeploymentView>, ApiError> {
    let asked = id.to_string();
    let c = ctl.clone();
    let d = tokio::task::spawn_blocking(move || crate::Deployer::cancel(&c, &id))
        .await
        .map_err(|e| ApiError::internal("the cancel did not finish", &e))??;
    audit(&ctl, &caller, AuditAction::Cancel, vec![asked], "")?;
    Ok(axum::Json(d.view(true)))
}

/// Pauses a running deployment: its steps in flight finish, no new one
/// starts. 200 with the deployment (`paused: true`), durable when answered;
/// pausing a paused one changes nothing. 404 for no such deployment, 409
/// for one that is not running.
#[utoipa::path(
    post, path = "/api/v1/deployments/{id}/pause", tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id.")),
    responses((status = 200, description = "The deployment (`paused: true`).", body = DeploymentView))
)]
async fn pause_deployment(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<DeploymentId>,
) -> Result<axum::Json<DeploymentView>, ApiError> {
    set_paused(ctl, caller, id, true).await
}

/// Resumes a paused deployment: 200 with the deployment (`paused: false`);
/// resuming one that is not paused changes nothing. 404, 409 as for pause.
#[utoipa::path(
    post, path = "/api/v1/deployments/{id}/resume", tag = "deployments",
    params(("id" = String, Path, description = "The deployment's id.")),
    responses((status = 200, description = "The deployment (`paused: false`).", body = DeploymentView))
)]
async fn resume_deployment(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<DeploymentId>,
) -> Result<axum::Json<DeploymentView>, ApiError> {
    set_paused(ctl, caller, id, false).await
}

async fn set_paused(
    ctl: Arc<Controller>,
    caller: Caller,
    id: DeploymentId,
    paused: bool,
) -> Result<axum::Json<DeploymentView>, ApiError> {
    let (action, word) = if paused {
        (AuditAction::Pause, "pause")
    } else {
        (AuditAction::Resume, "resume")
    };
    audit(&ctl, &caller, action, vec![id.to_string()], "")?;
    let c = ctl.clone();
    let d = tokio::task::spawn_blocking(move || crate::Deployer::set_paused(&c, &id, paused))
        .await
        .map_err(|e| ApiError::internal(&format!("the {word} did not finish"), &e))??;
    Ok(axum::Json(d.view(true)))
}

/// Queues one raw step for a node and waits (bounded) for it: 200 with the
/// finished record, or 202 with the record as it stands.
#[utoipa::path(
    post, path = "/api/v1/nodes/{id}/steps", tag = "nodes",
    params(("id" = String, Path, description = "The node's id or one of its IPs.")),
    request_body = StepRequest,
    responses(
        (status = 200, description = "The step finished within `wait_secs`.", body = StepRecordView),
        (status = 202, description = "The step as it stands after `wait_secs`.", body = StepRecordView)
    )
)]
async fn post_step(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: StepRequest = parse_json(
        &body,
        r#"{"action": {"Script": {"script": "...", "user": null, "env": [], "timeout_secs": 60}}, "lane": "Adhoc", "wait_secs": 30}"#,
    )?;
    let node = ctl.nodes.find(&id).filter(|n| !n.revoked).ok_or_else(|| {
        ApiError::not_found(format!(
            "no enrolled node {id:?}: GET /api/v1/nodes lists them"
        ))
    })?;
    let wait = Duration::from_secs(req.wait_secs.unwrap_or(30).min(MAX_EXEC_TIMEOUT));
    audit(
        &ctl,
        &caller,
        AuditAction::Step,
        vec![node.id.clone()],
        req.action.kind(),
    )?;
    let r = ctl.steps.enqueue(
        &node.node_id(),
        req.lane.unwrap_or(de_common::Lane::Adhoc),
        req.action,
        None,
        crate::agents::steps::DEFAULT_STEP_TTL,
    )?;
    let records = ctl
        .steps
        .wait_all(
            std::slice::from_ref(&r.step.id),
            tokio::time::Instant::now() + wait,
        )
        .await?;
    let rec = records.into_iter().next().flatten().unwrap_or(r);
    let status = if rec.state.is_final() {
        StatusCode::OK
    } else {
        StatusCode::ACCEPTED
    };
    Ok((status, step_answer(&ctl, &rec)).into_response())
}

/// A step record as answers show it: the current plan's secrets hidden
/// wherever they appear (see [`StepRecord::redacted`]).
fn step_answer(ctl: &Controller, rec: &StepRecord) -> axum::Json<serde_json::Value> {
    let secrets = ctl
        .plans
        .current()
        .map(|p| p.plan.secret_texts())
        .unwrap_or_default();
    axum::Json(rec.redacted(&secrets))
}

#[utoipa::path(
    get, path = "/api/v1/steps/{id}", tag = "nodes",
    params(("id" = String, Path, description = "The step's id.")),
    responses((status = 200, description = "The step record (secrets of the plan read `******`).", body = StepRecordView))
)]
async fn get_step(
    State(ctl): Ctl,
    Path(id): Path<StepId>,
) -> Result<axum::Json<serde_json::Value>, ApiError> {
    ctl.steps
        .get(&id)?
        .map(|r| step_answer(&ctl, &r))
        .ok_or_else(|| ApiError::not_found(format!("no step {id:?}")))
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(
    post_code,
    get_code,
    delete_code,
    list_nodes,
    get_node,
    put_node,
    delete_node,
    exec,
    list_deployments,
    get_deployment,
    get_deployment_log,
    cancel_deployment,
    pause_deployment,
    resume_deployment,
    post_step,
    get_step
))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::app;
    use axum::body::Body;
    use axum::extract::Request;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn controller() -> (tempfile::TempDir, Arc<Controller>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (mut ctl, _) = Controller::open(dir.path()).expect("open");
        ctl.agent_addr = "ctl.example:50001".to_owned();
        (dir, Arc::new(ctl))
    }

    async fn call(
        ctl: &Arc<Controller>,
        method: &str,
        uri: &str,
        token: Option<&str>,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app(ctl.clone())
            .oneshot(req.body(Body::from(body.to_owned())).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        let json = if bytes.is_empty() {
            serde_json::Value::Null
        } else {
            serde_json::from_slice(&bytes).expect("json body")
        };
        (status, json)
    }

    #[tokio::test]
    async fn api_needs_the_token_and_healthz_does_not() {
        let (_d, ctl) = controller();
        let (s, body) = call(&ctl, "GET", "/api/v1/nodes", None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "unauthorized");
        let (s, _) = call(&ctl, "GET", "/api/v1/nodes", Some("wrong"), "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, body) = call(&ctl, "GET", "/healthz", None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body["status"], "ok");
        let token = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/api/v1/nodes", Some(&token), "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, serde_json::json!([]));
    }

    #[tokio::test]
    async fn install_codes_are_created_shown_replaced_and_ended() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let (s, _) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, first) = call(&ctl, "POST", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::CREATED);
        let code = first["code"].as_str().expect("code");
        assert!(code.len() == 4 && code.bytes().all(|b| b.is_ascii_digit()));
        assert!(first["expires_at"].as_str().expect("expiry").ends_with('Z'));
        assert_eq!(
            first["agent_command"],
            format!("packaging/install-agent.sh --controller ctl.example:50001 --code {code}")
        );
        let (s, shown) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!((s, &shown), (StatusCode::OK, &first));
        let (s, second) = call(
            &ctl,
            "POST",
            "/api/v1/install-codes",
            Some(&t),
            r#"{"ttl_secs": 120}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let (_, shown) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(shown, second);
        let (s, _) = call(&ctl, "DELETE", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, _) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        for bad in [
            r#"{"ttl_secs": 0}"#,
            r#"{"ttl": 5}"#,
            "{",
            r#"{"ttl_secs": -1}"#,
        ] {
            let (s, body) = call(&ctl, "POST", "/api/v1/install-codes", Some(&t), bad).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
            assert!(
                body["message"].as_str().expect("msg").contains("ttl_secs"),
                "{bad}: {body}"
            );
        }
        let (s, body) = call(
            &ctl,
            "POST",
            "/api/v1/install-codes",
            Some(&t),
            r#"{"nodes": 0}"#,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(
            body["message"],
            "nodes must be between 1 and 100000 (or absent for any number), got 0"
        );
        let (s, made) = call(
            &ctl,
            "POST",
            "/api/v1/install-codes",
            Some(&t),
            r#"{"nodes": 2}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(
            (
                &made["state"],
                &made["nodes"],
                &made["nodes_admitted"],
                &made["nodes_left"]
            ),
            (
                &serde_json::json!("open"),
                &serde_json::json!(2),
                &serde_json::json!(0),
                &serde_json::json!(2)
            )
        );
        assert_eq!(made["failed_attempts"], serde_json::json!([]));
    }

    #[tokio::test]
    async fn an_acknowledged_code_survives_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let code = {
            let (ctl, _) = Controller::open(dir.path()).expect("open");
            let ctl = Arc::new(ctl);
            let t = ctl.pki.token().to_owned();
            let (s, body) = call(&ctl, "POST", "/api/v1/install-codes", Some(&t), "").await;
            assert_eq!(s, StatusCode::CREATED);
            body
        };
        let (ctl, _) = crate::testkit::reopen(|| Controller::open(dir.path()));
        let ctl = Arc::new(ctl);
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::OK);
        for field in ["code", "expires_at", "agent_command"] {
            assert_eq!(body[field], code[field], "{field}");
        }
        // Counted down by the controller's clock.
        let left = body["expires_in_secs"].as_u64().expect("expires_in_secs");
        assert!(
            left <= code["expires_in_secs"].as_u64().expect("first") && left > 3500,
            "{body}"
        );
    }

    /// Targets are matched by `resolve`: a revoked node, an IP two live
    /// records share (neither online) and an unknown IP all name no node.
    #[tokio::test]
    async fn exec_and_step_targets_name_one_live_node_or_are_refused() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        crate::testkit::enrol(&ctl, "n-1", "10.0.0.1", 1, 1024, 1024);
        crate::testkit::enrol(&ctl, "n-2", "10.0.0.2", 1, 1024, 1024);
        // A second claim of an IP is refused now; an older store may still hold one.
        let again = crate::testkit::record("n-3", "10.0.0.2", 1, 1024, 1024);
        assert!(
            matches!(ctl.nodes.enrolled(again.clone()), Err(NodeError::Taken { owner, .. }) if owner.as_str() == "n-2")
        );
        ctl.nodes.enrolled_unchecked(again).expect("old store");
        assert_eq!(ctl.nodes.revoke(&"n-1".into()).ok(), Some(true));
        for target in ["10.0.0.1", "n-1", "10.0.0.2", "10.0.0.9"] {
            let body = format!(r#"{{"script": "true", "targets": ["{target}"]}}"#);
            let (s, body) = call(&ctl, "POST", "/api/v1/exec", Some(&t), &body).await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{target}: {body}");
            assert!(
                body["message"].as_str().is_some_and(|m| m.contains(target)),
                "{target}: {body}"
            );
            let uri = format!("/api/v1/nodes/{target}/steps");
            let step = r#"{"action": {"MonitRemove": {"name": "x"}}, "wait_secs": 0}"#;
            let (s, body) = call(&ctl, "POST", &uri, Some(&t), step).await;
            assert_eq!(s, StatusCode::NOT_FOUND, "{target}: {body}");
        }
        assert_eq!(ctl.nodes.find("n-2").map(|n| n.id), Some("n-2".to_owned()));
        assert_eq!(ctl.nodes.find("10.0.0.2"), None);
    }

    /// `POST /api/v1/nodes/{id}/steps` and `GET /api/v1/steps/{id}` never
    /// show the current plan's secrets, as given or as `sh` quotes them.
    #[tokio::test]
    async fn step_answers_hide_the_plans_secrets() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        crate::testkit::enrol(&ctl, "n-1", "10.0.0.1", 1, 1024, 1024);
        // Its password is pass'word, its root password 123456.
        let plan = crate::testkit::plan("cf-v170", &[("nats", &["10.0.0.1"])]);
        ctl.plans.store(plan).expect("store the plan");
        let script = r#"echo 'pass'\''word' | passwd vcap; echo 123456 | passwd"#;
        let body = serde_json::json!({
            "action": {"Script": {"script": script, "user": null, "env": [], "timeout_secs": 5}},
            "wait_secs": 0
        });
        let (s, queued) = call(
            &ctl,
            "POST",
            "/api/v1/nodes/n-1/steps",
            Some(&t),
            &body.to_string(),
        )
        .await;
        assert_eq!(s, StatusCode::ACCEPTED, "{queued}");
        let id = queued["step"]["id"].as_str().expect("step id").to_owned();
        let (s, got) = call(&ctl, "GET", &format!("/api/v1/steps/{id}"), Some(&t), "").await;
        assert_eq!(s, StatusCode::OK);
        for answer in [&queued, &got] {
            assert_eq!(
                answer["step"]["action"]["Script"]["script"],
                "echo '******' | passwd vcap; echo ****** | passwd",
                "{answer}"
            );
        }
        let stored = ctl
            .steps
            .get(&id.as_str().into())
            .expect("get")
            .expect("step");
        let de_common::StepAction::Script { script: kept, .. } = stored.step.action else {
            panic!("not a script: {:?}", stored.step.action);
        };
        assert_eq!(kept, script, "the node gets the step as posted");
    }

    #[tokio::test]
    async fn unknown_nodes_and_routes_are_404_with_the_error_shape() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "DELETE", "/api/v1/nodes/n-missing", Some(&t), "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(body["message"].as_str().expect("msg").contains("n-missing"));
        let (s, body) = call(&ctl, "GET", "/nope", None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert_eq!(body["error"], "not_found");
    }
}
