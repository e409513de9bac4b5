//! Who may hold an agent link: a client without a certificate, or with one
//! from another CA (even naming an enrolled node), is refused.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use de_common::{
    AGENT_ALPN, AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, Hardware, Hello, Usage,
    read_frame, write_frame,
};
use de_tests::{TestAgent, TestController, wait_until};

fn client_config(
    ca_pem: &str,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> Result<quinn::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_slice(ca_pem.as_bytes())?)?;
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots);
    let mut tls = match identity {
        Some((cert, key)) => builder.with_client_auth_cert(vec![cert], key)?,
        None => builder.with_no_client_auth(),
    };
    tls.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    Ok(quinn::ClientConfig::new(Arc::new(
        quinn::crypto::rustls::QuicClientConfig::try_from(tls)?,
    )))
}

/// Connects, sends a Hello for `node_id`, and returns what the controller answered (or the error).
async fn try_link(
    addr: std::net::SocketAddr,
    cfg: quinn::ClientConfig,
    node_id: &str,
) -> Result<ControllerMsg> {
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    ep.set_default_client_config(cfg);
    let conn = ep.connect(addr, CONTROLLER_SERVER_NAME)?.await?;
    // "Connected" is not "authorized": the refusal shows on the first stream operation.
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(
        &mut send,
        &AgentMsg::Hello(Hello {
            node_id: node_id.into(),
            agent_version: "test".into(),
            hostname: "intruder".into(),
            ips: vec!["127.0.0.1".into()],
            hardware: Hardware::default(),
            usage: Usage::default(),
            root: "/".into(),
            heartbeat_secs: 1,
            last_done: vec![],
        }),
    )
    .await?;
    let msg = read_frame::<_, ControllerMsg>(&mut recv).await?;
    msg.context("stream ended without an answer")
}

#[test]
fn clients_without_a_certificate_or_with_a_foreign_ca_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let ctl = TestController::start(&data)?;
    let code = ctl.new_code(None)?;
    let a = TestAgent::new(dir.path(), "127.0.0.11")?;
    let out = a.enroll(&ctl.quic, &code)?;
    assert!(out.status.success(), "{}", out.stderr);
    let node_id = std::fs::read_to_string(a.state_dir.join("agent.json"))?;
    let node_id: serde_json::Value = serde_json::from_str(&node_id)?;
    let node_id = node_id["node_id"].as_str().context("node id")?.to_owned();
    let ca_pem = std::fs::read_to_string(data.join("ca.pem"))?;

    // A foreign CA issues a client certificate that names the enrolled node.
    let foreign_key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![])?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name
        .push(DnType::CommonName, "Deployment Engine CA");
    let foreign_ca = p.self_signed(&foreign_key)?;
    let issuer = Issuer::from_ca_cert_pem(&foreign_ca.pem(), foreign_key)?;
    let key = KeyPair::generate()?;
    let mut p = CertificateParams::new(vec![node_id.clone()])?;
    p.distinguished_name
        .push(DnType::CommonName, node_id.clone());
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let forged = p.signed_by(&key, &issuer)?;
    let forged_id = (
        forged.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    );

    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let no_cert = tokio::time::timeout(
            Duration::from_secs(20),
            try_link(ctl.quic, client_config(&ca_pem, None)?, &node_id),
        )
        .await?;
        let err = no_cert.expect_err("a client without a certificate must be refused");
        assert!(
            format!("{err:#}").contains("client certificate required"),
            "{err:#}"
        );

        let foreign = tokio::time::timeout(
            Duration::from_secs(20),
            try_link(ctl.quic, client_config(&ca_pem, Some(forged_id))?, &node_id),
        )
        .await?;
        let err = foreign.expect_err("a certificate of another CA must be refused");
        let text = format!("{err:#}");
        // The forged certificate names the controller's CA as its issuer; the
        // signature is what gives it away.
        assert!(
            text.contains("invalid peer certificate: BadSignature"),
            "{text}"
        );
        anyhow::Ok(())
    })?;
    // Neither attempt brought the node online.
    let node = wait_until(Duration::from_secs(5), "node listed", || {
        ctl.node_by_ip("127.0.0.11").ok().flatten()
    })?;
    assert!(!node.online, "{node:?}");
    assert!(node.last_seen.is_none(), "{node:?}");
    Ok(())
}
