//! The HTTP edge: the router (`app()`, so tests can drive it with
//! `oneshot`), token and role checks (`auth`, with the table of the role
//! each route needs), and one module per group of routes — `access`
//! (`/api/v1` tokens and audit log), `pki` (`/api/v1/pki`: the keys and
//! their rotation),
//! `native` (`/api/v1` codes, nodes, exec, steps, deployments), `plan`
//! (`/api/v1/catalogs`, `/api/v1/plan*`), `logs` (live log, downloads,
//! tails), `compat` and `operate` (the original `/deployment-engine`
//! routes), `console` (the web console at `/`), `join` (`/join.sh` and
//! `/packages/`, what a fresh node fetches), `metrics` (`/metrics`, and the
//! counting of every request), `tls` (HTTPS), `openapi`
//! (`/api/v1/openapi.json`, the OpenAPI document of all of them). `error` is the one error
//! layer every route answers through.
//!
//! Invariants: the HTTP layer uses the domain, never the reverse; every
//! error has one JSON shape (`{"error", "message"}`, plus `"problems"` when
//! a plan is invalid); a 2xx is sent only after the change it reports is
//! flushed to disk.

mod access;
mod artifacts;
mod auth;
pub(crate) mod compat;
mod console;
mod error;
mod join;
pub(crate) mod logs;
mod metrics;
mod native;
mod openapi;
pub(crate) mod operate;
mod pki;
mod plan;
pub mod tls;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use de_common::api::Health;

#[cfg(test)]
pub(crate) use auth::WS_TOKEN_PROTOCOL;
use auth::{require_token, require_token_or_query};
pub(crate) use error::{ApiError, ErrorCode};
pub use metrics::metrics_app;

use crate::Controller;

/// The whole HTTP router.
pub fn app(ctl: Arc<Controller>) -> Router {
    let v1 = native::routes()
        .merge(plan::routes())
        .merge(logs::native_routes())
        .merge(access::routes())
        .merge(artifacts::routes())
        .merge(pki::routes())
        .merge(openapi::routes())
        .route_layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            require_token,
        ));
    let original = compat::routes().route_layer(axum::middleware::from_fn_with_state(
        ctl.clone(),
        require_token_or_query,
    ));
    let scrape = metrics::routes().route_layer(axum::middleware::from_fn_with_state(
        ctl.clone(),
        require_token,
    ));
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/api/v1", v1)
        .nest("/deployment-engine", original)
        .merge(scrape)
        .merge(console::routes())
        .merge(join::routes())
        .fallback(not_found)
        .layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            metrics::track,
        ))
        .with_state(ctl)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is under /api/v1 and /deployment-engine")
}

#[utoipa::path(
    get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The controller is up.", body = Health))
)]
async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(healthz))]
pub(super) struct Doc;
