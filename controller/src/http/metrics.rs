//! `GET /metrics`: the Prometheus scrape, on the API behind any valid token
//! (read-only suffices), and on its own listener without one when the
//! operator gives `--metrics-listen` ([`metrics_app`]); and [`track`], the
//! middleware that counts every API request under its route template.

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::Controller;
use crate::metrics::{CONTENT_TYPE, render};

/// `/metrics`: mounted behind the token check on the API, alone and
/// without one on the metrics listener.
pub(super) fn routes() -> Router<Arc<Controller>> {
    Router::new().route("/metrics", get(metrics))
}

/// The router of the separate metrics listener: `/metrics` and nothing
/// else, no token (the scrape holds counts, versions and route templates,
/// never a token, an id or an address).
pub fn metrics_app(ctl: Arc<Controller>) -> Router {
    routes()
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "only /metrics here\n") })
        .with_state(ctl)
}

#[utoipa::path(
    get, path = "/metrics", tag = "metrics",
    responses((status = 200, description = "The Prometheus text exposition format (0.0.4); docs/METRICS.md lists every metric.", body = String, content_type = "text/plain; version=0.0.4; charset=utf-8"))
)]
async fn metrics(State(ctl): State<Arc<Controller>>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], render(&ctl)).into_response()
}

/// This module's route in the OpenAPI document (`openapi.rs` merges it).
#[derive(utoipa::OpenApi)]
#[openapi(paths(metrics))]
pub(super) struct Doc;

