//! Native plan and catalog routes under `/api/v1` (`GET /catalogs`,
//! `GET /catalogs/{name}`, `POST /plan/validate`, `GET /plan`), and the
//! submit path the original `POST /deployment-engine/config` shares.
//!
//! Invariant: a plan is stored only after it validated, and the answer (and
//! the `local.log` line) is written only after the store flushed it.

use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use de_common::api;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::Controller;
use crate::plan::catalog::{Cardinality, Catalog, ComponentDef};
use crate::plan::validate::{ValidPlan, validate_plan};
use crate::plan::{DnsRecord, Plan, StoredPlan};

type Ctl = State<Arc<Controller>>;

pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/catalogs", get(list_catalogs))
        .route("/catalogs/{name}", get(get_catalog))
        .route("/plan", get(get_plan))
        .route("/plan/validate", post(validate))
        .route("/plan/diff", get(diff))
}

/// What `GET /deployment-engine/deploy` would do now, per instance, with why
/// (compared with the last applied plan and with what the nodes report).
#[utoipa::path(
    get, path = "/api/v1/plan/diff", tag = "plans",
    responses((status = 200, description = "What a deployment would do now.", body = api::PlanDiff))
)]
async fn diff(State(ctl): Ctl) -> Result<axum::Json<de_common::api::PlanDiff>, ApiError> {
    Ok(axum::Json(crate::Deployer::diff(&ctl)?))
}

/// A plan that passed validation and, when asked, was stored.
pub(crate) struct Accepted {
    pub(crate) valid: ValidPlan,
    pub(crate) stored: Option<Arc<StoredPlan>>,
}

impl Accepted {
    /// What the operator must do next, in one sentence.
    pub(crate) fn message(&self) -> String {
        let what = match &self.stored {
            Some(s) => format!("plan stored as revision {}", s.revision),
            None => "the plan is valid (nothing was stored)".to_owned(),
        };
        match (&self.valid.dns, self.valid.catalog.entry()) {
            (Some(dns), _) => format!("{what}; {}", dns.instruction()),
            (None, Some(entry)) => {
                format!("{what}; it has no {entry}, so no DNS record is needed yet")
            }
            (None, None) => what,
        }
    }
}

/// Validates `body` (and stores the plan when `store`), off the async workers.
pub(crate) async fn submit(
    ctl: &Arc<Controller>,
    body: Bytes,
    store: bool,
) -> Result<Accepted, ApiError> {
    let ctl = ctl.clone();
    tokio::task::spawn_blocking(move || submit_blocking(&ctl, &body, store))
        .await
        .map_err(|e| ApiError::internal("plan validation stopped", &e))?
}

fn submit_blocking(ctl: &Controller, body: &[u8], store: bool) -> Result<Accepted, ApiError> {
    let current = ctl.plans.current();
    let nodes = ctl.nodes.list();
    let artifacts = ctl
        .artifacts
        .index()
        .map_err(|e| ApiError::internal("cannot list the artifacts", &e))?;
    let valid = match validate_plan(
        body,
        &ctl.catalogs,
        &nodes,
        current.as_ref().map(|c| &c.plan),
        &artifacts,
    ) {
        Ok(v) => v,
        Err(problems) => {
            if store {
                let first = problems
                    .first()
                    .map(|p| p.problem.as_str())
                    .unwrap_or_default();
                ctl.logs.record(&format!(
                    "plan rejected: {} problem(s), the first: {first}",
                    problems.len()
                ));
            }
            return Err(ApiError::invalid_plan(problems));
        }
    };
    let stored = if store {
        let s = ctl.plans.store(valid.plan.clone())?;
        Some(s)
    } else {
        None
    };
    let accepted = Accepted { valid, stored };
    if let Some(s) = &accepted.stored {
        let p = &accepted.valid;
        ctl.logs.record(&format!(
            "plan stored: revision {}, catalog {}, {} component(s) on {} node(s), domain {}; {}",
            s.revision,
            p.catalog.name(),
            p.order.len(),
            p.nodes.len(),
            p.plan.properties.domain,
            match &p.dns {
                Some(d) => d.instruction(),
                None => "no DNS record needed yet".to_owned(),
            }
        ));
    }
    Ok(accepted)
}

