//! The controller's book of install codes: one code at a time, its expiry, node count, counted guesses (with where they came from) and rate limits.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::code::{CodeError, InstallCode};
use crate::handshake::{ChannelBinding, ControllerHandshake};
use crate::rate::{RateLimiter, source_key};

/// Limits on guessing an install code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Policy {
    /// Counted guesses after which the code is burned (default 5): a
    /// wrong-code success stays at most 5 in 10 000 per code.
    pub max_failures: u32,
    /// Counted guesses one source (an IPv4 address, an IPv6 /64) may spend
    /// on one code (default 2; 0 counts as 1), so that one address alone
    /// cannot burn the code.
    #[serde(default = "default_max_failures_per_source")]
    pub max_failures_per_source: u32,
    /// Attempts one source address may make at once (default 10; 0 counts as 1).
    pub rate_burst: u32,
    /// Time to earn back one attempt (default 6 s; zero disables the rate limit).
    pub rate_refill: Duration,
}

fn default_max_failures_per_source() -> u32 {
    2
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_failures: 5,
            max_failures_per_source: default_max_failures_per_source(),
            rate_burst: 10,
            rate_refill: Duration::from_secs(6),
        }
    }
}

/// What the controller persists (serde) about install codes; the
/// rate-limiter state and the attempts still in progress are in memory only.
///
/// A guess is counted when the controller answers a well-formed SPAKE2
/// message on an open code ([`CodeBook::challenge`]), because its reply
/// holds the controller's confirmation and lets the peer test one code
/// offline. A malformed `Start` tests nothing and counts nothing. A counted
/// guess stays counted unless that same attempt proves the code
/// ([`CodeBook::admit`]); a success never takes back anyone else's failure.
///
/// A `Start` on a code that cannot admit anyone (none issued, ended, expired,
/// burned, all its nodes admitted) is answered like any other, with a decoy
/// handshake on that closed code (or a random one), so nobody without the
/// code learns whether one is open; an agent holding the code passes the
/// confirmation and is then told exactly why it is refused.
///
/// Persist the book after a counted [`CodeBook::challenge`] and before its
/// reply is sent, so that restarting the controller does not hand out
/// fresh tries.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CodeBook {
    policy: Policy,
    open: Option<OpenCode>,
    /// Bumped by every [`CodeBook::issue`]; attempts remember it.
    generation: u64,
    #[serde(skip)]
    limiter: RateLimiter,
    #[serde(skip)]
    next_attempt: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenCode {
    code: InstallCode,
    expires_at: SystemTime,
    /// Counted guesses that did not prove the code (including ones in progress).
    failures: u32,
    generation: u64,
    /// The counted guesses, with where they came from (books written before
    /// this field have only the count).
    #[serde(default)]
    attempts: Vec<FailedAttempt>,
    /// How many nodes the code admits; `None`: any number until it expires or is ended.
    #[serde(default)]
    nodes: Option<u32>,
    /// Nodes admitted with this code.
    #[serde(default)]
    admitted: u32,
    /// Ended by the operator.
    #[serde(default)]
    ended: bool,
}

/// One counted guess on a code: where it came from and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailedAttempt {
    pub source: IpAddr,
    pub at: SystemTime,
    /// The attempt that may still prove the code (in memory only: after a
    /// restart every counted guess is a failure).
    #[serde(skip)]
    pending: Option<u64>,
}

impl FailedAttempt {
    /// The attempt is still running (it may yet prove the code).
    pub fn in_progress(&self) -> bool {
        self.pending.is_some()
    }
}

/// A code handed to the operator, and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    pub code: InstallCode,
    pub expires_at: SystemTime,
    /// How many nodes it admits (`None`: any number).
    pub nodes: Option<u32>,
}

/// Where a code stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CodeState {
    /// Admits agents.
    Open,
    /// Its TTL ran out.
    Expired,
    /// Too many counted guesses failed.
    Burned,
    /// The operator ended the installation.
    Ended,
    /// It admitted all the nodes it was made for.
    Used,
}

