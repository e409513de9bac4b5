//! The enrolment handshake: SPAKE2 on the install code, bound to one TLS connection, with key confirmation.
//!
//! # Protocol
//!
//! ```text
//! agent (SPAKE2 side A)                          controller (SPAKE2 side B)
//!   msg_a (33 bytes)                     ------>
//!                                        <------  msg_b (33 bytes) || confirm_controller (32 bytes)
//!   checks confirm_controller; on failure
//!   sends NOTHING more
//!   confirm_agent (32 bytes)             ------>
//!                                                 checks confirm_agent
//!   sealed frames                        <----->  sealed frames
//! ```
//!
//! SPAKE2 runs over Ed25519 with the 4 digits as password and the identities
//! `b"de-agent"` (A) and `b"de-controller"` (B).
//!
//! # Key schedule
//!
//! ```text
//! K    = SPAKE2 key (32 bytes)
//! PRK  = HKDF-SHA256-Extract(salt = ekm, IKM = K)
//! confirm_controller = HKDF-Expand(PRK, "de-enroll confirm controller", 32)
//! confirm_agent      = HKDF-Expand(PRK, "de-enroll confirm agent", 32)
//! seal_a2c           = HKDF-Expand(PRK, "de-enroll seal agent->controller", 32)
//! seal_c2a           = HKDF-Expand(PRK, "de-enroll seal controller->agent", 32)
//!
//! transcript = SHA-256( len(msg_a) || msg_a || len(msg_b) || msg_b
//!                     || len(ekm) || ekm || len(cert) || controller_cert_der )
//!              (each len a u32, big-endian)
//! controller confirmation = HMAC-SHA256(confirm_controller, transcript)
//! agent confirmation      = HMAC-SHA256(confirm_agent, transcript)
//!
//! sealed frame = payload || HMAC-SHA256(seal key of the sender, counter || payload)
//!                (counter: u64 big-endian, 0 for the sender's first frame, +1 per frame)
//! ```
//!
//! `ekm` is the TLS exporter secret for [`EKM_LABEL`] (32 bytes, no context)
//! and `controller_cert_der` is the certificate the agent was shown. A man in
//! the middle runs two TLS connections, so the two sides see different `ekm`s
//! (and usually certificates) and the confirmations do not match even when he
//! knows the code; each attempt is one online guess of the code and nothing
//! an eavesdropper sees allows testing guesses offline.

use std::fmt;

use ring::{digest, hkdf, hmac};
use spake2::{Ed25519Group, Identity, Password, Spake2};

use crate::code::InstallCode;

/// The TLS exporter label both sides use to derive [`ChannelBinding::ekm`].
pub const EKM_LABEL: &[u8] = b"EXPORTER-de-enroll";

const ID_AGENT: &[u8] = b"de-agent";
const ID_CONTROLLER: &[u8] = b"de-controller";
/// SPAKE2 message length for Ed25519: a side byte and a compressed point.
const SPAKE_MSG_LEN: usize = 33;
/// HMAC-SHA256 tag length (confirmations and seals).
const MAC_LEN: usize = 32;

const INFO_CONFIRM_CONTROLLER: &[u8] = b"de-enroll confirm controller";
const INFO_CONFIRM_AGENT: &[u8] = b"de-enroll confirm agent";
const INFO_SEAL_A2C: &[u8] = b"de-enroll seal agent->controller";
const INFO_SEAL_C2A: &[u8] = b"de-enroll seal controller->agent";

/// What ties the handshake to one TLS connection: the exporter secret and
/// the controller certificate the agent saw.
#[derive(Clone)]
pub struct ChannelBinding {
    pub ekm: [u8; 32],
    pub controller_cert_der: Vec<u8>,
}

impl fmt::Debug for ChannelBinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ChannelBinding")
            .field("ekm", &"<redacted>")
            .field(
                "controller_cert_der",
                &format_args!("<{} bytes>", self.controller_cert_der.len()),
            )
            .finish()
    }
}

/// Which end of the enrolment a value belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Agent,
    Controller,
}

/// Why a handshake step or a sealed frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    #[error("wrong install code: check the 4 digits shown in the console")]
    WrongCode,
    #[error("malformed handshake message: {0}")]
    Malformed(&'static str),
    #[error(
        "enrolment message failed its integrity check: the connection was tampered with; try again"
    )]
    BadSeal,
}

