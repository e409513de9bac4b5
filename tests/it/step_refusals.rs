//! A real agent facing a controller that hands it bad steps: tampered, for
//! another node, expired, and replayed steps are refused and reported; a good
//! one runs. The "controller" here is the test itself, holding the real CA
//! and step key from a real controller's data dir, so only the steps are fake.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use de_common::{
    AGENT_ALPN, AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, Lane, SignedStep, Step,
    StepAction, StepEvent, StepEventKind, StepRefusal, Welcome, read_frame, sign_step, write_frame,
};
use de_tests::{TestAgent, TestController, wait_until};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn server_config(data: &std::path::Path) -> Result<quinn::ServerConfig> {
    let ca_pem = std::fs::read_to_string(data.join("ca.pem"))?;
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(data.join("ca.key"))?)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_pem, ca_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![CONTROLLER_SERVER_NAME.to_owned()])?;
    p.distinguished_name
        .push(DnType::CommonName, CONTROLLER_SERVER_NAME);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let cert = p.signed_by(&key, &issuer)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()?;
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )?;
    tls.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    Ok(quinn::ServerConfig::with_crypto(Arc::new(
        quinn::crypto::rustls::QuicServerConfig::try_from(tls)?,
    )))
}

/// The steps the fake controller hands out, in order, on the deploy lane.
fn bad_and_good_steps(data: &std::path::Path, node: &str) -> Result<Vec<SignedStep>> {
    let doc = std::fs::read(data.join("step-signing.pk8"))?;
    let key = ring::signature::Ed25519KeyPair::from_pkcs8(&doc)
        .map_err(|_| anyhow::anyhow!("step key"))?;
    let step = |id: &str, node: &str, seq: u64, not_after: u64| Step {
        id: id.into(),
        deployment_id: None,
        node_id: node.into(),
        lane: Lane::Deploy,
        seq,
        issued_at: now(),
        not_after,
        action: StepAction::Script {
            script: format!("echo {id} >> \"$DE_ROOT/ran.log\""),
            user: None,
            env: vec![],
            timeout_secs: 10,
        },
    };
    let later = now() + 3600;
    let mut tampered = sign_step(&step("tampered", node, 1, later), &key)?;
    let at = tampered.body.len() - 5;
    tampered.body[at] ^= 0x20;
    let good = sign_step(&step("good", node, 1, later), &key)?;
    Ok(vec![
        tampered,
        sign_step(&step("other-node", "n-someone-else", 1, later), &key)?,
        sign_step(&step("expired", node, 1, now() - 10), &key)?,
        good.clone(),
        good,
    ])
}

async fn fake_controller(
    endpoint: quinn::Endpoint,
    mut steps: Vec<SignedStep>,
    events: Arc<Mutex<Vec<StepEvent>>>,
) -> Result<()> {
    steps.reverse();
    let steps = Arc::new(Mutex::new(steps));
    let conn = endpoint.accept().await.context("no agent")?.await?;
    let (mut send, mut recv) = conn.accept_bi().await?;
    // An agent says which machine it is (`Machine`) before its `Hello`.
    let mut first = read_frame::<_, AgentMsg>(&mut recv).await?;
    if let Some(AgentMsg::Machine { .. }) = first {
        first = read_frame::<_, AgentMsg>(&mut recv).await?;
    }
    match first {
        Some(AgentMsg::Hello(_)) => {}
        other => anyhow::bail!("expected Hello, got {other:?}"),
    }
    write_frame(
        &mut send,
        &ControllerMsg::Welcome(Welcome {
            controller_version: "fake".into(),
        }),
    )
    .await?;
    loop {
        let (mut send, mut recv) = conn.accept_bi().await?;
        let steps = steps.clone();
        let events = events.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = read_frame::<_, AgentMsg>(&mut recv).await {
                let answer = match msg {
                    AgentMsg::Pull {
                        lane: Lane::Deploy, ..
                    } => {
                        let next = steps.lock().ok().and_then(|mut s| s.pop());
                        match next {
                            Some(s) => ControllerMsg::Step(s),
                            None => {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                                ControllerMsg::Idle
                            }
                        }
                    }
                    AgentMsg::Pull { .. } => {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        ControllerMsg::Idle
                    }
                    AgentMsg::Event(ev) => {
                        let ack = matches!(
                            ev.kind,
                            StepEventKind::Finished(_) | StepEventKind::Refused(_)
                        )
                        .then(|| ControllerMsg::Ack {
                            step_id: ev.step_id.clone(),
                        });
                        if let Ok(mut e) = events.lock() {
                            e.push(ev);
                        }
                        match ack {
                            Some(a) => a,
                            None => continue,
                        }
                    }
                    _ => continue,
                };
                if write_frame(&mut send, &answer).await.is_err() {
                    return;
                }
            }
        });
    }
}

#[test]
fn tampered_foreign_expired_and_replayed_steps_are_refused_and_reported() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start(&data)?;
    let code = ctl.new_code(None)?;
    let mut agent = TestAgent::new(dir.path(), "127.0.5.1")?;
    let out = agent.enroll(&ctl.quic, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    let node = agent.node_id()?;
    let addr = ctl.quic;
    drop(ctl);

    let rt = tokio::runtime::Runtime::new()?;
    let events = Arc::new(Mutex::new(Vec::new()));
    let endpoint = rt.block_on(async {
        quinn::Endpoint::server(server_config(&data)?, addr).map_err(anyhow::Error::from)
    })?;
    let steps = bad_and_good_steps(&data, &node)?;
    let server = rt.spawn(fake_controller(endpoint, steps, events.clone()));
    agent.start(1)?;

    let seen = wait_until(Duration::from_secs(60), "five step reports", || {
        let e = events.lock().ok()?;
        let finals: Vec<StepEvent> = e
            .iter()
            .filter(|ev| {
                matches!(
                    ev.kind,
                    StepEventKind::Finished(_) | StepEventKind::Refused(_)
                )
            })
            .cloned()
            .collect();
        (finals.len() >= 5).then_some(finals)
    })?;
    let kinds: Vec<String> = seen
        .iter()
        .map(|ev| match &ev.kind {
            StepEventKind::Refused(StepRefusal::BadSignature) => "bad-signature".to_owned(),
            StepEventKind::Refused(StepRefusal::WrongNode(_)) => {
                format!("wrong-node:{}", ev.step_id)
            }
            StepEventKind::Refused(StepRefusal::Expired { .. }) => {
                format!("expired:{}", ev.step_id)
            }
            StepEventKind::Refused(StepRefusal::Replayed { seq, .. }) => {
                format!("replayed:{}:{seq}", ev.step_id)
            }
            StepEventKind::Finished(o) => format!("finished:{}:{:?}", ev.step_id, o.exit_code),
            other => format!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "bad-signature",
            "wrong-node:other-node",
            "expired:expired",
            "finished:good:Some(0)",
            "replayed:good:1",
        ]
    );
    // Only the good step ran, once.
    assert_eq!(
        std::fs::read_to_string(agent.root.join("ran.log"))?,
        "good\n"
    );
    assert!(agent.log_text().contains("refused a step"));
    server.abort();
    Ok(())
}
