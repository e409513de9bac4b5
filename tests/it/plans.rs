//! Plans through the original API with real agents (127.0.2.x): the original
//! example accepted, problems named, secrets redacted, hardware answers, and
//! an operator's catalog loaded from the data dir.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::HardwareRow;
use de_tests::{Answer, TestAgent, TestController, command, run_bounded, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// A request as the original clients send it (a GET may carry a body);
/// `content_type` None adds none of ours.
fn raw(
    ctl: &TestController,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &str,
) -> Result<Answer> {
    fn headers<B>(
        r: ureq::RequestBuilder<B>,
        token: &str,
        content_type: Option<&str>,
    ) -> ureq::RequestBuilder<B> {
        let r = r.header("Authorization", format!("Bearer {token}"));
        match content_type {
            Some(c) => r.header("Content-Type", c),
            None => r,
        }
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    let url = format!("http://{}{}", ctl.api, path);
    let mut resp = match method {
        "GET" => headers(agent.get(&url), &ctl.token, content_type)
            .force_send_body()
            .send(body)?,
        "POST" => headers(agent.post(&url), &ctl.token, content_type).send(body)?,
        "PUT" => headers(agent.put(&url), &ctl.token, content_type).send(body)?,
        other => anyhow::bail!("raw() does not send {other}"),
    };
    let status = resp.status().as_u16();
    let mut text = String::new();
    resp.body_mut().as_reader().read_to_string(&mut text)?;
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    Ok(Answer { status, body })
}

/// Enrols and starts one agent per IP and waits until all are online.
fn agents(ctl: &TestController, dir: &Path, ips: &[&str]) -> Result<Vec<TestAgent>> {
    let code = ctl.new_code(None)?;
    let mut out = Vec::new();
    for ip in ips {
        let mut a = TestAgent::new(dir, ip)?;
        let o = a.enroll(&ctl.quic, &code)?;
        anyhow::ensure!(o.status.success(), "enrol {ip}: {}", o.stderr);
        a.start(1)?;
        out.push(a);
    }
    wait_until(WAIT, "agents online", || {
        ctl.nodes().ok().filter(|ns| {
            ips.iter()
                .all(|ip| ns.iter().any(|n| n.online && n.ips.iter().any(|i| i == ip)))
        })
    })?;
    Ok(out)
}

/// The original example JSON with 10.10.101.181-199 spread over `ips` (round
/// robin) and the mirror `home` on `home`. Nothing is ever sent to 10.x.
fn seed_plan(ips: &[&str], home: &str) -> String {
    let mut text = include_str!("../fixtures/seed-config-example.json")
        .replace("\"10.10.101.180\"", &format!("\"{home}\""));
    for i in 181..=199usize {
        text = text.replace(
            &format!("\"10.10.101.{i}\""),
            &format!("\"{}\"", ips[(i - 181) % ips.len()]),
        );
    }
    assert!(!text.contains("10.10.101."), "every example IP is remapped");
    text
}

fn kinds(a: &Answer) -> Vec<(String, String, String)> {
    a.body["problems"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let s = |k: &str| p[k].as_str().unwrap_or("-").to_owned();
            (s("kind"), s("component"), s("ip"))
        })
        .collect()
}

#[test]
fn the_original_example_is_accepted_redacted_and_its_hardware_answered() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let ips = ["127.0.2.1", "127.0.2.2", "127.0.2.3"];
    let _agents = agents(&ctl, dir.path(), &ips)?;

    // Before any plan: config is 404, hardware is 403 (as the original).
    let a = raw(&ctl, "GET", "/deployment-engine/config", None, "")?;
    assert_eq!(a.status, 404, "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("no plan")
    );
    let a = raw(
        &ctl,
        "GET",
        "/deployment-engine/hardware",
        None,
        r#"{"Comp":"all","Ip":"0.0.0.0"}"#,
    )?;
    assert_eq!(a.status, 403, "{}", a.body);

    // Every problem class we can make with real agents, in one request.
    let mut bad: Value = serde_json::from_str(&seed_plan(&ips, "127.0.2.250"))?;
    bad["components"]["web"] = json!(["127.0.2.1"]);
    bad["components"]["etcd"] = json!(["127.0.2.1", "127.0.2.2"]);
    bad["components"]["nats"] = json!(["127.0.2.2", "127.0.2.99"]);
    bad["properties"]["disksize"] = json!(1_000_000_000);
    let a = raw(
        &ctl,
        "POST",
        "/deployment-engine/config",
        Some("application/x-www-form-urlencoded"),
        &bad.to_string(),
    )?;
    assert_eq!(a.status, 400, "{}", a.body);
    assert_eq!(a.body["error"], "invalid_plan");
    let got = kinds(&a);
    for (kind, comp, ip) in [
        ("unknown_component", "web", "-"),
        ("cardinality", "etcd", "-"),
        ("unknown_node", "nats", "127.0.2.99"),
    ] {
        assert!(
            got.contains(&(kind.into(), comp.into(), ip.into())),
            "{kind} {comp} {ip} in {got:?}"
        );
    }
    assert_eq!(
        got.iter()
            .filter(|(k, _, _)| k == "disk_below_disksize")
            .count(),
        3,
        "one disk problem per node: {got:?}"
    );
    let a = raw(
        &ctl,
        "POST",
        "/deployment-engine/config",
        None,
        "{\"components\": {",
    )?;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["problems"][0]["kind"], "malformed_json");
    assert!(
        a.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("line 1 column"),
        "{}",
        a.body
    );
    assert_eq!(
        raw(&ctl, "GET", "/deployment-engine/config", None, "")?.status,
        404,
        "nothing stored"
    );

    // The example itself, as curl -d sends it.
    let plan = seed_plan(&ips, "127.0.2.250");
    let a = raw(
        &ctl,
        "POST",
        "/deployment-engine/config",
        Some("application/x-www-form-urlencoded"),
        &plan,
    )?;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["dns"]["name"], "*.cf.local");
    assert_eq!(a.body["dns"]["value"], "127.0.2.1");
    let message = a.body["message"].as_str().unwrap_or_default().to_owned();
    assert!(message.contains("*.cf.local A 127.0.2.1"), "{message}");

    // Read back: secrets redacted; posting the redacted plan keeps them.
    let got = raw(&ctl, "GET", "/deployment-engine/config", None, "")?;
    assert_eq!(got.status, 200);
    assert_eq!(got.body["properties"]["password"], "******");
    assert_eq!(got.body["properties"]["root"], "******");
    assert_eq!(got.body["properties"]["domain"], "cf.local");
    assert_eq!(
        got.body["components"]["uaa"],
        json!(["127.0.2.3", "127.0.2.1", "127.0.2.2"])
    );
    let a = raw(
        &ctl,
        "POST",
        "/deployment-engine/config",
        Some("application/json;charset=utf-8"),
        &got.body.to_string(),
    )?;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["revision"], 2);
    let again = raw(&ctl, "GET", "/deployment-engine/config", None, "")?;
    assert_eq!(again.body, got.body);
    // The API never shows a secret (the unit tests check the kept values);
    // a plan without the password fails (adduser is 1), so the round trip
    // above did carry one.
    let mut no_secret = got.body.clone();
    if let Some(p) = no_secret["properties"].as_object_mut() {
        p.remove("password");
    }
    let a = raw(
        &ctl,
        "POST",
        "/api/v1/plan/validate",
        None,
        &no_secret.to_string(),
    )?;
    assert_eq!(a.status, 400, "adduser 1 without a password: {}", a.body);
    assert!(
        kinds(&a).contains(&("missing_property".into(), "-".into(), "-".into())),
        "{}",
        a.body
    );

    // Hardware: one, all, mismatch; RAM in kB, DISK in MB, as the original.
    let nodes = ctl.nodes()?;
    let ram_mb = nodes.first().context("a node")?.hardware.ram_mb;
    let a = raw(
        &ctl,
        "GET",
        "/deployment-engine/hardware",
        None,
        r#"{ "Comp":"nats","Ip":"127.0.2.3"}"#,
    )?;
    let row: HardwareRow = a.expect(200)?;
    assert_eq!((row.comp.as_str(), row.ip.as_str()), ("nats", "127.0.2.3"));
    assert!(row.cpu >= 1, "{row:?}");
    assert_eq!(row.ram_kb, ram_mb * 1024);
    assert!(row.disk_mb > 0, "{row:?}");
    let a = raw(
        &ctl,
        "GET",
        "/deployment-engine/hardware",
        None,
        r#"{"Comp":"all","Ip":"0.0.0.0"}"#,
    )?;
    assert_eq!(a.status, 200);
    let rows = a.body.as_array().context("array")?;
    assert_eq!(rows.len(), 19, "one row per component instance");
    assert!(
        rows.iter()
            .all(|r| ips.contains(&r["IP"].as_str().unwrap_or_default()))
    );
    let a = raw(
        &ctl,
        "GET",
        "/deployment-engine/hardware",
        None,
        r#"{"Comp":"haproxy","Ip":"127.0.2.2"}"#,
    )?;
    assert_eq!(a.status, 400, "{}", a.body);

    // The operations log names the DNS record and holds no secret.
    let log = std::fs::read_to_string(ctl.data_dir.join("logs/local.log"))?;
    assert!(
        log.contains("plan stored") && log.contains("*.cf.local A 127.0.2.1"),
        "{log}"
    );
    assert!(log.contains("plan rejected"), "{log}");
    assert!(
        !log.contains("123456") && !log.contains("\"password\""),
        "{log}"
    );
    assert!(
        !ctl.proc.log_text().contains("123456"),
        "the controller's own log holds no secret"
    );

    // The same log through the original download routes, as curl sends them.
    let list = raw(&ctl, "GET", "/deployment-engine/download", None, "")?;
    assert_eq!(list.status, 200, "{}", list.body);
    assert!(
        list.body
            .as_array()
            .is_some_and(|l| l.iter().any(|n| n == "local.log")),
        "{}",
        list.body
    );
    let form = Some("application/x-www-form-urlencoded");
    let file = raw(
        &ctl,
        "PUT",
        "/deployment-engine/download",
        form,
        "local.log",
    )?;
    assert_eq!(file.status, 200, "{}", file.body);
    assert!(
        file.body.as_str().is_some_and(|t| t.starts_with(&log)),
        "{}",
        file.body
    );
    let evil = raw(
        &ctl,
        "PUT",
        "/deployment-engine/download",
        form,
        "../admin.token",
    )?;
    assert_eq!(evil.status, 400, "{}", evil.body);

    // The plan survives a controller restart.
    let (api, quic) = (ctl.api, ctl.quic);
    let data = ctl.data_dir.clone();
    drop(ctl);
    let ctl = TestController::start_on(&data, &api.to_string(), &quic.to_string())?;
    let after = raw(&ctl, "GET", "/api/v1/plan", None, "")?;
    assert_eq!(after.status, 200);
    assert_eq!(after.body["revision"], 2);
    assert_eq!(after.body["plan"], got.body);
    Ok(())
}

