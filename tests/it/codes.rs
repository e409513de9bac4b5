//! Install codes against an attacker on the network and on the node: garbage
//! `Start`s do not burn the code, a burned code shows where the guesses came
//! from, a code for N nodes closes after the last, and the code never sits in
//! de-agent's command line.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use de_common::api::{CodeView, InstallCodeState};
use de_common::{
    CONTROLLER_SERVER_NAME, ENROLL_ALPN, EnrollClientMsg, EnrollRefusal, EnrollServerMsg,
    read_frame, write_frame,
};
use de_install_codes::{AgentHandshake, ChannelBinding, InstallCode};
use de_tests::{Output, TestAgent, TestController, command, spawn, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A QUIC client speaking `de-enroll/1` from `ip`, trusting the controller's CA.
fn enrol_client(data: &Path, ip: &str) -> Result<quinn::Endpoint> {
    let ca_pem = std::fs::read_to_string(data.join("ca.pem")).context("controller ca.pem")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    let mut ep = quinn::Endpoint::client(format!("{ip}:0").parse()?)?;
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    )));
    Ok(ep)
}

/// Sends one `Start` with `spake` on a new connection and returns the
/// controller's answer; then hangs up without confirming.
async fn start(ep: &quinn::Endpoint, ctl: SocketAddr, spake: Vec<u8>) -> Result<EnrollServerMsg> {
    let conn = ep.connect(ctl, CONTROLLER_SERVER_NAME)?.await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &EnrollClientMsg::Start { spake }).await?;
    let answer = read_frame::<_, EnrollServerMsg>(&mut recv)
        .await?
        .context("no answer to Start")?;
    conn.close(0u32.into(), b"bye");
    Ok(answer)
}

/// A well-formed SPAKE2 message for `guess` (the binding does not enter it).
fn spake_for(guess: &str) -> Result<Vec<u8>> {
    let binding = ChannelBinding {
        ekm: [0; 32],
        controller_cert_der: Vec::new(),
    };
    Ok(AgentHandshake::start(&InstallCode::parse(guess)?, binding).1)
}

fn wrong(code: &str) -> String {
    let n: u32 = code.parse().unwrap_or(0);
    format!("{:04}", (n + 1) % 10000)
}

fn shown(ctl: &TestController) -> Result<CodeView> {
    ctl.api("GET", "/api/v1/install-codes", None)?
        .expect(200)
        .context("GET install-codes")
}

/// de-agent with the agent's state dir, node root and address.
fn agent_cmd(a: &TestAgent, sub: &str, ctl: &TestController) -> Command {
    let mut cmd = command("de-agent");
    cmd.args([sub, "--controller", &ctl.quic.to_string()])
        .arg("--state-dir")
        .arg(&a.state_dir)
        .arg("--root")
        .arg(&a.root)
        .args(["--advertise-ip", &a.ip, "--connect-timeout-secs", "5"]);
    cmd
}

/// `de-agent enroll` with the code in DE_INSTALL_CODE.
fn enrol_by_env(a: &TestAgent, ctl: &TestController, code: &str) -> Result<Output> {
    let mut cmd = agent_cmd(a, "enroll", ctl);
    cmd.env("DE_INSTALL_CODE", code);
    de_tests::run_bounded(cmd, Duration::from_secs(60))
}

#[test]
fn garbage_starts_from_one_address_neither_burn_the_code_nor_tell_it_is_open() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start(&data)?;
    let rt = tokio::runtime::Runtime::new()?;
    let attacker = rt.block_on(async { enrol_client(&data, "127.0.17.1") })?;

    // No code open: a Start is answered like any other.
    let before = rt.block_on(start(&attacker, ctl.quic, spake_for("1234")?))?;
    assert!(
        matches!(before, EnrollServerMsg::Challenge { .. }),
        "with no code open: {before:?}"
    );

    let code = ctl.new_code(None)?;
    let mut answers = Vec::new();
    rt.block_on(async {
        for garbage in [vec![], vec![0u8; 33], vec![b'B'; 33], vec![7u8; 500]] {
            answers.push(start(&attacker, ctl.quic, garbage).await?);
        }
        for _ in 0..5 {
            answers.push(start(&attacker, ctl.quic, spake_for(&wrong(&code))?).await?);
        }
        anyhow::Ok(())
    })?;
    for a in &answers[..4] {
        assert!(
            matches!(a, EnrollServerMsg::Refused(EnrollRefusal::Invalid(why)) if why.contains("malformed")),
            "{a:?}"
        );
    }
    let challenged = answers[4..]
        .iter()
        .filter(|a| matches!(a, EnrollServerMsg::Challenge { .. }))
        .count();
    assert_eq!(challenged, 2, "one address gets 2 guesses: {answers:?}");
    assert!(
        matches!(&answers[8], EnrollServerMsg::Refused(EnrollRefusal::Invalid(why)) if why.contains("too many wrong install codes from this address")),
        "{:?}",
        answers[8]
    );

    let view = shown(&ctl)?;
    assert_eq!(view.state, InstallCodeState::Open);
    let sources: Vec<&str> = view
        .failed_attempts
        .iter()
        .map(|a| a.source.as_str())
        .collect();
    assert_eq!(sources, ["127.0.17.1", "127.0.17.1"], "{view:?}");

    // The real agent still gets in.
    let real = TestAgent::new(dir.path(), "127.0.17.2")?;
    let out = enrol_by_env(&real, &ctl, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    assert_eq!(shown(&ctl)?.nodes_admitted, 1);
    Ok(())
}