/// A code and everything the operator should see about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CodeStatus {
    pub code: InstallCode,
    pub expires_at: SystemTime,
    pub state: CodeState,
    /// Counted guesses that did not prove the code, oldest first.
    pub failed: Vec<FailedAttempt>,
    /// How many nodes it admits (`None`: any number).
    pub nodes: Option<u32>,
    /// Nodes admitted so far.
    pub admitted: u32,
}

/// Why an enrolment attempt is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum Refusal {
    #[error(
        "no installation is open on the controller: generate an install code in the console (or POST /api/v1/install-codes) first"
    )]
    NoInstallation,
    #[error("the install code has expired: generate a new one in the console")]
    Expired,
    #[error(
        "too many wrong attempts: the install code was burned; generate a new one in the console"
    )]
    Burned,
    #[error("too many attempts from this address: wait {retry_after_secs} s and try again")]
    RateLimited { retry_after_secs: u64 },
    #[error(
        "too many wrong install codes from this address: check the 4 digits in the console, or try from another address"
    )]
    SourceExhausted,
    #[error(
        "the install code has admitted all {nodes} node(s) it was made for: generate a new one in the console"
    )]
    Used { nodes: u32 },
    /// The agent's handshake message could not be read (nothing was counted).
    #[error("{0}")]
    Malformed(String),
}

/// One enrolment attempt that got a challenge: which code generation it
/// belongs to, and whether it counted as a guess (for [`CodeBook::admit`]).
#[derive(Debug)]
pub struct Attempt {
    generation: u64,
    id: u64,
    counted: bool,
}

impl Attempt {
    /// The attempt counted a guess against the open code (the book changed
    /// and must be persisted before the reply is sent).
    pub fn counted(&self) -> bool {
        self.counted
    }
}

/// The answer to an agent's `Start`: the reply to send, the handshake state
/// that checks the agent's confirmation, and the attempt to pass to
/// [`CodeBook::admit`] once it verifies.
#[derive(Debug)]
pub struct Challenge {
    pub attempt: Attempt,
    pub handshake: ControllerHandshake,
    pub reply: Vec<u8>,
}

impl OpenCode {
    fn state(&self, policy: &Policy, now: SystemTime) -> CodeState {
        if self.ended {
            CodeState::Ended
        } else if self.nodes.is_some_and(|n| self.admitted >= n) {
            CodeState::Used
        } else if now >= self.expires_at {
            CodeState::Expired
        } else if self.failures >= policy.max_failures {
            CodeState::Burned
        } else {
            CodeState::Open
        }
    }

    fn refusal(&self, policy: &Policy, now: SystemTime) -> Option<Refusal> {
        match self.state(policy, now) {
            CodeState::Open => None,
            CodeState::Ended => Some(Refusal::NoInstallation),
            CodeState::Expired => Some(Refusal::Expired),
            CodeState::Burned => Some(Refusal::Burned),
            CodeState::Used => Some(Refusal::Used {
                nodes: self.nodes.unwrap_or(self.admitted),
            }),
        }
    }
}

impl CodeBook {
    /// An empty book with the default [`Policy`].
    pub fn new() -> CodeBook {
        CodeBook::default()
    }

    /// An empty book with the given limits.
    pub fn with_policy(policy: Policy) -> CodeBook {
        CodeBook {
            policy,
            ..CodeBook::default()
        }
    }

    /// The limits in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// New code with this TTL, admitting `nodes` nodes (`None`: any number
    /// until it expires or is ended); replaces any other code and its counts.
    pub fn issue(
        &mut self,
        now: SystemTime,
        ttl: Duration,
        nodes: Option<u32>,
    ) -> Result<IssuedCode, CodeError> {
        let expires_at = now.checked_add(ttl).ok_or(CodeError::TtlTooLong)?;
        let code = InstallCode::generate()?;
        self.generation = self.generation.wrapping_add(1);
        self.open = Some(OpenCode {
            code: code.clone(),
            expires_at,
            failures: 0,
            generation: self.generation,
            attempts: Vec::new(),
            nodes,
            admitted: 0,
            ended: false,
        });
        Ok(IssuedCode {
            code,
            expires_at,
            nodes,
        })
    }

