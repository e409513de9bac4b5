//! `GET /api/v1/openapi.json`: the OpenAPI 3.1 document of every route of
//! the router, generated from the code — each handler's `#[utoipa::path]`
//! (gathered per module in its `Doc`), the request and answer types of
//! `de_common::api` (their `ToSchema`, derived under de-common's `openapi`
//! feature), the role each route needs (from [`ROUTE_ROLES`]), the token
//! schemes and the one error shape ([`ErrorBody`]).
//!
//! Invariants: every route the router serves has an operation here and
//! every operation is a route (the tests walk the router as `auth`'s tests
//! do); every `$ref` resolves; the document is built once and served as is.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use de_common::api::{ErrorBody, HardwareRow, Role};
use serde_json::{Value, json};
use utoipa::OpenApi;

use super::auth::ROUTE_ROLES;
use crate::Controller;

pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// A plan document, as `POST /deployment-engine/config` takes it and the
/// plan routes show it (secrets read `******`). The controller validates it
/// against the loaded catalogs and the enrolled nodes; an invalid one is
/// answered 400 `invalid_plan` listing every problem.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[schema(example = json!({
    "components": {"nats": ["10.0.0.2"], "haproxy": ["10.0.0.1"]},
    "properties": {"catalog": "cf-v170", "domain": "cf.local", "password": "******"}
}))]
pub(crate) struct PlanDoc {
    /// Component name -> the IPs of the nodes it runs on.
    components: std::collections::BTreeMap<String, Vec<String>>,
    /// `catalog`, `domain`, the secrets and the catalog's own properties.
    #[schema(value_type = Object)]
    properties: Value,
    /// Per component, how its instances change (optional).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    rollout: Option<Value>,
}

/// `GET /deployment-engine/hardware`: one row for one instance, every
/// instance's row for `all` / `0.0.0.0`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[expect(
    dead_code,
    reason = "a schema only: the route builds its answer from the rows"
)]
pub(crate) enum HardwareAnswer {
    One(HardwareRow),
    All(Vec<HardwareRow>),
}

/// The document's frame: what it is, the error shape, the security schemes.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Deployment Engine controller API",
        description = "The native API under `/api/v1`, the original one under `/deployment-engine`, the health check, what a joining node fetches, and the web console. docs/API.md tells what each route does.",
        license(name = "Apache-2.0", identifier = "Apache-2.0")
    ),
    paths(openapi_json),
    components(schemas(ErrorBody))
)]
struct Frame;

/// This document.
#[utoipa::path(
    get, path = "/api/v1/openapi.json", tag = "api",
    responses((status = 200, description = "This document (OpenAPI 3.1).", body = Object))
)]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        document_json(),
    )
        .into_response()
}

/// The document, serialized once.
fn document_json() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| document().to_string())
}

/// The whole document as JSON.
pub(crate) fn document() -> Value {
    let mut doc = Frame::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    for part in [
        super::Doc::openapi(),
        super::native::Doc::openapi(),
        super::plan::Doc::openapi(),
        super::logs::Doc::openapi(),
        super::access::Doc::openapi(),
        super::artifacts::Doc::openapi(),
        super::pki::Doc::openapi(),
        super::compat::Doc::openapi(),
        super::operate::Doc::openapi(),
        super::join::Doc::openapi(),
        super::console::Doc::openapi(),
        super::metrics::Doc::openapi(),
    ] {
        doc.merge(part);
    }
    let mut doc = serde_json::to_value(doc).unwrap_or_default();
    doc["components"]["securitySchemes"] = json!({
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "`Authorization: Bearer <token>`: the token in the controller's admin.token file, or one made with POST /api/v1/tokens."
        },
        "query_token": {
            "type": "apiKey",
            "in": "query",
            "name": "token",
            "description": "The original `/deployment-engine` routes also take the token as `?token=` (and, for WebSockets, as the subprotocol `de.token.<token>`)."
        }
    });
    // `other` is what a client reads a code or action of a newer controller
    // as (`#[serde(other)]`); a controller never sends it.
    for name in ["ErrorCode", "AuditAction"] {
        if let Some(values) = doc["components"]["schemas"][name]["enum"].as_array_mut() {
            values.retain(|v| v != "other");
        }
    }
    let Some(paths) = doc["paths"].as_object_mut() else {
        return doc;
    };
    let mut ids = std::collections::BTreeSet::new();
    for (path, item) in paths.iter_mut() {
        let Some(item) = item.as_object_mut() else {
            continue;
        };
        for (method, op) in item.iter_mut() {
            decorate(path, &method.to_uppercase(), op);
            // One handler on two methods (`method(get, post)`) has one id: the second gets its method.
            let id = op["operationId"].as_str().unwrap_or_default().to_owned();
            if !ids.insert(id.clone()) {
                let unique = format!("{id}_{method}");
                ids.insert(unique.clone());
                op["operationId"] = Value::String(unique);
            }
        }
    }
    doc
}

