//! Everything about the nodes and their agents: the controller's keys and
//! certificates (`pki`), install codes (`codes`), enrolled nodes and their
//! live links (`nodes`), the per-node step queues (`steps`), the QUIC
//! endpoint that enrols agents and serves their links (`quic`), and the
//! address agents are told to dial (`public_addr`).

pub(crate) mod codes;
pub(crate) mod nodes;
pub(crate) mod pki;
pub(crate) mod public_addr;
pub mod quic;
pub(crate) mod steps;
pub mod watchdog;

pub use codes::{Codes, CodesError};
pub use nodes::{NodeRecord, NodeView, Nodes};
pub use pki::{Pki, PkiError, TokenOrigin};
pub use public_addr::{PublicAddr, PublicAddrError, agent_address, agent_command, hostname};
pub use steps::{StepQueue, StepRecord, StepState, StepUpdate, StepsError};