/// The four keys derived from the SPAKE2 key and the channel binding.
#[derive(Clone)]
struct Schedule {
    confirm_controller: hmac::Key,
    confirm_agent: hmac::Key,
    seal_a2c: hmac::Key,
    seal_c2a: hmac::Key,
}

impl Schedule {
    fn derive(spake_key: &[u8], ekm: &[u8; 32]) -> Result<Schedule, HandshakeError> {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, ekm).extract(spake_key);
        let expand = |info: &[u8]| -> Result<hmac::Key, HandshakeError> {
            prk.expand(&[info], hmac::HMAC_SHA256)
                .map(hmac::Key::from)
                .map_err(|_| HandshakeError::Malformed("key derivation failed"))
        };
        Ok(Schedule {
            confirm_controller: expand(INFO_CONFIRM_CONTROLLER)?,
            confirm_agent: expand(INFO_CONFIRM_AGENT)?,
            seal_a2c: expand(INFO_SEAL_A2C)?,
            seal_c2a: expand(INFO_SEAL_C2A)?,
        })
    }
}

/// SHA-256 over the length-prefixed handshake fields.
fn transcript(msg_a: &[u8], msg_b: &[u8], binding: &ChannelBinding) -> digest::Digest {
    let mut ctx = digest::Context::new(&digest::SHA256);
    for field in [
        msg_a,
        msg_b,
        &binding.ekm[..],
        &binding.controller_cert_der[..],
    ] {
        // A certificate of 4 GiB or more is not a real case; saturating keeps
        // this total without a panic path.
        let len = u32::try_from(field.len()).unwrap_or(u32::MAX);
        ctx.update(&len.to_be_bytes());
        ctx.update(field);
    }
    ctx.finish()
}

fn spake_error(err: spake2::Error) -> HandshakeError {
    HandshakeError::Malformed(match err {
        spake2::Error::BadSide => "the SPAKE2 message comes from the wrong side",
        spake2::Error::CorruptMessage => "the SPAKE2 message is not a valid curve point",
        spake2::Error::WrongLength => "the SPAKE2 message has the wrong length",
    })
}

/// Agent side (SPAKE2 side A).
pub struct AgentHandshake {
    spake: Spake2<Ed25519Group>,
    msg_a: Vec<u8>,
    binding: ChannelBinding,
}

impl fmt::Debug for AgentHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHandshake")
            .field("binding", &self.binding)
            .finish_non_exhaustive()
    }
}

impl AgentHandshake {
    /// Returns the state and the first message (SPAKE2 msg A, 33 bytes) to send.
    pub fn start(code: &InstallCode, binding: ChannelBinding) -> (AgentHandshake, Vec<u8>) {
        let (spake, msg_a) = Spake2::<Ed25519Group>::start_a(
            &Password::new(code.as_str()),
            &Identity::new(ID_AGENT),
            &Identity::new(ID_CONTROLLER),
        );
        let state = AgentHandshake {
            spake,
            msg_a: msg_a.clone(),
            binding,
        };
        (state, msg_a)
    }

    /// Takes the controller's reply ([`ControllerHandshake::respond`] output)
    /// and checks the controller's confirmation.
    ///
    /// `Err(HandshakeError::WrongCode)` if it does not verify: a wrong code
    /// or a man in the middle (the agent cannot tell which), and the agent
    /// must send NOTHING more on this connection. On success returns the
    /// session keys and the agent's own confirmation to send.
    pub fn finish(self, controller_reply: &[u8]) -> Result<(SessionKeys, Vec<u8>), HandshakeError> {
        if controller_reply.len() != SPAKE_MSG_LEN + MAC_LEN {
            return Err(HandshakeError::Malformed(
                "the controller's reply must be 65 bytes (SPAKE2 message B and a 32-byte confirmation)",
            ));
        }
        let (msg_b, controller_mac) = controller_reply.split_at(SPAKE_MSG_LEN);
        let spake_key = self.spake.finish(msg_b).map_err(spake_error)?;
        let keys = Schedule::derive(&spake_key, &self.binding.ekm)?;
        let transcript = transcript(&self.msg_a, msg_b, &self.binding);
        hmac::verify(
            &keys.confirm_controller,
            transcript.as_ref(),
            controller_mac,
        )
        .map_err(|_| HandshakeError::WrongCode)?;
        let confirmation = hmac::sign(&keys.confirm_agent, transcript.as_ref())
            .as_ref()
            .to_vec();
        Ok((SessionKeys::new(Side::Agent, &keys), confirmation))
    }
}

