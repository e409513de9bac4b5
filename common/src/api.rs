//! The HTTP API's request and answer bodies — the native `/api/v1` routes
//! and the original `/deployment-engine` ones — shared by the controller's
//! handlers, `dectl` and the integration tests, so a renamed field is a
//! compile error on both sides instead of an empty column. Also the one rule
//! that says which node an id or IP names ([`resolve`]).
//!
//! Invariants: these types *are* the JSON on the wire (names, renames,
//! `null`s, skipped fields); change one and the API changes. Answers the
//! controller used to build as `json!` objects declare their fields (and
//! those of what they contain) in alphabetical order, the order those
//! objects had, so the bytes stayed the same. The state and kind enums are
//! also the words stored in step and deployment records: never rename a
//! variant's serde name. Serde only: no HTTP, no store.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

pub use crate::hardware::{ComponentStatus, Hardware, Usage};
use crate::ids::NodeId;
use crate::step::{Lane, Step, StepAction};
use crate::wire::StepOutcome;

// ---------------------------------------------------------------- errors

/// Every value of `"error"` in an error answer, serialized as written here
/// in snake_case (`no_plan`, ...). `docs/API.md` lists each with its status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// 400: the request is malformed (body, query, parameter).
    BadRequest,
    /// 400: the plan was refused; `problems` lists why.
    InvalidPlan,
    /// 400 (405 for another method than GET, 426 when the connection
    /// cannot be upgraded): the route is a WebSocket.
    WebsocketRequired,
    /// 401: no token, or not the controller's.
    Unauthorized,
    /// 403: the route needs a stored plan and there is none.
    NoPlan,
    /// 404: no such route, node, step, deployment, catalog, log file, ...
    NotFound,
    /// 409: the plan names a node that is no longer enrolled.
    Conflict,
    /// 409: a deployment is already running.
    DeploymentRunning,
    /// 409: the deployment is not running, so it cannot be cancelled.
    DeploymentNotRunning,
    /// 409: no node is online to run a command.
    NoTargets,
    /// 500: the controller failed; its log has the details.
    Internal,
    /// 500: the store failed while starting a deployment.
    Store,
    /// 500: the stored plan cannot be deployed with the loaded catalogs.
    PlanUnusable,
    /// 502: nodes of the plan are offline.
    NodesOffline,
    /// 403: the token's role does not allow the route; the message names the
    /// role needed.
    Forbidden,
    /// 409: a CA rotation is under way (rotate) or nodes still hold a
    /// certificate of the old CA (retire); the message says which.
    CaInUse,
    /// 413: an artifact upload is larger than `artifact_max_mb`.
    ArtifactTooLarge,
    /// 400: an artifact upload does not match the SHA-256 sent with it.
    ArtifactMismatch,
    /// A code this build does not know (from a newer controller).
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// Every code the controller sends, in the order `docs/API.md` lists them.
    pub const ALL: [ErrorCode; 18] = [
        ErrorCode::BadRequest,
        ErrorCode::InvalidPlan,
        ErrorCode::WebsocketRequired,
        ErrorCode::Unauthorized,
        ErrorCode::NoPlan,
        ErrorCode::NotFound,
        ErrorCode::Conflict,
        ErrorCode::DeploymentRunning,
        ErrorCode::DeploymentNotRunning,
        ErrorCode::NoTargets,
        ErrorCode::Internal,
        ErrorCode::Store,
        ErrorCode::PlanUnusable,
        ErrorCode::NodesOffline,
        ErrorCode::Forbidden,
        ErrorCode::CaInUse,
        ErrorCode::ArtifactTooLarge,
        ErrorCode::ArtifactMismatch,
    ];
}

/// Every error answer: `{"error": CODE, "message": TEXT}`, plus `problems`
/// when a plan was not accepted (`invalid_plan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `not_found`, `unauthorized`, `invalid_plan`, ...
    pub error: ErrorCode,
    /// What went wrong and what to do, in the API's words.
    pub message: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<Problem>,
}

/// One thing wrong with a plan: which component and IP, what was found, what is needed.
/// Every field is always there (`null` when it does not apply).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Problem {
    pub kind: ProblemKind,
    pub component: Option<String>,
    pub ip: Option<String>,
    pub property: Option<String>,
    /// What is wrong and what to do, in one sentence.
    pub problem: String,
    pub found: Option<String>,
    pub needed: Option<String>,
}

impl Problem {
    /// A problem of `kind`, described by `problem`; the builders below add the rest.
    pub fn new(kind: ProblemKind, problem: impl Into<String>) -> Problem {
        Problem {
            kind,
            component: None,
            ip: None,
            property: None,
            problem: problem.into(),
            found: None,
            needed: None,
        }
    }

    pub fn component(mut self, c: &str) -> Problem {
        self.component = Some(c.to_owned());
        self
    }

    pub fn ip(mut self, ip: &str) -> Problem {
        self.ip = Some(ip.to_owned());
        self
    }

