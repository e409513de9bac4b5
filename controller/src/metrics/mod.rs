//! What `GET /metrics` shows, in the Prometheus text format: the counters
//! and histograms the controller's paths feed as things happen
//! ([`Metrics`], [`StepMetrics`]), and [`render`], which adds the gauges
//! taken from the in-memory state at scrape time (nodes by state, agent
//! versions, heartbeat ages, open steps) and writes the whole scrape.
//! `docs/METRICS.md` lists every metric.
//!
//! Invariants: a scrape reads memory only, never the store, so it never
//! blocks the runtime on disk; feeding a metric is a relaxed atomic add (the
//! HTTP routes' table takes one short lock); no label holds a per-node or
//! per-request value (routes are the router's templates, methods a fixed
//! set), so the number of series does not grow with the cluster.

mod text;

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use de_common::Lane;
use de_common::api::{DeployState, StepState};

pub(crate) use text::{CONTENT_TYPE, Counter, Histogram, Snapshot};
use text::{Kind, Text};

use crate::Controller;
use crate::agents::steps::StepRecord;

/// Bounds of the HTTP request latency histogram, seconds.
const HTTP_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Bounds of the store flush histogram, seconds.
pub(crate) const FLUSH_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Bounds of the step duration histogram (from started to finished), seconds.
const STEP_BOUNDS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
];
/// Bounds of the deployment duration histogram (from created to ended), seconds.
const DEPLOYMENT_BOUNDS: &[f64] = &[
    1.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0,
];
/// Bounds of the heartbeat age distribution of linked nodes, seconds.
const HEARTBEAT_BOUNDS: &[f64] = &[1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0];

/// The label of a request the router matched to no route.
const UNMATCHED: &str = "unmatched";

/// The controller's counters and histograms, fed where things happen.
#[derive(Debug)]
pub(crate) struct Metrics {
    /// Nodes enrolled with an install code since the controller started.
    pub(crate) enrolments: Counter,
    /// Install-code proofs that failed (a wrong code) since start.
    pub(crate) code_failures: Counter,
    /// Step records the step history removed since start.
    pub(crate) step_records_pruned: Counter,
    /// QUIC connections being handled now (agent links and enrolments).
    quic_open: Arc<AtomicI64>,
    pub(crate) http: HttpMetrics,
    pub(crate) deployments: DeploymentMetrics,
    /// How long each store flush took (shared with the store).
    pub(crate) store_flush: Arc<Histogram>,
}

impl Metrics {
    pub(crate) fn new(store_flush: Arc<Histogram>) -> Metrics {
        Metrics {
            enrolments: Counter::default(),
            code_failures: Counter::default(),
            step_records_pruned: Counter::default(),
            quic_open: Arc::default(),
            http: HttpMetrics::default(),
            deployments: DeploymentMetrics::default(),
            store_flush,
        }
    }

    /// Counts a QUIC connection as open until the guard is dropped.
    pub(crate) fn quic_open(&self) -> QuicOpen {
        self.quic_open.fetch_add(1, Ordering::Relaxed);
        QuicOpen(self.quic_open.clone())
    }
}

/// An open QUIC connection, counted in `de_quic_connections_open` while it lives.
#[derive(Debug)]
pub(crate) struct QuicOpen(Arc<AtomicI64>);

impl Drop for QuicOpen {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Steps that ended, per lane and final state, and how long the ones that
/// started ran; kept by the step queue.
#[derive(Debug)]
pub(crate) struct StepMetrics {
    /// `[lane][final state]`, in the orders of [`Lane::ALL`] and [`FINAL_STEP_STATES`].
    finished: [[Counter; 4]; 3],
    /// Per lane, from the agent's `Started` to the end.
    duration: [Histogram; 3],
}

const FINAL_STEP_STATES: [StepState; 4] = [
    StepState::Done,
    StepState::Failed,
    StepState::Refused,
    StepState::Cancelled,
];

fn lane_index(lane: Lane) -> usize {
    match lane {
        Lane::Deploy => 0,
        Lane::Adhoc => 1,
        Lane::Control => 2,
    }
}

fn step_state_name(s: StepState) -> &'static str {
    match s {
        StepState::Queued => "queued",
        StepState::Running => "running",
        StepState::Done => "done",
        StepState::Failed => "failed",
        StepState::Refused => "refused",
        StepState::Cancelled => "cancelled",
    }
}

