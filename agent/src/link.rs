//! The agent's link to the controller: one mutual-TLS QUIC connection
//! (`de-agent/1`) carrying a control stream (`Hello`, heartbeats with monit
//! status, and this node's clock when the controller asks for it), one
//! long-poll pull stream per lane, and an events stream for step output and
//! results. Re-established with jittered exponential backoff whenever it
//! drops, until shutdown.
//!
//! The lane workers and the reporter outlive any one connection: a step keeps
//! running through a reconnect, and its result (persisted in the ledger) is
//! sent again until the controller acknowledges it.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ring::rand::SecureRandom;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use de_common::{
    AgentMsg, CLOCK_SKEW_WARN_SECS, ControllerMsg, ErrorChain, Heartbeat, Hello, Lane, LinkRefusal,
    PreviousStepKey, StepEvent, StepEventKind, StepId, StepRefusal, check_step, close_codes,
    decode_step_unverified, read_frame, renewal_due, skew_secs, unix_ms, write_frame,
};

use crate::hardware::{Sampler, hostname};
use crate::identity::Identity;
use crate::monit::Monit;
use crate::net::{self, NetError};
use crate::steps::{ExecContext, Ledger, LedgerError, execute};

/// How the link behaves.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    pub state_dir: PathBuf,
    pub root: PathBuf,
    /// A private monit control file; `None` uses the system monit.
    pub monit_control: Option<PathBuf>,
    pub heartbeat: Duration,
    /// First retry delay; doubles on every failed attempt up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    pub connect_timeout: Duration,
    /// The artifact cache's bound (`STATE/cache`).
    pub cache_max_bytes: u64,
}

/// Why the link could not start; each variant only passes its cause on.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Hardware(#[from] crate::hardware::HardwareError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Monit(#[from] crate::monit::MonitError),
    #[error(transparent)]
    Applied(#[from] crate::applied::AppliedError),
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
    /// This node holds a new certificate: connect again with it at once.
    Renewed,
    /// Another machine holds this node's identity; the text says what to do.
    Conflict(String),
}

/// A random number in [0, 1].
fn unit() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX)
}

/// A random factor in [0.5, 1.0] for jitter.
fn jitter() -> f64 {
    0.5 + unit() / 2.0
}

/// The delay before reconnecting after a link that worked was lost: random
/// between half the least backoff and one heartbeat interval.
///
/// When a controller restarts, each agent learns it from the stateless
/// reset its next packet draws, that is within one heartbeat, so the
/// agents' losses are already spread over one interval; this spreads their
/// reconnects over a second one. With 10,000 agents at 5 s heartbeats the
/// handshakes then arrive at about 1,000 a second instead of 2,000 (more
/// than this 2-core machine completes: the rest overflowed the socket and
/// waited out doubling retransmission timers). One agent alone waits a few
/// seconds at most.
pub fn reconnect_delay(min: Duration, heartbeat: Duration) -> Duration {
    let low = min / 2;
    let high = heartbeat.max(low);
    low + (high - low).mul_f64(unit())
}

/// The least time from the start of one connection attempt to the next
/// (a link renewed with a new certificate reconnects at once).
const MIN_ATTEMPT_GAP: Duration = Duration::from_secs(1);

/// The delay before attempt number `failures` (0-based).
pub fn backoff(min: Duration, max: Duration, failures: u32) -> Duration {
    let exp = min.saturating_mul(2u32.saturating_pow(failures.min(16)));
    exp.min(max).mul_f64(jitter())
}

type Conn = watch::Receiver<Option<quinn::Connection>>;