    pub fn property(mut self, p: &str) -> Problem {
        self.property = Some(p.to_owned());
        self
    }

    pub fn found(mut self, f: impl Into<String>) -> Problem {
        self.found = Some(f.into());
        self
    }

    pub fn needed(mut self, n: impl Into<String>) -> Problem {
        self.needed = Some(n.into());
        self
    }
}

/// The stable codes of plan problems (docs/API.md lists what each means).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ProblemKind {
    MalformedJson,
    InvalidStructure,
    UnknownField,
    UnknownCatalog,
    UnknownProperty,
    InvalidProperty,
    MissingProperty,
    UnknownComponent,
    InvalidIp,
    DuplicateIp,
    Cardinality,
    UnknownNode,
    RevokedNode,
    AmbiguousNode,
    BelowMinimum,
    DiskBelowDisksize,
    RenderFailed,
}

/// `GET /healthz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Health {
    /// `ok`.
    pub status: String,
    /// The controller's version.
    pub version: String,
}

// ---------------------------------------------------------- install codes

/// `POST /api/v1/install-codes` body (or an empty body).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewCode {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
    /// How many nodes the code admits; it closes after the last. Absent:
    /// any number until it expires or is ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
}

/// Where an install code shown by `GET /api/v1/install-codes` stands.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum InstallCodeState {
    /// Admits nodes.
    #[default]
    Open,
    /// Too many wrong guesses: it admits nobody (see `failed_attempts`).
    Burned,
    /// It admitted all the nodes it was made for.
    Used,
}

/// A guess on an install code that did not prove it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailedCodeAttempt {
    /// The address the attempt came from.
    pub source: String,
    /// When it was answered (RFC 3339).
    pub at: String,
    /// The exchange is still running (it may yet prove the code).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub in_progress: bool,
}

/// The install code (`POST` and `GET /api/v1/install-codes`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CodeView {
    pub code: String,
    pub expires_at: String,
    /// The one line that joins a node with this code (`packaging/install-agent.sh ...`).
    pub agent_command: String,
    /// Seconds the code has left, by the controller's clock (a console's
    /// countdown must not trust the browser's clock).
    pub expires_in_secs: u64,
    #[serde(default)]
    pub state: InstallCodeState,
    /// Guesses that did not prove the code, oldest first (at most the burn limit).
    #[serde(default)]
    pub failed_attempts: Vec<FailedCodeAttempt>,
    /// How many nodes the code admits (absent: any number until it expires or is ended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes: Option<u32>,
    /// Nodes enrolled with this code.
    #[serde(default)]
    pub nodes_admitted: u32,
    /// Nodes it may still admit (absent when `nodes` is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nodes_left: Option<u32>,
}

// ------------------------------------------------------------------ nodes

/// A node as the API shows it (`GET /api/v1/nodes`, `GET /api/v1/nodes/{id}`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct NodeView {
    pub id: String,
    pub hostname: String,
    pub ips: Vec<String>,
    pub hardware: Hardware,
    pub usage: Usage,
    /// The link is up and the node was heard from within 3 heartbeat intervals.
    pub online: bool,
    pub last_seen: Option<String>,
    pub agent_version: String,
    pub enrolled_at: String,
    pub revoked: bool,
    /// The node root its agent reported (`/` on a real node).
    pub root: String,
    /// What the node's monit supervises, from the last heartbeat.
    pub components: Vec<ComponentStatus>,
    /// How many seconds the node's clock is ahead of the controller's
    /// (negative: behind), as its agent last reported; `None` until an
    /// agent that reports its clock has linked since the controller started.
    #[serde(default)]
    pub clock_skew_secs: Option<i64>,
    /// The operator lets the node's links come from addresses other than its
    /// IPs (the node is behind NAT).
    #[serde(default)]
    pub allow_nat: bool,
    /// The address the node's last link attempt came from (none before one).
    #[serde(default)]
    pub source_ip: Option<String>,
    /// Why the node's last link attempt disagreed with its IPs (none when it agreed).
    #[serde(default)]
    pub ip_mismatch: Option<String>,
    /// When the node's certificate expires (RFC 3339), as last seen on its
    /// link or issued by a renewal; none before either.
    #[serde(default)]
    pub cert_not_after: Option<String>,
    /// Two machines claimed this node's identity (a cloned image): only the
    /// holder keeps the link until an operator revokes or re-enrols the node.
    #[serde(default)]
    pub identity_conflict: Option<IdentityConflict>,
}

/// Two machines that present one node's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct IdentityConflict {
    /// RFC 3339: when the second machine was first seen.
    pub since: String,
    /// The machine that held the link, and keeps it.
    pub holder: Claimant,
    /// The last other machine refused.
    pub refused: Claimant,
}

/// One machine presenting a node's certificate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Claimant {
    /// The link's source address.
    pub address: String,
    /// What the agent says identifies its machine (a hash).
    pub machine: String,
}

