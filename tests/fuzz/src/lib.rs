//! The fuzz targets: one per decoder of outside input, each running the
//! bytes through the project's real decode path (the crates' `fuzzing`
//! entry points and public decoders). The same functions back the AFL++
//! engine binary, the replay binary and the replay tests, so a crash file
//! found by the engine replays without it.

use std::cell::RefCell;
use std::path::Path;
use std::time::{Duration, SystemTime};

use de_common::{
    AgentMsg, ControllerMsg, EnrollClientMsg, EnrollServerMsg, FrameError, decode, encode,
    read_frame,
};
use de_install_codes::{
    AgentHandshake, ChannelBinding, CodeBook, ControllerHandshake, InstallCode, SessionKeys,
};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// Every target, in the order `run.sh` runs them.
pub const TARGETS: [&str; 9] = [
    "frames", "enroll", "step", "cert", "plan", "catalog", "monit", "compat", "logs",
];

/// The seed of the step key the agent fixture pins (steps the seeds carry
/// are signed with it).
pub const STEP_SEED: [u8; 32] = [0x5e; 32];

/// The exporter secret both ends of the fixture's enrolment channel share.
const EKM: [u8; 32] = [0x11; 32];

/// What the targets check inputs against: a controller and an agent (keys,
/// catalogs, nodes, a stored plan, a log dir, a pinned step key) and a pair
/// of enrolment session keys, made once per process.
pub struct Targets {
    ctl: de_controller::fuzzing::Fixture,
    agent: de_agent::fuzzing::Fixture,
    binding: ChannelBinding,
    /// (agent's, controller's) keys of one finished handshake; sealing
    /// with one and opening with the other keeps their counters in step.
    keys: RefCell<(SessionKeys, SessionKeys)>,
    rt: tokio::runtime::Runtime,
}

impl std::fmt::Debug for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Targets").finish_non_exhaustive()
    }
}

/// A target name that is not in [`TARGETS`].
#[derive(Debug, thiserror::Error)]
#[error("no fuzz target {0:?}; the targets are {TARGETS:?}")]
pub struct UnknownTarget(pub String);

impl Targets {
    /// Makes the fixtures in `dir` (empty; the caller removes it, or not:
    /// the engine's forked children use it after the parent is done).
    pub fn new(dir: &Path) -> anyhow::Result<Targets> {
        let ctl_dir = dir.join("controller");
        let agent_dir = dir.join("agent");
        std::fs::create_dir_all(&agent_dir)?;
        copy_pki(&pki_dir(), &ctl_dir.join("pki"))?;
        let ctl = de_controller::fuzzing::Fixture::new(&ctl_dir)?;
        let agent =
            de_agent::fuzzing::Fixture::new(&agent_dir, STEP_SEED, ctl.server_cert_der().to_vec())?;
        let binding = ChannelBinding {
            ekm: EKM,
            controller_cert_der: ctl.server_cert_der().to_vec(),
        };
        let keys = handshake(&binding)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        Ok(Targets {
            ctl,
            agent,
            binding,
            keys: RefCell::new(keys),
            rt,
        })
    }

    /// Runs `data` through `target`. Returns for every input; a panic (or
    /// an abort) is a finding.
    pub fn run(&self, target: &str, data: &[u8]) -> Result<(), UnknownTarget> {
        match target {
            "frames" => self.frames(data),
            "enroll" => self.enroll(data),
            "step" => self.agent.step(data),
            "cert" => self.cert(data),
            "plan" => {
                self.ctl.plan(data);
            }
            "catalog" => {
                self.ctl.catalog(data);
            }
            "monit" => de_agent::fuzzing::monit_answer(data),
            "compat" => self.ctl.compat(data),
            "logs" => self.ctl.logs(data),
            other => return Err(UnknownTarget(other.to_owned())),
        }
        Ok(())
    }

