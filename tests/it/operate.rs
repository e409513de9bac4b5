//! The original status, restart and stop routes on a plan whose component runs
//! under each agent's real private monit (127.0.7.x).

use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{OperateRow, StatusRow};
use de_tests::{TestAgent, TestController, cluster, wait_until};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(60);

const SLEEPER: &str = r#"
description = "A process that sleeps, supervised by monit"
cardinality = "many"
monit_check = '''
check process sleeper with pidfile {{ path("run/sleeper.pid") }}
'''
logs = []

[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1
"#;

fn write_catalog(data: &std::path::Path) -> Result<()> {
    let cat = data.join("catalogs/sleepers");
    std::fs::create_dir_all(&cat)?;
    std::fs::write(
        cat.join("catalog.toml"),
        "description = \"Sleepers\"\nentry = \"sleeper\"\n",
    )?;
    std::fs::write(cat.join("sleeper.toml"), SLEEPER)?;
    Ok(())
}

/// Installs the sleeper's monit check on the agent's node and starts it.
fn install_sleeper(ctl: &TestController, agent: &TestAgent) -> Result<()> {
    let node = agent.node_id()?;
    let root = std::fs::canonicalize(&agent.root)?;
    let pid = root.join("run/sleeper.pid");
    let check = format!(
        "check process sleeper with pidfile {pid}\n  \
         start program = \"/bin/sh -c 'mkdir -p {run}; nohup sleep 1000 >/dev/null 2>&1 & echo $! > {pid}'\"\n  \
         stop program = \"/bin/sh -c 'kill $(cat {pid})'\"\n",
        pid = pid.display(),
        run = root.join("run").display()
    );
    for action in [
        json!({"MonitAdd": {"name": "sleeper", "check": check}}),
        json!({"Monit": {"name": "sleeper", "op": "Start"}}),
    ] {
        let body = json!({"action": action, "wait_secs": 60});
        let a = ctl.api(
            "POST",
            &format!("/api/v1/nodes/{node}/steps"),
            Some(&body.to_string()),
        )?;
        assert_eq!(a.body["state"], "done", "{}", a.body);
    }
    Ok(())
}

fn row<'a>(rows: &'a [StatusRow], ip: &str) -> Option<&'a StatusRow> {
    rows.iter().find(|r| r.comp == "sleeper" && r.ip == ip)
}

fn pid_of(agent: &TestAgent) -> Option<u32> {
    de_tests::pidfile(agent, "sleeper")
}

#[test]
fn status_restart_and_stop_act_through_each_nodes_monit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_catalog(&dir.path().join("data"))?;
    let ips = ["127.0.7.1", "127.0.7.2"];
    let (ctl, mut agents) = cluster(dir.path(), &ips, true)?;

    // Before a plan: 403 for all three.
    assert_eq!(
        ctl.api("GET", "/deployment-engine/status", None)?.status,
        403
    );
    assert_eq!(
        ctl.api(
            "PUT",
            "/deployment-engine/restart",
            Some(r#"{"name":"all","ip":"0.0.0.0"}"#)
        )?
        .status,
        403
    );

    let plan = json!({
        "components": {"sleeper": ips},
        "properties": {"domain": "test.local", "catalog": "sleepers"},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    assert_eq!(a.status, 201, "{}", a.body);
    let rows = ctl.status()?;
    assert_eq!(rows.len(), 2);
    assert_eq!(row(&rows, ips[0]).context("row")?.status, "NOT_INSTALLED");

    for a in &agents {
        install_sleeper(&ctl, a)?;
    }
    let rows = wait_until(WAIT, "both RUNNING", || {
        ctl.status().ok().filter(|rows| {
            ips.iter()
                .all(|ip| row(rows, ip).is_some_and(|r| r.status == "RUNNING"))
        })
    })?;
    let r = row(&rows, ips[0]).context("row")?;
    assert!(r.cpu.ends_with('%') && r.mem.ends_with('%'), "{r:?}");

    // Restart one instance: a new pid, the other untouched.
    let before = (
        pid_of(&agents[0]).context("pid")?,
        pid_of(&agents[1]).context("pid")?,
    );
    let a = ctl.api(
        "PUT",
        "/deployment-engine/restart",
        Some(&json!({"Comp": "sleeper", "Ip": ips[0]}).to_string()),
    )?;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body,
        json!([{"Comp": "sleeper", "Ip": ips[0], "Result": "ok"}])
    );
    wait_until(WAIT, "a new pid on the restarted instance", || {
        pid_of(&agents[0]).filter(|p| *p != before.0)
    })?;
    wait_until(WAIT, "RUNNING again", || {
        ctl.status()
            .ok()
            .filter(|rows| row(rows, ips[0]).is_some_and(|r| r.status == "RUNNING"))
    })?;
    assert_eq!(pid_of(&agents[1]), Some(before.1));

    // Stop everything.
    let a = ctl.api(
        "PUT",
        "/deployment-engine/stop",
        Some(r#"{"name": "all", "ip": "0.0.0.0"}"#),
    )?;
    let stopped: Vec<OperateRow> = a.expect(200)?;
    assert!(
        stopped.len() == 2 && stopped.iter().all(|r| r.result == "ok"),
        "{stopped:?}"
    );
    wait_until(WAIT, "both STOPPED", || {
        ctl.status().ok().filter(|rows| {
            ips.iter()
                .all(|ip| row(rows, ip).is_some_and(|r| r.status == "STOPPED"))
        })
    })?;

    // Bad requests.
    let a = ctl.api(
        "PUT",
        "/deployment-engine/stop",
        Some(r#"{"name": "sleeper", "ip": "127.0.7.9"}"#),
    )?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("127.0.7.9")
    );
    let a = ctl.api("PUT", "/deployment-engine/restart", Some("{not json"))?;
    assert_eq!(a.status, 400);

    // An offline agent is named in the status.
    agents[1]
        .proc
        .as_mut()
        .context("the second agent runs")?
        .terminate(Duration::from_secs(10))?;
    wait_until(WAIT, "offline in status", || {
        ctl.status()
            .ok()
            .filter(|rows| row(rows, ips[1]).is_some_and(|r| r.status.starts_with("OFFLINE")))
    })?;
    let a = ctl.api(
        "PUT",
        "/deployment-engine/restart",
        Some(&json!({"name": "sleeper", "ip": ips[1]}).to_string()),
    )?;
    let rows: Vec<OperateRow> = a.expect(200)?;
    assert!(
        rows.first().is_some_and(|r| r.result.contains("offline")),
        "{rows:?}"
    );
    Ok(())
}
