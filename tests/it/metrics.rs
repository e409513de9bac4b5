//! `GET /metrics` through the real binaries (127.0.27.x), read with a real
//! Prometheus parser (the Python `prometheus_client`, Debian's
//! `python3-prometheus-client`) and linted with `promtool check metrics`
//! (Debian's `prometheus`): nodes online after two agents enrol, a wrong
//! install code counted, step counters moved by an exec, API requests under
//! their route template and status, a wrong token refused on the API, the
//! `--metrics-listen` address open without one; and the example Prometheus
//! config, alert rules and their unit tests in `docs/prometheus/` pass
//! `promtool`.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use de_common::api::ExecRequest;
use de_tests::{TestAgent, TestController, wait_until};
use serde::Deserialize;

/// Debian's Python, where `python3-prometheus-client` installs the parser
/// (a `python3` earlier on PATH may be another one).
const PYTHON: &str = "/usr/bin/python3";

/// Reads a scrape on stdin with `prometheus_client`'s text parser and
/// prints every sample as JSON.
const PARSE: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        out.append({"family": family.name, "type": family.type, "name": s.name,
                    "labels": s.labels, "value": s.value})
print(json.dumps(out))
"#;

#[derive(Debug, Deserialize)]
struct Sample {
    family: String,
    #[serde(rename = "type")]
    kind: String,
    name: String,
    labels: std::collections::BTreeMap<String, String>,
    value: f64,
}

/// The samples of a scrape, as the real parser reads them.
#[derive(Debug)]
struct Scrape(Vec<Sample>);

impl Scrape {
    fn parse(text: &str) -> Result<Scrape> {
        let out = pipe(Command::new(PYTHON).args(["-c", PARSE]), text)
            .context("parse the scrape with python3-prometheus-client")?;
        Ok(Scrape(serde_json::from_str(&out).context("parser output")?))
    }

    /// The value of sample `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.0
            .iter()
            .find(|s| {
                s.name == name
                    && s.labels.len() == labels.len()
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }

    fn kind_of(&self, family: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|s| s.family == family)
            .map(|s| s.kind.as_str())
    }
}

/// Runs `cmd` with `input` on stdin; its stdout, or an error with its stderr.
fn pipe(cmd: &mut Command, input: &str) -> Result<String> {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {cmd:?}"))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(input.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `GET /metrics` on the API with `token`: the status and the text.
fn scrape_api(ctl: &TestController, token: Option<&str>) -> Result<(u16, String)> {
    let a = ctl.request("GET", "/metrics", token, None)?;
    let text = match a.body {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    Ok((a.status, text))
}

/// `GET /metrics` on the metrics listener, plain HTTP, no token.
fn scrape_plain(addr: SocketAddr) -> Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let mut resp = agent.get(&format!("http://{addr}/metrics")).call()?;
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(ctype.starts_with("text/plain; version=0.0.4"), "{ctype}");
    Ok(resp.body_mut().read_to_string()?)
}

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel)
}