impl Default for StepMetrics {
    fn default() -> Self {
        StepMetrics {
            finished: Default::default(),
            duration: [
                Histogram::new(STEP_BOUNDS),
                Histogram::new(STEP_BOUNDS),
                Histogram::new(STEP_BOUNDS),
            ],
        }
    }
}

impl StepMetrics {
    /// Step record `r` was written, having been in state `was` before: if
    /// that ended it, it is counted (and its run time, if it started).
    pub(crate) fn moved(&self, r: &StepRecord, was: StepState) {
        if was.is_final() || !r.state.is_final() {
            return;
        }
        let lane = lane_index(r.step.lane);
        if let Some(i) = FINAL_STEP_STATES.iter().position(|s| *s == r.state)
            && let Some(c) = self.finished.get(lane).and_then(|l| l.get(i))
        {
            c.inc();
        }
        if let (Some(start), Some(end)) = (&r.started_at, &r.finished_at)
            && let Some(d) = between(start, end)
            && let Some(h) = self.duration.get(lane)
        {
            h.observe(d);
        }
    }
}

/// The time from RFC 3339 timestamp `start` to `end` (None if either does
/// not parse or `end` is before `start`).
fn between(start: &str, end: &str) -> Option<Duration> {
    use time::format_description::well_known::Rfc3339;
    let s = time::OffsetDateTime::parse(start, &Rfc3339).ok()?;
    let e = time::OffsetDateTime::parse(end, &Rfc3339).ok()?;
    Duration::try_from(e - s).ok()
}

/// Deployments by state (counted from the store once at start, then kept
/// as they start and end) and how long the ended ones took.
#[derive(Debug)]
pub(crate) struct DeploymentMetrics {
    /// In the order of [`DEPLOY_STATES`].
    by_state: [AtomicI64; 4],
    /// Per ended state (succeeded, failed, cancelled).
    duration: [Histogram; 3],
}

const DEPLOY_STATES: [DeployState; 4] = [
    DeployState::Running,
    DeployState::Succeeded,
    DeployState::Failed,
    DeployState::Cancelled,
];

fn deploy_state_name(s: DeployState) -> &'static str {
    match s {
        DeployState::Running => "running",
        DeployState::Succeeded => "succeeded",
        DeployState::Failed => "failed",
        DeployState::Cancelled => "cancelled",
    }
}

fn deploy_index(s: DeployState) -> usize {
    match s {
        DeployState::Running => 0,
        DeployState::Succeeded => 1,
        DeployState::Failed => 2,
        DeployState::Cancelled => 3,
    }
}

impl Default for DeploymentMetrics {
    fn default() -> Self {
        DeploymentMetrics {
            by_state: Default::default(),
            duration: [
                Histogram::new(DEPLOYMENT_BOUNDS),
                Histogram::new(DEPLOYMENT_BOUNDS),
                Histogram::new(DEPLOYMENT_BOUNDS),
            ],
        }
    }
}

impl DeploymentMetrics {
    /// A deployment found in the store at start, in `state`.
    pub(crate) fn loaded(&self, state: DeployState) {
        self.by_state[deploy_index(state)].fetch_add(1, Ordering::Relaxed);
    }

    /// A new deployment was saved, running.
    pub(crate) fn started(&self) {
        self.loaded(DeployState::Running);
    }

