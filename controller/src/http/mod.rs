//! The HTTP edge: the router (`app()`, so tests can drive it with
//! `oneshot`), token checks, and one module per group of routes —
//! `native` (`/api/v1` codes, nodes, exec, steps, deployments), `plan`
//! (`/api/v1/catalogs`, `/api/v1/plan*`), `logs` (live log, downloads,
//! tails), `compat` and `operate` (the original `/deployment-engine`
//! routes), `console` (the web console at `/`). `error` is the one error
//! layer every route answers through.
//!
//! Invariants: the HTTP layer uses the domain, never the reverse; every
//! error has one JSON shape (`{"error", "message"}`, plus `"problems"` when
//! a plan is invalid); a 2xx is sent only after the change it reports is
//! flushed to disk.

mod compat;
mod console;
mod error;
mod logs;
mod native;
mod operate;
mod plan;

use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, header};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use de_common::api::Health;

pub(crate) use error::{ApiError, ErrorCode};

use crate::Controller;

type Ctl = State<Arc<Controller>>;

/// The whole HTTP router.
pub fn app(ctl: Arc<Controller>) -> Router {
    let v1 = native::routes()
        .merge(plan::routes())
        .merge(logs::native_routes())
        .route_layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            require_token,
        ));
    let original = compat::routes().route_layer(axum::middleware::from_fn_with_state(
        ctl.clone(),
        require_token_or_query,
    ));
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/api/v1", v1)
        .nest("/deployment-engine", original)
        .merge(console::routes())
        .fallback(not_found)
        .with_state(ctl)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is under /api/v1 and /deployment-engine")
}

async fn healthz() -> axum::Json<Health> {
    axum::Json(Health {
        status: "ok".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

async fn require_token(
    State(ctl): Ctl,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    check_token(&ctl, bearer(&headers), "header")?;
    Ok(next.run(req).await)
}

/// The WebSocket subprotocol prefix that carries the token: a browser cannot
/// set headers on a WebSocket but can offer subprotocols, so the console
/// offers `de.log` and `de.token.<token>` and the token stays out of the URL
/// (and so out of proxies' access logs and browser history).
pub(crate) const WS_TOKEN_PROTOCOL: &str = "de.token.";

fn token_in_ws_protocols(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix(WS_TOKEN_PROTOCOL))
        .map(str::to_owned)
}

/// The original routes also take the token as a WebSocket subprotocol
/// (`de.token.<token>`, for browsers) or as `?token=` (clients that can set
/// neither, scripts with a fixed URL).
async fn require_token_or_query(
    State(ctl): Ctl,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let from_query = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("token="))
            .map(str::to_owned)
    });
    let presented = bearer(&headers)
        .map(str::to_owned)
        .or_else(|| token_in_ws_protocols(&headers))
        .or(from_query);
    check_token(&ctl, presented.as_deref(), "header or ?token= parameter")?;
    Ok(next.run(req).await)
}

fn check_token(ctl: &Controller, presented: Option<&str>, how: &str) -> Result<(), ApiError> {
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), ctl.pki.token().as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "the bearer token is not valid: use the token in the controller's admin.token file",
        )),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "missing 'Authorization: Bearer <token>' {how}: the token is in the controller's admin.token file"
            ),
        )),
    }
}
