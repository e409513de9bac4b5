//! The original API's routes under `/deployment-engine` (port 50000), with the
//! original's field names and status codes: `GET/POST /config` and
//! `GET /hardware` (and, merged in, `/log` and `/download` from `log_api.rs`).
//!
//! The original clients send JSON with any Content-Type or none (`curl -X GET
//! -d '{...}'` sends a form type), so bodies are read as bytes and parsed
//! here, never through axum's `Json` extractor.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};

use de_common::api::{
    AuditAction, DeployStarted, HardwareRequest, HardwareRow, NodeView, PlanCreated,
};

use super::auth::audit;
use super::error::{ApiError, ErrorCode, parse_optional_json};
use super::plan::{created, submit};
use crate::Controller;
use crate::access::Caller;
use crate::plan::validate::NodeIndex;
use crate::plan::{NO_PLAN, StoredPlan};

type Ctl = State<Arc<Controller>>;

pub(crate) fn routes() -> Router<Arc<Controller>> {
    Router::new()
        .route("/config", get(get_config).post(post_config))
        // POST too: browsers' fetch() cannot send a body with GET.
        .route("/hardware", get(hardware).post(hardware))
        .route("/deploy", get(deploy))
        .merge(super::operate::routes())
        .merge(super::logs::compat_routes())
}

#[utoipa::path(
    get, path = "/deployment-engine/deploy", tag = "original",
    responses((status = 202, description = "The deployment that was started.", body = DeployStarted))
)]
async fn deploy(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
) -> Result<Response, ApiError> {
    let d = crate::deploy::Deployer::start(&ctl)?;
    audit(
        &ctl,
        &caller,
        AuditAction::Deploy,
        vec![d.id.to_string()],
        &format!("plan revision {}", d.plan_revision),
    )?;
    Ok((
        StatusCode::ACCEPTED,
        axum::Json(DeployStarted {
            id: d.id.into(),
            plan_revision: d.plan_revision,
            state: d.state,
            steps: d.steps.len(),
        }),
    )
        .into_response())
}

#[utoipa::path(
    get, path = "/deployment-engine/config", tag = "original",
    responses((status = 200, description = "The stored plan (secrets read `******`).", body = super::openapi::PlanDoc))
)]
async fn get_config(State(ctl): Ctl) -> Result<Response, ApiError> {
    let cur = ctl
        .plans
        .current()
        .ok_or_else(|| ApiError::not_found(NO_PLAN))?;
    Ok(axum::Json(cur.plan.redacted()).into_response())
}

#[utoipa::path(
    post, path = "/deployment-engine/config", tag = "original",
    request_body(content = super::openapi::PlanDoc, description = "The plan, as JSON (any Content-Type)."),
    responses((status = 201, description = "The plan is stored.", body = PlanCreated))
)]
async fn post_config(
    State(ctl): Ctl,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let accepted = submit(&ctl, body, true).await?;
    let revision = accepted.stored.as_ref().map_or(0, |p| p.revision);
    audit(
        &ctl,
        &caller,
        AuditAction::Plan,
        Vec::new(),
        &format!("revision {revision}"),
    )?;
    Ok(created(&accepted).into_response())
}

/// One row of the answer: CPU count, RAM in kB and DISK in MB, as the original.
fn row(comp: &str, ip: &str, node: &NodeView) -> HardwareRow {
    HardwareRow {
        comp: comp.to_owned(),
        ip: ip.to_owned(),
        cpu: node.hardware.cpus,
        ram_kb: node.hardware.ram_mb.saturating_mul(1024),
        disk_mb: node.hardware.disk_mb,
    }
}

fn lookup(
    nodes: &NodeIndex<'_>,
    plan: &StoredPlan,
    comp: &str,
    ip: &str,
) -> Result<HardwareRow, ApiError> {
    let node = nodes.find(ip).ok_or_else(|| {
        ApiError::new(
            ErrorCode::Conflict,
            format!(
                "the plan (revision {}) places {comp} on {ip}, but no enrolled node has that IP any more: enrol it again or submit a new plan",
                plan.revision
            ),
        )
    })?;
    Ok(row(comp, ip, node))
}

#[utoipa::path(
    method(get, post), path = "/deployment-engine/hardware", tag = "original",
    request_body(content = Option<HardwareRequest>, description = "One instance, or `all` / `0.0.0.0` (or no body) for every instance."),
    responses((status = 200, description = "One row, or every instance's row.", body = super::openapi::HardwareAnswer))
)]
async fn hardware(State(ctl): Ctl, body: Bytes) -> Result<Response, ApiError> {
    let plan = ctl.plans.current().ok_or_else(ApiError::no_plan)?;
    hardware_answer(&plan, &ctl.nodes.list(), &body)
}

