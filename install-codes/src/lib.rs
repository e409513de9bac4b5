//! Install codes and the SPAKE2 enrolment handshake of Deployment Engine, as a pure state machine.
//!
//! The controller keeps a [`CodeBook`]: one open 4-digit [`InstallCode`] at a
//! time with a TTL, a failure count that burns the code after
//! [`Policy::max_failures`], and per-address rate limits. Each enrolment
//! connection asks [`CodeBook::begin_attempt`] first, then runs
//! [`ControllerHandshake`] against the agent's [`AgentHandshake`], bound to
//! the TLS connection by a [`ChannelBinding`]; after both key confirmations
//! the [`SessionKeys`] authenticate the rest of the enrolment.
//!
//! Nothing here does I/O or reads the clock: times are passed in, and the
//! only outside input is the system random source.

mod book;
mod code;
mod handshake;
mod rate;

pub use book::{Attempt, CodeBook, IssuedCode, Policy, Refusal};
pub use code::{CodeError, InstallCode};
pub use handshake::{
    AgentHandshake, ChannelBinding, ControllerHandshake, EKM_LABEL, HandshakeError, SessionKeys,
    Side,
};
