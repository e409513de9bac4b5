//! Requests that race a deployment (127.0.29.1-9): two deploy requests at
//! once start exactly one deployment (the other is told 409
//! `deployment_running`, naming it), and a plan submitted while a
//! deployment runs changes nothing of that deployment; the next one uses it.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{DeployState, DeploymentView};
use de_tests::{Answer, TestController, cluster, script_component, write_catalog};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(120);

/// A component whose one step waits for the file `gate` under the node root,
/// then prints the plan's `tag`: a deployment that runs until the test lets it end.
fn gated() -> String {
    script_component(
        "gated",
        "waits for its gate, then prints the tag",
        r#"while [ ! -e {{ path("gate") }} ]; do sleep 0.1; done; echo "tag {{ properties.tag }}""#,
    )
}

fn submit(ctl: &TestController, ip: &str, tag: &str) -> Result<u64> {
    let plan = json!({
        "components": {"gated": [ip]},
        "properties": {"domain": "races.test", "catalog": "races", "tag": tag},
    });
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan: {}", a.body);
    a.body["revision"].as_u64().context("revision")
}

/// What identifies a deployment's steps, whatever state they are in.
fn shape(d: &DeploymentView) -> Vec<(String, String, String)> {
    d.steps
        .iter()
        .flatten()
        .map(|s| (s.instance.clone(), s.ip.clone(), s.action.clone()))
        .collect()
}

/// The output of the deployment's script step.
fn script_output(d: &DeploymentView) -> String {
    d.steps
        .iter()
        .flatten()
        .filter(|s| s.action == "script")
        .filter_map(|s| s.output.clone())
        .collect::<Vec<_>>()
        .join("\n")
}

fn deployments(ctl: &TestController) -> Result<Vec<DeploymentView>> {
    ctl.api("GET", "/api/v1/deployments", None)?.expect(200)
}

/// A deploy refused because `running` runs: 409 `deployment_running`, naming it.
fn assert_busy(a: &Answer, running: &str) {
    assert_eq!(a.status, 409, "{}", a.body);
    assert_eq!(a.body["error"], "deployment_running", "{}", a.body);
    assert!(
        a.body["message"]
            .as_str()
            .is_some_and(|m| m.contains(running)),
        "the refusal names the running deployment {running}: {}",
        a.body
    );
}

#[test]
fn two_deploys_at_once_start_one_and_a_plan_sent_meanwhile_waits_for_the_next() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_catalog(
        &dir.path().join("data"),
        "races",
        "description = \"races\"\nentry = \"gated\"\n[properties]\ntag = \"none\"\n",
        &[("gated", &gated())],
    )?;
    let ip = "127.0.29.1";
    let (ctl, agents) = cluster(dir.path(), &[ip], false)?;
    let gate = agents[0].root.join("gate");
    let first_revision = submit(&ctl, ip, "one")?;

    // Two deploy requests at the same moment.
    let ctl = Arc::new(ctl);
    let start = Arc::new(Barrier::new(2));
    let answers: Vec<Answer> = std::thread::scope(|s| {
        let asks: Vec<_> = (0..2)
            .map(|_| {
                let (ctl, start) = (ctl.clone(), start.clone());
                s.spawn(move || {
                    start.wait();
                    ctl.api("GET", "/deployment-engine/deploy", None)
                })
            })
            .collect();
        asks.into_iter()
            .map(|h| h.join().expect("deploy request thread"))
            .collect::<Result<_>>()
    })?;
    let started: Vec<&Answer> = answers.iter().filter(|a| a.status == 202).collect();
    assert_eq!(
        started.len(),
        1,
        "exactly one deployment starts: {answers:?}"
    );
    let id = started[0].body["id"]
        .as_str()
        .context("deployment id")?
        .to_owned();
    let refused = answers
        .iter()
        .find(|a| a.status != 202)
        .context("the other answer")?;
    assert_busy(refused, &id);
    let all = deployments(&ctl)?;
    assert_eq!(all.len(), 1, "one deployment exists: {all:?}");
    assert_eq!(all[0].id, id);
    assert_eq!(all[0].state, DeployState::Running);

    // A new plan while it runs: stored, but the running deployment keeps its
    // revision and steps, and a deploy now is still refused.
    let before = ctl.deployment(&id)?;
    assert_eq!(before.plan_revision, first_revision);
    let second_revision = submit(&ctl, ip, "two")?;
    assert!(second_revision > first_revision);
    assert_busy(&ctl.api("GET", "/deployment-engine/deploy", None)?, &id);
    let during = ctl.deployment(&id)?;
    assert_eq!(during.state, DeployState::Running);
    assert_eq!(during.plan_revision, first_revision);
    assert_eq!(shape(&during), shape(&before));
    assert_eq!(during.steps_total, before.steps_total);

    // Let it end: it ran the plan it started with.
    std::fs::write(&gate, b"")?;
    let first = ctl.finished(&id, WAIT)?;
    assert_eq!(first.state, DeployState::Succeeded, "{:?}", first.error);
    assert_eq!(first.plan_revision, first_revision);
    assert_eq!(shape(&first), shape(&before));
    let out = script_output(&first);
    assert!(out.contains("tag one") && !out.contains("tag two"), "{out}");

    // The next deployment takes the plan sent meanwhile.
    let next = ctl.deploy()?;
    assert_eq!(next.plan_revision, second_revision);
    let second = ctl.finished(&next.id, WAIT)?;
    assert_eq!(second.state, DeployState::Succeeded, "{:?}", second.error);
    let out = script_output(&second);
    assert!(out.contains("tag two"), "{out}");
    assert_eq!(deployments(&ctl)?.len(), 2);
    Ok(())
}