    /// The code if it is open (not ended, expired, burned or used up).
    pub fn active(&self, now: SystemTime) -> Option<IssuedCode> {
        self.open
            .as_ref()
            .filter(|open| open.state(&self.policy, now) == CodeState::Open)
            .map(|open| IssuedCode {
                code: open.code.clone(),
                expires_at: open.expires_at,
                nodes: open.nodes,
            })
    }

    /// The last code issued, whatever its state, with its counted guesses
    /// and nodes; `None` if no code was ever issued.
    pub fn status(&self, now: SystemTime) -> Option<CodeStatus> {
        self.open.as_ref().map(|open| CodeStatus {
            code: open.code.clone(),
            expires_at: open.expires_at,
            state: open.state(&self.policy, now),
            failed: open.attempts.clone(),
            nodes: open.nodes,
            admitted: open.admitted,
        })
    }

    /// "End install": the code admits nobody afterwards (an agent holding
    /// it is told [`Refusal::NoInstallation`]).
    pub fn end(&mut self) {
        if let Some(open) = self.open.as_mut() {
            open.ended = true;
        }
    }

    /// Answers an agent's `Start` (its SPAKE2 message `msg_a`) from `source`.
    ///
    /// Refuses, in order: [`Refusal::RateLimited`] (token bucket of
    /// `rate_burst` per source, one token back per `rate_refill`; every
    /// `Start` takes one), [`Refusal::SourceExhausted`] (the code is open
    /// but this source spent its share of guesses) and
    /// [`Refusal::Malformed`] (`msg_a` is not a SPAKE2 message; nothing is
    /// counted). On an open code the guess is counted, with `source` and
    /// `now`; on any other, the challenge is a decoy that counts nothing and
    /// that [`CodeBook::admit`] refuses with the reason.
    pub fn challenge(
        &mut self,
        source: IpAddr,
        now: SystemTime,
        binding: ChannelBinding,
        msg_a: &[u8],
    ) -> Result<Challenge, Refusal> {
        self.limiter
            .take(source, now, self.policy.rate_burst, self.policy.rate_refill)
            .map_err(|retry_after_secs| Refusal::RateLimited { retry_after_secs })?;
        let id = self.next_attempt;
        self.next_attempt = self.next_attempt.wrapping_add(1);
        let per_source = self.policy.max_failures_per_source.max(1);
        let open = self
            .open
            .as_mut()
            .filter(|open| open.state(&self.policy, now) == CodeState::Open);
        let Some(open) = open else {
            // A decoy: the closed code, so its holder hears why; else a random one.
            let code = match self.open.as_ref() {
                Some(closed) => closed.code.clone(),
                None => InstallCode::generate().map_err(|_| Refusal::NoInstallation)?,
            };
            let (handshake, reply) = ControllerHandshake::respond(&code, binding, msg_a)
                .map_err(|e| Refusal::Malformed(e.to_string()))?;
            let attempt = Attempt {
                generation: self.generation,
                id,
                counted: false,
            };
            return Ok(Challenge {
                attempt,
                handshake,
                reply,
            });
        };
        let key = source_key(source);
        let spent = open
            .attempts
            .iter()
            .filter(|a| source_key(a.source) == key)
            .count();
        if spent >= per_source as usize {
            return Err(Refusal::SourceExhausted);
        }
        let (handshake, reply) = ControllerHandshake::respond(&open.code, binding, msg_a)
            .map_err(|e| Refusal::Malformed(e.to_string()))?;
        open.failures += 1;
        open.attempts.push(FailedAttempt {
            source,
            at: now,
            pending: Some(id),
        });
        Ok(Challenge {
            attempt: Attempt {
                generation: open.generation,
                id,
                counted: true,
            },
            handshake,
            reply,
        })
    }

