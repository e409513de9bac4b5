//! The controller's book of install codes: one open code at a time, its expiry, failure count and rate limits.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use crate::code::{CodeError, InstallCode};
use crate::rate::RateLimiter;

/// Limits on guessing an install code.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Policy {
    /// Failed attempts after which the code is burned (default 5).
    pub max_failures: u32,
    /// Attempts one source address may make at once (default 10; 0 counts as 1).
    pub rate_burst: u32,
    /// Time to earn back one attempt (default 6 s; zero disables the rate limit).
    pub rate_refill: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_failures: 5,
            rate_burst: 10,
            rate_refill: Duration::from_secs(6),
        }
    }
}

/// What the controller persists (serde) about install codes; the
/// rate-limiter state is in memory only (not serialized).
///
/// A failure is counted as soon as an attempt begins and refunded only when
/// the agent's key confirmation verifies, so a guesser who hangs up halfway
/// still spends a try. Persist the book after [`CodeBook::begin_attempt`]
/// succeeds, so that restarting the controller does not hand out fresh tries.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct CodeBook {
    policy: Policy,
    open: Option<OpenCode>,
    /// Bumped by every [`CodeBook::issue`]; attempts remember it.
    generation: u64,
    #[serde(skip)]
    limiter: RateLimiter,
    /// Attempts on the open code that may still be refunded (at most
    /// `max_failures` of them, as each one holds a counted failure).
    #[serde(skip)]
    refundable: Vec<u64>,
    #[serde(skip)]
    next_attempt: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OpenCode {
    code: InstallCode,
    expires_at: SystemTime,
    failures: u32,
    generation: u64,
}

/// A code handed to the operator, and when it stops working.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedCode {
    pub code: InstallCode,
    pub expires_at: SystemTime,
}

/// Why an enrolment attempt is refused before any key exchange.
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
}

/// One admitted enrolment attempt: the code to run the handshake with, and
/// which code generation it belongs to (for [`CodeBook::succeeded`]).
#[derive(Debug)]
pub struct Attempt {
    generation: u64,
    id: u64,
    code: InstallCode,
}