const WEB: &str = r#"
description = "A web page"
cardinality = "many"
monit_check = '''
check process web with pidfile {{ path("var/vcap/sys/run/web/web.pid") }}
'''
logs = ['{{ path("var/vcap/sys/log/web/web.log") }}']

[minimum]
cpus = 1
ram_mb = {{RAM}}
disk_mb = 1

[[install]]
action = "write_file"
path = '{{ path("var/vcap/data/web/index.html") }}'
contents = "{{ properties.greeting }} from {{ node.ip }}"
"#;

fn write_catalog(data: &Path, ram_mb: u64) -> Result<()> {
    let cat = data.join("catalogs/webfarm");
    std::fs::create_dir_all(&cat)?;
    std::fs::write(
        cat.join("catalog.toml"),
        "description = \"An operator's catalog\"\nentry = \"web\"\n[properties]\ngreeting = \"hello\"\n",
    )?;
    std::fs::write(
        cat.join("web.toml"),
        WEB.replace("{{RAM}}", &ram_mb.to_string()),
    )?;
    Ok(())
}

#[test]
fn a_catalog_in_the_data_dir_is_loaded_and_used() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data, 1)?;
    let ctl = TestController::start(&data)?;
    let _agents = agents(&ctl, dir.path(), &["127.0.2.4"])?;

    let list = ctl.api("GET", "/api/v1/catalogs", None)?;
    let names: Vec<&str> = list
        .body
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(names, ["cf-v170", "debian-demo", "webfarm"]);
    let one = ctl.api("GET", "/api/v1/catalogs/webfarm", None)?;
    assert_eq!(one.body["builtin"], false);
    assert_eq!(one.body["components"][0]["name"], "web");

    let plan = json!({
        "components": {"web": ["127.0.2.4"]},
        "properties": {"domain": "farm.test", "catalog": "webfarm", "greeting": "hi"}
    });
    let a = raw(
        &ctl,
        "POST",
        "/deployment-engine/config",
        None,
        &plan.to_string(),
    )?;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(a.body["catalog"], "webfarm");
    assert_eq!(a.body["dns"]["name"], "*.farm.test");
    let got = ctl.api("GET", "/api/v1/plan", None)?;
    assert_eq!(got.body["plan"]["properties"]["greeting"], "hi");
    assert_eq!(got.body["order"], json!(["web"]));

    // Unknown to the catalog: a property it does not declare.
    let mut typo = plan.clone();
    typo["properties"]["greting"] = json!("hi");
    let a = raw(
        &ctl,
        "POST",
        "/api/v1/plan/validate",
        None,
        &typo.to_string(),
    )?;
    assert_eq!(a.status, 400);
    assert_eq!(a.body["problems"][0]["kind"], "unknown_property");
    assert_eq!(a.body["problems"][0]["property"], "greting");
    let (api, quic) = (ctl.api.to_string(), ctl.quic.to_string());
    drop(ctl);

    // The same catalog asking for more RAM than the node has: below_minimum, naming node and need.
    std::fs::remove_dir_all(data.join("catalogs"))?;
    write_catalog(&data, 100_000_000)?;
    let ctl = TestController::start_on(&data, &api, &quic)?;
    wait_until(WAIT, "agent back online", || {
        ctl.node_by_ip("127.0.2.4")
            .ok()
            .flatten()
            .filter(|n| n.online)
    })?;
    let a = raw(
        &ctl,
        "POST",
        "/api/v1/plan/validate",
        None,
        &plan.to_string(),
    )?;
    assert_eq!(a.status, 400, "{}", a.body);
    let p = &a.body["problems"][0];
    assert_eq!(p["kind"], "below_minimum");
    assert_eq!(p["component"], "web");
    assert_eq!(p["ip"], "127.0.2.4");
    assert_eq!(p["needed"], "100000000 MB RAM");
    drop(ctl);

    // A broken catalog stops the controller at start with the file named.
    std::fs::write(
        data.join("catalogs/webfarm/web.toml"),
        "cardinality = \"several\"\n",
    )?;
    let mut cmd = command("de-controller");
    cmd.args([
        "serve",
        "--api-listen",
        "127.0.0.1:0",
        "--quic-listen",
        "127.0.0.1:0",
        "--data-dir",
    ])
    .arg(&data);
    let out = run_bounded(cmd, Duration::from_secs(30))?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("webfarm/web.toml"), "{}", out.stderr);
    Ok(())
}
