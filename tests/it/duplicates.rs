//! Results that arrive twice or whose acknowledgement is lost (127.0.29.21),
//! told by a hand-built agent link with a real enrolled identity (the
//! node's key and certificate from `de-agent enroll`): a `Finished` sent
//! twice is acknowledged both times and recorded once, the first; a result
//! whose `Ack` never reached the agent is sent again over the next link,
//! acknowledged, and recorded once; no finished step is handed out again,
//! even to a pull that asks from the start; the deployment they belong to
//! runs each step once and succeeds.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use de_common::api::{DeployState, PhaseState, StepRecordView, StepState};
use de_common::{
    AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, Hardware, Heartbeat, Hello, Lane, NodeId,
    Step, StepEvent, StepEventKind, StepId, StepOutcome, Usage, decode_step_unverified, read_frame,
    write_frame,
};
use de_tests::{TestAgent, TestController, script_component, wait_until, write_catalog};
use serde_json::json;

const IP: &str = "127.0.29.21";
const ANSWER: Duration = Duration::from_secs(30);

/// One link of the hand-built agent: `Hello`, heartbeats every second (so
/// the node is online), pulls and an events stream.
struct Link {
    conn: quinn::Connection,
    _endpoint: quinn::Endpoint,
    background: Vec<tokio::task::JoinHandle<()>>,
    events: (quinn::SendStream, quinn::RecvStream),
}

impl Drop for Link {
    fn drop(&mut self) {
        for t in &self.background {
            t.abort();
        }
    }
}