/// The answer to `GET /deployment-engine/hardware` with `body`: every
/// instance's row for `all` / `0.0.0.0` (or no body), else the row of the
/// one instance named, which must be in `plan`.
pub(crate) fn hardware_answer(
    plan: &StoredPlan,
    nodes: &[NodeView],
    body: &[u8],
) -> Result<Response, ApiError> {
    let req: HardwareRequest = parse_optional_json(
        body,
        r#"{"Comp": "<component>", "Ip": "<node IP>"} (or {"Comp": "all", "Ip": "0.0.0.0"}, or no body)"#,
    )?
    .unwrap_or_else(|| HardwareRequest {
        comp: "all".into(),
        ip: "0.0.0.0".into(),
    });
    let comp = req.comp.trim();
    let ip = req.ip.trim();
    let nodes = &NodeIndex::new(nodes);
    if comp == "all" && ip == "0.0.0.0" {
        let rows = plan
            .plan
            .instances()
            .map(|(c, i)| lookup(nodes, plan, c, i))
            .collect::<Result<Vec<_>, _>>()?;
        return Ok(axum::Json(rows).into_response());
    }
    let canonical = ip
        .parse::<std::net::IpAddr>()
        .map(|a| a.to_string())
        .unwrap_or_else(|_| ip.to_owned());
    let placed = plan
        .plan
        .components
        .get(comp)
        .is_some_and(|ips| ips.contains(&canonical));
    if !placed {
        let on = plan.plan.components_on(&canonical);
        let hint = if on.is_empty() {
            format!("the plan has no node {canonical}")
        } else {
            format!("{canonical} runs {}", on.join(", "))
        };
        return Err(ApiError::bad_request(format!(
            "component {comp:?} and IP {ip:?} do not match the plan: {hint} (GET /deployment-engine/config shows the plan)"
        )));
    }
    Ok(axum::Json(lookup(nodes, plan, comp, &canonical)?).into_response())
}

/// This module's routes in the OpenAPI document (`openapi.rs` merges them).
#[derive(utoipa::OpenApi)]
#[openapi(paths(deploy, get_config, post_config, hardware))]
pub(super) struct Doc;

#[cfg(test)]
mod tests {
    use axum::http::StatusCode;
    use serde_json::{Value, json};

    use crate::testkit::{call, controller, enrol, seed_json};

    fn three_nodes(ctl: &crate::Controller) {
        for i in 1..=3 {
            enrol(
                ctl,
                &format!("n-{i}"),
                &format!("10.0.0.{i}"),
                4,
                16384,
                100_000,
            );
        }
    }

