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
use serde::Serialize;
use serde_json::{Value, json};

use super::error::ApiError;
use crate::Controller;
use crate::plan::catalog::{Cardinality, Catalog, ComponentDef, Minimum};
use crate::plan::validate::{ValidPlan, validate_plan};
use crate::plan::{DnsRecord, StoredPlan};

type Ctl = State<Arc<Controller>>;

pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/catalogs", get(list_catalogs))
        .route("/catalogs/{name}", get(get_catalog))
        .route("/plan", get(get_plan))
        .route("/plan/validate", post(validate))
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
    let valid = match validate_plan(
        body,
        &ctl.catalogs,
        &nodes,
        current.as_ref().map(|c| &c.plan),
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

async fn validate(State(ctl): Ctl, body: Bytes) -> Result<axum::Json<Value>, ApiError> {
    let a = submit(&ctl, body, false).await?;
    Ok(axum::Json(json!({
        "valid": true,
        "catalog": a.valid.catalog.name(),
        "order": a.valid.order,
        "nodes": a.valid.nodes,
        "dns": a.valid.dns,
        "message": a.message(),
        "plan": a.valid.plan.redacted(),
    })))
}

async fn get_plan(State(ctl): Ctl) -> Result<axum::Json<Value>, ApiError> {
    let cur = ctl.plans.current().ok_or_else(|| {
        ApiError::not_found(
            "no plan has been stored yet: POST one to /deployment-engine/config (POST /api/v1/plan/validate checks one without storing it)",
        )
    })?;
    let catalog = ctl.catalogs.get(&cur.plan.properties.catalog);
    let order: Option<Vec<&String>> = catalog.map(|c| {
        c.install_order()
            .iter()
            .filter(|n| {
                cur.plan
                    .components
                    .get(*n)
                    .is_some_and(|ips| !ips.is_empty())
            })
            .collect()
    });
    let dns = catalog.and_then(|c| DnsRecord::for_plan(&cur.plan, c));
    Ok(axum::Json(json!({
        "revision": cur.revision,
        "stored_at": cur.stored_at,
        "catalog": cur.plan.properties.catalog,
        "catalog_loaded": catalog.is_some(),
        "order": order,
        "dns": dns,
        "plan": cur.plan.redacted(),
    })))
}

#[derive(Serialize)]
struct ComponentSummary<'a> {
    name: &'a str,
    description: &'a str,
    cardinality: Cardinality,
    minimum: Minimum,
    after: &'a [String],
}

fn summary(c: &Catalog) -> Value {
    let components: Vec<ComponentSummary<'_>> = c
        .components()
        .map(|d: &ComponentDef| ComponentSummary {
            name: &d.name,
            description: &d.description,
            cardinality: d.cardinality,
            minimum: d.minimum,
            after: &d.after,
        })
        .collect();
    json!({
        "name": c.name(),
        "description": c.description(),
        "builtin": c.is_builtin(),
        "origin": c.origin(),
        "entry": c.entry(),
        "required": c.required(),
        "order": c.install_order(),
        "components": components,
    })
}

async fn list_catalogs(State(ctl): Ctl) -> axum::Json<Vec<Value>> {
    axum::Json(ctl.catalogs.iter().map(|c| summary(c)).collect())
}

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
    let mut v = summary(c);
    v["properties"] = json!(c.extra_properties());
    v["prepare"] = json!(c.prepare());
    v["components"] = json!(c.components().collect::<Vec<_>>());
    Ok(axum::Json(v))
}

/// 201 body of `POST /deployment-engine/config`.
pub(crate) fn created_body(a: &Accepted) -> Value {
    json!({
        "status": "created",
        "revision": a.stored.as_ref().map(|s| s.revision),
        "catalog": a.valid.catalog.name(),
        "order": a.valid.order,
        "nodes": a.valid.nodes.len(),
        "dns": a.valid.dns,
        "message": a.message(),
    })
}

/// `StatusCode::CREATED` with [`created_body`].
pub(crate) fn created(a: &Accepted) -> (StatusCode, axum::Json<Value>) {
    (StatusCode::CREATED, axum::Json(created_body(a)))
}
