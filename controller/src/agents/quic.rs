//! The controller's QUIC endpoint: install-code enrolment (`de-enroll/1`) and
//! the enrolled agents' mutual-TLS links (`de-agent/1`) on one port.
//!
//! Invariants: a `de-agent/1` connection is served only if it presented a
//! certificate of this controller's CA whose node is enrolled and not revoked,
//! and came from one of the node's IPs (or the operator allowed NAT for it);
//! "connected" is never taken for "authorized". Revocation is checked again on
//! every pull and event. A peer without a certificate gets one stream and
//! small windows, and at most `MAX_ENROLLING` enrolments run at once.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::DistinguishedName;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls_pki_types::{CertificateDer, UnixTime};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use de_common::{
    AGENT_ALPN, AgentMsg, ControllerMsg, ENROLL_ALPN, EnrollClientMsg, EnrollGrant, EnrollRefusal,
    EnrollRequest, EnrollServerMsg, ErrorChain, FrameReader, LinkRefusal, NodeId, Trust, Welcome,
    close_codes, decode, encode, read_frame, skew_secs, unix_ms, write_frame, write_frames,
};
use de_install_codes::{ChannelBinding, EKM_LABEL, Refusal};

use crate::Controller;
use crate::agents::clock::{ClockNote, ClockWatch};
use crate::agents::codes::AttemptError;
use crate::agents::nodes::{LinkFacts, NodeError, NodeRecord, RevokedSet};
use crate::agents::pki::{Pki, node_id_of};
use crate::agents::steps::ResyncError;
use crate::util::random_hex;
use crate::util::rfc3339;

/// The least time between two stateless resets the endpoint sends: none
/// (see [`endpoint`]).
const RESET_INTERVAL: Duration = Duration::ZERO;
/// How long one enrolment exchange may take before the controller gives up on it.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an agent has to send its Hello after connecting.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// How many enrolments (peers without a certificate) may be under way at once;
/// more are closed at once.
const MAX_ENROLLING: usize = 32;
/// What a peer may make the controller buffer before it has shown a
/// certificate: one stream of enrolment messages, a few frames deep.
const UNAUTHENTICATED_STREAMS: u32 = 1;
const UNAUTHENTICATED_STREAM_WINDOW: u32 = 64 * 1024;
const UNAUTHENTICATED_WINDOW: u32 = 128 * 1024;
/// What an enrolled agent's link gets once its certificate is checked: the
/// control stream, one pull stream per lane and the events stream, with room.
const AGENT_STREAMS: u32 = 16;
const AGENT_WINDOW: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum QuicSetupError {
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("QUIC crypto configuration failed")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("could not listen for QUIC on {addr}: is the port in use?")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Accepts client certificates of our CA (during a CA rotation, of either
/// CA) unless their node was revoked.
#[derive(Debug)]
struct RevocationAwareVerifier {
    pki: Arc<Pki>,
    revoked: RevokedSet,
}

impl ClientCertVerifier for RevocationAwareVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        // Enrolling agents have no certificate yet; `de-agent/1` links without one are closed after the handshake.
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Agents hold one certificate and send it whatever the hints say.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let ok = self
            .pki
            .client_verifier()
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = node_id_of(end_entity).ok_or(rustls::Error::InvalidCertificate(
            rustls::CertificateError::BadEncoding,
        ))?;
        let revoked = self.revoked.read().map(|s| s.contains(&id)).unwrap_or(true);
        if revoked {
            return Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::Revoked,
            ));
        }
        Ok(ok)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pki
            .client_verifier()
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.pki
            .client_verifier()
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.pki.client_verifier().supported_verify_schemes()
    }
}

/// Serves the controller's current certificate: a CA retirement replaces
/// it for the connections that follow.
#[derive(Debug)]
struct CurrentCert(Arc<Pki>);

impl rustls::server::ResolvesServerCert for CurrentCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.certified_key())
    }
}

/// QUIC transport settings of the controller's endpoint: keep-alives well
/// inside the idle timeout, and the small stream and window limits of a peer
/// not known yet (`link` raises them for an enrolled agent).
pub fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(de_common::LINK_KEEP_ALIVE));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(de_common::LINK_IDLE_TIMEOUT).ok());
    t.max_concurrent_bidi_streams(UNAUTHENTICATED_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(UNAUTHENTICATED_STREAM_WINDOW.into());
    t.receive_window(UNAUTHENTICATED_WINDOW.into());
    Arc::new(t)
}

/// What checks an agent's client certificate in the TLS handshake: issued
/// by our CA, naming a node (its subject CN) that is not revoked.
/// (The CAs trusted follow a CA rotation: the verifier asks `pki` at each
/// handshake.)
pub(crate) fn client_verifier(pki: &Arc<Pki>, revoked: RevokedSet) -> Arc<dyn ClientCertVerifier> {
    Arc::new(RevocationAwareVerifier {
        pki: pki.clone(),
        revoked,
    })
}