    #[tokio::test]
    async fn before_any_plan_config_is_404_and_hardware_is_403() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/deployment-engine/config", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("no plan"),
            "{body}"
        );
        let (s, body) = call(
            &ctl,
            "GET",
            "/deployment-engine/hardware",
            Some(&t),
            None,
            r#"{"Comp":"all","Ip":"0.0.0.0"}"#,
        )
        .await;
        assert_eq!(s, StatusCode::FORBIDDEN, "{body}");
        let (s, _) = call(&ctl, "GET", "/api/v1/plan", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[tokio::test]
    async fn the_original_routes_need_the_token_as_header_or_query() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let (s, body) = call(&ctl, "GET", "/deployment-engine/config", None, None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("?token="),
            "{body}"
        );
        let uri = format!("/deployment-engine/config?token={t}");
        let (s, _) = call(&ctl, "GET", &uri, None, None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND, "authorized, and no plan yet");
        let (s, _) = call(
            &ctl,
            "GET",
            "/deployment-engine/config?token=nope",
            None,
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        // The native API takes the header only.
        let uri = format!("/api/v1/plan?token={t}");
        let (s, _) = call(&ctl, "GET", &uri, None, None, "").await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn a_plan_is_stored_read_back_redacted_and_round_trips() {
        let (dir, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        three_nodes(&ctl);
        // As curl -d sends it: a form content type.
        let (s, body) = call(
            &ctl,
            "POST",
            "/deployment-engine/config",
            Some(&t),
            Some("application/x-www-form-urlencoded"),
            &seed_json(),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["revision"], 1);
        assert_eq!(body["dns"]["name"], "*.cf.local");
        assert_eq!(body["dns"]["value"], "10.0.0.1");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("*.cf.local"),
            "{body}"
        );

        let (s, got) = call(&ctl, "GET", "/deployment-engine/config", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(got["properties"]["password"], "******");
        assert_eq!(got["properties"]["root"], "******");
        assert_eq!(got["properties"]["disksize"], 15);
        assert_eq!(got["components"]["nats"], json!(["10.0.0.2", "10.0.0.3"]));

        // What GET gave, posted back (no Content-Type at all), keeps the secrets.
        let (s, body) = call(
            &ctl,
            "POST",
            "/deployment-engine/config",
            Some(&t),
            None,
            &got.to_string(),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED, "{body}");
        assert_eq!(body["revision"], 2);
        let cur = ctl.plans.current().expect("stored");
        let p = &cur.plan.properties;
        assert_eq!(
            p.password.as_ref().map(crate::plan::Secret::expose),
            Some("password")
        );
        assert_eq!(
            p.root.as_ref().map(crate::plan::Secret::expose),
            Some("123456")
        );

        let (s, native) = call(&ctl, "GET", "/api/v1/plan", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(native["revision"], 2);
        assert_eq!(native["plan"]["properties"]["password"], "******");
        assert_eq!(native["order"].as_array().map(Vec::len), Some(14));

        let log = std::fs::read_to_string(dir.path().join("logs/local.log")).expect("local.log");
        assert_eq!(
            log.lines().filter(|l| l.contains("plan stored")).count(),
            2,
            "{log}"
        );
        assert!(log.contains("*.cf.local A 10.0.0.1"), "{log}");
        assert!(
            !log.contains("123456") && !log.contains(":password"),
            "{log}"
        );
    }

    #[tokio::test]
    async fn an_invalid_plan_is_400_with_every_problem_and_nothing_stored() {
        let (dir, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        let mut plan: Value = serde_json::from_str(&seed_json()).expect("seed");
        plan["components"]["web"] = json!(["10.0.0.1"]);
        let (s, body) = call(
            &ctl,
            "POST",
            "/deployment-engine/config",
            Some(&t),
            Some("application/json"),
            &plan.to_string(),
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_plan");
        let problems = body["problems"].as_array().cloned().unwrap_or_default();
        assert!(
            problems
                .iter()
                .any(|p| p["kind"] == "unknown_component" && p["component"] == "web"),
            "{body}"
        );
        // No node is enrolled: every IP is named.
        for ip in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            assert!(
                problems
                    .iter()
                    .any(|p| p["kind"] == "unknown_node" && p["ip"] == ip),
                "{ip}: {body}"
            );
        }
        for p in &problems {
            for field in [
                "kind",
                "component",
                "ip",
                "property",
                "problem",
                "found",
                "needed",
            ] {
                assert!(p.get(field).is_some(), "{field} in {p}");
            }
        }
        assert!(ctl.plans.current().is_none());
        let (s, body) = call(
            &ctl,
            "POST",
            "/deployment-engine/config",
            Some(&t),
            None,
            "{\"components\":",
        )
        .await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["problems"][0]["kind"], "malformed_json");
        let log = std::fs::read_to_string(dir.path().join("logs/local.log")).expect("local.log");
        assert_eq!(
            log.lines().filter(|l| l.contains("plan rejected")).count(),
            2,
            "{log}"
        );
    }

    #[tokio::test]
    async fn hardware_answers_one_all_and_refuses_a_mismatch() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        three_nodes(&ctl);
        let (s, _) = call(
            &ctl,
            "POST",
            "/deployment-engine/config",
            Some(&t),
            None,
            &seed_json(),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        let hw = |body: &'static str| {
            let ctl = ctl.clone();
            let t = t.clone();
            async move {
                call(
                    &ctl,
                    "GET",
                    "/deployment-engine/hardware",
                    Some(&t),
                    None,
                    body,
                )
                .await
            }
        };
        let (s, one) = hw(r#"{"Comp":"nats","Ip":"10.0.0.3"}"#).await;
        assert_eq!(s, StatusCode::OK, "{one}");
        assert_eq!(
            one,
            json!({"Comp": "nats", "IP": "10.0.0.3", "CPU": 4, "RAM": 16384 * 1024, "DISK": 100_000})
        );
        let (s, all) = hw(r#"{ "Comp":"all","Ip":"0.0.0.0"}"#).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(
            all.as_array().map(Vec::len),
            Some(19),
            "one row per component instance"
        );
        let (s, body) = hw(r#"{"Comp":"nats","Ip":"10.0.0.1"}"#).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("do not match"),
            "{body}"
        );
        let (s, _) = hw(r#"{"Comp":"nats"}"#).await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        let (s, _) = call(
            &ctl,
            "POST",
            "/deployment-engine/hardware",
            Some(&t),
            None,
            r#"{"Comp":"dea","Ip":"10.0.0.1"}"#,
        )
        .await;
        assert_eq!(
            s,
            StatusCode::OK,
            "POST works for clients that cannot send a GET body"
        );
    }

    #[tokio::test]
    async fn validate_stores_nothing_and_catalogs_are_listed() {
        let (_d, ctl) = controller();
        let t = ctl.pki.token().to_owned();
        three_nodes(&ctl);
        let (s, body) = call(
            &ctl,
            "POST",
            "/api/v1/plan/validate",
            Some(&t),
            None,
            &seed_json(),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(body["valid"], true);
        assert_eq!(body["plan"]["properties"]["root"], "******");
        assert!(ctl.plans.current().is_none(), "a dry run stores nothing");
        let (s, body) = call(&ctl, "POST", "/api/v1/plan/validate", Some(&t), None, "{}").await;
        assert_eq!(s, StatusCode::BAD_REQUEST);
        assert_eq!(body["error"], "invalid_plan");

        let (s, list) = call(&ctl, "GET", "/api/v1/catalogs", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::OK);
        let names: Vec<&str> = list
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        assert_eq!(names, ["cf-v170", "debian-demo"]);
        let (s, demo) = call(
            &ctl,
            "GET",
            "/api/v1/catalogs/debian-demo",
            Some(&t),
            None,
            "",
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(demo["order"], json!(["nats", "nginx", "haproxy"]));
        assert!(demo["components"][0]["install"].is_array(), "{demo}");
        let (s, _) = call(&ctl, "GET", "/api/v1/catalogs/nope", Some(&t), None, "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }
}
