//! A node's identity holds against a modified agent: it cannot take another
//! node's IP, a revoke is never undone and leaves no live link that can
//! still pull steps, and an absurd `Hello.last_done` is refused.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use de_common::api::{ExecRequest, NodeView};
use de_common::{
    AGENT_ALPN, AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, ENROLL_ALPN, Hardware, Hello,
    Lane, LinkRefusal, Usage, Welcome, read_frame, write_frame,
};
use de_tests::{TestAgent, TestController, bin, run_bounded, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A QUIC client holding the identity of the enrolled `agent`, bound to `ip`.
fn client(rt: &tokio::runtime::Runtime, agent: &TestAgent, ip: &str) -> Result<quinn::Endpoint> {
    let _in = rt.enter();
    let read = |name: &str| std::fs::read(agent.state_dir.join(name));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&read("ca.pem")?)?)?;
    let cert = CertificateDer::from_pem_slice(&read("node.pem")?)?;
    let key = PrivateKeyDer::from_pem_slice(&read("node.key")?)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![cert], key)?;
    tls.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse()?)?;
    ep.set_default_client_config(cfg);
    Ok(ep)
}

fn hello(node_id: &str, ip: &str, last_done: Vec<(Lane, u64)>) -> AgentMsg {
    AgentMsg::Hello(Hello {
        node_id: node_id.into(),
        agent_version: "modified".into(),
        hostname: "modified".into(),
        ips: vec![ip.into()],
        hardware: Hardware::default(),
        usage: Usage::default(),
        root: "/".into(),
        heartbeat_secs: 1,
        last_done,
    })
}

/// Connects, says `hello`, and returns the connection, its control stream
/// and the controller's answer.
async fn link(
    ep: &quinn::Endpoint,
    addr: SocketAddr,
    hello: &AgentMsg,
) -> Result<(quinn::Connection, quinn::SendStream, ControllerMsg)> {
    let conn = ep.connect(addr, CONTROLLER_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, hello).await?;
    let answer = read_frame::<_, ControllerMsg>(&mut recv)
        .await?
        .context("no answer to Hello")?;
    Ok((conn, send, answer))
}

fn enrolled(dir: &std::path::Path, ctl: &TestController, ip: &str) -> Result<TestAgent> {
    let code = ctl.new_code(None)?;
    let a = TestAgent::new(dir, ip)?;
    let out = a.enroll(&ctl.quic, &code)?;
    anyhow::ensure!(out.status.success(), "enrol {ip}: {}", out.stderr);
    Ok(a)
}

fn node(ctl: &TestController, id: &str) -> Result<NodeView> {
    ctl.api("GET", &format!("/api/v1/nodes/{id}"), None)?
        .expect(200)
}