#[test]
fn a_burned_code_shows_where_the_guesses_came_from_and_tells_its_holder() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;
    for (ip, tries) in [("127.0.17.10", 2), ("127.0.17.11", 2), ("127.0.17.12", 1)] {
        let a = TestAgent::new(dir.path(), ip)?;
        for _ in 0..tries {
            let out = enrol_by_env(&a, &ctl, &wrong(&code))?;
            assert!(out.stderr.contains("wrong install code"), "{}", out.stderr);
        }
    }
    let view = wait_until(WAIT, "guesses no longer in progress", || {
        shown(&ctl)
            .ok()
            .filter(|v| v.failed_attempts.iter().all(|a| !a.in_progress))
    })?;
    assert_eq!(view.state, InstallCodeState::Burned);
    let sources: Vec<&str> = view
        .failed_attempts
        .iter()
        .map(|a| a.source.as_str())
        .collect();
    assert_eq!(
        sources,
        [
            "127.0.17.10",
            "127.0.17.10",
            "127.0.17.11",
            "127.0.17.11",
            "127.0.17.12"
        ]
    );
    assert!(view.failed_attempts.iter().all(|a| a.at.ends_with('Z')));

    let holder = TestAgent::new(dir.path(), "127.0.17.13")?;
    let out = enrol_by_env(&holder, &ctl, &code)?;
    assert!(!out.status.success());
    assert!(out.stderr.contains("burned"), "{}", out.stderr);
    Ok(())
}

#[test]
fn a_code_for_one_node_admits_one_agent_and_refuses_the_next() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let made: CodeView = ctl
        .api(
            "POST",
            "/api/v1/install-codes",
            Some(r#"{"ttl_secs": 600, "nodes": 1}"#),
        )?
        .expect(201)?;
    assert_eq!(
        (made.nodes, made.nodes_admitted, made.nodes_left),
        (Some(1), 0, Some(1))
    );
    let first = TestAgent::new(dir.path(), "127.0.17.20")?;
    let out = enrol_by_env(&first, &ctl, &made.code)?;
    assert!(out.status.success(), "{}", out.stderr);

    let second = TestAgent::new(dir.path(), "127.0.17.21")?;
    let out = enrol_by_env(&second, &ctl, &made.code)?;
    assert!(!out.status.success());
    assert!(
        out.stderr
            .contains("the install code has admitted all 1 node(s) it was made for"),
        "{}",
        out.stderr
    );
    assert!(!second.state_dir.join("agent.json").exists());
    let view = shown(&ctl)?;
    assert_eq!(view.state, InstallCodeState::Used);
    assert_eq!((view.nodes_admitted, view.nodes_left), (1, Some(0)));
    assert!(view.failed_attempts.is_empty(), "{view:?}");
    assert_eq!(ctl.nodes()?.len(), 1);

    let bad = ctl.api("POST", "/api/v1/install-codes", Some(r#"{"nodes": 0}"#))?;
    assert_eq!(bad.status, 400, "{:?}", bad.body);
    Ok(())
}

fn cmdline(pid: u32) -> Result<String> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(String::from_utf8_lossy(&raw).replace('\0', " "))
}

#[test]
fn the_code_is_never_in_the_agents_command_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ctl = TestController::start(&dir.path().join("data"))?;
    let code = ctl.new_code(None)?;

    // `run` with the code in the environment: enrols, then keeps running.
    let a = TestAgent::new(dir.path(), "127.0.17.30")?;
    let mut cmd = agent_cmd(&a, "run", &ctl);
    cmd.args(["--heartbeat-secs", "1"])
        .env("DE_INSTALL_CODE", &code);
    let (mut proc, _out) = spawn(
        "de-agent 127.0.17.30",
        cmd,
        &a.state_dir.with_extension("log"),
    )?;
    let pid = proc.pid();
    let line = wait_until(WAIT, "de-agent to start", || {
        cmdline(pid).ok().filter(|l| l.contains(" run "))
    })?;
    assert!(!line.contains(&code), "the code is in argv: {line}");
    wait_until(WAIT, "the agent online", || {
        ctl.node_by_ip(&a.ip).ok().flatten().filter(|n| n.online)
    })?;
    let line = cmdline(proc.pid())?;
    assert!(!line.contains(&code), "the code is in argv: {line}");
    proc.terminate(Duration::from_secs(15))?;

    // `enroll --code-stdin`.
    let b = TestAgent::new(dir.path(), "127.0.17.31")?;
    let mut cmd = agent_cmd(&b, "enroll", &ctl);
    cmd.arg("--code-stdin")
        .env_remove("DE_INSTALL_CODE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = child.id();
    let line = wait_until(WAIT, "de-agent to start", || {
        cmdline(pid).ok().filter(|l| l.contains(" enroll "))
    })?;
    assert!(!line.contains(&code), "the code is in argv: {line}");
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{code}\n").as_bytes())?;
    let status = wait_until(
        Duration::from_secs(60),
        "enroll --code-stdin to finish",
        || child.try_wait().ok().flatten(),
    )?;
    let out = child.wait_with_output()?;
    if !status.success() {
        bail!(
            "enroll --code-stdin failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("enrolled as node n-"),
        "{out:?}"
    );
    Ok(())
}
