//! Deploy converges on what runs (127.0.13.x): drift made behind the
//! controller's back is repaired by an unchanged plan's deployment, an
//! instance stopped through the API stays stopped, `GET /api/v1/plan/diff`
//! says what a deploy would do and why, and a running deployment can be
//! cancelled, its step killed on its node.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use de_common::api::{ChangeAction, DeployState, PlanDiff};
use de_tests::{
    TestAgent, TestController, cluster, script_component, supervised_sleeper, wait_until,
    write_catalog,
};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(90);

fn submit(ctl: &TestController, plan: &serde_json::Value) -> Result<()> {
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    ensure!(a.status == 201, "plan refused: {} {}", a.status, a.body);
    Ok(())
}

fn diff(ctl: &TestController) -> Result<PlanDiff> {
    ctl.api("GET", "/api/v1/plan/diff", None)?
        .expect(200)
        .context("plan diff")
}

/// The action the diff gives the instance on `ip`.
fn action_on(d: &PlanDiff, ip: &str) -> Option<ChangeAction> {
    d.instances.iter().find(|i| i.ip == ip).map(|i| i.action)
}

fn status_of(ctl: &TestController, ip: &str) -> Option<String> {
    ctl.status()
        .ok()?
        .into_iter()
        .find(|r| r.ip == ip)
        .map(|r| r.status)
}

fn monit(agent: &TestAgent, args: &[&str]) -> Result<()> {
    let control = agent.monit_control.as_ref().context("private monit")?;
    let out = Command::new("monit")
        .arg("-c")
        .arg(control)
        .args(args)
        .output()?;
    ensure!(
        out.status.success(),
        "monit {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn check_file(agent: &TestAgent) -> Result<std::path::PathBuf> {
    let control = agent.monit_control.as_ref().context("private monit")?;
    Ok(control
        .parent()
        .unwrap_or(Path::new("/"))
        .join("conf.d/sleeper.monitrc"))
}

fn deploy_and_wait(ctl: &TestController) -> Result<de_common::api::DeploymentView> {
    let started = ctl.deploy()?;
    let d = ctl.finished(&started.id, WAIT)?;
    ensure!(d.state == DeployState::Succeeded, "{d:?}");
    Ok(d)
}

#[test]
fn an_unchanged_plan_repairs_drift_and_keeps_what_an_operator_stopped() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(
        &data,
        "sleepers",
        "description = \"A supervised sleeper\"\nentry = \"sleeper\"\n",
        &[("sleeper", &supervised_sleeper("sleeper"))],
    )?;
    let ips = ["127.0.13.1", "127.0.13.2"];
    let (ctl, agents) = cluster(dir.path(), &ips, true)?;
    submit(
        &ctl,
        &json!({"components": {"sleeper": ips}, "properties": {"domain": "c.test", "catalog": "sleepers"}}),
    )?;
    // Before anything ran, the diff installs both.
    let d = diff(&ctl)?;
    ensure!(
        d.instances
            .iter()
            .all(|i| i.action == ChangeAction::Install)
            && d.instances.len() == 2,
        "{d:?}"
    );
    deploy_and_wait(&ctl)?;
    // Deployed again at once, before the nodes report what the first one
    // did: nothing is re-applied for want of a report.
    let again = deploy_and_wait(&ctl)?;
    ensure!(
        again.steps_total == 0,
        "an immediate redeploy ran steps: {again:?}"
    );
    for ip in ips {
        wait_until(WAIT, &format!("sleeper RUNNING on {ip}"), || {
            status_of(&ctl, ip).filter(|s| s == "RUNNING")
        })?;
    }
    wait_until(WAIT, "a diff with nothing to do", || {
        diff(&ctl).ok().filter(|d| {
            d.steps == 0
                && d.instances
                    .iter()
                    .all(|i| i.action == ChangeAction::Nothing)
        })
    })?;

    // Drift behind the controller's back: node 1's sleeper stopped with
    // monit, node 2's check file deleted.
    monit(&agents[0], &["stop", "sleeper"])?;
    std::fs::remove_file(check_file(&agents[1])?)?;
    let d = wait_until(WAIT, "the diff to see both drifts", || {
        diff(&ctl).ok().filter(|d| {
            action_on(d, ips[0]) == Some(ChangeAction::Start)
                && action_on(d, ips[1]) == Some(ChangeAction::Reapply)
        })
    })?;
    let why: Vec<&str> = d.instances.iter().map(|i| i.why.as_str()).collect();
    ensure!(
        why[0].contains("stopped outside the controller")
            && why[1].contains("monit check sleeper is missing"),
        "{why:?}"
    );
    // The same plan's deployment repairs both, and one right after does nothing.
    deploy_and_wait(&ctl)?;
    let again = deploy_and_wait(&ctl)?;
    ensure!(
        again.steps_total == 0,
        "a redeploy after the repair ran steps: {again:?}"
    );
    ensure!(check_file(&agents[1])?.exists(), "the check file is back");
    for ip in ips {
        wait_until(WAIT, &format!("sleeper RUNNING again on {ip}"), || {
            status_of(&ctl, ip).filter(|s| s == "RUNNING")
        })?;
    }

    // Stopped through the API: a deployment leaves it stopped.
    let a = ctl.api(
        "PUT",
        "/deployment-engine/stop",
        Some(&json!({"name": "sleeper", "ip": ips[0]}).to_string()),
    )?;
    ensure!(a.status == 200, "stop: {} {}", a.status, a.body);
    wait_until(WAIT, "node 1 STOPPED", || {
        status_of(&ctl, ips[0]).filter(|s| s == "STOPPED")
    })?;
    let d = wait_until(WAIT, "a diff that keeps the stop", || {
        diff(&ctl).ok().filter(|d| d.steps == 0)
    })?;
    ensure!(
        d.instances
            .iter()
            .any(|i| i.ip == ips[0] && i.why.contains("stopped through the API")),
        "{d:?}"
    );
    let done = deploy_and_wait(&ctl)?;
    ensure!(done.steps_total == 0, "nothing to do: {done:?}");
    ensure!(
        status_of(&ctl, ips[0]).as_deref() == Some("STOPPED"),
        "an operator's stop survives a deployment"
    );
    // Started through the API, it runs again, and deployments run it from then on.
    let a = ctl.api(
        "PUT",
        "/deployment-engine/start",
        Some(&json!({"name": "sleeper", "ip": ips[0]}).to_string()),
    )?;
    ensure!(a.status == 200, "start: {} {}", a.status, a.body);
    wait_until(WAIT, "node 1 RUNNING after start", || {
        status_of(&ctl, ips[0]).filter(|s| s == "RUNNING")
    })?;
    monit(&agents[0], &["stop", "sleeper"])?;
    wait_until(
        WAIT,
        "a stop outside the controller to be repaired again",
        || {
            diff(&ctl)
                .ok()
                .filter(|d| action_on(d, ips[0]) == Some(ChangeAction::Start))
        },
    )?;
    Ok(())
}

