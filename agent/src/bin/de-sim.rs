//! `de-sim`: N simulated agents in one process against a real controller,
//! for scale tests and benchmarks. Each has its own key, certificate, QUIC
//! endpoint and loopback address, enrols with the install code like
//! `de-agent enroll`, then keeps the agent's link (`Machine`, `Hello`,
//! heartbeats, inventory, one pull stream per lane, an events stream) and
//! answers every step it verifies without running it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use clap::Parser;
use ring::rand::SecureRandom;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn};

use de_agent::{
    EnrollError, EnrollOptions, Identity, Sampler, backoff, check_pulled, reconnect_delay,
};
use de_common::{
    AgentMsg, ControllerMsg, ErrorChain, Hardware, Heartbeat, Hello, InstanceState, Lane,
    LinkRefusal, NodeId, PreviousStepKey, SignedStep, StepAction, StepEvent, StepEventKind, StepId,
    StepOutcome, StepRefusal, Trust, Usage, close_codes, read_frame, unix_ms, write_frame,
    write_frames,
};

/// Enrolments in flight at once. The controller counts an attempt as a
/// failed guess until its confirmation arrives and burns the code at 5, so
/// a sixth attempt in flight would be refused (`burned`) for the moment:
/// four leave room for a real agent enrolling beside the simulator.
const ENROL_CONCURRENCY: usize = 4;
/// Attempts per agent before its enrolment is given up.
const ENROL_ATTEMPTS: u32 = 12;
/// Reconnects: the first delay, doubling to the cap, jittered; never more
/// than one attempt per second per agent.
const MIN_BACKOFF: Duration = Duration::from_secs(1);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often progress goes to stderr.
const PROGRESS_EVERY: Duration = Duration::from_secs(5);
/// The file in the state dir that keeps every agent's lanes (their last
/// done sequences), keyed by address; older runs kept one per agent's
/// directory, still read when the shared one has no entry.
const LANES_FILE: &str = "sim-lanes.json";
/// How often the lanes are saved while steps finish.
const LANES_SAVE_EVERY: Duration = Duration::from_secs(1);

#[derive(Parser, Debug)]
#[command(
    name = "de-sim",
    version,
    about = "Simulated Deployment Engine agents: N virtual agents in one process, each on its own loopback address"
)]
struct Cli {
    /// The controller's QUIC address, HOST:PORT.
    #[arg(long)]
    controller: String,
    /// The 4-digit install code for the agents that have no identity yet.
    #[arg(long, env = "DE_INSTALL_CODE", hide_env_values = true)]
    code: String,
    /// How many agents.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    agents: u32,
    /// Where each agent keeps its identity, in a directory named after its address.
    #[arg(long)]
    state_dir: PathBuf,
    /// The first agent's address; the others follow (127.1.0.255, 127.1.1.0, ...).
    #[arg(long, default_value = "127.1.0.1")]
    first_ip: Ipv4Addr,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=3600))]
    heartbeat_secs: u64,
    /// How long each step "runs" before it is answered, in milliseconds.
    #[arg(long, default_value_t = 0)]
    step_ms: u64,
    /// The fraction of steps that finish with exit code 1 (0 to 1).
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    fail_rate: f64,
}

fn fraction(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err("must be a number from 0 to 1".to_owned()),
    }
}

/// The `count` addresses from `first` on, all inside 127.0.0.0/8.
fn addresses(first: Ipv4Addr, count: u32) -> Result<Vec<Ipv4Addr>, String> {
    let start = u32::from(first);
    let last = start
        .checked_add(count.saturating_sub(1))
        .map(Ipv4Addr::from)
        .filter(|l| first.is_loopback() && l.is_loopback() && count > 0)
        .ok_or_else(|| {
            format!(
                "{count} addresses from {first} do not fit in 127.0.0.0/8: pick another --first-ip"
            )
        })?;
    debug!(%first, %last, "agent addresses");
    Ok((start..start + count).map(Ipv4Addr::from).collect())
}