/// The controller's keys (`POST /api/v1/pki/*`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PkiView {
    /// SHA-256 of the CA that issues node certificates now (hex).
    pub ca: String,
    /// SHA-256 of the CA being retired, still trusted for the overlap.
    pub previous_ca: Option<String>,
    /// The public key that signs new steps (hex).
    pub step_key: String,
    /// The step key before the last rotation, and until when (RFC 3339)
    /// agents accept the steps queued with it.
    pub previous_step_key: Option<String>,
    pub previous_step_key_until: Option<String>,
    /// Nodes not revoked whose certificate is from the previous CA.
    pub nodes_on_previous_ca: Vec<String>,
}

/// `POST /api/v1/pki/retire-old-ca` body (optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RetireCa {
    /// Retire even though nodes still hold a certificate of the old CA
    /// (they lose their link and must be enrolled again).
    #[serde(default)]
    pub force: bool,
}

impl NodeView {
    /// The node's id, typed (the controller's calls take a [`NodeId`]; the
    /// JSON keeps the plain string).
    pub fn node_id(&self) -> NodeId {
        NodeId::from(self.id.as_str())
    }

    /// Whether `target` names this node: its id, or one of its IPs (compared
    /// as addresses, so `::1` and `0:0::1` are the same).
    pub fn is_named(&self, target: &str) -> bool {
        if self.id == target {
            return true;
        }
        let Ok(addr) = target.parse::<IpAddr>() else {
            return false;
        };
        self.ips
            .iter()
            .any(|ip| ip.parse::<IpAddr>().is_ok_and(|a| a == addr))
    }
}

/// Which node an id or IP names, by the one rule the API, the plan
/// validation and `dectl` share ([`resolve`]).
#[derive(Debug, Clone, PartialEq)]
pub enum Resolved<'a> {
    /// The one live (not revoked) node named, or, of several live ones, the
    /// only one online (the others are stale records of a node enrolled again).
    Node(&'a NodeView),
    /// No node has this id or IP.
    Unknown,
    /// Only revoked nodes have it (every one of them, in the given order).
    Revoked(Vec<&'a NodeView>),
    /// Several live nodes have it and not exactly one of them is online
    /// (every live one): revoke the stale ones, or name the node by id.
    Ambiguous(Vec<&'a NodeView>),
}

impl<'a> Resolved<'a> {
    /// The rule, applied to the nodes a target named (as [`NodeView::is_named`] finds them).
    pub fn among(named: impl IntoIterator<Item = &'a NodeView>) -> Resolved<'a> {
        let (revoked, live): (Vec<&NodeView>, Vec<&NodeView>) =
            named.into_iter().partition(|n| n.revoked);
        match live.as_slice() {
            [one] => Resolved::Node(one),
            [] if revoked.is_empty() => Resolved::Unknown,
            [] => Resolved::Revoked(revoked),
            many => {
                let mut online = many.iter().filter(|n| n.online);
                match (online.next(), online.next()) {
                    (Some(one), None) => Resolved::Node(one),
                    _ => Resolved::Ambiguous(live),
                }
            }
        }
    }

    /// The node, when the target names exactly one.
    pub fn node(&self) -> Option<&'a NodeView> {
        match self {
            Resolved::Node(n) => Some(n),
            _ => None,
        }
    }
}

/// The node `target` (a node id or an IP) names among `nodes`.
pub fn resolve<'a>(nodes: &'a [NodeView], target: &str) -> Resolved<'a> {
    Resolved::among(nodes.iter().filter(|n| n.is_named(target)))
}

// ------------------------------------------------------- exec, raw steps

/// `POST /api/v1/exec` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    pub script: String,
    /// Node IPs or ids; none: every online node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub targets: Option<Vec<String>>,
    /// 1..3600, 60 when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_secs: Option<u64>,
    /// Run as this user (root when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
}

/// One target's answer to `POST /api/v1/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ExecResult {
    pub node_id: String,
    pub ip: String,
    pub exit_code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub duration_ms: u64,
    pub timed_out: bool,
    pub error: Option<String>,
    pub step_id: String,
}

/// `PUT /api/v1/nodes/{id}` body: what the operator changes about a node
/// after enrolment (a field left out stays as it is).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NodeUpdate {
    /// The node's IPs from now on (at least one; none another live node has).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ips: Option<Vec<String>>,
    /// Whether the node's links may come from addresses other than its IPs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_nat: Option<bool>,
}

/// `POST /api/v1/nodes/{id}/steps` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct StepRequest {
    pub action: StepAction,
    /// `Adhoc` when not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<Lane>,
    /// How long to wait for the result (30 s when not given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait_secs: Option<u64>,
}

/// Where a queued step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    Queued,
    Running,
    Done,
    Failed,
    Refused,
    /// Withdrawn by the controller (a cancelled deployment): never handed
    /// out again; if it was running, its node was told to kill it.
    Cancelled,
}