    /// A running deployment was saved in `state`, created at `created_at`
    /// and ended at `finished_at` (RFC 3339); running is not an end.
    pub(crate) fn ended(&self, state: DeployState, created_at: &str, finished_at: Option<&str>) {
        if state == DeployState::Running {
            return;
        }
        self.by_state[deploy_index(DeployState::Running)].fetch_sub(1, Ordering::Relaxed);
        self.by_state[deploy_index(state)].fetch_add(1, Ordering::Relaxed);
        if let Some(d) = finished_at.and_then(|f| between(created_at, f))
            && let Some(h) = self.duration.get(deploy_index(state) - 1)
        {
            h.observe(d);
        }
    }
}

/// Requests per route template, method and status, with their latency.
#[derive(Debug, Default)]
pub(crate) struct HttpMetrics {
    /// Route template -> per method.
    routes: Mutex<HashMap<String, Vec<MethodStats>>>,
}

#[derive(Debug)]
struct MethodStats {
    method: &'static str,
    /// Status -> requests answered with it.
    statuses: Vec<(u16, u64)>,
    latency: Histogram,
}

/// The methods counted by name; any other is `other` (a label must not take
/// whatever a client sends).
fn method_label(m: &axum::http::Method) -> &'static str {
    ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
        .into_iter()
        .find(|k| *k == m.as_str())
        .unwrap_or("other")
}

impl HttpMetrics {
    /// One request to `route` (the router's template; None: no route
    /// matched) answered with `status` after `took`.
    pub(crate) fn observe(
        &self,
        method: &axum::http::Method,
        route: Option<&str>,
        status: u16,
        took: Duration,
    ) {
        let method = method_label(method);
        let route = route.unwrap_or(UNMATCHED);
        let mut routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if !routes.contains_key(route) {
            routes.insert(route.to_owned(), Vec::new());
        }
        let Some(methods) = routes.get_mut(route) else {
            return;
        };
        let i = match methods.iter().position(|m| m.method == method) {
            Some(i) => i,
            None => {
                methods.push(MethodStats {
                    method,
                    statuses: Vec::new(),
                    latency: Histogram::new(HTTP_BOUNDS),
                });
                methods.len() - 1
            }
        };
        let m = &mut methods[i];
        match m.statuses.iter_mut().find(|(s, _)| *s == status) {
            Some((_, n)) => *n += 1,
            None => m.statuses.push((status, 1)),
        }
        m.latency.observe(took);
    }