/// The DNS record as answers show it.
fn dns_view(d: &DnsRecord) -> api::DnsView {
    api::DnsView {
        component: d.component.clone(),
        name: d.name.clone(),
        kind: d.kind.to_owned(),
        value: d.value.clone(),
    }
}

/// A plan as answers show it: redacted, its keys sorted (as they always were).
fn plan_doc(plan: &Plan) -> Value {
    serde_json::to_value(plan.redacted()).unwrap_or_default()
}

#[utoipa::path(
    post, path = "/api/v1/plan/validate", tag = "plans",
    request_body = super::openapi::PlanDoc,
    responses((status = 200, description = "The plan is valid; nothing was stored.", body = api::PlanCheck<super::openapi::PlanDoc>))
)]
async fn validate(
    State(ctl): Ctl,
    body: Bytes,
) -> Result<axum::Json<api::PlanCheck<Value>>, ApiError> {
    let a = submit(&ctl, body, false).await?;
    Ok(axum::Json(api::PlanCheck {
        catalog: a.valid.catalog.name().to_owned(),
        dns: a.valid.dns.as_ref().map(dns_view),
        message: a.message(),
        nodes: a.valid.nodes.clone(),
        order: a.valid.order.clone(),
        plan: plan_doc(&a.valid.plan),
        valid: true,
    }))
}

#[utoipa::path(
    get, path = "/api/v1/plan", tag = "plans",
    responses((status = 200, description = "The stored plan (secrets read `******`).", body = api::StoredPlanView<super::openapi::PlanDoc>))
)]
async fn get_plan(State(ctl): Ctl) -> Result<axum::Json<api::StoredPlanView<Value>>, ApiError> {
    let cur = ctl.plans.current().ok_or_else(|| {
        ApiError::not_found(
            "no plan has been stored yet: POST one to /deployment-engine/config (POST /api/v1/plan/validate checks one without storing it)",
        )
    })?;
    let catalog = ctl.catalogs.get(&cur.plan.properties.catalog);
    let order: Option<Vec<String>> = catalog.map(|c| {
        c.install_order()
            .iter()
            .filter(|n| {
                cur.plan
                    .components
                    .get(*n)
                    .is_some_and(|ips| !ips.is_empty())
            })
            .cloned()
            .collect()
    });
    let dns = catalog.and_then(|c| DnsRecord::for_plan(&cur.plan, c));
    Ok(axum::Json(api::StoredPlanView {
        catalog: cur.plan.properties.catalog.clone(),
        catalog_loaded: catalog.is_some(),
        dns: dns.as_ref().map(dns_view),
        order,
        plan: plan_doc(&cur.plan),
        revision: cur.revision,
        stored_at: cur.stored_at.clone(),
    }))
}

fn summary(c: &Catalog) -> api::CatalogSummary {
    let components = c
        .components()
        .map(|d: &ComponentDef| api::ComponentSummary {
            after: d.after.clone(),
            cardinality: match d.cardinality {
                Cardinality::One => api::Cardinality::One,
                Cardinality::Many => api::Cardinality::Many,
            },
            description: d.description.clone(),
            minimum: api::Minimum {
                cpus: d.minimum.cpus,
                disk_mb: d.minimum.disk_mb,
                ram_mb: d.minimum.ram_mb,
            },
            name: d.name.clone(),
        })
        .collect();
    api::CatalogSummary {
        builtin: c.is_builtin(),
        components,
        description: c.description().to_owned(),
        entry: c.entry().map(str::to_owned),
        name: c.name().to_owned(),
        order: c.install_order().to_vec(),
        origin: c.origin().to_owned(),
        required: c.required().to_vec(),
    }
}

