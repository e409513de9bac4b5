//! The messages agent and controller exchange, on two QUIC ALPNs:
//! `de-enroll/1` (install-code enrolment, no client certificate) and
//! `de-agent/1` (mutual TLS, after enrolment).
//!
//! Every enum here is part of the protocol: add variants at the end only, and
//! bump [`PROTOCOL_VERSION`] when an existing variant changes shape.

use serde::{Deserialize, Serialize};

use crate::hardware::{ComponentStatus, Hardware, Usage};
use crate::ids::{NodeId, StepId};
use crate::step::{Lane, SignedStep, StepRefusal};

/// Version carried in every frame header; a peer speaking another version gets a clear error.
pub const PROTOCOL_VERSION: u16 = 1;
/// How often each side of a link sends a QUIC keep-alive when it has
/// nothing else to send.
pub const LINK_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(5);
/// How long a link may hear nothing before QUIC closes it: three
/// keep-alives. A restarted controller resets old links at once (stateless
/// reset); this bounds the rare agent that draws none (measured: 3 in
/// 10,000 per restart, the rest back within 14 s): it reconnects within
/// this plus one heartbeat.
pub const LINK_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// ALPN of an enrolment connection.
pub const ENROLL_ALPN: &[u8] = b"de-enroll/1";
/// ALPN of an enrolled agent's mutual-TLS connection.
pub const AGENT_ALPN: &[u8] = b"de-agent/1";
/// DNS name every controller certificate carries and every agent checks.
pub const CONTROLLER_SERVER_NAME: &str = "de-controller";

/// QUIC application close codes, so the other side can tell why it was closed.
pub mod close_codes {
    /// Normal shutdown of either side.
    pub const SHUTDOWN: u32 = 0;
    /// The node was revoked by an operator.
    pub const REVOKED: u32 = 1;
    /// A protocol violation (malformed frame, wrong message).
    pub const PROTOCOL: u32 = 2;
    /// The connection is not authenticated (no client certificate on `de-agent/1`).
    pub const UNAUTHENTICATED: u32 = 3;
    /// A newer connection from the same node replaced this one.
    pub const REPLACED: u32 = 4;
    /// The controller's keys changed (a rotation): connect again to learn them.
    pub const REKEYED: u32 = 5;
}

/// Agent -> controller on the enrolment stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollClientMsg {
    /// SPAKE2 message A.
    Start { spake: Vec<u8> },
    /// The agent's key confirmation, sent only after it verified the controller's.
    Confirm { mac: Vec<u8> },
    /// A postcard [`EnrollRequest`] sealed with the session keys.
    Request { sealed: Vec<u8> },
}

/// Controller -> agent on the enrolment stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EnrollServerMsg {
    /// Refused before any key exchange.
    Refused(EnrollRefusal),
    /// SPAKE2 message B followed by the controller's key confirmation.
    Challenge { reply: Vec<u8> },
    /// A postcard [`EnrollGrant`] sealed with the session keys.
    Granted { sealed: Vec<u8> },
}

/// Why the controller refused an enrolment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnrollRefusal {
    NoInstallation,
    Expired,
    Burned,
    RateLimited {
        retry_after_secs: u64,
    },
    WrongCode,
    /// The request was malformed or could not be served; the text says why.
    Invalid(String),
}

/// What the agent asks for once the code is confirmed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// PEM CSR made on the node; its key never leaves the node.
    pub csr_pem: String,
    pub hostname: String,
    pub ips: Vec<String>,
    pub hardware: Hardware,
    pub agent_version: String,
}

/// What the controller returns: the node's identity and the anchors to pin.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollGrant {
    pub node_id: NodeId,
    pub cert_pem: String,
    pub ca_pem: String,
    /// Ed25519 public key that signs every step this node will run.
    pub step_public_key: Vec<u8>,
}

