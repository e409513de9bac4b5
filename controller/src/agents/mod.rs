//! Everything about the nodes and their agents: the controller's keys and
//! certificates (`pki`), install codes (`codes`), enrolled nodes and their
//! live links (`nodes`), their clocks' skew (`clock`), the per-node step
//! queues (`steps`), the QUIC
//! endpoint that enrols agents and serves their links (`quic`), the
//! address agents are told to dial (`public_addr`), what a node joins
//! with in one line (`join`: `/join.sh`, the packages it downloads), and
//! the rotation of the step key and the CA (`rotation`).

pub(crate) mod clock;
pub(crate) mod codes;
pub mod handout;
pub mod history;
pub mod join;
pub(crate) mod nodes;
pub(crate) mod pki;
pub(crate) mod public_addr;
pub mod quic;
pub(crate) mod rotation;
pub(crate) mod steps;
pub mod watchdog;

pub(crate) use codes::{Codes, CodesError};
pub use nodes::NodeView;
pub(crate) use nodes::Nodes;
pub use pki::{DEFAULT_NODE_CERT_DAYS, TokenOrigin};
pub(crate) use pki::{Pki, PkiError};
pub(crate) use public_addr::agent_command;
pub use public_addr::{PublicAddr, agent_address, hostname};
pub(crate) use rotation::RotationError;
pub(crate) use steps::{StepQueue, StepRecord, StepState, StepsError};