impl Link {
    async fn open(
        controller: SocketAddr,
        cfg: quinn::ClientConfig,
        node: &NodeId,
        last_done: u64,
    ) -> Result<Link> {
        // From the node's own address: the controller takes a link only from it.
        let mut endpoint = quinn::Endpoint::client(format!("{IP}:0").parse()?)?;
        endpoint.set_default_client_config(cfg);
        let conn = endpoint
            .connect(controller, CONTROLLER_SERVER_NAME)?
            .await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let hello = Hello {
            node_id: node.clone(),
            agent_version: "hand-built".into(),
            hostname: "duplicates".into(),
            ips: vec![IP.into()],
            hardware: Hardware {
                cpus: 4,
                ram_mb: 4096,
                disk_mb: 10_000,
            },
            usage: Usage::default(),
            root: "/nonexistent".into(),
            heartbeat_secs: 1,
            last_done: vec![(Lane::Deploy, last_done)],
        };
        write_frame(&mut send, &AgentMsg::Hello(hello)).await?;
        match read_frame::<_, ControllerMsg>(&mut recv).await? {
            Some(ControllerMsg::Welcome(_)) => {}
            other => bail!("the controller did not welcome the link: {other:?}"),
        }
        let heartbeats = tokio::spawn(async move {
            loop {
                let hb = AgentMsg::Heartbeat(Heartbeat {
                    usage: Usage::default(),
                    components: vec![],
                });
                if write_frame(&mut send, &hb).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        // The controller's clock query and anything else on the control stream.
        let drain = tokio::spawn(async move {
            while let Ok(Some(_)) = read_frame::<_, ControllerMsg>(&mut recv).await {}
        });
        let events = conn.open_bi().await?;
        Ok(Link {
            conn,
            _endpoint: endpoint,
            background: vec![heartbeats, drain],
            events,
        })
    }

    /// The next deploy step after `after_seq`, on a pull stream of its own.
    async fn pull(&self, after_seq: u64) -> Result<Step> {
        let (mut send, mut recv) = self.conn.open_bi().await?;
        write_frame(
            &mut send,
            &AgentMsg::Pull {
                lane: Lane::Deploy,
                after_seq,
            },
        )
        .await?;
        match tokio::time::timeout(ANSWER, read_frame::<_, ControllerMsg>(&mut recv)).await?? {
            Some(ControllerMsg::Step(signed)) => {
                decode_step_unverified(&signed).context("a step that does not decode")
            }
            other => bail!("pull after {after_seq}: {other:?}"),
        }
    }

    async fn send(&mut self, step: &Step, kind: StepEventKind) -> Result<()> {
        let ev = StepEvent {
            step_id: step.id.clone(),
            lane: step.lane,
            seq: step.seq,
            kind,
        };
        write_frame(&mut self.events.0, &AgentMsg::Event(ev)).await?;
        Ok(())
    }

    /// The next acknowledgement on the events stream.
    async fn ack(&mut self) -> Result<StepId> {
        match tokio::time::timeout(ANSWER, read_frame::<_, ControllerMsg>(&mut self.events.1))
            .await??
        {
            Some(ControllerMsg::Ack { step_id }) => Ok(step_id),
            other => bail!("expected an Ack: {other:?}"),
        }
    }
}

fn finished(stdout: &str, exit_code: i32) -> StepEventKind {
    StepEventKind::Finished(StepOutcome {
        exit_code: Some(exit_code),
        duration_ms: 1,
        stdout_tail: stdout.to_owned(),
        ..StepOutcome::default()
    })
}

fn record(ctl: &TestController, id: &StepId) -> Result<StepRecordView> {
    ctl.api("GET", &format!("/api/v1/steps/{id}"), None)?
        .expect(200)
}

#[test]
fn a_result_sent_twice_or_whose_ack_was_lost_is_recorded_once_and_nothing_runs_twice() -> Result<()>
{
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    // Three steps on the node: two scripts, then the mark of what was applied.
    write_catalog(
        &data,
        "dup",
        "description = \"dup\"\nentry = \"twice\"\n",
        &[(
            "twice",
            &format!(
                "{}\n[[install]]\naction = \"script\"\nrun = 'echo second'\n",
                script_component("twice", "two scripts", "echo first")
            ),
        )],
    )?;
    let ctl = TestController::start(&data)?;
    let code = ctl.new_code(None)?;
    let agent = TestAgent::new(dir.path(), IP)?;
    let out = agent.enroll(&ctl.quic, &code)?;
    anyhow::ensure!(out.status.success(), "enrol: {}", out.stderr);
    let node = NodeId::from(agent.node_id()?);
    let cfg = de_tests::agent_quic_config(&agent.state_dir)?;
    let plan = json!({
        "components": {"twice": [IP]},
        "properties": {"domain": "dup.test", "catalog": "dup"},
    });

    let rt = tokio::runtime::Runtime::new()?;
    let mut link = rt.block_on(Link::open(ctl.quic, cfg.clone(), &node, 0))?;
    wait_until(Duration::from_secs(20), "the node online", || {
        ctl.node_by_ip(IP).ok().flatten().filter(|n| n.online)
    })?;
    let a = ctl.api("POST", "/deployment-engine/config", Some(&plan.to_string()))?;
    anyhow::ensure!(a.status == 201, "plan: {}", a.body);
    let deployment = ctl.deploy()?.id;

    // The first step's result, twice: acknowledged each time, recorded once.
    let first = rt.block_on(link.pull(0))?;
    rt.block_on(async {
        link.send(&first, StepEventKind::Started).await?;
        link.send(&first, finished("first run\n", 0)).await?;
        anyhow::ensure!(link.ack().await? == first.id, "ack of the first result");
        anyhow::Ok(())
    })?;
    let recorded = record(&ctl, &first.id)?;
    assert_eq!(recorded.state, StepState::Done, "{recorded:?}");
    rt.block_on(async {
        link.send(&first, finished("a second, different report\n", 1))
            .await?;
        anyhow::ensure!(link.ack().await? == first.id, "ack of the duplicate");
        anyhow::Ok(())
    })?;
    let again = record(&ctl, &first.id)?;
    assert_eq!(again.state, StepState::Done, "{again:?}");
    assert_eq!(again.finished_at, recorded.finished_at);
    assert_eq!(again.outcome, recorded.outcome);
    assert!(
        again
            .outcome
            .as_ref()
            .is_some_and(|o| o.stdout_tail == "first run\n" && o.exit_code == Some(0)),
        "{again:?}"
    );

    // The second step's result reaches the controller, but its Ack is lost:
    // the link drops before the agent reads it.
    let second = rt.block_on(link.pull(first.seq))?;
    assert!(second.seq > first.seq && second.id != first.id);
    rt.block_on(async {
        link.send(&second, StepEventKind::Started).await?;
        link.send(&second, finished("second run\n", 0)).await
    })?;
    let second_done = wait_until(ANSWER, "the second result recorded", || {
        record(&ctl, &second.id).ok().filter(|r| r.state.is_final())
    })?;
    assert_eq!(second_done.state, StepState::Done, "{second_done:?}");
    link.conn.close(0u32.into(), b"link lost");
    drop(link);

    // The next link: the unacknowledged result goes again and is
    // acknowledged; a pull from the very start gets neither finished step.
    let mut link = rt.block_on(Link::open(ctl.quic, cfg, &node, second.seq))?;
    rt.block_on(async {
        link.send(&second, finished("second run\n", 0)).await?;
        anyhow::ensure!(
            link.ack().await? == second.id,
            "ack of the result sent again"
        );
        anyhow::Ok(())
    })?;
    let resent = record(&ctl, &second.id)?;
    assert_eq!(resent.finished_at, second_done.finished_at);
    assert_eq!(resent.outcome, second_done.outcome);
    let third = rt.block_on(link.pull(0))?;
    assert!(
        third.seq > second.seq && third.id != first.id && third.id != second.id,
        "a finished step was handed out again: {third:?}"
    );
    rt.block_on(async {
        link.send(&third, StepEventKind::Started).await?;
        link.send(&third, finished("", 0)).await?;
        anyhow::ensure!(link.ack().await? == third.id, "ack of the third result");
        anyhow::Ok(())
    })?;

    // The deployment ran each of its steps once and succeeded.
    let d = ctl.finished(&deployment, Duration::from_secs(60))?;
    assert_eq!(d.state, DeployState::Succeeded, "{:?}", d.error);
    let steps = d.steps.as_deref().unwrap_or_default();
    assert_eq!(steps.len(), 3, "{steps:?}");
    for s in steps {
        assert_eq!(s.state, PhaseState::Done, "{s:?}");
        assert_eq!(s.attempts, 1, "{s:?}");
    }
    let ids: Vec<Option<&str>> = steps.iter().map(|s| s.step_id.as_deref()).collect();
    assert_eq!(
        ids,
        [
            Some(first.id.as_str()),
            Some(second.id.as_str()),
            Some(third.id.as_str())
        ]
    );
    assert!(
        steps[0]
            .output
            .as_deref()
            .is_some_and(|o| o.contains("first run")),
        "{steps:?}"
    );
    // The operations log tells each step's end once.
    let log = std::fs::read_to_string(data.join("logs/local.log"))?;
    let ends = |what: &str| {
        log.lines()
            .filter(|l| l.ends_with(&format!("twice_0 on {IP}: {what} done")))
            .count()
    };
    assert_eq!((ends("script"), ends("mark applied")), (2, 1), "{log}");
    drop(link);
    Ok(())
}