/// First message on an agent's control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hello {
    pub node_id: NodeId,
    pub agent_version: String,
    pub hostname: String,
    pub ips: Vec<String>,
    pub hardware: Hardware,
    pub usage: Usage,
    /// The node root under which component files go (`/` on a real node).
    pub root: String,
    /// Seconds between heartbeats; the controller calls the node offline after 3 silent intervals.
    pub heartbeat_secs: u32,
    /// Highest step sequence number completed per lane, so a restored controller can resynchronise.
    pub last_done: Vec<(Lane, u64)>,
}

/// Periodic report on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub usage: Usage,
    pub components: Vec<ComponentStatus>,
}

/// Which output stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutStream {
    Stdout,
    Stderr,
}

/// How a step ended on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepOutcome {
    /// The script's exit code; `Some(0)` for other actions that succeeded.
    pub exit_code: Option<i32>,
    /// Why it failed when there is no exit code to say so (timeout, spawn error, interrupted).
    pub error: Option<String>,
    pub timed_out: bool,
    pub duration_ms: u64,
    /// The last bytes of each stream (bounded; the full output went out as `Output` events).
    pub stdout_tail: String,
    pub stderr_tail: String,
    /// Files returned by `CollectLogs`: (path, last bytes).
    pub files: Vec<(String, Vec<u8>)>,
}

impl StepOutcome {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && self.error.is_none() && !self.timed_out
    }
}

/// What happened to a step, as the agent reports it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum StepEventKind {
    Started,
    /// Lines of output, batched (each at most 8 KiB; longer lines are cut).
    Output {
        stream: OutStream,
        lines: Vec<String>,
    },
    Finished(StepOutcome),
    /// The agent would not run it.
    Refused(StepRefusal),
}

/// An event about one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepEvent {
    pub step_id: StepId,
    pub lane: Lane,
    pub seq: u64,
    pub kind: StepEventKind,
}

/// Agent -> controller. On the control stream: `Hello`, then `Heartbeat`s.
/// On a lane's pull stream: `Pull`s. On the events stream: `Event`s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AgentMsg {
    Hello(Hello),
    Heartbeat(Heartbeat),
    /// Long-poll: the next step of `lane` after `after_seq`.
    Pull {
        lane: Lane,
        after_seq: u64,
    },
    Event(StepEvent),
    /// What the agent applied, and how it drifted since (control stream,
    /// after each heartbeat). Agents older than this message send none, and
    /// the controller then trusts its own record of what it applied.
    Inventory {
        /// Each lane's last done sequence number, taken before `instances`
        /// and the heartbeat just before were read: every step up to these
        /// shows in both, so the controller knows which of its recorded
        /// results the report reflects.
        last_done: Vec<(Lane, u64)>,
        instances: Vec<InstanceState>,
    },
    /// The node's clock, in answer to [`ControllerMsg::ClockQuery`] and then
    /// after each heartbeat (control stream). Sent only to a controller
    /// that asked, so an older controller, which would take this variant
    /// for a malformed frame, never gets one; an older agent never answers,
    /// and its node's skew stays unknown (steps are issued as before).
    Clock {
        unix_ms: u64,
    },
    /// Which machine holds this identity: a hash of a nonce kept in the
    /// agent's state dir, the machine's id and its own address toward the
    /// controller. Sent before `Hello` on the control stream, so that two
    /// machines with one identity (a cloned image) are told apart before
    /// either takes the link. Optional: an agent that sends none is not checked.
    Machine {
        id: String,
    },
    /// A fresh CSR for this node's next certificate (control stream, after
    /// [`ControllerMsg::Trust`]); the answer is `Renewed` or `RenewRefused`.
    /// The controller issues it for the node of the link's certificate,
    /// whatever the CSR names.
    Renew {
        csr_pem: String,
    },
    /// On a stream of its own: the artifact `sha256` from byte `offset` on
    /// (a transfer cut short resumes where its verified bytes end). The
    /// controller sends it only to a node with an open `Fetch` step for it.
    Fetch {
        sha256: String,
        offset: u64,
    },
}

