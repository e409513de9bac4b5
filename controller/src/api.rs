//! The HTTP API: `/healthz`, the native `/api/v1` routes, and (later) the
//! original `/deployment-engine` routes. `app()` builds the whole router so
//! tests can drive it with `oneshot`.
//!
//! Invariant: every error has one JSON shape (`{"error", "message"}`), and a
//! 2xx is sent only after the change it reports is flushed to disk.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::{Deserialize, Serialize};
use tracing::error;

use crate::Controller;
use crate::nodes::{NodeView, rfc3339};

/// The longest an install code may live.
pub const MAX_CODE_TTL_SECS: u64 = 7 * 24 * 3600;
/// The default install-code lifetime (the COS guide's hour).
pub const DEFAULT_CODE_TTL_SECS: u64 = 3600;

/// One error type for every route, rendered as `{"error": CODE, "message": TEXT}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    /// A server-side failure: the full chain is logged, the client gets a short text.
    pub fn internal(what: &str, err: &(dyn std::error::Error + 'static)) -> ApiError {
        let mut chain = err.to_string();
        let mut src = err.source();
        while let Some(s) = src {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            src = s.source();
        }
        error!(error = %chain, "{what}");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("{what}; see the controller's log"),
        )
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    message: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code,
            message: &self.message,
        };
        (self.status, axum::Json(body)).into_response()
    }
}

type Ctl = State<Arc<Controller>>;

/// The whole HTTP router.
pub fn app(ctl: Arc<Controller>) -> Router {
    let v1 = Router::new()
        .route(
            "/install-codes",
            get(get_code).post(post_code).delete(delete_code),
        )
        .route("/nodes", get(list_nodes))
        .route("/nodes/{id}", get(get_node).delete(delete_node))
        .route_layer(axum::middleware::from_fn_with_state(
            ctl.clone(),
            require_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .nest("/api/v1", v1)
        .fallback(not_found)
        .with_state(ctl)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; the API is under /api/v1 and /deployment-engine")
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn require_token(
    State(ctl): Ctl,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        Some(t) if constant_time_eq(t.as_bytes(), ctl.pki.token().as_bytes()) => {
            Ok(next.run(req).await)
        }
        Some(_) => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid: use the token in the controller's admin.token file",
        )),
        None => Err(ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing 'Authorization: Bearer <token>' header: the token is in the controller's admin.token file",
        )),
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CodeView {
    pub code: String,
    pub expires_at: String,
    /// The one line that joins a node with this code (`packaging/install-agent.sh ...`).
    pub agent_command: String,
}

impl CodeView {
    fn new(ctl: &Controller, issued: &de_install_codes::IssuedCode) -> CodeView {
        CodeView {
            code: issued.code.as_str().to_owned(),
            expires_at: rfc3339(issued.expires_at),
            agent_command: crate::agent_command(&ctl.agent_addr, issued.code.as_str()),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct NewCode {
    ttl_secs: Option<u64>,
}

async fn post_code(State(ctl): Ctl, body: Bytes) -> Result<Response, ApiError> {
    let req: NewCode = if body.iter().all(u8::is_ascii_whitespace) {
        NewCode::default()
    } else {
        serde_json::from_slice(&body).map_err(|e| {
            ApiError::bad_request(format!("body must be empty or {{\"ttl_secs\": N}}: {e}"))
        })?
    };
    let ttl = req.ttl_secs.unwrap_or(DEFAULT_CODE_TTL_SECS);
    if ttl == 0 || ttl > MAX_CODE_TTL_SECS {
        return Err(ApiError::bad_request(format!(
            "ttl_secs must be between 1 and {MAX_CODE_TTL_SECS} (7 days), got {ttl}"
        )));
    }
    let issued = ctl
        .codes
        .issue(Duration::from_secs(ttl))
        .map_err(|e| ApiError::internal("could not create the install code", &e))?;
    let view = CodeView::new(&ctl, &issued);
    Ok((StatusCode::CREATED, axum::Json(view)).into_response())
}

async fn get_code(State(ctl): Ctl) -> Result<axum::Json<CodeView>, ApiError> {
    let issued = ctl.codes.active().ok_or_else(|| {
        ApiError::not_found("no install code is active: create one with POST /api/v1/install-codes")
    })?;
    Ok(axum::Json(CodeView::new(&ctl, &issued)))
}

async fn delete_code(State(ctl): Ctl) -> Result<StatusCode, ApiError> {
    ctl.codes
        .end()
        .map_err(|e| ApiError::internal("could not end the installation", &e))?;
    Ok(StatusCode::NO_CONTENT)
}

async fn list_nodes(State(ctl): Ctl) -> axum::Json<Vec<NodeView>> {
    axum::Json(ctl.nodes.list())
}

async fn get_node(
    State(ctl): Ctl,
    Path(id): Path<String>,
) -> Result<axum::Json<NodeView>, ApiError> {
    ctl.nodes
        .get(&id)
        .map(axum::Json)
        .ok_or_else(|| ApiError::not_found(format!("no node {id:?}: GET /api/v1/nodes lists them")))
}

async fn delete_node(State(ctl): Ctl, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    match ctl.nodes.revoke(&id) {
        Ok(true) => Ok(StatusCode::NO_CONTENT),
        Ok(false) => Err(ApiError::not_found(format!(
            "no node {id:?}: GET /api/v1/nodes lists them"
        ))),
        Err(e) => Err(ApiError::internal("could not revoke the node", &e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
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
        let (ctl, _) = Controller::open(dir.path()).expect("reopen");
        let ctl = Arc::new(ctl);
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/api/v1/install-codes", Some(&t), "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, code);
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
