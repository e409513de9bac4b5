//! The Deployment Engine agent as a library: enrolment ([`enroll`]), the
//! controller link ([`link`]), the node identity on disk, and hardware
//! facts. `main.rs` only parses the command line; `bin/de-sim.rs` runs many
//! simulated agents on this library for scale tests.

mod applied;
mod enroll;
mod fetch;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod hardware;
mod identity;
mod link;
mod monit;
mod net;
mod steps;

pub use applied::AppliedError;
pub use enroll::{EnrollError, EnrollOptions, enroll, enroll_on};
pub use fetch::DEFAULT_CACHE_MAX_MB;
pub use hardware::{HardwareError, Sampler, hostname};
pub use identity::{Identity, IdentityError, IdentityMeta};
pub use link::{LinkError, LinkOptions, backoff, check_pulled, reconnect_delay, run};
pub use monit::{Monit, MonitError, parse_status};
pub use net::{DEFAULT_QUIC_PORT, NetError, endpoint, link_config, resolve};
pub use steps::{Ledger, LedgerError};
