//! Reaching the controller: address resolution, the local endpoint (bound to
//! the advertised IP when it is local), and the two TLS client configurations.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use de_common::{AGENT_ALPN, ENROLL_ALPN};

/// Default QUIC port of the controller when HOST has none.
pub const DEFAULT_QUIC_PORT: u16 = 50001;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("cannot resolve the controller address {0:?}: give HOST:PORT, e.g. 10.0.0.5:50001")]
    Resolve(String),
    #[error("could not open a UDP socket on {0}: is --advertise-ip an address of this node?")]
    Bind(SocketAddr, #[source] std::io::Error),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("QUIC crypto configuration failed")]
    Crypto(#[from] quinn::crypto::rustls::NoInitialCipherSuite),
    #[error("the stored CA certificate is not valid: enrol again")]
    BadCa,
    #[error("the stored node key or certificate is not valid: enrol again")]
    BadIdentity,
    #[error("could not make this machine's id: {0}")]
    Machine(String),
}

pub fn resolve(controller: &str) -> Result<SocketAddr, NetError> {
    let with_port = if controller.parse::<SocketAddr>().is_ok()
        || controller
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
    {
        controller.to_owned()
    } else {
        format!("{controller}:{DEFAULT_QUIC_PORT}")
    };
    with_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| NetError::Resolve(controller.to_owned()))
}

/// The address this node uses toward `controller`: `advertise` if given, else
/// the source address the kernel picks for that destination.
pub(crate) fn node_ip(controller: SocketAddr, advertise: Option<IpAddr>) -> IpAddr {
    if let Some(ip) = advertise {
        return ip;
    }
    let any: SocketAddr = if controller.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(controller)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(any.ip())
}

/// The address this node's link leaves from: `advertise` when it is an
/// address of this node, else the one the kernel picks toward `controller`
/// (a cloned image keeps the original's `advertise` but not its address).
pub(crate) fn local_ip(controller: SocketAddr, advertise: Option<IpAddr>) -> IpAddr {
    match advertise {
        Some(ip) if UdpSocket::bind((ip, 0)).is_ok() => ip,
        _ => node_ip(controller, None),
    }
}

/// A client endpoint, bound to `advertise` when it is an address of this node.
pub fn endpoint(
    controller: SocketAddr,
    advertise: Option<IpAddr>,
) -> Result<quinn::Endpoint, NetError> {
    let local_ip = match advertise {
        Some(ip) if UdpSocket::bind((ip, 0)).is_ok() => ip,
        _ if controller.is_ipv4() => IpAddr::from([0, 0, 0, 0]),
        _ => IpAddr::from(std::net::Ipv6Addr::UNSPECIFIED),
    };
    let addr = SocketAddr::new(local_ip, 0);
    quinn::Endpoint::client(addr).map_err(|e| NetError::Bind(addr, e))
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(de_common::LINK_KEEP_ALIVE));
    t.max_idle_timeout(quinn::IdleTimeout::try_from(de_common::LINK_IDLE_TIMEOUT).ok());
    Arc::new(t)
}

fn quic(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, NetError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut c = quinn::ClientConfig::new(Arc::new(crypto));
    c.transport_config(transport());
    Ok(c)
}

/// Accepts whatever certificate the controller presents, for the enrolment
/// connection only: the install-code handshake, bound to this TLS channel,
/// is what authenticates the controller. The TLS signature is still checked,
/// so the channel binding belongs to the key holder.
#[derive(Debug)]
struct EnrolmentVerifier(Arc<CryptoProvider>);

impl ServerCertVerifier for EnrolmentVerifier {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS for the enrolment connection (`de-enroll/1`, no client certificate).
pub(crate) fn enroll_config() -> Result<quinn::ClientConfig, NetError> {
    let p = provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(EnrolmentVerifier(p)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![ENROLL_ALPN.to_vec()];
    quic(tls)
}

/// Mutual TLS for the agent link (`de-agent/1`): trusts only the pinned CAs.
pub fn link_config(
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Result<quinn::ClientConfig, NetError> {
    use rustls_pki_types::pem::PemObject;
    // The pinned bundle: during a CA rotation, the new CA and the old one.
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots
            .add(ca.map_err(|_| NetError::BadCa)?)
            .map_err(|_| NetError::BadCa)?;
    }
    if roots.is_empty() {
        return Err(NetError::BadCa);
    }
    let chain = vec![
        CertificateDer::from_pem_slice(cert_pem.as_bytes()).map_err(|_| NetError::BadIdentity)?,
    ];
    let key =
        PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|_| NetError::BadIdentity)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    tls.alpn_protocols = vec![AGENT_ALPN.to_vec()];
    quic(tls)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controller_addresses_resolve_with_or_without_port() {
        assert_eq!(
            resolve("127.0.0.1:4000").expect("addr"),
            "127.0.0.1:4000".parse().expect("sa")
        );
        assert_eq!(
            resolve("127.0.0.1").expect("addr").port(),
            DEFAULT_QUIC_PORT
        );
        assert!(resolve("no such host.invalid:1").is_err());
    }

    #[test]
    fn advertised_ip_wins_and_source_ip_is_found_otherwise() {
        let c: SocketAddr = "127.0.0.1:9".parse().expect("sa");
        let ip: IpAddr = "127.0.0.3".parse().expect("ip");
        assert_eq!(node_ip(c, Some(ip)), ip);
        assert_eq!(node_ip(c, None), IpAddr::from([127, 0, 0, 1]));
    }
}
