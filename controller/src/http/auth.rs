//! Who may call what: the bearer-token check on every API route, the one
//! table of the role each route needs ([`ROUTE_ROLES`]), and [`audit`],
//! which records an action with the token that asked for it.
//!
//! Invariants: every route behind the token check has a row in
//! [`ROUTE_ROLES`] (a test walks the router), and a route without one needs
//! `admin`; a refused role is 403 `forbidden` naming the role needed; the
//! token is never logged, only its name.

use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, header};
use axum::middleware::Next;
use axum::response::Response;
use de_common::api::{AuditAction, Role};

use super::{ApiError, ErrorCode};
use crate::Controller;
use crate::access::Caller;

type Ctl = State<Arc<Controller>>;

/// The role each route needs: method, full path as the router declares it,
/// role. `docs/API.md` lists the same. HEAD is answered as GET.
pub(crate) const ROUTE_ROLES: &[(&str, &str, Role)] = &[
    // Install codes, node revocation, tokens, the audit log.
    ("GET", "/api/v1/install-codes", Role::Admin),
    ("POST", "/api/v1/install-codes", Role::Admin),
    ("DELETE", "/api/v1/install-codes", Role::Admin),
    ("DELETE", "/api/v1/nodes/{id}", Role::Admin),
    ("PUT", "/api/v1/nodes/{id}", Role::Admin),
    ("GET", "/api/v1/tokens", Role::Admin),
    ("POST", "/api/v1/tokens", Role::Admin),
    ("DELETE", "/api/v1/tokens/{name}", Role::Admin),
    ("GET", "/api/v1/audit", Role::Admin),
    // Artifacts: what fetch steps put on nodes, as root, is the operator's to change.
    ("POST", "/api/v1/artifacts", Role::Operator),
    ("DELETE", "/api/v1/artifacts/{name}", Role::Operator),
    ("GET", "/api/v1/artifacts", Role::ReadOnly),
    ("GET", "/api/v1/artifacts/{name}", Role::Operator),
    ("POST", "/api/v1/pki/rotate-step-key", Role::Admin),
    ("POST", "/api/v1/pki/rotate-ca", Role::Admin),
    ("POST", "/api/v1/pki/retire-old-ca", Role::Admin),
    // Acting on nodes: commands, steps, deployments, plans, monit.
    ("POST", "/api/v1/exec", Role::Operator),
    ("POST", "/api/v1/nodes/{id}/steps", Role::Operator),
    ("POST", "/api/v1/deployments/{id}/cancel", Role::Operator),
    ("POST", "/api/v1/deployments/{id}/pause", Role::Operator),
    ("POST", "/api/v1/deployments/{id}/resume", Role::Operator),
    ("POST", "/deployment-engine/config", Role::Operator),
    ("GET", "/deployment-engine/deploy", Role::Operator),
    ("PUT", "/deployment-engine/restart", Role::Operator),
    ("PUT", "/deployment-engine/stop", Role::Operator),
    ("PUT", "/deployment-engine/start", Role::Operator),
    // Reading.
    ("GET", "/api/v1/nodes", Role::ReadOnly),
    ("GET", "/api/v1/nodes/{id}", Role::ReadOnly),
    ("GET", "/api/v1/pki", Role::ReadOnly),
    ("GET", "/api/v1/steps/{id}", Role::ReadOnly),
    ("GET", "/api/v1/deployments", Role::ReadOnly),
    ("GET", "/api/v1/deployments/{id}", Role::ReadOnly),
    ("GET", "/api/v1/deployments/{id}/log", Role::ReadOnly),
    ("GET", "/api/v1/catalogs", Role::ReadOnly),
    ("GET", "/api/v1/catalogs/{name}", Role::ReadOnly),
    ("GET", "/api/v1/plan", Role::ReadOnly),
    ("POST", "/api/v1/plan/validate", Role::ReadOnly),
    ("GET", "/api/v1/plan/diff", Role::ReadOnly),
    ("GET", "/api/v1/logs", Role::ReadOnly),
    ("GET", "/api/v1/logs/{name}", Role::ReadOnly),
    ("GET", "/api/v1/openapi.json", Role::ReadOnly),
    ("GET", "/deployment-engine/config", Role::ReadOnly),
    ("GET", "/deployment-engine/hardware", Role::ReadOnly),
    ("POST", "/deployment-engine/hardware", Role::ReadOnly),
    ("GET", "/deployment-engine/status", Role::ReadOnly),
    ("GET", "/deployment-engine/log", Role::ReadOnly),
    ("GET", "/deployment-engine/download", Role::ReadOnly),
    ("PUT", "/deployment-engine/download", Role::ReadOnly),
    ("GET", "/metrics", Role::ReadOnly),
];

