//! The agent's link to the controller: one mutual-TLS QUIC connection
//! (`de-agent/1`), `Hello` then heartbeats, re-established with jittered
//! exponential backoff whenever it drops, until shutdown.

use std::path::PathBuf;
use std::time::Duration;

use ring::rand::SecureRandom;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use de_common::{
    AgentMsg, ControllerMsg, Heartbeat, Hello, LinkRefusal, close_codes, read_frame, write_frame,
};

use crate::hardware::{Sampler, hostname};
use crate::identity::Identity;
use crate::net::{self, NetError};

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub root: PathBuf,
    pub heartbeat: Duration,
    /// First retry delay; doubles on every failed attempt up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Net(#[from] NetError),
    #[error("{0}")]
    Hardware(#[from] crate::hardware::HardwareError),
}

/// Why one connection ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    /// The link worked for a while and then dropped: retry soon.
    Lost(String),
    /// The link could not be established: back off.
    Failed(String),
    /// The controller revoked this node.
    Revoked,
}

/// A random factor in [0.5, 1.0) for full-ish jitter.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.75;
    }
    0.5 + f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) / 2.0
}

/// The delay before attempt number `failures` (0-based).
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(failures.min(16)));
    exp.min(max).mul_f64(jitter())
}

/// Keeps the link up until `shutdown` is cancelled.
pub async fn run(
    identity: Identity,
    opts: LinkOptions,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let addr = net::resolve(&identity.meta.controller)?;
    let config = net::link_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)?;
    let endpoint = net::endpoint(addr, identity.meta.advertise_ip)?;
    let ip = net::node_ip(addr, identity.meta.advertise_ip);
    let mut sampler = Sampler::new(&opts.root)?;
    let mut failures: u32 = 0;
    loop {
        let end = session(
            &endpoint,
            &config,
            addr,
            &identity,
            ip,
            &opts,
            &mut sampler,
            &shutdown,
        )
        .await;
        let delay = match end {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost(why) => {
                warn!(reason = %why, "link to the controller lost; reconnecting");
                failures = 0;
                backoff(opts.min_backoff, opts.max_backoff, failures)
            }
            SessionEnd::Failed(why) => {
                let d = backoff(opts.min_backoff, opts.max_backoff, failures);
                warn!(reason = %why, retry_in_ms = d.as_millis() as u64, "cannot reach the controller");
                failures = failures.saturating_add(1);
                d
            }
            SessionEnd::Revoked => {
                warn!(
                    node = %identity.meta.node_id,
                    "the controller revoked this node: enrol it again with a new install code (de-agent enroll)"
                );
                opts.max_backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    endpoint.close(close_codes::SHUTDOWN.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(3), endpoint.wait_idle()).await;
    Ok(())
}

fn classify(e: &quinn::ConnectionError) -> SessionEnd {
    use quinn::ConnectionError as C;
    match e {
        C::ApplicationClosed(c) if c.error_code == close_codes::REVOKED.into() => {
            SessionEnd::Revoked
        }
        // TLS alert 44 (certificate_revoked) surfaces as crypto error 0x100 + 44.
        C::ConnectionClosed(c) if u64::from(c.error_code) == 0x100 + 44 => SessionEnd::Revoked,
        C::TransportError(t) if u64::from(t.code) == 0x100 + 44 => SessionEnd::Revoked,
        other => SessionEnd::Failed(other.to_string()),
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: std::net::SocketAddr,
    identity: &Identity,
    ip: std::net::IpAddr,
    opts: &LinkOptions,
    sampler: &mut Sampler,
    shutdown: &CancellationToken,
) -> SessionEnd {
    let connecting =
        match endpoint.connect_with(config.clone(), addr, de_common::CONTROLLER_SERVER_NAME) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(e.to_string()),
        };
    let conn = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        r = tokio::time::timeout(opts.connect_timeout, connecting) => match r {
            Err(_) => return SessionEnd::Failed(format!("no answer from {addr} in {} s", opts.connect_timeout.as_secs())),
            Ok(Err(e)) => return classify(&e),
            Ok(Ok(c)) => c,
        },
    };
    let (mut send, mut recv) = match conn.open_bi().await {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    let hello = AgentMsg::Hello(Hello {
        node_id: identity.meta.node_id.clone(),
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        hostname: hostname(),
        ips: vec![ip.to_string()],
        hardware: sampler.hardware(),
        usage: sampler.usage(),
        root: opts.root.display().to_string(),
        heartbeat_secs: u32::try_from(opts.heartbeat.as_secs().max(1)).unwrap_or(u32::MAX),
        last_done_seq: 0,
    });
    if write_frame(&mut send, &hello).await.is_err() {
        return conn
            .close_reason()
            .map(|e| classify(&e))
            .unwrap_or_else(|| SessionEnd::Failed("could not send Hello".into()));
    }
    let answer = tokio::select! {
        _ = shutdown.cancelled() => return SessionEnd::Shutdown,
        a = tokio::time::timeout(opts.connect_timeout, read_frame::<_, ControllerMsg>(&mut recv)) => a,
    };
    match answer {
        Ok(Ok(Some(ControllerMsg::Welcome(w)))) => {
            info!(node = %identity.meta.node_id, controller = %addr, controller_version = %w.controller_version, "online");
        }
        Ok(Ok(Some(ControllerMsg::Refused(LinkRefusal::Revoked)))) => return SessionEnd::Revoked,
        Ok(Ok(Some(ControllerMsg::Refused(r)))) => {
            return SessionEnd::Failed(format!("controller refused the link: {r:?}"));
        }
        Ok(Ok(None)) | Ok(Err(_)) => {
            return match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
                Ok(e) => classify(&e),
                Err(_) => SessionEnd::Failed("controller closed the control stream".into()),
            };
        }
        Err(_) => return SessionEnd::Failed("the controller did not answer Hello".into()),
    }
    let mut tick = tokio::time::interval(opts.heartbeat);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send.finish();
                conn.close(close_codes::SHUTDOWN.into(), b"agent stopping");
                return SessionEnd::Shutdown;
            }
            e = conn.closed() => {
                return match classify(&e) {
                    SessionEnd::Failed(why) => SessionEnd::Lost(why),
                    other => other,
                };
            }
            _ = tick.tick() => {
                let hb = AgentMsg::Heartbeat(Heartbeat { usage: sampler.usage(), components: Vec::new() });
                if let Err(e) = write_frame(&mut send, &hb).await {
                    return SessionEnd::Lost(format!("heartbeat not sent: {e}"));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let min = Duration::from_millis(100);
        let max = Duration::from_secs(2);
        for n in 0..40 {
            let d = backoff(min, max, n);
            let ceiling = min.saturating_mul(2u32.saturating_pow(n.min(16))).min(max);
            assert!(
                d <= ceiling && d >= ceiling / 2,
                "attempt {n}: {d:?} vs {ceiling:?}"
            );
        }
        let spread: std::collections::HashSet<u128> =
            (0..20).map(|_| backoff(min, max, 10).as_micros()).collect();
        assert!(spread.len() > 1, "no jitter");
    }
}
