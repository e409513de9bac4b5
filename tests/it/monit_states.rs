//! Monit's states besides running and stopped, from a real private monit
//! (127.0.30.1): a start program that never writes its pidfile is DOWN
//! (monit: "Does not exist", "Execution failed", "Initializing" while it
//! retries), a start under way is STARTING (monit: "start pending", also on
//! a service not monitored yet), a stop program that hangs is STOPPING
//! (monit: "stop pending") until monit gives up on it (STOPPED). Each is
//! checked on the node (`GET /api/v1/nodes/{id}`) and on the original
//! status route (`GET /deployment-engine/status`).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use de_common::api::{NodeView, StepRecordView, StepRequest, StepState};
use de_common::{MonitOp, StepAction};
use de_tests::{TestAgent, TestController, cluster, script_component, wait_until, write_catalog};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

/// Runs one raw step on `node` and waits for it; it must succeed.
fn step(ctl: &TestController, node: &str, action: StepAction) -> Result<()> {
    let req = StepRequest {
        action,
        lane: None,
        wait_secs: Some(90),
    };
    let rec: StepRecordView = ctl.post_step(node, &req, 200)?;
    anyhow::ensure!(rec.state == StepState::Done, "{rec:?}");
    Ok(())
}

fn add(ctl: &TestController, node: &str, name: &str, check: String) -> Result<()> {
    step(
        ctl,
        node,
        StepAction::MonitAdd {
            name: name.to_owned(),
            check,
        },
    )
}

fn op(ctl: &TestController, node: &str, name: &str, op: MonitOp) -> Result<()> {
    step(
        ctl,
        node,
        StepAction::Monit {
            name: name.to_owned(),
            op,
        },
    )
}

/// The status the node's last heartbeat gave `name`.
fn status(ctl: &TestController, node: &str, name: &str) -> Option<String> {
    let n: NodeView = ctl
        .api("GET", &format!("/api/v1/nodes/{node}"), None)
        .ok()?
        .expect(200)
        .ok()?;
    n.components
        .into_iter()
        .find(|c| c.name == name)
        .map(|c| c.status)
}

/// The status `GET /deployment-engine/status` gives component `name`.
fn row_status(ctl: &TestController, name: &str) -> Option<String> {
    ctl.status()
        .ok()?
        .into_iter()
        .find(|r| r.comp == name)
        .map(|r| r.status)
}