/// The role `method` on `path` (as the router declares it) needs; `admin`
/// for a route missing from the table.
pub(crate) fn needed_role(method: &Method, path: &str) -> Role {
    let method = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    ROUTE_ROLES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map_or(Role::Admin, |(_, _, r)| *r)
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// The `/api/v1` routes take the token in the `Authorization` header.
pub(super) async fn require_token(
    State(ctl): Ctl,
    headers: HeaderMap,
    req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let caller = check_token(&ctl, bearer(&headers), "header")?;
    admit(caller, req, next).await
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
pub(super) async fn require_token_or_query(
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
    let caller = check_token(&ctl, presented.as_deref(), "header or ?token= parameter")?;
    admit(caller, req, next).await
}

/// Lets `caller` through if its role allows the route, with the caller in
/// the request's extensions for the handler (and its audit entry).
async fn admit(caller: Caller, mut req: Request, next: Next) -> Result<Response, ApiError> {
    let path = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let needed = needed_role(req.method(), &path);
    if !caller.role.allows(needed) {
        return Err(ApiError::new(
            ErrorCode::Forbidden,
            format!(
                "{} {path} needs the {needed} role; the token {:?} has {}: ask an admin for a token with {needed} (POST /api/v1/tokens)",
                req.method(),
                caller.name,
                caller.role
            ),
        ));
    }
    req.extensions_mut().insert(caller);
    Ok(next.run(req).await)
}

fn check_token(ctl: &Controller, presented: Option<&str>, how: &str) -> Result<Caller, ApiError> {
    match presented {
        Some(t) => ctl.tokens.check(t).ok_or_else(|| {
            ApiError::new(
                ErrorCode::Unauthorized,
                "the bearer token is not valid: use the token in the controller's admin.token file, or one created with POST /api/v1/tokens (a revoked token is refused)",
            )
        }),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            format!(
                "missing 'Authorization: Bearer <token>' {how}: the token is in the controller's admin.token file"
            ),
        )),
    }
}