/// One instance the agent applied (a `MarkApplied` step), as it stands now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceState {
    pub instance: String,
    /// The fingerprint the controller gave when the instance was applied.
    pub fingerprint: String,
    /// What changed on the node since then, in words (`file /etc/x changed
    /// since it was applied`, `monit check nginx is missing`); empty when
    /// nothing did.
    pub drift: Vec<String>,
}

/// The controller accepted the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    pub controller_version: String,
}

/// Why the controller will not keep this link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum LinkRefusal {
    Revoked,
    /// The Hello names another node than the certificate does.
    IdentityMismatch,
    Invalid(String),
    /// Another machine holds this node's identity (a cloned image); the text
    /// says which and what to do.
    IdentityConflict(String),
}

/// Controller -> agent. `Welcome`/`Refused` on the control stream; `Step` or
/// `Idle` answer a `Pull`; `Ack` confirms a `Finished` or `Refused` event is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControllerMsg {
    Welcome(Welcome),
    Refused(LinkRefusal),
    Step(SignedStep),
    /// Nothing queued within the long-poll window; pull again.
    Idle,
    Ack {
        step_id: StepId,
    },
    /// Sent once after `Welcome` on the control stream, with the
    /// controller's clock: "tell me yours" (`AgentMsg::Clock`). Older
    /// agents do not read the control stream after `Welcome`, so they
    /// never see it.
    ClockQuery {
        unix_ms: u64,
    },
    /// What the agent should trust, sent just before `Welcome` to agents
    /// that said which machine they are (`AgentMsg::Machine`), so that they
    /// hold the current step keys before they pull; older agents never see it.
    Trust(Trust),
    /// The node's new certificate, in answer to `AgentMsg::Renew`.
    Renewed {
        cert_pem: String,
    },
    /// Why the controller will not renew the certificate.
    RenewRefused(String),
    /// The answer to `AgentMsg::Fetch`: the artifact is `size` bytes; the
    /// bytes from the asked offset follow on the stream, raw, to its end.
    Artifact {
        size: u64,
    },
    /// Why the controller will not send the artifact asked for.
    FetchRefused(String),
}

/// The anchors an agent pins, as the controller holds them now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trust {
    /// PEM bundle of the CAs whose certificate the controller may present
    /// (during a CA rotation, the new one and the old one).
    pub ca_pem: String,
    /// The key that signs every new step.
    pub step_public_key: Vec<u8>,
    /// The key before the last rotation, for the steps it signed.
    pub previous_step_key: Option<PreviousStepKey>,
    /// The controller wants a new certificate for this node now (its
    /// certificate is from a CA being retired, or near its end).
    pub renew: bool,
}

/// The step key before the last rotation, and what it may still sign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreviousStepKey {
    pub public_key: Vec<u8>,
    /// Unix seconds after which no step signed with it is accepted.
    pub until: u64,
    /// Per lane, the highest sequence number queued for this node before
    /// the rotation: only those steps can carry the old signature.
    pub last_seqs: Vec<(Lane, u64)>,
}

impl PreviousStepKey {
    /// Whether a step of `lane` numbered `seq` may carry this key's signature at `now_unix`.
    pub fn covers(&self, lane: Lane, seq: u64, now_unix: u64) -> bool {
        now_unix <= self.until
            && self
                .last_seqs
                .iter()
                .any(|(l, last)| *l == lane && seq <= *last)
    }
}

/// Whether a certificate valid from `not_before` to `not_after` (unix
/// seconds) is due for renewal at `now`: less than a third of its lifetime
/// left. Agent and controller apply the same rule.
pub fn renewal_due(not_before: u64, not_after: u64, now: u64) -> bool {
    let lifetime = not_after.saturating_sub(not_before);
    not_after.saturating_sub(now) < lifetime / 3
}