/// The statuses `name` goes through (each once, in order) until it is
/// `last`; an error if it is not within `WAIT`.
fn watch(ctl: &TestController, node: &str, name: &str, last: &str) -> Result<Vec<String>> {
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    loop {
        if let Some(s) = status(ctl, node, name)
            && seen.last() != Some(&s)
        {
            seen.push(s);
        }
        if seen.last().map(String::as_str) == Some(last) {
            return Ok(seen);
        }
        if start.elapsed() > WAIT {
            bail!("{name} never became {last}: it went {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What monit itself says of its services (`monit summary`).
fn monit_summary(agent: &TestAgent) -> String {
    let Some(control) = &agent.monit_control else {
        return String::new();
    };
    Command::new("monit")
        .arg("-c")
        .arg(control)
        .arg("summary")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A check whose start program and stop program are given as shell text.
fn check(name: &str, root: &Path, start: &str, stop: &str, timeouts: u32) -> String {
    format!(
        "check process {name} with pidfile {root}/run/{name}.pid\n  \
         start program = \"/bin/sh -c '{start}'\" with timeout {timeouts} seconds\n  \
         stop program = \"/bin/sh -c '{stop}'\" with timeout {timeouts} seconds\n",
        root = root.display()
    )
}

/// Starts `sleep 1000` in the background and writes its pidfile.
fn daemon(name: &str, root: &Path) -> String {
    format!(
        "mkdir -p {run}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {run}/{name}.pid",
        run = root.join("run").display()
    )
}

fn kill_by_pidfile(root: &Path, name: &str) {
    if let Some(pid) = std::fs::read_to_string(root.join(format!("run/{name}.pid")))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
    {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

#[test]
fn monit_states_other_than_running_and_stopped_are_reported_as_monit_shows_them() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let names = ["never_up", "slow_start", "hung_stop"];
    let components: Vec<(&str, String)> = names
        .iter()
        .map(|n| (*n, script_component(n, "a monit check of the test", "true")))
        .collect();
    let refs: Vec<(&str, &str)> = components.iter().map(|(n, t)| (*n, t.as_str())).collect();
    write_catalog(
        &dir.path().join("data"),
        "states",
        "description = \"states\"\nentry = \"never_up\"\n",
        &refs,
    )?;
    let ip = "127.0.30.1";
    let (ctl, agents) = cluster(dir.path(), &[ip], true)?;
    let agent = &agents[0];
    let node = agent.node_id()?;
    let root = std::fs::canonicalize(&agent.root)?;
    // A plan naming the checks, so the original status route lists them.
    let plan = json!({
        "components": {"never_up": [ip], "slow_start": [ip], "hung_stop": [ip]},
        "properties": {"domain": "states.test", "catalog": "states"},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan: {}", a.body);

    // A start program that never writes the pidfile: monit starts it, finds
    // nothing, and tries again; it is DOWN and never anything that looks up.
    add(
        &ctl,
        &node,
        "never_up",
        check("never_up", &root, "true", "true", 5),
    )?;
    let seen = watch(&ctl, &node, "never_up", "DOWN")?;
    let deadline = Instant::now() + Duration::from_secs(8);
    let mut later = Vec::new();
    while Instant::now() < deadline {
        later.extend(status(&ctl, &node, "never_up"));
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        seen.iter()
            .chain(&later)
            .all(|s| s == "DOWN" || s == "STARTING"),
        "never_up went {seen:?} then {later:?}"
    );
    assert!(
        later.iter().all(|s| s == "DOWN"),
        "once its start failed it stays DOWN while monit retries: {later:?}\nmonit: {}",
        monit_summary(agent)
    );
    assert_eq!(row_status(&ctl, "never_up").as_deref(), Some("DOWN"));
    let summary = monit_summary(agent);
    assert!(
        summary.lines().any(|l| l.contains("never_up")
            && (l.contains("Does not exist")
                || l.contains("Execution failed")
                || l.contains("Initializing"))),
        "{summary}"
    );

    // A start that takes a while: from stopped, `monit start` is pending
    // while the start program runs ("Not monitored - start pending"), which
    // is STARTING, never STOPPED, then RUNNING.
    let slow = format!("sleep 6; {}", daemon("slow_start", &root));
    add(
        &ctl,
        &node,
        "slow_start",
        check(
            "slow_start",
            &root,
            &slow,
            &format!("kill $(cat {}/run/slow_start.pid)", root.display()),
            30,
        ),
    )?;
    watch(&ctl, &node, "slow_start", "RUNNING")?;
    op(&ctl, &node, "slow_start", MonitOp::Stop)?;
    watch(&ctl, &node, "slow_start", "STOPPED")?;
    op(&ctl, &node, "slow_start", MonitOp::Start)?;
    let mut row_starting = false;
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    while seen.last().map(String::as_str) != Some("RUNNING") {
        if let Some(s) = status(&ctl, &node, "slow_start")
            && seen.last() != Some(&s)
        {
            seen.push(s);
        }
        if seen.last().map(String::as_str) == Some("STARTING") {
            row_starting |= row_status(&ctl, "slow_start").as_deref() == Some("STARTING");
        }
        if start.elapsed() > WAIT {
            bail!("slow_start never ran again: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // The first report may still be the one from before the start.
    let after: Vec<&String> = seen.iter().skip_while(|s| *s == "STOPPED").collect();
    assert_eq!(
        after,
        ["STARTING", "RUNNING"],
        "slow_start went {seen:?} after `monit start`"
    );
    assert!(row_starting, "the status route showed STARTING too");

    // A stop program that hangs: STOPPING while monit waits for it, then
    // STOPPED once monit gives up and stops monitoring it.
    let release = root.join("release");
    add(
        &ctl,
        &node,
        "hung_stop",
        check(
            "hung_stop",
            &root,
            &daemon("hung_stop", &root),
            &format!("while [ ! -e {} ]; do sleep 0.2; done", release.display()),
            8,
        ),
    )?;
    watch(&ctl, &node, "hung_stop", "RUNNING")?;
    op(&ctl, &node, "hung_stop", MonitOp::Stop)?;
    let mut row_stopping = false;
    let start = Instant::now();
    let mut seen: Vec<String> = Vec::new();
    while seen.last().map(String::as_str) != Some("STOPPED") {
        if let Some(s) = status(&ctl, &node, "hung_stop")
            && seen.last() != Some(&s)
        {
            seen.push(s);
        }
        if seen.last().map(String::as_str) == Some("STOPPING") {
            row_stopping |= row_status(&ctl, "hung_stop").as_deref() == Some("STOPPING");
        }
        if start.elapsed() > WAIT {
            bail!("hung_stop never stopped: {seen:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let after: Vec<&String> = seen.iter().skip_while(|s| *s == "RUNNING").collect();
    assert_eq!(after, ["STOPPING", "STOPPED"], "hung_stop went {seen:?}");
    assert!(row_stopping, "the status route showed STOPPING too");
    let summary = monit_summary(agent);
    assert!(
        summary
            .lines()
            .any(|l| l.contains("hung_stop") && l.contains("Not monitored")),
        "{summary}"
    );

    // Monit gave up on the stop: the process it could not stop is still
    // there; let the stop programs end and remove what is left.
    std::fs::write(&release, b"")?;
    kill_by_pidfile(&root, "hung_stop");
    wait_until(
        Duration::from_secs(5),
        "the test's own processes gone",
        || {
            let pid = std::fs::read_to_string(root.join("run/hung_stop.pid")).ok()?;
            (!Path::new(&format!("/proc/{}", pid.trim())).exists()).then_some(())
        },
    )
    .context("hung_stop's process")?;
    Ok(())
}