/// Counts each request under its method, the route the router matched
/// (its template, never the path asked) and the status answered, with the
/// time to the response head.
pub(super) async fn track(
    State(ctl): State<Arc<Controller>>,
    req: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    ctl.metrics.http.observe(
        &method,
        route.as_ref().map(MatchedPath::as_str),
        resp.status().as_u16(),
        started.elapsed(),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::StatusCode;
    use de_common::api::Role;
    use de_common::{Lane, NodeId, StepAction, StepEvent, StepEventKind, StepOutcome};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use super::*;
    use crate::http::app;

    const METRICS_MD: &str = include_str!("../../../docs/METRICS.md");

    fn controller() -> (tempfile::TempDir, Arc<Controller>, String) {
        let dir = tempfile::tempdir().expect("tempdir");
        let (ctl, _) = Controller::open(dir.path()).expect("open");
        let token = ctl
            .tokens
            .create("scraper", Role::ReadOnly, "admin")
            .expect("token")
            .token;
        (dir, Arc::new(ctl), token)
    }

    async fn get(router: Router, uri: &str, token: Option<&str>) -> (StatusCode, String, String) {
        let mut req = axum::http::Request::builder().uri(uri);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let resp = router
            .oneshot(req.body(Body::empty()).expect("request"))
            .await
            .expect("response");
        let status = resp.status();
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        let bytes = resp.into_body().collect().await.expect("body").to_bytes();
        (status, ctype, String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The value of the sample written exactly as `series` (name and labels).
    fn value(scrape: &str, series: &str) -> Option<f64> {
        scrape
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[tokio::test]
    async fn a_read_only_token_scrapes_and_no_or_a_wrong_token_is_refused() {
        let (_d, ctl, token) = controller();
        let (s, ctype, body) = get(app(ctl.clone()), "/metrics", Some(&token)).await;
        assert_eq!(s, StatusCode::OK, "{body}");
        assert_eq!(ctype, CONTENT_TYPE);
        assert_eq!(value(&body, "de_nodes{state=\"online\"}"), Some(0.0));
        assert_eq!(value(&body, "de_enrolments_total"), Some(0.0));
        let (s, _, _) = get(app(ctl.clone()), "/metrics", None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _, _) = get(app(ctl.clone()), "/metrics", Some("not-a-token")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _, body) = get(metrics_app(ctl.clone()), "/metrics", None).await;
        assert_eq!(s, StatusCode::OK);
        assert!(body.contains("# TYPE de_nodes gauge"), "{body}");
        let (s, _, _) = get(metrics_app(ctl), "/api/v1/nodes", None).await;
        assert_eq!(
            s,
            StatusCode::NOT_FOUND,
            "the metrics listener serves nothing else"
        );
    }

    #[tokio::test]
    async fn requests_are_counted_under_their_route_template_never_their_path() {
        let (_d, ctl, token) = controller();
        let (s, _, _) = get(app(ctl.clone()), "/api/v1/nodes/n-secret-id", Some(&token)).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (s, _, _) = get(app(ctl.clone()), "/api/v1/nodes", Some("wrong")).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        let (s, _, _) = get(app(ctl.clone()), "/no/such/path-xyz", None).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        let (_, _, body) = get(app(ctl.clone()), "/metrics", Some(&token)).await;
        assert_eq!(
            value(
                &body,
                "de_http_requests_total{method=\"GET\",route=\"/api/v1/nodes/{id}\",status=\"404\"}"
            ),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            value(
                &body,
                "de_http_requests_total{method=\"GET\",route=\"/api/v1/nodes\",status=\"401\"}"
            ),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            value(
                &body,
                "de_http_requests_total{method=\"GET\",route=\"unmatched\",status=\"404\"}"
            ),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            value(
                &body,
                "de_http_request_duration_seconds_count{method=\"GET\",route=\"/api/v1/nodes/{id}\"}"
            ),
            Some(1.0),
            "{body}"
        );
        assert!(
            !body.contains("n-secret-id") && !body.contains("path-xyz"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn steps_are_counted_by_lane_and_state_as_they_queue_run_and_end() {
        let (_d, ctl, token) = controller();
        let node = NodeId::from("n-1".to_owned());
        let action = StepAction::Script {
            script: "echo".into(),
            user: None,
            env: vec![],
            timeout_secs: 5,
        };
        let r = ctl
            .steps
            .enqueue(&node, Lane::Adhoc, action, None, Duration::from_secs(60))
            .expect("enqueue");
        let scrape = || async { get(app(ctl.clone()), "/metrics", Some(&token)).await.2 };
        let queued = "de_steps{lane=\"adhoc\",state=\"queued\"}";
        let running = "de_steps{lane=\"adhoc\",state=\"running\"}";
        let done = "de_steps_finished_total{lane=\"adhoc\",state=\"done\"}";
        let body = scrape().await;
        assert_eq!(
            (
                value(&body, queued),
                value(&body, running),
                value(&body, done)
            ),
            (Some(1.0), Some(0.0), Some(0.0)),
            "{body}"
        );
        let event = |kind| StepEvent {
            step_id: r.step.id.clone(),
            lane: Lane::Adhoc,
            seq: r.step.seq,
            kind,
        };
        ctl.steps
            .on_event(&node, event(StepEventKind::Started))
            .await
            .expect("started");
        let body = scrape().await;
        assert_eq!(
            (value(&body, queued), value(&body, running)),
            (Some(0.0), Some(1.0)),
            "{body}"
        );
        let outcome = StepOutcome {
            exit_code: Some(0),
            ..StepOutcome::default()
        };
        ctl.steps
            .on_event(&node, event(StepEventKind::Finished(outcome.clone())))
            .await
            .expect("finished");
        // The agent sends a result again after a reconnect: counted once.
        ctl.steps
            .on_event(&node, event(StepEventKind::Finished(outcome)))
            .await
            .expect("again");
        let body = scrape().await;
        assert_eq!(
            (
                value(&body, queued),
                value(&body, running),
                value(&body, done)
            ),
            (Some(0.0), Some(0.0), Some(1.0)),
            "{body}"
        );
        assert_eq!(
            value(&body, "de_step_duration_seconds_count{lane=\"adhoc\"}"),
            Some(1.0),
            "{body}"
        );
        assert_eq!(
            value(&body, "de_step_duration_seconds_count{lane=\"deploy\"}"),
            Some(0.0)
        );
        assert!(
            value(&body, "de_store_flush_duration_seconds_count").is_some_and(|n| n >= 3.0),
            "every durable write flushed: {body}"
        );
    }

    /// docs/METRICS.md names every family a scrape shows, and no other.
    #[tokio::test]
    async fn the_metrics_doc_lists_every_family() {
        let (_d, ctl, _) = controller();
        let body = render(&ctl);
        let families: Vec<&str> = body
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        assert!(families.len() >= 15, "{families:?}");
        for f in &families {
            assert!(
                METRICS_MD.contains(&format!("| `{f}` |")),
                "docs/METRICS.md has no row for {f}"
            );
        }
        let rows = METRICS_MD
            .lines()
            .filter(|l| l.starts_with("| `de_"))
            .count();
        assert_eq!(rows, families.len(), "{families:?}");
    }
}
