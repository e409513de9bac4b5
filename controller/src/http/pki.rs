//! The `/api/v1/pki` routes: the controller's keys as fingerprints (`GET`),
//! and their rotation (`POST /pki/rotate-step-key`, `/pki/rotate-ca`,
//! `/pki/retire-old-ca`; `admin`, audited).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use de_common::api::{AuditAction, PkiView, RetireCa};

use super::auth::audit;
use super::error::{ApiError, parse_optional_json};
use crate::Controller;
use crate::access::Caller;
use crate::agents::rotation;

type Ctl = State<Arc<Controller>>;

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/pki", get(show))
        .route("/pki/rotate-step-key", post(rotate_step_key))
        .route("/pki/rotate-ca", post(rotate_ca))
        .route("/pki/retire-old-ca", post(retire_old_ca))
}

#[utoipa::path(
    get, path = "/api/v1/pki", tag = "pki",
    responses((status = 200, description = "The controller's keys, as fingerprints.", body = PkiView))
)]
async fn show(State(ctl): Ctl) -> Json<PkiView> {
    Json(rotation::view(&ctl))
}

#[utoipa::path(
    post, path = "/api/v1/pki/rotate-step-key", tag = "pki",
    responses((status = 200, description = "The keys after the rotation.", body = PkiView))
)]
async fn rotate_step_key(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
) -> Result<Json<PkiView>, ApiError> {
    audit(
        &ctl,
        &caller,
        AuditAction::RotateStepKey,
        vec![],
        "new step key",
    )?;
    let view = rotation::rotate_step_key(&ctl)?;
    ctl.logs.record(&format!(
        "step key rotated: new key {}; the previous one signs only the steps queued before, until {}",
        view.step_key,
        view.previous_step_key_until.as_deref().unwrap_or("-")
    ));
    Ok(Json(view))
}

#[utoipa::path(
    post, path = "/api/v1/pki/rotate-ca", tag = "pki",
    responses((status = 200, description = "The keys after the rotation.", body = PkiView))
)]
async fn rotate_ca(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
) -> Result<Json<PkiView>, ApiError> {
    audit(&ctl, &caller, AuditAction::RotateCa, vec![], "new CA")?;
    let view = rotation::rotate_ca(&ctl)?;
    ctl.logs.record(&format!(
        "CA rotated: new CA {}; the old one stays trusted until it is retired (POST /api/v1/pki/retire-old-ca)",
        view.ca
    ));
    Ok(Json(view))
}

#[utoipa::path(
    post, path = "/api/v1/pki/retire-old-ca", tag = "pki",
    request_body(content = Option<RetireCa>, description = "Optional: force the retirement."),
    responses((status = 200, description = "The keys once the old CA is no longer trusted.", body = PkiView))
)]
async fn retire_old_ca(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Json<PkiView>, ApiError> {
    let req: RetireCa =
        parse_optional_json(&body, r#"no body, or {"force": true}"#)?.unwrap_or_default();
    audit(
        &ctl,
        &caller,
        AuditAction::RetireCa,
        vec![],
        if req.force { "forced" } else { "" },
    )?;
    let view = rotation::retire_old_ca(&ctl, req.force)?;
    ctl.logs
        .record(&format!("old CA retired: only CA {} is trusted", view.ca));
    Ok(Json(view))
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(show, rotate_step_key, rotate_ca, retire_old_ca))]
pub(super) struct Doc;