/// Raises the soft limit of open files to the hard one: each agent holds a UDP socket.
fn raise_nofile(agents: u32) {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    let raised = rustix::process::Rlimit {
        current: limit.maximum,
        maximum: limit.maximum,
    };
    if let Err(e) = setrlimit(Resource::Nofile, raised) {
        warn!(error = %e, "could not raise the open-file limit");
    }
    let now = getrlimit(Resource::Nofile).current;
    if now.is_some_and(|n| n < u64::from(agents) + 256) {
        warn!(
            limit = now,
            agents, "the open-file limit is below one socket per agent: raise it (ulimit -Hn)"
        );
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A random number in [0, 1).
fn random() -> f64 {
    let mut b = [0u8; 4];
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        return 0.5;
    }
    f64::from(u32::from_le_bytes(b)) / (f64::from(u32::MAX) + 1.0)
}

/// What every agent shares: the options, the counters and the shutdown.
#[derive(Debug)]
struct Sim {
    controller: String,
    addr: SocketAddr,
    code: String,
    agents: usize,
    heartbeat: Duration,
    step_time: Duration,
    fail_rate: f64,
    hostname: String,
    hardware: Hardware,
    usage: watch::Receiver<Usage>,
    enrolling: Semaphore,
    shutdown: CancellationToken,
    counts: Counts,
    /// The newest reason a link failed, for the progress line.
    last_error: Mutex<Option<String>>,
    /// Every agent's lanes, as last reported, for [`LANES_FILE`].
    lanes: Mutex<BTreeMap<Ipv4Addr, Vec<(Lane, u64)>>>,
    lanes_dirty: AtomicBool,
    state_dir: PathBuf,
    /// Every linked agent's connection, for the QUIC figures in the
    /// progress line.
    links: Mutex<BTreeMap<Ipv4Addr, quinn::Connection>>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Agents with an identity (loaded or enrolled).
    enrolled: AtomicUsize,
    /// Agents whose enrolment was given up.
    gave_up: AtomicUsize,
    /// Agents that were welcomed at least once.
    ever_online: AtomicUsize,
    /// Agents linked now.
    linked: AtomicUsize,
    /// Connection attempts, and those that failed.
    attempts: AtomicU64,
    failed: AtomicU64,
    steps_done: AtomicU64,
    steps_failed: AtomicU64,
    refused: AtomicU64,
}

impl Sim {
    fn note_error(&self, why: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Saves every agent's lanes in one file, if a step finished since the
    /// last save: once per [`LANES_SAVE_EVERY`] while steps finish, and on
    /// the way out; not synced. A simulator killed loses the last second's
    /// positions at most: a rerun then pulls after an older sequence, and
    /// the controller hands out only steps not final. (The real agent, one
    /// per machine, saves every result before it reports it; a file per
    /// simulated agent cost 10,000 renames a second, a third of the
    /// simulator's CPU in an exec to 10,000, which measured this machine's
    /// disk, not the controller.)
    fn save_lanes_if_dirty(&self) {
        if !self.lanes_dirty.swap(false, Ordering::Relaxed) {
            return;
        }
        let text = {
            let lanes = lock(&self.lanes);
            serde_json::to_vec(&*lanes)
        };
        let saved = text.map_err(std::io::Error::other).and_then(|text| {
            let tmp = self.state_dir.join(format!("{LANES_FILE}.tmp"));
            std::fs::write(&tmp, text)?;
            std::fs::rename(tmp, self.state_dir.join(LANES_FILE))
        });
        if let Err(e) = saved {
            warn!(error = %e, "could not save the agents' lanes");
        }
    }
}

/// What an agent keeps between connections.
#[derive(Debug, Default)]
struct NodeState {
    /// Each lane's last done sequence (also in `sim-lanes.json`).
    last_done: BTreeMap<Lane, u64>,
    /// Results and refusals not acknowledged yet: sent again on every new connection.
    unacked: Vec<StepEvent>,
    /// Instance -> fingerprint, from `MarkApplied` and `Unmark`: the inventory.
    marks: BTreeMap<String, String>,
}

/// One simulated agent.
#[derive(Debug)]
struct Agent {
    sim: Arc<Sim>,
    ip: Ipv4Addr,
    dir: PathBuf,
    node_id: NodeId,
    /// What tells this "machine" from a clone (`AgentMsg::Machine`).
    machine: String,
    endpoint: quinn::Endpoint,
    identity: Mutex<Identity>,
    state: Mutex<NodeState>,
    welcomed_once: AtomicBool,
}

/// Why one connection ended.
#[derive(Debug)]
enum SessionEnd {
    Shutdown,
    /// It worked for a while, then dropped: retry soon.
    Lost(String),
    /// It could not be established: back off.
    Failed(String),
    /// The controller will not take this node (revoked, or another machine holds it).
    Refused(String),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Agent {
    fn last_done(&self, lane: Lane) -> u64 {
        lock(&self.state).last_done.get(&lane).copied().unwrap_or(0)
    }

    fn last_done_all(&self) -> Vec<(Lane, u64)> {
        let state = lock(&self.state);
        Lane::ALL
            .iter()
            .map(|l| (*l, state.last_done.get(l).copied().unwrap_or(0)))
            .collect()
    }

    fn step_keys(&self) -> (Vec<u8>, Option<PreviousStepKey>) {
        let id = lock(&self.identity);
        (id.step_public_key.clone(), id.previous_step_key.clone())
    }

    fn apply_trust(&self, trust: &Trust) {
        if let Err(e) = lock(&self.identity).save_trust(&self.dir, trust) {
            warn!(ip = %self.ip, error = %ErrorChain(&e), "could not store what the controller says to trust");
        }
    }

    /// Records a finished step: the lane advances, the result waits for its ack.
    fn finished(&self, event: &StepEvent, mark: Option<&StepAction>) {
        let lanes = {
            let mut state = lock(&self.state);
            let last = state.last_done.entry(event.lane).or_insert(0);
            *last = (*last).max(event.seq);
            state.unacked.push(event.clone());
            match mark {
                Some(StepAction::MarkApplied {
                    instance,
                    fingerprint,
                    ..
                }) => {
                    state.marks.insert(instance.clone(), fingerprint.clone());
                }
                Some(StepAction::Unmark { instance }) => {
                    state.marks.remove(instance);
                }
                _ => {}
            }
            state.last_done.iter().map(|(l, s)| (*l, *s)).collect()
        };
        lock(&self.sim.lanes).insert(self.ip, lanes);
        self.sim.lanes_dirty.store(true, Ordering::Relaxed);
    }

    fn inventory(&self) -> Vec<InstanceState> {
        lock(&self.state)
            .marks
            .iter()
            .map(|(instance, fingerprint)| InstanceState {
                instance: instance.clone(),
                fingerprint: fingerprint.clone(),
                drift: Vec::new(),
            })
            .collect()
    }

    /// Connects, says `Hello`, and keeps the link until it ends.
    async fn session(self: &Arc<Self>) -> SessionEnd {
        let sim = &self.sim;
        let shutdown = sim.shutdown.clone();
        let config = {
            let id = lock(&self.identity);
            de_agent::link_config(&id.ca_pem, &id.cert_pem, &id.key_pem)
        };
        let config = match config {
            Ok(c) => c,
            Err(e) => return SessionEnd::Failed(ErrorChain(&e).to_string()),
        };
        let connecting =
            match self
                .endpoint
                .connect_with(config, sim.addr, de_common::CONTROLLER_SERVER_NAME)
            {
                Ok(c) => c,
                Err(e) => return SessionEnd::Failed(e.to_string()),
            };
        let conn = tokio::select! {
            _ = shutdown.cancelled() => return SessionEnd::Shutdown,
            r = tokio::time::timeout(CONNECT_TIMEOUT, connecting) => match r {
                Err(_) => return SessionEnd::Failed(format!("no answer in {} s", CONNECT_TIMEOUT.as_secs())),
                Ok(Err(e)) => return SessionEnd::Failed(e.to_string()),
                Ok(Ok(c)) => c,
            },
        };
        let (mut send, mut recv) = match conn.open_bi().await {
            Ok(s) => s,
            Err(e) => return SessionEnd::Failed(e.to_string()),
        };
        let hello = AgentMsg::Hello(Hello {
            node_id: self.node_id.clone(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            hostname: sim.hostname.clone(),
            ips: vec![self.ip.to_string()],
            hardware: sim.hardware.clone(),
            usage: sim.usage.borrow().clone(),
            root: self.dir.display().to_string(),
            heartbeat_secs: u32::try_from(sim.heartbeat.as_secs().max(1)).unwrap_or(u32::MAX),
            last_done: self.last_done_all(),
        });
        let machine = AgentMsg::Machine {
            id: self.machine.clone(),
        };
        if write_frame(&mut send, &machine).await.is_err()
            || write_frame(&mut send, &hello).await.is_err()
        {
            return SessionEnd::Failed("could not send Hello".into());
        }
        // What to trust comes before Welcome.
        loop {
            let answer = tokio::select! {
                _ = shutdown.cancelled() => return SessionEnd::Shutdown,
                a = tokio::time::timeout(CONNECT_TIMEOUT, read_frame::<_, ControllerMsg>(&mut recv)) => a,
            };
            match answer {
                Ok(Ok(Some(ControllerMsg::Trust(trust)))) => self.apply_trust(&trust),
                Ok(Ok(Some(ControllerMsg::Welcome(_)))) => break,
                Ok(Ok(Some(ControllerMsg::Refused(LinkRefusal::Revoked)))) => {
                    return SessionEnd::Refused("the controller revoked this node".into());
                }
                Ok(Ok(Some(ControllerMsg::Refused(r)))) => {
                    return SessionEnd::Refused(format!("the controller refused the link: {r:?}"));
                }
                Ok(Ok(Some(other))) => {
                    return SessionEnd::Failed(format!("unexpected answer to Hello: {other:?}"));
                }
                Ok(Ok(None)) | Ok(Err(_)) => {
                    let why = conn
                        .close_reason()
                        .map(|e| e.to_string())
                        .unwrap_or_else(|| "the controller closed the control stream".into());
                    return SessionEnd::Failed(why);
                }
                Err(_) => return SessionEnd::Failed("the controller did not answer Hello".into()),
            }
        }
        self.welcomed();
        let _linked = Linked::new(&sim.counts.linked);
        let _registered = Registered::new(sim, self.ip, &conn);
        let mut tasks = JoinSet::new();
        let (events_tx, events_rx) = mpsc::channel::<Vec<StepEvent>>(64);
        tasks.spawn(self.clone().report(conn.clone(), events_rx));
        for lane in Lane::ALL {
            tasks.spawn(self.clone().pull(lane, conn.clone(), events_tx.clone()));
        }
        let (query_tx, mut queries) = mpsc::channel::<ControllerMsg>(4);
        tasks.spawn(async move {
            while let Ok(Some(m)) = read_frame::<_, ControllerMsg>(&mut recv).await {
                if query_tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        let mut clock_asked = false;
        let mut tick =
            tokio::time::interval_at(tokio::time::Instant::now() + sim.heartbeat, sim.heartbeat);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = send.finish();
                    conn.close(close_codes::SHUTDOWN.into(), b"agent stopping");
                    return SessionEnd::Shutdown;
                }
                e = conn.closed() => return SessionEnd::Lost(e.to_string()),
                Some(msg) = queries.recv() => match msg {
                    ControllerMsg::ClockQuery { .. } => {
                        clock_asked = true;
                        let clock = AgentMsg::Clock { unix_ms: unix_ms(SystemTime::now()) };
                        if let Err(e) = write_frame(&mut send, &clock).await {
                            return SessionEnd::Lost(format!("clock not sent: {}", ErrorChain(&e)));
                        }
                    }
                    ControllerMsg::Trust(trust) => self.apply_trust(&trust),
                    ControllerMsg::Refused(LinkRefusal::Revoked) => {
                        return SessionEnd::Refused("the controller revoked this node".into());
                    }
                    other => debug!(ip = %self.ip, ?other, "ignored on the control stream"),
                },
                _ = tick.tick() => {
                    let last_done = self.last_done_all();
                    let hb = AgentMsg::Heartbeat(Heartbeat {
                        usage: sim.usage.borrow().clone(),
                        components: Vec::new(),
                    });
                    let inventory = AgentMsg::Inventory { last_done, instances: self.inventory() };
                    let mut frames = vec![hb, inventory];
                    if clock_asked {
                        frames.push(AgentMsg::Clock { unix_ms: unix_ms(SystemTime::now()) });
                    }
                    for frame in &frames {
                        if let Err(e) = write_frame(&mut send, frame).await {
                            return SessionEnd::Lost(format!("heartbeat not sent: {}", ErrorChain(&e)));
                        }
                    }
                }
            }
        }
    }

    fn welcomed(&self) {
        if !self.welcomed_once.swap(true, Ordering::SeqCst) {
            let online = self.sim.counts.ever_online.fetch_add(1, Ordering::SeqCst) + 1;
            if online == self.sim.agents {
                println!("all {online} agents online");
                info!(agents = online, "all agents online");
            }
        }
    }

    /// The events stream of one connection: the unacknowledged results
    /// first, then each new event; acknowledgements drop results. Events
    /// waiting together go in one write (a quick step's `Started` and
    /// `Finished` in one packet, as a real agent's would for a step that
    /// ends before its `Started` is sent).
    async fn report(
        self: Arc<Self>,
        conn: quinn::Connection,
        mut events: mpsc::Receiver<Vec<StepEvent>>,
    ) {
        let Ok((mut send, mut recv)) = conn.open_bi().await else {
            return;
        };
        let me = self.clone();
        let acks = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            while let Ok(Some(ControllerMsg::Ack { step_id })) =
                read_frame::<_, ControllerMsg>(&mut recv).await
            {
                lock(&me.state).unacked.retain(|e| e.step_id != step_id);
            }
        }));
        let unacked: Vec<AgentMsg> = lock(&self.state)
            .unacked
            .iter()
            .cloned()
            .map(AgentMsg::Event)
            .collect();
        if write_frames(&mut send, &unacked).await.is_err() {
            return;
        }
        while let Some(first) = events.recv().await {
            let mut batch: Vec<AgentMsg> = first.into_iter().map(AgentMsg::Event).collect();
            while let Ok(more) = events.try_recv() {
                batch.extend(more.into_iter().map(AgentMsg::Event));
            }
            if write_frames(&mut send, &batch).await.is_err() {
                break;
            }
        }
        drop(acks);
    }

    /// One lane's pull stream: pulls, checks and answers its steps, one at a time.
    async fn pull(
        self: Arc<Self>,
        lane: Lane,
        conn: quinn::Connection,
        events: mpsc::Sender<Vec<StepEvent>>,
    ) {
        loop {
            let Ok((mut send, mut recv)) = conn.open_bi().await else {
                return;
            };
            loop {
                let after_seq = self.last_done(lane);
                if write_frame(&mut send, &AgentMsg::Pull { lane, after_seq })
                    .await
                    .is_err()
                {
                    break;
                }
                let signed = match read_frame::<_, ControllerMsg>(&mut recv).await {
                    Ok(Some(ControllerMsg::Step(s))) => s,
                    Ok(Some(ControllerMsg::Idle)) => continue,
                    Ok(Some(other)) => {
                        warn!(ip = %self.ip, ?other, "unexpected answer to a pull");
                        break;
                    }
                    Ok(None) | Err(_) => break,
                };
                if !self.answer(lane, after_seq, &signed, &events).await {
                    return;
                }
            }
            if conn.close_reason().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Checks one pulled step like the agent does and answers it without
    /// running it. False when the events stream is gone.
    async fn answer(
        &self,
        lane: Lane,
        after_seq: u64,
        signed: &SignedStep,
        events: &mpsc::Sender<Vec<StepEvent>>,
    ) -> bool {
        let checked = check_pulled(
            signed,
            &self.step_keys(),
            &self.node_id,
            after_seq,
            now_unix(),
        )
        .and_then(|step| {
            if step.lane == lane {
                Ok(step)
            } else {
                Err(StepRefusal::WrongLane {
                    expected: lane,
                    got: step.lane,
                })
            }
        });
        let counts = &self.sim.counts;
        let step = match checked {
            Ok(step) => step,
            Err(refusal) => {
                let (step_id, seq) = de_common::decode_step_unverified(signed)
                    .map(|s| (s.id, s.seq))
                    .unwrap_or_else(|| (StepId::from(String::new()), 0));
                warn!(ip = %self.ip, lane = lane.as_str(), %step_id, seq, reason = %refusal, "refused a step");
                counts.refused.fetch_add(1, Ordering::Relaxed);
                let ev = StepEvent {
                    step_id,
                    lane,
                    seq,
                    kind: StepEventKind::Refused(refusal),
                };
                lock(&self.state).unacked.push(ev.clone());
                let sent = events.send(vec![ev]).await.is_ok();
                tokio::time::sleep(Duration::from_millis(200)).await;
                return sent;
            }
        };
        let started = Instant::now();
        let begun = StepEvent {
            step_id: step.id.clone(),
            lane,
            seq: step.seq,
            kind: StepEventKind::Started,
        };
        // A step that takes no time reports its start with its end.
        let mut pending = vec![begun];
        if !self.sim.step_time.is_zero() {
            if events.send(std::mem::take(&mut pending)).await.is_err() {
                return false;
            }
            tokio::time::sleep(self.sim.step_time).await;
        }
        let fail = self.sim.fail_rate > 0.0 && random() < self.sim.fail_rate;
        let outcome = StepOutcome {
            exit_code: Some(i32::from(fail)),
            duration_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            stdout_tail: format!("simulated {}\n", step.action.kind()),
            ..StepOutcome::default()
        };
        if fail {
            counts.steps_failed.fetch_add(1, Ordering::Relaxed);
        } else {
            counts.steps_done.fetch_add(1, Ordering::Relaxed);
        }
        let ev = StepEvent {
            step_id: step.id.clone(),
            lane,
            seq: step.seq,
            kind: StepEventKind::Finished(outcome),
        };
        self.finished(&ev, (!fail).then_some(&step.action));
        pending.push(ev);
        events.send(pending).await.is_ok()
    }
}

/// Counts a link as up while it lives.
struct Linked<'a>(&'a AtomicUsize);

impl<'a> Linked<'a> {
    fn new(count: &'a AtomicUsize) -> Linked<'a> {
        count.fetch_add(1, Ordering::Relaxed);
        Linked(count)
    }
}

impl Drop for Linked<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An agent's connection in [`Sim::links`] while its session lasts.
struct Registered<'a>(&'a Sim, Ipv4Addr);

impl<'a> Registered<'a> {
    fn new(sim: &'a Sim, ip: Ipv4Addr, conn: &quinn::Connection) -> Registered<'a> {
        lock(&sim.links).insert(ip, conn.clone());
        Registered(sim, ip)
    }
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        lock(&self.0.links).remove(&self.1);
    }
}

/// What the linked agents' QUIC connections did, summed over the
/// connections linked now, each since it began.
///
/// A probe timeout (PTO) that finds nothing to resend sends a probe: quinn
/// 0.11 makes it an IMMEDIATE_ACK frame when the peer supports the ACK
/// frequency extension (every quinn peer does), a PING otherwise. So the
/// IMMEDIATE_ACKs sent count probes plus MTU probes (`mtu_probes_sent`, which
/// carry one too), and the PINGs count keep-alives. A probe fires when an
/// ACK is later than the smoothed round trip plus four times its variance
/// plus the peer's 25 ms ACK delay: a peer that is busy answering thousands
/// of others is late that way, with nothing lost.
#[derive(Debug, Default)]
struct QuicFigures {
    datagrams_sent: u64,
    datagrams_received: u64,
    pings_sent: u64,
    immediate_acks_sent: u64,
    immediate_acks_received: u64,
    mtu_probes_sent: u64,
    lost_packets: u64,
    rtt_mean: Duration,
    rtt_max: Duration,
}

fn quic_figures(links: &[quinn::Connection]) -> QuicFigures {
    let mut f = QuicFigures::default();
    let mut rtt_sum = Duration::ZERO;
    for conn in links {
        let s = conn.stats();
        f.datagrams_sent += s.udp_tx.datagrams;
        f.datagrams_received += s.udp_rx.datagrams;
        f.pings_sent += s.frame_tx.ping;
        f.immediate_acks_sent += s.frame_tx.immediate_ack;
        f.immediate_acks_received += s.frame_rx.immediate_ack;
        f.mtu_probes_sent += s.path.sent_plpmtud_probes;
        f.lost_packets += s.path.lost_packets;
        rtt_sum += s.path.rtt;
        f.rtt_max = f.rtt_max.max(s.path.rtt);
    }
    if let Ok(n) = u32::try_from(links.len())
        && n > 0
    {
        f.rtt_mean = rtt_sum / n;
    }
    f
}

/// Every agent's saved lanes, from the state dir's [`LANES_FILE`].
fn load_all_lanes(state_dir: &Path) -> BTreeMap<Ipv4Addr, Vec<(Lane, u64)>> {
    std::fs::read(state_dir.join(LANES_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// An agent's saved lanes: from the shared file, else from the file an
/// older simulator kept in the agent's own directory.
fn load_lanes(sim: &Sim, ip: Ipv4Addr, dir: &Path) -> BTreeMap<Lane, u64> {
    let shared = lock(&sim.lanes).get(&ip).cloned();
    shared
        .or_else(|| {
            std::fs::read(dir.join(LANES_FILE))
                .ok()
                .and_then(|b| serde_json::from_slice::<Vec<(Lane, u64)>>(&b).ok())
        })
        .map(|v| v.into_iter().collect())
        .unwrap_or_default()
}

/// The agent's identity: loaded from its directory, else enrolled (a few
/// at a time, transient refusals retried with backoff).
async fn identity(
    sim: &Sim,
    endpoint: &quinn::Endpoint,
    ip: Ipv4Addr,
    dir: &Path,
) -> Result<Identity, String> {
    if Identity::exists(dir) {
        return Identity::load(dir).map_err(|e| ErrorChain(&e).to_string());
    }
    let opts = EnrollOptions {
        controller: sim.controller.clone(),
        code: sim.code.clone(),
        advertise_ip: Some(IpAddr::V4(ip)),
        root: dir.to_owned(),
        connect_timeout: CONNECT_TIMEOUT,
    };
    let mut attempt = 0u32;
    loop {
        let result = {
            let Ok(_permit) = sim.enrolling.acquire().await else {
                return Err("stopping".into());
            };
            tokio::select! {
                _ = sim.shutdown.cancelled() => return Err("stopping".into()),
                r = de_agent::enroll_on(endpoint, &opts, dir) => r,
            }
        };
        let e = match result {
            Ok(identity) => return Ok(identity),
            Err(e) => e,
        };
        attempt += 1;
        let transient = matches!(
            e,
            EnrollError::Burned
                | EnrollError::NoInstallation
                | EnrollError::RateLimited(_)
                | EnrollError::Unreachable { .. }
                | EnrollError::Protocol(_)
                | EnrollError::Refused(_)
        );
        if !transient || attempt >= ENROL_ATTEMPTS {
            return Err(ErrorChain(&e).to_string());
        }
        let delay = match e {
            EnrollError::RateLimited(secs) => Duration::from_secs(secs.max(1)),
            _ => backoff(MIN_BACKOFF, MAX_BACKOFF, attempt - 1),
        };
        debug!(%ip, attempt, error = %ErrorChain(&e), retry_in_ms = delay.as_millis() as u64, "enrolment refused; trying again");
        tokio::select! {
            _ = sim.shutdown.cancelled() => return Err("stopping".into()),
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// The largest UDP payload a simulated agent's endpoint takes in. quinn
/// gives every endpoint a receive buffer of 32 times this (about 2 MiB at
/// its default of 65,527): one endpoint per agent made that the simulator's
/// bulk once glibc, having freed an enrolment endpoint's buffer, stopped
/// mapping them lazily and zeroed each one on its heap. Datagrams stay
/// below it: quinn's path MTU discovery stops at 1,452 bytes.
const MAX_UDP_PAYLOAD: u16 = 1472;

/// A client endpoint like `de_agent::endpoint` (bound to `ip` when it is an
/// address of this machine), with the smaller receive buffer.
fn link_endpoint(controller: SocketAddr, ip: Ipv4Addr) -> std::io::Result<quinn::Endpoint> {
    let any: IpAddr = if controller.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        std::net::Ipv6Addr::UNSPECIFIED.into()
    };
    let socket =
        std::net::UdpSocket::bind((ip, 0)).or_else(|_| std::net::UdpSocket::bind((any, 0)))?;
    let mut config = quinn::EndpointConfig::default();
    config
        .max_udp_payload_size(MAX_UDP_PAYLOAD)
        .map_err(std::io::Error::other)?;
    quinn::Endpoint::new(config, None, socket, Arc::new(quinn::TokioRuntime))
}

/// One agent from start to shutdown: identity, then the link, kept up.
async fn run_agent(sim: Arc<Sim>, ip: Ipv4Addr, state_dir: PathBuf) {
    let dir = state_dir.join(ip.to_string());
    // One endpoint per agent, for its enrolment and then its link.
    let endpoint = match link_endpoint(sim.addr, ip) {
        Ok(e) => e,
        Err(e) => {
            error!(%ip, error = %format!("could not open a UDP socket on {ip}: {e}"), "this agent cannot link; it stays offline");
            return;
        }
    };
    let identity = match identity(&sim, &endpoint, ip, &dir).await {
        Ok(i) => i,
        Err(why) => {
            if !sim.shutdown.is_cancelled() {
                error!(%ip, error = %why, "this agent could not enrol; it stays offline");
                sim.counts.gave_up.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    sim.counts.enrolled.fetch_add(1, Ordering::Relaxed);
    let setup = Identity::machine_id(&dir, IpAddr::V4(ip)).map_err(|e| ErrorChain(&e).to_string());
    let machine = match setup {
        Ok(m) => m,
        Err(why) => {
            error!(%ip, error = %why, "this agent cannot link; it stays offline");
            return;
        }
    };
    let agent = Arc::new(Agent {
        ip,
        node_id: identity.meta.node_id.clone(),
        machine,
        endpoint,
        identity: Mutex::new(identity),
        state: Mutex::new(NodeState {
            last_done: load_lanes(&sim, ip, &dir),
            ..NodeState::default()
        }),
        dir,
        welcomed_once: AtomicBool::new(false),
        sim: sim.clone(),
    });
    let mut failures: u32 = 0;
    loop {
        let began = Instant::now();
        sim.counts.attempts.fetch_add(1, Ordering::Relaxed);
        let delay = match agent.session().await {
            SessionEnd::Shutdown => break,
            SessionEnd::Lost(why) => {
                debug!(%ip, reason = %why, "link lost; reconnecting");
                sim.note_error(format!("{ip}: link lost: {why}"));
                failures = 0;
                reconnect_delay(MIN_BACKOFF, sim.heartbeat)
            }
            SessionEnd::Failed(why) => {
                debug!(%ip, reason = %why, "cannot link");
                sim.counts.failed.fetch_add(1, Ordering::Relaxed);
                sim.note_error(format!("{ip}: {why}"));
                failures = failures.saturating_add(1);
                backoff(MIN_BACKOFF, MAX_BACKOFF, failures - 1)
            }
            SessionEnd::Refused(why) => {
                warn!(%ip, reason = %why, "link refused");
                sim.counts.failed.fetch_add(1, Ordering::Relaxed);
                MAX_BACKOFF
            }
        };
        // At most one attempt per second, whatever the backoff says.
        let delay = delay.max(MIN_BACKOFF.saturating_sub(began.elapsed()));
        tokio::select! {
            _ = sim.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    agent
        .endpoint
        .close(close_codes::SHUTDOWN.into(), b"agent stopping");
    let _ = tokio::time::timeout(Duration::from_secs(2), agent.endpoint.wait_idle()).await;
}

/// Logs how many agents are enrolled and linked, every few seconds.
async fn progress(sim: Arc<Sim>) {
    let mut tick = tokio::time::interval(PROGRESS_EVERY);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let c = &sim.counts;
        let last_error = lock(&sim.last_error).take();
        // Summed outside the lock: a session ending waits for it.
        let links: Vec<quinn::Connection> = lock(&sim.links).values().cloned().collect();
        let quic = quic_figures(&links);
        info!(
            agents = sim.agents,
            enrolled = c.enrolled.load(Ordering::Relaxed),
            gave_up = c.gave_up.load(Ordering::Relaxed),
            ever_online = c.ever_online.load(Ordering::Relaxed),
            linked = c.linked.load(Ordering::Relaxed),
            attempts = c.attempts.load(Ordering::Relaxed),
            failed_attempts = c.failed.load(Ordering::Relaxed),
            steps_done = c.steps_done.load(Ordering::Relaxed),
            steps_failed = c.steps_failed.load(Ordering::Relaxed),
            refused = c.refused.load(Ordering::Relaxed),
            datagrams_sent = quic.datagrams_sent,
            datagrams_received = quic.datagrams_received,
            pings_sent = quic.pings_sent,
            immediate_acks_sent = quic.immediate_acks_sent,
            immediate_acks_received = quic.immediate_acks_received,
            mtu_probes_sent = quic.mtu_probes_sent,
            lost_packets = quic.lost_packets,
            rtt_mean_us = u64::try_from(quic.rtt_mean.as_micros()).unwrap_or(u64::MAX),
            rtt_max_us = u64::try_from(quic.rtt_max.as_micros()).unwrap_or(u64::MAX),
            last_error = last_error.as_deref().unwrap_or(""),
            "progress"
        );
    }
}

/// Saves the agents' lanes once per [`LANES_SAVE_EVERY`] while steps
/// finish (the last save is `run`'s, once every agent stopped).
async fn save_lanes(sim: Arc<Sim>) {
    let mut tick = tokio::time::interval(LANES_SAVE_EVERY);
    loop {
        tokio::select! {
            _ = sim.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let sim = sim.clone();
        let _ = tokio::task::spawn_blocking(move || sim.save_lanes_if_dirty()).await;
    }
}

/// Samples this machine's usage once per heartbeat for every agent's heartbeats.
async fn sample(
    mut sampler: Sampler,
    tx: watch::Sender<Usage>,
    every: Duration,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => { let _ = tx.send(sampler.usage()); }
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,quinn=warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("de-sim: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    use anyhow::Context;
    raise_nofile(cli.agents);
    let ips = addresses(cli.first_ip, cli.agents).map_err(anyhow::Error::msg)?;
    let addr = de_agent::resolve(&cli.controller)?;
    std::fs::create_dir_all(&cli.state_dir)
        .with_context(|| format!("could not create {}", cli.state_dir.display()))?;
    let sampler = Sampler::new(&cli.state_dir)?;
    let hardware = sampler.hardware();
    let heartbeat = Duration::from_secs(cli.heartbeat_secs);
    let (usage_tx, usage) = watch::channel(Usage::default());
    let shutdown = CancellationToken::new();
    let sim = Arc::new(Sim {
        controller: cli.controller,
        addr,
        code: cli.code,
        agents: ips.len(),
        heartbeat,
        step_time: Duration::from_millis(cli.step_ms),
        fail_rate: cli.fail_rate,
        hostname: de_agent::hostname(),
        hardware,
        usage,
        enrolling: Semaphore::new(ENROL_CONCURRENCY),
        shutdown: shutdown.clone(),
        counts: Counts::default(),
        last_error: Mutex::new(None),
        lanes: Mutex::new(load_all_lanes(&cli.state_dir)),
        lanes_dirty: AtomicBool::new(false),
        state_dir: cli.state_dir.clone(),
        links: Mutex::new(BTreeMap::new()),
    });
    info!(agents = sim.agents, first = %cli.first_ip, controller = %addr, "starting simulated agents");
    let tasks = TaskTracker::new();
    tasks.spawn(sample(sampler, usage_tx, heartbeat, shutdown.clone()));
    tasks.spawn(progress(sim.clone()));
    tasks.spawn(save_lanes(sim.clone()));
    for ip in ips {
        tasks.spawn(run_agent(sim.clone(), ip, cli.state_dir.clone()));
    }
    tasks.close();
    de_common::shutdown_signal().await;
    info!("stopping: closing every link");
    shutdown.cancel();
    if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
        .await
        .is_err()
    {
        warn!("some agents did not stop within 10 s");
    }
    sim.save_lanes_if_dirty();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_carry_into_the_next_octet_and_stay_in_loopback() {
        let ips = addresses(Ipv4Addr::new(127, 1, 0, 254), 4).expect("fits");
        assert_eq!(
            ips,
            [
                Ipv4Addr::new(127, 1, 0, 254),
                Ipv4Addr::new(127, 1, 0, 255),
                Ipv4Addr::new(127, 1, 1, 0),
                Ipv4Addr::new(127, 1, 1, 1),
            ]
        );
        assert!(addresses(Ipv4Addr::new(127, 255, 255, 250), 10).is_err());
        assert!(addresses(Ipv4Addr::new(10, 0, 0, 1), 1).is_err());
    }

    #[test]
    fn fail_rate_is_a_fraction() {
        assert!(fraction("0.25").is_ok());
        assert!(fraction("1.5").is_err());
        assert!(fraction("-0.1").is_err());
    }
}
