//! Deployment Engine's shared protocol crate: the wire messages between agent
//! and controller, their framing, and the types both sides agree on.
//!
//! Architecture invariant: this is the only crate that knows the wire format.
//! It does no network I/O of its own (framing works on any `AsyncRead` /
//! `AsyncWrite`) and holds no sled, axum or quinn types.

mod files;
mod frame;
mod hardware;
mod step;
mod wire;

pub use files::{ensure_private_dir, write_private};
pub use frame::{FrameError, MAX_FRAME_LEN, decode, encode, read_frame, write_frame};
pub use hardware::{ComponentStatus, Hardware, Usage};
pub use step::{
    Lane, MonitOp, STEP_DOMAIN, SignError, SignedStep, Step, StepAction, StepRefusal, check_step,
    decode_step_unverified, sign_step, verify_step,
};
pub use wire::{
    AGENT_ALPN, AgentMsg, CONTROLLER_SERVER_NAME, ControllerMsg, ENROLL_ALPN, EnrollClientMsg,
    EnrollGrant, EnrollRefusal, EnrollRequest, EnrollServerMsg, Heartbeat, Hello, LinkRefusal,
    OutStream, PROTOCOL_VERSION, StepEvent, StepEventKind, StepOutcome, Welcome, close_codes,
};