impl StepState {
    /// Done, failed, refused or cancelled: nothing more will happen to the step.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            StepState::Done | StepState::Failed | StepState::Refused | StepState::Cancelled
        )
    }
}

/// A step record as the API shows it (`GET /api/v1/steps/{id}`, `POST
/// /api/v1/nodes/{id}/steps`): without the signed bytes, and with script
/// environment values as `******`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepRecordView {
    pub step: Step,
    pub state: StepState,
    pub created_at: String,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub outcome: Option<StepOutcome>,
    /// Why the agent refused it.
    pub refusal: Option<String>,
}

// ------------------------------------------------------------ deployments

/// A deployment's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum DeployState {
    Running,
    Succeeded,
    Failed,
    /// An operator cancelled it: queued steps were withdrawn, running ones killed.
    Cancelled,
}

/// What a deployment step does to its instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum TaskKind {
    Install,
    Reconfigure,
    Uninstall,
}

/// Which lifecycle hook of its component's catalog a deployment step comes
/// from (none: an install, re-apply or uninstall step).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Hook {
    /// Before the instance is changed or uninstalled (e.g. drain it).
    PreStop,
    /// After the instance is started: a check that must pass.
    PostStart,
    /// Once per deployment that changed the component, after everything.
    PostDeploy,
}

/// Where a deployment step is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum PhaseState {
    Pending,
    Running,
    Done,
    Failed,
    Skipped,
    /// It was running when the deployment was cancelled.
    Cancelled,
}

/// `GET /deployment-engine/deploy` (202): the deployment that was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeployStarted {
    pub id: String,
    pub plan_revision: u64,
    pub state: DeployState,
    /// How many steps it has.
    pub steps: usize,
}

/// A deployment step as the API shows it (the action by kind, never its
/// contents: they may hold secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepView {
    pub component: String,
    pub instance: String,
    pub ip: String,
    pub node_id: String,
    pub kind: TaskKind,
    /// `script`, `write PATH`, `monit start nginx`, ...
    pub action: String,
    pub state: PhaseState,
    pub attempts: u32,
    /// The queue step of the last attempt (`GET /api/v1/steps/{id}`).
    pub step_id: Option<String>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub exit_code: Option<i32>,
    pub error: Option<String>,
    /// The end of the last attempt's stdout then stderr.
    pub output: Option<String>,
    /// The catalog hook the step comes from, if any.
    #[serde(default)]
    pub hook: Option<Hook>,
    /// The step's instance is one of its component's canaries.
    #[serde(default)]
    pub canary: bool,
}

/// How one component's instances change in a deployment, and where they are.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct RolloutView {
    pub component: String,
    /// The first this many instances change first (canaries).
    pub canaries: usize,
    /// At most this many instances change at once (none: all).
    pub max_in_flight: Option<usize>,
    /// Seconds an instance must stay RUNNING after its steps (0: no watch).
    pub watch_secs: u64,
    /// It waits for every component before it.
    pub serial: bool,
    /// The canary instances (`nginx_0`, ...).
    pub canary_instances: Vec<String>,
    /// Instances being changed now (steps running or between steps, or watched).
    pub in_flight: Vec<String>,
    /// Instances whose watch is running.
    pub watching: Vec<String>,
    /// Instances done, of how many this deployment changes.
    pub done: usize,
    pub instances: usize,
}

/// The watch of one instance after its steps: monit must report it RUNNING,
/// with the same pid, for `secs` seconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WatchView {
    pub component: String,
    pub instance: String,
    pub ip: String,
    pub node_id: String,
    pub secs: u64,
    /// `running` while watched, then `done` or `failed`, `skipped` or `cancelled`.
    pub state: PhaseState,
    pub started_at: String,
    pub finished_at: Option<String>,
    /// The pid monit reported when the watch first saw it RUNNING.
    pub pid: Option<u32>,
    pub error: Option<String>,
}

/// A deployment as the API shows it: `GET /api/v1/deployments` (without
/// steps: `"steps": null`) and `GET /api/v1/deployments/{id}` (with them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DeploymentView {
    pub id: String,
    pub state: DeployState,
    pub plan_revision: u64,
    pub created_at: String,
    pub finished_at: Option<String>,
    pub error: Option<String>,
    pub steps_total: usize,
    pub steps_done: usize,
    pub steps: Option<Vec<StepView>>,
    /// An operator paused it: the steps in flight finish, no new one starts.
    #[serde(default)]
    pub paused: bool,
    /// Per component with steps in it, how its instances change.
    #[serde(default)]
    pub rollout: Vec<RolloutView>,
    /// The watches of instances after their steps.
    #[serde(default)]
    pub watches: Vec<WatchView>,
}

// ------------------------------------------------------ plans and catalogs