impl Attempt {
    /// The code the controller side of the handshake must use.
    pub fn code(&self) -> &InstallCode {
        &self.code
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

    /// New code with this TTL; replaces any active/expired/burned one and
    /// resets its failure count.
    pub fn issue(&mut self, now: SystemTime, ttl: Duration) -> Result<IssuedCode, CodeError> {
        let expires_at = now.checked_add(ttl).ok_or(CodeError::TtlTooLong)?;
        let code = InstallCode::generate()?;
        self.generation = self.generation.wrapping_add(1);
        self.refundable.clear();
        self.open = Some(OpenCode {
            code: code.clone(),
            expires_at,
            failures: 0,
            generation: self.generation,
        });
        Ok(IssuedCode { code, expires_at })
    }

    /// The code if one is open and not expired and not burned.
    pub fn active(&self, now: SystemTime) -> Option<IssuedCode> {
        self.open
            .as_ref()
            .filter(|open| now < open.expires_at && open.failures < self.policy.max_failures)
            .map(|open| IssuedCode {
                code: open.code.clone(),
                expires_at: open.expires_at,
            })
    }

    /// "End install": no code is open afterwards (agents then get
    /// [`Refusal::NoInstallation`]).
    pub fn end(&mut self) {
        self.open = None;
        self.refundable.clear();
    }

    /// Called when an agent starts a handshake.
    ///
    /// Checks, in order: the rate limit for `source` (token bucket of
    /// `rate_burst`, one token back per `rate_refill`; this consumes a
    /// token), then [`Refusal::NoInstallation`] (never issued, or ended),
    /// [`Refusal::Expired`] (`now >= expires_at`) and [`Refusal::Burned`]
    /// (`failures >= max_failures`).
    ///
    /// An admitted attempt is counted as a failure at once (so an attacker
    /// who disconnects after seeing the controller's confirmation still
    /// spends a try); [`CodeBook::succeeded`] refunds it.
    pub fn begin_attempt(&mut self, source: IpAddr, now: SystemTime) -> Result<Attempt, Refusal> {
        self.limiter
            .take(source, now, self.policy.rate_burst, self.policy.rate_refill)
            .map_err(|retry_after_secs| Refusal::RateLimited { retry_after_secs })?;
        let open = self.open.as_mut().ok_or(Refusal::NoInstallation)?;
        if now >= open.expires_at {
            return Err(Refusal::Expired);
        }
        if open.failures >= self.policy.max_failures {
            return Err(Refusal::Burned);
        }
        open.failures += 1;
        let id = self.next_attempt;
        self.next_attempt = self.next_attempt.wrapping_add(1);
        self.refundable.push(id);
        Ok(Attempt {
            generation: open.generation,
            id,
            code: open.code.clone(),
        })
    }

    /// The agent's key confirmation verified: refund the failure counted by
    /// [`CodeBook::begin_attempt`], once, and only if the attempt belongs to
    /// the current code generation (otherwise nothing happens). The code
    /// stays open for more agents.
    pub fn succeeded(&mut self, attempt: &Attempt) {
        let Some(open) = self.open.as_mut() else {
            return;
        };
        if open.generation != attempt.generation {
            return;
        }
        let Some(pos) = self.refundable.iter().position(|&id| id == attempt.id) else {
            return;
        };
        self.refundable.swap_remove(pos);
        open.failures = open.failures.saturating_sub(1);
    }

    /// Failed (or still unconfirmed) attempts on the open code; 0 when none is open.
    pub fn failures(&self) -> u32 {
        self.open.as_ref().map_or(0, |open| open.failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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

    #[test]
    fn default_policy_is_five_failures_burst_ten_one_token_per_six_seconds() {
        let policy = Policy::default();
        assert_eq!(policy.max_failures, 5);
        assert_eq!(policy.rate_burst, 10);
        assert_eq!(policy.rate_refill, secs(6));
        assert_eq!(CodeBook::new().policy(), &policy);
    }

    #[test]
    fn issued_code_is_active_and_admits_an_attempt_with_that_code() {
        let mut book = CodeBook::new();
        let now = t0();
        let issued = book.issue(now, TTL).expect("issue");
        assert_eq!(issued.expires_at, now + TTL);
        assert_eq!(book.active(now), Some(issued.clone()));
        let attempt = book.begin_attempt(ip(1), now).expect("admitted");
        assert_eq!(attempt.code(), &issued.code);
        assert!(!format!("{attempt:?}").contains(issued.code.as_str()));
        assert!(!format!("{book:?}").contains(issued.code.as_str()));
    }

    #[test]
    fn code_expires_at_its_ttl() {
        let mut book = CodeBook::new();
        let now = t0();
        book.issue(now, TTL).expect("issue");
        assert!(book.begin_attempt(ip(1), now + secs(59)).is_ok());
        assert!(book.active(now + secs(59)).is_some());
        assert_eq!(
            book.begin_attempt(ip(2), now + secs(60)).map(|_| ()),
            Err(Refusal::Expired)
        );
        assert_eq!(book.active(now + secs(60)), None);
        assert_eq!(book.active(now + secs(3600)), None);
    }

    #[test]
    fn five_unconfirmed_attempts_burn_the_code() {
        let mut book = CodeBook::new();
        let now = t0();
        book.issue(now, TTL).expect("issue");
        for n in 0..5 {
            // Distinct sources: the rate limiter is not what stops them.
            let attempt = book.begin_attempt(ip(n), now).expect("admitted");
            drop(attempt); // never succeeded: wrong code or hung up
        }
        assert_eq!(book.failures(), 5);
        assert_eq!(
            book.begin_attempt(ip(100), now).map(|_| ()),
            Err(Refusal::Burned)
        );
        assert_eq!(book.active(now), None);
    }

    #[test]
    fn a_successful_attempt_is_refunded_once_and_the_code_stays_open() {
        let mut book = CodeBook::new();
        let now = t0();
        book.issue(now, TTL).expect("issue");
        let good = book.begin_attempt(ip(1), now).expect("admitted");
        assert_eq!(book.failures(), 1);
        book.succeeded(&good);
        assert_eq!(book.failures(), 0);
        book.succeeded(&good);
        assert_eq!(book.failures(), 0, "a second refund must not happen");
        // 4 failures, then more successes: the code is still usable by other agents.
        for n in 10..14 {
            book.begin_attempt(ip(n), now).expect("admitted");
        }
        for n in 20..25 {
            let ok = book.begin_attempt(ip(n), now).expect("admitted");
            book.succeeded(&ok);
        }
        assert_eq!(book.failures(), 4);
        assert!(book.active(now).is_some());
        // A refund cannot be used to earn tries beyond the failures counted.
        book.begin_attempt(ip(30), now).expect("admitted");
        book.succeeded(&good);
        assert_eq!(
            book.begin_attempt(ip(31), now).map(|_| ()),
            Err(Refusal::Burned)
        );
    }

    #[test]
    fn issuing_a_new_code_resets_failures_and_ignores_old_attempts() {
        let mut book = CodeBook::new();
        let now = t0();
        let first = book.issue(now, TTL).expect("issue");
        let old = book.begin_attempt(ip(1), now).expect("admitted");
        for n in 2..6 {
            book.begin_attempt(ip(n), now).expect("admitted");
        }
        assert_eq!(
            book.begin_attempt(ip(6), now).map(|_| ()),
            Err(Refusal::Burned)
        );
        let second = book.issue(now, TTL).expect("issue");
        assert_eq!(book.failures(), 0);
        assert_eq!(book.active(now).map(|c| c.code), Some(second.code.clone()));
        let fresh = book.begin_attempt(ip(7), now).expect("admitted");
        assert_eq!(fresh.code(), &second.code);
        assert_eq!(old.code(), &first.code);
        book.succeeded(&old);
        assert_eq!(
            book.failures(),
            1,
            "an attempt on the old code must not refund the new one"
        );
    }

    #[test]
    fn rate_limit_allows_a_burst_of_ten_per_address_then_refills() {
        let mut book = CodeBook::with_policy(Policy {
            max_failures: 1000,
            ..Policy::default()
        });
        let now = t0();
        book.issue(now, secs(3600)).expect("issue");
        for _ in 0..10 {
            book.begin_attempt(ip(1), now).expect("within the burst");
        }
        let refused = book.begin_attempt(ip(1), now).map(|_| ());
        assert_eq!(
            refused,
            Err(Refusal::RateLimited {
                retry_after_secs: 6
            })
        );
        let message = refused.expect_err("refused").to_string();
        assert_eq!(
            message,
            "too many attempts from this address: wait 6 s and try again"
        );
        // Another address is unaffected.
        assert!(book.begin_attempt(ip(2), now).is_ok());
        // Part way through the refill the wait shrinks.
        assert_eq!(
            book.begin_attempt(ip(1), now + secs(4)).map(|_| ()),
            Err(Refusal::RateLimited {
                retry_after_secs: 2
            })
        );
        // After one refill period exactly one more attempt is allowed.
        let later = now + secs(6);
        assert!(book.begin_attempt(ip(1), later).is_ok());
        assert!(matches!(
            book.begin_attempt(ip(1), later),
            Err(Refusal::RateLimited { .. })
        ));
    }

    #[test]
    fn rate_limit_is_checked_before_anything_else() {
        let mut book = CodeBook::new();
        let now = t0();
        for _ in 0..10 {
            assert_eq!(
                book.begin_attempt(ip(1), now).map(|_| ()),
                Err(Refusal::NoInstallation)
            );
        }
        assert!(matches!(
            book.begin_attempt(ip(1), now),
            Err(Refusal::RateLimited { .. })
        ));
    }

    #[test]
    fn no_installation_when_never_issued_or_ended() {
        let mut book = CodeBook::new();
        let now = t0();
        assert_eq!(
            book.begin_attempt(ip(1), now).map(|_| ()),
            Err(Refusal::NoInstallation)
        );
        assert_eq!(book.active(now), None);
        assert_eq!(book.failures(), 0);
        book.issue(now, TTL).expect("issue");
        let attempt = book.begin_attempt(ip(1), now).expect("admitted");
        book.end();
        assert_eq!(book.active(now), None);
        assert_eq!(
            book.begin_attempt(ip(1), now).map(|_| ()),
            Err(Refusal::NoInstallation)
        );
        book.succeeded(&attempt); // no-op, no panic
        assert_eq!(book.failures(), 0);
        assert!(
            Refusal::NoInstallation
                .to_string()
                .contains("POST /api/v1/install-codes")
        );
    }

    #[test]
    fn clone_keeps_the_open_code_and_default_is_empty() {
        let mut book = CodeBook::default();
        let now = t0();
        assert_eq!(book.active(now), None);
        let issued = book.issue(now, TTL).expect("issue");
        book.begin_attempt(ip(1), now).expect("admitted");
        let copy = book.clone();
        assert_eq!(copy.active(now), Some(issued));
        assert_eq!(copy.failures(), 1);
    }

    #[test]
    fn absurd_ttl_is_refused_not_a_panic() {
        let mut book = CodeBook::new();
        assert_eq!(book.issue(t0(), Duration::MAX), Err(CodeError::TtlTooLong));
        assert_eq!(book.active(t0()), None);
    }
}
