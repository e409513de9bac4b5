//! The Deployment Engine controller as a library: its state ([`Controller`]),
//! the HTTP API ([`api::app`]) and the QUIC endpoint ([`quic`]). `main.rs`
//! only parses the command line and wires these together.

pub mod api;
mod codes;
mod nodes;
mod pki;
mod public_addr;
pub mod quic;
mod store;

use std::path::Path;
use std::sync::Arc;

pub use codes::{Codes, CodesError};
pub use nodes::{NodeRecord, NodeView, Nodes};
pub use pki::{Pki, PkiError, TokenOrigin};
pub use public_addr::{PublicAddr, PublicAddrError, agent_address, agent_command, hostname};
pub use store::{SledStore, Store, StoreError, StoreExt, Tree};

/// The agents' QUIC port unless `--quic-listen` says otherwise.
pub const DEFAULT_QUIC_PORT: u16 = 50001;

/// Why the controller could not open its data dir.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("could not create the data dir {0}")]
    DataDir(String, #[source] std::io::Error),
    #[error("could not load the controller's keys")]
    Pki(#[from] PkiError),
    #[error("could not open the store")]
    Store(#[from] StoreError),
}

/// Everything the controller's tasks share.
#[derive(Debug)]
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub pki: Pki,
    pub codes: Codes,
    pub nodes: Nodes,
    /// The QUIC address agents are told to dial (in the install command shown with a code).
    /// `open` guesses `HOSTNAME:50001`; `main.rs` sets it from `--public-addr` or the bound address.
    pub agent_addr: String,
}

impl std::fmt::Debug for dyn Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl Controller {
    /// Opens (or, the first time, creates) the controller in `data_dir`.
    pub fn open(data_dir: &Path) -> Result<(Controller, TokenOrigin), OpenError> {
        de_common::ensure_private_dir(data_dir)
            .map_err(|e| OpenError::DataDir(data_dir.display().to_string(), e))?;
        let (pki, origin) = Pki::load_or_create(data_dir)?;
        let store: Arc<dyn Store> = Arc::new(SledStore::open(&data_dir.join("store"))?);
        let codes = Codes::load(store.clone())?;
        let nodes = Nodes::load(store.clone())?;
        Ok((
            Controller {
                store,
                pki,
                codes,
                nodes,
                agent_addr: format!("{}:{DEFAULT_QUIC_PORT}", hostname()),
            },
            origin,
        ))
    }
}