/// What a deployment would do to one instance (`GET /api/v1/plan/diff`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ChangeAction {
    /// New in the plan: installed.
    Install,
    /// Gone from the plan: uninstalled.
    Uninstall,
    /// Changed in the plan, or drifted on its node: its install steps run again.
    Reapply,
    /// As applied, but stopped outside the controller: started again.
    Start,
    /// As applied, and running (or stopped through the API, which a deployment keeps).
    Nothing,
}

/// One instance in a plan diff.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct InstanceChange {
    pub component: String,
    /// `nginx_0`, ...
    pub instance: String,
    pub ip: String,
    /// The node the IP resolves to, if any.
    pub node_id: Option<String>,
    pub action: ChangeAction,
    /// Why, in words: `new in the plan`, `file /etc/x changed since it was
    /// applied`, `stopped outside the controller (monit: STOPPED)`, ...
    pub why: String,
}

/// `GET /api/v1/plan/diff`: what `GET /deployment-engine/deploy` would do now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanDiff {
    pub plan_revision: u64,
    /// The revision last applied in full (0: none yet).
    pub applied_revision: u64,
    /// Every instance of the plan and every applied one it drops, in
    /// install order (uninstalls first).
    pub instances: Vec<InstanceChange>,
    /// How many steps the deployment would run.
    pub steps: usize,
    /// Nodes the deployment needs that are offline or not enrolled (a
    /// deployment would be refused with 502 until they are back).
    pub offline: Vec<String>,
}

/// The DNS record the operator must add once a plan has its entry component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct DnsView {
    /// The entry component (`haproxy`).
    pub component: String,
    /// `*.<domain>`.
    pub name: String,
    /// `A` or `AAAA`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The entry component's IP.
    pub value: String,
}

/// `POST /api/v1/plan/validate` (200): the plan is valid; nothing was stored.
/// `P` is the plan document (redacted), which this crate does not model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanCheck<P> {
    pub catalog: String,
    pub dns: Option<DnsView>,
    /// What the operator must do next, in one sentence.
    pub message: String,
    /// Plan IP -> id of the node that has it.
    pub nodes: BTreeMap<String, String>,
    /// The plan's components in install order.
    pub order: Vec<String>,
    pub plan: P,
    /// Always true (an invalid plan is a 400 with its problems).
    pub valid: bool,
}

/// `POST /deployment-engine/config` (201): the plan is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PlanCreated {
    pub catalog: String,
    pub dns: Option<DnsView>,
    /// What the operator must do next, in one sentence (names the revision).
    pub message: String,
    /// How many nodes the plan uses.
    pub nodes: usize,
    pub order: Vec<String>,
    pub revision: Option<u64>,
    /// `created`.
    pub status: String,
}

/// `GET /api/v1/plan`: the stored plan with its revision. `P` is the plan
/// document (redacted).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StoredPlanView<P> {
    pub catalog: String,
    /// False when the plan's catalog is no longer loaded (then `order` and `dns` are null).
    pub catalog_loaded: bool,
    pub dns: Option<DnsView>,
    pub order: Option<Vec<String>>,
    pub plan: P,
    pub revision: u64,
    /// RFC 3339, UTC.
    pub stored_at: String,
}

/// How many instances of a component a plan may list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Cardinality {
    One,
    Many,
}

/// The least hardware a node needs to host a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Minimum {
    pub cpus: u32,
    pub disk_mb: u64,
    pub ram_mb: u64,
}

/// A component of a catalog, in the catalog list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ComponentSummary {
    /// Components installed before this one (when the plan has them).
    pub after: Vec<String>,
    pub cardinality: Cardinality,
    pub description: String,
    pub minimum: Minimum,
    pub name: String,
}

/// One catalog in `GET /api/v1/catalogs` (`GET /api/v1/catalogs/{name}`
/// adds `properties`, `prepare` and each component's templates).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct CatalogSummary {
    pub builtin: bool,
    pub components: Vec<ComponentSummary>,
    pub description: String,
    /// The component `*.<domain>` resolves to, if the catalog names one.
    pub entry: Option<String>,
    pub name: String,
    /// Component names in install order.
    pub order: Vec<String>,
    /// `built in`, or the directory the catalog was loaded from.
    pub origin: String,
    /// Properties a plan must set for this catalog (besides `domain`).
    pub required: Vec<String>,
}

// ------------------------------------------- the original routes' bodies

/// One row of `GET /deployment-engine/status`, with the original's field names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StatusRow {
    #[serde(rename = "Comp")]
    pub comp: String,
    #[serde(rename = "Ip")]
    pub ip: String,
    /// The node's usage as a percent string (`8%`, `81.74%`); empty when no node has the IP.
    #[serde(rename = "Cpu")]
    pub cpu: String,
    #[serde(rename = "Mem")]
    pub mem: String,
    #[serde(rename = "Disk")]
    pub disk: String,
    /// `RUNNING`, `DOWN`, ..., `NOT_INSTALLED`, `OFFLINE (...)`, `UNKNOWN (...)`.
    #[serde(rename = "Status")]
    pub status: String,
}

