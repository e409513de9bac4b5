//! Clock skew: a real agent reports its clock and its node shows the skew;
//! then a node whose clock is 90 s fast (a raw agent built from the
//! project's crates, holding the real node's identity, that reports and
//! checks with that clock) is warned about, shown, and still gets a short
//! exec as a step that has not expired on its clock, which it runs.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use anyhow::Result;

use de_common::api::{ExecRequest, NodeView};
use de_common::{
    AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, Hello, Lane, StepEvent, StepEventKind,
    StepOutcome, check_step, read_frame, unix_ms, write_frame,
};
use de_tests::{TestAgent, TestController, wait_until};

const IP: &str = "127.0.18.1";
/// How far ahead the raw agent's clock is.
const FAST_MS: u64 = 90_000;

fn node(ctl: &TestController, id: &str) -> Result<NodeView> {
    ctl.api("GET", &format!("/api/v1/nodes/{id}"), None)?
        .expect(200)
}

/// The raw agent: links as `node_id`, answers the clock query with a clock
/// `FAST_MS` ahead, pulls one ad-hoc step, checks it as the agent does with
/// that clock, and reports it done. Returns the step's `not_after` and the
/// clock it was checked at.
async fn fast_agent(
    controller: SocketAddr,
    state: std::path::PathBuf,
    node_id: String,
) -> Result<(u64, u64)> {
    let fast_ms = || unix_ms(SystemTime::now()) + FAST_MS;
    let mut endpoint = quinn::Endpoint::client(SocketAddr::new(IP.parse()?, 0))?;
    endpoint.set_default_client_config(de_tests::agent_quic_config(&state)?);
    let conn = endpoint
        .connect(controller, CONTROLLER_SERVER_NAME)?
        .await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let hello = Hello {
        node_id: node_id.as_str().into(),
        agent_version: "skewed".into(),
        hostname: "skewed".into(),
        ips: vec![IP.to_owned()],
        hardware: Default::default(),
        usage: Default::default(),
        root: "/".into(),
        heartbeat_secs: 1,
        last_done: vec![],
    };
    write_frame(&mut send, &AgentMsg::Hello(hello)).await?;
    match read_frame::<_, ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::Welcome(_)) => {}
        other => anyhow::bail!("expected Welcome, got {other:?}"),
    }
    match read_frame::<_, ControllerMsg>(&mut recv).await? {
        Some(ControllerMsg::ClockQuery { .. }) => {}
        other => anyhow::bail!("expected ClockQuery, got {other:?}"),
    }
    write_frame(&mut send, &AgentMsg::Clock { unix_ms: fast_ms() }).await?;

    let (mut pull_tx, mut pull_rx) = conn.open_bi().await?;
    let step_key = std::fs::read(state.join("step-key.pub"))?;
    let signed = loop {
        let pull = AgentMsg::Pull {
            lane: Lane::Adhoc,
            after_seq: 0,
        };
        write_frame(&mut pull_tx, &pull).await?;
        match read_frame::<_, ControllerMsg>(&mut pull_rx).await? {
            Some(ControllerMsg::Step(s)) => break s,
            Some(ControllerMsg::Idle) => continue,
            other => anyhow::bail!("expected a step, got {other:?}"),
        }
    };
    let now = fast_ms() / 1000;
    let step = check_step(&signed, &step_key, &node_id.as_str().into(), 0, now)
        .map_err(|r| anyhow::anyhow!("the step is refused on a clock 90 s fast: {r}"))?;
    let (mut ev_tx, mut ev_rx) = conn.open_bi().await?;
    for kind in [
        StepEventKind::Started,
        StepEventKind::Finished(StepOutcome {
            exit_code: Some(0),
            stdout_tail: "ran on a fast clock\n".into(),
            ..Default::default()
        }),
    ] {
        let ev = StepEvent {
            step_id: step.id.clone(),
            lane: Lane::Adhoc,
            seq: step.seq,
            kind,
        };
        write_frame(&mut ev_tx, &AgentMsg::Event(ev)).await?;
    }
    match read_frame::<_, ControllerMsg>(&mut ev_rx).await? {
        Some(ControllerMsg::Ack { .. }) => {}
        other => anyhow::bail!("expected an Ack, got {other:?}"),
    }
    Ok((step.not_after, now))
}

#[test]
fn a_node_with_a_fast_clock_is_shown_warned_and_still_runs_a_short_exec() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;
    let mut agent = TestAgent::new(dir.path(), IP)?;
    let out = agent.enroll(&ctl.quic, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    let id = agent.node_id()?;

    // The stock agent reports its clock: the same as the controller's.
    agent.start(1)?;
    let skew = wait_until(Duration::from_secs(30), "the node's clock skew", || {
        node(&ctl, &id).ok()?.clock_skew_secs
    })?;
    assert!(skew.abs() <= 1, "one machine, one clock: {skew}");
    if let Some(p) = agent.proc.as_mut() {
        p.terminate(Duration::from_secs(15))?;
    }

    // The same node with a clock 90 s fast.
    let rt = tokio::runtime::Runtime::new()?;
    let raw = rt.spawn(fast_agent(ctl.quic, agent.state_dir.clone(), id.clone()));
    let skew = wait_until(Duration::from_secs(30), "a skew of 90 s", || {
        node(&ctl, &id)
            .ok()?
            .clock_skew_secs
            .filter(|s| (89..=91).contains(s))
    })?;
    wait_until(Duration::from_secs(10), "a warning in the log", || {
        ctl.proc
            .log_text()
            .contains(&format!(
                "the node's clock is {} s ahead of the controller's",
                skew.unsigned_abs()
            ))
            .then_some(())
    })?;

    // A 1 s exec lives 16 s: on main, a clock 90 s fast refused it.
    let results = ctl.exec(&ExecRequest {
        script: "true".into(),
        targets: Some(vec![id.clone()]),
        timeout_secs: Some(1),
        user: None,
    })?;
    assert_eq!(results.len(), 1);
    assert_eq!(results[0].exit_code, Some(0), "{:?}", results[0]);
    assert_eq!(results[0].stdout, "ran on a fast clock\n");
    let (not_after, checked_at) = rt.block_on(raw)??;
    assert!(
        not_after >= checked_at && not_after <= checked_at + 16 + 2,
        "not_after {not_after} is on the node's clock ({checked_at}), 16 s on"
    );
    Ok(())
}
