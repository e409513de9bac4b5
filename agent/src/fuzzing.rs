//! Entry points for the coverage-guided fuzzer (`tests/fuzz/`): each takes
//! bytes an outside party controls and runs them through the agent's real
//! decode and check path. They return normally for any input; a panic is a
//! finding (a crash of the decoder, or a broken invariant asserted here).
//!
//! Compiled for the unit tests and with the `fuzzing` feature only, so the
//! agent's public API does not grow.

use std::path::{Component, Path, PathBuf};

use ring::signature::{Ed25519KeyPair, KeyPair as _};
use rustls_pki_types::CertificateDer;

use de_common::{EnrollGrant, Lane, NodeId, SignedStep, StepAction, decode};

use crate::monit::{Monit, MonitError, parse_status, status_body};
use crate::steps::{accept, under_root};

/// The node id the fixture's agent has; steps for it pass the node check.
pub const NODE_ID: &str = "n-fuzz0001";

/// Header of a [`Fixture::step`] input: flags, `last_done`, `now`.
pub const STEP_HEADER: usize = 1 + 8 + 8;

/// Flag bit of a [`Fixture::step`] input: sign the body with the fixture's
/// step key (else the 64 bytes after the header are the signature).
pub const STEP_SIGN: u8 = 1;

/// What one agent holds: its pinned step key (the fixture also has the
/// private half, so fuzzed bodies can carry a valid signature), its node id
/// and root, and the controller certificate its enrolment connection showed.
pub struct Fixture {
    step_key: Ed25519KeyPair,
    step_public_key: Vec<u8>,
    node_id: NodeId,
    root: PathBuf,
    monit: Monit,
    monit_include: PathBuf,
    server_cert: CertificateDer<'static>,
}

impl std::fmt::Debug for Fixture {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixture")
            .field("node_id", &self.node_id)
            .finish_non_exhaustive()
    }
}

impl Fixture {
    /// An agent whose root and private monit live in `dir` (nothing is run
    /// there), whose step key is made from `step_seed`, and whose enrolment
    /// connection showed `server_cert_der`.
    pub fn new(
        dir: &Path,
        step_seed: [u8; 32],
        server_cert_der: Vec<u8>,
    ) -> Result<Fixture, MonitError> {
        let step_key = Ed25519KeyPair::from_seed_unchecked(&step_seed)
            .unwrap_or_else(|_| panic!("a 32-byte seed makes an Ed25519 key"));
        let step_public_key = step_key.public_key().as_ref().to_vec();
        let monit = Monit::private(&dir.join("monit").join("monitrc"))?;
        Ok(Fixture {
            step_key,
            step_public_key,
            node_id: NodeId::from(NODE_ID),
            root: dir.join("root"),
            monit,
            monit_include: dir.join("monit").join("conf.d"),
            server_cert: CertificateDer::from(server_cert_der),
        })
    }

    /// The public half of the step key the agent pinned.
    pub fn step_public_key(&self) -> &[u8] {
        &self.step_public_key
    }

    /// Signs `body` as the controller would, with the fixture's step key.
    pub fn sign(&self, body: &[u8]) -> Vec<u8> {
        let mut m = de_common::STEP_DOMAIN.to_vec();
        m.extend_from_slice(body);
        self.step_key.sign(&m).as_ref().to_vec()
    }

    /// A step as it comes on a pull, through the agent's whole check
    /// ([`accept`]). Input: flags (bit 0 [`STEP_SIGN`], bits 1-2 the lane
    /// pulled), `last_done` and `now` (u64 BE each), then without
    /// [`STEP_SIGN`] a 64-byte signature, then the step body (postcard).
    ///
    /// Asserts that an accepted step is this node's, of the lane pulled,
    /// above `last_done`, not expired, signed by the pinned key, and that
    /// every path and monit name it carries stays under the node root and
    /// the monit include directory.
    pub fn step(&self, data: &[u8]) {
        let Some((header, rest)) = data.split_at_checked(STEP_HEADER) else {
            return;
        };
        let flags = header[0];
        let lane = Lane::ALL[usize::from((flags >> 1) & 3) % Lane::ALL.len()];
        let last_done = u64::from_be_bytes(header[1..9].try_into().unwrap_or_default());
        let now = u64::from_be_bytes(header[9..17].try_into().unwrap_or_default());
        let signed = if flags & STEP_SIGN != 0 {
            SignedStep {
                body: rest.to_vec(),
                signature: self.sign(rest),
            }
        } else {
            let Some((signature, body)) = rest.split_at_checked(64) else {
                return;
            };
            SignedStep {
                body: body.to_vec(),
                signature: signature.to_vec(),
            }
        };
        let step = match accept(
            &signed,
            &(self.step_public_key.clone(), None),
            &self.node_id,
            lane,
            last_done,
            now,
        ) {
            Ok(step) => step,
            Err(refusal) => {
                // What the agent logs and reports about a refused step.
                let _ = refusal.to_string();
                let _ = de_common::decode_step_unverified(&signed);
                return;
            }
        };
        assert_eq!(
            signed.signature,
            self.sign(&signed.body),
            "a step was accepted without the pinned key's signature"
        );
        assert_eq!(step.node_id, self.node_id, "accepted another node's step");
        assert_eq!(step.lane, lane, "accepted a step of another lane");
        assert!(step.seq > last_done, "accepted a replayed sequence");
        assert!(now <= step.not_after, "accepted an expired step");
        match &step.action {
            StepAction::WriteFile { path, .. } | StepAction::Fetch { path, .. } => self.path(path),
            StepAction::CollectLogs { paths, .. } => paths.iter().for_each(|p| self.path(p)),
            StepAction::MarkApplied { files, check, .. } => {
                files.iter().for_each(|p| self.path(p));
                if let Some(name) = check {
                    self.monit_name(name);
                }
            }
            StepAction::MonitAdd { name, .. }
            | StepAction::MonitRemove { name }
            | StepAction::Monit { name, .. } => self.monit_name(name),
            StepAction::Script { .. } | StepAction::Cancel { .. } | StepAction::Unmark { .. } => {}
        }
    }