fn promtool(args: &[&str]) -> Result<String> {
    let out = Command::new("promtool")
        .args(args)
        .output()
        .context("run promtool (Debian package prometheus)")?;
    ensure!(
        out.status.success(),
        "promtool {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_scrape_shows_what_the_cluster_did_and_parses_as_prometheus_text() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start_with(
        &dir.path().join("data"),
        "127.0.27.1:0",
        "127.0.27.1:0",
        &["--metrics-listen", "127.0.27.1:0"],
    )?;
    let plain: SocketAddr = ctl
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("metrics listening on "))
        .context("no 'metrics listening on' line")?
        .parse()?;
    let reader = ctl
        .api(
            "POST",
            "/api/v1/tokens",
            Some(r#"{"name": "prometheus", "role": "read-only"}"#),
        )?
        .expect::<serde_json::Value>(201)?["token"]
        .as_str()
        .context("token")?
        .to_owned();

    let before = Scrape::parse(&scrape_api(&ctl, Some(&reader))?.1)?;
    assert_eq!(before.value("de_nodes", &[("state", "online")]), Some(0.0));
    assert_eq!(before.kind_of("de_nodes"), Some("gauge"));
    assert_eq!(before.kind_of("de_enrolments"), Some("counter"));
    assert_eq!(
        before.kind_of("de_http_request_duration_seconds"),
        Some("histogram")
    );

    // Two agents enrol; a third tries a wrong code.
    let code = ctl.new_code(None)?;
    let mut agents = Vec::new();
    for ip in ["127.0.27.2", "127.0.27.3"] {
        let mut a = TestAgent::new(dir.path(), ip)?;
        let out = a.enroll(&ctl.quic, &code)?;
        ensure!(out.status.success(), "enrol {ip}: {}", out.stderr);
        a.start(1)?;
        agents.push(a);
    }
    let wrong = if code == "1234" { "4321" } else { "1234" };
    let guesser = TestAgent::new(dir.path(), "127.0.27.4")?;
    let out = guesser.enroll(&ctl.quic, wrong)?;
    ensure!(
        !out.status.success(),
        "a wrong code enrolled: {}",
        out.stdout
    );

    let online = wait_until(
        Duration::from_secs(30),
        "2 nodes online in the metrics",
        || {
            let s = Scrape::parse(&scrape_api(&ctl, Some(&reader)).ok()?.1).ok()?;
            (s.value("de_nodes", &[("state", "online")]) == Some(2.0)).then_some(s)
        },
    )?;
    assert_eq!(online.value("de_enrolments_total", &[]), Some(2.0));
    assert_eq!(
        online.value("de_install_code_failures_total", &[]),
        Some(1.0)
    );
    assert_eq!(
        online.value(
            "de_agent_versions",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        Some(2.0)
    );
    assert_eq!(online.value("de_quic_connections_open", &[]), Some(2.0));
    assert_eq!(
        online.value("de_node_heartbeat_age_seconds_count", &[]),
        Some(2.0)
    );
    let max_age = online
        .value("de_node_heartbeat_age_max_seconds", &[])
        .context("max heartbeat age")?;
    assert!((0.0..10.0).contains(&max_age), "{max_age}");

    // An exec on both: two ad-hoc steps done, each with its run time.
    let done = [("lane", "adhoc"), ("state", "done")];
    assert_eq!(online.value("de_steps_finished_total", &done), Some(0.0));
    let results = ctl.exec(&ExecRequest {
        script: "echo metered".into(),
        targets: None,
        timeout_secs: Some(20),
        user: None,
    })?;
    ensure!(
        results.len() == 2 && results.iter().all(|r| r.exit_code == Some(0)),
        "{results:?}"
    );
    // A node that does not exist, and a wrong token: each under its route.
    let a = ctl.api("GET", "/api/v1/nodes/n-no-such-node", None)?;
    assert_eq!(a.status, 404, "{:?}", a.body);
    let a = ctl.request("GET", "/api/v1/nodes", Some("not-a-token"), None)?;
    assert_eq!(a.status, 401, "{:?}", a.body);
    let (status, _) = scrape_api(&ctl, Some("not-a-token"))?;
    assert_eq!(status, 401, "a wrong token may not scrape the API");
    let (status, _) = scrape_api(&ctl, None)?;
    assert_eq!(status, 401, "no token may not scrape the API");

    // The metrics listener needs no token and shows the same counters.
    let text = scrape_plain(plain)?;
    let after = Scrape::parse(&text)?;
    assert_eq!(after.value("de_steps_finished_total", &done), Some(2.0));
    assert_eq!(
        after.value("de_step_duration_seconds_count", &[("lane", "adhoc")]),
        Some(2.0)
    );
    assert_eq!(
        after.value("de_steps", &[("lane", "adhoc"), ("state", "queued")]),
        Some(0.0)
    );
    let requests = |route: &str, method: &str, status: &str| {
        after.value(
            "de_http_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    };
    assert_eq!(requests("/api/v1/exec", "POST", "200"), Some(1.0));
    assert_eq!(requests("/api/v1/nodes/{id}", "GET", "404"), Some(1.0));
    assert!(requests("/api/v1/nodes", "GET", "401").is_some_and(|n| n >= 1.0));
    assert_eq!(requests("/metrics", "GET", "401"), Some(2.0));
    assert!(
        after
            .value(
                "de_http_request_duration_seconds_count",
                &[("method", "POST"), ("route", "/api/v1/exec")]
            )
            .is_some_and(|n| n == 1.0)
    );
    assert!(
        !text.contains("n-no-such-node"),
        "a raw path leaked: {text}"
    );
    assert!(
        after
            .value("de_store_flush_duration_seconds_count", &[])
            .is_some_and(|n| n > 0.0)
    );
    assert_eq!(
        after.value("de_deployments", &[("state", "running")]),
        Some(0.0)
    );
    // Prometheus's own linter finds nothing to say.
    pipe(Command::new("promtool").args(["check", "metrics"]), &text)?;
    drop(agents);
    Ok(())
}

#[test]
fn the_example_prometheus_config_and_alert_rules_pass_promtool() -> Result<()> {
    let docs = repo_file("docs/prometheus");
    let path = |f: &str| docs.join(f).display().to_string();
    let out = promtool(&["check", "rules", &path("alerts.yml")])?;
    ensure!(out.contains("SUCCESS: 5 rules found"), "{out}");
    // --syntax-only: the token and CA files named are the operator's.
    promtool(&["check", "config", "--syntax-only", &path("prometheus.yml")])?;
    let out = promtool(&["test", "rules", &path("alerts_test.yml")])?;
    if !out.contains("SUCCESS") {
        bail!("promtool test rules: {out}");
    }
    Ok(())
}