    /// Agent-link frames: the bytes of a stream read frame by frame as the
    /// controller reads an agent's (`AgentMsg`) and as the agent reads the
    /// controller's (`ControllerMsg`), and the whole input as one frame body.
    fn frames(&self, data: &[u8]) {
        self.stream::<AgentMsg>(data);
        self.stream::<ControllerMsg>(data);
        body::<AgentMsg>(data);
        body::<ControllerMsg>(data);
    }

    /// Reads frames of `T` from `data` until the stream ends or one is refused.
    fn stream<T: DeserializeOwned + Serialize>(&self, data: &[u8]) {
        let mut r = data;
        self.rt.block_on(async {
            while let Ok(Some(msg)) = read_frame::<_, T>(&mut r).await {
                round_trip(&msg);
            }
        });
    }

    /// Enrolment: `data[0]` picks the controller reading an agent's
    /// messages (0), the agent reading the controller's (1), a request
    /// sealed with real session keys as the controller opens it (2), or a
    /// grant as the agent opens it (3); the rest is the input.
    fn enroll(&self, data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        match mode % 4 {
            0 => self.enroll_controller(rest),
            1 => self.enroll_agent(rest),
            2 => {
                let mut keys = self.keys.borrow_mut();
                let sealed = keys.0.seal(rest);
                let opened = keys.1.open(&sealed);
                assert_eq!(
                    opened.as_deref().ok(),
                    Some(rest),
                    "a sealed request did not open"
                );
                drop(keys);
                self.ctl.enroll_request(rest);
                body::<EnrollClientMsg>(rest);
            }
            _ => {
                let mut keys = self.keys.borrow_mut();
                let sealed = keys.1.seal(rest);
                let opened = keys.0.open(&sealed);
                assert_eq!(
                    opened.as_deref().ok(),
                    Some(rest),
                    "a sealed grant did not open"
                );
                drop(keys);
                self.agent.grant(rest);
                body::<EnrollServerMsg>(rest);
            }
        }
    }

    /// The controller's side of `de-enroll/1`: Start, Confirm, Request, with
    /// a fresh code book holding an open code, as `agents/quic.rs` runs it.
    fn enroll_controller(&self, data: &[u8]) {
        let mut book = CodeBook::new();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        if book.issue(now, Duration::from_secs(600), None).is_err() {
            return;
        }
        let source = std::net::IpAddr::from([192, 0, 2, 1]);
        let mut r = data;
        self.rt.block_on(async {
            let Ok(Some(EnrollClientMsg::Start { spake })) = read_frame(&mut r).await else {
                return;
            };
            let Ok(challenge) = book.challenge(source, now, self.binding.clone(), &spake) else {
                return;
            };
            let Ok(Some(EnrollClientMsg::Confirm { mac })) = read_frame(&mut r).await else {
                book.failed(&challenge.attempt);
                return;
            };
            let mut keys = match challenge.handshake.confirm(&mac) {
                Ok(keys) => keys,
                Err(_) => {
                    book.failed(&challenge.attempt);
                    return;
                }
            };
            if let Ok(Some(EnrollClientMsg::Request { sealed })) = read_frame(&mut r).await
                && let Ok(payload) = keys.open(&sealed)
            {
                self.ctl.enroll_request(&payload);
                let _ = book.admit(&challenge.attempt, now);
            }
        });
    }

    /// The agent's side of `de-enroll/1`: Challenge, then Granted.
    fn enroll_agent(&self, data: &[u8]) {
        let Ok(code) = InstallCode::parse("0427") else {
            return;
        };
        let (hs, _start) = AgentHandshake::start(&code, self.binding.clone());
        let mut r = data;
        self.rt.block_on(async {
            let Ok(Some(EnrollServerMsg::Challenge { reply })) = read_frame(&mut r).await else {
                return;
            };
            let Ok((mut keys, _confirm)) = hs.finish(&reply) else {
                return;
            };
            if let Ok(Some(EnrollServerMsg::Granted { sealed })) = read_frame(&mut r).await
                && let Ok(payload) = keys.open(&sealed)
            {
                self.agent.grant(&payload);
            }
        });
    }