/// `PUT /deployment-engine/restart` and `/stop` body; `all` / `0.0.0.0` match everything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperateRequest {
    #[serde(rename = "name", alias = "Comp", alias = "comp", alias = "Name")]
    pub name: String,
    #[serde(rename = "ip", alias = "Ip", alias = "IP")]
    pub ip: String,
}

/// One instance's outcome of a restart or stop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct OperateRow {
    #[serde(rename = "Comp")]
    pub comp: String,
    #[serde(rename = "Ip")]
    pub ip: String,
    /// `ok`, or what went wrong.
    #[serde(rename = "Result")]
    pub result: String,
}

/// `GET /deployment-engine/hardware` body: `{"Comp": "nats", "Ip": "10.0.0.3"}`
/// (the original's restart/stop spellings `name` and `ip` are accepted too).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HardwareRequest {
    #[serde(rename = "Comp", alias = "comp", alias = "name", alias = "Name")]
    pub comp: String,
    #[serde(rename = "Ip", alias = "ip", alias = "IP")]
    pub ip: String,
}

/// One row of `/deployment-engine/hardware`: CPU count, RAM in kB and DISK
/// in MB, as the original.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HardwareRow {
    #[serde(rename = "Comp")]
    pub comp: String,
    #[serde(rename = "IP")]
    pub ip: String,
    #[serde(rename = "CPU")]
    pub cpu: u32,
    #[serde(rename = "RAM")]
    pub ram_kb: u64,
    #[serde(rename = "DISK")]
    pub disk_mb: u64,
}

/// `GET /deployment-engine/download`, `GET /api/v1/logs`: the log file names, sorted.
pub type LogFiles = Vec<String>;

// ---------------------------------------------------------------- tokens and audit

/// What an API token may do. Each role allows what the one before it does:
/// `read-only` reads (nodes, status, plans, logs, deployments), `operator`
/// also acts on nodes (deploy, exec, raw steps, restart, stop, start,
/// cancel, plan submission), `admin` also manages access (install codes,
/// tokens, node revocation, the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    ReadOnly,
    Operator,
    Admin,
}

impl Role {
    /// Every role, weakest first.
    pub const ALL: [Role; 3] = [Role::ReadOnly, Role::Operator, Role::Admin];

    /// The role's name on the wire and in messages (`read-only`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::ReadOnly => "read-only",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// Whether a token with this role may use a route that needs `needed`.
    pub fn allows(self, needed: Role) -> bool {
        self >= needed
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| format!("no role {s:?}: use read-only, operator or admin"))
    }
}

/// Body of `POST /api/v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// `[A-Za-z0-9._-]`, 1 to 64 characters, not starting with `.`, unique.
    #[cfg_attr(
        feature = "openapi",
        schema(pattern = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}$")
    )]
    pub name: String,
    pub role: Role,
}

/// An artifact the controller holds (`GET /api/v1/artifacts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ArtifactView {
    pub name: String,
    pub sha256: String,
    pub size: u64,
    pub uploaded_at: String,
    /// For a Debian package: `PACKAGE VERSION ARCH`, as the repository the
    /// controller gives nodes offers it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deb: Option<String>,
}

/// A stored token as `GET /api/v1/tokens` lists it: never the token itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenView {
    pub name: String,
    pub role: Role,
    /// RFC 3339.
    pub created_at: String,
    /// The name of the token that created it (`-` for the first admin token).
    pub created_by: String,
}

/// The answer to `POST /api/v1/tokens` (201): the token, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct TokenCreated {
    pub name: String,
    pub role: Role,
    /// The bearer token; the controller keeps only its SHA-256.
    pub token: String,
    pub created_at: String,
}

/// What an audit entry records was asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    /// `POST /api/v1/exec`.
    Exec,
    /// `POST /api/v1/nodes/{id}/steps`.
    Step,
    Restart,
    Stop,
    Start,
    Deploy,
    /// A deployment cancelled.
    Cancel,
    /// A plan submitted (`POST /deployment-engine/config`).
    Plan,
    /// A node revoked.
    Revoke,
    /// A node's IPs or NAT allowance changed (`PUT /api/v1/nodes/{id}`).
    NodeUpdate,
    /// An install code issued.
    Code,
    /// The install code ended.
    EndCode,
    /// An API token created.
    Token,
    /// An API token revoked.
    RevokeToken,
    /// The step-signing key rotated.
    RotateStepKey,
    /// A new CA made (the old one still trusted).
    RotateCa,
    /// The previous CA no longer trusted.
    RetireCa,
    /// A deployment paused.
    Pause,
    /// A paused deployment resumed.
    Resume,
    /// An action this build does not know (from a newer controller).
    #[serde(other)]
    Other,
}

