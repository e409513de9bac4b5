//! Deployments end to end with real agents and private monit (127.0.8.x):
//! dependency order, retries, failure with output, 409 while running, scale
//! in and out, and a controller SIGKILLed mid-deployment that resumes
//! without running any step twice.

use std::path::Path;
use std::time::Duration;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use de_common::api::{
    DeployState, DeploymentView, PhaseState, StepRecordView, StepRequest, StepState,
};
use de_common::{Lane, StepAction};
use de_tests::{TestController, cluster, pidfile, process_alive, wait_until};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// A catalog whose steps append to one journal shared by all nodes, so the
/// test sees the global order and counts how often each step ran.
fn write_catalog(data: &Path) -> Result<()> {
    let cat = data.join("catalogs/journal");
    std::fs::create_dir_all(&cat)?;
    std::fs::write(
        cat.join("catalog.toml"),
        "description = \"Steps that write a journal\"\nentry = \"app\"\n\
         [properties]\njournal = \"\"\nfail_app = 0\npause = 0\n",
    )?;
    std::fs::write(
        cat.join("base.toml"),
        r#"
description = "A supervised process"
cardinality = "many"
monit_check = '''
check process base with pidfile {{ path("run/base.pid") }}
  start program = "/bin/sh -c 'mkdir -p {{ path("run") }}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {{ path("run/base.pid") }}'"
  stop program = "/bin/sh -c 'kill $(cat {{ path("run/base.pid") }})'"
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1

[[install]]
action = "script"
run = 'sleep {{ properties.pause }}; echo "base-install {{ node.ip }}" >> {{ properties.journal }}'

[[install]]
action = "monit_add"

[[install]]
action = "monit_start"

[[uninstall]]
action = "script"
run = 'echo "base-uninstall {{ node.ip }}" >> {{ properties.journal }}'
"#,
    )?;
    std::fs::write(
        cat.join("app.toml"),
        r#"
description = "Needs base; its second step fails twice before it works"
cardinality = "many"
after = ["base"]
monit_check = '''
check process app with pidfile {{ path("run/app.pid") }}
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1

[[install]]
action = "script"
run = 'echo "app-install {{ node.ip }} members={{ components.base | join(",") }}" >> {{ properties.journal }}'

[[install]]
action = "script"
run = '''
n=$(cat {{ path("flaky.count") }} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {{ path("flaky.count") }}
echo "app-flaky {{ node.ip }} try $n" >> {{ properties.journal }}
if [ {{ properties.fail_app }} = 1 ]; then echo "app cannot start: fail_app is set" >&2; exit 9; fi
[ $n -ge 3 ] || { echo "not yet ($n)" >&2; exit 1; }
'''
"#,
    )?;
    Ok(())
}

fn plan(base: &[&str], app: &[&str], journal: &Path, fail_app: u8, pause: u32) -> String {
    json!({
        "components": {"base": base, "app": app},
        "properties": {
            "domain": "deploy.test", "catalog": "journal",
            "journal": journal.display().to_string(), "fail_app": fail_app, "pause": pause,
        },
    })
    .to_string()
}

fn submit(ctl: &TestController, plan: &str) -> Result<()> {
    let a = ctl.api("POST", "/deployment-engine/config", Some(plan))?;
    anyhow::ensure!(a.status == 201, "plan refused: {}", a.body);
    Ok(())
}

fn deploy(ctl: &TestController) -> Result<String> {
    Ok(ctl.deploy()?.id)
}

fn finished(ctl: &TestController, id: &str) -> Result<DeploymentView> {
    ctl.finished(id, WAIT)
}

