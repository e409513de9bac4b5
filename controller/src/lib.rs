//! The Deployment Engine controller as a library: its state ([`Controller`]),
//! the HTTP API ([`http::app`]) and the QUIC endpoint ([`quic`]). `main.rs`
//! only parses the command line and wires these together.

mod access;
pub mod agents;
pub mod artifacts;
mod deploy;
#[cfg(any(test, feature = "fuzzing"))]
#[doc(hidden)]
pub mod fuzzing;
mod group_commit;
pub mod http;
mod metrics;
mod oplog;
mod plan;
mod store;
#[cfg(test)]
mod testkit;
mod util;

use std::path::Path;
use std::sync::Arc;

// What the binaries and the bench use; nothing else is re-exported.
pub use agents::quic;
pub use agents::{
    DEFAULT_NODE_CERT_DAYS, NodeView, PublicAddr, TokenOrigin, agent_address, hostname,
};
pub use deploy::{DEFAULT_STEP_ATTEMPTS, Deployer};
pub use oplog::{DEFAULT_LOG_KEEP, DEFAULT_LOG_MAX_MB, LogLimits};
pub use plan::{Cardinality, Catalogs, validate_plan};

use access::{Audit, Tokens};
use agents::{Codes, Nodes, Pki, PkiError, StepQueue};
use oplog::LogHub;
use plan::{CatalogError, Plans};
use store::{SledStore, Store, StoreError};

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
    #[error("could not load the component catalogs: fix or remove the file named here")]
    Catalog(#[from] CatalogError),
    #[error("could not load the API tokens or the audit log")]
    Access(#[source] StoreError),
    #[error("could not open the log dir {0}")]
    Logs(String, #[source] std::io::Error),
    #[error("could not open the artifacts")]
    Artifacts(#[from] artifacts::ArtifactsError),
}

/// Everything the controller's tasks share.
#[derive(Debug)]
pub struct Controller {
    pub store: Arc<dyn Store>,
    pub pki: Arc<Pki>,
    pub codes: Codes,
    /// The API tokens and their roles (the first one is `admin.token`).
    pub(crate) tokens: Tokens,
    /// Which token asked for what (`GET /api/v1/audit`).
    pub(crate) audit: Audit,
    pub nodes: Nodes,
    pub steps: StepQueue,
    /// Built-in catalogs and the operator's (`DATA/catalogs/`), loaded at start.
    pub catalogs: Catalogs,
    pub plans: Plans,
    /// `DATA/logs/`: `local.log`, one file per component instance, and the
    /// live feed of the `/deployment-engine/log` WebSocket.
    pub logs: LogHub,
    pub deployer: Deployer,
    /// The QUIC address agents are told to dial (in the install command shown with a code).
    /// `open` guesses `HOSTNAME:50001`; `main.rs` sets it from `--public-addr` or the bound address.
    pub agent_addr: String,
    /// `/join.sh` and the packages nodes download: set by `main.rs` when the
    /// API speaks HTTPS (the script is only served over a pinned connection).
    pub join: Option<agents::join::Join>,
    /// Files held for `fetch` steps (`DATA/artifacts`).
    pub artifacts: artifacts::Artifacts,
    /// The largest upload accepted (`artifact_max_mb`).
    pub artifact_max_bytes: u64,
    /// Test only: the rate artifacts are sent to agents at (KiB/s).
    pub artifact_send_kibps: Option<u64>,
    /// The counters and histograms `GET /metrics` shows.
    pub(crate) metrics: metrics::Metrics,
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
        let sled = SledStore::open(&data_dir.join("store"))?;
        let metrics = metrics::Metrics::new(sled.flush_times());
        let store: Arc<dyn Store> = Arc::new(sled);
        let codes = Codes::load(store.clone())?;
        let tokens = Tokens::load(store.clone(), pki.token()).map_err(OpenError::Access)?;
        let audit = Audit::open(store.clone()).map_err(OpenError::Access)?;
        let nodes = Nodes::load(store.clone())?;
        let steps = StepQueue::open(store.clone(), pki.step_key(), nodes.clocks().clone())?;
        let catalogs = Catalogs::load(&data_dir.join("catalogs"))?;
        let plans = Plans::load(store.clone())?;
        let log_dir = data_dir.join("logs");
        let logs = LogHub::open(&log_dir)
            .map_err(|e| OpenError::Logs(log_dir.display().to_string(), e))?;
        let artifacts = artifacts::Artifacts::open(data_dir, store.clone())?;
        Ok((
            Controller {
                store,
                pki: Arc::new(pki),
                codes,
                tokens,
                audit,
                nodes,
                steps,
                catalogs,
                plans,
                logs,
                deployer: Deployer::default(),
                agent_addr: format!("{}:{DEFAULT_QUIC_PORT}", hostname()),
                join: None,
                artifacts,
                artifact_max_bytes: artifacts::DEFAULT_ARTIFACT_MAX_MB << 20,
                artifact_send_kibps: None,
                metrics,
            },
            origin,
        ))
    }
}