#[test]
fn a_running_deployment_is_cancelled_its_step_killed_and_the_next_one_accepted() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    write_catalog(
        &data,
        "slow",
        "description = \"A slow step\"\nentry = \"slow\"\n[properties]\nmarker = \"\"\npause = 0\n",
        &[(
            "slow",
            &script_component(
                "slow",
                "Sleeps, leaving its pid behind",
                "echo $$ > {{ properties.marker }}; sleep {{ properties.pause }}; echo finished >> {{ properties.marker }}.done",
            ),
        )],
    )?;
    let ips = ["127.0.13.11"];
    let (ctl, _agents) = cluster(dir.path(), &ips, false)?;
    let marker = dir.path().join("slow.pid");
    let plan = |pause: u32| {
        json!({"components": {"slow": ips}, "properties": {
            "domain": "c.test", "catalog": "slow",
            "marker": marker.display().to_string(), "pause": pause}})
    };
    submit(&ctl, &plan(60))?;
    let started = ctl.deploy()?;
    let pid: u32 = wait_until(WAIT, "the slow step to run", || {
        std::fs::read_to_string(&marker).ok()?.trim().parse().ok()
    })?;
    let a = ctl.api(
        "POST",
        &format!("/api/v1/deployments/{}/cancel", started.id),
        None,
    )?;
    ensure!(a.status == 200, "cancel: {} {}", a.status, a.body);
    let d: de_common::api::DeploymentView = a.json()?;
    ensure!(d.state == DeployState::Cancelled, "{d:?}");
    // The script's process group is killed on the node.
    wait_until(WAIT, "the cancelled script to be killed", || {
        (!de_tests::process_alive(pid)).then_some(())
    })?;
    ensure!(
        !Path::new(&format!("{}.done", marker.display())).exists(),
        "the cancelled step ran to its end"
    );
    // Cancelling again is a conflict; a new deployment is accepted at once.
    let again = ctl.api(
        "POST",
        &format!("/api/v1/deployments/{}/cancel", started.id),
        None,
    )?;
    ensure!(
        again.status == 409 && again.body["error"] == "deployment_not_running",
        "{} {}",
        again.status,
        again.body
    );
    submit(&ctl, &plan(0))?;
    let next = deploy_and_wait(&ctl)?;
    ensure!(next.steps_done == next.steps_total, "{next:?}");
    let missing = ctl.api("POST", "/api/v1/deployments/d-nope/cancel", None)?;
    ensure!(missing.status == 404, "{}", missing.status);
    Ok(())
}

#[test]
fn a_script_leaving_a_child_on_its_output_ends_with_its_own_exit_code() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ips = ["127.0.13.21"];
    let (ctl, agents) = cluster(dir.path(), &ips, false)?;
    let node = agents[0].node_id()?;
    let pidfile = dir.path().join("child.pid");
    // `sleep 60 &` keeps the step's stdout open for a minute after the
    // script itself exits 0: the step ends at once all the same.
    let req = de_common::api::StepRequest {
        action: de_common::StepAction::Script {
            script: format!(
                "echo starting; sleep 60 & echo $! > {}; exit 0",
                pidfile.display()
            ),
            user: None,
            env: Vec::new(),
            timeout_secs: 120,
        },
        lane: None,
        wait_secs: Some(30),
    };
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&serde_json::to_string(&req)?),
    )?;
    let child: Option<u32> = std::fs::read_to_string(&pidfile)
        .ok()
        .and_then(|p| p.trim().parse().ok());
    if let Some(pid) = child {
        let _ = Command::new("kill").arg(pid.to_string()).status();
    }
    ensure!(
        a.status == 200,
        "the step did not end within 30 s: {} {}",
        a.status,
        a.body
    );
    let rec: de_common::api::StepRecordView = a.json()?;
    let out = rec.outcome.context("an outcome")?;
    ensure!(out.exit_code == Some(0) && !out.timed_out, "{out:?}");
    ensure!(out.stdout_tail.contains("starting"), "{out:?}");
    ensure!(
        out.stderr_tail.contains("kept stdout or stderr open"),
        "the result says why reading stopped: {out:?}"
    );
    ensure!(child.is_some(), "the script ran");
    Ok(())
}
