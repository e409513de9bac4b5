//! Components under a real private monit per agent: start, stop, restart,
//! and monit restarting a component killed from outside.

use std::time::Duration;

use anyhow::{Context, Result};
use de_tests::{TestController, cluster, wait_until};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(60);

fn step(ctl: &TestController, node: &str, action: Value) -> Result<Value> {
    let body = json!({"action": action, "wait_secs": 60});
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&body.to_string()),
    )?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["state"], "done", "{}", a.body);
    Ok(a.body)
}

fn component(ctl: &TestController, node: &str, name: &str) -> Option<Value> {
    let n = ctl
        .api("GET", &format!("/api/v1/nodes/{node}"), None)
        .ok()?
        .body;
    n["components"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

fn wait_status(ctl: &TestController, node: &str, name: &str, status: &str) -> Result<Value> {
    wait_until(WAIT, &format!("{name} {status}"), || {
        component(ctl, node, name).filter(|c| c["status"] == status)
    })
}

#[test]
fn components_run_under_monit_and_obey_start_stop_restart() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ctl, agents) = cluster(dir.path(), &["127.0.4.1"], true)?;
    let agent = &agents[0];
    let node = agent.node_id()?;
    let root = std::fs::canonicalize(&agent.root)?;
    let pidfile = root.join("run/sleeper.pid");
    let check = format!(
        "check process sleeper with pidfile {pid}\n  \
         start program = \"/bin/sh -c 'mkdir -p {run}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {pid}'\"\n  \
         stop program = \"/bin/sh -c 'kill $(cat {pid})'\"\n",
        pid = pidfile.display(),
        run = root.join("run").display()
    );
    step(
        &ctl,
        &node,
        json!({"MonitAdd": {"name": "sleeper", "check": check}}),
    )?;
    step(
        &ctl,
        &node,
        json!({"Monit": {"name": "sleeper", "op": "Start"}}),
    )?;
    let running = wait_status(&ctl, &node, "sleeper", "RUNNING")?;
    let pid = running["pid"].as_u64().context("pid")?;
    assert_eq!(std::fs::read_to_string(&pidfile)?.trim(), pid.to_string());

    step(
        &ctl,
        &node,
        json!({"Monit": {"name": "sleeper", "op": "Stop"}}),
    )?;
    wait_status(&ctl, &node, "sleeper", "STOPPED")?;
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "stopped process is gone"
    );

    step(
        &ctl,
        &node,
        json!({"Monit": {"name": "sleeper", "op": "Start"}}),
    )?;
    let first = wait_status(&ctl, &node, "sleeper", "RUNNING")?["pid"].as_u64();
    step(
        &ctl,
        &node,
        json!({"Monit": {"name": "sleeper", "op": "Restart"}}),
    )?;
    let restarted = wait_until(WAIT, "a new pid after restart", || {
        component(&ctl, &node, "sleeper")
            .filter(|c| c["status"] == "RUNNING" && c["pid"].as_u64() != first)
    })?;

    // Killed from outside: monit notices and starts it again.
    let victim = restarted["pid"].as_u64().context("pid")?;
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status();
    wait_until(WAIT, "monit to restart the killed component", || {
        component(&ctl, &node, "sleeper")
            .filter(|c| c["status"] == "RUNNING" && c["pid"].as_u64().is_some_and(|p| p != victim))
    })?;

    // Removing the check stops it and it disappears from the node's components.
    step(&ctl, &node, json!({"MonitRemove": {"name": "sleeper"}}))?;
    wait_until(WAIT, "sleeper gone", || {
        component(&ctl, &node, "sleeper").is_none().then_some(())
    })?;
    Ok(())
}
