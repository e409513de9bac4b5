//! The `/api/v1` routes that manage access: API tokens (`POST`/`GET
//! /tokens`, `DELETE /tokens/{name}`) and the audit log (`GET /audit`).
//! All need the `admin` role (see `auth::ROUTE_ROLES`).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Extension, Router};
use de_common::api::{AuditAction, AuditEntry, NewToken, TokenCreated, TokenView};
use serde::Deserialize;

use super::auth::audit;
use super::error::{ApiError, parse_json};
use crate::Controller;
use crate::access::{AUDIT_KEEP, Caller};

type Ctl = State<Arc<Controller>>;

/// How many audit entries `GET /audit` answers with unless `?limit=` says.
const DEFAULT_AUDIT_LIMIT: usize = 100;

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", delete(revoke_token))
        .route("/audit", get(list_audit))
}

/// 201 with the new token, shown this once.
#[utoipa::path(
    post, path = "/api/v1/tokens", tag = "access",
    request_body = NewToken,
    responses((status = 201, description = "The token, shown this once.", body = TokenCreated))
)]
async fn create_token(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let req: NewToken = parse_json(
        &body,
        r#"{"name": "<name>", "role": "read-only" | "operator" | "admin"}"#,
    )?;
    let created = ctl.tokens.create(&req.name, req.role, &caller.name)?;
    audit(
        &ctl,
        &caller,
        AuditAction::Token,
        vec![created.name.clone()],
        created.role.as_str(),
    )?;
    Ok((StatusCode::CREATED, axum::Json(created)).into_response())
}

#[utoipa::path(
    get, path = "/api/v1/tokens", tag = "access",
    responses((status = 200, description = "The tokens, never their secret.", body = Vec<TokenView>))
)]
async fn list_tokens(State(ctl): Ctl) -> axum::Json<Vec<TokenView>> {
    axum::Json(ctl.tokens.list())
}

/// 204 once the token is refused (401) from then on.
#[utoipa::path(
    delete, path = "/api/v1/tokens/{name}", tag = "access",
    params(("name" = String, Path, description = "The token's name.")),
    responses((status = 204, description = "The token is refused from now on."))
)]
async fn revoke_token(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    let gone = ctl.tokens.revoke(&name)?;
    audit(
        &ctl,
        &caller,
        AuditAction::RevokeToken,
        vec![gone.name],
        gone.role.as_str(),
    )?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    limit: Option<usize>,
}

/// The newest entries first, `?limit=N` of them (default 100).
#[utoipa::path(
    get, path = "/api/v1/audit", tag = "access",
    params(("limit" = Option<u64>, Query, minimum = 1, description = "How many entries, newest first (100 when absent).")),
    responses((status = 200, description = "The newest entries first.", body = Vec<AuditEntry>))
)]
async fn list_audit(
    State(ctl): Ctl,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<axum::Json<Vec<AuditEntry>>, ApiError> {
    let Query(q) = query.map_err(|e| {
        ApiError::bad_request(format!(
            "{}; expected ?limit=N (1 to {AUDIT_KEEP})",
            e.body_text()
        ))
    })?;
    let limit = q.limit.unwrap_or(DEFAULT_AUDIT_LIMIT);
    if limit == 0 || limit as u64 > AUDIT_KEEP {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {AUDIT_KEEP}, got {limit}"
        )));
    }
    Ok(axum::Json(ctl.audit.newest(limit)?))
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(create_token, list_tokens, revoke_token, list_audit))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::app;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    async fn call(
        ctl: &Arc<Controller>,
        method: &str,
        uri: &str,
        token: &str,
        body: &str,
    ) -> (StatusCode, serde_json::Value) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {token}"))
            .body(Body::from(body.to_owned()))
            .expect("request");
        let resp = app(ctl.clone()).oneshot(req).await.expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    #[tokio::test]
    async fn a_token_is_shown_once_listed_without_it_revoked_and_audited() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctl, _) = Controller::open(dir.path()).expect("open");
        let ctl = Arc::new(ctl);
        let admin = ctl.pki.token().to_owned();
        let (s, made) = call(
            &ctl,
            "POST",
            "/api/v1/tokens",
            &admin,
            r#"{"name": "ci", "role": "operator"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{made}");
        assert_eq!(
            (&made["name"], &made["role"]),
            (&"ci".into(), &"operator".into())
        );
        let ci = made["token"].as_str().expect("token").to_owned();
        let (s, again) = call(
            &ctl,
            "POST",
            "/api/v1/tokens",
            &admin,
            r#"{"name": "ci", "role": "admin"}"#,
        )
        .await;
        assert_eq!(
            (s, &again["error"]),
            (StatusCode::CONFLICT, &"conflict".into())
        );
        let (s, bad) = call(
            &ctl,
            "POST",
            "/api/v1/tokens",
            &admin,
            r#"{"name": "x", "role": "root"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");

        let (s, list) = call(&ctl, "GET", "/api/v1/tokens", &admin, "").await;
        assert_eq!(s, StatusCode::OK);
        assert!(!list.to_string().contains(&ci), "{list}");
        assert!(!list.to_string().contains(&admin), "{list}");
        assert_eq!(list[1]["name"], "ci");
        assert_eq!(list[1]["created_by"], "admin");

        let (s, _) = call(&ctl, "GET", "/api/v1/nodes", &ci, "").await;
        assert_eq!(s, StatusCode::OK);
        let (s, body) = call(&ctl, "GET", "/api/v1/tokens", &ci, "").await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
        assert!(
            body["message"]
                .as_str()
                .is_some_and(|m| m.contains("needs the admin role")),
            "{body}"
        );

        let (s, _) = call(&ctl, "DELETE", "/api/v1/tokens/ci", &admin, "").await;
        assert_eq!(s, StatusCode::NO_CONTENT);
        let (s, body) = call(&ctl, "GET", "/api/v1/nodes", &ci, "").await;
        assert_eq!(
            (s, &body["error"]),
            (StatusCode::UNAUTHORIZED, &"unauthorized".into())
        );
        let (s, body) = call(&ctl, "DELETE", "/api/v1/tokens/admin", &admin, "").await;
        assert_eq!(s, StatusCode::CONFLICT, "the last admin: {body}");

        let (s, log) = call(&ctl, "GET", "/api/v1/audit", &admin, "").await;
        assert_eq!(s, StatusCode::OK);
        let seen: Vec<(&str, &str, &str)> = log
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| {
                (
                    e["token"].as_str().unwrap_or_default(),
                    e["action"].as_str().unwrap_or_default(),
                    e["targets"][0].as_str().unwrap_or_default(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [("admin", "revoke_token", "ci"), ("admin", "token", "ci")]
        );
        let (s, one) = call(&ctl, "GET", "/api/v1/audit?limit=1", &admin, "").await;
        assert_eq!((s, one.as_array().map(Vec::len)), (StatusCode::OK, Some(1)));
        for bad in ["limit=0", "limit=x", "since=1"] {
            let uri = format!("/api/v1/audit?{bad}");
            let (s, _) = call(&ctl, "GET", &uri, &admin, "").await;
            assert_eq!(s, StatusCode::BAD_REQUEST, "{bad}");
        }
        let local = std::fs::read_to_string(dir.path().join("logs/local.log")).expect("local.log");
        assert!(
            local.contains("audit: token \"admin\" asked token on [ci]: operator"),
            "{local}"
        );
        assert!(!local.contains(&ci) && !local.contains(&admin), "{local}");
    }
}