    /// The agent's confirmation of `attempt` verified: admit one node, or
    /// say why not. A counted guess that proved the code is taken off the
    /// failures (only that one); the node counts toward the code's `nodes`,
    /// and the code closes after the last. A decoy is always refused with
    /// the code's state, as is an attempt on a code since replaced or ended.
    pub fn admit(&mut self, attempt: &Attempt, now: SystemTime) -> Result<(), Refusal> {
        let Some(open) = self
            .open
            .as_mut()
            .filter(|open| open.generation == attempt.generation)
        else {
            return Err(Refusal::NoInstallation);
        };
        if !attempt.counted {
            return Err(open
                .refusal(&self.policy, now)
                .unwrap_or(Refusal::NoInstallation));
        }
        let Some(pos) = open
            .attempts
            .iter()
            .position(|a| a.pending == Some(attempt.id))
        else {
            return Err(Refusal::Malformed(
                "this enrolment attempt was already used".to_owned(),
            ));
        };
        open.attempts.remove(pos);
        open.failures = open.failures.saturating_sub(1);
        if open.ended {
            return Err(Refusal::NoInstallation);
        }
        if let Some(nodes) = open.nodes.filter(|&n| open.admitted >= n) {
            return Err(Refusal::Used { nodes });
        }
        open.admitted += 1;
        Ok(())
    }

    /// The attempt ended without proving the code (wrong confirmation,
    /// hang-up, time-out): its guess stays counted, no longer in progress.
    pub fn failed(&mut self, attempt: &Attempt) {
        let Some(open) = self
            .open
            .as_mut()
            .filter(|open| open.generation == attempt.generation)
        else {
            return;
        };
        for a in &mut open.attempts {
            if a.pending == Some(attempt.id) {
                a.pending = None;
            }
        }
    }

    /// Counted guesses on the last code that did not prove it; 0 when none was issued.
    pub fn failures(&self) -> u32 {
        self.open.as_ref().map_or(0, |open| open.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::handshake::AgentHandshake;
    use std::net::Ipv4Addr;

    const TTL: Duration = Duration::from_secs(60);

    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    fn ip(n: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(198, 51, 100, n))
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn binding() -> ChannelBinding {
        ChannelBinding {
            ekm: [5; 32],
            controller_cert_der: b"controller certificate".to_vec(),
        }
    }

    /// What an agent holding some code ends up with.
    #[derive(Debug, PartialEq)]
    enum Outcome {
        /// Refused before any key exchange.
        Refused(Refusal),
        /// The controller's confirmation did not verify: the agent hangs up.
        WrongCode,
        Admitted,
        /// It proved the code and was told why it cannot enrol.
        NotAdmitted(Refusal),
    }

    fn enrol(book: &mut CodeBook, source: IpAddr, now: SystemTime, code: &str) -> Outcome {
        let code = InstallCode::parse(code).expect("4 digits");
        let (agent, msg_a) = AgentHandshake::start(&code, binding());
        let challenge = match book.challenge(source, now, binding(), &msg_a) {
            Ok(c) => c,
            Err(r) => return Outcome::Refused(r),
        };
        let Ok((_, mac)) = agent.finish(&challenge.reply) else {
            book.failed(&challenge.attempt);
            return Outcome::WrongCode;
        };
        challenge
            .handshake
            .confirm(&mac)
            .expect("the agent's confirmation verifies");
        match book.admit(&challenge.attempt, now) {
            Ok(()) => Outcome::Admitted,
            Err(r) => Outcome::NotAdmitted(r),
        }
    }

    fn other(code: &InstallCode) -> String {
        let n: u32 = code.as_str().parse().expect("digits");
        format!("{:04}", (n + 1) % 10_000)
    }

    fn sources(book: &CodeBook, now: SystemTime) -> Vec<IpAddr> {
        let status = book.status(now).expect("a code");
        status.failed.iter().map(|a| a.source).collect()
    }

    #[test]
    fn default_policy_is_five_guesses_two_per_source_burst_ten_one_token_per_six_seconds() {
        let policy = Policy::default();
        assert_eq!(policy.max_failures, 5);
        assert_eq!(policy.max_failures_per_source, 2);
        assert_eq!(policy.rate_burst, 10);
        assert_eq!(policy.rate_refill, secs(6));
        assert_eq!(CodeBook::new().policy(), &policy);
    }

    #[test]
    fn the_right_code_admits_a_node_and_nothing_shows_the_digits() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, None).expect("issue");
        assert_eq!(issued.expires_at, now + TTL);
        assert_eq!(book.active(now), Some(issued.clone()));
        assert_eq!(
            enrol(&mut book, ip(1), now, issued.code.as_str()),
            Outcome::Admitted
        );
        let status = book.status(now).expect("status");
        assert_eq!(status.state, CodeState::Open);
        assert_eq!(status.admitted, 1);
        assert!(status.failed.is_empty(), "{status:?}");
        assert_eq!(book.failures(), 0);
        assert!(!format!("{book:?}").contains(issued.code.as_str()));
        let (_, msg_a) = AgentHandshake::start(&issued.code, binding());
        let challenge = book
            .challenge(ip(2), now, binding(), &msg_a)
            .expect("challenge");
        assert!(!format!("{challenge:?}").contains(issued.code.as_str()));
    }