/// Binds the controller's QUIC endpoint.
pub fn endpoint(
    addr: SocketAddr,
    pki: &Arc<Pki>,
    revoked: RevokedSet,
) -> Result<quinn::Endpoint, QuicSetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = client_verifier(pki, revoked);
    let mut tls = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(Arc::new(CurrentCert(pki.clone())));
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec(), AGENT_ALPN.to_vec()];
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server.transport_config(transport());
    let bind = |source| QuicSetupError::Bind { addr, source };
    let socket = std::net::UdpSocket::bind(addr).map_err(bind)?;
    grow_receive_buffer(&socket);
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, pki.reset_secret());
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    // After a restart every linked agent learns that its connection is gone
    // from the stateless reset its next packet draws. quinn sends at most one
    // reset per `min_reset_interval` (20 ms by default: 50 a second), and
    // reads the clock once per batch of datagrams it receives, so any
    // interval above zero also means one reset per batch. With 10,000 agents
    // most packets of the first seconds drew none; their senders then waited
    // out doubling probe timeouts, and the last came back 40 s after a
    // restart. A reset is always smaller than the packet that drew it, so
    // sending one for every such packet amplifies nothing; the endpoint's
    // own receive limit bounds the work a flood of them causes.
    config.min_reset_interval(RESET_INTERVAL);
    // Connection ids are validated with a keyed hash; the key must survive a
    // restart too, or packets of old connections are dropped instead of reset.
    let secret = pki.reset_secret();
    let mut cid_key = [0u8; 8];
    cid_key.copy_from_slice(&secret[..8]);
    let cid_key = u64::from_le_bytes(cid_key) ^ 0x6465_2d63_6964_6b79;
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    quinn::Endpoint::new(config, Some(server), socket, Arc::new(quinn::TokioRuntime)).map_err(bind)
}

/// The receive buffer the QUIC socket asks for.
const RECV_BUFFER: usize = 32 << 20;

/// Grows the QUIC socket's receive buffer to [`RECV_BUFFER`]. Linux gives a
/// UDP socket 208 KiB by default; after a restart every agent's packets
/// arrive at once (a reset each, then a handshake each), and with 10,000
/// agents most of them overflowed it: dropped packets wait out the
/// senders' doubling probe timeouts. 8 MiB still dropped 15,000 packets
/// of the first exec to 10,000 agents after a start (the answers arrive
/// together while the controller is slow on memory it has not touched
/// yet), which took 7.7 s instead of 2.5 s; 32 MiB dropped none. As root the size is forced past
/// `net.core.rmem_max`; otherwise it is capped there, and a small cap is
/// named in a warning.
fn grow_receive_buffer(socket: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if sockopt::set_socket_recv_buffer_size_force(socket, RECV_BUFFER).is_err() {
        let _ = sockopt::set_socket_recv_buffer_size(socket, RECV_BUFFER);
    }
    // Linux reports twice what it grants (the other half is its bookkeeping).
    match sockopt::socket_recv_buffer_size(socket) {
        Ok(got) if got / 2 >= RECV_BUFFER / 4 => {
            tracing::debug!(bytes = got / 2, "QUIC receive buffer");
        }
        Ok(got) => tracing::warn!(
            bytes = got / 2,
            wanted = RECV_BUFFER,
            "the QUIC socket's receive buffer is small: with thousands of agents, reconnects after a restart are dropped and retried slowly; raise net.core.rmem_max (sysctl -w net.core.rmem_max=33554432) or run the controller as root"
        ),
        Err(e) => tracing::debug!(error = %e, "could not read the QUIC receive buffer size"),
    }
}

/// Accepts connections until `shutdown` fires.
pub async fn serve(endpoint: quinn::Endpoint, ctl: Arc<Controller>, shutdown: CancellationToken) {
    let tasks = tokio_util::task::TaskTracker::new();
    let enrolling = Arc::new(tokio::sync::Semaphore::new(MAX_ENROLLING));
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => break,
            i = endpoint.accept() => match i { Some(i) => i, None => break },
        };
        let ctl = ctl.clone();
        let enrolling = enrolling.clone();
        tasks.spawn(async move {
            let remote = incoming.remote_address();
            match incoming.await {
                Ok(conn) => handle(conn, ctl, &enrolling).await,
                Err(e) => debug!(%remote, error = %ErrorChain(&e), "QUIC handshake failed"),
            }
        });
    }
    ctl.nodes.close_all();
    endpoint.close(close_codes::SHUTDOWN.into(), b"controller shutting down");
    tasks.close();
    let _ = tokio::time::timeout(Duration::from_secs(5), endpoint.wait_idle()).await;
}

