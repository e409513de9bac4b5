//! Deployment Engine's shared protocol crate: the wire messages between agent
//! and controller, their framing, the types both sides agree on, how both
//! binaries read their config files and how both print an error's chain;
//! and, in [`api`], the HTTP API's request and answer bodies the
//! controller, `dectl` and the tests share; and, in [`cli_docs`], the
//! binaries' shell completions and man pages.
//!
//! Architecture invariant: this is the only crate that knows the wire format.
//! It does no network I/O of its own (framing works on any `AsyncRead` /
//! `AsyncWrite`) and holds no sled, axum or quinn types.

pub mod api;
pub mod cli_docs;
mod clock;
mod config;
mod error;
mod files;
mod frame;
mod hardware;
mod ids;
mod logging;
mod signal;
mod step;
mod wire;

pub use clock::{CLOCK_SKEW_WARN_SECS, deadline_on_node, skew_secs, unix_ms};
pub use config::{ConfigError, load_config, load_toml, parse_toml};
pub use error::ErrorChain;
pub use files::{ensure_private_dir, write_private};
pub use frame::{
    FrameError, FrameReader, MAX_FRAME_LEN, decode, encode, read_frame, write_frame, write_frames,
};
pub use hardware::{ComponentStatus, Hardware, Usage};
pub use ids::{DeploymentId, NodeId, StepId};
pub use logging::{LogFormat, init_logging};
pub use signal::shutdown_signal;
pub use step::{
    Lane, MonitOp, STEP_DOMAIN, SignError, SignedStep, Step, StepAction, StepRefusal, Unpack,
    check_step, decode_step_unverified, sign_step, verify_step,
};
pub use wire::{
    AGENT_ALPN, AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, ENROLL_ALPN, EnrollClientMsg,
    EnrollGrant, EnrollRefusal, EnrollRequest, EnrollServerMsg, Heartbeat, Hello, InstanceState,
    LINK_IDLE_TIMEOUT, LINK_KEEP_ALIVE, LinkRefusal, OutStream, PROTOCOL_VERSION, PreviousStepKey,
    StepEvent, StepEventKind, StepOutcome, Trust, Welcome, close_codes, renewal_due,
};