/// One entry of the audit log (`GET /api/v1/audit`, newest first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// RFC 3339.
    pub at: String,
    /// The name of the token that asked.
    pub token: String,
    pub action: AuditAction,
    /// The node ids (or components, token names, deployment ids) acted on.
    pub targets: Vec<String>,
    /// What was asked, in a line (a command's first 200 characters, a
    /// step's kind, a role, ...).
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, ip: &str, online: bool, revoked: bool) -> NodeView {
        NodeView {
            id: id.to_owned(),
            hostname: format!("host-{id}"),
            ips: vec![ip.to_owned()],
            hardware: Hardware::default(),
            usage: Usage::default(),
            online,
            last_seen: None,
            agent_version: "0".to_owned(),
            enrolled_at: "2024-01-01T00:00:00Z".to_owned(),
            revoked,
            root: "/".to_owned(),
            components: Vec::new(),
            clock_skew_secs: None,
            allow_nat: false,
            source_ip: None,
            ip_mismatch: None,
            cert_not_after: None,
            identity_conflict: None,
        }
    }

    fn ids(r: &Resolved<'_>) -> Vec<String> {
        match r {
            Resolved::Node(n) => vec![n.id.clone()],
            Resolved::Unknown => Vec::new(),
            Resolved::Revoked(ns) | Resolved::Ambiguous(ns) => {
                ns.iter().map(|n| n.id.clone()).collect()
            }
        }
    }

    /// (nodes, target, expected kind, expected ids) for every case of the rule.
    #[test]
    fn a_target_names_one_live_node_or_says_why_not() {
        let nodes = vec![
            node("n-a", "10.0.0.1", true, false),
            // Enrolled again: a stale live record and a revoked one beside the online node.
            node("n-b-old", "10.0.0.2", false, true),
            node("n-b-stale", "10.0.0.2", false, false),
            node("n-b", "10.0.0.2", true, false),
            node("n-c", "10.0.0.3", false, true),
            // Two live records, neither online.
            node("n-d1", "10.0.0.4", false, false),
            node("n-d2", "10.0.0.4", false, false),
            // Two live records, both online.
            node("n-e1", "10.0.0.5", true, false),
            node("n-e2", "10.0.0.5", true, false),
            node("n-v6", "fd00::1", true, false),
        ];
        let check = |target: &str, kind: &str, want: &[&str]| {
            let r = resolve(&nodes, target);
            let got_kind = match &r {
                Resolved::Node(_) => "node",
                Resolved::Unknown => "unknown",
                Resolved::Revoked(_) => "revoked",
                Resolved::Ambiguous(_) => "ambiguous",
            };
            assert_eq!(
                (got_kind, ids(&r)),
                (kind, want.iter().map(|s| (*s).to_owned()).collect()),
                "{target}"
            );
        };
        check("10.0.0.1", "node", &["n-a"]);
        check("n-a", "node", &["n-a"]);
        check("10.0.0.2", "node", &["n-b"]);
        // By id, even a stale or revoked record is named exactly.
        check("n-b-stale", "node", &["n-b-stale"]);
        check("n-b-old", "revoked", &["n-b-old"]);
        check("10.0.0.3", "revoked", &["n-c"]);
        check("10.0.0.4", "ambiguous", &["n-d1", "n-d2"]);
        check("10.0.0.5", "ambiguous", &["n-e1", "n-e2"]);
        check("10.0.0.9", "unknown", &[]);
        check("n-nope", "unknown", &[]);
        check("", "unknown", &[]);
        // Addresses compare as addresses, not as text.
        check("fd00:0::1", "node", &["n-v6"]);
        check("10.0.0.01", "unknown", &[]);
        assert_eq!(
            resolve(&nodes, "10.0.0.2").node().map(|n| n.id.as_str()),
            Some("n-b")
        );
        assert_eq!(resolve(&nodes, "10.0.0.4").node(), None);
    }

    /// The JSON of each answer, written out as the routes sent it before these types existed.
    #[test]
    fn answers_keep_their_wire_json() {
        let dns = DnsView {
            component: "haproxy".into(),
            name: "*.cf.local".into(),
            kind: "A".into(),
            value: "10.0.0.1".into(),
        };
        let created = PlanCreated {
            catalog: "cf-v170".into(),
            dns: Some(dns),
            message: "plan stored as revision 1".into(),
            nodes: 2,
            order: vec!["nats".into()],
            revision: Some(1),
            status: "created".into(),
        };
        assert_eq!(
            serde_json::to_string(&created).expect("json"),
            r#"{"catalog":"cf-v170","dns":{"component":"haproxy","name":"*.cf.local","type":"A","value":"10.0.0.1"},"message":"plan stored as revision 1","nodes":2,"order":["nats"],"revision":1,"status":"created"}"#
        );
        let err = ErrorBody {
            error: ErrorCode::NotFound,
            message: "no node".into(),
            problems: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&err).expect("json"),
            r#"{"error":"not_found","message":"no node"}"#
        );
        let p = Problem::new(ProblemKind::DiskBelowDisksize, "too small").ip("10.0.0.1");
        assert_eq!(
            serde_json::to_string(&p).expect("json"),
            r#"{"kind":"disk_below_disksize","component":null,"ip":"10.0.0.1","property":null,"problem":"too small","found":null,"needed":null}"#
        );
        let row = StatusRow {
            comp: "nats".into(),
            ip: "10.0.0.1".into(),
            cpu: "8%".into(),
            mem: "81.74%".into(),
            disk: "1%".into(),
            status: "RUNNING".into(),
        };
        assert_eq!(
            serde_json::to_string(&row).expect("json"),
            r#"{"Comp":"nats","Ip":"10.0.0.1","Cpu":"8%","Mem":"81.74%","Disk":"1%","Status":"RUNNING"}"#
        );
        let hw = HardwareRow {
            comp: "nats".into(),
            ip: "10.0.0.1".into(),
            cpu: 2,
            ram_kb: 4096,
            disk_mb: 100,
        };
        assert_eq!(
            serde_json::to_string(&hw).expect("json"),
            r#"{"Comp":"nats","IP":"10.0.0.1","CPU":2,"RAM":4096,"DISK":100}"#
        );
        let started = DeployStarted {
            id: "d-1".into(),
            plan_revision: 3,
            state: DeployState::Running,
            steps: 7,
        };
        assert_eq!(
            serde_json::to_string(&started).expect("json"),
            r#"{"id":"d-1","plan_revision":3,"state":"running","steps":7}"#
        );
        let listed = DeploymentView {
            id: "d-1".into(),
            state: DeployState::Succeeded,
            plan_revision: 3,
            created_at: "t0".into(),
            finished_at: None,
            error: None,
            steps_total: 0,
            steps_done: 0,
            steps: None,
            paused: false,
            rollout: Vec::new(),
            watches: Vec::new(),
        };
        assert_eq!(
            serde_json::to_string(&listed).expect("json"),
            r#"{"id":"d-1","state":"succeeded","plan_revision":3,"created_at":"t0","finished_at":null,"error":null,"steps_total":0,"steps_done":0,"steps":null,"paused":false,"rollout":[],"watches":[]}"#
        );
        let older = r#"{"id":"d-1","state":"succeeded","plan_revision":3,"created_at":"t0","finished_at":null,"error":null,"steps_total":0,"steps_done":0,"steps":null}"#;
        assert_eq!(
            serde_json::from_str::<DeploymentView>(older).expect("an older answer"),
            listed,
            "an answer from a controller before rollouts reads as not paused"
        );
    }

    #[test]
    fn a_code_view_from_before_node_counts_reads_as_open_with_no_limit() {
        let old = r#"{"code":"0427","expires_at":"t","agent_command":"c","expires_in_secs":5}"#;
        let view: CodeView = serde_json::from_str(old).expect("old view");
        assert_eq!(view.state, InstallCodeState::Open);
        assert!(view.failed_attempts.is_empty());
        assert_eq!(
            (view.nodes, view.nodes_admitted, view.nodes_left),
            (None, 0, None)
        );
        let req: NewCode =
            serde_json::from_str(r#"{"ttl_secs": 60, "nodes": 3}"#).expect("new code");
        assert_eq!((req.ttl_secs, req.nodes), (Some(60), Some(3)));
        assert_eq!(
            serde_json::to_string(&NewCode::default()).expect("json"),
            "{}"
        );
    }

    #[test]
    fn requests_send_only_what_was_given_and_refuse_unknown_fields() {
        let req = ExecRequest {
            script: "true".into(),
            targets: None,
            timeout_secs: Some(5),
            user: None,
        };
        assert_eq!(
            serde_json::to_string(&req).expect("json"),
            r#"{"script":"true","timeout_secs":5}"#
        );
        assert!(serde_json::from_str::<ExecRequest>(r#"{"script":"x","target":["a"]}"#).is_err());
        assert!(serde_json::from_str::<NewCode>(r#"{"ttl":5}"#).is_err());
        let op: OperateRequest =
            serde_json::from_str(r#"{"Comp":"nats","Ip":"10.0.0.1"}"#).expect("original spelling");
        assert_eq!(
            serde_json::to_string(&op).expect("json"),
            r#"{"name":"nats","ip":"10.0.0.1"}"#
        );
    }

    #[test]
    fn an_error_without_problems_reads_back_and_problem_kinds_are_their_codes() {
        let e: ErrorBody =
            serde_json::from_str(r#"{"error":"bad_request","message":"no"}"#).expect("error");
        assert!(e.problems.is_empty());
        for (kind, code) in [
            (ProblemKind::MalformedJson, "malformed_json"),
            (ProblemKind::Cardinality, "cardinality"),
            (ProblemKind::AmbiguousNode, "ambiguous_node"),
            (ProblemKind::RenderFailed, "render_failed"),
        ] {
            assert_eq!(
                serde_json::to_value(kind).expect("json"),
                serde_json::Value::String(code.to_owned())
            );
        }
    }
}
