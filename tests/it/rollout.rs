//! Rollout controls on real agents (127.0.22.x): max_in_flight as a count
//! and a rounded-down percentage, a failing canary that leaves the other
//! instances untouched, a watch that fails a component exiting soon after
//! its start, and pause and resume.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use de_common::api::{DeployState, DeploymentView, PhaseState};
use de_tests::{
    TestController, cluster, in_flight_spans, most_overlapping, script_component, wait_until,
    write_catalog,
};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(120);

fn start(ctl: &TestController, plan: &Value) -> Result<String> {
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    ensure!(a.status == 201, "plan refused: {} {}", a.status, a.body);
    Ok(ctl.deploy()?.id)
}

fn catalog(data: &std::path::Path, components: &[(&str, &str)]) -> Result<()> {
    write_catalog(
        data,
        "rollouts",
        "description = \"rollout tests\"\n",
        components,
    )
}

#[test]
fn max_in_flight_holds_as_a_count_and_as_a_percentage_rounded_down() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    catalog(
        &data,
        &[
            ("one", &script_component("one", "one at a time", "sleep 1")),
            (
                "some",
                &script_component("some", "60% at a time", "sleep 1").replace(
                    "cardinality = \"many\"",
                    "cardinality = \"many\"\nafter = [\"one\"]",
                ),
            ),
        ],
    )?;
    let ips = ["127.0.22.1", "127.0.22.2", "127.0.22.3", "127.0.22.4"];
    let (ctl, _agents) = cluster(dir.path(), &ips, false)?;
    let id = start(
        &ctl,
        &json!({
            "components": {"one": ips, "some": ips},
            "properties": {"domain": "r.test", "catalog": "rollouts"},
            "rollout": {"one": {"max_in_flight": 1}, "some": {"max_in_flight": "60%"}},
        }),
    )?;
    let d = ctl.finished(&id, WAIT)?;
    ensure!(d.state == DeployState::Succeeded, "{:?}", d.error);
    let one = in_flight_spans(&d, "one");
    let some = in_flight_spans(&d, "some");
    assert_eq!((one.len(), some.len()), (4, 4));
    assert_eq!(most_overlapping(&one), 1, "max_in_flight 1 held: {one:?}");
    assert_eq!(
        most_overlapping(&some),
        2,
        "60% of 4 rounds down to 2, and 2 ran at once: {some:?}"
    );
    let bound = |c: &str| {
        d.rollout
            .iter()
            .find(|r| r.component == c)
            .and_then(|r| r.max_in_flight)
    };
    assert_eq!((bound("one"), bound("some")), (Some(1), Some(2)));
    Ok(())
}

#[test]
fn a_failing_canary_fails_the_deployment_naming_it_and_touches_no_other_instance() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    catalog(
        &data,
        &[(
            "web",
            &script_component(
                "web",
                "the first instance fails",
                "if [ {{ index }} = 0 ]; then echo canary broke >&2; exit 3; fi",
            ),
        )],
    )?;
    let ips = ["127.0.22.11", "127.0.22.12", "127.0.22.13"];
    let (ctl, _agents) = cluster(dir.path(), &ips, false)?;
    let id = start(
        &ctl,
        &json!({
            "components": {"web": ips},
            "properties": {"domain": "r.test", "catalog": "rollouts"},
            "rollout": {"web": {"canaries": 1}},
        }),
    )?;
    let d = ctl.finished(&id, WAIT)?;
    assert_eq!(d.state, DeployState::Failed);
    let error = d.error.clone().unwrap_or_default();
    assert!(
        error.starts_with("web (web_0, a canary) on 127.0.22.11") && error.contains("canary broke"),
        "{error}"
    );
    for s in d.steps.iter().flatten().filter(|s| s.instance != "web_0") {
        assert_eq!(
            (s.state, s.attempts, s.step_id.as_deref()),
            (PhaseState::Skipped, 0, None),
            "{} was touched",
            s.instance
        );
    }
    assert_eq!(
        d.rollout.first().map(|r| r.canary_instances.clone()),
        Some(vec!["web_0".to_owned()])
    );
    Ok(())
}

