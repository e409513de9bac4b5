//! Steps: the only things an agent executes, each signed by the controller's
//! Ed25519 step key and bound to one node, one lane and one sequence number.
//!
//! The signature covers `STEP_DOMAIN ‖ postcard(Step)`; the agent verifies it
//! against the key pinned at enrolment before it looks at anything else.

use ring::signature::{ED25519, Ed25519KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::ids::{DeploymentId, NodeId, StepId};

/// Domain separation for step signatures.
pub const STEP_DOMAIN: &[u8] = b"de-step/1\0";

/// Independent sequences of steps on one node. Each lane has its own sequence
/// numbers, so an ad-hoc command can run while a long install runs without
/// either skipping the other's numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Lane {
    /// Deployment work: installs, uninstalls, configuration; one at a time.
    Deploy,
    /// Operator actions: exec, restart, stop; may run beside a deploy step.
    Adhoc,
    /// Control of the other lanes' steps (cancel): never waits behind a
    /// long step, because it has its own sequence and worker.
    Control,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Deploy, Lane::Adhoc, Lane::Control];

    pub fn as_str(self) -> &'static str {
        match self {
            Lane::Deploy => "deploy",
            Lane::Adhoc => "adhoc",
            Lane::Control => "control",
        }
    }
}

/// What monit should do with a component.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum MonitOp {
    Start,
    Stop,
    Restart,
}

/// One action an agent can take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum StepAction {
    /// Run `script` with `/bin/sh -c`, as `user` (root if None), with extra
    /// environment, killed after `timeout_secs`. Paths inside may use `$DE_ROOT`.
    Script {
        script: String,
        user: Option<String>,
        env: Vec<(String, String)>,
        timeout_secs: u32,
    },
    /// Write `contents` to `path` (relative paths are under the node root)
    /// atomically, with `mode` and optional `owner` (user or user:group).
    WriteFile {
        path: String,
        contents: Vec<u8>,
        mode: u32,
        owner: Option<String>,
    },
    /// Install (or replace) the monit check for component `name` and reload monit.
    MonitAdd { name: String, check: String },
    /// Stop monitoring `name`, remove its check and reload monit.
    MonitRemove { name: String },
    /// monit start/stop/restart `name`.
    Monit { name: String, op: MonitOp },
    /// Return the last `max_bytes` of each file (relative paths are under the node root).
    CollectLogs { paths: Vec<String>, max_bytes: u64 },
    /// Stop these steps of this node: a running one has its process group
    /// killed and ends `cancelled`; one not started yet ends `cancelled`
    /// without running when it comes.
    Cancel { step_ids: Vec<StepId> },
    /// The last step of applying `instance`: the agent records
    /// `fingerprint` and the content hashes of `files` (paths as the
    /// install's file steps wrote them) and of the monit check `check`, and
    /// from then on reports in its inventory whether they still hold.
    MarkApplied {
        instance: String,
        fingerprint: String,
        files: Vec<String>,
        check: Option<String>,
    },
    /// The last step of uninstalling `instance`: the agent forgets its mark.
    Unmark { instance: String },
    /// Put the controller's artifact `sha256` (`size` bytes; `artifact` is
    /// its name, for messages) at `path`, fetched over the agent's link into
    /// its cache when not there yet, verified against `sha256` (which this
    /// signed step pins) before anything uses it; with `unpack`, the archive
    /// is unpacked into the directory `path` instead.
    Fetch {
        artifact: String,
        sha256: String,
        size: u64,
        path: String,
        mode: u32,
        owner: Option<String>,
        unpack: Option<Unpack>,
    },
}

/// The archive formats a `Fetch` can unpack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Unpack {
    /// gzip-compressed tar (`.tar.gz`, `.tgz`).
    TarGz,
    Zip,
}

impl StepAction {
    /// A short name for logs and APIs.
    pub fn kind(&self) -> &'static str {
        match self {
            StepAction::Script { .. } => "script",
            StepAction::WriteFile { .. } => "write_file",
            StepAction::MonitAdd { .. } => "monit_add",
            StepAction::MonitRemove { .. } => "monit_remove",
            StepAction::Monit {
                op: MonitOp::Start, ..
            } => "monit_start",
            StepAction::Monit {
                op: MonitOp::Stop, ..
            } => "monit_stop",
            StepAction::Monit {
                op: MonitOp::Restart,
                ..
            } => "monit_restart",
            StepAction::CollectLogs { .. } => "collect_logs",
            StepAction::Cancel { .. } => "cancel",
            StepAction::MarkApplied { .. } => "mark_applied",
            StepAction::Unmark { .. } => "unmark",
            StepAction::Fetch { .. } => "fetch",
        }
    }
}

/// A unit of work for one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Step {
    /// Unique id (the controller's), used in events and results.
    pub id: StepId,
    /// The deployment it belongs to, if any.
    pub deployment_id: Option<DeploymentId>,
    pub node_id: NodeId,
    pub lane: Lane,
    /// Strictly increasing per (node, lane), starting at 1.
    pub seq: u64,
    /// Unix seconds.
    pub issued_at: u64,
    /// Unix seconds after which the agent refuses the step.
    pub not_after: u64,
    pub action: StepAction,
}

/// A step as it travels: the exact signed bytes and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedStep {
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