    /// Certificates at enrolment: `data[0]` picks a CSR (PEM) as the
    /// controller issues from it (0), a client certificate (DER) as the
    /// controller's TLS verifier reads it (1), a CA (PEM) as the agent
    /// checks a grant's against the controller's certificate (2), or the
    /// controller's certificate (DER) as the agent checks it against the
    /// real CA (3).
    fn cert(&self, data: &[u8]) {
        let Some((mode, rest)) = data.split_first() else {
            return;
        };
        match mode % 4 {
            0 => {
                let _ = self.ctl.csr(&String::from_utf8_lossy(rest));
            }
            1 => self.ctl.client_cert(rest),
            2 => {
                let ca = String::from_utf8_lossy(rest);
                if self.agent.chain(&ca, None) {
                    assert!(
                        ca.contains("-----BEGIN CERTIFICATE-----"),
                        "a CA that is no PEM certificate was trusted"
                    );
                }
            }
            _ => {
                let _ = self.agent.chain(self.ctl.ca_pem(), Some(rest));
            }
        }
    }

    /// Issues a node certificate from `csr_pem` as the fixture controller
    /// (the seed generator writes one).
    pub fn issue(&self, csr_pem: &str) -> Option<String> {
        self.ctl.csr(csr_pem)
    }

    /// The fixture controller's CA (the seed generator writes it).
    pub fn ca_pem(&self) -> &str {
        self.ctl.ca_pem()
    }

    /// The fixture controller's QUIC certificate (DER).
    pub fn server_cert_der(&self) -> &[u8] {
        self.ctl.server_cert_der()
    }

    /// The binding of the fixture's enrolment channel.
    pub fn binding(&self) -> &ChannelBinding {
        &self.binding
    }
}

/// The controller keys the fixture uses (test keys only, committed, so
/// certificates in the seeds chain to the fixture's CA in every run).
pub fn pki_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixture-pki")
}

/// Copies the key files in `from` (if any) to `to`, created with mode 0700.
pub fn copy_pki(from: &Path, to: &Path) -> anyhow::Result<()> {
    de_common::ensure_private_dir(to)?;
    let Ok(entries) = std::fs::read_dir(from) else {
        return Ok(());
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            de_common::write_private(&to.join(entry.file_name()), &std::fs::read(entry.path())?)?;
        }
    }
    Ok(())
}

/// Runs a whole agent/controller handshake with a fixed code and returns
/// the (agent's, controller's) session keys.
fn handshake(binding: &ChannelBinding) -> anyhow::Result<(SessionKeys, SessionKeys)> {
    let code = InstallCode::parse("0427")?;
    let (agent, msg_a) = AgentHandshake::start(&code, binding.clone());
    let (controller, reply) = ControllerHandshake::respond(&code, binding.clone(), &msg_a)?;
    let (agent_keys, confirm) = agent.finish(&reply)?;
    let controller_keys = controller.confirm(&confirm)?;
    Ok((agent_keys, controller_keys))
}

/// A frame body of `T`, decoded as every receiver decodes one.
fn body<T: DeserializeOwned + Serialize>(data: &[u8]) {
    if let Ok(msg) = decode::<T>(data) {
        round_trip(&msg);
    }
}

/// What decodes encodes again, and the encoding decodes to the same bytes.
fn round_trip<T: DeserializeOwned + Serialize>(msg: &T) {
    let once = match encode(msg) {
        Ok(b) => b,
        // A message read from at most 1 MiB may take more to write only
        // through its length prefixes; the sender splits those.
        Err(FrameError::TooLarge { .. }) => return,
        Err(e) => panic!("a decoded message does not encode: {e}"),
    };
    let again: T =
        decode(&once).unwrap_or_else(|e| panic!("an encoded message does not decode: {e}"));
    let twice = encode(&again).unwrap_or_else(|e| panic!("a decoded message does not encode: {e}"));
    assert_eq!(
        once, twice,
        "a message changed on its way through encode and decode"
    );
}