fn journal(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn status_of(ctl: &TestController, comp: &str, ip: &str) -> Option<String> {
    ctl.status()
        .ok()?
        .into_iter()
        .find(|r| r.comp == comp && r.ip == ip)
        .map(|r| r.status)
}

/// A `/deployment-engine/log` client collecting lines in the background until `stop`.
fn watch_log(ctl: &TestController, stop: Arc<AtomicBool>) -> Result<Arc<Mutex<Vec<String>>>> {
    let url = format!("ws://{}/deployment-engine/log?token={}", ctl.api, ctl.token);
    let (mut ws, _) = tungstenite::connect(url.as_str())?;
    if let tungstenite::stream::MaybeTlsStream::Plain(s) = ws.get_ref() {
        s.set_read_timeout(Some(Duration::from_millis(200)))?;
    }
    let lines = Arc::new(Mutex::new(Vec::new()));
    let sink = lines.clone();
    std::thread::spawn(move || {
        while !stop.load(Ordering::Relaxed) {
            match ws.read() {
                Ok(tungstenite::Message::Text(t)) => {
                    if let Ok(mut l) = sink.lock() {
                        l.push(t.to_string());
                    }
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    });
    Ok(lines)
}

fn download(ctl: &TestController, name: &str) -> Result<de_tests::Answer> {
    ctl.api(
        "PUT",
        "/deployment-engine/download",
        Some(&serde_json::to_string(name)?),
    )
}

/// Runs a no-op step in `node`'s deploy lane and waits for it; returns its
/// number in that lane.
fn lane_probe(ctl: &TestController, node: &str) -> Result<u64> {
    let req = StepRequest {
        action: StepAction::Script {
            script: "true".to_owned(),
            user: None,
            env: Vec::new(),
            timeout_secs: 30,
        },
        lane: Some(Lane::Deploy),
        wait_secs: Some(60),
    };
    let rec: StepRecordView = ctl.post_step(node, &req, 200)?;
    assert_eq!(rec.state, StepState::Done, "{rec:?}");
    Ok(rec.step.seq)
}

#[test]
fn deployments_follow_dependencies_retry_scale_and_fail_with_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_catalog(&dir.path().join("data"))?;
    let ips = ["127.0.8.1", "127.0.8.2", "127.0.8.3"];
    let (ctl, mut agents) = cluster(dir.path(), &ips, true)?;
    let log = dir.path().join("journal.log");

    assert_eq!(
        ctl.api("GET", "/deployment-engine/deploy", None)?.status,
        403,
        "no plan yet"
    );
    submit(&ctl, &plan(&ips[..2], &ips[..2], &log, 0, 0))?;
    let stop = Arc::new(AtomicBool::new(false));
    let live = watch_log(&ctl, stop.clone())?;
    let id = deploy(&ctl)?;
    let second = ctl.api("GET", "/deployment-engine/deploy", None)?;
    assert_eq!(second.status, 409, "{}", second.body);
    let d = finished(&ctl, &id)?;
    assert_eq!(d.state, DeployState::Succeeded, "{d:?}");

    // base everywhere before any app; each step once; the flaky one three times.
    let j = journal(&log);
    let last_base = j
        .iter()
        .rposition(|l| l.starts_with("base-install"))
        .context("base")?;
    let first_app = j
        .iter()
        .position(|l| l.starts_with("app-install"))
        .context("app")?;
    assert!(last_base < first_app, "order: {j:?}");
    for ip in &ips[..2] {
        assert_eq!(
            j.iter()
                .filter(|l| **l == format!("base-install {ip}"))
                .count(),
            1,
            "{j:?}"
        );
        assert_eq!(
            j.iter()
                .filter(|l| l.starts_with(&format!("app-flaky {ip}")))
                .count(),
            3,
            "{j:?}"
        );
    }
    let flaky = d
        .steps
        .iter()
        .flatten()
        .find(|s| s.component == "app" && s.attempts == 3)
        .context("retried step")?;
    assert_eq!(flaky.state, PhaseState::Done);
    assert!(
        flaky.started_at.is_some() && flaky.finished_at.is_some() && flaky.exit_code == Some(0),
        "{flaky:?}"
    );
    for ip in &ips[..2] {
        wait_until(WAIT, "base RUNNING", || {
            status_of(&ctl, "base", ip).filter(|s| s == "RUNNING")
        })?;
    }

    // The WebSocket client saw the deployment live, step output included.
    let seen = wait_until(WAIT, "log lines on the WebSocket", || {
        let l = live.lock().ok()?.clone();
        (l.iter()
            .any(|x| x.contains(&format!("deployment {id} succeeded"))))
        .then_some(l)
    })?;
    stop.store(true, Ordering::Relaxed);
    assert!(
        seen.iter()
            .any(|l| l.contains("[app_0]") && l.contains("not yet (1)")),
        "{seen:?}"
    );
    // Every line is also in the files, which are listed and downloadable.
    let files = ctl.api("GET", "/deployment-engine/download", None)?.body;
    for f in [
        "local.log",
        "base_0.log",
        "base_1.log",
        "app_0.log",
        "app_1.log",
    ] {
        assert!(
            files.as_array().is_some_and(|a| a.iter().any(|x| x == f)),
            "{f} in {files}"
        );
    }
    let app = download(&ctl, "app_0.log")?;
    assert_eq!(app.status, 200);
    let text = app.body.as_str().unwrap_or_default();
    assert!(
        text.contains("not yet (1)") && text.contains("not yet (2)"),
        "{text}"
    );
    assert_eq!(download(&ctl, "nope.log")?.status, 404);
    let dlog = ctl.api("GET", &format!("/api/v1/deployments/{id}/log"), None)?;
    assert_eq!(dlog.status, 200);
    let dlog = dlog.body.as_str().unwrap_or_default().to_owned();
    assert!(
        dlog.contains(&format!("deployment {id}"))
            && dlog.contains("[app_0]")
            && dlog.contains("attempts 3"),
        "{dlog}"
    );
    assert_eq!(download(&ctl, "../../admin.token")?.status, 400);

    // Scale out base to the third node: only it is installed, and app (which lists base) is reconfigured.
    std::fs::write(&log, "")?;
    submit(&ctl, &plan(&ips, &ips[..2], &log, 0, 0))?;
    let d = finished(&ctl, &deploy(&ctl)?)?;
    assert_eq!(d.state, DeployState::Succeeded, "{d:?}");
    let j = journal(&log);
    assert_eq!(
        j.iter()
            .filter(|l| l.starts_with("base-install"))
            .collect::<Vec<_>>(),
        [&format!("base-install {}", ips[2])],
        "{j:?}"
    );
    assert!(
        j.iter()
            .any(|l| l.contains("members=127.0.8.1,127.0.8.2,127.0.8.3")),
        "app re-rendered: {j:?}"
    );
    wait_until(WAIT, "new base RUNNING", || {
        status_of(&ctl, "base", ips[2]).filter(|s| s == "RUNNING")
    })?;

    // Scale in: base leaves the third node again, which is stopped and cleaned up.
    let base3 = pidfile(&agents[2], "base").context("base's pid on node 3")?;
    assert!(
        process_alive(base3),
        "base runs on node 3 before the scale-in"
    );
    std::fs::write(&log, "")?;
    submit(&ctl, &plan(&ips[..2], &ips[..2], &log, 0, 0))?;
    let d = finished(&ctl, &deploy(&ctl)?)?;
    assert_eq!(d.state, DeployState::Succeeded, "{d:?}");
    let j = journal(&log);
    assert!(j.contains(&format!("base-uninstall {}", ips[2])), "{j:?}");
    assert!(!j.iter().any(|l| l.starts_with("base-install")), "{j:?}");
    wait_until(WAIT, "base gone from node 3's monit", || {
        let n = ctl.node_by_ip(ips[2]).ok().flatten()?;
        (!n.components.iter().any(|c| c.name == "base")).then_some(())
    })?;
    wait_until(WAIT, "base's process on node 3 to be gone", || {
        (!process_alive(base3)).then_some(())
    })?;

    // A step that always fails fails the deployment, with its output, and nothing after it runs.
    submit(&ctl, &plan(&ips[..2], &ips[..1], &log, 1, 0))?;
    let d = finished(&ctl, &deploy(&ctl)?)?;
    assert_eq!(d.state, DeployState::Failed, "{d:?}");
    let err = d.error.as_deref().unwrap_or_default();
    assert!(
        err.contains("app") && err.contains(ips[0]) && err.contains("fail_app is set"),
        "{err}"
    );
    let failed = d
        .steps
        .iter()
        .flatten()
        .find(|s| s.state == PhaseState::Failed)
        .context("failed step")?;
    assert_eq!(failed.attempts, 3);
    assert!(
        failed
            .output
            .as_deref()
            .unwrap_or_default()
            .contains("fail_app is set"),
        "{failed:?}"
    );

    // A node of the plan is offline: 502, naming it, and nothing starts.
    agents[1]
        .proc
        .as_mut()
        .context("the second agent runs")?
        .terminate(Duration::from_secs(10))?;
    wait_until(WAIT, "node 2 offline", || {
        ctl.node_by_ip(ips[1]).ok().flatten().filter(|n| !n.online)
    })?;
    let node1 = agents[0].node_id()?;
    let before = lane_probe(&ctl, &node1)?;
    let deployments = ctl.api("GET", "/api/v1/deployments", None)?.body;
    std::fs::write(&log, "")?;
    let a = ctl.api("GET", "/deployment-engine/deploy", None)?;
    assert_eq!(a.status, 502, "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains(ips[1]),
        "{}",
        a.body
    );
    // No deployment was recorded, and no step was queued for the online
    // node: the probe after the refusal takes the very next number of the
    // deploy lane, and runs after anything queued before it, which would
    // have written to the journal.
    assert_eq!(
        ctl.api("GET", "/api/v1/deployments", None)?.body,
        deployments
    );
    assert_eq!(lane_probe(&ctl, &node1)?, before + 1, "a step was queued");
    assert_eq!(journal(&log), Vec::<String>::new());
    Ok(())
}

#[test]
fn a_controller_killed_mid_deployment_resumes_without_repeating_steps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(&data)?;
    let ips = ["127.0.8.11", "127.0.8.12"];
    let (ctl, _agents) = cluster(dir.path(), &ips, true)?;
    let log = dir.path().join("journal.log");
    submit(&ctl, &plan(&ips, &ips, &log, 0, 2))?;
    let id = deploy(&ctl)?;
    // Kill it while the base installs are sleeping.
    let (api, quic) = (ctl.api, ctl.quic);
    wait_until(WAIT, "a step running", || {
        ctl.deployment(&id).ok().filter(|d| {
            d.steps
                .iter()
                .flatten()
                .any(|s| s.state == PhaseState::Running)
        })
    })?;
    drop(ctl); // SIGKILL
    let ctl = TestController::start_on(&data, &api.to_string(), &quic.to_string())?;
    let d = finished(&ctl, &id)?;
    assert_eq!(d.state, DeployState::Succeeded, "{d:?}");
    let j = journal(&log);
    for ip in ips {
        assert_eq!(
            j.iter()
                .filter(|l| **l == format!("base-install {ip}"))
                .count(),
            1,
            "{j:?}"
        );
        assert_eq!(
            j.iter()
                .filter(|l| l.starts_with(&format!("app-install {ip}")))
                .count(),
            1,
            "{j:?}"
        );
        assert_eq!(
            j.iter()
                .filter(|l| l.starts_with(&format!("app-flaky {ip}")))
                .count(),
            3,
            "{j:?}"
        );
    }
    Ok(())
}