/// The role `METHOD path` needs, `None` for a route without the token check.
fn role_of(method: &str, path: &str) -> Option<Role> {
    ROUTE_ROLES
        .iter()
        .find(|(m, p, _)| *m == method && *p == path)
        .map(|(_, _, r)| *r)
}

/// Adds to one operation what every route shares: its token scheme and
/// role, the 401 and 403 of the token check, and the error shape for every
/// other status.
fn decorate(path: &str, method: &str, op: &mut Value) {
    let error = |what: &str| {
        json!({
            "description": what,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
        })
    };
    op["responses"]["default"] = error(
        "Any error: `error` is a stable code (docs/API.md lists them with their statuses), `message` says what to do; `problems` lists what is wrong with an invalid plan.",
    );
    match role_of(method, path) {
        Some(role) => {
            let mut security = vec![json!({"bearer": []})];
            if path.starts_with("/deployment-engine/") {
                security.push(json!({"query_token": []}));
            }
            op["security"] = Value::Array(security);
            op["responses"]["401"] = error("`unauthorized`: no token, or not a valid one.");
            op["responses"]["403"] = error(&format!(
                "`forbidden`: the token's role is below `{role}` (or `no_plan` on the routes that need a stored plan)."
            ));
            let said = op["description"].as_str().unwrap_or_default().to_owned();
            let needs = format!("Needs a token with the `{role}` role (or a stronger one).");
            op["description"] = Value::String(if said.is_empty() {
                needs
            } else {
                format!("{said}\n\n{needs}")
            });
        }
        None => op["security"] = json!([]),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;
    use crate::http::auth::tests::{SOURCES, declared_routes};

    /// `(METHOD, path)` of every operation of the document.
    fn operations(doc: &Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for method in item.as_object().into_iter().flatten().map(|(m, _)| m) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    /// Every route of the router: the token-checked ones (`ROUTE_ROLES`,
    /// which `auth`'s test holds equal to the router) and the public ones
    /// the same walk of the route files finds, which are mounted at `/`.
    fn router_routes() -> BTreeSet<(String, String)> {
        let mut out: BTreeSet<(String, String)> = ROUTE_ROLES
            .iter()
            .map(|(m, p, _)| ((*m).to_owned(), (*p).to_owned()))
            .collect();
        for (_, src, public) in SOURCES {
            if *public {
                for (m, p) in declared_routes(src) {
                    out.insert((m.to_owned(), p));
                }
            }
        }
        out
    }

    #[test]
    fn the_document_has_every_route_of_the_router_and_no_other() {
        let doc = document();
        let documented = operations(&doc);
        let served = router_routes();
        assert!(
            served.contains(&("GET".to_owned(), "/api/v1/openapi.json".to_owned())),
            "the document's own route is in ROUTE_ROLES"
        );
        let missing: Vec<_> = served.difference(&documented).collect();
        assert!(missing.is_empty(), "routes the document lacks: {missing:?}");
        let extra: Vec<_> = documented.difference(&served).collect();
        assert!(extra.is_empty(), "paths the router lacks: {extra:?}");
    }

    /// Every `$ref` in `v`, with where it is.
    fn refs<'a>(v: &'a Value, at: String, out: &mut Vec<(String, &'a str)>) {
        match v {
            Value::Object(map) => {
                for (k, inner) in map {
                    if k == "$ref" {
                        if let Some(r) = inner.as_str() {
                            out.push((at.clone(), r));
                        }
                    } else {
                        refs(inner, format!("{at}/{k}"), out);
                    }
                }
            }
            Value::Array(items) => {
                for (i, inner) in items.iter().enumerate() {
                    refs(inner, format!("{at}/{i}"), out);
                }
            }
            _ => {}
        }
    }

    #[test]
    fn the_document_is_openapi_3_1_and_every_ref_resolves() {
        let text = document_json();
        let doc: Value = serde_json::from_str(text).expect("the document is JSON");
        let version = doc["openapi"].as_str().unwrap_or_default();
        assert!(version.starts_with("3.1"), "openapi is {version:?}");
        assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
        let mut found = Vec::new();
        refs(&doc, String::new(), &mut found);
        assert!(found.len() > 50, "{} refs", found.len());
        for (at, r) in found {
            let pointer = r
                .strip_prefix('#')
                .unwrap_or_else(|| panic!("{at}: {r} is not local"));
            assert!(
                doc.pointer(pointer).is_some(),
                "{at}: {r} resolves to nothing"
            );
        }
        // Each operation: a unique id, a declared parameter for each `{x}` of its path.
        let mut ids = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().into_iter().flatten() {
            for (method, op) in item.as_object().into_iter().flatten() {
                let id = op["operationId"].as_str().unwrap_or_default();
                assert!(
                    ids.insert(id.to_owned()),
                    "{method} {path}: operationId {id:?} twice"
                );
                for name in path.split('{').skip(1).filter_map(|s| s.split('}').next()) {
                    let declared =
                        op["parameters"].as_array().into_iter().flatten().any(|p| {
                            p["in"] == "path" && p["name"] == name && p["required"] == true
                        });
                    assert!(declared, "{method} {path}: no path parameter {name}");
                }
                assert!(op["responses"]["default"].is_object(), "{method} {path}");
            }
        }
    }

    /// Any valid token reads the document; none is 401.
    #[tokio::test]
    async fn a_read_only_token_gets_the_document_and_no_token_is_refused() {
        use axum::http::StatusCode;
        let (_d, ctl) = crate::testkit::controller();
        let t = ctl
            .tokens
            .create("reader", Role::ReadOnly, "admin")
            .expect("token")
            .token;
        let (s, body) =
            crate::testkit::call(&ctl, "GET", "/api/v1/openapi.json", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(body, document());
        let (s, body) =
            crate::testkit::call(&ctl, "GET", "/api/v1/openapi.json", None, None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"], "unauthorized");
    }

    /// The error shape is the one `ApiError` sends, with every code.
    #[test]
    fn the_error_shape_and_the_token_schemes_are_in_the_document() {
        let doc = document();
        let body = &doc["components"]["schemas"]["ErrorBody"];
        let required: Vec<&str> = body["required"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(required, ["error", "message"], "{body}");
        assert!(body["properties"]["problems"].is_object(), "{body}");
        let codes = &doc["components"]["schemas"]["ErrorCode"]["enum"];
        let all: Vec<Value> = de_common::api::ErrorCode::ALL
            .iter()
            .map(|c| serde_json::to_value(c).expect("json"))
            .collect();
        assert_eq!(codes, &json!(all), "exactly the codes the controller sends");
        let schemes = &doc["components"]["securitySchemes"];
        assert_eq!(schemes["bearer"]["scheme"], "bearer");
        assert_eq!(
            (
                &schemes["query_token"]["in"],
                &schemes["query_token"]["name"]
            ),
            (&json!("query"), &json!("token"))
        );
        let nodes = &doc["paths"]["/api/v1/nodes"]["get"];
        assert_eq!(nodes["security"], json!([{"bearer": []}]));
        assert!(
            nodes["description"]
                .as_str()
                .is_some_and(|d| d.contains("`read-only` role")),
            "{nodes}"
        );
        let deploy = &doc["paths"]["/deployment-engine/deploy"]["get"];
        assert_eq!(
            deploy["security"],
            json!([{"bearer": []}, {"query_token": []}])
        );
        assert_eq!(doc["paths"]["/healthz"]["get"]["security"], json!([]));
    }
}