    /// A path from a step resolves under the node root, or is refused.
    fn path(&self, path: &str) {
        if let Ok(full) = under_root(&self.root, path) {
            assert!(
                full.starts_with(&self.root)
                    && full.strip_prefix(&self.root).is_ok_and(|rel| rel
                        .components()
                        .all(|c| matches!(c, Component::Normal(_)))),
                "step path {path:?} resolved to {full:?}, outside the node root"
            );
        }
    }

    /// A monit check name from a step names a file directly in the include dir, or is refused.
    fn monit_name(&self, name: &str) {
        if let Ok(file) = self.monit.check_path(name) {
            assert_eq!(
                file.parent(),
                Some(self.monit_include.as_path()),
                "monit check {name:?} is written outside the include dir"
            );
        }
    }

    /// The enrolment grant after its seal was opened: decoded, then its CA
    /// checked against the certificate the connection showed, as the agent
    /// does before it saves anything.
    pub fn grant(&self, payload: &[u8]) {
        if let Ok(grant) = decode::<EnrollGrant>(payload) {
            let _ = crate::enroll::check_chain(&grant.ca_pem, &self.server_cert);
        }
    }

    /// A CA in PEM, as a grant carries it, checked against the certificate
    /// the connection showed; and, when `server_cert_der` is given, that
    /// certificate checked against `ca_pem`.
    pub fn chain(&self, ca_pem: &str, server_cert_der: Option<&[u8]>) -> bool {
        match server_cert_der {
            Some(der) => crate::enroll::check_chain(ca_pem, &CertificateDer::from(der)).is_ok(),
            None => crate::enroll::check_chain(ca_pem, &self.server_cert).is_ok(),
        }
    }
}

/// monit's whole answer to the status request (HTTP head and XML body),
/// through the agent's reading of it. Asserts every state is one the API
/// documents.
pub fn monit_answer(answer: &[u8]) {
    let Ok(xml) = status_body(answer) else {
        return;
    };
    if let Ok(components) = parse_status(&xml) {
        for c in components {
            assert!(
                matches!(
                    c.status.as_str(),
                    "RUNNING" | "DOWN" | "STARTING" | "STOPPING" | "STOPPED"
                ),
                "unknown state {:?}",
                c.status
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use de_common::{Step, StepAction};

    use super::*;

    fn step(action: StepAction) -> Step {
        Step {
            id: "s-1".into(),
            deployment_id: None,
            node_id: NODE_ID.into(),
            lane: Lane::Deploy,
            seq: 5,
            issued_at: 1_000,
            not_after: 2_000,
            action,
        }
    }

    fn input(flags: u8, last_done: u64, now: u64, body: &[u8]) -> Vec<u8> {
        let mut v = vec![flags];
        v.extend_from_slice(&last_done.to_be_bytes());
        v.extend_from_slice(&now.to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    #[test]
    fn the_step_entry_runs_the_agents_check() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = Fixture::new(dir.path(), [7; 32], Vec::new()).expect("fixture");
        let signed = de_common::sign_step(
            &step(StepAction::WriteFile {
                path: "/etc/../../x".into(),
                contents: vec![],
                mode: 0o644,
                owner: None,
            }),
            &f.step_key,
        )
        .expect("sign");
        let lane = Lane::Deploy;
        assert!(
            accept(
                &signed,
                &(f.step_public_key().to_vec(), None),
                &f.node_id,
                lane,
                4,
                1_500
            )
            .is_ok()
        );
        assert!(
            accept(
                &signed,
                &(f.step_public_key().to_vec(), None),
                &f.node_id,
                lane,
                5,
                1_500
            )
            .is_err()
        );
        f.step(&input(STEP_SIGN, 4, 1_500, &signed.body));
        f.step(&input(0, 4, 1_500, &[0; 80]));
        f.step(&[]);
    }

    #[test]
    fn the_monit_entry_reads_a_whole_answer() {
        monit_answer(
            b"HTTP/1.0 200 OK\r\n\r\n<monit><service type=\"3\"><name>a</name></service></monit>",
        );
        monit_answer(b"HTTP/1.0 404 Not Found\r\n\r\n");
        monit_answer(&[0xff, 0, b'\r']);
    }
}