/// Records that `caller` asked for `action` on `targets` — in the audit log
/// (durable when this returns) and in `local.log` — before the action is
/// queued or answered.
pub(crate) fn audit(
    ctl: &Controller,
    caller: &Caller,
    action: AuditAction,
    targets: Vec<String>,
    detail: &str,
) -> Result<(), ApiError> {
    let e = ctl.audit.record(caller, action, targets, detail)?;
    let what = serde_json::to_value(e.action)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default();
    ctl.logs.record(&format!(
        "audit: token {:?} asked {what} on [{}]: {}",
        e.token,
        e.targets.join(", "),
        e.detail
    ));
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::http::app;
    use axum::body::Body;
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    const API_MD: &str = include_str!("../../../docs/API.md");

    /// Every file that declares routes, and whether its routes are public.
    pub(in crate::http) const SOURCES: &[(&str, &str, bool)] = &[
        ("mod.rs", include_str!("mod.rs"), true),
        ("console.rs", include_str!("console.rs"), true),
        ("native.rs", include_str!("native.rs"), false),
        ("plan.rs", include_str!("plan.rs"), false),
        ("logs.rs", include_str!("logs.rs"), false),
        ("compat.rs", include_str!("compat.rs"), false),
        ("operate.rs", include_str!("operate.rs"), false),
        ("access.rs", include_str!("access.rs"), false),
        ("pki.rs", include_str!("pki.rs"), false),
        ("artifacts.rs", include_str!("artifacts.rs"), false),
        ("join.rs", include_str!("join.rs"), true),
        ("metrics.rs", include_str!("metrics.rs"), false),
        ("openapi.rs", include_str!("openapi.rs"), false),
    ];

    /// `(METHOD, path)` of every `.route("path", get(..).post(..))` in `src`
    /// (its test module left out).
    pub(in crate::http) fn declared_routes(src: &str) -> Vec<(&'static str, String)> {
        let src = src
            .split("#[cfg(test)]\nmod tests")
            .next()
            .unwrap_or_default();
        let mut out = Vec::new();
        for (at, _) in src.match_indices(".route(") {
            let rest = &src[at + ".route(".len()..];
            let Some(path) = rest.split('"').nth(1) else {
                continue;
            };
            let mut depth = 1;
            let end = rest
                .char_indices()
                .find(|&(_, c)| {
                    match c {
                        '(' => depth += 1,
                        ')' => depth -= 1,
                        _ => {}
                    }
                    depth == 0
                })
                .map_or(rest.len(), |(i, _)| i);
            let call = &rest[..end];
            for (word, method) in [
                ("get(", "GET"),
                ("post(", "POST"),
                ("put(", "PUT"),
                ("delete(", "DELETE"),
                ("patch(", "PATCH"),
            ] {
                let used = call.match_indices(word).any(|(i, _)| {
                    !call[..i]
                        .chars()
                        .next_back()
                        .is_some_and(|c| c.is_alphanumeric() || c == '_')
                });
                if used {
                    out.push((method, path.to_owned()));
                }
            }
        }
        out
    }

    fn controller() -> (tempfile::TempDir, Arc<Controller>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctl, _) = Controller::open(dir.path()).expect("open");
        (dir, Arc::new(ctl))
    }

    async fn call(
        ctl: &Arc<Controller>,
        method: &str,
        uri: &str,
        token: Option<&str>,
    ) -> (StatusCode, serde_json::Value) {
        let mut req = axum::http::Request::builder().method(method).uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = app(ctl.clone())
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        )
    }

    fn concrete(path: &str) -> String {
        path.replace(['{', '}'], "")
    }

    /// Each route the router serves behind the token check is in
    /// [`ROUTE_ROLES`] under the path it is mounted at, and each row of the
    /// table is a route the router serves: a route added without a role
    /// fails here.
    #[tokio::test]
    async fn every_route_of_the_router_has_a_role_and_every_role_a_route() {
        let (_d, ctl) = controller();
        let mut protected = Vec::new();
        for (file, src, public) in SOURCES {
            let routes = declared_routes(src);
            assert!(!routes.is_empty(), "{file} declares no route");
            for (method, path) in routes {
                let mut mounted = Vec::new();
                for prefix in ["", "/api/v1", "/deployment-engine"] {
                    let full = format!("{prefix}{path}");
                    let (s, _) = call(&ctl, method, &concrete(&full), None).await;
                    if s == StatusCode::UNAUTHORIZED {
                        mounted.push(full);
                    }
                }
                if *public {
                    assert!(mounted.is_empty(), "{method} {path} in {file} asks a token");
                    continue;
                }
                assert!(
                    !mounted.is_empty(),
                    "{method} {path} in {file} is not behind the token check"
                );
                for full in mounted {
                    assert!(
                        ROUTE_ROLES
                            .iter()
                            .any(|(m, p, _)| *m == method && *p == full),
                        "{method} {full} ({file}) has no row in ROUTE_ROLES"
                    );
                    protected.push((method, full));
                }
            }
        }
        for (m, p, _) in ROUTE_ROLES {
            assert!(
                protected.iter().any(|(pm, pp)| pm == m && pp == p),
                "ROUTE_ROLES has {m} {p}, which the router does not serve"
            );
        }
        assert_eq!(protected.len(), ROUTE_ROLES.len(), "{protected:?}");
    }

    /// docs/API.md's role table has a row `| `METHOD PATH` | role |` for
    /// each route, with the role the code gives it, and no other.
    #[test]
    fn the_api_doc_lists_each_routes_role() {
        let rows: Vec<&str> = API_MD
            .lines()
            .filter(|l| {
                Role::ALL
                    .iter()
                    .any(|r| l.ends_with(&format!("| {} |", r.as_str())))
            })
            .collect();
        for (m, p, r) in ROUTE_ROLES {
            let row = format!("| `{m} {p}` | {r} |");
            assert!(rows.contains(&row.as_str()), "docs/API.md lacks {row}");
        }
        assert_eq!(rows.len(), ROUTE_ROLES.len(), "{rows:#?}");
    }

    #[test]
    fn a_route_missing_from_the_table_needs_admin() {
        assert_eq!(needed_role(&Method::GET, "/api/v1/nodes"), Role::ReadOnly);
        assert_eq!(needed_role(&Method::HEAD, "/api/v1/nodes"), Role::ReadOnly);
        assert_eq!(needed_role(&Method::POST, "/api/v1/exec"), Role::Operator);
        assert_eq!(needed_role(&Method::PATCH, "/api/v1/nodes"), Role::Admin);
        assert_eq!(needed_role(&Method::GET, "/api/v1/new-thing"), Role::Admin);
    }

    /// With a token of each role, every route either runs (any answer but
    /// `forbidden`) or is refused with 403 `forbidden` naming the role it needs.
    #[tokio::test]
    async fn each_role_reaches_exactly_the_routes_the_table_gives_it() {
        let (_d, ctl) = controller();
        let tokens: Vec<(Role, String)> = Role::ALL
            .into_iter()
            .map(|r| {
                let t = ctl
                    .tokens
                    .create(&format!("t-{r}"), r, "admin")
                    .expect("create");
                (r, t.token)
            })
            .collect();
        for (m, p, needed) in ROUTE_ROLES {
            for (role, token) in &tokens {
                let (s, body) = call(&ctl, m, &concrete(p), Some(token)).await;
                if role.allows(*needed) {
                    assert_ne!(body["error"], "forbidden", "{role} on {m} {p}: {body}");
                    assert_ne!(s, StatusCode::UNAUTHORIZED, "{role} on {m} {p}: {body}");
                } else {
                    assert_eq!(s, StatusCode::FORBIDDEN, "{role} on {m} {p}: {body}");
                    assert_eq!(body["error"], "forbidden");
                    let msg = body["message"].as_str().unwrap_or_default();
                    assert!(
                        msg.contains(&format!("needs the {needed} role"))
                            && msg.contains(&format!("t-{role}")),
                        "{msg}"
                    );
                }
            }
        }
    }
}
