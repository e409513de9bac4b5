//! Agents that go silent without closing their link (SIGSTOP, 127.0.29.11-19):
//! the node is offline after three of its heartbeat intervals and not
//! before, back online as soon as it speaks again; and a result that came
//! while the controller had timed the link out reaches it once, over the
//! next link, without the step running again.

use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result, bail, ensure};
use de_common::StepAction;
use de_common::api::{NodeView, StepRecordView, StepRequest, StepState};
use de_tests::{TestAgent, TestController, rfc3339_secs, wait_until};

fn signal(agent: &TestAgent, sig: &str) -> Result<()> {
    let pid = agent.proc.as_ref().context("agent running")?.pid();
    let status = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()?;
    ensure!(status.success(), "kill -{sig} {pid}");
    Ok(())
}

fn node(ctl: &TestController, id: &str) -> Result<NodeView> {
    ctl.api("GET", &format!("/api/v1/nodes/{id}"), None)?
        .expect(200)
}

fn epoch_secs(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A controller and one enrolled agent on `ip` with `heartbeat` seconds
/// between heartbeats, online; `extra` flags for the controller.
fn one_node(
    dir: &std::path::Path,
    ip: &str,
    heartbeat: u64,
    extra: &[&str],
) -> Result<(TestController, TestAgent, String)> {
    let ctl = TestController::start_with(&dir.join("data"), "127.0.0.1:0", "127.0.0.1:0", extra)?;
    let code = ctl.new_code(None)?;
    let mut agent = TestAgent::new(dir, ip)?;
    let out = agent.enroll(&ctl.quic, &code)?;
    ensure!(out.status.success(), "enrol {ip}: {}", out.stderr);
    agent.start(heartbeat)?;
    let id = agent.node_id()?;
    wait_until(Duration::from_secs(30), "the node online", || {
        node(&ctl, &id).ok().filter(|n| n.online)
    })?;
    Ok((ctl, agent, id))
}

#[test]
fn a_frozen_agent_is_offline_after_three_heartbeats_not_before_and_back_when_it_thaws() -> Result<()>
{
    const HEARTBEAT: f64 = 2.0;
    let dir = tempfile::tempdir()?;
    let (ctl, agent, id) = one_node(dir.path(), "127.0.29.11", HEARTBEAT as u64, &[])?;
    // Wait for a heartbeat after the link's first moments, so last_seen moves with them.
    let first = node(&ctl, &id)?.last_seen;
    wait_until(Duration::from_secs(10), "a heartbeat", || {
        node(&ctl, &id).ok().filter(|n| n.last_seen != first)
    })?;

    signal(&agent, "STOP")?;
    let stopped = epoch_secs(SystemTime::now());
    // Watch it closely: the last moment it was still online, the first it was not.
    let mut last_online = stopped;
    let gone = loop {
        let n = node(&ctl, &id)?;
        let now = epoch_secs(SystemTime::now());
        if !n.online {
            break (now, n);
        }
        last_online = now;
        if now - stopped > 3.0 * HEARTBEAT + 10.0 {
            bail!(
                "still online {:.1} s after the agent froze: {n:?}",
                now - stopped
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (offline_at, n) = gone;
    let heard = n
        .last_seen
        .as_deref()
        .and_then(rfc3339_secs)
        .context("last_seen")?;
    // Its last heartbeat came before the freeze (and at most one interval before).
    assert!(
        heard <= stopped + 0.5 && stopped - heard <= HEARTBEAT + 1.5,
        "last heard {:.2} s before the freeze",
        stopped - heard
    );
    // Not offline before two intervals of silence...
    assert!(
        last_online - heard >= 2.0 * HEARTBEAT,
        "offline already {:.2} s after its last heartbeat (interval {HEARTBEAT} s)",
        last_online - heard
    );
    assert!(
        last_online - stopped >= HEARTBEAT,
        "offline {:.2} s after the freeze",
        last_online - stopped
    );
    // ...and offline once three have passed (with 2 s for the poll on a busy machine).
    assert!(
        offline_at - heard <= 3.0 * HEARTBEAT + 2.0,
        "still online {:.2} s after its last heartbeat",
        offline_at - heard
    );
    assert!(!n.revoked, "{n:?}");
    // An exec to every node leaves it out: with it the only node, there is
    // none to run on.
    let exec = ctl.api("POST", "/api/v1/exec", Some(r#"{"script": "true"}"#))?;
    assert_eq!(exec.status, 409, "{}", exec.body);
    assert!(
        exec.body.to_string().contains("no node is online"),
        "{}",
        exec.body
    );

    // It speaks again on the same link (the controller keeps it for the QUIC
    // idle timeout, 30 s): online within a heartbeat or two.
    signal(&agent, "CONT")?;
    let thawed = Instant::now();
    wait_until(
        Duration::from_secs(3 * HEARTBEAT as u64 + 5),
        "the node online again",
        || node(&ctl, &id).ok().filter(|n| n.online),
    )?;
    assert!(thawed.elapsed() < Duration::from_secs(3 * HEARTBEAT as u64 + 5));
    Ok(())
}

fn step(ctl: &TestController, id: &str) -> Result<StepRecordView> {
    ctl.api("GET", &format!("/api/v1/steps/{id}"), None)?
        .expect(200)
}

#[test]
fn a_result_made_while_the_link_was_timed_out_arrives_once_over_the_next_link() -> Result<()> {
    let dir = tempfile::tempdir()?;
    // A node grace far past the QUIC idle timeout: the watchdog must not
    // fail the step while the agent is frozen; the link drop is the point.
    let (ctl, agent, id) = one_node(dir.path(), "127.0.29.12", 1, &["--node-grace", "600"])?;
    let root = std::fs::canonicalize(&agent.root)?;
    let (runs, gate) = (root.join("runs"), root.join("gate"));
    let script = format!(
        "echo run >> {runs}; while [ ! -e {gate} ]; do sleep 0.1; done; echo finished after the gate",
        runs = runs.display(),
        gate = gate.display()
    );
    let req = StepRequest {
        action: StepAction::Script {
            script,
            user: None,
            env: vec![],
            timeout_secs: 300,
        },
        lane: None,
        wait_secs: Some(0),
    };
    let queued: StepRecordView = ctl.post_step(&id, &req, 202)?;
    let step_id = queued.step.id.to_string();
    wait_until(Duration::from_secs(30), "the step to run", || {
        runs.exists().then_some(())
    })?;

    // Frozen mid-step; the step's script (a process of its own) ends meanwhile.
    signal(&agent, "STOP")?;
    std::fs::write(&gate, b"")?;
    // The controller times the silent link out (QUIC idle timeout, 30 s).
    let closed = format!("node={id}");
    wait_until(
        Duration::from_secs(90),
        "the controller to close the link",
        || {
            ctl.proc
                .log_text()
                .lines()
                .any(|l| l.contains("agent link closed") && l.contains(&closed))
                .then_some(())
        },
    )?;
    let pending = step(&ctl, &step_id)?;
    assert_eq!(pending.state, StepState::Running, "{pending:?}");
    assert!(!node(&ctl, &id)?.online);

    // Thawed: the agent finds its link dead, links again and sends the result.
    signal(&agent, "CONT")?;
    let done = wait_until(Duration::from_secs(60), "the result", || {
        step(&ctl, &step_id).ok().filter(|s| s.state.is_final())
    })?;
    assert_eq!(done.state, StepState::Done, "{done:?}");
    let outcome = done.outcome.as_ref().context("outcome")?;
    assert!(
        outcome.stdout_tail.contains("finished after the gate"),
        "{outcome:?}"
    );
    wait_until(Duration::from_secs(30), "the node online again", || {
        node(&ctl, &id).ok().filter(|n| n.online)
    })?;
    // Recorded once, ran once.
    assert_eq!(step(&ctl, &step_id)?.finished_at, done.finished_at);
    assert_eq!(std::fs::read_to_string(&runs)?, "run\n");
    let ran = agent
        .log_text()
        .lines()
        .filter(|l| l.contains("running step") && l.contains(&step_id))
        .count();
    assert_eq!(ran, 1, "{}", agent.log_text());
    Ok(())
}