#[test]
fn a_node_cannot_take_another_nodes_ip() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let (ip_a, ip_b) = ("127.0.15.1", "127.0.15.2");
    let mut a = enrolled(dir.path(), &ctl, ip_a)?;
    let mut b = enrolled(dir.path(), &ctl, ip_b)?;
    let (id_a, id_b) = (a.node_id()?, b.node_id()?);
    a.start(1)?;
    b.start(1)?;
    for id in [&id_a, &id_b] {
        wait_until(WAIT, &format!("{id} online"), || {
            node(&ctl, id).ok().filter(|n| n.online)
        })?;
    }

    // B goes offline; A's agent is restarted claiming B's address.
    if let Some(p) = b.proc.as_mut() {
        p.terminate(Duration::from_secs(10))?;
    }
    if let Some(p) = a.proc.as_mut() {
        p.terminate(Duration::from_secs(10))?;
    }
    // As a modified node would: its agent.json now names B's address.
    let meta_file = a.state_dir.join("agent.json");
    let mut meta: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&meta_file)?)?;
    meta["advertise_ip"] = ip_b.into();
    std::fs::write(&meta_file, serde_json::to_string_pretty(&meta)?)?;
    let mut imposter = TestAgent::new(dir.path(), ip_b)?;
    imposter.state_dir = a.state_dir.clone();
    imposter.root = a.root.clone();
    imposter.start(1)?;
    // Taken back (old behaviour: A online, holding B's IP) or refused.
    wait_until(WAIT, "A's restart seen", || {
        node(&ctl, &id_a)
            .ok()
            .filter(|n| n.online || n.ip_mismatch.is_some())
    })
    .with_context(|| format!("{}\n{}", imposter.log_text(), ctl.proc.log_text()))?;
    // Commands for B's IP never reach A.
    let ran = ctl.api(
        "POST",
        "/api/v1/exec",
        Some(&serde_json::to_string(&ExecRequest {
            script: "echo ran".into(),
            targets: Some(vec![ip_b.into()]),
            timeout_secs: Some(5),
            user: None,
        })?),
    )?;
    let on_a = ran.body.as_array().is_some_and(|rows| {
        rows.iter()
            .any(|r| r["node_id"] == id_a.as_str() && r["exit_code"] == 0)
    });
    assert!(!on_a, "{:?}", ran.body);

    let seen = node(&ctl, &id_a)?;
    let why = seen.ip_mismatch.clone().unwrap_or_default();
    assert_eq!(seen.source_ip.as_deref(), Some(ip_b), "{seen:?}");
    assert!(why.contains(ip_b) && why.contains("allow NAT"), "{why}");
    assert_eq!(seen.ips, vec![ip_a.to_owned()], "the claim is not applied");
    assert!(
        !seen.online,
        "a link from another node's IP is refused: {seen:?}"
    );
    assert_eq!(node(&ctl, &id_b)?.ips, vec![ip_b.to_owned()]);
    assert_eq!(node(&ctl, &id_b)?.source_ip.as_deref(), Some(ip_b));

    // The operator cannot give A an IP B holds.
    let put = ctl.api(
        "PUT",
        &format!("/api/v1/nodes/{id_a}"),
        Some(&format!(r#"{{"ips": ["{ip_b}"]}}"#)),
    )?;
    assert_eq!(put.status, 409, "{:?}", put.body);
    assert!(
        put.body["message"]
            .as_str()
            .is_some_and(|m| m.contains(&id_b)),
        "{:?}",
        put.body
    );
    // Nor can a second enrolment claim it.
    let c = TestAgent::new(&dir.path().join("c"), ip_b)?;
    let out = c.enroll(&ctl.quic, &ctl.new_code(None)?)?;
    assert!(!out.status.success(), "{}", out.stdout);
    assert!(out.stderr.contains("already node"), "{}", out.stderr);

    // With NAT allowed by the operator (through dectl) A comes back, still as A only.
    let mut cmd = std::process::Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(format!("http://{}", ctl.api))
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .args(["nodes", "set-ip", &id_a, "--allow-nat"]);
    let out = run_bounded(cmd, WAIT)?;
    assert!(out.status.success(), "{}", out.stderr);
    assert!(
        out.stdout.contains(ip_a) && out.stdout.contains("NAT"),
        "{}",
        out.stdout
    );
    let back = wait_until(WAIT, "A online behind NAT", || {
        node(&ctl, &id_a).ok().filter(|n| n.online)
    })?;
    assert!(back.allow_nat, "{back:?}");
    assert_eq!(back.ips, vec![ip_a.to_owned()], "{back:?}");
    assert!(back.ip_mismatch.is_some(), "still shown: {back:?}");
    let mut cmd = std::process::Command::new(bin("dectl"));
    cmd.arg("--controller")
        .arg(format!("http://{}", ctl.api))
        .arg("--token-file")
        .arg(ctl.data_dir.join("admin.token"))
        .arg("nodes");
    let out = run_bounded(cmd, WAIT)?;
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with(&format!("{id_a}: the link comes from {ip_b}"))),
        "{}",
        out.stdout
    );
    Ok(())
}

#[test]
fn a_revoke_racing_reconnects_holds_after_a_restart() -> Result<()> {
    const NODES: usize = 6;
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let mut ctl = TestController::start(&data)?;
    let mut agents = Vec::new();
    for i in 0..NODES {
        agents.push(enrolled(dir.path(), &ctl, &format!("127.0.15.{}", 11 + i))?);
    }
    let rt = tokio::runtime::Runtime::new()?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut loops = Vec::new();
    for a in &agents {
        let ep = client(&rt, a, &a.ip)?;
        let (id, ip, addr, stop) = (a.node_id()?, a.ip.clone(), ctl.quic, stop.clone());
        loops.push(rt.spawn(async move {
            // Reconnects as fast as it can (bounded), as a flapping agent would.
            let mut welcomed = 0u32;
            for _ in 0..400 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok((conn, _, ControllerMsg::Welcome(Welcome { .. }))) =
                    link(&ep, addr, &hello(&id, &ip, vec![])).await
                {
                    welcomed += 1;
                    conn.close(0u32.into(), b"again");
                }
            }
            welcomed
        }));
    }
    for a in &agents {
        let id = a.node_id()?;
        wait_until(WAIT, &format!("{id} linked"), || {
            node(&ctl, &id).ok().filter(|n| n.last_seen.is_some())
        })?;
        ctl.api("DELETE", &format!("/api/v1/nodes/{id}"), None)?
            .expect::<serde_json::Value>(204)?;
    }
    stop.store(true, Ordering::Relaxed);
    for l in loops {
        let welcomed = rt.block_on(l)?;
        assert!(welcomed > 0, "each loop got a link before the revoke");
    }
    ctl.proc.terminate(Duration::from_secs(15))?;
    drop(ctl);
    ctl = TestController::start(&data)?;
    for a in &agents {
        let id = a.node_id()?;
        let n = node(&ctl, &id)?;
        assert!(n.revoked, "revoked stays revoked after a restart: {n:?}");
        let ep = client(&rt, a, &a.ip)?;
        let again = rt.block_on(link(&ep, ctl.quic, &hello(&id, &a.ip, vec![])));
        assert!(
            !matches!(again, Ok((_, _, ControllerMsg::Welcome(_)))),
            "{again:?}"
        );
    }
    Ok(())
}