    #[test]
    fn malformed_starts_count_nothing_and_leave_the_code_open_for_a_real_agent() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, None).expect("issue");
        let mut wrong_side = vec![b'B'];
        wrong_side.extend_from_slice(&[9; 32]);
        for garbage in [
            vec![],
            vec![0u8; 33],
            vec![b'A'; 32],
            wrong_side,
            vec![7; 500],
        ] {
            for _ in 0..2 {
                assert!(matches!(
                    book.challenge(ip(1), now, binding(), &garbage),
                    Err(Refusal::Malformed(_))
                ));
            }
        }
        // Ten garbage Starts spent the rate limit of that address, not the code.
        assert!(matches!(
            book.challenge(ip(1), now, binding(), &[]),
            Err(Refusal::RateLimited { .. })
        ));
        assert_eq!(book.failures(), 0);
        assert_eq!(book.status(now).map(|s| s.state), Some(CodeState::Open));
        assert_eq!(
            enrol(&mut book, ip(2), now, issued.code.as_str()),
            Outcome::Admitted
        );
    }

    #[test]
    fn each_answered_guess_counts_with_its_source_and_one_source_gets_two() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, None).expect("issue");
        let wrong = other(&issued.code);
        assert_eq!(enrol(&mut book, ip(1), now, &wrong), Outcome::WrongCode);
        // A peer that never sends its confirmation still spent a guess: the
        // reply let it test one code offline.
        let (_, msg_a) = AgentHandshake::start(&issued.code, binding());
        let hung_up = book
            .challenge(ip(1), now + secs(1), binding(), &msg_a)
            .expect("challenge");
        assert!(hung_up.attempt.counted());
        drop(hung_up);
        assert_eq!(book.failures(), 2);
        assert_eq!(
            enrol(&mut book, ip(1), now, issued.code.as_str()),
            Outcome::Refused(Refusal::SourceExhausted)
        );
        let status = book.status(now).expect("status");
        assert_eq!(status.state, CodeState::Open);
        assert_eq!(sources(&book, now), vec![ip(1), ip(1)]);
        assert_eq!(status.failed[0].at, now);
        assert_eq!(status.failed[1].at, now + secs(1));
        assert!(!status.failed[0].in_progress());
        assert!(
            status.failed[1].in_progress(),
            "never ended: still in progress"
        );
        // The code is still there for everyone else.
        assert_eq!(
            enrol(&mut book, ip(2), now, issued.code.as_str()),
            Outcome::Admitted
        );
        assert_eq!(
            Refusal::SourceExhausted.to_string(),
            "too many wrong install codes from this address: check the 4 digits in the console, or try from another address"
        );
    }

    #[test]
    fn five_wrong_guesses_burn_the_code_and_its_holder_is_told_so() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, None).expect("issue");
        let wrong = other(&issued.code);
        for n in 0..5 {
            assert_eq!(enrol(&mut book, ip(n), now, &wrong), Outcome::WrongCode);
        }
        assert_eq!(book.failures(), 5);
        assert_eq!(book.active(now), None);
        assert_eq!(book.status(now).map(|s| s.state), Some(CodeState::Burned));
        assert_eq!(sources(&book, now), (0..5).map(ip).collect::<Vec<_>>());
        // Further guesses are answered but count nothing and never admit.
        for n in 10..20 {
            let guess = format!("{:04}", u32::from(n) * 7);
            let outcome = enrol(&mut book, ip(n), now, &guess);
            assert!(
                matches!(
                    outcome,
                    Outcome::WrongCode | Outcome::NotAdmitted(Refusal::Burned)
                ),
                "{outcome:?}"
            );
        }
        assert_eq!(book.failures(), 5);
        assert_eq!(
            enrol(&mut book, ip(100), now, issued.code.as_str()),
            Outcome::NotAdmitted(Refusal::Burned)
        );
    }

    #[test]
    fn a_success_takes_back_only_its_own_guess() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, None).expect("issue");
        let wrong = other(&issued.code);
        for n in 0..4 {
            assert_eq!(enrol(&mut book, ip(n), now, &wrong), Outcome::WrongCode);
        }
        for n in 10..15 {
            assert_eq!(
                enrol(&mut book, ip(n), now, issued.code.as_str()),
                Outcome::Admitted
            );
        }
        assert_eq!(book.failures(), 4, "successes refund nobody else's failure");
        assert_eq!(enrol(&mut book, ip(20), now, &wrong), Outcome::WrongCode);
        assert_eq!(
            enrol(&mut book, ip(21), now, issued.code.as_str()),
            Outcome::NotAdmitted(Refusal::Burned)
        );
        assert_eq!(book.status(now).map(|s| s.admitted), Some(5));
    }

    #[test]
    fn a_code_for_one_node_admits_one_then_refuses_with_the_reason() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, Some(1)).expect("issue");
        assert_eq!(issued.nodes, Some(1));
        let code = issued.code.as_str();
        assert_eq!(enrol(&mut book, ip(1), now, code), Outcome::Admitted);
        assert_eq!(book.active(now), None);
        let status = book.status(now).expect("status");
        assert_eq!(
            (status.state, status.nodes, status.admitted),
            (CodeState::Used, Some(1), 1)
        );
        let refused = enrol(&mut book, ip(2), now, code);
        assert_eq!(refused, Outcome::NotAdmitted(Refusal::Used { nodes: 1 }));
        assert_eq!(
            Refusal::Used { nodes: 1 }.to_string(),
            "the install code has admitted all 1 node(s) it was made for: generate a new one in the console"
        );
        assert_eq!(book.failures(), 0);
    }

    #[test]
    fn two_agents_racing_for_the_last_node_get_one_admission() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, Some(1)).expect("issue");
        let mut confirmed = Vec::new();
        for n in 1..=2 {
            let (agent, msg_a) = AgentHandshake::start(&issued.code, binding());
            let challenge = book
                .challenge(ip(n), now, binding(), &msg_a)
                .expect("challenge");
            let (_, mac) = agent.finish(&challenge.reply).expect("right code");
            challenge.handshake.confirm(&mac).expect("confirmed");
            confirmed.push(challenge.attempt);
        }
        assert_eq!(book.admit(&confirmed[0], now), Ok(()));
        assert_eq!(
            book.admit(&confirmed[1], now),
            Err(Refusal::Used { nodes: 1 })
        );
        assert!(matches!(
            book.admit(&confirmed[0], now),
            Err(Refusal::Malformed(_))
        ));
        assert_eq!(book.status(now).map(|s| s.admitted), Some(1));
    }

    #[test]
    fn without_the_code_nobody_learns_whether_one_is_open() {
        let now = t0();
        let mut none = CodeBook::new();
        let mut open = CodeBook::new();
        let issued = open.issue(now, TTL, None).expect("issue");
        let guess = other(&issued.code);
        // Both answer with a challenge the wrong code cannot confirm.
        assert_eq!(enrol(&mut none, ip(1), now, &guess), Outcome::WrongCode);
        assert_eq!(enrol(&mut open, ip(1), now, &guess), Outcome::WrongCode);
        assert_eq!(none.status(now), None);
        assert_eq!(none.failures(), 0);
    }

    #[test]
    fn ended_and_expired_codes_tell_their_holder_why() {
        let now = t0();
        let mut book = CodeBook::new();
        let issued = book.issue(now, TTL, None).expect("issue");
        assert_eq!(
            enrol(&mut book, ip(1), now + secs(59), issued.code.as_str()),
            Outcome::Admitted
        );
        assert_eq!(book.active(now + secs(60)), None);
        assert_eq!(
            enrol(&mut book, ip(2), now + secs(60), issued.code.as_str()),
            Outcome::NotAdmitted(Refusal::Expired)
        );
        let issued = book.issue(now, TTL, None).expect("issue");
        book.end();
        assert_eq!(book.active(now), None);
        assert_eq!(book.status(now).map(|s| s.state), Some(CodeState::Ended));
        assert_eq!(
            enrol(&mut book, ip(3), now, issued.code.as_str()),
            Outcome::NotAdmitted(Refusal::NoInstallation)
        );
        assert!(
            Refusal::NoInstallation
                .to_string()
                .contains("POST /api/v1/install-codes")
        );
    }

    #[test]
    fn an_attempt_on_a_replaced_or_ended_code_is_not_admitted() {
        let mut book = CodeBook::new();
        let now = t0();
        let first = book.issue(now, TTL, None).expect("issue");
        let (agent, msg_a) = AgentHandshake::start(&first.code, binding());
        let old = book
            .challenge(ip(1), now, binding(), &msg_a)
            .expect("challenge");
        let (_, mac) = agent.finish(&old.reply).expect("right code");
        old.handshake.confirm(&mac).expect("confirmed");
        let second = book.issue(now, TTL, None).expect("issue");
        assert_eq!(book.failures(), 0, "a new code starts with no guesses");
        assert_eq!(book.admit(&old.attempt, now), Err(Refusal::NoInstallation));
        assert_eq!(book.status(now).map(|s| s.admitted), Some(0));

        let (agent, msg_a) = AgentHandshake::start(&second.code, binding());
        let late = book
            .challenge(ip(2), now, binding(), &msg_a)
            .expect("challenge");
        let (_, mac) = agent.finish(&late.reply).expect("right code");
        late.handshake.confirm(&mac).expect("confirmed");
        book.end();
        assert_eq!(book.admit(&late.attempt, now), Err(Refusal::NoInstallation));
    }

    #[test]
    fn counted_guesses_and_nodes_survive_a_restart_and_old_books_load() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL, Some(3)).expect("issue");
        assert_eq!(
            enrol(&mut book, ip(1), now, issued.code.as_str()),
            Outcome::Admitted
        );
        let (_, msg_a) = AgentHandshake::start(&issued.code, binding());
        let in_flight = book
            .challenge(ip(2), now, binding(), &msg_a)
            .expect("challenge");
        let json = serde_json_like(&book);
        let restored: CodeBook = serde_roundtrip(&json);
        let status = restored.status(now).expect("status");
        assert_eq!((status.nodes, status.admitted), (Some(3), 1));
        assert_eq!(status.failed.len(), 1);
        assert!(
            !status.failed[0].in_progress(),
            "after a restart an unfinished guess is a failure"
        );
        let mut restored = restored;
        assert!(matches!(
            restored.admit(&in_flight.attempt, now),
            Err(Refusal::Malformed(_))
        ));
    }

    /// The book as the controller stores it.
    fn serde_json_like(book: &CodeBook) -> String {
        serde_json::to_string(book).expect("serialize")
    }

    fn serde_roundtrip(json: &str) -> CodeBook {
        serde_json::from_str(json).expect("deserialize")
    }

    #[test]
    fn a_book_saved_before_sources_were_kept_still_loads() {
        let old = r#"{"policy":{"max_failures":5,"rate_burst":10,"rate_refill":{"secs":6,"nanos":0}},
            "open":{"code":"0427","expires_at":{"secs_since_epoch":1700000060,"nanos_since_epoch":0},"failures":3,"generation":1},
            "generation":1}"#;
        let book = serde_roundtrip(old);
        assert_eq!(book.policy(), &Policy::default());
        assert_eq!(book.failures(), 3);
        let status = book.status(t0()).expect("status");
        assert_eq!(
            (status.state, status.nodes, status.admitted),
            (CodeState::Open, None, 0)
        );
        assert!(status.failed.is_empty());
    }

    #[test]
    fn rate_limit_allows_a_burst_of_ten_per_address_then_refills() {
        let mut book = CodeBook::with_policy(Policy {
            max_failures: 1000,
            max_failures_per_source: 1000,
            ..Policy::default()
        });
        let now = t0();
        let issued = book.issue(now, secs(3600), None).expect("issue");
        let wrong = other(&issued.code);
        for _ in 0..10 {
            assert_eq!(enrol(&mut book, ip(1), now, &wrong), Outcome::WrongCode);
        }
        let refused = Refusal::RateLimited {
            retry_after_secs: 6,
        };
        assert_eq!(
            enrol(&mut book, ip(1), now, &wrong),
            Outcome::Refused(refused.clone())
        );
        assert_eq!(
            refused.to_string(),
            "too many attempts from this address: wait 6 s and try again"
        );
        // Another address is unaffected.
        assert_eq!(enrol(&mut book, ip(2), now, &wrong), Outcome::WrongCode);
        // Part way through the refill the wait shrinks.
        assert_eq!(
            enrol(&mut book, ip(1), now + secs(4), &wrong),
            Outcome::Refused(Refusal::RateLimited {
                retry_after_secs: 2
            })
        );
        // After one refill period exactly one more attempt is allowed.
        let later = now + secs(6);
        assert_eq!(enrol(&mut book, ip(1), later, &wrong), Outcome::WrongCode);
        assert!(matches!(
            enrol(&mut book, ip(1), later, &wrong),
            Outcome::Refused(Refusal::RateLimited { .. })
        ));
    }

    #[test]
    fn rate_limit_is_checked_before_anything_else() {
        let mut book = CodeBook::new();
        let now = t0();
        for _ in 0..10 {
            assert_eq!(enrol(&mut book, ip(1), now, "1234"), Outcome::WrongCode);
        }
        assert!(matches!(
            enrol(&mut book, ip(1), now, "1234"),
            Outcome::Refused(Refusal::RateLimited { .. })
        ));
    }

    #[test]
    fn absurd_ttl_is_refused_not_a_panic() {
        let mut book = CodeBook::new();
        assert_eq!(
            book.issue(t0(), Duration::MAX, None),
            Err(CodeError::TtlTooLong)
        );
        assert_eq!(book.active(t0()), None);
    }
}