async fn handle(conn: quinn::Connection, ctl: Arc<Controller>, enrolling: &tokio::sync::Semaphore) {
    let _open = ctl.metrics.quic_open();
    let alpn = conn
        .handshake_data()
        .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
        .and_then(|d| d.protocol);
    match alpn.as_deref() {
        Some(p) if p == ENROLL_ALPN => {
            let remote = conn.remote_address();
            let Ok(_permit) = enrolling.try_acquire() else {
                warn!(%remote, limit = MAX_ENROLLING, "too many enrolments under way; connection closed");
                conn.close(
                    close_codes::PROTOCOL.into(),
                    b"too many enrolments under way: try again later",
                );
                return;
            };
            if let Err(e) = enroll(&conn, &ctl).await {
                info!(%remote, error = %ErrorChain(&e), "enrolment ended without a node");
            }
            // Let the agent read the last frame before the connection goes.
            let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
        }
        Some(p) if p == AGENT_ALPN => link(conn, ctl).await,
        _ => conn.close(close_codes::PROTOCOL.into(), b"unknown ALPN"),
    }
}

#[derive(Debug, thiserror::Error)]
enum EnrollError {
    #[error("frame")]
    Frame(#[from] de_common::FrameError),
    #[error("connection")]
    Conn(#[from] quinn::ConnectionError),
    #[error("timed out")]
    Timeout,
    #[error("agent closed the stream early")]
    Closed,
    #[error("unexpected message {0}")]
    Unexpected(&'static str),
    #[error("refused: {0:?}")]
    Refused(EnrollRefusal),
    #[error("handshake")]
    Handshake(#[from] de_install_codes::HandshakeError),
    #[error("store")]
    Store(#[from] crate::store::StoreError),
}

async fn next<T: serde::de::DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<T, EnrollError> {
    match tokio::time::timeout(ENROLL_TIMEOUT, read_frame(recv)).await {
        Err(_) => Err(EnrollError::Timeout),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(EnrollError::Closed),
        Ok(Err(e)) => Err(e.into()),
    }
}

async fn refuse(send: &mut quinn::SendStream, why: EnrollRefusal) -> Result<(), EnrollError> {
    write_frame(send, &EnrollServerMsg::Refused(why.clone())).await?;
    let _ = send.finish();
    Err(EnrollError::Refused(why))
}

/// The refusal an agent is sent for a book's [`Refusal`].
fn enroll_refusal(r: Refusal) -> EnrollRefusal {
    match r {
        Refusal::NoInstallation => EnrollRefusal::NoInstallation,
        Refusal::Expired => EnrollRefusal::Expired,
        Refusal::Burned => EnrollRefusal::Burned,
        Refusal::RateLimited { retry_after_secs } => {
            EnrollRefusal::RateLimited { retry_after_secs }
        }
        other @ (Refusal::SourceExhausted | Refusal::Used { .. } | Refusal::Malformed(_)) => {
            EnrollRefusal::Invalid(other.to_string())
        }
    }
}

fn store_unavailable() -> EnrollRefusal {
    EnrollRefusal::Invalid("the controller could not save its state; try again later".into())
}

async fn enroll(conn: &quinn::Connection, ctl: &Controller) -> Result<(), EnrollError> {
    let (mut send, mut recv) = tokio::time::timeout(ENROLL_TIMEOUT, conn.accept_bi())
        .await
        .map_err(|_| EnrollError::Timeout)??;
    let spake = match next::<EnrollClientMsg>(&mut recv).await? {
        EnrollClientMsg::Start { spake } => spake,
        _ => return Err(EnrollError::Unexpected("expected Start")),
    };
    let source = conn.remote_address().ip();
    let mut ekm = [0u8; 32];
    if conn
        .export_keying_material(&mut ekm, EKM_LABEL, b"")
        .is_err()
    {
        return refuse(
            &mut send,
            EnrollRefusal::Invalid("no channel binding".into()),
        )
        .await;
    }
    let binding = ChannelBinding {
        ekm,
        controller_cert_der: ctl.pki.server_cert().as_ref().to_vec(),
    };
    let challenge = match ctl.codes.challenge(source, binding, &spake) {
        Ok(c) => c,
        Err(AttemptError::Refused(r)) => return refuse(&mut send, enroll_refusal(r)).await,
        Err(AttemptError::Store(e)) => {
            warn!(error = %ErrorChain(&e), "install-code book could not be saved; refusing enrolment");
            return refuse(&mut send, store_unavailable()).await;
        }
    };
    let attempt = challenge.attempt;
    let mac = async {
        write_frame(
            &mut send,
            &EnrollServerMsg::Challenge {
                reply: challenge.reply,
            },
        )
        .await?;
        match next::<EnrollClientMsg>(&mut recv).await? {
            EnrollClientMsg::Confirm { mac } => Ok(mac),
            _ => Err(EnrollError::Unexpected("expected Confirm")),
        }
    }
    .await;
    let keys = mac.and_then(|mac| {
        challenge
            .handshake
            .confirm(&mac)
            .map_err(EnrollError::Handshake)
    });
    let mut keys = match keys {
        Ok(k) => k,
        Err(e) => {
            ctl.codes.failed(&attempt);
            ctl.metrics.code_failures.inc();
            if attempt.counted() {
                warn!(%source, error = %ErrorChain(&e), "install-code guess failed; it counts against the code");
            }
            return match e {
                EnrollError::Handshake(_) => refuse(&mut send, EnrollRefusal::WrongCode).await,
                other => Err(other),
            };
        }
    };
    // The request is read, and the certificate made, before the node counts
    // toward the code, so an agent that fails here does not use up a node.
    let request = match next::<EnrollClientMsg>(&mut recv).await {
        Ok(EnrollClientMsg::Request { sealed }) => Ok(sealed),
        Ok(_) => Err(EnrollError::Unexpected("expected Request")),
        Err(e) => Err(e),
    };
    let sealed = match request {
        Ok(sealed) => sealed,
        Err(e) => {
            ctl.codes.failed(&attempt);
            ctl.metrics.code_failures.inc();
            return Err(e);
        }
    };
    let req: EnrollRequest = match keys
        .open(&sealed)
        .map_err(EnrollError::from)
        .and_then(|payload| decode(&payload).map_err(EnrollError::from))
    {
        Ok(req) => req,
        Err(e) => {
            ctl.codes.failed(&attempt);
            ctl.metrics.code_failures.inc();
            return Err(e);
        }
    };
    let node_id = NodeId::from(format!(
        "n-{}",
        random_hex(8).map_err(|_| EnrollError::Unexpected("rng"))?
    ));
    let cert_pem = match ctl.pki.issue_node_cert(&node_id, &req.csr_pem) {
        Ok(c) => c,
        Err(e) => {
            ctl.codes.failed(&attempt);
            ctl.metrics.code_failures.inc();
            return refuse(&mut send, EnrollRefusal::Invalid(e.to_string())).await;
        }
    };
    let cert_facts = {
        use rustls_pki_types::pem::PemObject;
        CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .ok()
            .and_then(|d| ctl.pki.facts(&d))
    };
    match ctl.codes.admit(&attempt) {
        Ok(Ok(())) => {}
        Ok(Err(r)) => {
            info!(%source, refusal = %r, "the agent proved the install code but may not enrol");
            return refuse(&mut send, enroll_refusal(r)).await;
        }
        Err(e) => {
            warn!(error = %ErrorChain(&e), "install-code book could not be saved; refusing enrolment");
            return refuse(&mut send, store_unavailable()).await;
        }
    }
    let enrolled = ctl.nodes.enrolled(NodeRecord {
        id: node_id.clone(),
        hostname: req.hostname.clone(),
        ips: req.ips.clone(),
        hardware: req.hardware.clone(),
        agent_version: req.agent_version.clone(),
        enrolled_at: rfc3339(SystemTime::now()),
        revoked: false,
        last_seen: None,
        root: "/".to_owned(),
        allow_nat: false,
        cert_not_after: cert_facts.as_ref().map(|f| rfc3339(f.not_after)),
        cert_ca: cert_facts.map(|f| f.ca),
        identity_conflict: None,
    });
    match enrolled {
        Ok(()) => {}
        Err(NodeError::Store(e)) => return Err(e.into()),
        Err(e) => {
            warn!(%source, hostname = %req.hostname, ips = ?req.ips, reason = %e, "enrolment refused");
            return refuse(&mut send, EnrollRefusal::Invalid(e.to_string())).await;
        }
    }
    let grant = EnrollGrant {
        node_id: node_id.clone(),
        cert_pem,
        ca_pem: ctl.pki.ca_pem(),
        step_public_key: ctl.pki.step_public_key(),
    };
    let sealed = keys.seal(&encode(&grant)?);
    write_frame(&mut send, &EnrollServerMsg::Granted { sealed }).await?;
    let _ = send.finish();
    info!(node = %node_id, hostname = %req.hostname, ips = ?req.ips, %source, "node enrolled");
    ctl.metrics.enrolments.inc();
    Ok(())
}

async fn link(conn: quinn::Connection, ctl: Arc<Controller>) {
    let remote = conn.remote_address();
    let certs = conn
        .peer_identity()
        .and_then(|i| i.downcast::<Vec<CertificateDer<'static>>>().ok());
    let Some(node_id) = certs.as_ref().and_then(|c| c.first()).and_then(node_id_of) else {
        info!(%remote, "agent link without a client certificate refused");
        conn.close(
            close_codes::UNAUTHENTICATED.into(),
            b"client certificate required: enrol this node first",
        );
        return;
    };
    if ctl.nodes.is_revoked(&node_id) || !ctl.nodes.exists(&node_id) {
        info!(%remote, node = %node_id, "link from a revoked or unknown node refused");
        conn.close(close_codes::REVOKED.into(), b"node revoked: enrol again");
        return;
    }
    // An enrolled node: room for its streams.
    conn.set_max_concurrent_bi_streams(AGENT_STREAMS.into());
    conn.set_receive_window(AGENT_WINDOW.into());
    let (mut send, mut recv) = match tokio::time::timeout(HELLO_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        _ => {
            conn.close(close_codes::PROTOCOL.into(), b"no control stream");
            return;
        }
    };
    // An agent that knows about cloned images says which machine it is
    // first; older ones start with Hello.
    let mut machine = None;
    let hello = loop {
        match tokio::time::timeout(HELLO_TIMEOUT, read_frame::<_, AgentMsg>(&mut recv)).await {
            Ok(Ok(Some(AgentMsg::Machine { id }))) if machine.is_none() && id.len() <= 128 => {
                machine = Some(id);
            }
            Ok(Ok(Some(AgentMsg::Hello(h)))) => break h,
            other => {
                debug!(%remote, ?other, "agent did not say Hello");
                conn.close(close_codes::PROTOCOL.into(), b"expected Hello");
                return;
            }
        }
    };
    let cert = certs.as_ref().and_then(|c| c.first()).cloned();
    let facts = cert.as_ref().and_then(|c| ctl.pki.facts(c));
    if hello.node_id != node_id {
        let _ = write_frame(
            &mut send,
            &ControllerMsg::Refused(LinkRefusal::IdentityMismatch),
        )
        .await;
        conn.close(close_codes::PROTOCOL.into(), b"Hello names another node");
        return;
    }
    let link_facts = LinkFacts {
        machine: machine.clone(),
        cert: facts.as_ref().map(|f| (rfc3339(f.not_after), f.ca.clone())),
    };
    if let Err(e) = ctl
        .nodes
        .connected(conn.clone(), remote.ip(), &hello, &link_facts)
        .await
    {
        let (refusal, code, why): (LinkRefusal, u32, &[u8]) = match &e {
            NodeError::Conflict(text) => {
                ctl.logs.record(&format!(
                    "node {node_id}: link from {remote} refused: {text}"
                ));
                (
                    LinkRefusal::IdentityConflict(text.clone()),
                    close_codes::PROTOCOL,
                    b"another machine holds this identity",
                )
            }
            NodeError::Revoked(_) | NodeError::Unknown(_) => (
                LinkRefusal::Revoked,
                close_codes::REVOKED,
                b"node revoked: enrol again",
            ),
            NodeError::Store(_) => {
                warn!(node = %node_id, error = %ErrorChain(&e), "could not record the node's link");
                (
                    LinkRefusal::Invalid("controller store unavailable".into()),
                    close_codes::PROTOCOL,
                    b"store unavailable",
                )
            }
            other => {
                warn!(node = %node_id, %remote, reason = %other, "agent link refused");
                (
                    LinkRefusal::Invalid(other.to_string()),
                    close_codes::PROTOCOL,
                    b"link refused: see the node on the controller",
                )
            }
        };
        let _ = write_frame(&mut send, &ControllerMsg::Refused(refusal)).await;
        let _ = send.finish();
        // Let the agent read why before the connection goes.
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        conn.close(code.into(), why);
        return;
    }
    if let Err(e) = ctl.steps.resync(&node_id, &hello.last_done) {
        let refusal = match &e {
            ResyncError::Store(_) => {
                warn!(node = %node_id, error = %ErrorChain(&e), "could not record the node's link");
                LinkRefusal::Invalid("controller store unavailable".into())
            }
            ResyncError::Implausible { .. } => {
                warn!(node = %node_id, %remote, reason = %e, "agent link refused");
                LinkRefusal::Invalid(e.to_string())
            }
        };
        let _ = write_frame(&mut send, &ControllerMsg::Refused(refusal)).await;
        let _ = send.finish();
        let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
        ctl.nodes.disconnected(&node_id, &conn);
        return;
    }
    // An agent that said which machine it is reads what to trust, and
    // whether to renew its certificate now, before `Welcome`: it pulls no
    // step before it holds the step keys as they stand.
    if machine.is_some() {
        let trust = ControllerMsg::Trust(Trust {
            ca_pem: ctl.pki.ca_pem(),
            step_public_key: ctl.pki.step_public_key(),
            previous_step_key: ctl.pki.previous_step_key_for(&node_id),
            renew: facts.as_ref().is_some_and(|f| f.due),
        });
        if write_frame(&mut send, &trust).await.is_err() {
            ctl.nodes.disconnected(&node_id, &conn);
            return;
        }
    }
    let welcome = ControllerMsg::Welcome(Welcome {
        controller_version: env!("CARGO_PKG_VERSION").to_owned(),
    });
    if write_frame(&mut send, &welcome).await.is_err() {
        ctl.nodes.disconnected(&node_id, &conn);
        return;
    }
    info!(node = %node_id, %remote, hostname = %hello.hostname, "agent online");
    // Agents that know the question answer with their clock (and then send
    // it after every heartbeat); older ones never read it.
    let query = ControllerMsg::ClockQuery {
        unix_ms: unix_ms(SystemTime::now()),
    };
    if write_frame(&mut send, &query).await.is_err() {
        ctl.nodes.disconnected(&node_id, &conn);
        return;
    }
    let mut renewals = 0u32;
    let mut clock = ClockWatch::default();
    let streams = tokio::spawn(accept_streams(conn.clone(), node_id.clone(), ctl.clone()));
    loop {
        match read_frame::<_, AgentMsg>(&mut recv).await {
            Ok(Some(AgentMsg::Renew { csr_pem })) => {
                renewals += 1;
                let answer = if renewals > MAX_RENEWALS_PER_LINK {
                    ControllerMsg::RenewRefused(format!(
                        "at most {MAX_RENEWALS_PER_LINK} renewals per link: connect again with the new certificate"
                    ))
                } else {
                    renew(&ctl, &node_id, &csr_pem, remote)
                };
                if write_frame(&mut send, &answer).await.is_err() {
                    break;
                }
            }
            Ok(Some(AgentMsg::Heartbeat(hb))) => {
                ctl.nodes.heartbeat(&node_id, hb.usage, hb.components)
            }
            Ok(Some(AgentMsg::Inventory {
                last_done,
                instances,
            })) => ctl.nodes.inventory(&node_id, &last_done, instances),
            Ok(Some(AgentMsg::Clock { unix_ms: node_ms })) => {
                let skew = skew_secs(node_ms, unix_ms(SystemTime::now()));
                ctl.nodes.clocks().record(&node_id, skew);
                match clock.observe(skew) {
                    Some(ClockNote::Skewed(s)) => warn!(
                        node = %node_id,
                        skew_secs = s,
                        "the node's clock is {} s {} the controller's: steps are issued with the skew allowed for, but set the node's clock right (NTP)",
                        s.unsigned_abs(),
                        if s > 0 { "ahead of" } else { "behind" }
                    ),
                    Some(ClockNote::Fixed(s)) => {
                        info!(node = %node_id, skew_secs = s, "the node's clock agrees with the controller's again")
                    }
                    None => {}
                }
            }
            Ok(Some(
                AgentMsg::Hello(_)
                | AgentMsg::Pull { .. }
                | AgentMsg::Event(_)
                | AgentMsg::Fetch { .. }
                | AgentMsg::Machine { .. },
            )) => {
                conn.close(
                    close_codes::PROTOCOL.into(),
                    b"unexpected message on the control stream",
                );
                break;
            }
            Ok(None) => break,
            Err(e) => {
                debug!(node = %node_id, error = %ErrorChain(&e), "control stream ended");
                if matches!(
                    e,
                    de_common::FrameError::Io(_) | de_common::FrameError::Truncated
                ) {
                    break;
                }
                conn.close(close_codes::PROTOCOL.into(), b"malformed frame");
                break;
            }
        }
    }
    streams.abort();
    ctl.nodes.disconnected(&node_id, &conn);
    info!(node = %node_id, "agent link closed");
}

/// How many certificates one link may ask for: one is the rule, a few
/// allow for an answer lost with a retry.
const MAX_RENEWALS_PER_LINK: u32 = 3;

/// A certificate for node `node_id` (the link's certificate names it; what
/// the CSR names is ignored) to the CSR's key, recorded on the node before
/// it is sent; refused for a revoked node.
fn renew(ctl: &Controller, node_id: &NodeId, csr_pem: &str, remote: SocketAddr) -> ControllerMsg {
    if ctl.nodes.is_revoked(node_id) {
        return ControllerMsg::RenewRefused("node revoked: enrol again".into());
    }
    let issued = ctl.pki.issue_node_cert(node_id, csr_pem).and_then(|pem| {
        use rustls_pki_types::pem::PemObject;
        let der = CertificateDer::from_pem_slice(pem.as_bytes())
            .map_err(|_| crate::agents::pki::PkiError::Random)?;
        Ok((pem, ctl.pki.facts(&der)))
    });
    let (pem, facts) = match issued {
        Ok((pem, Some(facts))) => (pem, facts),
        Ok((_, None)) => return ControllerMsg::RenewRefused("internal error".into()),
        Err(e) => {
            warn!(node = %node_id, %remote, error = %ErrorChain(&e), "certificate renewal refused");
            return ControllerMsg::RenewRefused(e.to_string());
        }
    };
    let not_after = rfc3339(facts.not_after);
    match ctl.nodes.renewed(node_id, not_after.clone(), facts.ca) {
        Ok(()) => {
            info!(node = %node_id, %remote, %not_after, "node certificate renewed");
            ControllerMsg::Renewed { cert_pem: pem }
        }
        Err(NodeError::Revoked(_) | NodeError::Unknown(_)) => {
            ControllerMsg::RenewRefused("node revoked: enrol again".into())
        }
        Err(e) => {
            warn!(node = %node_id, error = %ErrorChain(&e), "could not record the renewed certificate");
            ControllerMsg::RenewRefused("controller store unavailable; try again later".into())
        }
    }
}

/// Answers `AgentMsg::Fetch` on its own stream: `Artifact{size}` and the
/// bytes from `offset` to the end, then the stream is finished; or
/// `FetchRefused` saying why. Only a node with an open `Fetch` step for the
/// artifact gets it: holding one node does not give access to what other
/// nodes are sent.
async fn send_artifact(
    ctl: &Controller,
    node_id: &NodeId,
    sha256: &str,
    offset: u64,
    mut send: quinn::SendStream,
) {
    use tokio::io::AsyncSeekExt as _;
    let refuse = |why: String| ControllerMsg::FetchRefused(why);
    let opened = if !ctl.steps.may_fetch(node_id, sha256) {
        Err(refuse(format!(
            "no open fetch step of this node names the artifact {sha256}"
        )))
    } else if let Some(path) = ctl.artifacts.path_of(sha256) {
        match tokio::fs::File::open(&path).await {
            Ok(f) => match f.metadata().await {
                Ok(m) if offset <= m.len() => Ok((f, m.len())),
                Ok(m) => Err(refuse(format!(
                    "offset {offset} is past the artifact's end ({} bytes)",
                    m.len()
                ))),
                Err(e) => Err(refuse(format!("the controller cannot read it: {e}"))),
            },
            Err(e) => Err(refuse(format!("the controller cannot read it: {e}"))),
        }
    } else {
        Err(refuse(format!(
            "the controller no longer holds the artifact {sha256}: upload it again"
        )))
    };
    let (mut file, size) = match opened {
        Ok(f) => f,
        Err(answer) => {
            if let ControllerMsg::FetchRefused(why) = &answer {
                warn!(node = %node_id, artifact = %sha256, "fetch refused: {why}");
            }
            let _ = write_frame(&mut send, &answer).await;
            let _ = send.finish();
            return;
        }
    };
    if write_frame(&mut send, &ControllerMsg::Artifact { size })
        .await
        .is_err()
    {
        return;
    }
    if file.seek(std::io::SeekFrom::Start(offset)).await.is_err() {
        send.reset(quinn::VarInt::from_u32(1)).ok();
        return;
    }
    let sent = match ctl.artifact_send_kibps {
        // Reads of 1 MiB: each read of a tokio file is a trip to the
        // blocking pool, and `copy`'s own 8 KiB buffer would make 128 a MiB.
        None => {
            let mut reader = tokio::io::BufReader::with_capacity(1 << 20, &mut file);
            tokio::io::copy_buf(&mut reader, &mut send).await
        }
        Some(kibps) => throttled_copy(&mut file, &mut send, kibps).await,
    };
    match sent {
        Ok(n) => {
            debug!(node = %node_id, artifact = %sha256, bytes = n, from = offset, "artifact sent");
            let _ = send.finish();
        }
        // The link broke: the agent resumes from what it verified.
        Err(e) => debug!(node = %node_id, artifact = %sha256, "artifact transfer cut: {e}"),
    }
}

/// Copies at most `kibps` KiB a second (tests cut links mid-transfer).
async fn throttled_copy(
    from: &mut tokio::fs::File,
    to: &mut quinn::SendStream,
    kibps: u64,
) -> std::io::Result<u64> {
    use tokio::io::AsyncReadExt as _;
    let chunk = usize::try_from((kibps << 10) / 10)
        .unwrap_or(usize::MAX)
        .clamp(1, 1 << 20);
    let mut buf = vec![0u8; chunk];
    let mut n = 0u64;
    loop {
        let k = from.read(&mut buf).await?;
        if k == 0 {
            return Ok(n);
        }
        to.write_all(&buf[..k]).await?;
        n += k as u64;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The next message on an agent's work stream; `None` when the stream
/// ended (a malformed frame closes the connection).
async fn next_msg(
    recv: &mut FrameReader<quinn::RecvStream>,
    node_id: &NodeId,
    conn: &quinn::Connection,
) -> Option<AgentMsg> {
    match recv.next::<AgentMsg>().await {
        Ok(m) => m,
        Err(e) => {
            debug!(node = %node_id, error = %ErrorChain(&e), "agent stream ended");
            if !matches!(
                e,
                de_common::FrameError::Io(_) | de_common::FrameError::Truncated
            ) {
                conn.close(close_codes::PROTOCOL.into(), b"malformed frame");
            }
            None
        }
    }
}

/// How long a pull waits for a step before answering `Idle`.
const PULL_WINDOW: Duration = Duration::from_secs(20);

/// Serves the agent's pull and events streams until the connection ends.
async fn accept_streams(conn: quinn::Connection, node_id: NodeId, ctl: Arc<Controller>) {
    let tasks = tokio_util::task::TaskTracker::new();
    while let Ok((send, recv)) = conn.accept_bi().await {
        tasks.spawn(serve_stream(
            send,
            recv,
            node_id.clone(),
            ctl.clone(),
            conn.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
}

/// Events read and applied together, at most: what one link has sent
/// while the last batch was on its way to disk.
const MAX_EVENT_BATCH: usize = 256;

async fn serve_stream(
    mut send: quinn::SendStream,
    recv: quinn::RecvStream,
    node_id: NodeId,
    ctl: Arc<Controller>,
    conn: quinn::Connection,
) {
    // Through a frame reader, so that the frames that arrived together are
    // seen together.
    let mut recv = FrameReader::new(recv);
    let mut carried: Option<AgentMsg> = None;
    loop {
        let msg = match carried.take() {
            Some(m) => m,
            None => match next_msg(&mut recv, &node_id, &conn).await {
                Some(m) => m,
                None => return,
            },
        };
        // Checked on every message: a revoked node gets nothing more.
        if ctl.nodes.is_revoked(&node_id) {
            conn.close(close_codes::REVOKED.into(), b"node revoked by an operator");
            return;
        }
        match msg {
            AgentMsg::Pull { lane, after_seq } => {
                let answer = match ctl.steps.pull(&node_id, lane, after_seq, PULL_WINDOW).await {
                    // Revoked while the pull waited: the step is not handed out.
                    Ok(Some(_)) if ctl.nodes.is_revoked(&node_id) => {
                        conn.close(close_codes::REVOKED.into(), b"node revoked by an operator");
                        return;
                    }
                    Ok(Some(step)) => ControllerMsg::Step(step),
                    Ok(None) => ControllerMsg::Idle,
                    Err(e) => {
                        warn!(node = %node_id, error = %ErrorChain(&e), "cannot read the step queue");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        ControllerMsg::Idle
                    }
                };
                if write_frame(&mut send, &answer).await.is_err() {
                    return;
                }
            }
            AgentMsg::Event(ev) => {
                // The events that came with it: applied with one wait for
                // the disk, acknowledged in one write.
                let mut batch = vec![ev];
                while batch.len() < MAX_EVENT_BATCH && recv.holds_frame() {
                    match next_msg(&mut recv, &node_id, &conn).await {
                        Some(AgentMsg::Event(ev)) => batch.push(ev),
                        Some(other) => {
                            carried = Some(other);
                            break;
                        }
                        None => break,
                    }
                }
                let applied = ctl.steps.on_events(&node_id, batch).await;
                let mut acks = Vec::with_capacity(applied.acks.len());
                for (step_id, result) in applied.acks {
                    // A report is fresh once it counts this step done.
                    if let Some((lane, seq)) = result {
                        ctl.nodes.step_ended(&node_id, lane, seq);
                    }
                    acks.push(ControllerMsg::Ack { step_id });
                }
                if let Some((step_id, e)) = applied.error {
                    // No Ack: the agent sends the result again after reconnecting.
                    warn!(node = %node_id, step = %step_id, error = %ErrorChain(&e), "cannot record a step event");
                }
                if !acks.is_empty() && write_frames(&mut send, &acks).await.is_err() {
                    return;
                }
            }
            AgentMsg::Fetch { sha256, offset } => {
                send_artifact(&ctl, &node_id, &sha256, offset, send).await;
                return;
            }
            AgentMsg::Hello(_)
            | AgentMsg::Heartbeat(_)
            | AgentMsg::Inventory { .. }
            | AgentMsg::Clock { .. }
            | AgentMsg::Machine { .. }
            | AgentMsg::Renew { .. } => {
                conn.close(
                    close_codes::PROTOCOL.into(),
                    b"control message on a work stream",
                );
                return;
            }
        }
    }
}