/// Controller side (SPAKE2 side B).
pub struct ControllerHandshake {
    keys: Schedule,
    transcript: digest::Digest,
}

impl fmt::Debug for ControllerHandshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerHandshake")
            .finish_non_exhaustive()
    }
}

impl ControllerHandshake {
    /// Takes msg A; returns the state and the reply = SPAKE2 msg B ||
    /// controller confirmation (65 bytes).
    pub fn respond(
        code: &InstallCode,
        binding: ChannelBinding,
        agent_msg: &[u8],
    ) -> Result<(ControllerHandshake, Vec<u8>), HandshakeError> {
        if agent_msg.len() != SPAKE_MSG_LEN {
            return Err(HandshakeError::Malformed(
                "the agent's SPAKE2 message must be 33 bytes",
            ));
        }
        let (spake, msg_b) = Spake2::<Ed25519Group>::start_b(
            &Password::new(code.as_str()),
            &Identity::new(ID_AGENT),
            &Identity::new(ID_CONTROLLER),
        );
        let spake_key = spake.finish(agent_msg).map_err(spake_error)?;
        let keys = Schedule::derive(&spake_key, &binding.ekm)?;
        let transcript = transcript(agent_msg, &msg_b, &binding);
        let mut reply = msg_b;
        reply.extend_from_slice(hmac::sign(&keys.confirm_controller, transcript.as_ref()).as_ref());
        Ok((ControllerHandshake { keys, transcript }, reply))
    }

    /// Checks the agent's confirmation (constant time).
    /// `Err(HandshakeError::WrongCode)` if it does not verify (the guess
    /// stays counted against the code: see [`crate::CodeBook::failed`]).
    pub fn confirm(self, agent_confirmation: &[u8]) -> Result<SessionKeys, HandshakeError> {
        if agent_confirmation.len() != MAC_LEN {
            return Err(HandshakeError::Malformed(
                "the agent's confirmation must be 32 bytes",
            ));
        }
        hmac::verify(
            &self.keys.confirm_agent,
            self.transcript.as_ref(),
            agent_confirmation,
        )
        .map_err(|_| HandshakeError::WrongCode)?;
        Ok(SessionKeys::new(Side::Controller, &self.keys))
    }
}

/// Keys derived after both confirmations; they protect the rest of the
/// enrolment exchange. Agent keys seal with the agent->controller key and
/// open with the controller->agent key, and the other way round for the
/// controller. Frames must be opened in the order they were sealed.
pub struct SessionKeys {
    side: Side,
    send: hmac::Key,
    recv: hmac::Key,
    sent: u64,
    received: u64,
}

impl fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionKeys")
            .field("side", &self.side)
            .field("sent", &self.sent)
            .field("received", &self.received)
            .finish_non_exhaustive()
    }
}

impl SessionKeys {
    fn new(side: Side, keys: &Schedule) -> SessionKeys {
        let (send, recv) = match side {
            Side::Agent => (keys.seal_a2c.clone(), keys.seal_c2a.clone()),
            Side::Controller => (keys.seal_c2a.clone(), keys.seal_a2c.clone()),
        };
        SessionKeys {
            side,
            send,
            recv,
            sent: 0,
            received: 0,
        }
    }

    /// Which end these keys belong to.
    pub fn side(&self) -> Side {
        self.side
    }

    /// payload || HMAC-SHA256 tag under this side's sending key, over the
    /// send counter and the payload, so frames cannot be replayed or
    /// reordered. The payload is authenticated, not encrypted (it travels
    /// inside TLS).
    pub fn seal(&mut self, payload: &[u8]) -> Vec<u8> {
        let tag = hmac::sign(&self.send, &counted(self.sent, payload));
        // 2^64 frames in one enrolment cannot happen.
        self.sent = self.sent.wrapping_add(1);
        let mut sealed = Vec::with_capacity(payload.len() + MAC_LEN);
        sealed.extend_from_slice(payload);
        sealed.extend_from_slice(tag.as_ref());
        sealed
    }