#[test]
fn a_revoked_node_cannot_pull_a_queued_step() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let a = enrolled(dir.path(), &ctl, "127.0.15.21")?;
    let id = a.node_id()?;
    let rt = tokio::runtime::Runtime::new()?;
    let ep = client(&rt, &a, &a.ip)?;
    let (conn, mut control, answer) =
        rt.block_on(link(&ep, ctl.quic, &hello(&id, &a.ip, vec![])))?;
    assert!(matches!(answer, ControllerMsg::Welcome(_)), "{answer:?}");
    // The control stream ends; the connection itself stays up on the agent's side.
    control.finish()?;
    let queued = ctl
        .api(
            "POST",
            &format!("/api/v1/nodes/{id}/steps"),
            Some(r#"{"action": {"MonitRemove": {"name": "x"}}, "wait_secs": 0}"#),
        )?
        .body;
    let step_id = queued["step"]["id"]
        .as_str()
        .context("queued step id")?
        .to_owned();
    ctl.api("DELETE", &format!("/api/v1/nodes/{id}"), None)?
        .expect::<serde_json::Value>(204)?;
    let pulled = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(
                &mut send,
                &AgentMsg::Pull {
                    lane: Lane::Adhoc,
                    after_seq: 0,
                },
            )
            .await?;
            anyhow::Ok(read_frame::<_, ControllerMsg>(&mut recv).await?)
        })
        .await
    });
    assert!(
        !matches!(pulled, Ok(Ok(Some(ControllerMsg::Step(_))))),
        "a revoked node got a step: {pulled:?}"
    );
    let step = ctl
        .api("GET", &format!("/api/v1/steps/{step_id}"), None)?
        .body;
    assert_eq!(step["state"], "failed", "{step}");
    Ok(())
}

#[test]
fn an_absurd_last_done_is_refused_with_the_reason() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let a = enrolled(dir.path(), &ctl, "127.0.15.31")?;
    let id = a.node_id()?;
    let rt = tokio::runtime::Runtime::new()?;
    let ep = client(&rt, &a, &a.ip)?;
    let (_conn, _control, answer) = rt
        .block_on(link(
            &ep,
            ctl.quic,
            &hello(&id, &a.ip, vec![(Lane::Adhoc, u64::MAX)]),
        ))
        .context("the absurd Hello")?;
    match answer {
        ControllerMsg::Refused(LinkRefusal::Invalid(why)) => {
            assert!(why.contains("issued only 0"), "{why}")
        }
        other => anyhow::bail!("expected a refusal, got {other:?}"),
    }
    // The controller still queues steps for the node with sane numbers.
    let (_conn, _control, answer) = rt.block_on(link(&ep, ctl.quic, &hello(&id, &a.ip, vec![])))?;
    assert!(matches!(answer, ControllerMsg::Welcome(_)), "{answer:?}");
    let queued = ctl.api(
        "POST",
        &format!("/api/v1/nodes/{id}/steps"),
        Some(r#"{"action": {"MonitRemove": {"name": "x"}}, "wait_secs": 0}"#),
    )?;
    assert!(queued.status < 300, "{:?}", queued.body);
    assert!(ctl.proc.log_text().contains("issued only 0"));
    Ok(())
}

