//! Signed steps on real agents: exec on several nodes, bounded memory for
//! huge output, and no step repeated or skipped when an agent is killed mid-step.

use std::time::Duration;

use anyhow::{Context, Result};
use de_common::api::{ExecRequest, StepRecordView, StepRequest, StepState};
use de_common::{Lane, StepAction};
use de_tests::{TestAgent, cluster, peak_rss_kib, process_alive, wait_until};

fn exec_request(script: &str, targets: Option<Vec<String>>, timeout_secs: u64) -> ExecRequest {
    ExecRequest {
        script: script.to_owned(),
        targets,
        timeout_secs: Some(timeout_secs),
        user: None,
    }
}

#[test]
fn exec_runs_on_three_agents_and_returns_each_ones_output() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ctl, agents) = cluster(dir.path(), &["127.0.3.1", "127.0.3.2", "127.0.3.3"], false)?;
    let results = ctl.exec(&exec_request(
        "echo \"root=$DE_ROOT\"; echo warn >&2; exit 7",
        Some(agents.iter().map(|a| a.ip.clone()).collect()),
        30,
    ))?;
    assert_eq!(results.len(), 3);
    for agent in &agents {
        let r = results
            .iter()
            .find(|r| r.ip == agent.ip)
            .with_context(|| format!("no result for {}", agent.ip))?;
        assert_eq!(r.exit_code, Some(7), "{r:?}");
        let root = std::fs::canonicalize(&agent.root)?;
        assert_eq!(
            r.stdout,
            format!("root={}\n", agent.root.display()),
            "{r:?} ({})",
            root.display()
        );
        assert_eq!(r.stderr, "warn\n");
        assert!(!r.timed_out, "{r:?}");
    }
    // No targets: every online node. A bad target is named.
    let a = ctl.api("POST", "/api/v1/exec", Some(r#"{"script": "hostname"}"#))?;
    assert_eq!(a.expect::<Vec<de_common::api::ExecResult>>(200)?.len(), 3);
    let a = ctl.api(
        "POST",
        "/api/v1/exec",
        Some(r#"{"script": "true", "targets": ["127.9.9.9"]}"#),
    )?;
    assert_eq!(a.status, 400);
    assert!(
        a.body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("127.9.9.9")
    );
    let a = ctl.api(
        "POST",
        "/api/v1/exec",
        Some(r#"{"script": "true", "timeout": 5}"#),
    )?;
    assert_eq!(a.status, 400, "unknown field is refused: {}", a.body);
    // A command past its timeout is killed and says so, within its timeout
    // and a bound (the agent reads output for 2 s more after a kill).
    let pidfile = agents[0].root.join("timeout.pid");
    let asked = std::time::Instant::now();
    let results = ctl.exec(&exec_request(
        &format!("echo $$ > {}; exec sleep 30", pidfile.display()),
        Some(vec![agents[0].ip.clone()]),
        1,
    ))?;
    let took = asked.elapsed();
    println!("a 1 s timeout answered after {took:?}");
    assert!(results.len() == 1 && results[0].timed_out, "{results:?}");
    assert!(
        took < Duration::from_secs(1 + 10),
        "a 1 s timeout answered after {took:?}"
    );
    let pid: u32 = std::fs::read_to_string(&pidfile)?.trim().parse()?;
    wait_until(
        Duration::from_secs(10),
        "the timed-out script to be gone",
        || (!process_alive(pid)).then_some(()),
    )?;
    Ok(())
}

#[test]
fn a_step_printing_100_mb_does_not_grow_the_agents_memory() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ctl, agents) = cluster(dir.path(), &["127.0.3.4"], false)?;
    let pid = agents[0].proc.as_ref().context("proc")?.pid();
    let before = peak_rss_kib(pid).context("rss")?;
    // 100 MB in lines of 99 characters, and one 1 MB line without a newline.
    let script = "head -c 100000000 /dev/zero | tr '\\0' 'x' | fold -w 99; head -c 1000000 /dev/zero | tr '\\0' 'y'";
    let results = ctl.exec(&exec_request(script, None, 600))?;
    let r = results.first().context("a result")?;
    assert_eq!(r.exit_code, Some(0), "{:?}", r.error);
    let tail = r.stdout.as_str();
    assert_eq!(tail.len(), 64 * 1024, "the result keeps a bounded tail");
    assert!(tail.ends_with("yyyy"));
    let after = peak_rss_kib(pid).context("rss")?;
    // Holding the output would take about 97,000 KiB; the figure measured is
    // in docs/BENCHMARKS.md, this bound only catches the output being kept.
    println!("agent peak RSS {before} KiB before, {after} KiB after 100 MB of output");
    assert!(
        after < before + 64 * 1024,
        "agent peak memory grew from {before} KiB to {after} KiB while streaming 100 MB"
    );
    Ok(())
}

fn queue(ctl: &de_tests::TestController, node: &str, script: &str) -> Result<String> {
    let req = StepRequest {
        action: StepAction::Script {
            script: script.to_owned(),
            user: None,
            env: Vec::new(),
            timeout_secs: 120,
        },
        lane: Some(Lane::Deploy),
        wait_secs: Some(0),
    };
    let a = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{node}/steps"),
        Some(&serde_json::to_string(&req)?),
    )?;
    let rec: StepRecordView = a.json()?;
    // 200 with a finished record, 202 with one still queued or running.
    assert_eq!(
        a.status,
        if rec.state.is_final() { 200 } else { 202 },
        "{}",
        a.body
    );
    Ok(rec.step.id.into())
}