/// Waits until there is a live connection (or shutdown).
async fn connected(rx: &mut Conn, shutdown: &CancellationToken) -> Option<quinn::Connection> {
    loop {
        if let Some(c) = rx.borrow_and_update().clone()
            && c.close_reason().is_none()
        {
            return Some(c);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            r = rx.changed() => if r.is_err() { return None },
        }
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct Shared {
    identity: Identity,
    /// The step keys the agent accepts: the current one, and the previous
    /// one for the steps queued before the controller's last rotation.
    step_keys: Mutex<(Vec<u8>, Option<PreviousStepKey>)>,
    ledger: Mutex<Ledger>,
    ctx: ExecContext,
    events: mpsc::Sender<StepEvent>,
}

impl Shared {
    fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step_keys(&self) -> (Vec<u8>, Option<PreviousStepKey>) {
        self.step_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_step_keys(&self, current: Vec<u8>, previous: Option<PreviousStepKey>) {
        *self.step_keys.lock().unwrap_or_else(|p| p.into_inner()) = (current, previous);
    }
}

/// The agent's check of a pulled step: signed with the current step key,
/// or with the previous one when the step is one that key signed (its lane
/// and sequence were queued before the rotation) and its overlap has not
/// ended; then node, replay and expiry.
pub fn check_pulled(
    signed: &de_common::SignedStep,
    keys: &(Vec<u8>, Option<PreviousStepKey>),
    node: &de_common::NodeId,
    after_seq: u64,
    now: u64,
) -> Result<de_common::Step, StepRefusal> {
    match check_step(signed, &keys.0, node, after_seq, now) {
        Err(StepRefusal::BadSignature) => match (&keys.1, decode_step_unverified(signed)) {
            (Some(previous), Some(body)) if previous.covers(body.lane, body.seq, now) => {
                check_step(signed, &previous.public_key, node, after_seq, now)
            }
            _ => Err(StepRefusal::BadSignature),
        },
        other => other,
    }
}

/// Pulls and runs the steps of one lane, one at a time.
async fn lane_worker(
    lane: Lane,
    shared: Arc<Shared>,
    mut conn_rx: Conn,
    shutdown: CancellationToken,
) {
    'connection: loop {
        let Some(conn) = connected(&mut conn_rx, &shutdown).await else {
            return;
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        loop {
            let after_seq = shared.ledger().last_done(lane);
            if write_frame(&mut send, &AgentMsg::Pull { lane, after_seq })
                .await
                .is_err()
            {
                continue 'connection;
            }
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = read_frame::<_, ControllerMsg>(&mut recv) => a,
            };
            let signed = match answer {
                Ok(Some(ControllerMsg::Step(s))) => s,
                Ok(Some(ControllerMsg::Idle)) => continue,
                Ok(Some(other)) => {
                    warn!(?other, "unexpected answer to a pull");
                    continue 'connection;
                }
                Ok(None) | Err(_) => continue 'connection,
            };
            let node = &shared.identity.meta.node_id;
            match crate::steps::accept(
                &signed,
                &shared.step_keys(),
                node,
                lane,
                after_seq,
                now_unix(),
            ) {
                Err(refusal) => {
                    // Name what was refused as far as the (possibly untrusted) body says.
                    let (step_id, seq) = de_common::decode_step_unverified(&signed)
                        .map(|s| (s.id, s.seq))
                        .unwrap_or_else(|| (StepId::from(String::new()), 0));
                    warn!(lane = lane.as_str(), %step_id, seq, reason = %refusal, "refused a step");
                    let ev = StepEvent {
                        step_id,
                        lane,
                        seq,
                        kind: StepEventKind::Refused(refusal),
                    };
                    if let Err(e) = shared.ledger().refused(ev.clone()) {
                        warn!(error = %ErrorChain(&e), "could not record a refusal");
                    }
                    let _ = shared.events.send(ev).await;
                    // Do not hammer the controller with the same refused step.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Ok(step) => {
                    let begun = shared.ledger().begin(&step);
                    if let Err(e) = begun {
                        warn!(error = %ErrorChain(&e), "could not record the step start; not running it");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                    info!(lane = lane.as_str(), step = %step.id, seq = step.seq, action = step.action.kind(), "running step");
                    let _ = shared
                        .events
                        .send(StepEvent {
                            step_id: step.id.clone(),
                            lane,
                            seq: step.seq,
                            kind: StepEventKind::Started,
                        })
                        .await;
                    let outcome = execute(&step, &shared.ctx, &shared.events).await;
                    info!(step = %step.id, exit_code = ?outcome.exit_code, error = ?outcome.error, ms = outcome.duration_ms, "step finished");
                    let ev = StepEvent {
                        step_id: step.id.clone(),
                        lane,
                        seq: step.seq,
                        kind: StepEventKind::Finished(outcome),
                    };
                    if let Err(e) = shared.ledger().finish(ev.clone()) {
                        warn!(error = %ErrorChain(&e), "could not record the step result");
                    }
                    let _ = shared.events.send(ev).await;
                }
            }
        }
    }
}

/// Sends step events on an events stream, re-sending unacknowledged results after a reconnect.
async fn reporter(
    shared: Arc<Shared>,
    mut events: mpsc::Receiver<StepEvent>,
    mut conn_rx: Conn,
    shutdown: CancellationToken,
) {
    let mut pending: Option<StepEvent> = None;
    'connection: loop {
        let Some(conn) = connected(&mut conn_rx, &shutdown).await else {
            return;
        };
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let acks = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok(Some(ControllerMsg::Ack { step_id })) =
                    read_frame::<_, ControllerMsg>(&mut recv).await
                {
                    if let Err(e) = shared.ledger().acked(&step_id) {
                        warn!(error = %ErrorChain(&e), "could not record an acknowledgement");
                    }
                }
            })
        };
        let mut unacked = shared.ledger().unacked();
        for ev in &unacked {
            if write_frame(&mut send, &AgentMsg::Event(ev.clone()))
                .await
                .is_err()
            {
                acks.abort();
                continue 'connection;
            }
        }
        loop {
            let ev = match pending.take() {
                Some(ev) => ev,
                None => tokio::select! {
                    _ = shutdown.cancelled() => { acks.abort(); return; }
                    // A result written to a connection that has since died
                    // was never acknowledged: on the next connection the
                    // ledger's unacknowledged results go again. Without this
                    // the reporter would sit on the dead connection until
                    // the next event, which may never come (the controller
                    // waits for this very result).
                    _ = conn.closed() => { acks.abort(); continue 'connection; }
                    ev = events.recv() => match ev { Some(ev) => ev, None => return },
                },
            };
            // A result recorded in the ledger just before this connection
            // read it is also still in the channel: it went once already.
            if let Some(i) = unacked.iter().position(|u| *u == ev) {
                unacked.swap_remove(i);
                continue;
            }
            if write_frame(&mut send, &AgentMsg::Event(ev.clone()))
                .await
                .is_err()
            {
                // Results are in the ledger and go again from there; output lines are kept for the next link.
                if matches!(
                    ev.kind,
                    StepEventKind::Output { .. } | StepEventKind::Started
                ) {
                    pending = Some(ev);
                }
                acks.abort();
                continue 'connection;
            }
        }
    }
}