/// A peer without a certificate (an enrolment) gets one stream and a few
/// frames of buffer, and only so many enrolments run at once.
#[test]
fn enrolment_peers_get_small_limits_and_a_cap() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start(&data)?;
    let rt = tokio::runtime::Runtime::new()?;
    let _in = rt.enter();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(&std::fs::read(
        data.join("ca.pem"),
    )?)?)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let cfg = quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    ));
    let mut ep = quinn::Endpoint::client("127.0.15.41:0".parse()?)?;
    ep.set_default_client_config(cfg);
    rt.block_on(async {
        let first = ep.connect(ctl.quic, CONTROLLER_SERVER_NAME)?.await?;
        let _one = first.open_bi().await?;
        let second = tokio::time::timeout(Duration::from_secs(2), first.open_bi()).await;
        assert!(
            second.is_err(),
            "a second stream is not granted before enrolment"
        );
        // 32 enrolments at once (this one among them); the next is closed.
        let mut held = vec![first];
        for _ in 1..32 {
            held.push(ep.connect(ctl.quic, CONTROLLER_SERVER_NAME)?.await?);
        }
        let extra = ep.connect(ctl.quic, CONTROLLER_SERVER_NAME)?.await?;
        let why = tokio::time::timeout(Duration::from_secs(10), extra.closed()).await?;
        assert!(why.to_string().contains("too many enrolments"), "{why}");
        for c in &held {
            assert!(c.close_reason().is_none(), "{:?}", c.close_reason());
        }
        anyhow::Ok(())
    })?;
    Ok(())
}

/// Holding one node gives no access to what other nodes are sent: an
/// artifact's bytes go only to a node with an open `fetch` step naming it.
#[test]
fn a_node_gets_only_the_artifacts_its_own_fetch_steps_name() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let a = enrolled(dir.path(), &ctl, "127.0.15.31")?;
    let b = enrolled(dir.path(), &ctl, "127.0.15.32")?;
    let (a_id, b_id) = (a.node_id()?, b.node_id()?);
    let secret = "a keystore meant for node b only";
    let up = ctl.request(
        "POST",
        "/api/v1/artifacts?name=keystore",
        Some(&ctl.token),
        Some(secret),
    )?;
    assert_eq!(up.status, 201, "{}", up.body);
    let sha = up.body["sha256"].as_str().context("sha256")?.to_owned();
    let fetch_step = |node: &str| -> Result<()> {
        let body = serde_json::json!({
            "action": {"Fetch": {"artifact": "keystore", "sha256": sha, "size": secret.len(),
                "path": "/tmp/keystore", "mode": 0o600, "owner": null, "unpack": null}},
            "wait_secs": 0,
        });
        let a = ctl.api(
            "POST",
            &format!("/api/v1/nodes/{node}/steps"),
            Some(&body.to_string()),
        )?;
        anyhow::ensure!(a.status == 200 || a.status == 202, "{}", a.body);
        Ok(())
    };
    // B's step is queued (B is not running, so it stays open).
    fetch_step(&b_id)?;
    let rt = tokio::runtime::Runtime::new()?;
    let ep = client(&rt, &a, &a.ip)?;
    let (conn, _control, answer) =
        rt.block_on(link(&ep, ctl.quic, &hello(&a_id, &a.ip, vec![])))?;
    assert!(matches!(answer, ControllerMsg::Welcome(_)), "{answer:?}");
    let ask = |conn: &quinn::Connection| {
        let conn = conn.clone();
        let sha = sha.clone();
        rt.block_on(async move {
            tokio::time::timeout(WAIT, async {
                let (mut send, mut recv) = conn.open_bi().await?;
                write_frame(
                    &mut send,
                    &AgentMsg::Fetch {
                        sha256: sha,
                        offset: 0,
                    },
                )
                .await?;
                let head = read_frame::<_, ControllerMsg>(&mut recv).await?;
                let rest = recv.read_to_end(1 << 20).await.unwrap_or_default();
                anyhow::Ok((head, rest))
            })
            .await?
        })
    };
    // A modified agent on A asks for B's artifact: refused, no byte sent.
    let (head, rest) = ask(&conn)?;
    assert!(
        matches!(&head, Some(ControllerMsg::FetchRefused(why)) if why.contains("no open fetch step")),
        "{head:?}"
    );
    assert!(rest.is_empty());
    // With a fetch step of its own, A is sent the bytes.
    fetch_step(&a_id)?;
    let (head, rest) = ask(&conn)?;
    assert!(
        matches!(head, Some(ControllerMsg::Artifact { size }) if size == secret.len() as u64),
        "{head:?}"
    );
    assert_eq!(rest, secret.as_bytes());
    Ok(())
}
