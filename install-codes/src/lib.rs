//! Install codes and the SPAKE2 enrolment handshake of Deployment Engine, as a pure state machine.
//!
//! The controller keeps a [`CodeBook`]: one 4-digit [`InstallCode`] at a
//! time with a TTL, an optional number of nodes it admits, a count of the
//! guesses made on it (with their sources) that burns it after
//! [`Policy::max_failures`], a share of those per source, and per-address
//! rate limits. Each enrolment connection hands the agent's first message
//! to [`CodeBook::challenge`], which runs the [`ControllerHandshake`] against
//! the agent's [`AgentHandshake`], bound to the TLS connection by a
//! [`ChannelBinding`]; once the agent's confirmation verifies,
//! [`CodeBook::admit`] decides, and the [`SessionKeys`] authenticate the
//! rest of the enrolment.
//!
//! Nothing here does I/O or reads the clock: times are passed in, and the
//! only outside input is the system random source.

mod book;
mod code;
mod handshake;
mod rate;

pub use book::{
    Attempt, Challenge, CodeBook, CodeState, CodeStatus, FailedAttempt, IssuedCode, Policy, Refusal,
};
pub use code::{CodeError, InstallCode};
pub use handshake::{
    AgentHandshake, ChannelBinding, ControllerHandshake, EKM_LABEL, HandshakeError, SessionKeys,
    Side,
};