#[utoipa::path(
    get, path = "/api/v1/catalogs", tag = "plans",
    responses((status = 200, description = "Every loaded catalog.", body = Vec<api::CatalogSummary>))
)]
async fn list_catalogs(State(ctl): Ctl) -> axum::Json<Vec<api::CatalogSummary>> {
    axum::Json(ctl.catalogs.iter().map(|c| summary(c)).collect())
}

#[utoipa::path(
    get, path = "/api/v1/catalogs/{name}", tag = "plans",
    params(("name" = String, Path, description = "The catalog's name.")),
    responses((status = 200, description = "The catalog, with `properties`, `prepare` and each component's steps and templates.", body = api::CatalogSummary))
)]
async fn get_catalog(
    State(ctl): Ctl,
    Path(name): Path<String>,
) -> Result<axum::Json<Value>, ApiError> {
    let c = ctl.catalogs.get(&name).ok_or_else(|| {
        ApiError::not_found(format!(
            "no catalog {name:?}: GET /api/v1/catalogs lists them ({})",
            ctl.catalogs.names().join(", ")
        ))
    })?;
    let mut v = serde_json::to_value(summary(c)).unwrap_or_default();
    v["properties"] = json!(c.extra_properties());
    v["prepare"] = json!(c.prepare());
    v["components"] = json!(c.components().collect::<Vec<_>>());
    Ok(axum::Json(v))
}

/// 201 body of `POST /deployment-engine/config`.
pub(crate) fn created_body(a: &Accepted) -> api::PlanCreated {
    api::PlanCreated {
        catalog: a.valid.catalog.name().to_owned(),
        dns: a.valid.dns.as_ref().map(dns_view),
        message: a.message(),
        nodes: a.valid.nodes.len(),
        order: a.valid.order.clone(),
        revision: a.stored.as_ref().map(|s| s.revision),
        status: "created".to_owned(),
    }
}

/// `StatusCode::CREATED` with [`created_body`].
pub(crate) fn created(a: &Accepted) -> (StatusCode, axum::Json<api::PlanCreated>) {
    (StatusCode::CREATED, axum::Json(created_body(a)))
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(diff, validate, get_plan, list_catalogs, get_catalog))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::testkit::{controller, enrol, seed_json};

    /// The raw answer text of one request.
    async fn text(
        ctl: &std::sync::Arc<crate::Controller>,
        method: &str,
        uri: &str,
        body: &str,
    ) -> (StatusCode, String) {
        let req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("authorization", format!("Bearer {}", ctl.pki.token()))
            .body(axum::body::Body::from(body.to_owned()))
            .expect("request");
        let resp = crate::http::app(ctl.clone())
            .oneshot(req)
            .await
            .expect("response");
        let status = resp.status();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// These answers were `json!` objects, whose keys serde_json sorts: the
    /// typed answers must send the same bytes, so their keys are still
    /// sorted at every level.
    #[tokio::test]
    async fn plan_and_catalog_answers_keep_their_keys_sorted() {
        let (_d, ctl) = controller();
        for i in 1..=3 {
            enrol(
                &ctl,
                &format!("n-{i}"),
                &format!("10.0.0.{i}"),
                4,
                16384,
                100_000,
            );
        }
        let seed = seed_json();
        for (method, uri, body, want) in [
            (
                "POST",
                "/api/v1/plan/validate",
                seed.as_str(),
                StatusCode::OK,
            ),
            (
                "POST",
                "/deployment-engine/config",
                &seed,
                StatusCode::CREATED,
            ),
            ("GET", "/api/v1/plan", "", StatusCode::OK),
            ("GET", "/api/v1/catalogs", "", StatusCode::OK),
            ("GET", "/api/v1/catalogs/cf-v170", "", StatusCode::OK),
            ("GET", "/healthz", "", StatusCode::OK),
        ] {
            let (status, text) = text(&ctl, method, uri, body).await;
            assert_eq!(status, want, "{method} {uri}: {text}");
            let value: serde_json::Value = serde_json::from_str(&text).expect("json");
            assert_eq!(
                text,
                serde_json::to_string(&value).expect("json"),
                "{method} {uri}"
            );
        }
    }
}