fn step_state(ctl: &de_tests::TestController, id: &str) -> Option<StepRecordView> {
    ctl.api("GET", &format!("/api/v1/steps/{id}"), None)
        .ok()?
        .expect(200)
        .ok()
}

#[test]
fn an_agent_killed_mid_step_neither_repeats_nor_skips() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ctl, mut agents) = cluster(dir.path(), &["127.0.3.5"], false)?;
    let agent: &mut TestAgent = &mut agents[0];
    let node = agent.node_id()?;
    let log = agent.root.join("steps.log");
    let one = queue(&ctl, &node, "echo one >> \"$DE_ROOT/steps.log\"")?;
    let two = queue(
        &ctl,
        &node,
        "echo $$ > \"$DE_ROOT/two.pid\"; echo two-start >> \"$DE_ROOT/steps.log\"; sleep 60; echo two-end >> \"$DE_ROOT/steps.log\"",
    )?;
    let three = queue(&ctl, &node, "echo three >> \"$DE_ROOT/steps.log\"")?;
    wait_until(Duration::from_secs(30), "step two to start", || {
        std::fs::read_to_string(&log)
            .ok()
            .filter(|t| t.contains("two-start"))
    })?;
    // SIGKILL the agent in the middle of step two: its script runs on,
    // until the restarted agent kills what the interrupted step left.
    let script: u32 = std::fs::read_to_string(agent.root.join("two.pid"))?
        .trim()
        .parse()?;
    agent.proc.as_mut().context("proc")?.kill();
    assert!(process_alive(script), "the script outlives the agent");
    agent.start(1)?;
    wait_until(
        Duration::from_secs(30),
        "the interrupted script killed",
        || (!process_alive(script)).then_some(()),
    )?;
    let done = wait_until(Duration::from_secs(60), "step three to finish", || {
        step_state(&ctl, &three).filter(|s| s.state == StepState::Done)
    })?;
    assert_eq!(done.outcome.and_then(|o| o.exit_code), Some(0));
    assert_eq!(std::fs::read_to_string(&log)?, "one\ntwo-start\nthree\n");
    let s1 = step_state(&ctl, &one).context("one")?;
    assert_eq!(s1.state, StepState::Done);
    let s2 = step_state(&ctl, &two).context("two")?;
    assert_eq!(s2.state, StepState::Failed, "{s2:?}");
    assert!(
        s2.outcome
            .as_ref()
            .and_then(|o| o.error.as_deref())
            .unwrap_or_default()
            .contains("interrupted"),
        "{s2:?}"
    );
    Ok(())
}

/// The step history in a running controller, with a real agent: keeping
/// one step per lane and passing every second, an exec's older steps go
/// (404, counted in `/metrics`), the newest stays, and the agent still
/// takes the next exec, so numbering went on from the step kept (an agent
/// refuses a sequence number it has done).
#[test]
fn old_steps_are_pruned_and_the_next_exec_still_runs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = de_tests::TestController::start_with(
        &dir.path().join("data"),
        "127.0.3.6:0",
        "127.0.3.6:0",
        &["--step-history-per-lane", "1", "--test-history-secs", "1"],
    )?;
    let code = ctl.new_code(None)?;
    let mut agent = TestAgent::new(dir.path(), "127.0.3.7")?;
    let out = agent.enroll(&ctl.quic, &code)?;
    anyhow::ensure!(out.status.success(), "enrol: {}", out.stderr);
    agent.start(1)?;
    wait_until(Duration::from_secs(30), "the agent online", || {
        ctl.node_by_ip(&agent.ip)
            .ok()
            .flatten()
            .filter(|n| n.online)
    })?;
    let mut ids = Vec::new();
    for i in 0..3 {
        let r = ctl.exec(&exec_request(&format!("echo run {i}"), None, 30))?;
        anyhow::ensure!(r.len() == 1 && r[0].exit_code == Some(0), "{r:?}");
        ids.push(r[0].step_id.clone());
    }
    let status = |id: &str| -> Result<u16> {
        Ok(ctl.api("GET", &format!("/api/v1/steps/{id}"), None)?.status)
    };
    wait_until(
        Duration::from_secs(30),
        "the two older steps pruned",
        || (status(&ids[0]).ok()? == 404 && status(&ids[1]).ok()? == 404).then_some(()),
    )?;
    assert_eq!(status(&ids[2])?, 200, "the newest step stays");
    let metrics = ctl.api("GET", "/metrics", None)?;
    let text = metrics.body.as_str().unwrap_or_default();
    let pruned: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix("de_step_records_pruned_total "))
        .context("no de_step_records_pruned_total")?
        .trim()
        .parse()?;
    assert!(pruned >= 2.0, "{text}");
    let again = ctl.exec(&exec_request("echo again", None, 30))?;
    assert_eq!(again.len(), 1);
    assert_eq!(
        (again[0].exit_code, again[0].stdout.as_str()),
        (Some(0), "again\n"),
        "{again:?}"
    );
    Ok(())
}
