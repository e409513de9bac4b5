//! Scale, for correctness: 500 simulated agents (`de-sim`, 127.24.x.y)
//! against a real controller (127.0.24.1) enrol and come online, answer an
//! exec, take a deployment to every node, and come back online after the
//! controller is SIGKILLed and restarted on the same ports and data.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use de_common::api::{DeployState, ExecRequest, PhaseState};
use de_tests::{TestController, command, script_component, spawn, wait_until, write_catalog};
use serde_json::json;

const AGENTS: usize = 500;
const WAIT: Duration = Duration::from_secs(240);

/// How many nodes the controller lists as online.
fn online(ctl: &TestController) -> Option<usize> {
    ctl.nodes()
        .ok()
        .map(|ns| ns.iter().filter(|n| n.online).count())
}

/// `echo hi` on every node: each of the `AGENTS` nodes answers once, with exit 0.
fn exec_all(ctl: &TestController) -> Result<()> {
    let results = ctl.exec(&ExecRequest {
        script: "echo hi".into(),
        targets: None,
        timeout_secs: Some(60),
        user: None,
    })?;
    let nodes: HashSet<&str> = results.iter().map(|r| r.node_id.as_str()).collect();
    ensure!(
        results.len() == AGENTS && nodes.len() == AGENTS,
        "{} answers from {} nodes",
        results.len(),
        nodes.len()
    );
    let failed: Vec<_> = results.iter().filter(|r| r.exit_code != Some(0)).collect();
    ensure!(failed.is_empty(), "not exit 0: {failed:?}");
    Ok(())
}

#[test]
fn five_hundred_simulated_agents_enrol_run_a_deployment_and_survive_a_controller_restart()
-> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(
        &data,
        "sim",
        "description = \"One script per node\"\nentry = \"app\"\n",
        &[(
            "app",
            &script_component("app", "Prints a line", "echo installing app"),
        )],
    )?;
    let ctl = TestController::start_on(&data, "127.0.24.1:0", "127.0.24.1:0")?;
    let code = ctl.new_code(None)?;
    let mut cmd = command("de-sim");
    cmd.args([
        "--controller",
        &ctl.quic.to_string(),
        "--code",
        &code,
        "--agents",
        &AGENTS.to_string(),
        "--first-ip",
        "127.24.0.1",
        "--heartbeat-secs",
        "2",
        "--state-dir",
    ])
    .arg(dir.path().join("sim"))
    .env("RUST_LOG", "info,quinn=warn");
    let sim_log = dir.path().join("sim.log");
    let (mut sim, lines) = spawn("de-sim", cmd, &sim_log)?;

    // All enrolled and linked: de-sim says so, and so does the controller.
    let want = format!("all {AGENTS} agents online");
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let line = lines
            .recv_timeout(left)
            .with_context(|| format!("de-sim never printed {want:?}"))?;
        if line == want {
            break;
        }
    }
    wait_until(WAIT, "every node online", || {
        online(&ctl).filter(|n| *n == AGENTS)
    })?;
    let nodes = ctl.nodes()?;
    let ips: Vec<String> = nodes.iter().flat_map(|n| n.ips.clone()).collect();
    let distinct: HashSet<&String> = ips.iter().collect();
    ensure!(
        distinct.len() == AGENTS && ips.iter().all(|ip| ip.starts_with("127.24.")),
        "{ips:?}"
    );

    exec_all(&ctl)?;

    // A plan with one instance on every node, deployed; every step succeeds.
    let plan = json!({
        "components": {"app": ips},
        "properties": {"domain": "sim.test", "catalog": "sim"},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    ensure!(a.status == 201, "plan: {} {}", a.status, a.body);
    let id = ctl.deploy()?.id;
    let d = ctl.finished(&id, WAIT)?;
    ensure!(d.state == DeployState::Succeeded, "{:?}", d.error);
    let steps: Vec<_> = d.steps.iter().flatten().collect();
    ensure!(steps.len() >= AGENTS, "{} steps", steps.len());
    ensure!(
        steps.iter().all(|s| s.state == PhaseState::Done),
        "{steps:?}"
    );

    // SIGKILL and restart on the same ports and data: every agent comes back.
    let (api, quic) = (ctl.api.to_string(), ctl.quic.to_string());
    drop(ctl);
    let ctl = TestController::start_on(&data, &api, &quic)?;
    wait_until(WAIT, "every node online after the restart", || {
        online(&ctl).filter(|n| *n == AGENTS)
    })?;
    exec_all(&ctl)?;

    // The progress line sums the QUIC figures over every link: all 500
    // linked again, each new connection past its handshake (at least three
    // datagrams each way) and holding a round-trip estimate.
    wait_until(WAIT, "a progress line with all links' QUIC figures", || {
        let log = std::fs::read_to_string(&sim_log).ok()?;
        let line = log.lines().rev().find(|l| l.contains(" progress "))?;
        let field = |name: &str| -> Option<u64> {
            let at = line.find(&format!(" {name}="))? + name.len() + 2;
            line[at..].split(' ').next()?.parse().ok()
        };
        let want = 3 * AGENTS as u64;
        (field("linked")? == AGENTS as u64
            && field("datagrams_sent")? >= want
            && field("datagrams_received")? >= want
            && field("rtt_mean_us")? > 0)
            .then_some(())
    })?;
    sim.kill();
    Ok(())
}