    /// Verifies and strips the tag of the next frame sent by the other side.
    /// `Err(HandshakeError::BadSeal)` if it was altered, replayed, reordered
    /// or sealed by anyone else; the connection should then be dropped.
    pub fn open(&mut self, sealed: &[u8]) -> Result<Vec<u8>, HandshakeError> {
        let Some(split) = sealed.len().checked_sub(MAC_LEN) else {
            return Err(HandshakeError::BadSeal);
        };
        let (payload, tag) = sealed.split_at(split);
        hmac::verify(&self.recv, &counted(self.received, payload), tag)
            .map_err(|_| HandshakeError::BadSeal)?;
        self.received = self.received.wrapping_add(1);
        Ok(payload.to_vec())
    }
}

/// counter (u64 big-endian) || payload: what a frame's tag covers.
fn counted(counter: u64, payload: &[u8]) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + payload.len());
    data.extend_from_slice(&counter.to_be_bytes());
    data.extend_from_slice(payload);
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::{SecureRandom, SystemRandom};

    fn code(s: &str) -> InstallCode {
        InstallCode::parse(s).expect("valid code")
    }

    fn binding(ekm_byte: u8) -> ChannelBinding {
        ChannelBinding {
            ekm: [ekm_byte; 32],
            controller_cert_der: b"controller certificate DER".to_vec(),
        }
    }

    /// An agent that skips checking the controller's confirmation and sends
    /// its own anyway: what a misbehaving or attacking client could do.
    fn reckless_agent_confirmation(agent: AgentHandshake, reply: &[u8]) -> Vec<u8> {
        let (msg_b, _) = reply.split_at(SPAKE_MSG_LEN);
        let spake_key = agent.spake.finish(msg_b).expect("valid msg B");
        let keys = Schedule::derive(&spake_key, &agent.binding.ekm).expect("derive");
        let transcript = transcript(&agent.msg_a, msg_b, &agent.binding);
        hmac::sign(&keys.confirm_agent, transcript.as_ref())
            .as_ref()
            .to_vec()
    }

    /// Runs the whole handshake; both sides' keys on success.
    fn enrol(
        agent_code: &str,
        controller_code: &str,
    ) -> Result<(SessionKeys, SessionKeys), HandshakeError> {
        let (agent, msg_a) = AgentHandshake::start(&code(agent_code), binding(7));
        assert_eq!(msg_a.len(), 33);
        let (controller, reply) =
            ControllerHandshake::respond(&code(controller_code), binding(7), &msg_a)?;
        assert_eq!(reply.len(), 65);
        let (agent_keys, confirmation) = agent.finish(&reply)?;
        assert_eq!(confirmation.len(), 32);
        let controller_keys = controller.confirm(&confirmation)?;
        Ok((agent_keys, controller_keys))
    }

    #[test]
    fn right_code_gives_both_sides_keys_that_open_each_others_frames() {
        let (mut agent, mut controller) = enrol("0427", "0427").expect("handshake");
        assert_eq!(agent.side(), Side::Agent);
        assert_eq!(controller.side(), Side::Controller);

        let request = agent.seal(b"csr, hostname, ips, hardware");
        assert_eq!(
            controller.open(&request).expect("opens"),
            b"csr, hostname, ips, hardware"
        );
        let grant = controller.seal(b"node id, cert, ca, step key");
        assert_eq!(
            agent.open(&grant).expect("opens"),
            b"node id, cert, ca, step key"
        );
        // Empty payloads work too, and counters keep advancing.
        let empty = agent.seal(b"");
        assert_eq!(controller.open(&empty).expect("opens"), b"");
    }

    #[test]
    fn tampered_replayed_reordered_or_reflected_frames_are_refused() {
        let (mut agent, mut controller) = enrol("0427", "0427").expect("handshake");

        let first = agent.seal(b"first");
        let mut tampered = first.clone();
        tampered[0] ^= 1;
        assert_eq!(controller.open(&tampered), Err(HandshakeError::BadSeal));
        let mut bad_tag = first.clone();
        let last = bad_tag.len() - 1;
        bad_tag[last] ^= 0x80;
        assert_eq!(controller.open(&bad_tag), Err(HandshakeError::BadSeal));
        assert_eq!(controller.open(&first[1..]), Err(HandshakeError::BadSeal));

        assert_eq!(controller.open(&first).expect("opens"), b"first");
        assert_eq!(
            controller.open(&first),
            Err(HandshakeError::BadSeal),
            "replay"
        );

        let second = agent.seal(b"second");
        let third = agent.seal(b"third");
        assert_eq!(
            controller.open(&third),
            Err(HandshakeError::BadSeal),
            "reorder"
        );
        assert_eq!(controller.open(&second).expect("opens"), b"second");
        assert_eq!(controller.open(&third).expect("opens"), b"third");

        // A frame the agent sealed, sent back to the agent, does not open.
        let own = agent.seal(b"mine");
        assert_eq!(agent.open(&own), Err(HandshakeError::BadSeal));

        // Keys from another (successful) enrolment do not open these frames.
        let (mut other_agent, _) = enrol("0427", "0427").expect("handshake");
        let foreign = other_agent.seal(b"foreign");
        assert_eq!(controller.open(&foreign), Err(HandshakeError::BadSeal));
    }

    #[test]
    fn wrong_code_is_detected_by_the_agent_before_it_sends_anything() {
        assert_eq!(
            enrol("0427", "0428").map(|_| ()),
            Err(HandshakeError::WrongCode)
        );
        assert_eq!(
            HandshakeError::WrongCode.to_string(),
            "wrong install code: check the 4 digits shown in the console"
        );
    }

    #[test]
    fn wrong_code_confirmation_is_refused_by_the_controller() {
        let (agent, msg_a) = AgentHandshake::start(&code("1111"), binding(7));
        let (controller, reply) =
            ControllerHandshake::respond(&code("2222"), binding(7), &msg_a).expect("respond");
        let confirmation = reckless_agent_confirmation(agent, &reply);
        assert_eq!(
            controller.confirm(&confirmation).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );
    }

    #[test]
    fn man_in_the_middle_with_the_right_code_fails_on_both_sides() {
        // The attacker terminates TLS twice: the agent and the controller see
        // different exporter secrets, even though everyone uses the right code.
        let right = code("0427");
        let agent_side = binding(1);
        let controller_side = binding(2);

        // The attacker relays the messages unchanged between the two connections.
        let (agent, msg_a) = AgentHandshake::start(&right, agent_side.clone());
        let (_controller, reply) =
            ControllerHandshake::respond(&right, controller_side.clone(), &msg_a).expect("respond");
        assert_eq!(
            agent.finish(&reply).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );

        // Even if the agent sent its confirmation anyway, the controller refuses it.
        let (agent, msg_a) = AgentHandshake::start(&right, agent_side);
        let (controller, reply) =
            ControllerHandshake::respond(&right, controller_side, &msg_a).expect("respond");
        let confirmation = reckless_agent_confirmation(agent, &reply);
        assert_eq!(
            controller.confirm(&confirmation).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );
    }

    #[test]
    fn different_controller_certificate_fails_the_same_way() {
        let right = code("0427");
        let seen_by_agent = binding(9);
        let mut served = binding(9);
        served.controller_cert_der = b"another certificate".to_vec();

        let (agent, msg_a) = AgentHandshake::start(&right, seen_by_agent.clone());
        let (_, reply) =
            ControllerHandshake::respond(&right, served.clone(), &msg_a).expect("respond");
        assert_eq!(
            agent.finish(&reply).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );

        let (agent, msg_a) = AgentHandshake::start(&right, seen_by_agent);
        let (controller, reply) =
            ControllerHandshake::respond(&right, served, &msg_a).expect("respond");
        let confirmation = reckless_agent_confirmation(agent, &reply);
        assert_eq!(
            controller.confirm(&confirmation).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );
    }

    #[test]
    fn tampered_handshake_messages_are_refused() {
        let right = code("0427");
        let (agent, msg_a) = AgentHandshake::start(&right, binding(3));
        let (_, mut reply) = ControllerHandshake::respond(&right, binding(3), &msg_a).expect("ok");
        reply[64] ^= 1;
        assert_eq!(
            agent.finish(&reply).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );

        let (agent, msg_a) = AgentHandshake::start(&right, binding(3));
        let (controller, reply) =
            ControllerHandshake::respond(&right, binding(3), &msg_a).expect("ok");
        let (_, mut confirmation) = agent.finish(&reply).expect("right code");
        confirmation[0] ^= 1;
        assert_eq!(
            controller.confirm(&confirmation).map(|_| ()),
            Err(HandshakeError::WrongCode)
        );
    }

    #[test]
    fn malformed_inputs_never_panic() {
        let rng = SystemRandom::new();
        let right = code("0427");
        let lengths = [0usize, 1, 31, 32, 33, 34, 64, 65, 66, 100, 1000];
        for &len in &lengths {
            for round in 0..8 {
                let mut junk = vec![0u8; len];
                match round {
                    0 => {}
                    1 => junk.fill(0xff),
                    2 if len > 0 => junk[0] = b'A',
                    3 if len > 0 => junk[0] = b'B',
                    _ => rng.fill(&mut junk).expect("randomness"),
                }

                let outcome = ControllerHandshake::respond(&right, binding(1), &junk);
                if len != 33 {
                    assert!(matches!(outcome, Err(HandshakeError::Malformed(_))));
                }

                let (agent, _) = AgentHandshake::start(&right, binding(1));
                let outcome = agent.finish(&junk);
                assert!(outcome.is_err(), "junk of {len} bytes must not finish");
                if len != 65 {
                    assert!(matches!(outcome, Err(HandshakeError::Malformed(_))));
                }

                let (agent, msg_a) = AgentHandshake::start(&right, binding(1));
                let (controller, reply) =
                    ControllerHandshake::respond(&right, binding(1), &msg_a).expect("ok");
                let expected = if len == 32 {
                    HandshakeError::WrongCode
                } else {
                    HandshakeError::Malformed("the agent's confirmation must be 32 bytes")
                };
                assert_eq!(controller.confirm(&junk).map(|_| ()), Err(expected));

                let (mut keys, _) = agent.finish(&reply).expect("right code");
                assert_eq!(keys.open(&junk), Err(HandshakeError::BadSeal));
            }
        }
    }

    #[test]
    fn spake_messages_from_the_wrong_side_are_malformed() {
        let right = code("0427");
        let (_, msg_a) = AgentHandshake::start(&right, binding(1));
        let (agent, _) = AgentHandshake::start(&right, binding(1));
        // The agent is handed an agent message (a reflection) instead of B.
        let mut reflected = msg_a.clone();
        reflected.extend_from_slice(&[0u8; 32]);
        assert_eq!(
            agent.finish(&reflected).map(|_| ()),
            Err(HandshakeError::Malformed(
                "the SPAKE2 message comes from the wrong side"
            ))
        );
        let (_, reply) = ControllerHandshake::respond(&right, binding(1), &msg_a).expect("ok");
        assert_eq!(
            ControllerHandshake::respond(&right, binding(1), &reply[..33]).map(|_| ()),
            Err(HandshakeError::Malformed(
                "the SPAKE2 message comes from the wrong side"
            ))
        );
    }

    #[test]
    fn debug_output_shows_no_secrets() {
        let b = ChannelBinding {
            ekm: [0xab; 32],
            controller_cert_der: vec![0xcd; 10],
        };
        let shown = format!("{b:?}");
        assert!(!shown.contains("171"), "{shown}"); // 0xab in decimal
        assert!(!shown.to_lowercase().contains("ab, ab"), "{shown}");
        assert!(shown.contains("10 bytes"));

        let (agent, msg_a) = AgentHandshake::start(&code("0427"), b.clone());
        let (controller, reply) =
            ControllerHandshake::respond(&code("0427"), b.clone(), &msg_a).expect("ok");
        assert!(!format!("{agent:?}").contains("0427"));
        assert!(!format!("{agent:?}").contains("171"));
        assert!(format!("{controller:?}").starts_with("ControllerHandshake"));
        let (keys, _) = agent.finish(&reply).expect("right code");
        assert_eq!(
            format!("{keys:?}"),
            "SessionKeys { side: Agent, sent: 0, received: 0, .. }"
        );
    }
}