    /// Every route and method asked, sorted.
    fn snapshot(&self) -> Vec<RouteSnapshot> {
        let routes = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = routes
            .iter()
            .flat_map(|(route, methods)| {
                methods.iter().map(move |m| {
                    let mut statuses = m.statuses.clone();
                    statuses.sort_unstable();
                    RouteSnapshot {
                        route: route.clone(),
                        method: m.method,
                        statuses,
                        latency: m.latency.snapshot(),
                    }
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.route, a.method).cmp(&(&b.route, b.method)));
        out
    }
}

/// One route and method's requests at scrape time.
#[derive(Debug)]
struct RouteSnapshot {
    route: String,
    method: &'static str,
    /// Status -> requests, by status.
    statuses: Vec<(u16, u64)>,
    latency: Snapshot,
}

/// The whole scrape of `ctl`, from memory only.
pub(crate) fn render(ctl: &Controller) -> String {
    let now = SystemTime::now();
    let m = &ctl.metrics;
    let mut t = Text::default();

    t.family(
        "de_build_info",
        Kind::Gauge,
        "The controller's version (always 1).",
    );
    t.sample(
        "de_build_info",
        &[("version", env!("CARGO_PKG_VERSION"))],
        1u32,
    );

    let census = ctl.nodes.census(now);
    t.family(
        "de_nodes",
        Kind::Gauge,
        "Enrolled nodes by state: online (linked and heard from within 3 heartbeats), offline, revoked.",
    );
    for (state, n) in [
        ("online", census.online),
        ("offline", census.offline),
        ("revoked", census.revoked),
    ] {
        t.sample("de_nodes", &[("state", state)], n as f64);
    }
    t.family(
        "de_agent_versions",
        Kind::Gauge,
        "Nodes not revoked by the agent version they last reported.",
    );
    for (version, n) in &census.versions {
        t.sample("de_agent_versions", &[("version", version)], *n as f64);
    }
    let mut ages = Snapshot::empty(HEARTBEAT_BOUNDS);
    let mut max_age = 0f64;
    for age in &census.heartbeat_ages {
        let secs = age.as_secs_f64();
        ages.add(secs);
        max_age = max_age.max(secs);
    }
    t.family(
        "de_node_heartbeat_age_seconds",
        Kind::Histogram,
        "Time since the last heartbeat of each linked node, taken at scrape time (a snapshot: read it with histogram_quantile directly, not with rate).",
    );
    t.histogram("de_node_heartbeat_age_seconds", &[], &ages);
    t.family(
        "de_node_heartbeat_age_max_seconds",
        Kind::Gauge,
        "The longest time since the last heartbeat among linked nodes (0 when none is linked).",
    );
    t.sample("de_node_heartbeat_age_max_seconds", &[], max_age);

    t.family(
        "de_steps",
        Kind::Gauge,
        "Steps not ended yet by lane and state (queued or running).",
    );
    for (lane, queued, running) in ctl.steps.open_counts() {
        t.sample(
            "de_steps",
            &[("lane", lane.as_str()), ("state", "queued")],
            queued as f64,
        );
        t.sample(
            "de_steps",
            &[("lane", lane.as_str()), ("state", "running")],
            running as f64,
        );
    }
    let steps = &ctl.steps.metrics;
    t.family(
        "de_steps_finished_total",
        Kind::Counter,
        "Steps that ended since the controller started, by lane and final state (done, failed, refused, cancelled).",
    );
    for lane in Lane::ALL {
        for (i, state) in FINAL_STEP_STATES.iter().enumerate() {
            t.sample(
                "de_steps_finished_total",
                &[("lane", lane.as_str()), ("state", step_state_name(*state))],
                steps.finished[lane_index(lane)][i].get() as f64,
            );
        }
    }
    t.family(
        "de_step_duration_seconds",
        Kind::Histogram,
        "How long steps ran on their nodes, from the agent's start to the end, by lane.",
    );
    for lane in Lane::ALL {
        t.histogram(
            "de_step_duration_seconds",
            &[("lane", lane.as_str())],
            &steps.duration[lane_index(lane)].snapshot(),
        );
    }

    t.family(
        "de_deployments",
        Kind::Gauge,
        "Deployments in the store by state (running, succeeded, failed, cancelled).",
    );
    for state in DEPLOY_STATES {
        let n = m.deployments.by_state[deploy_index(state)].load(Ordering::Relaxed);
        t.sample(
            "de_deployments",
            &[("state", deploy_state_name(state))],
            n.max(0) as f64,
        );
    }
    t.family(
        "de_deployment_duration_seconds",
        Kind::Histogram,
        "How long deployments that ended since the controller started took, from created to ended, by how they ended.",
    );
    for state in &DEPLOY_STATES[1..] {
        t.histogram(
            "de_deployment_duration_seconds",
            &[("state", deploy_state_name(*state))],
            &m.deployments.duration[deploy_index(*state) - 1].snapshot(),
        );
    }

    t.family(
        "de_quic_connections_open",
        Kind::Gauge,
        "QUIC connections being handled now: agent links and enrolments.",
    );
    t.sample(
        "de_quic_connections_open",
        &[],
        m.quic_open.load(Ordering::Relaxed).max(0) as f64,
    );
    t.family(
        "de_enrolments_total",
        Kind::Counter,
        "Nodes enrolled with an install code since the controller started.",
    );
    t.sample("de_enrolments_total", &[], m.enrolments.get() as f64);
    t.family(
        "de_step_records_pruned_total",
        Kind::Counter,
        "Records of ended steps the step history removed since the controller started (step_history_days, step_history_per_lane).",
    );
    t.sample(
        "de_step_records_pruned_total",
        &[],
        m.step_records_pruned.get() as f64,
    );
    t.family(
        "de_install_code_failures_total",
        Kind::Counter,
        "Enrolments whose install-code proof failed (a wrong code) since the controller started.",
    );
    t.sample(
        "de_install_code_failures_total",
        &[],
        m.code_failures.get() as f64,
    );

    let http = m.http.snapshot();
    t.family(
        "de_http_requests_total",
        Kind::Counter,
        "API requests by method, route template (unmatched: no route) and status.",
    );
    for r in &http {
        for (status, n) in &r.statuses {
            t.sample(
                "de_http_requests_total",
                &[
                    ("method", r.method),
                    ("route", &r.route),
                    ("status", &status.to_string()),
                ],
                *n as f64,
            );
        }
    }
    t.family(
        "de_http_request_duration_seconds",
        Kind::Histogram,
        "Time to answer API requests (to the response head), by method and route template.",
    );
    for r in &http {
        t.histogram(
            "de_http_request_duration_seconds",
            &[("method", r.method), ("route", &r.route)],
            &r.latency,
        );
    }

    t.family(
        "de_store_flush_duration_seconds",
        Kind::Histogram,
        "How long each flush of the store to disk took (every durable write waits for one).",
    );
    t.histogram(
        "de_store_flush_duration_seconds",
        &[],
        &m.store_flush.snapshot(),
    );
    t.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn by_state(d: &DeploymentMetrics) -> [i64; 4] {
        DEPLOY_STATES.map(|s| d.by_state[deploy_index(s)].load(Ordering::Relaxed))
    }

    #[test]
    fn deployments_move_from_running_to_how_they_ended_with_their_duration() {
        let d = DeploymentMetrics::default();
        d.loaded(DeployState::Succeeded);
        d.loaded(DeployState::Running);
        d.started();
        assert_eq!(by_state(&d), [2, 1, 0, 0]);
        // A save of a running record (paused, resumed) is no end.
        d.ended(DeployState::Running, "2026-01-01T00:00:00Z", None);
        assert_eq!(by_state(&d), [2, 1, 0, 0]);
        d.ended(
            DeployState::Failed,
            "2026-01-01T00:00:00Z",
            Some("2026-01-01T00:01:30.5Z"),
        );
        assert_eq!(by_state(&d), [1, 1, 1, 0]);
        let failed = d.duration[deploy_index(DeployState::Failed) - 1].snapshot();
        assert_eq!(failed.sum, 90.5);
        // 90.5 s falls in the bucket up to 120 s.
        let i = DEPLOYMENT_BOUNDS.iter().position(|b| *b == 120.0);
        assert_eq!(i.and_then(|i| failed.counts.get(i)), Some(&1));
        let succeeded = d.duration[deploy_index(DeployState::Succeeded) - 1].snapshot();
        assert_eq!(succeeded.counts.iter().sum::<u64>(), 0);
    }

    #[test]
    fn http_methods_outside_the_known_set_share_one_label() {
        let h = HttpMetrics::default();
        let odd = axum::http::Method::from_bytes(b"BREW").expect("method");
        for m in [axum::http::Method::GET, odd.clone(), odd] {
            h.observe(&m, None, 404, Duration::from_millis(1));
        }
        let snap = h.snapshot();
        let labels: Vec<_> = snap
            .iter()
            .map(|r| (r.route.as_str(), r.method, r.statuses.clone()))
            .collect();
        assert_eq!(
            labels,
            [
                ("unmatched", "GET", vec![(404, 1)]),
                ("unmatched", "other", vec![(404, 2)])
            ]
        );
    }
}