/// Keeps the link up until `shutdown` is cancelled.
pub async fn run(
    identity: Identity,
    opts: LinkOptions,
    shutdown: CancellationToken,
) -> Result<(), LinkError> {
    let addr = net::resolve(&identity.meta.controller)?;
    // Checked once here, so that a bad identity stops the start.
    net::link_config(&identity.ca_pem, &identity.cert_pem, &identity.key_pem)?;
    let endpoint = net::endpoint(addr, identity.meta.advertise_ip)?;
    let ip = net::node_ip(addr, identity.meta.advertise_ip);
    let sampler = Sampler::new(&opts.root)?;
    let monit = match &opts.monit_control {
        Some(file) => Monit::private(file)?,
        // The package opened its HTTP interface (`de-agent monit-setup`);
        // the agent only reads where it is, and never changes monit's files.
        None => Monit::system(),
    };
    if let Err(e) = monit.ensure_running().await {
        warn!(error = %ErrorChain(&e), "monit does not answer; component steps and status need it");
    }
    let ledger = Ledger::load(&opts.state_dir)?;
    let (events_tx, events_rx) = mpsc::channel(64);
    let local = net::local_ip(addr, identity.meta.advertise_ip);
    let machine = crate::identity::Identity::machine_id(&opts.state_dir, local)
        .map_err(|e| LinkError::Net(NetError::Machine(ErrorChain(&e).to_string())))?;
    let (conn_tx, conn_rx) = watch::channel(None);
    let fetcher = crate::fetch::Fetcher::new(
        opts.state_dir.join("cache"),
        opts.cache_max_bytes,
        conn_rx.clone(),
    )
    .map_err(|e| LinkError::Net(NetError::Machine(format!("the artifact cache: {e}"))))?;
    let shared = Arc::new(Shared {
        identity: identity.clone(),
        step_keys: Mutex::new((
            identity.step_public_key.clone(),
            identity.previous_step_key.clone(),
        )),
        ledger: Mutex::new(ledger),
        ctx: ExecContext {
            cancels: Arc::default(),
            applied: Arc::new(crate::applied::Applied::load(&opts.state_dir)?),
            root: opts.root.clone(),
            monit: monit.clone(),
            fetcher: Some(fetcher),
        },
        events: events_tx,
    });
    let workers = tokio_util::task::TaskTracker::new();
    for lane in Lane::ALL {
        workers.spawn(lane_worker(
            lane,
            shared.clone(),
            conn_rx.clone(),
            shutdown.clone(),
        ));
    }
    workers.spawn(reporter(
        shared.clone(),
        events_rx,
        conn_rx.clone(),
        shutdown.clone(),
    ));
    workers.close();

    let mut link = Link {
        endpoint,
        identity: identity.clone(),
        state_dir: opts.state_dir.clone(),
        machine,
        trusted: false,
        addr,
        ip,
        root: opts.root.display().to_string(),
        heartbeat: opts.heartbeat,
        connect_timeout: opts.connect_timeout,
        shared,
        monit,
        sampler,
        conn_tx,
        shutdown: shutdown.clone(),
    };
    let mut failures: u32 = 0;
    loop {
        let began = std::time::Instant::now();
        let end = link.session().await;
        let _ = link.conn_tx.send(None);
        // At most one attempt a second, whatever the backoff says: a
        // controller that comes back is not met by every agent at once.
        let floor = MIN_ATTEMPT_GAP.saturating_sub(began.elapsed());
        let delay = match end {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost(why) => {
                failures = 0;
                let d = reconnect_delay(opts.min_backoff, opts.heartbeat).max(floor);
                warn!(reason = %why, retry_in_ms = d.as_millis() as u64, "link to the controller lost; reconnecting");
                d
            }
            SessionEnd::Failed(why) => {
                let d = backoff(opts.min_backoff, opts.max_backoff, failures).max(floor);
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
            SessionEnd::Renewed => {
                info!(node = %identity.meta.node_id, "connecting again with the renewed certificate");
                failures = 0;
                Duration::ZERO
            }
            SessionEnd::Conflict(why) => {
                tracing::error!(node = %identity.meta.node_id, "{why}");
                opts.max_backoff
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    shutdown.cancel();
    // Running steps finish or are cut by their own timeouts; give them a grace period.
    let _ = tokio::time::timeout(Duration::from_secs(10), workers.wait()).await;
    link.endpoint
        .close(close_codes::SHUTDOWN.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(3), link.endpoint.wait_idle()).await;
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

/// What one connection to the controller needs; `run` keeps one and calls
/// [`Link::session`] again after each connection ends.
struct Link {
    endpoint: quinn::Endpoint,
    /// The node's identity as it stands (renewals and the controller's
    /// anchors change it); each connection is made with it.
    identity: Identity,
    state_dir: PathBuf,
    /// What tells this machine from a clone (`AgentMsg::Machine`).
    machine: String,
    /// The controller of this connection said what to trust (so it knows renewals).
    trusted: bool,
    /// The controller's address.
    addr: SocketAddr,
    /// This node's IP, as sent in `Hello`.
    ip: IpAddr,
    /// The node root, as sent in `Hello`.
    root: String,
    heartbeat: Duration,
    connect_timeout: Duration,
    shared: Arc<Shared>,
    monit: Monit,
    sampler: Sampler,
    /// Tells the lane workers and the reporter which connection to use.
    conn_tx: watch::Sender<Option<quinn::Connection>>,
    shutdown: CancellationToken,
}

/// A certificate renewal over the link.
#[derive(Default)]
struct Renewal {
    /// The controller said what to trust, so it knows `Renew`.
    allowed: bool,
    /// The key of the CSR sent, waiting for its certificate.
    pending: Option<String>,
}

impl Renewal {
    /// Makes a fresh key and CSR and sends it; the key stays here.
    async fn ask(
        &mut self,
        send: &mut quinn::SendStream,
        identity: &Identity,
    ) -> Result<(), SessionEnd> {
        if self.pending.is_some() {
            return Ok(());
        }
        let made = rcgen::KeyPair::generate().and_then(|key| {
            let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
            params
                .distinguished_name
                .push(rcgen::DnType::CommonName, identity.meta.node_id.as_str());
            Ok((key.serialize_pem(), params.serialize_request(&key)?.pem()?))
        });
        let (key_pem, csr_pem) = match made {
            Ok(m) => m,
            Err(e) => {
                warn!(error = %e, "could not make a key for the certificate renewal");
                self.allowed = false;
                return Ok(());
            }
        };
        info!("asking the controller for a new certificate");
        if let Err(e) = write_frame(send, &AgentMsg::Renew { csr_pem }).await {
            return Err(SessionEnd::Lost(format!(
                "renewal not sent: {}",
                ErrorChain(&e)
            )));
        }
        self.pending = Some(key_pem);
        Ok(())
    }

    /// Puts the new certificate in place if it is for the key sent.
    fn finish(&mut self, cert_pem: String, identity: &mut Identity, dir: &Path) -> SessionEnd {
        let Some(key_pem) = self.pending.take() else {
            return SessionEnd::Lost("a certificate came that was not asked for".into());
        };
        let fits = crate::identity::cert_facts(&cert_pem).is_some_and(|(_, _, public)| {
            rcgen::KeyPair::from_pem(&key_pem).is_ok_and(|k| k.public_key_raw() == public)
        });
        if !fits {
            return SessionEnd::Lost("the renewed certificate is not for the key sent".into());
        }
        match identity.save_renewed(dir, key_pem, cert_pem) {
            Ok(()) => {
                let until = crate::identity::cert_facts(&identity.cert_pem)
                    .map(|f| f.1)
                    .unwrap_or(0);
                info!(not_after_unix = until, "certificate renewed");
                SessionEnd::Renewed
            }
            Err(e) => SessionEnd::Lost(format!(
                "the renewed certificate could not be stored: {}",
                ErrorChain(&e)
            )),
        }
    }
}

impl Link {
    /// Stores what the controller says to trust and gives the lane workers
    /// the step keys; the controller then knows renewals.
    fn apply_trust(&mut self, trust: &de_common::Trust) {
        match self.identity.save_trust(&self.state_dir, trust) {
            Ok(true) => info!("stored the controller's CA and step keys"),
            Ok(false) => {}
            Err(e) => {
                warn!(error = %ErrorChain(&e), "could not store what the controller says to trust")
            }
        }
        self.shared.set_step_keys(
            self.identity.step_public_key.clone(),
            self.identity.previous_step_key.clone(),
        );
        self.trusted = true;
    }

    /// Whether this node's certificate has less than a third of its lifetime left.
    fn cert_due(&self) -> bool {
        crate::identity::cert_facts(&self.identity.cert_pem)
            .is_some_and(|(from, to, _)| renewal_due(from, to, now_unix()))
    }

    /// Connects, says `Hello`, and sends heartbeats until the connection ends.
    async fn session(&mut self) -> SessionEnd {
        let (addr, shutdown) = (self.addr, self.shutdown.clone());
        self.trusted = false;
        let config = match net::link_config(
            &self.identity.ca_pem,
            &self.identity.cert_pem,
            &self.identity.key_pem,
        ) {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(ErrorChain(&e).to_string()),
        };
        let shared = self.shared.clone();
        let identity = &shared.identity;
        let connecting =
            match self
                .endpoint
                .connect_with(config, addr, de_common::CONTROLLER_SERVER_NAME)
            {
                Ok(c) => c,
                Err(e) => return SessionEnd::Failed(e.to_string()),
            };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = tokio::time::timeout(self.connect_timeout, connecting) => match r {
                Err(_) => return SessionEnd::Failed(format!("no answer from {addr} in {} s", self.connect_timeout.as_secs())),
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
            ips: vec![self.ip.to_string()],
            hardware: self.sampler.hardware(),
            usage: self.sampler.usage(),
            root: self.root.clone(),
            heartbeat_secs: u32::try_from(self.heartbeat.as_secs().max(1)).unwrap_or(u32::MAX),
            last_done: self.shared.ledger().last_done_all(),
        });
        let machine = AgentMsg::Machine {
            id: self.machine.clone(),
        };
        if write_frame(&mut send, &machine).await.is_err()
            || write_frame(&mut send, &hello).await.is_err()
        {
            return conn
                .close_reason()
                .map(|e| classify(&e))
                .unwrap_or_else(|| SessionEnd::Failed("could not send Hello".into()));
        }
        // What to trust comes before Welcome (from controllers that know
        // it): stored before any step is pulled on this connection.
        let mut renew_now = false;
        let answer = loop {
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                a = tokio::time::timeout(self.connect_timeout, read_frame::<_, ControllerMsg>(&mut recv)) => a,
            };
            match answer {
                Ok(Ok(Some(ControllerMsg::Trust(trust)))) => {
                    self.apply_trust(&trust);
                    renew_now = trust.renew;
                }
                other => break other,
            }
        };
        match answer {
            Ok(Ok(Some(ControllerMsg::Welcome(w)))) => {
                info!(node = %identity.meta.node_id, controller = %addr, controller_version = %w.controller_version, "online");
            }
            Ok(Ok(Some(ControllerMsg::Refused(LinkRefusal::Revoked)))) => {
                return SessionEnd::Revoked;
            }
            Ok(Ok(Some(ControllerMsg::Refused(LinkRefusal::IdentityConflict(why))))) => {
                return SessionEnd::Conflict(format!("the controller refused the link: {why}"));
            }
            Ok(Ok(Some(other))) => {
                return SessionEnd::Failed(format!("controller refused the link: {other:?}"));
            }
            Ok(Ok(None)) | Ok(Err(_)) => {
                return match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await {
                    Ok(e) => classify(&e),
                    Err(_) => SessionEnd::Failed("controller closed the control stream".into()),
                };
            }
            Err(_) => return SessionEnd::Failed("the controller did not answer Hello".into()),
        }
        let _ = self.conn_tx.send(Some(conn.clone()));
        // After Welcome the control stream brings a ClockQuery, what to
        // trust and the answers to renewals; a task reads them so that the
        // loop below never cuts a frame in half.
        let (query_tx, mut queries) = mpsc::channel::<ControllerMsg>(4);
        let _reader = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while let Ok(Some(m)) = read_frame::<_, ControllerMsg>(&mut recv).await {
                if query_tx.send(m).await.is_err() {
                    return;
                }
            }
        }));
        let mut clock_asked = false;
        // Renewal: possible once the controller said what to trust; the key
        // of the CSR sent waits here for its certificate.
        let mut renewal = Renewal {
            allowed: self.trusted,
            pending: None,
        };
        if self.trusted
            && (renew_now || self.cert_due())
            && let Err(why) = renewal.ask(&mut send, &self.identity).await
        {
            return why;
        }
        let mut tick = tokio::time::interval(self.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        let mut monit_warned = false;
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
                Some(msg) = queries.recv() => {
                    let controller_ms = match msg {
                        ControllerMsg::ClockQuery { unix_ms } => unix_ms,
                        ControllerMsg::Trust(trust) => {
                            self.apply_trust(&trust);
                            if (trust.renew || self.cert_due())
                                && let Err(why) = renewal.ask(&mut send, &self.identity).await
                            {
                                return why;
                            }
                            continue;
                        }
                        ControllerMsg::Renewed { cert_pem } => {
                            return renewal.finish(cert_pem, &mut self.identity, &self.state_dir);
                        }
                        ControllerMsg::RenewRefused(why) => {
                            warn!(reason = %why, "the controller refused to renew this node's certificate");
                            renewal.pending = None;
                            renewal.allowed = false;
                            continue;
                        }
                        ControllerMsg::Refused(LinkRefusal::Revoked) => return SessionEnd::Revoked,
                        other => {
                            warn!(?other, "unexpected message on the control stream");
                            continue;
                        }
                    };
                    let now = unix_ms(SystemTime::now());
                    let skew = skew_secs(now, controller_ms);
                    if skew.unsigned_abs() >= CLOCK_SKEW_WARN_SECS.unsigned_abs() {
                        warn!(
                            skew_secs = skew,
                            "this node's clock is {} s {} the controller's: set it right (NTP)",
                            skew.unsigned_abs(),
                            if skew > 0 { "ahead of" } else { "behind" }
                        );
                    }
                    clock_asked = true;
                    if let Err(e) = write_frame(&mut send, &AgentMsg::Clock { unix_ms: now }).await {
                        return SessionEnd::Lost(format!("clock not sent: {}", ErrorChain(&e)));
                    }
                }
                _ = tick.tick() => {
                    if renewal.allowed && renewal.pending.is_none() && self.cert_due()
                        && let Err(why) = renewal.ask(&mut send, &self.identity).await
                    {
                        return why;
                    }
                    // The lanes' progress before anything is read: every step up to
                    // it shows in the monit status and the inventory sent below
                    // (see `AgentMsg::Inventory`).
                    let last_done = self.shared.ledger().last_done_all();
                    let components = match self.monit.status().await {
                        Ok(c) => { monit_warned = false; c }
                        Err(e) => {
                            if !monit_warned {
                                warn!(error = %ErrorChain(&e), "cannot read monit status");
                                monit_warned = true;
                            }
                            Vec::new()
                        }
                    };
                    let hb = AgentMsg::Heartbeat(Heartbeat { usage: self.sampler.usage(), components });
                    if let Err(e) = write_frame(&mut send, &hb).await {
                        return SessionEnd::Lost(format!("heartbeat not sent: {}", ErrorChain(&e)));
                    }
                    // What this node applied and how it drifted, for the next deployment.
                    let (applied, root, m) =
                        (self.shared.ctx.applied.clone(), self.shared.ctx.root.clone(), self.monit.clone());
                    let inventory = tokio::task::spawn_blocking(move || applied.inventory(&root, &m))
                        .await
                        .unwrap_or_default();
                    if let Err(e) = write_frame(&mut send, &AgentMsg::Inventory { last_done, instances: inventory }).await {
                        return SessionEnd::Lost(format!("inventory not sent: {}", ErrorChain(&e)));
                    }
                    // The controller issues steps with this node's skew; keep it current.
                    if clock_asked {
                        let clock = AgentMsg::Clock { unix_ms: unix_ms(SystemTime::now()) };
                        if let Err(e) = write_frame(&mut send, &clock).await {
                            return SessionEnd::Lost(format!("clock not sent: {}", ErrorChain(&e)));
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_failure_prints_each_cause_once() {
        let io = std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use");
        let addr = SocketAddr::from(([10, 0, 0, 9], 0));
        let e = LinkError::from(NetError::Bind(addr, io));
        assert_eq!(
            ErrorChain(&e).to_string(),
            "could not open a UDP socket on 10.0.0.9:0: is --advertise-ip an address of this node?: address in use"
        );
    }

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

    #[test]
    fn reconnects_after_a_lost_link_spread_over_one_heartbeat() {
        let min = Duration::from_millis(250);
        let heartbeat = Duration::from_secs(5);
        let delays: Vec<Duration> = (0..2000).map(|_| reconnect_delay(min, heartbeat)).collect();
        assert!(
            delays.iter().all(|d| *d >= min / 2 && *d <= heartbeat),
            "{delays:?}"
        );
        // Spread over the whole interval: each fifth of it gets some of
        // them (2,000 draws; a fifth gets none with probability 5 * 0.8^2000).
        for fifth in 0..5u32 {
            let (lo, hi) = (heartbeat * fifth / 5, heartbeat * (fifth + 1) / 5);
            assert!(
                delays.iter().any(|d| *d >= lo && *d <= hi),
                "none between {lo:?} and {hi:?}"
            );
        }
        // A heartbeat shorter than the backoff: the least delay, not less.
        assert_eq!(
            reconnect_delay(min, Duration::ZERO),
            min / 2,
            "a zero heartbeat"
        );
    }
}