/// Why a step was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StepRefusal {
    #[error("signature does not verify with the pinned step key")]
    BadSignature,
    #[error("step body is malformed")]
    Malformed,
    #[error("step is for node {0}, not this one")]
    WrongNode(NodeId),
    #[error("sequence {seq} on lane {lane} was already used (last done {last})")]
    Replayed { lane: String, seq: u64, last: u64 },
    #[error("step expired at {not_after} (now {now})")]
    Expired { not_after: u64, now: u64 },
    /// Signed for lane `got` but handed out on a pull of lane `expected`.
    #[error(
        "step is signed for lane {}, but came on a pull of lane {}",
        .got.as_str(),
        .expected.as_str()
    )]
    WrongLane { expected: Lane, got: Lane },
}

#[derive(Debug, thiserror::Error)]
#[error("could not encode the step")]
pub struct SignError(#[source] postcard::Error);

fn signed_message(body: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(STEP_DOMAIN.len() + body.len());
    m.extend_from_slice(STEP_DOMAIN);
    m.extend_from_slice(body);
    m
}

/// Signs `step` with the controller's step key.
pub fn sign_step(step: &Step, key: &Ed25519KeyPair) -> Result<SignedStep, SignError> {
    let body = postcard::to_stdvec(step).map_err(SignError)?;
    let signature = key.sign(&signed_message(&body)).as_ref().to_vec();
    Ok(SignedStep { body, signature })
}

/// Checks the signature with `public_key` and decodes the step. Node, sequence
/// and expiry are the caller's to check (see [`check_step`]).
pub fn verify_step(signed: &SignedStep, public_key: &[u8]) -> Result<Step, StepRefusal> {
    UnparsedPublicKey::new(&ED25519, public_key)
        .verify(&signed_message(&signed.body), &signed.signature)
        .map_err(|_| StepRefusal::BadSignature)?;
    match postcard::take_from_bytes::<Step>(&signed.body) {
        Ok((step, [])) => Ok(step),
        _ => Err(StepRefusal::Malformed),
    }
}

/// Decodes a step body WITHOUT checking its signature: only to name a refused
/// step in a report. Never act on what this returns.
pub fn decode_step_unverified(signed: &SignedStep) -> Option<Step> {
    match postcard::take_from_bytes::<Step>(&signed.body) {
        Ok((step, [])) => Some(step),
        _ => None,
    }
}

/// The agent's full check: signature, node, replay and expiry.
pub fn check_step(
    signed: &SignedStep,
    public_key: &[u8],
    node_id: &NodeId,
    last_done: u64,
    now_unix: u64,
) -> Result<Step, StepRefusal> {
    let step = verify_step(signed, public_key)?;
    if step.node_id != *node_id {
        return Err(StepRefusal::WrongNode(step.node_id));
    }
    if step.seq <= last_done {
        return Err(StepRefusal::Replayed {
            lane: step.lane.as_str().to_owned(),
            seq: step.seq,
            last: last_done,
        });
    }
    if now_unix > step.not_after {
        return Err(StepRefusal::Expired {
            not_after: step.not_after,
            now: now_unix,
        });
    }
    Ok(step)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::KeyPair;

    fn key() -> Ed25519KeyPair {
        let doc = Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).expect("gen");
        Ed25519KeyPair::from_pkcs8(doc.as_ref()).expect("key")
    }

    fn n1() -> NodeId {
        NodeId::from("n-1")
    }

    fn step(seq: u64) -> Step {
        Step {
            id: format!("s-{seq}").into(),
            deployment_id: Some("d-1".into()),
            node_id: "n-1".into(),
            lane: Lane::Deploy,
            seq,
            issued_at: 1_000,
            not_after: 2_000,
            action: StepAction::Script {
                script: "echo hi".into(),
                user: None,
                env: vec![],
                timeout_secs: 10,
            },
        }
    }

    #[test]
    fn a_signed_step_verifies_and_tampering_is_refused() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let signed = sign_step(&step(3), &k).expect("sign");
        assert_eq!(check_step(&signed, &pk, &n1(), 2, 1_500), Ok(step(3)));

        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert_eq!(
            check_step(&tampered, &pk, &n1(), 2, 1_500),
            Err(StepRefusal::BadSignature)
        );
        let other = key();
        let forged = sign_step(&step(3), &other).expect("sign");
        assert_eq!(
            check_step(&forged, &pk, &n1(), 2, 1_500),
            Err(StepRefusal::BadSignature)
        );
    }

    #[test]
    fn wrong_node_replay_and_expiry_are_refused() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        let signed = sign_step(&step(3), &k).expect("sign");
        assert_eq!(
            check_step(&signed, &pk, &"n-2".into(), 2, 1_500),
            Err(StepRefusal::WrongNode("n-1".into()))
        );
        assert!(matches!(
            check_step(&signed, &pk, &n1(), 3, 1_500),
            Err(StepRefusal::Replayed {
                seq: 3,
                last: 3,
                ..
            })
        ));
        assert!(matches!(
            check_step(&signed, &pk, &n1(), 2, 2_001),
            Err(StepRefusal::Expired { .. })
        ));
    }

    #[test]
    fn garbage_bodies_with_valid_signatures_are_malformed_not_panics() {
        let k = key();
        let pk = k.public_key().as_ref().to_vec();
        for body in [vec![], vec![0xff; 7], vec![1, 2, 3]] {
            let signature = k.sign(&signed_message(&body)).as_ref().to_vec();
            let s = SignedStep { body, signature };
            assert_eq!(verify_step(&s, &pk), Err(StepRefusal::Malformed));
        }
    }
}
