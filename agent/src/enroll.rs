//! Enrolment with a 4-digit install code (DESIGN.md, Enrolment): SPAKE2 bound
//! to this TLS channel, then a CSR made here whose key never leaves the node.

use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use rcgen::{CertificateParams, DnType, KeyPair};
use rustls_pki_types::CertificateDer;

use de_common::{
    EnrollClientMsg, EnrollGrant, EnrollRefusal, EnrollRequest, EnrollServerMsg, FrameError,
    decode, encode, read_frame, write_frame,
};
use de_install_codes::{AgentHandshake, ChannelBinding, EKM_LABEL, HandshakeError, InstallCode};

use crate::hardware::{Sampler, hostname};
use crate::identity::{Identity, IdentityError, IdentityMeta};
use crate::net::{self, NetError};

/// Why enrolment failed; each message is the one line an operator sees.
#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Code(#[from] de_install_codes::CodeError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(
        "cannot reach the controller at {addr}: check the address and that UDP port {port} is open to this node ({reason})"
    )]
    Unreachable {
        addr: String,
        port: u16,
        reason: String,
    },
    /// The controller's confirmation did not verify. A controller with no
    /// open code answers like one with another code (so that nobody without
    /// the code learns whether one is open), hence both causes.
    #[error(
        "wrong install code, or no installation is open on the controller: check the 4 digits and that the console shows the code"
    )]
    WrongCode,
    #[error("the install code has expired: generate a new one in the console")]
    Expired,
    #[error(
        "no installation is open on the controller: generate an install code in the console first"
    )]
    NoInstallation,
    #[error(
        "too many wrong attempts: the install code was burned; generate a new one in the console"
    )]
    Burned,
    #[error("too many attempts from this address: wait {0} s and try again")]
    RateLimited(u64),
    #[error("the controller refused the enrolment: {0}")]
    Refused(String),
    #[error("the enrolment exchange failed ({0}); try again")]
    Protocol(String),
    #[error("could not save the node identity")]
    Save(#[from] IdentityError),
    #[error(transparent)]
    Hardware(#[from] crate::hardware::HardwareError),
    #[error("could not make the node key or CSR")]
    Key(#[from] rcgen::Error),
}

impl From<FrameError> for EnrollError {
    fn from(e: FrameError) -> Self {
        EnrollError::Protocol(de_common::ErrorChain(&e).to_string())
    }
}

impl From<HandshakeError> for EnrollError {
    fn from(e: HandshakeError) -> Self {
        match e {
            HandshakeError::WrongCode => EnrollError::WrongCode,
            other => EnrollError::Protocol(other.to_string()),
        }
    }
}

/// What to enrol with.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    pub controller: String,
    pub code: String,
    pub advertise_ip: Option<IpAddr>,
    pub root: std::path::PathBuf,
    pub connect_timeout: Duration,
}

async fn next(recv: &mut quinn::RecvStream) -> Result<EnrollServerMsg, EnrollError> {
    match tokio::time::timeout(Duration::from_secs(30), read_frame(recv)).await {
        Err(_) => Err(EnrollError::Protocol(
            "the controller did not answer in 30 s".into(),
        )),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(EnrollError::Protocol(
            "the controller closed the stream".into(),
        )),
        Ok(Err(e)) => Err(e.into()),
    }
}

fn refusal(r: EnrollRefusal) -> EnrollError {
    match r {
        EnrollRefusal::NoInstallation => EnrollError::NoInstallation,
        EnrollRefusal::Expired => EnrollError::Expired,
        EnrollRefusal::Burned => EnrollError::Burned,
        EnrollRefusal::RateLimited { retry_after_secs } => {
            EnrollError::RateLimited(retry_after_secs)
        }
        EnrollRefusal::WrongCode => EnrollError::WrongCode,
        EnrollRefusal::Invalid(why) => EnrollError::Refused(why),
    }
}

/// Enrols this node and saves its identity in `state_dir`.
pub async fn enroll(opts: &EnrollOptions, state_dir: &Path) -> Result<Identity, EnrollError> {
    InstallCode::parse(&opts.code)?;
    let addr = net::resolve(&opts.controller)?;
    let endpoint = net::endpoint(addr, opts.advertise_ip)?;
    enroll_on(&endpoint, opts, state_dir).await
}

/// [`enroll`] from an endpoint the caller keeps (the simulator enrols each
/// agent from the endpoint its link then uses, rather than opening and
/// dropping one more per agent). Waits until `endpoint` is idle.
pub async fn enroll_on(
    endpoint: &quinn::Endpoint,
    opts: &EnrollOptions,
    state_dir: &Path,
) -> Result<Identity, EnrollError> {
    let code = InstallCode::parse(&opts.code)?;
    let addr = net::resolve(&opts.controller)?;
    let ip = net::node_ip(addr, opts.advertise_ip);
    let unreachable = |reason: String| EnrollError::Unreachable {
        addr: opts.controller.clone(),
        port: addr.port(),
        reason,
    };
    let connecting = endpoint
        .connect_with(
            net::enroll_config()?,
            addr,
            de_common::CONTROLLER_SERVER_NAME,
        )
        .map_err(|e| unreachable(e.to_string()))?;
    let conn = match tokio::time::timeout(opts.connect_timeout, connecting).await {
        Err(_) => {
            return Err(unreachable(format!(
                "no answer in {} s",
                opts.connect_timeout.as_secs()
            )));
        }
        Ok(Err(e)) => return Err(unreachable(e.to_string())),
        Ok(Ok(c)) => c,
    };
    let result = exchange(&conn, code, ip, opts).await;
    conn.close(0u32.into(), b"done");
    endpoint.wait_idle().await;
    let grant = result?;
    let identity = Identity {
        meta: IdentityMeta {
            node_id: grant.0.node_id.clone(),
            controller: opts.controller.clone(),
            advertise_ip: opts.advertise_ip,
        },
        key_pem: grant.1,
        cert_pem: grant.0.cert_pem,
        ca_pem: grant.0.ca_pem,
        step_public_key: grant.0.step_public_key,
        previous_step_key: None,
    };
    identity.save(state_dir)?;
    Ok(identity)
}

async fn exchange(
    conn: &quinn::Connection,
    code: InstallCode,
    ip: IpAddr,
    opts: &EnrollOptions,
) -> Result<(EnrollGrant, String), EnrollError> {
    let server_cert = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok())
        .and_then(|c| c.first().cloned())
        .ok_or_else(|| EnrollError::Protocol("the controller presented no certificate".into()))?;
    let mut ekm = [0u8; 32];
    conn.export_keying_material(&mut ekm, EKM_LABEL, b"")
        .map_err(|_| EnrollError::Protocol("no channel binding".into()))?;
    let binding = ChannelBinding {
        ekm,
        controller_cert_der: server_cert.as_ref().to_vec(),
    };
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| EnrollError::Protocol(e.to_string()))?;
    let (hs, spake) = AgentHandshake::start(&code, binding);
    write_frame(&mut send, &EnrollClientMsg::Start { spake }).await?;
    let reply = match next(&mut recv).await? {
        EnrollServerMsg::Challenge { reply } => reply,
        EnrollServerMsg::Refused(r) => return Err(refusal(r)),
        EnrollServerMsg::Granted { .. } => {
            return Err(EnrollError::Protocol("grant before confirmation".into()));
        }
    };
    // Checks the controller's confirmation before sending anything else.
    let (mut keys, mac) = hs.finish(&reply)?;
    write_frame(&mut send, &EnrollClientMsg::Confirm { mac }).await?;

    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, hostname());
    let csr_pem = params.serialize_request(&key)?.pem()?;
    let sampler = Sampler::new(&opts.root)?;
    let req = EnrollRequest {
        csr_pem,
        hostname: hostname(),
        ips: vec![ip.to_string()],
        hardware: sampler.hardware(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let sealed = keys.seal(&encode(&req)?);
    write_frame(&mut send, &EnrollClientMsg::Request { sealed }).await?;
    let sealed = match next(&mut recv).await? {
        EnrollServerMsg::Granted { sealed } => sealed,
        EnrollServerMsg::Refused(r) => return Err(refusal(r)),
        EnrollServerMsg::Challenge { .. } => {
            return Err(EnrollError::Protocol("second challenge".into()));
        }
    };
    let grant: EnrollGrant = decode(&keys.open(&sealed)?)?;
    let _ = send.finish();
    // The grant's CA must be the one that issued the certificate this connection showed.
    check_chain(&grant.ca_pem, &server_cert)?;
    Ok((grant, key.serialize_pem()))
}

pub(crate) fn check_chain(
    ca_pem: &str,
    server_cert: &CertificateDer<'_>,
) -> Result<(), EnrollError> {
    use rustls_pki_types::pem::PemObject;
    let bad = || {
        EnrollError::Protocol("the controller's certificate is not signed by the CA it sent".into())
    };
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.map_err(|_| bad())?).map_err(|_| bad())?;
    }
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        std::sync::Arc::new(roots),
        std::sync::Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()
    .map_err(|_| bad())?;
    let name = rustls_pki_types::ServerName::try_from(de_common::CONTROLLER_SERVER_NAME)
        .map_err(|_| bad())?;
    use rustls::client::danger::ServerCertVerifier;
    verifier
        .verify_server_cert(
            server_cert,
            &[],
            &name,
            &[],
            rustls_pki_types::UnixTime::now(),
        )
        .map(|_| ())
        .map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use de_common::ErrorChain;

    use super::*;

    #[test]
    fn a_wrapped_error_is_printed_once() {
        let e = EnrollError::from(de_install_codes::CodeError::Malformed);
        assert_eq!(
            ErrorChain(&e).to_string(),
            "install code must be exactly 4 digits, like 0427"
        );
        let e = EnrollError::from(NetError::Resolve("ctl.invalid".into()));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "cannot resolve the controller address \"ctl.invalid\": give HOST:PORT, e.g. 10.0.0.5:50001"
        );
    }

    #[test]
    fn a_frame_error_keeps_its_cause() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "connection reset");
        let e = EnrollError::from(FrameError::Io(io));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "the enrolment exchange failed (stream i/o failed: connection reset); try again"
        );
    }
}