/// A monit-supervised process that exits `after` seconds after its start.
fn short_lived(name: &str, after: u32) -> String {
    format!(
        r#"
description = "A process that exits soon after it starts"
cardinality = "many"
monit_check = '''
check process {name} with pidfile {{{{ path("run/{name}.pid") }}}}
  start program = "/bin/sh -c 'mkdir -p {{{{ path("run") }}}}; nohup sleep {after} >/dev/null 2>&1 & echo $! > {{{{ path("run/{name}.pid") }}}}'"
  stop program = "/bin/sh -c 'kill $(cat {{{{ path("run/{name}.pid") }}}})'"
'''
logs = []
[minimum]
cpus = 1
ram_mb = 1
disk_mb = 1

[rollout]
watch_secs = 12

[[install]]
action = "monit_add"

[[install]]
action = "monit_start"
"#
    )
}

#[test]
fn a_component_that_exits_a_few_seconds_after_its_start_fails_its_watch() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    catalog(&data, &[("blip", &short_lived("blip", 3))])?;
    let ips = ["127.0.22.21"];
    let (ctl, _agents) = cluster(dir.path(), &ips, true)?;
    let id = start(
        &ctl,
        &json!({
            "components": {"blip": ips},
            "properties": {"domain": "r.test", "catalog": "rollouts"},
        }),
    )?;
    let d = ctl.finished(&id, WAIT)?;
    assert_eq!(d.state, DeployState::Failed, "{d:?}");
    assert!(
        d.steps
            .iter()
            .flatten()
            .all(|s| s.state == PhaseState::Done),
        "its steps passed; the watch failed it"
    );
    let w = d.watches.first().context("a watch")?;
    assert_eq!((w.state, w.secs), (PhaseState::Failed, 12));
    let why = w.error.clone().unwrap_or_default();
    assert!(
        why.contains("after it was RUNNING") || why.contains("pid changed"),
        "{why}"
    );
    assert!(
        d.error.as_deref().is_some_and(
            |e| e.starts_with("blip (blip_0) on 127.0.22.21") && e.contains("watch failed")
        ),
        "{:?}",
        d.error
    );
    Ok(())
}

fn started(d: &DeploymentView) -> usize {
    d.steps
        .iter()
        .flatten()
        .filter(|s| s.started_at.is_some())
        .count()
}

#[test]
fn a_paused_deployment_starts_no_step_until_it_is_resumed_then_finishes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    catalog(
        &data,
        &[("slow", &script_component("slow", "two seconds", "sleep 2"))],
    )?;
    let ips = ["127.0.22.31", "127.0.22.32", "127.0.22.33"];
    let (ctl, _agents) = cluster(dir.path(), &ips, false)?;
    let id = start(
        &ctl,
        &json!({
            "components": {"slow": ips},
            "properties": {"domain": "r.test", "catalog": "rollouts"},
            "rollout": {"slow": {"max_in_flight": 1}},
        }),
    )?;
    wait_until(WAIT, "the first step running", || {
        ctl.deployment(&id).ok().filter(|d| started(d) >= 1)
    })?;
    let paused: DeploymentView = ctl
        .api("POST", &format!("/api/v1/deployments/{id}/pause"), None)?
        .expect(200)?;
    assert!(paused.paused);
    let before = started(&paused);
    // The step in flight finishes; in the pass that records it, an
    // unpaused deployment would start the next one.
    let held = wait_until(WAIT, "the step in flight to finish", || {
        ctl.deployment(&id).ok().filter(|d| {
            let steps = d.steps.iter().flatten();
            steps.clone().any(|s| s.state == PhaseState::Done)
                && steps.clone().all(|s| s.state != PhaseState::Running)
        })
    })?;
    assert_eq!(held.state, DeployState::Running);
    assert_eq!(
        started(&held),
        before,
        "a step started while paused: {held:?}"
    );
    assert!(held.paused);
    let answer = ctl.api("POST", &format!("/api/v1/deployments/{id}/resume"), None)?;
    let resumed: DeploymentView = answer.expect(200)?;
    assert!(!resumed.paused);
    let d = ctl.finished(&id, WAIT)?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    assert_eq!(
        started(&d),
        d.steps_total,
        "every step ran after the resume"
    );
    // Over: pausing it now is refused.
    let late = ctl.api("POST", &format!("/api/v1/deployments/{id}/pause"), None)?;
    assert_eq!(late.status, 409, "{}", late.body);
    assert!(
        late.body.to_string().contains("deployment_not_running"),
        "{}",
        late.body
    );
    Ok(())
}
